"""`mmtrain data split`: train/ and val/ datasets from one dataset, by a hash of each key.

A sample goes to val when sha256(f"{seed}:{key}"), read as a number in [0, 1), is below
--val-fraction: reproducible, independent of shard order and worker count, and a sample keeps its
side when the dataset grows. Samples are copied byte for byte.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any, Iterator

from data_tools.dataset import Sample, iter_samples, prepare_output, source_rows, write_stream
from data_tools.remote import output
from mmtrain import storage


def is_val(key: str, val_fraction: float, seed: int = 0) -> bool:
    digest = hashlib.sha256(f"{seed}:{key}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < val_fraction


def split(directory: str, out: str, *, val_fraction: float, seed: int = 0,
          max_samples: int = 10_000, max_bytes: int = 512 << 20,
          overwrite: bool = False) -> dict[str, Any]:
    """Write out/train and out/val; returns their dataset.json contents."""
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"--val-fraction={val_fraction} must be in (0, 1)")
    if _same(directory, storage.join(out, "train")) or _same(directory, storage.join(out, "val")):
        raise ValueError("split writes new datasets: OUT/train and OUT/val must not be the input")
    sources = source_rows(directory)

    def side(val: bool) -> Iterator[Sample]:  # one pass over the input per side
        for shard, key, members in iter_samples(directory):
            if is_val(key, val_fraction, seed) == val:
                yield key, members, sources.get((shard, key), "")

    result = {}
    for name, val in (("train", False), ("val", True)):
        # a URL: written to a staging folder, then uploaded with dataset.json last
        with output(storage.join(out, name), overwrite=overwrite) as staged:
            target = prepare_output(staged, overwrite=overwrite)
            result[name] = write_stream(target, side(val), max_samples=max_samples,
                                        max_bytes=max_bytes,
                                        source={"split": {"input": directory, "side": name,
                                                          "val_fraction": val_fraction,
                                                          "seed": seed}})
    return result


def _same(a: str, b: str) -> bool:
    if storage.is_url(a) or storage.is_url(b):
        return a.rstrip("/") == b.rstrip("/")
    return Path(a).resolve() == Path(b).resolve()
