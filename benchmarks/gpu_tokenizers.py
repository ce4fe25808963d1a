"""The `tokenizers` stage of the GPU benchmark: media tokenizers' encode throughput, GPU vs CPU.

    benchmarks/gpu.sh OUT_DIR --stages tokenizers             # on one GPU, about a minute
    benchmarks/gpu.sh --dry-run OUT_DIR --stages tokenizers   # on CPU, tiny sizes, same code
    python3 benchmarks/gpu_tokenizers.py [--dry-run] OUT_DIR  # the same, this stage alone

The weights are UNTRAINED: each tokenizer is `build_tokenizer(kind)` after `torch.manual_seed(0)`,
with the default architecture (image 32x32 px -> 8x8 codes, audio 1 s log-mel -> 25 codes, 1000
codes each). Throughput does not depend on the weights' values; the codes themselves mean nothing.

Two measurements, each GPU vs the CPU with all its cores (`mmtrain data tokenize-media` runs on the
CPU unless given --device):

  encode      `tok.encode(x)` on batches of random inputs in the tokenizer's input range (pixels
              in [-1, 1]; normalised log-mel in [-1, 1]), items/s at a few batch sizes. On the GPU:
              fp32 (TF32 off), torch's default (cuDNN convolutions in TF32, what tokenize-media
              gets), and bf16 autocast; each with the host->device copy of the inputs and the
              device->host copy of the codes in the timing (as tokenize-media does), and fp32
              also with the inputs already on the GPU.
  e2e         `tokenize_media` (data_tools/media_tokenizer.py, the function behind
              `mmtrain data tokenize-media`) on a synthetic corpus (`mmtrain data synth`), on the
              CPU and with device="cuda": media items/s, bytes to codes members. Audio needs
              librosa for its features; where it is missing, only images are tokenized and the
              JSON says so.

Both sides must compute the same thing: the codes of every fp32 GPU encode, and the codes members
the e2e runs write, must equal the CPU's for at least AGREEMENT_MIN of positions (FSQ rounds a
latent to its nearest level; a latent within float error of a level boundary may round the other
way); below that the stage fails. TF32 and bf16 agreement is reported, and fails nothing.
"""

from __future__ import annotations

import contextlib
import copy
import importlib.util
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from gpu_common import Deadline, Settings, sync

UNTRAINED = "untrained tokenizer weights (build_tokenizer after torch.manual_seed(0)): throughput only"
AGREEMENT_MIN = 0.999  # fp32 GPU codes vs CPU codes, fraction of equal positions
STAGE_CAP_S = 150.0  # this stage's own soft budget on a GPU
# the device side's modes: name -> (cuDNN convolutions may use TF32, bf16 autocast)
ENCODE_MODES = {"fp32": (False, False), "tf32_default": (True, False), "bf16_autocast": (True, True)}


def _sizes(dry_run: bool) -> dict:
    if dry_run:
        return {"encode_batches": (4, 16), "min_seconds": 0.0, "min_reps": 2,
                "e2e_samples": 16, "e2e_batches": (8,)}
    return {"encode_batches": (64, 512, 4096), "min_seconds": 0.5, "min_reps": 3,
            "e2e_samples": 2000, "e2e_batches": (64, 512)}


# ------------------------------------------------------------------------------------ helpers


def cpu_threads() -> int:
    """Every core this process may run on (the CPU reference uses them all)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


@contextlib.contextmanager
def torch_threads(n: int):
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@contextlib.contextmanager
def cudnn_tf32(allowed: bool):
    """cuDNN convolutions in TF32 (torch's default: True) or true fp32."""
    before = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = allowed
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32 = before


def seeded_tokenizer(kind: str):
    """The default-architecture tokenizer of `kind` with untrained weights from seed 0, in eval mode
    (the caller's RNG untouched)."""
    from mmtrain.media_tokenizers import build_tokenizer

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return build_tokenizer(kind).eval()


def device_copy(tok, device: torch.device):
    """The same tokenizer on `device`, as a copy (the CPU reference keeps its own)."""
    return copy.deepcopy(tok).to(device)


def random_inputs(tok, batch: int, seed: int) -> torch.Tensor:
    """A batch of inputs in the tokenizer's input range [-1, 1], on the CPU."""
    gen = torch.Generator().manual_seed(seed)
    return torch.rand((batch, *tok.input_shape), generator=gen) * 2 - 1


def items_per_s(fn: Callable[[], object], items: int, s: Settings, min_seconds: float, min_reps: int) -> float:
    """Items per second of fn over at least min_reps calls and min_seconds, after two warm-up
    calls (the first picks cuDNN algorithms and allocates); CUDA-synchronized at both ends."""
    for _ in range(2):
        fn()
    sync(s)
    reps, start = 0, time.perf_counter()
    while reps < min_reps or time.perf_counter() - start < min_seconds:
        fn()
        reps += 1
    sync(s)
    return items * reps / (time.perf_counter() - start)


def agreement(got: torch.Tensor, want: torch.Tensor) -> float:
    """Fraction of code positions where got equals want (both on the CPU)."""
    assert got.shape == want.shape, (got.shape, want.shape)
    return float((got == want).double().mean())


# ------------------------------------------------------------------------------------- encode


def encode_rows(kind: str, s: Settings, deadline: Deadline, sizes: dict, threads: int) -> dict:
    """`tok.encode` items/s on the CPU (all cores) and on s.device, per batch size, with agreement."""
    tok_cpu = seeded_tokenizer(kind)
    tok_dev = device_copy(tok_cpu, s.device)
    timing = {"min_seconds": sizes["min_seconds"], "min_reps": sizes["min_reps"]}
    rows, failures = [], []
    for i, batch in enumerate(sizes["encode_batches"]):
        row: dict = {"batch": batch}
        rows.append(row)
        if deadline.passed():
            row["skipped"] = "stage time budget spent"
            continue
        x = random_inputs(tok_cpu, batch, seed=i)
        with torch_threads(threads):
            row["cpu_items_per_s"] = items_per_s(lambda: tok_cpu.encode(x), batch, s, **timing)
            want = tok_cpu.encode(x)
        x_dev = x.to(s.device)
        for name, (tf32, bf16) in ENCODE_MODES.items():
            if deadline.passed():
                row[name] = {"skipped": "stage time budget spent"}
                continue

            def encode_with_copies():
                with torch.autocast(s.device.type, dtype=torch.bfloat16, enabled=bf16):
                    return tok_dev.encode(x.to(s.device)).cpu()  # the .cpu() syncs

            with cudnn_tf32(tf32):
                rate = items_per_s(encode_with_copies, batch, s, **timing)
                got = encode_with_copies()
                entry = {"items_per_s": rate, "vs_cpu": rate / row["cpu_items_per_s"],
                         "codes_agree_with_cpu": agreement(got, want)}
                if name == "fp32":  # the encoder alone, inputs already on the device
                    on_device = items_per_s(lambda: tok_dev.encode(x_dev), batch, s, **timing)
                    entry.update(items_per_s_on_device=on_device, vs_cpu_on_device=on_device / row["cpu_items_per_s"])
            row[name] = entry
            if name == "fp32" and not entry["codes_agree_with_cpu"] >= AGREEMENT_MIN:
                failures.append(f"{kind} encode batch {batch}: fp32 codes agree with the CPU's at "
                                f"{entry['codes_agree_with_cpu']:.4%} < {AGREEMENT_MIN:.1%}")
        print(f"  {kind} encode batch {batch}: CPU ({threads} threads) {row['cpu_items_per_s']:,.0f} items/s; "
              + "; ".join(f"{name} {row[name]['items_per_s']:,.0f} items/s ({row[name]['vs_cpu']:.2f}x), "
                          f"codes agree {row[name]['codes_agree_with_cpu']:.4%}"
                          for name in ENCODE_MODES if "items_per_s" in row.get(name, {})), flush=True)
    return {"code_shape": list(tok_cpu.code_shape), "input_shape": list(tok_cpu.input_shape),
            "codebook_size": tok_cpu.codebook_size, "rows": rows, "failures": failures}


# ---------------------------------------------------------------------------------------- e2e


def read_codes(dataset: Path) -> dict[tuple[str, str], np.ndarray]:
    """(shard, member) -> codes of every codes member in a tokenize-media output."""
    from data_tools.shards import iter_shard, read_dataset_index
    from mmtrain.media_tokenizers import CODES_SUFFIX, codes_from_npy

    out = {}
    for shard in read_dataset_index(str(dataset))["shards"]:
        for key, members in iter_shard(dataset / shard["name"]):
            for member, data in members.items():
                if member.endswith(CODES_SUFFIX):
                    out[(shard["name"], f"{key}.{member}")] = codes_from_npy(data, what=member)
    return out


def e2e_rows(s: Settings, deadline: Deadline, sizes: dict, threads: int, work: Path) -> dict:
    """`tokenize_media` on a synthetic corpus, on the CPU and on s.device: media items/s."""
    from data_tools.media_tokenizer import tokenize_media
    from data_tools.synth import synth_split
    from mmtrain.media_tokenizers import save_tokenizer

    if work.exists():
        shutil.rmtree(work)
    start = time.perf_counter()
    data = work / "data"
    synth_split(data, split="train", samples=sizes["e2e_samples"], seed=0,
                samples_per_shard=max(1, sizes["e2e_samples"] // 4), workers=1)  # no fork after CUDA init
    warmup_data = work / "warmup"  # other samples: the first run pays imports, librosa's set-up, cuDNN's choices
    synth_split(warmup_data, split="warmup", samples=8, seed=0, samples_per_shard=8, workers=1)
    record: dict = {"samples": sizes["e2e_samples"], "synth_seconds": round(time.perf_counter() - start, 1)}
    kinds = ["image"]
    if importlib.util.find_spec("librosa") is not None:
        kinds.append("audio")
    else:
        record["audio"] = "skipped: librosa is not installed (the audio tokenizer's log-mel features need it)"
    tok_dirs = []
    for kind in kinds:
        save_tokenizer(seeded_tokenizer(kind), work / "tokenizers" / kind)
        tok_dirs.append(str(work / "tokenizers" / kind))
    record["kinds"] = kinds

    rows, failures = [], []
    for batch in sizes["e2e_batches"]:
        row: dict = {"batch_samples": batch}
        rows.append(row)
        codes = {}
        for side, device in (("cpu", "cpu"), ("device", str(s.device))):
            if deadline.passed():
                row[side] = {"skipped": "stage time budget spent"}
                continue
            out = work / f"out-{side}-{batch}"
            threads_here = threads if side == "cpu" else torch.get_num_threads()
            with torch_threads(threads_here):
                tokenize_media(str(warmup_data), tok_dirs, str(work / "out-warmup"), batch=batch, device=device,
                               overwrite=True)
                sync(s)
                t0 = time.perf_counter()
                tokenize_media(str(data), tok_dirs, str(out), batch=batch, device=device, overwrite=True)
                sync(s)
                seconds = time.perf_counter() - t0
            codes[side] = read_codes(out)
            shutil.rmtree(out)
            row[side] = {"device": device, "seconds": seconds, "media_items": len(codes[side]),
                         "items_per_s": len(codes[side]) / seconds, "torch_threads": threads_here}
        if "items_per_s" in row.get("cpu", {}) and "items_per_s" in row.get("device", {}):
            cpu, dev = codes["cpu"], codes["device"]
            if set(cpu) != set(dev):
                failures.append(f"e2e batch {batch}: the CPU and device runs wrote different codes members")
                continue
            equal = sum(int((cpu[k] == dev[k]).sum()) for k in cpu)
            total = sum(cpu[k].size for k in cpu)
            row["codes_agree"] = equal / total if total else float("nan")
            row["vs_cpu"] = row["device"]["items_per_s"] / row["cpu"]["items_per_s"]
            # tokenize-media runs with torch's default TF32 setting: these are the codes users get
            if not row["codes_agree"] >= AGREEMENT_MIN:
                failures.append(f"e2e batch {batch}: tokenize-media codes on {s.device} agree with the CPU's "
                                f"at {row['codes_agree']:.4%} < {AGREEMENT_MIN:.1%}")
            print(f"  tokenize-media ({'+'.join(kinds)}), batch {batch}: CPU {row['cpu']['items_per_s']:,.0f} "
                  f"items/s, {s.device} {row['device']['items_per_s']:,.0f} items/s ({row['vs_cpu']:.2f}x), "
                  f"codes agree {row['codes_agree']:.4%}", flush=True)
    shutil.rmtree(work)
    record.update(rows=rows, failures=failures)
    return record


# -------------------------------------------------------------------------------------- stage


def stage_tokenizers(s: Settings, deadline: Deadline) -> dict:
    """Encode throughput of the image and audio tokenizers, GPU vs all CPU cores, and the
    tokenize-media path end to end; fails when fp32 codes disagree with the CPU's."""
    sizes = _sizes(s.dry_run)
    if not s.dry_run:  # its own cap, within what gpu_bench leaves it
        left = deadline.left()
        deadline = Deadline(STAGE_CAP_S if left is None else min(left, STAGE_CAP_S))
    threads = cpu_threads()
    print(f"  media tokenizers: {UNTRAINED}", flush=True)
    out: dict = {"what": UNTRAINED, "weights": "untrained", "device": str(s.device), "cpu_threads": threads,
                 "torch_default_threads": torch.get_num_threads(), "agreement_min": AGREEMENT_MIN,
                 "timing": "items/s after 2 warm-up calls, CUDA-synchronized; GPU figures include the "
                           "host->device input and device->host codes copies unless marked on_device",
                 "sizes": sizes, "encode": {}}  # fmt: skip
    failures: list[str] = []
    for kind in ("image", "audio"):
        out["encode"][kind] = encode_rows(kind, s, deadline, sizes, threads)
        failures += out["encode"][kind].pop("failures")
    if deadline.passed():
        out["e2e"] = {"skipped": "stage time budget spent"}
    else:
        try:
            out["e2e"] = e2e_rows(s, deadline, sizes, threads, s.out_dir / "tokenizers")
            failures += out["e2e"].pop("failures")
        except ImportError as e:  # data_tools needs more packages than encoding; keep the encode rows
            out["e2e"] = {"error": f"cannot import {e.name}: {e}"}
            failures.append(f"e2e: cannot import {e.name} (data_tools needs it)")
    out["failures"] = failures
    return out


def summary_lines(results: dict[str, dict]) -> list[str]:
    """Rows of summary.md: GPU fp32 ÷ CPU items/s at the largest batch measured, per kind."""
    rec = results.get("tokenizers", {})
    if "encode" not in rec:
        return []
    lines = []
    for kind, entry in rec["encode"].items():
        done = [r for r in entry["rows"] if "items_per_s" in r.get("fp32", {})]
        if not done:
            lines.append(f"| tokenizers: {kind} encode ({rec['weights']} weights) | skipped or failed, see tokenizers.json |")
            continue
        r = done[-1]
        bf16 = r.get("bf16_autocast", {})
        bf16_text = (f"; bf16 {bf16['vs_cpu']:.2f}x, codes agree {bf16['codes_agree_with_cpu']:.2%}"
                     if "vs_cpu" in bf16 else "")
        lines.append(f"| tokenizers: {kind} encode, batch {r['batch']} ({rec['weights']} weights) | {rec['device']} fp32 "
                     f"{r['fp32']['items_per_s']:,.0f} items/s vs CPU ({rec['cpu_threads']} threads) "
                     f"{r['cpu_items_per_s']:,.0f}: {r['fp32']['vs_cpu']:.2f}x, codes agree "
                     f"{r['fp32']['codes_agree_with_cpu']:.4%}{bf16_text} |")
    for r in rec.get("e2e", {}).get("rows", []):
        if "vs_cpu" in r:
            lines.append(f"| tokenizers: tokenize-media ({'+'.join(rec['e2e']['kinds'])}), batch {r['batch_samples']} "
                         f"| {r['device']['items_per_s']:,.0f} vs {r['cpu']['items_per_s']:,.0f} media items/s: "
                         f"{r['vs_cpu']:.2f}x, codes agree {r['codes_agree']:.4%} |")
    return lines


def main(argv: list[str] | None = None) -> int:
    """This stage alone, through gpu_bench (its checks, JSON and summary)."""
    import gpu_bench

    args = list(sys.argv[1:] if argv is None else argv)
    return gpu_bench.main(args + ["--stages", "tokenizers"])


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # mmtrain from the checkout
    sys.exit(main())
