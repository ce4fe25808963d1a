"""`mmtrain data verify`: does a dataset on disk match its dataset.json and manifest?

Per shard (in parallel): present, size, sha256, number of samples, keys as in the manifest,
every sample parsed by the loader's schema, every media member decoded (unless --no-decode).
The sha256 is computed in the same pass that reads the tar, so each byte is read once.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any


from data_tools.dataset import read_manifest
from data_tools.errors import Rejected
from data_tools.media import DEFAULT_MAX_IMAGE_PIXELS, check_member
from data_tools.shards import iter_tar_groups, read_dataset_index
from mmtrain import storage
from mmtrain.data.schema import SampleError, check_name, parse_sample

MAX_PROBLEMS_PER_SHARD = 20


@dataclasses.dataclass
class VerifyReport:
    problems: list[str]
    shards: int = 0
    samples: int = 0
    bytes: int = 0
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return not self.problems


@dataclasses.dataclass
class _ShardCheck:
    path: str  # a local path or a URL
    expected: dict[str, Any]  # name, sha256, samples, bytes (from dataset.json)
    keys: list[str]  # from the manifest
    decode: bool
    max_pixels: int


def verify(directory: str | Path, *, decode: bool = True, workers: int = 1,
           max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS) -> VerifyReport:
    t0 = time.perf_counter()
    directory = str(directory)  # a folder or a URL
    try:
        index = read_dataset_index(directory)
        manifest = read_manifest(directory, ["shard", "key"])
    except ValueError as e:
        return VerifyReport([f"{directory}: {e}"])
    keys: dict[str, list[str]] = {}
    for shard, key in zip(manifest["shard"], manifest["key"]):
        keys.setdefault(shard, []).append(key)

    problems = _index_problems(directory, index, keys)
    checks = [_ShardCheck(storage.join(directory, s["name"]), s, keys.get(s["name"], []), decode,
                          max_pixels) for s in index["shards"]]
    report = VerifyReport(problems, shards=len(checks))
    if workers > 1 and len(checks) > 1:
        with ProcessPoolExecutor(workers) as pool:
            results = list(pool.map(_check_shard, checks))
    else:
        results = [_check_shard(c) for c in checks]
    for shard_problems, samples, nbytes in results:
        report.problems.extend(shard_problems)
        report.samples += samples
        report.bytes += nbytes
    report.seconds = time.perf_counter() - t0
    return report


def _index_problems(directory: str, index: dict, keys: dict[str, list[str]]) -> list[str]:
    problems = []
    names = {s["name"] for s in index["shards"]}
    totals = index["totals"]
    if totals["samples"] != sum(s["samples"] for s in index["shards"]) or \
            totals["shards"] != len(index["shards"]):
        problems.append("dataset.json: totals do not add up over its shards")
    for shard in index["shards"]:
        if len(keys.get(shard["name"], [])) != shard["samples"]:
            problems.append(f"{shard['name']}: manifest has {len(keys.get(shard['name'], []))} "
                            f"rows, dataset.json says {shard['samples']} samples")
    for name in sorted(set(keys) - names):
        problems.append(f"manifest names shard {name}, which dataset.json does not list")
    listable = not (storage.is_url(directory) and directory.startswith("http"))  # no http ls
    for name in storage.listdir(directory) if listable else []:
        if name.endswith(".tar") and name not in names:
            problems.append(f"{name}: a shard file that dataset.json does not list")
    return problems


def _check_shard(check: _ShardCheck) -> tuple[list[str], int, int]:
    """(problems, samples read, bytes read) for one shard."""
    name, expected = check.expected["name"], check.expected
    try:
        size = storage.size(check.path)
    except (FileNotFoundError, IsADirectoryError):
        return [f"{name}: missing"], 0, 0
    except storage.io_errors() as e:
        return [f"{name}: cannot be read: {type(e).__name__}: {e}"], 0, 0
    problems: list[str] = []
    if size != expected["bytes"]:
        problems.append(f"{name}: {size} bytes, dataset.json says {expected['bytes']} "
                        "(truncated or appended to)")
    found: list[str] = []
    key = None
    with storage.open_read(check.path) as f:
        reader = _HashingReader(f)
        try:
            for key, members in iter_tar_groups(reader):
                found.append(key)
                problems.extend(f"{name}: {p}" for p in _sample_problems(key, members, check))
        except Exception as e:  # tarfile.ReadError / EOFError on a cut or corrupt tar
            detail = e.args[0] if e.args else ""  # webdataset appends (stream, url) to args
            problems.append(f"{name}: unreadable after key {key!r}: {type(e).__name__}: {detail}")
        reader.drain()
    if reader.h.hexdigest() != expected["sha256"]:
        problems.append(f"{name}: sha256 {reader.h.hexdigest()[:16]}… does not match "
                        f"dataset.json ({expected['sha256'][:16]}…)")
    if len(found) != expected["samples"]:
        problems.append(f"{name}: {len(found)} samples, dataset.json says {expected['samples']}")
    if sorted(found) != sorted(check.keys):
        missing, extra = set(check.keys) - set(found), set(found) - set(check.keys)
        problems.append(f"{name}: keys differ from the manifest ({len(missing)} missing, "
                        f"{len(extra)} not in the manifest, or repeated)")
    if len(problems) > MAX_PROBLEMS_PER_SHARD:
        problems = problems[:MAX_PROBLEMS_PER_SHARD] + \
            [f"{name}: ... {len(problems) - MAX_PROBLEMS_PER_SHARD} more problems"]
    return problems, len(found), size


def _sample_problems(key: str, members: dict[str, bytes], check: _ShardCheck) -> list[str]:
    try:
        check_name(key)
        doc = parse_sample(key, members)
    except SampleError as e:
        return [f"sample {key}: {e}"]
    problems = []
    if check.decode:
        for seg in doc.segments:
            if seg.type != "text":
                try:
                    check_member(seg.member, seg.data, check.max_pixels)
                except Rejected as e:
                    problems.append(f"sample {key}: member {seg.member}: {e}")
    return problems


class _HashingReader(io.RawIOBase):
    """A read-only file object that hashes what is read through it."""

    def __init__(self, raw: Any) -> None:
        self.raw, self.h = raw, hashlib.sha256()

    def readable(self) -> bool:
        return True

    def read(self, n: int = -1) -> bytes:
        data = self.raw.read(n)
        self.h.update(data)
        return data

    def readinto(self, b: Any) -> int:
        data = self.read(len(b))
        b[:len(data)] = data
        return len(data)

    def drain(self) -> None:
        """Hash what the tar reader left unread (end blocks, record padding)."""
        while self.read(1 << 20):
            pass
