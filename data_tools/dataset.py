"""Reading a built dataset (dataset.json + shards + manifest) and writing a new one from samples.

`dedup` and `split` read samples from datasets and write them, byte for byte, into new shards
cut by --max-samples / --max-bytes, through the same crash-safe `write_shard`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable, Iterator

from data_tools.shards import (MANIFEST, ShardInfo, iter_shard, read_dataset_index, tar_file_bytes,
                               tar_member_bytes, write_dataset_index, write_shard)

from mmtrain import storage
from mmtrain.data import index

Sample = tuple[str, dict[str, bytes], str]  # (key, members, source_row)


def iter_samples(directory: str | Path) -> Iterator[tuple[str, str, dict[str, bytes]]]:
    """(shard name, key, members) for every sample of a dataset (a folder or a URL), in shard
    order."""
    for shard in read_dataset_index(directory)["shards"]:
        for key, members in iter_shard(storage.join(directory, shard["name"])):
            yield shard["name"], key, members


def read_manifest(directory: str | Path, columns: list[str] | None = None) -> dict[str, list]:
    """manifest.parquet as {column: values}; a missing or unreadable one is a ValueError."""
    read_dataset_index(directory)  # the clearer error first when the whole dataset is missing
    return index.read_manifest(directory, columns)


def source_rows(directory: str | Path) -> dict[tuple[str, str], str]:
    """(shard, key) → source_row, from the manifest."""
    cols = read_manifest(directory, ["shard", "key", "source_row"])
    return {(s, k): r for s, k, r in zip(cols["shard"], cols["key"], cols["source_row"])}


def write_stream(out: str | Path, samples: Iterable[Sample], *, max_samples: int,
                 max_bytes: int, **index_extra: Any) -> dict[str, Any]:
    """Cut `samples` into shards of at most max_samples / max_bytes and index them."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    items = iter(samples)
    pending = next(items, None)
    shards: list[ShardInfo] = []
    rows: list[dict[str, Any]] = []

    def one_shard() -> Iterator[Sample]:
        nonlocal pending
        count = size = 0
        while pending is not None:
            nbytes = tar_member_bytes(pending[0], pending[1])
            if count and (count >= max_samples or tar_file_bytes(size + nbytes) > max_bytes):
                return
            yield pending
            count, size = count + 1, size + nbytes
            pending = next(items, None)

    while pending is not None:
        info, shard_rows = write_shard(out / f"shard-{len(shards):06d}.tar", one_shard())
        shards.append(info)
        rows.extend(shard_rows)
    return write_dataset_index(out, shards, rows, **index_extra)


def prepare_output(out: str | Path, *, overwrite: bool) -> Path:
    """Make sure `out` holds no dataset (or, with overwrite, remove the old one's files)."""
    out = Path(out)
    if out.is_dir():
        old = [p for p in out.iterdir() if p.name in ("dataset.json", MANIFEST)
               or (p.name.startswith("shard-") and p.name.endswith(".tar"))
               or (p.name.startswith(".shard-") and ".tar.tmp-" in p.name)]
        if old and not overwrite:
            raise ValueError(f"{out} already holds a dataset; choose another directory or pass "
                             "--overwrite")
        for p in old:
            p.unlink()
    out.mkdir(parents=True, exist_ok=True)
    return out
