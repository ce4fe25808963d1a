"""Reading the inputs of a build as a deterministic sequence of rows.

A build enumerates its inputs in the order given (a directory: its files, sorted), and each input
row by row; a row's position in that sequence is its identity for shard planning and resume, and
`source_row` ("PATH:ROW" for tables, "PATH:KEY" for tars) is what the manifest and rejected.jsonl
name. Reading never decodes media: that happens in the worker processes (see `samples.py`).

Tables: parquet, CSV, TSV (CC3M) and JSONL. Tars: the img2dataset layout (or any WebDataset tar).
"""

from __future__ import annotations

import csv
import dataclasses
import glob
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any, Iterator

from data_tools.shards import iter_tar_groups

TABLE_SUFFIXES = (".parquet", ".csv", ".tsv", ".jsonl")
TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz")


@dataclasses.dataclass
class RawRow:
    pos: int  # position in the build's sequence of rows (all inputs)
    source_row: str  # "PATH:ROW" (tables: data rows from 0, blank JSONL lines not counted)
    #                  or "PATH:KEY" (tars)
    fields: dict[str, Any]  # a table row; for tars {"__key__": key, "__members__": {suffix: bytes}}
    media_root: str = ""  # where relative media paths of this row are looked up
    error: tuple[str, str] | None = None  # (code, message) when reading already failed


def expand_inputs(inputs: list[str], *, tars: bool, exclude: Path | None = None) -> list[str]:
    """Files, directories (their matching files, recursively, sorted) and globs → input list."""
    suffixes = TAR_SUFFIXES if tars else TABLE_SUFFIXES
    out: list[str] = []
    for spec in inputs:
        if spec.startswith("pipe:"):
            out.append(spec)
            continue
        if "://" in spec:
            raise ValueError(f"input {spec!r}: remote URLs are not read; download the data first")
        if any(c in spec for c in "*?["):
            matches = sorted(glob.glob(spec, recursive=True))
        elif os.path.isdir(spec):
            matches = sorted(str(p) for p in Path(spec).rglob("*") if p.is_file()
                             and p.name.lower().endswith(suffixes))
        else:
            matches = [spec]
        if exclude is not None:  # never read the build's own output
            matches = [m for m in matches if not Path(m).resolve().is_relative_to(exclude)]
        for m in matches:
            if not os.path.isfile(m):
                raise ValueError(f"input {m!r} does not exist")
            if not m.lower().endswith(suffixes):
                raise ValueError(f"input {m!r}: expected a file ending in {', '.join(suffixes)}")
        if not matches:
            raise ValueError(f"input {spec!r} matches no {'/'.join(suffixes)} file")
        out.extend(matches)
    return out


def iter_rows(inputs: list[str], *, tars: bool, media_root: str = "",
              allow_pipe: bool = False) -> Iterator[RawRow]:
    """All rows of all inputs, in order, numbered from 0."""
    pos = 0
    for path in inputs:
        root = media_root or str(Path(path).parent)
        reader = iter_tar(path, allow_pipe) if tars else iter_table(path)
        for source_row, fields, error in reader:
            yield RawRow(pos, source_row, fields, root, error)
            pos += 1


# --------------------------------------------------------------------------------------- tables

Read = tuple[str, dict[str, Any], "tuple[str, str] | None"]


def iter_table(path: str) -> Iterator[Read]:
    """(source_row, row dict, error) for every row of a parquet / CSV / TSV / JSONL file."""
    name = path.lower()
    if name.endswith(".parquet"):
        rows = _parquet_rows(path)
    elif name.endswith((".csv", ".tsv")):
        rows = _csv_rows(path, "\t" if name.endswith(".tsv") else ",")
    else:
        rows = _jsonl_rows(path)
    index = 0
    try:
        for row, error in rows:
            yield f"{path}:{index}", row, error
            index += 1
    except (OSError, ValueError, csv.Error) as e:  # pyarrow errors are OSError / ValueError
        yield f"{path}:{index}", {}, ("bad_source", f"{path} cannot be read on: "
                                      f"{type(e).__name__}: {e}")


def _parquet_rows(path: str) -> Iterator[tuple[dict, None]]:
    import pyarrow.parquet as pq

    for batch in pq.ParquetFile(path).iter_batches(batch_size=256):
        for row in batch.to_pylist():
            yield row, None


def _csv_rows(path: str, delimiter: str) -> Iterator[tuple[dict, tuple[str, str] | None]]:
    csv.field_size_limit(sys.maxsize)
    with open(path, newline="", encoding="utf-8-sig") as f:  # -sig: Excel's byte-order mark
        reader = csv.DictReader(f, delimiter=delimiter)
        for row in reader:
            if None in row or None in row.values():  # more / fewer fields than the header
                yield {}, ("bad_row", f"row has {len(row) - (None in row)} fields, header has "
                                      f"{len(reader.fieldnames or [])}")
            else:
                yield row, None


def _jsonl_rows(path: str) -> Iterator[tuple[dict, tuple[str, str] | None]]:
    with open(path, "rb") as f:
        for line in f:
            if not line.strip():
                continue  # blank lines are not rows
            try:
                row = json.loads(line)
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                yield {}, ("bad_row", f"line is not JSON: {e}")
                continue
            if not isinstance(row, dict):
                yield {}, ("bad_row", "line is not a JSON object")
            else:
                yield row, None


# ----------------------------------------------------------------------------------------- tars

def iter_tar(path: str, allow_pipe: bool) -> Iterator[Read]:
    """(source_row, {"__key__", "__members__"}, error) for every sample of a tar (or pipe:)."""
    if path.startswith("pipe:"):
        if not allow_pipe:  # build() refuses earlier; this guards other callers
            raise ValueError(f"input {path!r}: pipe: inputs run a shell command; pass --allow-pipe")
        proc = subprocess.Popen(path[len("pipe:"):], shell=True, stdout=subprocess.PIPE)
        stream = proc.stdout
    else:
        proc, stream = None, open(path, "rb")
    key = None
    try:
        for key, members in iter_tar_groups(stream):
            yield f"{path}:{key}", {"__key__": key, "__members__": members}, None
    except Exception as e:  # tarfile.ReadError, EOFError, zlib/gzip errors on truncated data
        yield f"{path}:{key}", {}, ("bad_source", f"{path} cannot be read after key {key!r}: "
                                    f"{type(e).__name__}: {e}")
    finally:
        stream.close()
        if proc is not None:
            proc.wait()
    if proc is not None and proc.returncode != 0:
        yield f"{path}:{key}", {}, ("bad_source", f"{path}: command exited with "
                                    f"status {proc.returncode}")
