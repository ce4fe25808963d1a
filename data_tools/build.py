"""`mmtrain data build`: source rows → checked samples → tar shards + manifest, resumably.

Pipeline: the parent enumerates the inputs' rows in a fixed order (`sources.py`); worker
processes turn rows into checked, normalised samples (`samples.py`), results come back in row
order; the parent cuts them into shards (at most --max-samples samples and --max-bytes bytes) and
writes each with `write_shard` (temporary name, fsync, rename). Since the row order, the samples
and the cuts depend only on the inputs and the options, a build is deterministic.

Resume: after each shard the parent writes `OUT/.build/shard-NNNNNN.json` (its row range, sha256,
manifest rows and rejected rows). A rerun keeps every shard whose file still matches its record,
in order, and continues from the row after the last one kept. `OUT/.build/config.json` holds the
options and input file sizes; a rerun with other options is refused (or, with --overwrite, starts
over).
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import itertools
import json
import os
import re
import shutil
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any, Iterable, Iterator

from data_tools.download import DownloadOptions, download_rows
from data_tools.samples import Built, SampleSpec, Skipped, make_sample, url_cells
from data_tools.shards import (DATASET_JSON, MANIFEST, ShardInfo, atomic_write_bytes, sha256_file,
                               tar_file_bytes, tar_member_bytes, write_dataset_index, write_shard)
from data_tools.remote import Publisher
from data_tools.sources import RawRow, expand_inputs, iter_rows
from mmtrain import storage

STATE_DIR = ".build"
REJECTED = "rejected.jsonl"
SHARD_RE = re.compile(r"shard-\d{6}\.tar")
TMP_RE = re.compile(r"\.(shard-\d{6}\.(tar|json)|config\.json|manifest\.parquet|dataset\.json"
                    r"|rejected\.jsonl)\.tmp-\d+")  # left by a killed atomic write
STATE_VERSION = 2  # 2: the pair layout (KEY.jpg + KEY.txt + KEY.json)


@dataclasses.dataclass(frozen=True, kw_only=True)
class BuildOptions:
    out: str
    inputs: tuple[str, ...]
    spec: SampleSpec
    max_samples: int = 10_000
    max_bytes: int = 512 << 20
    media_root: str = ""  # "" → each table's own folder
    limit: int = 0  # read only the first N rows (0: all)
    allow_pipe: bool = False  # follow pipe:CMD inputs (runs CMD in a shell)
    overwrite: bool = False  # start over if OUT holds another build
    workers: int = 0  # 0: one per CPU core (at most 8); 1: no worker processes
    progress: bool = True
    header: tuple[str, ...] = ()  # column names of CSV/TSV inputs without a header line
    download: DownloadOptions | None = None  # fetch media URLs (spec.download must be set)

    def __post_init__(self) -> None:
        if not self.inputs:
            raise ValueError("build needs at least one input")
        if self.max_samples < 1:
            raise ValueError(f"--max-samples={self.max_samples} must be >= 1")
        if self.max_bytes < tar_file_bytes(0):
            raise ValueError(f"--max-bytes={self.max_bytes} must be >= {tar_file_bytes(0)}")
        if self.limit < 0 or self.workers < 0:
            raise ValueError("--limit and --workers must be >= 0")
        pipes = [i for i in self.inputs if i.startswith("pipe:")]
        if pipes and not self.allow_pipe:
            raise ValueError(f"input {pipes[0]!r}: pipe: inputs run a shell command and are not "
                             "followed unless you pass --allow-pipe")
        if pipes and self.spec.kind != "wds":
            raise ValueError("pipe: inputs are only read for --kind wds")
        if (self.download is not None) != self.spec.download:
            raise ValueError("BuildOptions.download and SampleSpec.download must agree")


@dataclasses.dataclass
class BuildSummary:
    out: str
    shards: int = 0
    samples: int = 0
    bytes: int = 0
    kept_shards: int = 0  # found complete from an earlier run
    rejected: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    run_samples: int = 0  # written by this run
    run_bytes: int = 0
    seconds: float = 0.0

    def lines(self) -> list[str]:
        out = [f"built {self.out}: {self.samples} samples in {self.shards} shards, "
               f"{self.bytes / 1e6:.1f} MB" + (f" ({self.kept_shards} shards kept from an earlier "
                                                "run)" if self.kept_shards else "")]
        if self.rejected:
            reasons = ", ".join(f"{code} {n}" for code, n in self.rejected.most_common())
            out.append(f"rejected {sum(self.rejected.values())} rows ({reasons}); "
                       f"see {storage.join(self.out, REJECTED)}")
        else:
            out.append("rejected 0 rows")
        s = max(self.seconds, 1e-9)
        out.append(f"this run: {self.run_samples} samples in {self.seconds:.1f} s "
                   f"({self.run_samples / s:.0f} samples/s, {self.run_bytes / s / 1e6:.1f} MB/s)")
        return out


def build(opts: BuildOptions) -> BuildSummary:
    t0 = time.perf_counter()
    # A URL: built in a local staging folder, each file uploaded when complete (data_tools/remote.py)
    publisher = Publisher(opts.out) if storage.is_url(opts.out) else None
    out = publisher.staging if publisher else Path(opts.out)
    out.mkdir(parents=True, exist_ok=True)
    if publisher:
        publisher.pull_state()
    tars = opts.spec.kind == "wds"
    inputs = expand_inputs(list(opts.inputs), tars=tars, exclude=out.resolve())
    state = out / STATE_DIR
    _check_config(out, state, _config(opts, inputs), overwrite=opts.overwrite, publisher=publisher)
    records = _completed_shards(out, state, publisher)
    start = records[-1]["stop"] if records else 0

    rows = iter_rows(inputs, tars=tars, media_root=opts.media_root, allow_pipe=opts.allow_pipe,
                     header=opts.header)
    rows = (r for r in rows if r.pos >= start)
    if opts.limit:
        rows = itertools.takewhile(lambda r: r.pos < opts.limit, rows)
    if opts.download is not None:
        rows = download_rows(rows, functools.partial(url_cells, spec=opts.spec), opts.download)
    keys = {row["key"] for rec in records for row in rec["rows"]}
    results = _Peekable(_unique_keys(samples_in_order(rows, opts.spec, workers=_workers(opts)),
                                     keys))

    summary = BuildSummary(out=opts.out if publisher else str(out), kept_shards=len(records))
    tail: list[Skipped] = []
    with _Progress(opts.progress) as progress:
        while True:
            tail = results.skip_rejected()
            if results.peek() is None:
                break
            rec = _write_next_shard(out, len(records), results, tail, opts, progress)
            atomic_write_bytes(state / f"{Path(rec['name']).stem}.json", json.dumps(rec).encode())
            if publisher:
                publisher.publish_shard(rec["name"], f"{Path(rec['name']).stem}.json")
            records.append(rec)
            summary.run_samples += rec["samples"]
            summary.run_bytes += rec["bytes"]

    _finish(out, records, tail, inputs, opts, summary)
    if publisher:
        publisher.publish_index(REJECTED)  # dataset.json last: the commit
    summary.seconds = time.perf_counter() - t0
    return summary


def _write_next_shard(out: Path, index: int, results: "_Peekable", rejected: list[Skipped],
                      opts: BuildOptions, progress: "_Progress") -> dict[str, Any]:
    """Write shard `index` from the next results; returns its resume record."""
    start = rejected[0].pos if rejected else results.peek().pos
    budget = {"samples": 0, "bytes": 0}

    def samples() -> Iterator[tuple[str, dict[str, bytes], str]]:
        while (item := results.peek()) is not None:
            if isinstance(item, Skipped):
                rejected.append(results.next())
                continue
            nbytes = tar_member_bytes(item.key, item.members)
            full = budget["samples"] >= opts.max_samples or \
                tar_file_bytes(budget["bytes"] + nbytes) > opts.max_bytes
            if budget["samples"] and full:  # a sample bigger than --max-bytes gets its own shard
                return
            results.next()
            budget["samples"] += 1
            budget["bytes"] += nbytes
            progress.update(1, nbytes)
            yield item.key, item.members, item.source_row

    info, rows = write_shard(out / f"shard-{index:06d}.tar", samples())
    progress.update(0, 0, rejected=len(rejected))
    return {"version": STATE_VERSION, **dataclasses.asdict(info), "start": start,
            "stop": results.last_pos + 1, "rows": rows,
            "rejected": [dataclasses.asdict(r) for r in rejected]}


def _finish(out: Path, records: list[dict], tail: list[Skipped], inputs: list[str],
            opts: BuildOptions, summary: BuildSummary) -> None:
    """rejected.jsonl, manifest.parquet and dataset.json for all shards, old and new."""
    rejected = [r for rec in records for r in rec["rejected"]] + \
        [dataclasses.asdict(r) for r in tail]
    atomic_write_bytes(out / REJECTED, "".join(json.dumps(r) + "\n" for r in rejected).encode())
    shards = [ShardInfo(r["name"], r["sha256"], r["samples"], r["bytes"]) for r in records]
    index = write_dataset_index(
        out, shards, [row for rec in records for row in rec["rows"]],
        source={"build": {"kind": opts.spec.kind, "inputs": inputs}}, rejected=len(rejected))
    summary.shards = index["totals"]["shards"]
    summary.samples = index["totals"]["samples"]
    summary.bytes = index["totals"]["bytes"]
    summary.rejected.update(r["code"] for r in rejected)


# ---------------------------------------------------------------------------------- resume state

def _config(opts: BuildOptions, inputs: list[str]) -> dict[str, Any]:
    """What decides the output; a rerun must match it to reuse shards."""
    def describe(path: str) -> dict[str, Any]:
        if path.startswith("pipe:"):
            return {"path": path}
        if storage.is_url(path):
            return {"path": path, "size": storage.size(path)}
        st = os.stat(path)
        return {"path": os.path.abspath(path), "size": st.st_size, "mtime_ns": st.st_mtime_ns}

    return {"version": STATE_VERSION, "inputs": [describe(p) for p in inputs],
            "spec": dataclasses.asdict(opts.spec), "max_samples": opts.max_samples,
            "max_bytes": opts.max_bytes, "media_root": os.path.abspath(opts.media_root)
            if opts.media_root else "", "limit": opts.limit, "header": list(opts.header),
            "download_max_bytes": opts.download.max_bytes if opts.download else 0}


def _check_config(out: Path, state: Path, config: dict[str, Any], *, overwrite: bool,
                  publisher: Publisher | None = None) -> None:
    path = state / "config.json"
    old = json.loads(path.read_text()) if path.is_file() else None
    if old is None and (out / DATASET_JSON).exists() and not overwrite:
        raise ValueError(f"{out} already holds a dataset not made by `mmtrain data build`; "
                         "choose another directory or pass --overwrite")
    if old is not None and old != config:
        if not overwrite:
            changed = sorted(k for k in config if old.get(k) != config[k])
            raise ValueError(f"{out} holds a build made with other inputs or options (differs in: "
                             f"{', '.join(changed)}); rerun the same command, choose another "
                             "directory, or pass --overwrite to start over")
    if overwrite and old != config:
        _remove_build(out)
        if publisher:
            publisher.remove_dataset([REJECTED, MANIFEST])
    state.mkdir(exist_ok=True)
    atomic_write_bytes(path, json.dumps(config, indent=2).encode())
    if publisher:
        publisher.put(f"{STATE_DIR}/config.json")


def _remove_build(out: Path) -> None:
    """Delete what a build writes in `out` (and nothing else)."""
    shutil.rmtree(out / STATE_DIR, ignore_errors=True)
    for p in out.iterdir():
        if SHARD_RE.fullmatch(p.name) or TMP_RE.fullmatch(p.name) or \
                p.name in (MANIFEST, DATASET_JSON, REJECTED):
            p.unlink()


def _completed_shards(out: Path, state: Path, publisher: Publisher | None = None
                      ) -> list[dict[str, Any]]:
    """Records of the shards, in order from the first, whose files match; stale files removed."""
    records: list[dict[str, Any]] = []
    while True:
        name = f"shard-{len(records):06d}"
        try:
            rec = json.loads((state / f"{name}.json").read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            break
        tar = out / f"{name}.tar"
        expected_start = records[-1]["stop"] if records else 0
        intact = publisher.shard_intact(rec) if publisher else (
            tar.is_file() and tar.stat().st_size == rec["bytes"]
            and sha256_file(tar) == rec["sha256"])
        if rec.get("version") != STATE_VERSION or rec["start"] != expected_start or not intact:
            break
        records.append(rec)
    for p in list(out.iterdir()) + list(state.iterdir()):  # shards after the last good one
        m = re.fullmatch(r"shard-(\d{6})\.(tar|json)", p.name)
        if (m and int(m.group(1)) >= len(records)) or TMP_RE.fullmatch(p.name):
            p.unlink()
    if publisher:
        publisher.remove_shards_from(len(records))
    return records


# ---------------------------------------------------------------------------------- processing

_SPEC: SampleSpec | None = None  # set once per worker process


def _init_worker(spec: SampleSpec) -> None:
    global _SPEC
    _SPEC = spec


def _make_batch(rows: list[RawRow]) -> list[Built | Skipped]:
    return [make_sample(row, _SPEC) for row in rows]


def samples_in_order(rows: Iterable[RawRow], spec: SampleSpec, *, workers: int,
                     batch: int = 16, ahead: int = 4) -> Iterator[Built | Skipped]:
    """make_sample(row, spec) for every row, in row order, over `workers` processes.

    At most workers × ahead batches are in flight, so memory stays bounded however large the
    input (Pool.imap and Executor.map would read the whole input ahead).
    """
    if workers <= 1:
        yield from (make_sample(row, spec) for row in rows)
        return
    with ProcessPoolExecutor(workers, initializer=_init_worker, initargs=(spec,)) as pool:
        pending: collections.deque = collections.deque()
        chunk: list[RawRow] = []
        for row in rows:
            chunk.append(row)
            if len(chunk) == batch:
                pending.append(pool.submit(_make_batch, chunk))
                chunk = []
                if len(pending) >= workers * ahead:
                    yield from pending.popleft().result()
        if chunk:
            pending.append(pool.submit(_make_batch, chunk))
        while pending:
            yield from pending.popleft().result()


def _unique_keys(results: Iterable[Built | Skipped], keys: set[str]
                 ) -> Iterator[Built | Skipped]:
    """A sample whose key an earlier sample already has is rejected (`keys`: those so far)."""
    for item in results:
        if isinstance(item, Built):
            if item.key in keys:
                item = Skipped(item.pos, item.source_row, "duplicate_key",
                               f"key {item.key!r} is already used by an earlier sample")
            else:
                keys.add(item.key)
        yield item


def _workers(opts: BuildOptions) -> int:
    return opts.workers or min(8, os.cpu_count() or 1)


class _Peekable:
    def __init__(self, items: Iterator[Built | Skipped]) -> None:
        self._items, self._next, self.last_pos = items, None, -1

    def peek(self) -> Built | Skipped | None:
        if self._next is None:
            self._next = next(self._items, None)
        return self._next

    def next(self) -> Built | Skipped:
        item = self.peek()
        self._next, self.last_pos = None, item.pos
        return item

    def skip_rejected(self) -> list[Skipped]:
        skipped = []
        while isinstance(self.peek(), Skipped):
            skipped.append(self.next())
        return skipped


class _Progress:
    """tqdm bar with samples/s and MB/s (hidden when stderr is not a terminal)."""

    def __init__(self, enabled: bool) -> None:
        from tqdm import tqdm

        self.bar = tqdm(unit=" samples", disable=not enabled or None, file=sys.stderr,
                        dynamic_ncols=True)
        self.t0, self.bytes, self.rejected = time.perf_counter(), 0, 0

    def update(self, samples: int, nbytes: int, rejected: int = 0) -> None:
        self.bytes += nbytes
        self.rejected += rejected
        self.bar.update(samples)
        if self.bar.n % 64 == 0 or rejected:
            mbps = self.bytes / max(time.perf_counter() - self.t0, 1e-9) / 1e6
            self.bar.set_postfix_str(f"{mbps:.1f} MB/s, {self.rejected} rejected", refresh=False)

    def __enter__(self) -> "_Progress":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.bar.close()
