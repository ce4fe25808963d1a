"""Reading the inputs of a build as a deterministic sequence of rows.

A build enumerates its inputs in the order given (a directory: its files, sorted), and each input
row by row; a row's position in that sequence is its identity for shard planning and resume, and
`source_row` ("PATH:ROW" for tables, "PATH:KEY" for tars) is what the manifest and rejected.jsonl
name. Reading never decodes media: that happens in the worker processes (see `samples.py`).

Tables: parquet, CSV (RFC 4180), TSV (no quoting: CC3M, Common Voice) and JSONL. Tars: the
img2dataset layout (or any WebDataset tar).
"""

from __future__ import annotations

import csv
import dataclasses
import glob
import io
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any, Iterator

from data_tools.shards import iter_tar_groups
from mmtrain import storage

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
        if storage.is_url(spec):  # streamed through fsspec (mmtrain.storage)
            matches = storage.glob(spec) if any(c in spec for c in "*?[") else [spec]
            for m in matches:
                if not storage.exists(m):
                    raise ValueError(f"input {m!r} does not exist")
            if not matches:
                raise ValueError(f"input {spec!r} matches nothing")
            out.extend(matches)
            continue
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
              allow_pipe: bool = False, header: tuple[str, ...] = ()) -> Iterator[RawRow]:
    """All rows of all inputs, in order, numbered from 0. `header`: column names for CSV/TSV
    files without a header line (raw CC3M: caption, url)."""
    pos = 0
    for path in inputs:
        root = media_root or storage.parent(path)
        reader = iter_tar(path, allow_pipe) if tars else iter_table(path, header)
        for source_row, fields, error in reader:
            yield RawRow(pos, source_row, fields, root, error)
            pos += 1


# --------------------------------------------------------------------------------------- tables

Read = tuple[str, dict[str, Any], "tuple[str, str] | None"]


def iter_table(path: str, header: tuple[str, ...] = ()) -> Iterator[Read]:
    """(source_row, row dict, error) for every row of a parquet / CSV / TSV / JSONL file."""
    name = path.lower()
    if name.endswith(".parquet"):
        rows = _parquet_rows(path)
    elif name.endswith((".csv", ".tsv")):
        rows = _csv_rows(path, "\t" if name.endswith(".tsv") else ",", header)
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

    with storage.open_read(path) as f:
        for batch in pq.ParquetFile(f).iter_batches(batch_size=256):
            for row in batch.to_pylist():
                yield row, None


def _csv_rows(path: str, delimiter: str, header: tuple[str, ...] = ()
              ) -> Iterator[tuple[dict, tuple[str, str] | None]]:
    """Rows of a CSV (RFC 4180: quoted fields may hold commas, quotes as "" and newlines) or a
    TSV (no quoting at all: a `"` is text, as in Common Voice and CC3M). `header`: the column
    names of a file without a header line. An unclosed quote is an error naming the line where
    it opened; the rest of that file is not read (it would be one swallowed field)."""
    csv.field_size_limit(sys.maxsize)  # --max-text-chars rejects long texts with a reason
    quoting = dict(quoting=csv.QUOTE_NONE) if delimiter == "\t" else dict(doublequote=True)
    # a local file or a URL; utf-8-sig: Excel's byte-order mark
    with io.TextIOWrapper(storage.open_read(path), newline="", encoding="utf-8-sig") as f:
        reader = csv.reader(f, delimiter=delimiter, strict=True, **quoting)
        names = list(header) or next(reader, [])
        if not header and any(n.startswith(("http://", "https://")) for n in names):
            raise ValueError(f"{path}: the first line holds a URL, so the file has no header "
                             "line; name its columns with --header (raw CC3M: caption,url)")
        if len(set(names)) != len(names):
            raise ValueError(f"{path}: the header names a column twice: {names}")
        while True:
            line = reader.line_num + 1
            try:
                values = next(reader)
            except StopIteration:
                return
            except csv.Error as e:
                raise ValueError(f"{path}: line {line}: {e} (a quote opened there is not "
                                 "closed, or a quoted field has text after its closing quote)"
                                 ) from None
            if not values:
                continue  # blank lines are not rows
            if len(values) != len(names):
                lines = f"lines {line}-{reader.line_num}" if reader.line_num > line \
                    else f"line {line}"
                yield {}, ("bad_row", f"{path}: {lines}: row has {len(values)} fields, header has "
                                      f"{len(names)}")
            else:
                yield dict(zip(names, values)), None


def _jsonl_rows(path: str) -> Iterator[tuple[dict, tuple[str, str] | None]]:
    with storage.open_read(path) as f:
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
        proc, stream = None, storage.open_read(path)
    key = None
    try:
        for key, members in iter_tar_groups(stream, path):
            yield f"{path}:{key}", {"__key__": key, "__members__": members}, None
    except Exception as e:  # tarfile.ReadError, EOFError, zlib/gzip errors on truncated data
        detail = e.args[0] if e.args else ""  # webdataset appends (stream, url) to the args
        yield f"{path}:{key}", {}, ("bad_source", f"{path} cannot be read after key {key!r}: "
                                    f"{type(e).__name__}: {detail}")
    finally:
        stream.close()
        if proc is not None:
            proc.wait()
    if proc is not None and proc.returncode != 0:
        yield f"{path}:{key}", {}, ("bad_source", f"{path}: command exited with "
                                    f"status {proc.returncode}")
