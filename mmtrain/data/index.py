"""The dataset index: `dataset.json` and `manifest.parquet` next to the shards (contract 1).

The reader lives here, with the loader that depends on it; `data_tools` (the writer) imports it,
so the runtime never imports the tools. A dataset is a local folder or a URL (`mmtrain.storage`).

dataset.json: schema version, fingerprint, per shard {name, sha256, samples, bytes}, totals.
manifest.parquet: one row per sample (shard, key, bytes, ..., and since the offset column was
added, `offset`: the byte offset of the sample's first tar header in its shard, so a resume in
the middle of a shard seeks there). Manifests written before have no `offset`: they still read,
and the loader re-reads such shards from their start.
"""

from __future__ import annotations

import json
import os
from typing import Any

from mmtrain import storage
from mmtrain.data.schema import check_name

DATASET_SCHEMA_VERSION = 1
MANIFEST = "manifest.parquet"
DATASET_JSON = "dataset.json"


def read_dataset_index(directory: str | os.PathLike) -> dict[str, Any]:
    """Read and sanity-check a dataset.json; errors name the file and the field."""
    path = storage.join(directory, DATASET_JSON)
    try:
        text = storage.read_bytes(path)
    except FileNotFoundError:
        raise ValueError(f"{path} does not exist: build shards with `mmtrain data build` or "
                         "`mmtrain data synth`") from None
    except IsADirectoryError:
        raise ValueError(f"{path} is a folder, not a dataset index") from None
    except storage.io_errors() as e:
        raise ValueError(f"{path} cannot be read: {type(e).__name__}: {e}") from None
    try:
        index = json.loads(text)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(index, dict):
        raise ValueError(f"{path}: not a JSON object")
    for field in ("schema_version", "fingerprint", "shards", "totals"):
        if field not in index:
            raise ValueError(f"{path}: missing field {field!r}")
    if index["schema_version"] != DATASET_SCHEMA_VERSION:
        raise ValueError(f"{path}: schema_version {index['schema_version']} is not "
                         f"{DATASET_SCHEMA_VERSION}")
    for i, shard in enumerate(index["shards"]):
        for field in ("name", "sha256", "samples", "bytes"):
            if field not in shard:
                raise ValueError(f"{path}: shards[{i}] lacks field {field!r}")
        check_name(shard["name"], "shard name")
    return index


def read_manifest(directory: str | os.PathLike, columns: list[str] | None = None,
                  filters: list | None = None, *, threads: bool = True) -> dict[str, list]:
    """manifest.parquet as {column: values}; a missing or unreadable one is a ValueError.

    For a URL, only the needed column chunks are fetched (range requests through fsspec).
    `threads=False` keeps Arrow's thread pools unstarted: a DataLoader decode worker that started
    them aborts at exit ("terminate called without an active exception", measured 2 of 6 runs)."""
    import pyarrow.parquet as pq

    path = storage.join(directory, MANIFEST)
    try:
        if storage.is_url(path):
            fs, p = storage.filesystem(path)
            table = pq.read_table(p, columns=columns, filters=filters, filesystem=fs,
                                  use_threads=threads, pre_buffer=threads)
        else:
            table = pq.read_table(storage.local(path), columns=columns, filters=filters,
                                  use_threads=threads, pre_buffer=threads)
    except (OSError, ValueError, KeyError) as e:  # FileNotFoundError, ArrowInvalid
        raise ValueError(f"{path} cannot be read: {e}") from None
    return table.to_pydict()


def sample_offsets(directory: str | os.PathLike) -> dict[str, list[int]] | None:
    """{shard name: byte offsets of its samples in tar order}, or None for a manifest without
    offsets. Read on one thread through a plain file object: a decode worker that starts Arrow's
    thread pools aborts at exit ("terminate called without an active exception")."""
    import pyarrow.parquet as pq

    path = storage.join(directory, MANIFEST)
    try:
        with storage.open_read(path) as f:
            manifest = pq.ParquetFile(f)
            if "offset" not in manifest.schema_arrow.names:
                return None
            cols = manifest.read(columns=["shard", "offset"], use_threads=False).to_pydict()
    except (OSError, ValueError) as e:
        if storage.fd_exhaustion(e):  # not a missing manifest: stop, naming the cause
            raise RuntimeError(storage.fd_exhaustion_message(str(path), e)) from e
        raise ValueError(f"{path} cannot be read: {e}") from None
    offsets: dict[str, list[int]] = {}
    for shard, offset in zip(cols["shard"], cols["offset"]):
        if offset is None:
            return None
        offsets.setdefault(shard, []).append(int(offset))
    return {shard: sorted(o) for shard, o in offsets.items()}  # tar order (rows are by key)
