"""`mmtrain data train-media-tokenizer` and `mmtrain data tokenize-media`.

train-media-tokenizer: reads the image (or audio) members of datasets, decodes them as the
tokenizer sees them, trains the tokenizer (mmtrain/media_tokenizers) and writes its directory
with the held-out reconstruction quality in config.json. Held out: the --val datasets if given,
otherwise the items whose sample key hashes into 10 % (the `split` rule), so the same items are
held out on every run.

tokenize-media: writes a new dataset with the same shards (same names, same samples in the same
order, every member byte for byte) plus, for every media member `KEY.M` of a kind that has a
tokenizer, a member `KEY.M.codes.npy`: its codes as a uint16 .npy array of the tokenizer's
code shape. dataset.json's `media_codes` records each tokenizer's fingerprint and code geometry.
A sample whose media do not decode is left out and listed in rejected.jsonl (shard, key, reason).
Shards go through the build's crash-safe writer; dataset.json is written last.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import numpy as np
import torch

from data_tools.dataset import iter_samples, prepare_output, source_rows
from data_tools.remote import output
from data_tools.shards import (ShardInfo, atomic_write_bytes, iter_shard, read_dataset_index,
                               write_dataset_index, write_shard)
from data_tools.split import is_val
from mmtrain import storage
from mmtrain.data.schema import SampleError, parse_sample
from mmtrain.media_tokenizers import (FitConfig, MediaTokenizer, build_tokenizer, evaluate, fit,
                                      load_tokenizer, save_tokenizer)
from mmtrain.data.schema import CODES_SUFFIX
from mmtrain.media_tokenizers.files import CONFIG_JSON, codes_to_npy

REJECTED = "rejected.jsonl"
HELD_OUT_FRACTION = 0.1
DEFAULT_STEPS = {"image": 400, "audio": 300}  # measured on the demo corpus: docs/architecture.md


# ------------------------------------------------------------------------------------ inputs

def collect_inputs(directories: Iterable[str], tokenizer: MediaTokenizer, *, max_items: int = 0,
                   held_out: Callable[[str], bool] | None = None
                   ) -> tuple[np.ndarray, np.ndarray, int]:
    """(train inputs [N, ...], held-out inputs [K, ...], undecodable items) from the media of
    `tokenizer.kind` in the datasets, in shard order. `held_out(key)` picks held-out items
    (None: none). At most `max_items` training items (0: all)."""
    sides: dict[bool, _Batcher] = {False: _Batcher(tokenizer), True: _Batcher(tokenizer)}
    bad = 0
    for directory in directories:
        for _, key, members in iter_samples(directory):
            if max_items and sides[False].count >= max_items:
                break
            try:
                doc = parse_sample(key, members)
            except SampleError:
                continue  # `verify` reports these
            for seg in doc.segments:
                if seg.type != tokenizer.kind:
                    continue
                try:
                    raw = tokenizer.raw_from_bytes(seg.data)
                except SampleError:
                    bad += 1
                    continue
                sides[bool(held_out and held_out(key))].add(raw)
    train = sides[False].result()
    return (train[:max_items] if max_items else train), sides[True].result(), bad


class _Batcher:
    """Decoded items → model inputs, `chunk` at a time (librosa is much faster on a batch)."""

    def __init__(self, tokenizer: MediaTokenizer, chunk: int = 256) -> None:
        self.tokenizer, self.chunk = tokenizer, chunk
        self.pending: list[np.ndarray] = []
        self.done: list[np.ndarray] = []
        self.count = 0

    def add(self, raw: np.ndarray) -> None:
        self.pending.append(raw)
        self.count += 1
        if len(self.pending) >= self.chunk:
            self._flush()

    def _flush(self) -> None:
        if self.pending:
            self.done.append(self.tokenizer.features(np.stack(self.pending)))
            self.pending = []

    def result(self) -> np.ndarray:
        self._flush()
        if not self.done:
            return np.zeros((0, *self.tokenizer.input_shape), np.float32)
        return np.concatenate(self.done)


# ----------------------------------------------------------------------------------- training

def train_media_tokenizer(kind: str, inputs: list[str], out: str, *, val: list[str] | None = None,
                          fit_config: FitConfig = FitConfig(), max_items: int = 20000,
                          eval_items: int = 512, overwrite: bool = False, device: str = "cpu",
                          log: Callable[[str], None] = print, **config: Any) -> dict[str, Any]:
    """Train a `kind` tokenizer (config fields in `config`) on `device` and write it to `out`.
    Returns config.json's contents."""
    out_dir = Path(out)
    if (out_dir / CONFIG_JSON).exists() and not overwrite:
        raise ValueError(f"{out_dir} already holds a media tokenizer; choose another directory or "
                         "pass --overwrite")
    with torch.random.fork_rng(devices=[]):  # seeded initial weights; the caller's RNG untouched
        torch.manual_seed(fit_config.seed)
        tokenizer = build_tokenizer(kind, **config)  # a bad config fails before data is read
    t0 = time.perf_counter()
    val = list(val or [])
    if val:
        train_x, _, bad = collect_inputs(inputs, tokenizer, max_items=max_items)
        held_x, _, bad_val = collect_inputs(val, tokenizer, max_items=eval_items)
        bad += bad_val
    else:
        train_x, held_x, bad = collect_inputs(
            inputs, tokenizer, max_items=max_items,
            held_out=lambda key: is_val(key, HELD_OUT_FRACTION))
    held_x = held_x[:eval_items]
    if len(train_x) == 0:
        raise ValueError(f"no decodable {kind} members in {', '.join(inputs)}")
    if len(held_x) == 0:
        raise ValueError(f"no held-out {kind} items to measure the tokenizer on: pass --val DIR "
                         f"(or give more data: 10 % of the keys are held out)")
    log(f"{kind} tokenizer: {len(train_x)} training and {len(held_x)} held-out items "
        f"({bad} undecodable skipped), read in {time.perf_counter() - t0:.1f} s; codes "
        f"{'×'.join(map(str, tokenizer.code_shape))} from {tokenizer.codebook_size}")
    tokenizer.to(device)
    before = evaluate(tokenizer, held_x)
    record = fit(tokenizer, train_x, fit_config, log=log)
    quality = {**evaluate(tokenizer, held_x), "at_init": before[tokenizer.quality_name],
               "held_out": "--val " + " ".join(val) if val else
               f"keys hashing into {HELD_OUT_FRACTION:.0%} of {' '.join(inputs)}"}
    record.update(inputs=list(inputs), undecodable=bad)
    save_tokenizer(tokenizer, out_dir, quality=quality, training=record)
    return json.loads((out_dir / CONFIG_JSON).read_text())


# ----------------------------------------------------------------------------------- tokenize

def tokenize_media(directory: str, tokenizer_dirs: list[str], out: str, *, batch: int = 64,
                   device: str = "cpu", overwrite: bool = False) -> dict[str, Any]:
    """Write `out`: the dataset `directory` with a codes member per media member (module doc).
    Returns the new dataset.json contents."""
    tokenizers: dict[str, MediaTokenizer] = {}
    for tdir in tokenizer_dirs:
        tok = load_tokenizer(tdir, device=device)
        if tok.kind in tokenizers:
            raise ValueError(f"two {tok.kind} tokenizers given ({tdir}); give one per kind")
        tokenizers[tok.kind] = tok
    if not tokenizers:
        raise ValueError("give at least one --tokenizer DIR")
    if batch < 1:
        raise ValueError(f"--batch-size={batch} must be >= 1")
    if _same(directory, out):
        raise ValueError(f"tokenize-media writes a new dataset: -o {out} must not be the input")
    index = read_dataset_index(directory)
    sources = source_rows(directory)
    with output(out, overwrite=overwrite) as staged:
        target = prepare_output(staged, overwrite=overwrite)
        shards: list[ShardInfo] = []
        rows: list[dict[str, Any]] = []
        rejected: list[dict[str, str]] = []
        for shard in index["shards"]:
            name = shard["name"]
            samples = ((key, members, sources.get((name, key), ""))
                       for key, members in iter_shard(storage.join(directory, name)))
            info, shard_rows = write_shard(target / name, _with_codes(
                samples, tokenizers, batch, lambda key, why, n=name: rejected.append(
                    {"shard": n, "key": key, "reason": why})))
            shards.append(info)
            rows.extend(shard_rows)
        atomic_write_bytes(target / REJECTED, "".join(
            json.dumps(r, ensure_ascii=False) + "\n" for r in rejected).encode())
        media_codes = {kind: {"tokenizer": str(tdir), "fingerprint": tok.fingerprint,
                              "codebook_size": tok.codebook_size,
                              "code_shape": list(tok.code_shape), "member_suffix": CODES_SUFFIX,
                              "dtype": "uint16"}
                       for tdir, (kind, tok) in zip(tokenizer_dirs, tokenizers.items())}
        return write_dataset_index(
            target, shards, rows, rejected=len(rejected), media_codes=media_codes,
            source={"tokenize_media": {"input": directory,
                                       "input_fingerprint": index["fingerprint"]}})


def _same(a: str, b: str) -> bool:
    if storage.is_url(a) or storage.is_url(b):
        return a.rstrip("/") == b.rstrip("/")
    return Path(a).resolve() == Path(b).resolve()


def _with_codes(samples: Iterator[tuple[str, dict[str, bytes], str]],
                tokenizers: dict[str, MediaTokenizer], batch: int,
                reject: Callable[[str, str], None]) -> Iterator[tuple[str, dict[str, bytes], str]]:
    """The samples with their codes members added, encoded `batch` samples at a time."""
    pending: list[tuple[str, dict[str, bytes], str]] = []
    for sample in samples:
        pending.append(sample)
        if len(pending) >= batch:
            yield from _encode_batch(pending, tokenizers, reject)
            pending = []
    yield from _encode_batch(pending, tokenizers, reject)


def _encode_batch(samples: list[tuple[str, dict[str, bytes], str]],
                  tokenizers: dict[str, MediaTokenizer], reject: Callable[[str, str], None]
                  ) -> list[tuple[str, dict[str, bytes], str]]:
    inputs: dict[str, list[np.ndarray]] = {kind: [] for kind in tokenizers}
    where: dict[str, list[tuple[int, str]]] = {kind: [] for kind in tokenizers}  # (sample, member)
    kept: list[tuple[str, dict[str, bytes], str]] = []
    for key, members, source_row in samples:
        try:
            doc = parse_sample(key, members)
            items = [(seg.type, seg.member, tokenizers[seg.type].raw_from_bytes(seg.data))
                     for seg in doc.segments if seg.type in tokenizers]
        except SampleError as e:
            reject(key, str(e))
            continue
        for kind, member, x in items:
            inputs[kind].append(x)
            where[kind].append((len(kept), member))
        # codes of an earlier tokenize-media run are dropped: dataset.json describes only these
        kept.append((key, {m: data for m, data in members.items()
                           if not m.endswith(CODES_SUFFIX)}, source_row))
    for kind, xs in inputs.items():
        if not xs:
            continue
        tok = tokenizers[kind]
        device = next(tok.parameters()).device
        x = torch.from_numpy(tok.features(np.stack(xs))).to(device)
        codes = tok.encode(x).cpu().numpy()
        for (i, member), c in zip(where[kind], codes):
            kept[i][1][member + CODES_SUFFIX] = codes_to_npy(c)
    return kept
