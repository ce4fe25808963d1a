"""Loader throughput ratios, measured side by side in one process on the same shards.

    python benchmarks/bench_loader.py [--samples 2000] [--batches 40] [--workers 2] [--reps 3]
                                      [--only P|P0|W|C|G] [--tokenizers DIR]

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
G   media codes, stored ÷ made on the fly (issue 15, "tokenize once"): ours with every media item a
    generation target (data.generation_fraction=1.0) reading a copy of the corpus made by
    `tokenize-media` (data.codes=stored) ÷ the same on the original corpus, encoded by the
    tokenizers in the decode workers (data.codes=encode); median over alternating pairs. Both must
    deliver identical batches (tokens and targets), except that at most 0.1% of the codes may
    differ (same_batches says why; the count is printed): the benchmark fails otherwise. Also
    printed: the same loader without tokenizers (no generation), and tokenize-media's one-off
    cost. Tokenizers: DIR/image and DIR/audio with --tokenizers DIR (e.g. data/demo/tokenizers),
    else untrained seeded ones (what the codes mean does not change what encoding costs).
    Alone: --only G (about two minutes at the defaults on 2 cores).
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

from data_tools.media_tokenizer import tokenize_media
from data_tools.shards import iter_shard, write_dataset_index, write_shard
from data_tools.synth import make_sample, synth_split
from mmtrain.data.batch import collate_rows
from mmtrain.data.config import DataConfig, MediaSpec
from mmtrain.data.loader import (ShardLoader, ShardSet, exit_without_teardown,
                                 single_threaded_children)
from mmtrain.data.packing import Packer, tokenize_document
from mmtrain.data.schema import AUDIO_EXTS, IMAGE_EXTS, SampleError, parse_sample
from mmtrain.data.tokenizer import ByteTokenizer
from mmtrain.media_tokenizers import build_tokenizer, read_tokenizer_info, save_tokenizer
from mmtrain.model import ModelConfig

TOK = ByteTokenizer()
SPEC = ModelConfig().media()
SEQ_LEN, MICRO_BATCH, BUFFER = 512, 8, 256
CODES_MAY_DIFFER = 0.0  # benchmark G: codes that may differ, stored vs on the fly (same_batches)


def measure(batches: Iterator, warm: int, n: int, keep: list | None = None) -> dict[str, float]:
    """Time n batches after `warm` (every worker started); totals for the equality check.
    `keep`: a list that receives (tokens, targets) of the n batches (benchmark G compares them)."""
    for _ in range(warm):
        next(batches)
    docs = tokens = slots = 0
    t0, c0 = time.perf_counter(), time.process_time()
    for _ in range(n):
        b = next(batches)
        if keep is not None:  # a reference, no copy: costs nothing measurable
            keep.append((b.tokens, b.targets))
        docs += b.counts["docs"]
        tokens += b.counts["real_tokens"]
        slots += b.tokens.numel()
    seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
    return {"seconds": seconds, "docs": docs, "tokens": tokens, "slots": slots,
            "tokens_per_s": tokens / seconds, "docs_per_s": docs / seconds,
            "tokens_per_cpu_s": tokens / cpu}  # this process's CPU: all of it with 0 workers


def ours(directory: Path, batches: int, workers: int, *, spec: MediaSpec = SPEC,
         keep: list | None = None, **data) -> dict[str, float]:
    """Our loader on `directory`; `data`: more DataConfig fields (benchmark G's codes)."""
    cfg = DataConfig(train=str(directory), num_workers=workers, num_streams=8,
                     micro_batch_size=MICRO_BATCH, seq_len=SEQ_LEN, shuffle_buffer=BUFFER, **data)
    with ShardLoader(cfg, spec=spec, tokenizer=TOK, rank=0, world_size=1) as loader:
        return measure(iter(loader.next_batch, None), max(1, workers) * 3, batches, keep)


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


# ------------------------------------------------------------- media codes (benchmark G)

def media_tokenizers(root: Path, trained: str | None) -> tuple[list[str], str]:
    """[image dir, audio dir] and what they are: DIR/image and DIR/audio of --tokenizers DIR, else
    untrained tokenizers with seeded weights written under `root`."""
    if trained:
        return [str(Path(trained) / kind) for kind in ("image", "audio")], f"trained, {trained}"
    for kind in ("image", "audio"):
        torch.manual_seed(0)
        save_tokenizer(build_tokenizer(kind), root / kind)
    return [str(root / kind) for kind in ("image", "audio")], "untrained, seeded weights"


def stored_codes_copy(clean: Path, tokenizers: list[str], out: Path) -> dict:
    """`tokenize-media` of `clean` into `out` (timed), checked: no sample left out, and every
    media item of the first shard has its codes member (the loader encodes an item without one
    on the fly, which would quietly measure the wrong thing). Returns dataset.json + seconds."""
    t0 = time.perf_counter()
    index = tokenize_media(str(clean), tokenizers, str(out))
    seconds = time.perf_counter() - t0
    if index["rejected"]:
        raise SystemExit(f"benchmark G: tokenize-media left out {index['rejected']} samples")
    for key, members in iter_shard(str(out / index["shards"][0]["name"])):
        if not all(seg.codes for seg in parse_sample(key, members).segments if seg.type != "text"):
            raise SystemExit(f"benchmark G: {key} in {out} has a media item without codes")
    return {**index, "seconds": seconds}


def same_batches(stored: list, encoded: list, spec: MediaSpec) -> tuple[int, int]:
    """Benchmark G's check that both sides computed the same thing: the same batches, token for
    token and target for target, except that a code may differ at most at CODES_MAY_DIFFER of
    the code positions. Returns (codes that differ, codes).

    tokenize-media encodes a batch of items, the loader one item; on the CPU the convolutions of a
    batch of 1 run other kernels than larger batches (last-bit differences that flipped 3 of 1655
    images by one code before the tokenizers encoded a lone item as a pair of copies:
    `mmtrain.media_tokenizers.layers.batch_independent`). Now none may differ (CODES_MAY_DIFFER = 0)."""
    if len(stored) != len(encoded):
        raise SystemExit(f"benchmark G: {len(stored)} batches vs {len(encoded)}")
    differ = codes = 0
    for i, ((tokens_s, targets_s), (tokens_e, targets_e)) in enumerate(zip(stored, encoded)):
        kinds = [[(t >= spec.code_first(k)).int() for k in ("image", "audio")]  # 0 text, 1, 2
                 for t in (tokens_s, tokens_e, targets_s, targets_e)]
        kind_s, kind_e, target_kind_s, target_kind_e = (a + b for a, b in kinds)
        text = kind_s == 0
        if not (torch.equal(kind_s, kind_e) and torch.equal(target_kind_s, target_kind_e)
                and torch.equal(tokens_s[text], tokens_e[text])
                and torch.equal(targets_s[target_kind_s == 0], targets_e[target_kind_e == 0])):
            raise SystemExit(
                f"benchmark G: measured batch {i} differs between stored codes and codes made on "
                "the fly beyond the codes' values (text, layout or targets): the two sides did "
                "not compute the same thing")
        differ += int((tokens_s[~text] != tokens_e[~text]).sum())
        codes += int((~text).sum())
    if codes == 0 or differ > CODES_MAY_DIFFER * codes:
        raise SystemExit(f"benchmark G: {differ} of {codes} codes differ between stored codes and "
                         f"codes made on the fly (allowed: {CODES_MAY_DIFFER:.1%})")
    return differ, codes


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
    ap.add_argument("--only", choices=["P", "P0", "W", "C", "G"], action="append",
                    help="run only these benchmarks (default: all)")
    ap.add_argument("--tokenizers", metavar="DIR",
                    help="G: media tokenizers DIR/image and DIR/audio (default: untrained, seeded)")
    args = ap.parse_args()
    todo = set(args.only or ["P", "P0", "W", "C", "G"])
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
        if "G" in todo:
            codes_of(clean, Path(tmp), args)


def codes_of(clean: Path, tmp: Path, args: argparse.Namespace) -> None:
    """Benchmark G (module doc): stored codes ÷ codes made on the fly, the same batches."""
    dirs, made = media_tokenizers(tmp / "tokenizers", args.tokenizers)
    books = [read_tokenizer_info(d)["codebook_size"] for d in dirs]
    spec = ModelConfig(image_codes=books[0], audio_codes=books[1]).media()
    index = stored_codes_copy(clean, dirs, tmp / "stored")
    generate = dict(image_tokenizer=dirs[0], audio_tokenizer=dirs[1], generation_fraction=1.0)
    n, w = args.batches, args.workers
    kept: dict[str, list[list]] = {"stored": [], "encode": []}

    def coded(mode: str, directory: Path) -> dict[str, float]:
        kept[mode].append([])
        return ours(directory, n, w, spec=spec, keep=kept[mode][-1], codes=mode, **generate)

    res = median_of_alternating({"stored": lambda: coded("stored", tmp / "stored"),
                                 "encode": lambda: coded("encode", clean),
                                 "off": lambda: ours(clean, n, w)}, args.reps)
    checked = [same_batches(a, b, spec) for a, b in zip(kept["stored"], kept["encode"])]
    differ, codes = sum(d for d, _ in checked), sum(c for _, c in checked)
    pairs = [a["docs_per_s"] / b["docs_per_s"] for a, b in zip(res["stored"], res["encode"])]
    samples = index["totals"]["samples"]
    print(f"G  stored codes ({w} workers)   {median(res['stored'], 'docs_per_s'):10.1f} docs/s "
          f"({median(res['stored'], 'tokens_per_s'):.0f} tokens/s)")
    print(f"   codes made on the fly       {median(res['encode'], 'docs_per_s'):10.1f} docs/s "
          f"({median(res['encode'], 'tokens_per_s'):.0f} tokens/s)")
    print(f"   ratio                       {statistics.median(pairs):10.2f}x   "
          f"(median over {args.reps} alternating pairs, {n} batches of {MICRO_BATCH}x{SEQ_LEN}, "
          "every media item a generation target)")
    print("   per pair (stored/on the fly) " + " ".join(f"{r:.2f}" for r in pairs))
    print(f"   same batches                text, layout and targets identical; codes differing "
          f"{differ} of {codes} (allowed {CODES_MAY_DIFFER:.1%})")
    print(f"   no generation (no tokenizers){median(res['off'], 'docs_per_s'):9.1f} docs/s "
          f"({median(res['off'], 'tokens_per_s'):.0f} tokens/s)")
    print(f"   tokenize-media, once        {samples / index['seconds']:10.1f} samples/s "
          f"({samples} samples in {index['seconds']:.1f} s, this process); tokenizers: {made}")


if __name__ == "__main__":
    main()
