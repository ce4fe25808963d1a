"""Settings and helpers shared by the GPU benchmark's stages (benchmarks/gpu_bench.py runs them)."""

from __future__ import annotations

import dataclasses
import json
import random
import time
from pathlib import Path
from typing import Callable

import torch

PEAK_BF16_TFLOPS = 989.0  # H100/H200 SXM dense bf16


@dataclasses.dataclass(frozen=True, kw_only=True)
class E2ERun:
    """One `mmtrain train` run of the e2e stage: a recipe, a ZeRO stage, steps before and after
    the resume."""

    name: str
    config: str  # path relative to the repository root
    preset: str  # the pure-loop `train` stage entry it is compared with
    zero_stage: int
    first_steps: int  # steps of the first invocation (checkpointed at its end)
    total_steps: int  # the resumed invocation trains to here
    overrides: tuple[str, ...] = ()
    compare_with: str | None = None  # another run's name: report this run's tokens/s relative to it


@dataclasses.dataclass(frozen=True, kw_only=True)
class Settings:
    """Sizes for one run; dry_run shrinks everything to run on CPU under the interpreter."""

    out_dir: Path
    dry_run: bool
    device: torch.device
    dtype: torch.dtype  # the kernels' dtype: bf16 on GPU, fp32 in the dry run
    matmul_size: int
    attn_hidden: int  # H = attn_hidden / D
    attn_head_dims: tuple[int, ...]
    attn_tokens: int  # B·S
    attn_seq_lens: tuple[int, ...]
    doc_tokens: int  # packed tokens of the document-masked benchmark
    doc_row_len: int
    doc_len_ranges: tuple[tuple[int, int], ...]  # uniform document lengths per distribution
    doc_gqa: int
    dispatch_cases: tuple[tuple[str, int, int, int, int, tuple[int, int] | None], ...]
    #                 (label, heads, kv_heads, head_dim, row_len, doc length range or None = dense)
    dispatch_tokens: int
    norm_shapes: tuple[tuple[int, int], ...]
    ce_shapes: tuple[tuple[int, int, int], ...]  # (rows, dim, vocab)
    correctness_tokens: int
    correctness_attention: tuple[tuple[int, bool], ...]  # (head_dim, causal)
    train_presets: tuple[str, ...]
    train_tokens: int  # tokens per optimizer step
    train_steps: int
    compile_flex: bool
    e2e_runs: tuple[E2ERun, ...]
    e2e_synth_samples: int
    e2e_common: tuple[str, ...]  # --set overrides for every e2e run
    e2e_warmup_steps: int  # steps left out of the steady-state figures at the start of each invocation
    stage_budget_s: dict[str, float]
    total_budget_s: float | None  # no stage's budget reaches past this many seconds from the start


# e2e: the recipes as they are (micro-batch, seq_len, workers, precision, activation checkpointing,
# overlap_comm, fp32 gradient accumulation), on one GPU, with shorter runs and 64k tokens per
# optimizer step (4 micro-batches; the recipes' 0.5M-4M token global batches would take 32-256
# micro-batches per step on one GPU), the pure loop's tokens per step. Steady-state figures skip the
# first steps of each invocation.
_GPU_BATCH = ("engine.global_batch_tokens=65536",)
_GPU_E2E = (
    E2ERun(name="125m-zero2", config="configs/125m.yaml", preset="125m", zero_stage=2, first_steps=10, total_steps=20,
           overrides=_GPU_BATCH),
    E2ERun(name="1b-zero2", config="configs/1b.yaml", preset="1b", zero_stage=2, first_steps=8, total_steps=14,
           overrides=_GPU_BATCH),
    E2ERun(name="1b-zero3", config="configs/1b.yaml", preset="1b", zero_stage=3, first_steps=8, total_steps=14,
           overrides=_GPU_BATCH),
    # train.compile's effect; last, so it runs only when the budget allows (or alone: --e2e-runs)
    E2ERun(name="125m-zero2-compile", config="configs/125m.yaml", preset="125m", zero_stage=2, first_steps=10,
           total_steps=20, overrides=_GPU_BATCH + ("train.compile=true",), compare_with="125m-zero2"),
)  # fmt: skip
_DRY_E2E = (
    E2ERun(name="tiny-zero2", config="configs/tiny.yaml", preset="tiny", zero_stage=2, first_steps=2, total_steps=3,
           overrides=("model.dim=64", "model.n_layers=1", "model.n_heads=2", "model.n_kv_heads=1",
                      "data.seq_len=128", "data.micro_batch_size=2", "data.num_streams=2", "data.num_workers=0",
                      "launch.device=cpu", "engine.precision=fp32")),
)  # fmt: skip


def make_settings(out_dir: Path, dry_run: bool) -> Settings:
    # Without media generation (what configs/tiny.yaml turns on): these runs measure the trainer's
    # throughput, and encoding audio on the fly needs librosa, too big to carry to the GPU image.
    e2e_common = ("launch.nproc=1", "data.tokenizer=bytes", "train.log_every=1", "train.eval_every=0",
                  "train.eval_batches=0", "engine.warmup_steps=2", 'data.image_tokenizer=""',
                  'data.audio_tokenizer=""', "model.image_codes=0", "model.audio_codes=0")  # fmt: skip
    if dry_run:
        return Settings(
            out_dir=out_dir, dry_run=True, device=torch.device("cpu"), dtype=torch.float32,
            matmul_size=256, attn_hidden=64, attn_head_dims=(32,), attn_tokens=128, attn_seq_lens=(64, 128),
            doc_tokens=192, doc_row_len=96, doc_len_ranges=((8, 48),), doc_gqa=2,
            dispatch_cases=(("dense", 4, 2, 16, 64, None), ("packed", 4, 2, 16, 64, (8, 40))), dispatch_tokens=128,
            norm_shapes=((64, 96),), ce_shapes=((64, 32, 300),), correctness_tokens=80,
            correctness_attention=((32, True), (16, False)),
            train_presets=("tiny",), train_tokens=128, train_steps=2,
            # compiled FlexAttention takes ~30 s to build on 2 CPU cores and has no CPU backward
            compile_flex=False,
            e2e_runs=_DRY_E2E, e2e_synth_samples=60, e2e_common=e2e_common, e2e_warmup_steps=1,
            stage_budget_s={}, total_budget_s=None,
        )  # fmt: skip
    return Settings(
        out_dir=out_dir, dry_run=False, device=torch.device("cuda"), dtype=torch.bfloat16,
        # head dim 64 first: it is the presets' head dim, so it is measured even if time runs short
        matmul_size=8192, attn_hidden=2048, attn_head_dims=(64, 128), attn_tokens=16384,
        attn_seq_lens=(1024, 2048, 4096, 8192, 16384),
        doc_tokens=16384, doc_row_len=8192, doc_len_ranges=((32, 1024), (256, 8192)), doc_gqa=4,
        # the presets' attention shapes: 125m H=12 K=4 D=64 rows of 2048, 1b H=32 K=8 D=64 rows of 4096
        dispatch_cases=(("125m dense", 12, 4, 64, 2048, None), ("125m packed", 12, 4, 64, 2048, (32, 1024)),
                        ("1b dense", 32, 8, 64, 4096, None), ("1b packed short", 32, 8, 64, 4096, (32, 1024)),
                        ("1b packed long", 32, 8, 64, 4096, (256, 4096))),
        dispatch_tokens=16384,
        norm_shapes=((16384, 768), (16384, 2048)), ce_shapes=((16384, 768, 32768), (16384, 2048, 32768)),
        correctness_tokens=8192, correctness_attention=((128, True), (64, False), (64, True)),
        train_presets=("125m", "1b"), train_tokens=65536, train_steps=10,
        compile_flex=True,
        e2e_runs=_GPU_E2E, e2e_synth_samples=4000, e2e_common=e2e_common, e2e_warmup_steps=2,
        # Soft limits in seconds, checked between measurements; with the total (570 s) they keep the
        # whole script under 10 minutes (e2e stops a run in flight 30 s past its budget).
        stage_budget_s={"env": 15, "correctness": 35, "attention": 110, "doc_attention": 60, "dispatch": 30,
                        "rmsnorm": 20, "cross_entropy": 30, "train": 60, "e2e": 330},
        total_budget_s=570,
    )  # fmt: skip


# ------------------------------------------------------------------------------------------- helpers


class Deadline:
    def __init__(self, seconds: float | None):
        self.end = None if seconds is None else time.perf_counter() + seconds

    def passed(self) -> bool:
        return self.end is not None and time.perf_counter() > self.end

    def left(self) -> float | None:
        return None if self.end is None else self.end - time.perf_counter()


def sync(s: Settings) -> None:
    if s.device.type == "cuda":
        torch.cuda.synchronize()


def bench_ms(fn: Callable[[], object], s: Settings) -> float:
    """Median time of fn in ms: triton.testing.do_bench (CUDA events, L2 flushed) on GPU,
    time.perf_counter over one call after a warm-up in the dry run."""
    if s.dry_run:
        fn()  # warm-up (first call compiles / autotunes)
        start = time.perf_counter()
        fn()
        return (time.perf_counter() - start) * 1e3
    from triton.testing import do_bench

    return do_bench(fn, warmup=25, rep=100, return_mode="median")


def peak_memory_mb(fn: Callable[[], object], s: Settings) -> float | None:
    """Peak memory allocated during one call, above what was allocated before it."""
    if s.device.type != "cuda":
        return None
    sync(s)
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    fn()
    sync(s)
    return (torch.cuda.max_memory_allocated() - before) / 2**20


def tflops(flops: float, ms: float) -> float:
    return flops / (ms * 1e-3) / 1e12


def max_err(got: torch.Tensor, want: torch.Tensor) -> dict[str, float]:
    """Max absolute error, and the same divided by max |want| (scale-free)."""
    diff = (got.float() - want.float()).abs().max().item()  # sync
    scale = want.float().abs().max().item()  # sync
    return {"max_abs": diff, "max_rel_to_max": diff / scale if scale else float("nan")}


def cu_seqlens_from(lens: list[int], device: torch.device) -> torch.Tensor:
    bounds = [0]
    for n in lens:
        bounds.append(bounds[-1] + n)
    return torch.tensor(bounds, dtype=torch.int32, device=device)


def random_doc_lens(rng: random.Random, rows: int, row_len: int, lo: int, hi: int) -> list[list[int]]:
    """Per row, uniform document lengths in [lo, hi], the last one cut to fill the row exactly."""
    out = []
    for _ in range(rows):
        lens, left = [], row_len
        while left > 0:
            n = min(left, rng.randint(lo, hi))
            lens.append(n)
            left -= n
        out.append(lens)
    return out


def write_json(path: Path, record: dict) -> None:
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(record, indent=2, default=str) + "\n")
    tmp.replace(path)


def error_text(e: Exception) -> str:
    return f"{type(e).__name__}: {str(e)[:300]}"


def kernels_forced_triton():
    """mmtrain.kernels with the Triton backend forced (the interpreter in the dry run)."""
    from mmtrain import kernels

    kernels.set_backend("triton")
    return kernels


def tolerance_text() -> str:
    """The comparison rule and its per-dtype limits, for the stages' JSON and the summary."""
    from mmtrain.kernels.autotune import GRAD_FACTOR, TOLERANCES

    limits = ", ".join(f"{str(d).removeprefix('torch.')} atol {a:g} rtol {r:g}" for d, (a, r) in TOLERANCES.items())
    return (f"max abs(got - fp32 reference) <= atol + rtol * max abs(reference) ({limits}); "
            f"gradients x{GRAD_FACTOR:g}")
