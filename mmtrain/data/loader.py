"""Deterministic, resumable streaming over WebDataset tar shards (ARCHITECTURE.md, contract 4).

Design (the resume semantics are ours; webdataset itself keeps no state; docs/loader.md):

* Every dataset of the mix is split into `num_streams` **logical streams**, fixed by the data
  config and independent of the number of ranks and workers. In epoch `e` the dataset's shards
  are permuted with seed (seed, dataset, e), their samples laid end to end, and stream j reads the
  j-th of `num_streams` equal ranges of that order: slices of shards, so every stream reads the
  same number of samples per epoch (a small remainder shard is not over-sampled) and a dataset
  needs only as many samples as streams, not shards.
* Cross-shard shuffle: a stream reads its slices in groups of `shuffle_shards`; the slices of a
  group are interleaved by a seeded random merge and drawn through a seeded shuffle buffer of
  `shuffle_buffer` samples. The order is a pure function of (seed, dataset, stream, epoch, group)
  and the shard bytes, so the position (epoch, group, samples drawn) is a complete resume point:
  resuming re-reads the group's raw samples up to it (no decode) and continues.
* Each stream has its own packer. Its state after a row is (epoch, group, sample index, token
  offset in that sample). Streams loop over epochs forever, so every rank always has a next batch;
  the training loop decides how many steps to take.
* Consumer c of C (rank r, worker w: c = r·W + w) serves, in every dataset, the streams
  j ≡ c (mod C): whole streams, the same number from each dataset. It takes its next row from the
  stream with the smallest (rows + 1) / weight: deterministic weighted fair queueing, so each
  consumer's rows (and so every rank's and the run's) follow the mix weights to within a row per
  stream, at any world size and worker count. After a change of world size or worker count the
  streams are reassigned; no sample is lost or served twice. Workers of a rank are rotated on
  resume so that the DataLoader's round-robin continues where it stopped (exact resume).
"""

from __future__ import annotations

import atexit
import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import re
import sys
import time
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
import webdataset
from webdataset import tariterators

from mmtrain import storage
from mmtrain.data import index as dataset_index
from mmtrain.data.batch import Batch, collate_rows
from mmtrain.data.config import DataConfig, MediaSpec
from mmtrain.data.media_codes import GENERATE, INPUT, MediaCodes
from mmtrain.data.packing import Packer, Row, TokenizedDoc, tokenize_document
from mmtrain.data.schema import Document, SampleError, Segment, parse_sample
from mmtrain.data.shard_io import ShardIO, ShardUnreadable
from mmtrain.data.tokenizer import Tokenizer

log = logging.getLogger("mmtrain.data")
STATE_VERSION = 2
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
        self.bytes = [int(s["bytes"]) for s in index["shards"]]
        self.fingerprint = index["fingerprint"]
        self.media_codes = index.get("media_codes") or {}  # what `tokenize-media` stored
        self.urls = [f"{self.directory}/{name}" if self.directory.startswith("pipe:")
                     else storage.join(self.directory, name) for name in self.names]
        self._offsets: dict[str, list[int]] | None = None  # from the manifest, at the first seek

    def seek_point(self, shard: int, sample: int) -> tuple[int, int]:
        """(byte offset, samples to drop after it) to start reading `shard` at raw sample
        `sample`: the sample's own offset when the manifest records offsets, else (0, sample)."""
        if sample == 0 or self.directory.startswith("pipe:"):
            return 0, sample
        if self._offsets is None:  # read once, at the first seek
            try:
                self._offsets = dataset_index.sample_offsets(self.directory) or {}
            except ValueError as e:  # no manifest: read from the start
                log.warning("%s: no sample offsets (%s); reading shards from their start",
                            self.directory, e)
                self._offsets = {}
        offsets = self._offsets.get(self.names[shard])
        if offsets is None or len(offsets) != self.samples[shard] or sample >= len(offsets):
            return 0, sample
        return offsets[sample], 0

    def __len__(self) -> int:
        return len(self.names)


def _read_index(base: str) -> dict[str, Any]:
    if not base.startswith("pipe:"):
        return dataset_index.read_dataset_index(base)  # local folder or URL (mmtrain.storage)
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
    """The datasets of the run, their weights, and the logical streams that read them.

    Global stream id s = dataset · num_streams + j, where j is the stream's index in its dataset.
    """

    def __init__(self, cfg: DataConfig, codes: MediaCodes | None = None) -> None:
        sources = cfg.mix or {cfg.train: 1.0}
        self.names = list(sources)
        self.sets = [ShardSet(base, allow_pipe=cfg.allow_pipe) for base in sources]
        # Media generation: the run's MediaCodes, and per dataset the kinds whose stored codes
        # members it may use (the dataset recorded the configured tokenizer's fingerprint).
        self.codes = codes
        self.stored_codes = [codes.stored_kinds({"media_codes": s.media_codes})
                             if codes is not None else frozenset() for s in self.sets]
        total = float(sum(sources.values()))
        self.weights = [w / total for w in sources.values()]
        self.per_dataset = cfg.num_streams
        self.num_streams = len(self.sets) * cfg.num_streams
        self.seed = cfg.seed
        self.share_names = share_names(self.names)
        parts = [f"{s.fingerprint}:{w}" for s, w in zip(self.sets, sources.values())]
        self.fingerprint = self.sets[0].fingerprint if len(self.sets) == 1 else \
            hashlib.sha256("|".join(parts).encode()).hexdigest()

    def dataset(self, stream: int) -> int:
        return stream // self.per_dataset

    def weight(self, stream: int) -> float:
        return self.weights[self.dataset(stream)]

    def slices(self, stream: int, epoch: int) -> list[tuple[int, int, int]]:
        d = self.dataset(stream)
        return stream_slices(self.sets[d].samples, self.per_dataset, stream % self.per_dataset,
                             epoch, [self.seed, d])

    def streams_of_consumer(self, consumer: int, consumers: int) -> list[int]:
        return [s for s in range(self.num_streams) if s % self.per_dataset % consumers == consumer]

    def check(self, consumers: int) -> None:
        for name, shards in zip(self.names, self.sets):
            check_layout(len(shards), self.per_dataset, consumers, name,
                         num_samples=sum(shards.samples))


def share_names(keys: list[str]) -> list[str]:
    """The last path component of each mix key, made unique with -2, -3, ... (metric names)."""
    names: list[str] = []
    for key in keys:
        base = re.sub(r"[^\w.\-]", "_", key.rstrip("/").rsplit("/", 1)[-1]) or "data"
        name, n = base, 1
        while name in names:
            n += 1
            name = f"{base}-{n}"
        names.append(name)
    return names


@dataclasses.dataclass
class StreamState:
    epoch: int = 0
    group: int = 0  # group of `shuffle_shards` shard slices of this stream's epoch being read
    sample: int = 0  # next sample (in the group's shuffled order) of that group
    offset: int = 0  # tokens of that sample already emitted (a document split across rows)
    rows: int = 0  # rows emitted so far
    skipped: int = 0  # bad samples skipped so far


def stream_slices(samples: list[int], num_streams: int, stream: int, epoch: int,
                  seed: list[int]) -> list[tuple[int, int, int]]:
    """Stream `stream`'s (shard, first, stop) sample ranges in `epoch`: the j-th of `num_streams`
    equal ranges of the shards laid end to end in a seeded per-epoch shard order."""
    order = np.random.default_rng([*seed, epoch]).permutation(len(samples))
    total = sum(samples)
    lo, hi = stream * total // num_streams, (stream + 1) * total // num_streams
    out, at = [], 0
    for shard in order:
        n = samples[shard]
        first, stop = max(lo, at), min(hi, at + n)
        if first < stop:
            out.append((int(shard), first - at, stop - at))
        at += n
    return out


def check_layout(num_shards: int, num_streams: int, consumers: int, what: str, *,
                 num_samples: int | None = None) -> None:
    """Fail at start, with the fix, when shards/streams/consumers cannot be laid out."""
    if num_shards < 1 or (num_samples is not None and num_samples < num_streams):
        raise ValueError(f"{what}: data.num_streams={num_streams} exceeds the {num_samples} "
                         f"samples in {num_shards} shards; every logical stream needs a sample: "
                         "lower data.num_streams or add data")
    if num_streams < consumers:
        raise ValueError(f"{what}: data.num_streams={num_streams} is fewer than the {consumers} "
                         "consumers (ranks × data.num_workers); every consumer serves whole "
                         "streams: raise data.num_streams (it must stay fixed for a run) or lower "
                         "data.num_workers")


_ADDRESS = re.compile(r" (?:object )?at 0x[0-9a-fA-F]+")


def normalize_reason(reason: str) -> str:
    """The same failure gives the same text: no object addresses (`<_io.BytesIO object at 0x7f…>`
    → `<_io.BytesIO>`), one line, bounded length — so quarantine records can be deduplicated."""
    reason = _ADDRESS.sub("", reason)
    reason = " ".join(reason.split())
    return reason if len(reason) <= 500 else reason[:497] + "..."


class LogicalStream:
    """One logical stream: shard slices → shuffled samples → documents → packed rows."""

    def __init__(self, stream: int, plan: StreamPlan, cfg: DataConfig, spec: MediaSpec,
                 tokenizer: Tokenizer, state: StreamState, policy: str | None = None,
                 shard_io: ShardIO | None = None) -> None:
        self.stream, self.plan, self.cfg, self.spec, self.tok = stream, plan, cfg, spec, tokenizer
        self.io = shard_io or shard_io_for(cfg)  # shared by a consumer's streams: bounded handles
        self.failed_shards = 0  # unreadable shards in a row (reset by a shard that reads)
        self.dataset = plan.dataset(stream)
        self.shards = plan.sets[self.dataset]
        self.state = dataclasses.replace(state)
        self.packer = Packer(cfg.seq_len, pad_id=tokenizer.pad, policy=policy or cfg.long_docs,
                             placeholder_ids=(tokenizer.image, tokenizer.audio))
        self.pending_skips: list[dict[str, Any]] = []
        self.consecutive_failures = 0
        self.epoch = state.epoch  # the epoch being read (quarantine records carry it)

    def rows(self) -> Iterator[tuple[Row, StreamState, list[dict[str, Any]]]]:
        st = self.state
        epoch, group, first_sample, offset = st.epoch, st.group, st.sample, st.offset
        rows, skipped = st.rows, st.skipped
        k_shards = self.cfg.shuffle_shards
        while True:
            self.epoch = epoch
            slices = self.plan.slices(self.stream, epoch)
            groups = [slices[i:i + k_shards] for i in range(0, len(slices), k_shards)]
            docs_in_epoch = 0
            while group < len(groups):
                for k, shard, raw in self._group_samples(epoch, group, groups[group], first_sample):
                    doc = self._document(shard, raw)
                    if doc is None:
                        skipped += 1
                        continue
                    docs_in_epoch += 1
                    self.consecutive_failures = 0
                    doc.pos, doc.key = (epoch, group, k), raw["__key__"]
                    self.packer.add(doc, offset)
                    offset = 0
                    for row in self.packer.rows():
                        (e, g, s), consumed, done = row.end
                        rows += 1
                        state = StreamState(epoch=e, group=g, sample=s + 1 if done else s,
                                            offset=0 if done else consumed, rows=rows,
                                            skipped=skipped)
                        skips, self.pending_skips = self.pending_skips, []
                        yield row, state, skips
                group, first_sample = group + 1, 0
            if docs_in_epoch == 0 and groups:
                names = sorted({self.shards.names[shard] for shard, _, _ in slices})
                raise RuntimeError(f"logical stream {self.stream} read no usable sample in epoch "
                                   f"{epoch} from shards {names}")
            epoch, group = epoch + 1, 0

    def _document(self, shard: int, raw: dict[str, Any]):
        key = raw.get("__key__", "?")
        try:
            members = {k: v for k, v in raw.items() if not k.startswith("__")}
            return tokenize_document(parse_sample(key, members), self.tok, self.spec,
                                     max_image_pixels=self.cfg.max_image_pixels,
                                     codes=self.plan.codes,
                                     use_stored=self.plan.stored_codes[self.dataset])
        except SampleError as e:
            self._skip(shard, key, str(e))
            return None

    def _skip(self, shard: int, key: str, reason: str, kind: str = "sample") -> None:
        reason = normalize_reason(reason)
        self.pending_skips.append({"dataset": self.plan.share_names[self.dataset],
                                   "shard": self.shards.names[shard], "key": key,
                                   "reason": reason, "stream": self.stream, "epoch": self.epoch,
                                   **({"kind": kind} if key == "*" else {})})
        if key == "*":  # a whole shard: counted, not a run of bad samples
            return
        self.consecutive_failures += 1
        if self.consecutive_failures >= self.cfg.max_consecutive_failures:
            raise RuntimeError(
                f"{self.consecutive_failures} consecutive bad samples in shard "
                f"{self.shards.urls[shard]} (stream {self.stream}); last: {key}: {reason}. "
                "Check the shard with `mmtrain data verify`")

    def _group_samples(self, epoch: int, group: int, slices: list[tuple[int, int, int]],
                       start: int) -> Iterator[tuple[int, int, dict]]:
        """(index in the group's order, shard, raw sample) of one group, from index `start` on.

        The group's slices are merged in a seeded random order (each next sample comes from a
        slice with probability ∝ its samples left, so the slices end together) and drawn through
        a seeded shuffle buffer. A resume at `start` > 0 seeks to the samples still needed
        (_seek_group); failing that, the samples before `start` are read but not decoded.
        """
        size = self.cfg.shuffle_buffer
        seed = [self.cfg.seed, self.stream, epoch, group]
        resumed = self._seek_group(np.random.default_rng(seed), slices, start) if start else None
        if resumed is not None:
            rng, readers, left, buffer, k = resumed
        else:
            rng = np.random.default_rng(seed)
            readers = [(shard, self._slice(shard, first, stop)) for shard, first, stop in slices]
            left = [stop - first for _, first, stop in slices]
            buffer, k = [], 0
        try:
            while readers or buffer:
                if readers and len(buffer) < size:
                    i = _weighted_pick(rng, left)
                    shard, reader = readers[i]
                    raw = next(reader, None)
                    left[i] -= 1
                    if raw is None or left[i] == 0:  # slice done (or ended early: recorded)
                        reader.close()
                        del readers[i], left[i]
                    if raw is not None:
                        buffer.append((shard, raw))
                    continue
                j = int(rng.integers(len(buffer)))
                buffer[j], buffer[-1] = buffer[-1], buffer[j]
                shard, raw = buffer.pop()
                if k >= start:
                    yield k, shard, raw
                k += 1
        finally:
            for _, reader in readers:
                reader.close()

    def _seek_group(self, rng: np.random.Generator, slices: list[tuple[int, int, int]],
                    start: int):
        """Resume a group at draw `start` by seeking instead of re-reading it.

        The merge and buffer draws depend only on the rng and the slice lengths, not on the
        bytes, so they are replayed without reading (_replay_group). What is still needed is then
        read: the samples in the shuffle buffer at that point, and each slice from where the merge
        had got to, opening every slice at its first needed sample (a seek to its byte offset).
        The replay assumes no slice ended early before `start` (an early end changes the draws):
        every slice's last consumed sample is read to check it, and a shard whose size differs
        from dataset.json's is re-read. (What a seek cannot see: a corrupt tar header before that
        sample in a shard of the right size; `mmtrain data verify` finds those.)
        Returns (rng, readers, left, buffer, k) positioned as the uninterrupted run was, or None
        to re-read (also for pipe: URLs).
        """
        for shard, _, _ in slices:
            url = self.shards.urls[shard]
            if url.startswith("pipe:") or self.io.size(url) != self.shards.bytes[shard]:
                return None
        replay = _replay_group(rng, [stop - first for _, first, stop in slices], start,
                               self.cfg.shuffle_buffer)
        if replay is None:
            return None
        active, left, consumed, placeholders = replay
        needed: dict[int, set[int]] = {}
        for s, m in placeholders:
            needed.setdefault(s, set()).add(m)
        readers: dict[int, Iterator[dict]] = {}
        got: dict[tuple[int, int], dict] = {}
        records = len(self.pending_skips)
        try:
            for s, (shard, first, stop) in enumerate(slices):
                want = needed.get(s, set())
                lo = min(want | {max(0, consumed[s] - 1)})  # the last consumed one: a check
                readers[s] = reader = self._slice(shard, first + lo, stop)
                for m in range(lo, consumed[s]):
                    raw = next(reader, None)
                    if raw is None:
                        raise _ReplayMismatch
                    if m in want:
                        got[s, m] = raw
        except _ReplayMismatch:
            for reader in readers.values():
                reader.close()
            del self.pending_skips[records:]  # the re-read records what the straight run did
            return None
        for s in set(readers) - set(active):
            readers.pop(s).close()
        buffer = [(slices[s][0], got[s, m]) for s, m in placeholders]
        return rng, [(slices[s][0], readers[s]) for s in active], left, buffer, start

    def _slice(self, shard: int, first: int, stop: int) -> Iterator[dict]:
        """Samples first..stop-1 of a shard (the ones before `first` are read and dropped)."""
        reader = self._read_tar(shard, first)  # seeks to sample `first` when offsets are known
        n = first
        try:
            for raw in reader:
                if n >= first:
                    yield raw
                n += 1
                if n >= stop:
                    return
        finally:
            reader.close()
        expected = self.shards.samples[shard]
        self._skip(shard, "*", f"shard holds {n} readable samples, dataset.json says {expected}: "
                               f"{stop - max(n, first)} of this stream's samples lost",
                   kind="short")

    def _read_tar(self, shard: int, start: int = 0) -> Iterator[dict]:
        """Raw samples of a shard from sample `start` on (tar order), through this consumer's
        ShardIO: bounded handles, read-ahead, retries. A shard that cannot be opened or read after
        the retries is recorded as unreadable (kind "io"); bad bytes (tar or grouping errors) are
        recorded as such (kind "bad_bytes"). Neither is ever skipped silently."""
        url = self.shards.urls[shard]
        if url.startswith("pipe:"):
            yield from self._read_pipe(shard, url)
            return
        offset, drop = self.shards.seek_point(shard, start)
        stream = None
        try:
            stream = self.io.open(url, offset=offset)
            files = ({**f, "__url__": url} for f in tariterators.tar_file_iterator(stream))
            for i, sample in enumerate(tariterators.group_by_keys(files)):
                if i >= drop:
                    self.failed_shards = 0  # this shard reads: the failures are not in a row
                    yield sample
        except ShardUnreadable as e:
            self._shard_unreadable(shard, str(e))
        except RuntimeError:  # out of file descriptors (shard_io names the cause): stop
            raise
        except Exception as e:  # tarfile.ReadError, truncated stream, duplicate member, ...
            self._skip(shard, "*", f"bad bytes: shard unreadable past this point: "
                                   f"{type(e).__name__}: {e}", kind="bad_bytes")
        finally:
            if stream is not None:
                stream.close()

    def _shard_unreadable(self, shard: int, reason: str) -> None:
        self.failed_shards += 1
        self._skip(shard, "*", f"unreadable: {reason}", kind="io")
        if self.failed_shards >= self.cfg.max_shard_failures:
            raise RuntimeError(
                f"{self.failed_shards} unreadable shards in a row (data.max_shard_failures="
                f"{self.cfg.max_shard_failures}); last: {self.shards.urls[shard]}: {reason}")

    def _read_pipe(self, shard: int, url: str) -> Iterator[dict]:
        if not self.cfg.allow_pipe:
            raise ValueError(f"{url}: pipe: URLs run a shell command; set data.allow_pipe=true")
        try:
            stream = webdataset.gopen(url)
        except (OSError, ValueError) as e:
            self._shard_unreadable(shard, f"shard cannot be opened: {e}")
            return
        try:
            files = ({**f, "__url__": url} for f in tariterators.tar_file_iterator(stream))
            yield from tariterators.group_by_keys(files)
        except Exception as e:  # tarfile.ReadError, truncated stream, duplicate member, ...
            self._skip(shard, "*", f"bad bytes: shard unreadable past this point: "
                                   f"{type(e).__name__}: {e}", kind="bad_bytes")
        finally:
            stream.close()


def shard_io_for(cfg: DataConfig) -> ShardIO:
    """One consumer's shard reader, configured from data.* (see mmtrain/data/shard_io.py)."""
    return ShardIO(max_open=cfg.max_open_shards, read_ahead=cfg.read_ahead,
                   retries=cfg.io_retries, backoff=cfg.io_backoff,
                   block_size=cfg.io_block_mb << 20)


class _ReplayMismatch(Exception):
    """A shard had fewer samples than the replay of a group's draws assumed."""


def _replay_group(rng: np.random.Generator, counts: list[int], start: int, size: int):
    """The draws of LogicalStream._group_samples, without the samples: slices of `counts`
    samples merged by _weighted_pick into a shuffle buffer of `size`. Returns, just before draw
    `start`, (active slice ids, their samples left, samples consumed per slice, the buffer as
    (slice, index in slice)), with `rng` advanced to that point; None if the group ends first.
    Must make exactly the rng calls _group_samples makes (test_loader's resume tests check it)."""
    active, left = list(range(len(counts))), list(counts)
    consumed = [0] * len(counts)
    buffer: list[tuple[int, int]] = []
    k = 0
    while active or buffer:
        if active and len(buffer) < size:
            i = _weighted_pick(rng, left)
            s = active[i]
            buffer.append((s, consumed[s]))
            consumed[s] += 1
            left[i] -= 1
            if left[i] == 0:
                del active[i], left[i]
            continue
        if k == start:
            return active, left, consumed, buffer
        j = int(rng.integers(len(buffer)))
        buffer[j], buffer[-1] = buffer[-1], buffer[j]
        buffer.pop()
        k += 1
    return None


def _weighted_pick(rng: np.random.Generator, weights: list[int]) -> int:
    x = rng.random() * sum(weights)
    for i, w in enumerate(weights):
        x -= w
        if x < 0:
            return i
    return len(weights) - 1


@dataclasses.dataclass
class LoaderItem:
    batch: Batch
    states: dict[int, dict[str, Any]]  # stream → StreamState after this batch
    skips: list[dict[str, Any]]

    def pin_memory(self) -> "LoaderItem":  # called by the DataLoader's pinning thread
        return dataclasses.replace(self, batch=self.batch.pin_memory())


def consumer_items(plan: StreamPlan, cfg: DataConfig, spec: MediaSpec, tokenizer: Tokenizer,
                   states: dict[int, StreamState], consumer: int,
                   consumers: int) -> Iterator[LoaderItem]:
    """The batches consumer `consumer` of `consumers` produces from `states` on (the unit a
    DataLoader worker runs; tests run several in one process to simulate ranks and workers)."""
    mine = plan.streams_of_consumer(consumer, consumers)
    shard_io = shard_io_for(cfg)  # one per consumer: its open handles are bounded together
    streams = {s: LogicalStream(s, plan, cfg, spec, tokenizer, states[s], shard_io=shard_io)
               for s in mine}
    iters = {s: streams[s].rows() for s in mine}
    emitted = {s: states[s].rows for s in mine}
    weight = {s: plan.weight(s) for s in mine}
    while True:
        rows, new_states, skips, keys = [], {}, [], []
        before = [sum(getattr(st.packer, c) for st in streams.values()) for c in POLICY_COUNTS]
        for _ in range(cfg.micro_batch_size):
            # Weighted fair queueing over the streams: a pure function of the states.
            s = min(mine, key=lambda s: ((emitted[s] + 1) / weight[s], s))
            row, state, row_skips = next(iters[s])
            emitted[s] += 1
            rows.append(row)
            keys += [(s, key) for key in row.keys]
            new_states[s] = dataclasses.asdict(state)
            skips += row_skips
        batch = collate_rows(rows, spec, image_token=tokenizer.image, audio_token=tokenizer.audio)
        batch.doc_keys = keys
        for c, b in zip(POLICY_COUNTS, before):  # documents split / dropped by the row policy
            batch.counts[c] = sum(getattr(st.packer, c) for st in streams.values()) - b
        yield LoaderItem(batch, new_states, skips)


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
        return consumer_items(self.plan, self.cfg, self.spec, self.tok, self.states,
                              self.rank * workers + virtual, self.world_size * workers)


def media_codes_for(cfg: DataConfig, spec: MediaSpec) -> MediaCodes | None:
    """The run's MediaCodes when it generates media (a tokenizer is configured), else None."""
    return MediaCodes(cfg, spec) if cfg.image_tokenizer or cfg.audio_tokenizer else None


class ShardLoader:
    """One rank's view of the training data: an iterator of Batches with a saveable state.

    Call `close()` when done: it stops the decode workers cleanly.
    """

    def __init__(self, cfg: DataConfig, *, spec: MediaSpec, tokenizer: Tokenizer, rank: int,
                 world_size: int, quarantine: Path | None = None, pin_memory: bool = False) -> None:
        self.cfg, self.spec, self.tok = cfg, spec, tokenizer
        # pin_memory (batches bound for a GPU): the DataLoader's thread copies each batch into
        # page-locked memory while the step runs, so the host-to-device copy is asynchronous.
        self.pin_memory = pin_memory
        self.rank, self.world_size = rank, world_size
        self.plan = StreamPlan(cfg, media_codes_for(cfg, spec))
        workers = max(1, cfg.num_workers)
        self.plan.check(world_size * workers)
        self.owned = [s for r in range(workers)
                      for s in self.plan.streams_of_consumer(rank * workers + r, world_size * workers)]
        self.owned.sort()
        self.states = {s: StreamState() for s in self.owned}
        self.batches = 0  # batches delivered to this rank's training loop
        self.quarantine = Quarantine(quarantine) if quarantine is not None else None
        self.skipped = 0
        self.skipped_shards = 0  # shard reads that ended early (I/O after retries, or bad bytes)
        self.unreadable_shards = 0  # of which: the storage did not answer after the retries
        self._iter: Iterator[LoaderItem] | None = None
        self._last_log = 0.0

    # ---- iteration
    def next_batch(self) -> Batch:
        if self._iter is None:
            with single_threaded_children():
                self._iter = iter(self._dataloader())  # workers start here
        item = next(self._iter)
        for s, state in item.states.items():
            self.states[s] = StreamState(**state)
        self.batches += 1
        if item.skips:
            self._record_skips(item.skips)
        return item.batch

    def close(self) -> None:
        """Stop the decode workers and wait for them (idempotent). Without this, workers are torn
        down by the interpreter's exit, mid-prefetch, and abort noisily."""
        it, self._iter = self._iter, None
        shutdown = getattr(it, "_shutdown_workers", None)  # torch's multi-process iterator
        if shutdown is not None:
            shutdown()

    def __enter__(self) -> "ShardLoader":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def _dataloader(self) -> torch.utils.data.DataLoader:
        workers = self.cfg.num_workers
        dataset = StreamingDataset(self.plan, self.cfg, self.spec, self.tok, rank=self.rank,
                                   world_size=self.world_size, states=dict(self.states),
                                   worker_offset=self.batches % max(1, workers))
        return torch.utils.data.DataLoader(
            dataset, batch_size=None, num_workers=workers, collate_fn=_identity,
            prefetch_factor=4 if workers else None, persistent_workers=False,
            worker_init_fn=exit_without_teardown,
            multiprocessing_context="spawn" if workers else None, pin_memory=self.pin_memory)

    def _record_skips(self, skips: list[dict[str, Any]]) -> None:
        self.skipped += sum(s["key"] != "*" for s in skips)
        for s in skips:  # a whole shard lost is rare and costly: logged every time, not limited
            if s["key"] == "*":
                self.skipped_shards += s.get("kind") == "short"
                self.unreadable_shards += s.get("kind") == "io"
                log.warning("rank %d: shard %s (%s): %s", self.rank, s["shard"], s["dataset"],
                            s["reason"])
        if self.quarantine is not None:
            self.quarantine.write(skips)
        now = time.monotonic()
        if now - self._last_log > 10.0:  # rate-limited: one line per 10 s at most; never sleeps
            self._last_log = now
            where = (f"see {self.quarantine.path}" if self.quarantine is not None
                     else "no quarantine file is written for this loader")
            log.warning("rank %d skipped %d bad samples so far (latest: %s %s: %s); %s",
                        self.rank, self.skipped, skips[-1]["shard"], skips[-1]["key"],
                        skips[-1]["reason"], where)

    # ---- mix reporting
    @property
    def share_names(self) -> list[str]:
        return self.plan.share_names

    def dataset_rows(self) -> list[int]:
        """Rows of each dataset this rank's streams have delivered, over the whole run (stream
        histories travel with the state, so the count survives resume at any world size). The
        sum over ranks is the run's total."""
        rows = [0] * len(self.plan.sets)
        for s, st in self.states.items():
            rows[self.plan.dataset(s)] += st.rows
        return rows

    # ---- state
    def state_dict(self) -> dict[str, Any]:
        return {"version": STATE_VERSION, "fingerprint": self.plan.fingerprint,
                "num_streams": self.cfg.num_streams, "seed": self.cfg.seed,
                "shuffle": [self.cfg.shuffle_shards, self.cfg.shuffle_buffer],
                "rank": self.rank, "world_size": self.world_size, "batches": self.batches,
                "media_tokenizers": self.media_tokenizers(),
                "streams": {str(s): dataclasses.asdict(self.states[s]) for s in self.owned}}

    def load_state_dict(self, rank_states: list[dict[str, Any]]) -> None:
        """Load from the state files of all ranks of the saved run (any world size)."""
        merged: dict[int, StreamState] = {}
        for st in rank_states:
            self._check_state(st)
            merged.update({int(s): StreamState(**v) for s, v in st["streams"].items()})
            if st["rank"] == self.rank and st["world_size"] == self.world_size:
                self.batches = st["batches"]
        missing = sorted(set(range(self.plan.num_streams)) - set(merged))
        if missing:
            raise ValueError(f"loader state lacks logical streams {missing}: incomplete checkpoint")
        self.close()
        self.states = {s: merged[s] for s in self.owned}

    def _check_state(self, st: dict[str, Any]) -> None:
        if st.get("version") != STATE_VERSION:
            raise ValueError(f"loader state version {st.get('version')} is not {STATE_VERSION}: the "
                             "checkpoint was saved by an older mmtrain whose data order this one "
                             "cannot continue exactly; start over with --fresh")
        shuffle = [self.cfg.shuffle_shards, self.cfg.shuffle_buffer]
        if (st["num_streams"] != self.cfg.num_streams or st["seed"] != self.cfg.seed
                or st["shuffle"] != shuffle):
            raise ValueError(
                f"loader state has num_streams={st['num_streams']}, seed={st['seed']}, "
                f"shuffle_shards, shuffle_buffer={st['shuffle']}; the config has "
                f"data.num_streams={self.cfg.num_streams}, data.seed={self.cfg.seed}, "
                f"{shuffle}. These must stay fixed for a run")
        if st["fingerprint"] != self.plan.fingerprint and not self.cfg.allow_data_change:
            raise ValueError(
                f"the data in {' + '.join(self.plan.names)} changed since the checkpoint (fingerprint "
                f"{self.plan.fingerprint[:12]} != {st['fingerprint'][:12]}); set "
                "data.allow_data_change=true to resume anyway")
        saved = st.get("media_tokenizers", {})
        if saved != self.media_tokenizers() and not self.cfg.allow_data_change:
            raise ValueError(
                f"the media tokenizers changed since the checkpoint (it trained on codes of "
                f"{ {k: v[:12] for k, v in saved.items()} }, the config gives "
                f"{ {k: v[:12] for k, v in self.media_tokenizers().items()} }: "
                "data.image_tokenizer / data.audio_tokenizer); set data.allow_data_change=true to "
                "resume anyway")

    def media_tokenizers(self) -> dict[str, str]:
        """{kind: fingerprint} of the media tokenizers whose codes this run trains on."""
        return dict(self.plan.codes.fingerprints) if self.plan.codes is not None else {}

    def epochs(self) -> float:
        """The lowest epoch any of this rank's streams is in (for reporting)."""
        return min(st.epoch for st in self.states.values())


class Quarantine:
    """quarantine/rank_K.jsonl: one line per skipped sample or shard problem, never twice.

    Records are deterministic (normalized reasons, the epoch they were met in), so a resume that
    re-reads samples after the checkpoint — on this rank or, after a world-size change, on
    another — finds them already written by some rank_*.jsonl of the directory and skips them.
    """

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.seen: set[str] = set()
        for sibling in sorted(self.path.parent.glob("*.jsonl")):
            for line in sibling.read_text(errors="replace").splitlines():
                with contextlib.suppress(ValueError):  # a line torn by a crash
                    self.seen.add(_record_id(json.loads(line)))

    def write(self, records: list[dict[str, Any]]) -> None:
        new = []
        for r in records:
            rid = _record_id(r)
            if rid not in self.seen:
                self.seen.add(rid)
                new.append(json.dumps(r, sort_keys=True))
        if not new:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a+b") as f:
            f.seek(0, os.SEEK_END)
            if f.tell():  # start on a fresh line after a line torn by a crash
                f.seek(-1, os.SEEK_END)
                torn = f.read(1) != b"\n"
                f.seek(0, os.SEEK_END)
                if torn:
                    f.write(b"\n")
            f.write(("\n".join(new) + "\n").encode())


def _record_id(record: dict[str, Any]) -> str:
    return json.dumps(record, sort_keys=True)


def _identity(x: Any) -> Any:
    return x


def exit_without_teardown(worker_id: int) -> None:
    """DataLoader `worker_init_fn`: a decode worker leaves with `os._exit` when Python's exit
    handlers run, after stdio is flushed.

    By then torch's worker loop has finished its shutdown protocol and cancelled the join of its
    result queue, so nothing is left to flush. What is skipped is the native teardown (static
    destructors, daemon threads unwound in the middle of a call), where C++ thread pools abort the
    process: `terminate called without an active exception`, which the DataLoader reports as
    `worker ... killed by signal: Aborted`. Measured on 2 cores: a worker that had started
    Arrow's pools aborted in 2 of 6 exits, a plain webdataset + DataLoader pipeline in 1 of 8."""
    def leave() -> None:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)

    atexit.register(leave)


@contextlib.contextmanager
def single_threaded_children() -> Iterator[None]:
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
                 rank: int, world_size: int, num_batches: int,
                 codes: MediaCodes | None) -> list[Batch]:
    """A fixed set of held-out batches: documents in shard order, striped over ranks, never split
    across rows (a caption always sees its media). Cycles over the split if it is small.
    `codes`: the run's MediaCodes (the training loader's `plan.codes`, or `media_codes_for`)."""
    eval_cfg = dataclasses.replace(cfg, train=directory, mix={}, num_streams=1, shuffle_shards=1,
                                   shuffle_buffer=1)
    plan = StreamPlan(eval_cfg, codes)
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


def generation_eval_batches(directory: str, cfg: DataConfig, *, spec: MediaSpec,
                            tokenizer: Tokenizer, rank: int, world_size: int,
                            items_per_kind: int, codes: MediaCodes | None
                            ) -> dict[str, tuple[list[Batch], list[Batch]]]:
    """Held-out batches for the generation gains: {kind: (true batches, shuffled batches)}.

    Every media item of a generated kind that has a caption (the text right after it) becomes the
    document `<bos> caption <begin> codes <end> <eos>`; the shuffled set gives each item the
    caption of the next item of its kind instead. Both sets hold the same code targets. Items are
    striped over ranks in shard order; at most `items_per_kind` per kind on this rank. `codes` as
    for eval_batches (None: no kind is generated).
    """
    if codes is None:
        return {}
    eval_cfg = dataclasses.replace(cfg, train=directory, mix={}, num_streams=1, shuffle_shards=1,
                                   shuffle_buffer=1)
    plan = StreamPlan(eval_cfg, codes)
    stream = LogicalStream(0, plan, eval_cfg, spec, tokenizer, StreamState(), policy="drop")
    items: dict[str, list[tuple[str, Segment, str]]] = {kind: [] for kind in codes.dirs}
    samples = ((shard, raw) for shard in range(len(plan.sets[0]))
               for raw in stream._read_tar(shard))
    for index, (shard, raw) in enumerate(samples):
        if all(len(found) >= items_per_kind for found in items.values()):
            break
        if index % world_size != rank:
            continue
        key = raw["__key__"]
        try:
            doc = parse_sample(key, {k: v for k, v in raw.items() if not k.startswith("__")})
        except SampleError:
            continue
        for i, seg in enumerate(doc.segments[:-1]):
            after = doc.segments[i + 1]
            if seg.type in items and after.type == "text" and len(items[seg.type]) < items_per_kind:
                items[seg.type].append((f"{key}#{i}", seg, after.text))
    out = {}
    for kind, found in items.items():
        if len(found) < 2:
            continue
        captions = [caption for _, _, caption in found]
        shuffled = captions[1:] + captions[:1]
        out[kind] = tuple(_pair_batches(found, texts, stream, cfg, spec, tokenizer)
                          for texts in (captions, shuffled))
    return out


def _pair_batches(items: list[tuple[str, Segment, str]], captions: list[str],
                  stream: LogicalStream, cfg: DataConfig, spec: MediaSpec,
                  tokenizer: Tokenizer) -> list[Batch]:
    packer = Packer(cfg.seq_len, pad_id=tokenizer.pad, policy="drop",
                    placeholder_ids=(tokenizer.image, tokenizer.audio))
    for (key, seg, _), caption in zip(items, captions):
        doc = Document(key=key, segments=[seg, Segment(type="text", text=caption)])
        try:
            packer.add(tokenize_document(doc, tokenizer, spec,
                                         max_image_pixels=cfg.max_image_pixels,
                                         codes=stream.plan.codes, decisions=[GENERATE, INPUT],
                                         use_stored=stream.plan.stored_codes[0]))
        except SampleError:
            packer.add(TokenizedDoc(np.asarray([tokenizer.bos, tokenizer.eos]),
                                    np.zeros(2, bool), []))  # keeps both sets aligned
    packer.flush()
    rows = list(packer.rows())
    return [collate_rows(rows[i:i + cfg.micro_batch_size], spec, image_token=tokenizer.image,
                         audio_token=tokenizer.audio)
            for i in range(0, len(rows), cfg.micro_batch_size)]
