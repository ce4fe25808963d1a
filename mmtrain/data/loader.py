"""Deterministic, resumable streaming over WebDataset tar shards (ARCHITECTURE.md, contract 4).

Design (the resume semantics are ours; webdataset itself keeps no state):

* The dataset is split into `num_streams` **logical streams**, fixed by the data config and
  independent of the number of ranks and workers. In epoch `e`, the shards are permuted with
  seed (seed, e) and shard j of the permutation belongs to stream j mod num_streams.
* A stream reads its shards in order with webdataset's tar iteration; inside a shard, samples are
  shuffled in windows of `shuffle_window` consecutive samples (a bounded shuffle whose order is a
  pure function of (seed, epoch, shard, window)). Bad samples are skipped deterministically.
* Each stream has its own packer. Its state after a row is (epoch, shard cursor, sample index,
  token offset in that sample): re-reading from there reproduces the following rows exactly.
  Streams loop over epochs forever, so every rank always has a next batch (no rank runs dry and
  hangs the others at an epoch end); the training loop decides how many steps to take.
* Consumer (rank r, worker w) of R·W serves the streams s with s mod (R·W) = r·W + w: whole
  streams, so after a change of world size or worker count the streams are reassigned and no
  sample is lost or served twice. Workers of a rank are rotated on resume so that the DataLoader's
  round-robin over workers continues where it stopped (exact resume on the same layout).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import time
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
import webdataset
from webdataset import tariterators

from mmtrain.data.batch import Batch, collate_rows
from mmtrain.data.config import DataConfig, MediaSpec
from mmtrain.data.packing import Packer, Row, tokenize_document
from mmtrain.data.schema import SampleError, parse_sample
from mmtrain.data.tokenizer import Tokenizer

log = logging.getLogger("mmtrain.data")
STATE_VERSION = 1
POLICY_COUNTS = ("split_docs", "dropped_docs")


class ShardSet:
    """The shards of one dataset, as listed by its dataset.json (a directory or a URL base)."""

    def __init__(self, base: str | Path, *, allow_pipe: bool = False) -> None:
        self.directory = str(base).rstrip("/")
        if self.directory.startswith("pipe:") and not allow_pipe:
            raise ValueError(f"{base}: pipe: URLs run a shell command; set data.allow_pipe=true "
                             "to follow them")
        index = _read_index(self.directory)
        self.names = [s["name"] for s in index["shards"]]
        self.samples = [int(s["samples"]) for s in index["shards"]]
        self.fingerprint = index["fingerprint"]
        self.urls = [f"{self.directory}/{name}" for name in self.names]

    def __len__(self) -> int:
        return len(self.names)


def _read_index(base: str) -> dict[str, Any]:
    from data_tools.shards import read_dataset_index  # the writer's reader: one format

    if "://" not in base and not base.startswith("pipe:"):
        return read_dataset_index(base)
    url = f"{base}/dataset.json"
    try:
        with webdataset.gopen(url) as f:
            index = json.loads(f.read())
    except (OSError, ValueError) as e:
        raise ValueError(f"{url}: cannot read the dataset index: {e}") from None
    for field in ("fingerprint", "shards"):
        if field not in index:
            raise ValueError(f"{url}: missing field {field!r}")
    return index


class StreamPlan:
    """Which dataset, and which share of its shards, each logical stream reads.

    Several datasets mix by weight: each gets a number of logical streams proportional to its
    weight (at least one). Consumers draw rows evenly from their streams, so over the run the
    datasets contribute rows in proportion to their stream counts — deterministic, and resumable
    like a single dataset. Streams of different datasets are interleaved so that consumers share
    the mix.
    """

    def __init__(self, cfg: DataConfig) -> None:
        sources = cfg.mix or {cfg.train: 1.0}
        self.sets = [ShardSet(base, allow_pipe=cfg.allow_pipe) for base in sources]
        weights = np.asarray(list(sources.values()), float)
        counts = np.maximum(1, np.floor(weights / weights.sum() * cfg.num_streams)).astype(int)
        while counts.sum() < cfg.num_streams:  # largest remainder
            counts[np.argmax(weights / weights.sum() * cfg.num_streams - counts)] += 1
        while counts.sum() > cfg.num_streams:
            counts[np.argmax(counts)] -= 1
        self.counts = [int(c) for c in counts]
        order = sorted((j / c, d, j) for d, c in enumerate(self.counts) for j in range(c))
        self.streams = [(d, j) for _, d, j in order]  # logical stream → (dataset, local index)
        parts = [f"{s.fingerprint}:{w}" for s, w in zip(self.sets, sources.values())]
        self.fingerprint = self.sets[0].fingerprint if len(self.sets) == 1 else \
            hashlib.sha256("|".join(parts).encode()).hexdigest()
        self.names = list(sources)

    def check(self, num_streams: int, consumers: int) -> None:
        for name, shards, count in zip(self.names, self.sets, self.counts):
            check_layout(len(shards), count, 1, name)
        check_layout(num_streams, num_streams, consumers, " + ".join(self.names))


@dataclasses.dataclass
class StreamState:
    epoch: int = 0
    shard_cursor: int = 0  # index into the stream's shard list for this epoch
    sample: int = 0  # next sample (in shuffled order) of that shard
    offset: int = 0  # tokens of that sample already emitted (a document split across rows)
    rows: int = 0  # rows emitted so far
    skipped: int = 0  # bad samples skipped so far


def stream_shards(num_shards: int, num_streams: int, stream: int, epoch: int, seed: int) -> list[int]:
    order = np.random.default_rng([seed, epoch]).permutation(num_shards)
    return [int(i) for i in order[stream::num_streams]]


def streams_of_consumer(num_streams: int, consumer: int, consumers: int) -> list[int]:
    return [s for s in range(num_streams) if s % consumers == consumer]


def check_layout(num_shards: int, num_streams: int, consumers: int, what: str) -> None:
    """Fail at start, with the fix, when shards/streams/consumers cannot be laid out."""
    if num_shards < num_streams:
        raise ValueError(f"{what}: data.num_streams={num_streams} exceeds the {num_shards} shards; "
                         "every logical stream needs a shard: lower data.num_streams or re-shard "
                         "into more shards")
    if num_streams < consumers:
        raise ValueError(f"{what}: data.num_streams={num_streams} is fewer than the {consumers} "
                         "consumers (ranks × data.num_workers); every consumer serves whole "
                         "streams: raise data.num_streams (it must stay fixed for a run) or lower "
                         "data.num_workers")


class LogicalStream:
    """One logical stream: shards → samples → documents → packed rows, with exact resume."""

    def __init__(self, stream: int, plan: StreamPlan, cfg: DataConfig, spec: MediaSpec,
                 tokenizer: Tokenizer, state: StreamState, policy: str | None = None) -> None:
        self.stream, self.cfg, self.spec, self.tok = stream, cfg, spec, tokenizer
        dataset, self.local = plan.streams[stream]
        self.shards, self.local_streams = plan.sets[dataset], plan.counts[dataset]
        self.state = dataclasses.replace(state)
        self.packer = Packer(cfg.seq_len, pad_id=tokenizer.pad, policy=policy or cfg.long_docs,
                             placeholder_ids=(tokenizer.image, tokenizer.audio))
        self.pending_skips: list[dict[str, Any]] = []
        self.consecutive_failures = 0

    def rows(self) -> Iterator[tuple[Row, StreamState, list[dict[str, Any]]]]:
        st = self.state
        epoch, cursor, first_sample, offset = st.epoch, st.shard_cursor, st.sample, st.offset
        rows, skipped = st.rows, st.skipped
        while True:
            shard_ids = stream_shards(len(self.shards), self.local_streams, self.local, epoch,
                                      self.cfg.seed)
            docs_in_epoch = 0
            while cursor < len(shard_ids):
                shard = shard_ids[cursor]
                for k, raw in self._shard_samples(shard, epoch, first_sample):
                    doc = self._document(shard, raw)
                    if doc is None:
                        skipped += 1
                        continue
                    docs_in_epoch += 1
                    self.consecutive_failures = 0
                    doc.pos, doc.key = (epoch, cursor, k), raw["__key__"]
                    self.packer.add(doc, offset)
                    offset = 0
                    for row in self.packer.rows():
                        (e, c, s), consumed, done = row.end
                        rows += 1
                        state = StreamState(epoch=e, shard_cursor=c, sample=s + 1 if done else s,
                                            offset=0 if done else consumed, rows=rows,
                                            skipped=skipped)
                        skips, self.pending_skips = self.pending_skips, []
                        yield row, state, skips
                cursor, first_sample = cursor + 1, 0
            if docs_in_epoch == 0 and shard_ids:
                raise RuntimeError(f"logical stream {self.stream} read no usable sample in epoch "
                                   f"{epoch} from shards {[self.shards.names[i] for i in shard_ids]}")
            epoch, cursor = epoch + 1, 0

    def _document(self, shard: int, raw: dict[str, Any]):
        key = raw.get("__key__", "?")
        try:
            members = {k: v for k, v in raw.items() if not k.startswith("__")}
            return tokenize_document(parse_sample(key, members), self.tok, self.spec,
                                     max_image_pixels=self.cfg.max_image_pixels)
        except SampleError as e:
            self._skip(shard, key, str(e))
            return None

    def _skip(self, shard: int, key: str, reason: str) -> None:
        self.pending_skips.append({"shard": self.shards.names[shard], "key": key, "reason": reason,
                                   "stream": self.stream})
        if key == "*":  # a whole shard: counted, not a run of bad samples
            return
        self.consecutive_failures += 1
        if self.consecutive_failures >= self.cfg.max_consecutive_failures:
            raise RuntimeError(
                f"{self.consecutive_failures} consecutive bad samples in shard "
                f"{self.shards.urls[shard]} (stream {self.stream}); last: {key}: {reason}. "
                "Check the shard with `mmtrain data verify`")

    def _shard_samples(self, shard: int, epoch: int, start: int) -> Iterator[tuple[int, dict]]:
        """Samples of one shard in windowed-shuffle order, from index `start` on."""
        window: list[dict] = []
        w = self.cfg.shuffle_window
        index = 0  # raw samples read in this shard
        for raw in self._read_tar(shard):
            index += 1
            if index <= (start // w) * w:  # whole windows before the resume point: no decode
                continue
            window.append(raw)
            if len(window) == w:
                yield from self._emit_window(shard, epoch, index - w, window, start)
                window = []
        if window:
            yield from self._emit_window(shard, epoch, index - len(window), window, start)
        expected = self.shards.samples[shard]
        if index != expected:
            self._skip(shard, "*", f"shard holds {index} readable samples, dataset.json says "
                                   f"{expected}: {expected - index} lost")

    def _emit_window(self, shard: int, epoch: int, first: int, window: list[dict],
                     start: int) -> Iterator[tuple[int, dict]]:
        rng = np.random.default_rng([self.cfg.seed, epoch, shard, first])
        for j, i in enumerate(rng.permutation(len(window))):
            if first + j >= start:
                yield first + j, window[i]

    def _read_tar(self, shard: int) -> Iterator[dict]:
        url = self.shards.urls[shard]
        if url.startswith("pipe:") and not self.cfg.allow_pipe:
            raise ValueError(f"{url}: pipe: URLs run a shell command; set data.allow_pipe=true")
        try:
            stream = webdataset.gopen(url)
        except (OSError, ValueError) as e:
            self._skip(shard, "*", f"shard cannot be opened: {e}")
            return
        try:
            files = ({**f, "__url__": url} for f in tariterators.tar_file_iterator(stream))
            yield from tariterators.group_by_keys(files)
        except Exception as e:  # tarfile.ReadError, truncated stream, duplicate member, ...
            self._skip(shard, "*", f"shard unreadable past this point: {type(e).__name__}: {e}")
        finally:
            stream.close()


@dataclasses.dataclass
class LoaderItem:
    batch: Batch
    states: dict[int, dict[str, Any]]  # stream → StreamState after this batch
    skips: list[dict[str, Any]]


class StreamingDataset(torch.utils.data.IterableDataset):
    """Yields ready batches (one rank's micro-batches) from the streams this consumer serves."""

    def __init__(self, plan: StreamPlan, cfg: DataConfig, spec: MediaSpec, tokenizer: Tokenizer,
                 *, rank: int, world_size: int, states: dict[int, StreamState],
                 worker_offset: int) -> None:
        self.plan, self.cfg, self.spec, self.tok = plan, cfg, spec, tokenizer
        self.rank, self.world_size, self.states = rank, world_size, states
        self.worker_offset = worker_offset

    def __iter__(self) -> Iterator[LoaderItem]:
        info = torch.utils.data.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        virtual = (worker + self.worker_offset) % workers
        mine = streams_of_consumer(self.cfg.num_streams, self.rank * workers + virtual,
                                   self.world_size * workers)
        streams = {s: LogicalStream(s, self.plan, self.cfg, self.spec, self.tok, self.states[s])
                   for s in mine}
        iters = {s: streams[s].rows() for s in mine}
        emitted = {s: self.states[s].rows for s in mine}
        while True:
            rows, states, skips, keys = [], {}, [], []
            before = [sum(getattr(st.packer, c) for st in streams.values()) for c in POLICY_COUNTS]
            for _ in range(self.cfg.micro_batch_size):
                s = min(mine, key=lambda s: (emitted[s], s))  # a pure function of the states
                row, state, row_skips = next(iters[s])
                emitted[s] += 1
                rows.append(row)
                keys += [(s, key) for key in row.keys]
                states[s] = dataclasses.asdict(state)
                skips += row_skips
            batch = collate_rows(rows, self.spec, image_token=self.tok.image,
                                 audio_token=self.tok.audio)
            batch.doc_keys = keys
            for c, b in zip(POLICY_COUNTS, before):  # documents split / dropped by the row policy
                batch.counts[c] = sum(getattr(st.packer, c) for st in streams.values()) - b
            yield LoaderItem(batch, states, skips)


class ShardLoader:
    """One rank's view of the training data: an iterator of Batches with a saveable state."""

    def __init__(self, cfg: DataConfig, *, spec: MediaSpec, tokenizer: Tokenizer, rank: int,
                 world_size: int, quarantine: Path | None = None) -> None:
        self.cfg, self.spec, self.tok = cfg, spec, tokenizer
        self.rank, self.world_size = rank, world_size
        self.plan = StreamPlan(cfg)
        workers = max(1, cfg.num_workers)
        self.plan.check(cfg.num_streams, world_size * workers)
        self.owned = [s for s in range(cfg.num_streams)
                      if (s % (world_size * workers)) // workers == rank]
        self.states = {s: StreamState() for s in self.owned}
        self.batches = 0  # batches delivered to this rank's training loop
        self.quarantine = quarantine
        self.skipped = 0
        self._iter: Iterator[LoaderItem] | None = None
        self._last_log = 0.0

    # ---- iteration
    def next_batch(self) -> Batch:
        if self._iter is None:
            with _single_threaded_children():
                self._iter = iter(self._dataloader())  # workers start here
        item = next(self._iter)
        for s, state in item.states.items():
            self.states[s] = StreamState(**state)
        self.batches += 1
        if item.skips:
            self._record_skips(item.skips)
        return item.batch

    def _dataloader(self) -> torch.utils.data.DataLoader:
        workers = self.cfg.num_workers
        dataset = StreamingDataset(self.plan, self.cfg, self.spec, self.tok, rank=self.rank,
                                   world_size=self.world_size, states=dict(self.states),
                                   worker_offset=self.batches % max(1, workers))
        return torch.utils.data.DataLoader(
            dataset, batch_size=None, num_workers=workers, collate_fn=_identity,
            prefetch_factor=4 if workers else None, persistent_workers=False,
            multiprocessing_context="spawn" if workers else None)

    def _record_skips(self, skips: list[dict[str, Any]]) -> None:
        self.skipped += sum(s["key"] != "*" for s in skips)
        if self.quarantine is not None:
            self.quarantine.parent.mkdir(parents=True, exist_ok=True)
            with open(self.quarantine, "a") as f:
                for s in skips:
                    f.write(json.dumps(s) + "\n")
        now = time.monotonic()
        if now - self._last_log > 10.0:  # rate-limited: one line per 10 s at most; never sleeps
            self._last_log = now
            log.warning("rank %d skipped %d bad samples so far (latest: %s %s: %s); see %s",
                        self.rank, self.skipped, skips[-1]["shard"], skips[-1]["key"],
                        skips[-1]["reason"], self.quarantine)

    # ---- state
    def state_dict(self) -> dict[str, Any]:
        return {"version": STATE_VERSION, "fingerprint": self.plan.fingerprint,
                "num_streams": self.cfg.num_streams, "seed": self.cfg.seed,
                "rank": self.rank, "world_size": self.world_size, "batches": self.batches,
                "streams": {str(s): dataclasses.asdict(self.states[s]) for s in self.owned}}

    def load_state_dict(self, rank_states: list[dict[str, Any]]) -> None:
        """Load from the state files of all ranks of the saved run (any world size)."""
        merged: dict[int, StreamState] = {}
        for st in rank_states:
            if st.get("version") != STATE_VERSION:
                raise ValueError(f"loader state version {st.get('version')} is not {STATE_VERSION}")
            if st["num_streams"] != self.cfg.num_streams or st["seed"] != self.cfg.seed:
                raise ValueError(
                    f"loader state has num_streams={st['num_streams']}, seed={st['seed']}; the "
                    f"config has data.num_streams={self.cfg.num_streams}, data.seed={self.cfg.seed}. "
                    "Both must stay fixed for a run")
            if st["fingerprint"] != self.plan.fingerprint and not self.cfg.allow_data_change:
                raise ValueError(
                    f"the data in {' + '.join(self.plan.names)} changed since the checkpoint (fingerprint "
                    f"{self.plan.fingerprint[:12]} != {st['fingerprint'][:12]}); set "
                    "data.allow_data_change=true to resume anyway")
            merged.update({int(s): StreamState(**v) for s, v in st["streams"].items()})
            if st["rank"] == self.rank and st["world_size"] == self.world_size:
                self.batches = st["batches"]
        missing = sorted(set(range(self.cfg.num_streams)) - set(merged))
        if missing:
            raise ValueError(f"loader state lacks logical streams {missing}: incomplete checkpoint")
        self.states = {s: merged[s] for s in self.owned}
        self._iter = None

    def epochs(self) -> float:
        """The lowest epoch any of this rank's streams is in (for reporting)."""
        return min(st.epoch for st in self.states.values())


def _identity(x: Any) -> Any:
    return x


@contextlib.contextmanager
def _single_threaded_children() -> Iterator[None]:
    """Decode workers start with one BLAS/OpenMP thread each: several workers with a thread pool
    per core each oversubscribe the CPUs (measured: 2 workers 5x slower than 1 without this)."""
    names = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")
    saved = {name: os.environ.get(name) for name in names}
    os.environ.update({name: "1" for name in names})
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def eval_batches(directory: str, cfg: DataConfig, *, spec: MediaSpec, tokenizer: Tokenizer,
                 rank: int, world_size: int, num_batches: int) -> list[Batch]:
    """A fixed set of held-out batches: documents in shard order, striped over ranks, never split
    across rows (a caption always sees its media). Cycles over the split if it is small."""
    eval_cfg = dataclasses.replace(cfg, train=directory, mix={}, num_streams=1, shuffle_window=1)
    plan = StreamPlan(eval_cfg)
    shards = plan.sets[0]
    stream = LogicalStream(0, plan, eval_cfg, spec, tokenizer, StreamState(), policy="drop")
    batches: list[Batch] = []
    rows: list[Row] = []
    for _ in range(100):  # passes over the split
        for index, (shard, raw) in enumerate(
                (shard, raw) for shard in range(len(shards)) for raw in stream._read_tar(shard)):
            if index % world_size != rank:
                continue
            doc = stream._document(shard, raw)
            if doc is None:
                continue
            stream.packer.add(doc)
            for row in stream.packer.rows():
                rows.append(row)
                if len(rows) == cfg.micro_batch_size:
                    batches.append(collate_rows(rows, spec, image_token=tokenizer.image,
                                                audio_token=tokenizer.audio))
                    rows = []
                    if len(batches) == num_batches:
                        return batches
    raise RuntimeError(f"{directory}: too little usable data for {num_batches} evaluation batches")
