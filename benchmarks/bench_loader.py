"""Loader throughput ratios, measured side by side in one process on the same shards.

    python benchmarks/bench_loader.py [--samples 2000] [--batches 40] [--workers 2] [--reps 3]

P   our ShardLoader ÷ a fair peer: webdataset + torch.utils.data.DataLoader with the same decode
    and tokenize, the same packing and collation (our Packer and collate_rows), the same number
    of decode workers (spawned, one BLAS thread each) and the same shuffle buffer (webdataset's
    shard shuffle + `.shuffle(data.shuffle_buffer)`). Median over alternating pairs of runs.
    Both must deliver the same number of batches of the same shape, real tokens within 1% and
    documents within max(5%, 4/sqrt(documents)): the benchmark fails otherwise. Goal ≥ 1.0×.
    What ours adds: exact resume state, the cross-shard interleave, weighted mixing, quarantine.
P0  the same two pipelines in-process (0 workers), as tokens per CPU second of the process: the
    per-sample cost, steadier than wall time on a shared machine. Goal ≥ 1.0×.
W   2 decode workers ÷ 1 worker (ours): goal ≥ 1.7× on 2 free cores
C   ours with 1% corrupt samples ÷ clean: goal ≥ 0.95×
Absolute numbers on shared machines mean little; the ratios are the claim.
"""

from __future__ import annotations

import argparse
import functools
import statistics
import tempfile
import time
from pathlib import Path
from typing import Iterator

import torch
import webdataset as wds

from data_tools.shards import write_dataset_index, write_shard
from data_tools.synth import make_sample, synth_split
from mmtrain.data.batch import collate_rows
from mmtrain.data.config import DataConfig, MediaSpec
from mmtrain.data.loader import (ShardLoader, ShardSet, exit_without_teardown,
                                 single_threaded_children)
from mmtrain.data.packing import Packer, tokenize_document
from mmtrain.data.schema import AUDIO_EXTS, IMAGE_EXTS, SampleError, parse_sample
from mmtrain.data.tokenizer import ByteTokenizer
from mmtrain.model import ModelConfig

TOK = ByteTokenizer()
SPEC = ModelConfig().media()
SEQ_LEN, MICRO_BATCH, BUFFER = 512, 8, 256


def measure(batches: Iterator, warm: int, n: int) -> dict[str, float]:
    """Time n batches after `warm` (every worker started); totals for the equality check."""
    for _ in range(warm):
        next(batches)
    docs = tokens = slots = 0
    t0, c0 = time.perf_counter(), time.process_time()
    for _ in range(n):
        b = next(batches)
        docs += b.counts["docs"]
        tokens += b.counts["real_tokens"]
        slots += b.tokens.numel()
    seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
    return {"seconds": seconds, "docs": docs, "tokens": tokens, "slots": slots,
            "tokens_per_s": tokens / seconds, "docs_per_s": docs / seconds,
            "tokens_per_cpu_s": tokens / cpu}  # this process's CPU: all of it with 0 workers


def ours(directory: Path, batches: int, workers: int) -> dict[str, float]:
    cfg = DataConfig(train=str(directory), num_workers=workers, num_streams=8,
                     micro_batch_size=MICRO_BATCH, seq_len=SEQ_LEN, shuffle_buffer=BUFFER)
    with ShardLoader(cfg, spec=SPEC, tokenizer=TOK, rank=0, world_size=1) as loader:
        return measure(iter(loader.next_batch, None), max(1, workers) * 3, batches)


# ------------------------------------------------------------ the webdataset + DataLoader peer

def decode(sample: dict, spec: MediaSpec):
    members = {k: v for k, v in sample.items() if not k.startswith("__")}
    try:
        return tokenize_document(parse_sample(sample["__key__"], members), TOK, spec,
                                 max_image_pixels=50_000_000)
    except SampleError:
        return None


def pack_batches(docs: Iterator, spec: MediaSpec) -> Iterator:
    """webdataset stage: documents → packed rows → Batches (our packing and collation)."""
    packer = Packer(SEQ_LEN, pad_id=TOK.pad, placeholder_ids=(TOK.image, TOK.audio))
    rows = []
    for doc in docs:
        if doc is None:
            continue
        packer.add(doc)
        for row in packer.rows():
            rows.append(row)
            if len(rows) == MICRO_BATCH:
                yield collate_rows(rows, spec, image_token=TOK.image, audio_token=TOK.audio)
                rows = []


def peer(directory: Path, batches: int, workers: int) -> dict[str, float]:
    urls = ShardSet(directory).urls
    pipeline = (wds.WebDataset(urls, shardshuffle=len(urls), detshuffle=True, seed=0,
                               empty_check=False)
                .shuffle(BUFFER)
                .map(functools.partial(decode, spec=SPEC))
                .compose(functools.partial(pack_batches, spec=SPEC))
                .repeat())  # endless, like ours: every worker always has a next batch
    loader = torch.utils.data.DataLoader(
        pipeline, batch_size=None, num_workers=workers, prefetch_factor=4 if workers else None,
        multiprocessing_context="spawn" if workers else None,
        worker_init_fn=exit_without_teardown)  # as ours: a quiet exit (docs/loader.md)
    with single_threaded_children():  # as ours: one BLAS thread per worker (no oversubscription)
        it = iter(loader)
    try:
        return measure(it, max(1, workers) * 3, batches)
    finally:
        shutdown = getattr(it, "_shutdown_workers", None)
        if shutdown is not None:
            shutdown()


def same_work(a: dict[str, float], b: dict[str, float]) -> None:
    """Both computed the same thing: the same batches and token slots, real tokens within 1%, and
    as many documents up to sampling noise (the shuffles differ, so the documents that fill the
    rows differ): within max(5%, 4/sqrt(documents))."""
    problems = []
    if a["slots"] != b["slots"]:
        problems.append(f"token slots {a['slots']} != {b['slots']}")
    if abs(a["tokens"] - b["tokens"]) > 0.01 * b["tokens"]:
        problems.append(f"real tokens {a['tokens']} vs {b['tokens']} (> 1% apart)")
    tolerance = max(0.05, 4 / b["docs"] ** 0.5)
    if abs(a["docs"] - b["docs"]) > tolerance * b["docs"]:
        problems.append(f"documents {a['docs']} vs {b['docs']} (> {tolerance:.0%} apart)")
    if problems:
        raise SystemExit("benchmark P: the two pipelines did not do the same work: "
                         + "; ".join(problems))


# ------------------------------------------------------------------------------------- data

def corrupted_copy(src_seed: int, out: Path, samples: int, per_shard: int) -> None:
    """The same corpus with the media of every 100th sample replaced by garbage bytes."""
    out.mkdir(parents=True, exist_ok=True)
    media = IMAGE_EXTS + AUDIO_EXTS
    shards, rows = [], []
    for s, start in enumerate(range(0, samples, per_shard)):
        def gen(start=start):
            for i in range(start, min(start + per_shard, samples)):
                key, members, row = make_sample(src_seed, "train", i)
                if i % 100 == 0:
                    for m in members:
                        if m.rsplit(".", 1)[-1] in media:
                            members[m] = b"\x89PNG garbage"
                yield key, members, row
        info, shard_rows = write_shard(out / f"shard-{s:05d}.tar", gen())
        shards.append(info)
        rows += shard_rows
    write_dataset_index(out, shards, rows)


def median_of_alternating(runs: dict, reps: int) -> dict[str, list[dict[str, float]]]:
    results: dict[str, list[dict[str, float]]] = {name: [] for name in runs}
    for _ in range(reps):  # alternate: the machine's noise hits both alike
        for name, run in runs.items():
            results[name].append(run())
    return results


def median(results: list[dict[str, float]], key: str) -> float:
    return statistics.median(r[key] for r in results)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--samples", type=int, default=2000)
    ap.add_argument("--batches", type=int, default=40)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--only", choices=["P", "P0", "W", "C"], action="append",
                    help="run only these benchmarks (default: all)")
    args = ap.parse_args()
    todo = set(args.only or ["P", "P0", "W", "C"])
    with tempfile.TemporaryDirectory() as tmp:
        clean, bad = Path(tmp) / "clean", Path(tmp) / "bad"
        per_shard = args.samples // 8
        synth_split(clean, split="train", samples=args.samples, seed=0, samples_per_shard=per_shard)
        n, w = args.batches, args.workers
        if "P" in todo:
            res = median_of_alternating({"ours": lambda: ours(clean, n, w),
                                         "peer": lambda: peer(clean, n, w)}, args.reps)
            for a, b in zip(res["ours"], res["peer"]):
                same_work(a, b)
            o, p = median(res["ours"], "tokens_per_s"), median(res["peer"], "tokens_per_s")
            pairs = [a["tokens_per_s"] / b["tokens_per_s"]
                     for a, b in zip(res["ours"], res["peer"])]
            print(f"P  ours ({w} workers)           {o:10.0f} tokens/s "
                  f"({median(res['ours'], 'docs_per_s'):.1f} docs/s)")
            print(f"   webdataset + DataLoader     {p:10.0f} tokens/s "
                  f"({median(res['peer'], 'docs_per_s'):.1f} docs/s)")
            print(f"   ratio                       {statistics.median(pairs):10.2f}x   "
                  "(goal >= 1.0x; "
                  f"median over {args.reps} alternating pairs of runs, {n} batches of "
                  f"{MICRO_BATCH}x{SEQ_LEN}; ratio of the medians {o / p:.2f}x)")
            print("   per pair (ours/peer)        " + " ".join(f"{r:.2f}" for r in pairs))
        if "P0" in todo:  # CPU time is steadier than wall time on a shared machine
            res = median_of_alternating({"ours": lambda: ours(clean, n, 0),
                                         "peer": lambda: peer(clean, n, 0)}, args.reps)
            for a, b in zip(res["ours"], res["peer"]):
                same_work(a, b)
            pairs = [a["tokens_per_cpu_s"] / b["tokens_per_cpu_s"]
                     for a, b in zip(res["ours"], res["peer"])]
            print(f"P0 ours, in-process            {median(res['ours'], 'tokens_per_cpu_s'):10.0f}"
                  " tokens per CPU second")
            print(f"   webdataset, in-process      {median(res['peer'], 'tokens_per_cpu_s'):10.0f}"
                  " tokens per CPU second")
            print(f"   ratio                       {statistics.median(pairs):10.2f}x   "
                  f"(goal >= 1.0x; median over {args.reps} alternating pairs)")
        if "W" in todo:
            res = median_of_alternating({"1": lambda: ours(clean, n, 1),
                                         "2": lambda: ours(clean, n, 2)}, args.reps)
            w1, w2 = median(res["1"], "docs_per_s"), median(res["2"], "docs_per_s")
            print(f"W  1 worker                    {w1:10.1f} docs/s")
            print(f"   2 workers                   {w2:10.1f} docs/s")
            print(f"   ratio                       {w2 / w1:10.2f}x   "
                  "(goal >= 1.7x on 2 free cores)")
        if "C" in todo:
            corrupted_copy(0, bad, args.samples, per_shard)
            res = median_of_alternating({"bad": lambda: ours(bad, n, 0),
                                         "clean": lambda: ours(clean, n, 0)}, args.reps)
            c, k = median(res["bad"], "docs_per_s"), median(res["clean"], "docs_per_s")
            print(f"C  1% corrupt                  {c:10.1f} docs/s")
            print(f"   clean                       {k:10.1f} docs/s")
            print(f"   ratio                       {c / k:10.2f}x   (goal >= 0.95x)")


if __name__ == "__main__":
    main()
