"""`mmtrain data dedup`: one new dataset from one or more, without duplicates.

Samples are read in order (datasets as given, shards in order); the first occurrence is kept.
- exact: same content hash (the manifest's: ordered texts and media bytes, metadata ignored);
- near (--near-images): samples with the same number of images whose images all have perceptual
  hashes (64-bit dHash) within --max-distance bits of an earlier kept sample's, in order.
  Near-duplicate lookup is a multi-index hash: the 64 bits are cut into max_distance + 1 bands,
  and two hashes within that distance agree exactly on at least one band (pigeonhole).
Kept samples are copied byte for byte into new shards; `removed.jsonl` lists what was dropped and
what it duplicated. With several inputs, keys are prefixed with the input's position ("0-", "1-")
so they stay unique.
"""

from __future__ import annotations

import collections
import dataclasses
import io
import json
from pathlib import Path
from typing import Any, Iterator

import numpy as np
from PIL import Image

from data_tools.dataset import Sample, iter_samples, prepare_output, source_rows, write_stream
from data_tools.remote import output
from data_tools.shards import atomic_write_bytes, document_hash
from mmtrain import storage
from mmtrain.data.schema import SampleError, parse_sample

REMOVED = "removed.jsonl"


def dhash(data: bytes) -> int:
    """64-bit difference hash: is each pixel of a 9×8 grey thumbnail brighter than the next."""
    img = Image.open(io.BytesIO(data))
    img.draft("L", (64, 64))  # JPEG: decode at reduced size, much faster
    px = np.asarray(img.convert("L").resize((9, 8), Image.Resampling.BILINEAR), dtype=np.int16)
    bits = (px[:, 1:] > px[:, :-1]).flatten()
    return int("".join("1" if b else "0" for b in bits), 2)


@dataclasses.dataclass
class _NearIndex:
    max_distance: int
    bands: list[tuple[int, int]] = dataclasses.field(init=False)  # (shift, mask)
    table: dict = dataclasses.field(default_factory=lambda: collections.defaultdict(list))

    def __post_init__(self) -> None:
        n = self.max_distance + 1
        edges = [round(i * 64 / n) for i in range(n + 1)]
        self.bands = [(lo, (1 << (hi - lo)) - 1) for lo, hi in zip(edges, edges[1:])]

    def find(self, hashes: tuple[int, ...]) -> tuple[str, int] | None:
        """An earlier entry within max_distance on every image: (its id, worst distance)."""
        seen = set()
        for b, (shift, mask) in enumerate(self.bands):
            for other, ident in self.table[(len(hashes), b, (hashes[0] >> shift) & mask)]:
                if ident in seen:
                    continue
                seen.add(ident)
                dist = max(bin(x ^ y).count("1") for x, y in zip(hashes, other))
                if dist <= self.max_distance:
                    return ident, dist
        return None

    def add(self, hashes: tuple[int, ...], ident: str) -> None:
        for b, (shift, mask) in enumerate(self.bands):
            self.table[(len(hashes), b, (hashes[0] >> shift) & mask)].append((hashes, ident))


def dedup(inputs: list[str], out: str, *, near_images: bool = False, max_distance: int = 4,
          max_samples: int = 10_000, max_bytes: int = 512 << 20,
          overwrite: bool = False) -> dict[str, Any]:
    """Write the deduplicated dataset to `out`; returns counts."""
    if not 0 <= max_distance < 32:
        raise ValueError(f"--max-distance={max_distance} must be in 0..31")
    def ident(path: str) -> str:
        return path.rstrip("/") if storage.is_url(path) else str(Path(path).resolve())

    if ident(out) in {ident(i) for i in inputs}:
        raise ValueError("dedup writes a new dataset: OUT must not be one of the inputs")
    with output(out, overwrite=overwrite) as staged:  # a URL: staged, then uploaded (index last)
        return _dedup(inputs, prepare_output(staged, overwrite=overwrite), near_images,
                      max_distance, max_samples, max_bytes)


def _dedup(inputs: list[str], out_dir: Path, near_images: bool, max_distance: int,
           max_samples: int, max_bytes: int) -> dict[str, Any]:
    counts = collections.Counter()
    removed: list[dict[str, Any]] = []

    def kept_samples() -> Iterator[Sample]:
        exact: dict[str, str] = {}
        near = _NearIndex(max_distance)
        for i, directory in enumerate(inputs):
            prefix = f"{i}-" if len(inputs) > 1 else ""
            sources = source_rows(directory)
            for shard, key, members in iter_samples(directory):
                ident = f"{directory}:{key}"
                counts["read"] += 1
                try:
                    doc = parse_sample(key, members)
                except SampleError as e:
                    removed.append({"input": directory, "key": key, "reason": "unreadable",
                                    "detail": str(e)})
                    continue
                chash = document_hash(doc)
                if chash in exact:
                    counts["exact"] += 1
                    removed.append({"input": directory, "key": key, "reason": "exact",
                                    "duplicate_of": exact[chash]})
                    continue
                images = [s.data for s in doc.segments if s.type == "image"]
                hashes = _image_hashes(images) if near_images and images else None
                if hashes:
                    match = near.find(hashes)
                    if match:
                        counts["near"] += 1
                        removed.append({"input": directory, "key": key, "reason": "near",
                                        "duplicate_of": match[0], "distance": match[1]})
                        continue
                    near.add(hashes, ident)
                exact[chash] = ident
                counts["kept"] += 1
                yield prefix + key, members, sources.get((shard, key), f"{directory}:{key}")

    index = write_stream(out_dir, kept_samples(), max_samples=max_samples, max_bytes=max_bytes,
                         source={"dedup": {"inputs": list(inputs), "near_images": near_images,
                                           "max_distance": max_distance}})
    atomic_write_bytes(out_dir / REMOVED, "".join(json.dumps(r) + "\n" for r in removed).encode())
    return {"read": counts["read"], "kept": counts["kept"], "exact": counts["exact"],
            "near": counts["near"], "unreadable": len(removed) - counts["exact"] - counts["near"],
            "shards": index["totals"]["shards"]}


def _image_hashes(images: list[bytes]) -> tuple[int, ...] | None:
    try:
        return tuple(dhash(data) for data in images)
    except Exception:  # undecodable image: only exact dedup applies (`verify` reports it)
        return None
