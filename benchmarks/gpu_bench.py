"""One-call GPU benchmark of mmtrain's kernels and training step (run it through benchmarks/gpu.sh).

    python3 benchmarks/gpu_bench.py OUT_DIR            # on one GPU, < 7 minutes on an H200
    python3 benchmarks/gpu_bench.py --dry-run OUT_DIR  # on CPU, Triton interpreter, tiny sizes

Stages, each writing OUT_DIR/<stage>.json as soon as it finishes (a failing stage records its
error and the script goes on):
    env            versions, device, and a bf16 matmul (8192^3) as the achievable-peak yardstick
    correctness    bf16 Triton kernels vs fp32 references on the GPU (max errors)
    attention      TFLOP/s vs PyTorch SDPA (flash and cuDNN backends), full rows
    doc_attention  document-masked packed rows vs FlexAttention with a document block mask
    rmsnorm        vs eager PyTorch and torch.compile
    cross_entropy  linear + cross-entropy vs eager PyTorch and torch.compile (time and memory)
    train          training step of the 125m and 1b presets: tokens/s and MFU
Last, OUT_DIR/summary.md: a short table with the ratios against the issue's goals, also printed.

FLOPs: attention forward 4·B·S²·H·D (halved when causal), backward 2.5x forward, so forward +
backward = 3.5x forward; document-masked rows count sum over documents of 4·L²·H·D (halved when
causal). Training: cfg.flops_per_token(S) = 6·N + 12·L·d·S per token. MFU is against 989 TFLOP/s
(H100/H200 dense bf16) and against the matmul measured in the env stage.

Only torch and Triton are needed; `mmtrain` is imported from the repository root (gpu.sh sets
PYTHONPATH). Only the train stage imports the model.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import platform
import random
import sys
import time
import traceback
import warnings
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

PEAK_BF16_TFLOPS = 989.0  # H100/H200 SXM dense bf16
# correctness stage: max error / max |fp32 reference| for outputs and gradients, absolute for the loss
CORRECTNESS_LIMITS = {"output": 2e-2, "gradient": 5e-2, "loss": 2e-2}
GOALS = {"attention_vs_flash": 1.2, "doc_attention_vs_flex": 1.3, "mfu_125m": 0.45, "mfu_1b": 0.55}


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
    norm_shapes: tuple[tuple[int, int], ...]
    ce_shapes: tuple[tuple[int, int, int], ...]  # (rows, dim, vocab)
    correctness_tokens: int
    correctness_attention: tuple[tuple[int, bool], ...]  # (head_dim, causal)
    train_presets: tuple[str, ...]
    train_tokens: int  # tokens per optimizer step
    train_steps: int
    compile_flex: bool
    stage_budget_s: dict[str, float]


def make_settings(out_dir: Path, dry_run: bool) -> Settings:
    if dry_run:
        return Settings(
            out_dir=out_dir, dry_run=True, device=torch.device("cpu"), dtype=torch.float32,
            matmul_size=256, attn_hidden=64, attn_head_dims=(32,), attn_tokens=128, attn_seq_lens=(64, 128),
            doc_tokens=192, doc_row_len=96, doc_len_ranges=((8, 48),), doc_gqa=2,
            norm_shapes=((64, 96),), ce_shapes=((64, 32, 300),), correctness_tokens=80,
            correctness_attention=((32, True), (16, False)),
            train_presets=("tiny",), train_tokens=128, train_steps=2,
            # compiled FlexAttention takes ~30 s to build on 2 CPU cores and has no CPU backward
            compile_flex=False,
            stage_budget_s={},
        )  # fmt: skip
    return Settings(
        out_dir=out_dir, dry_run=False, device=torch.device("cuda"), dtype=torch.bfloat16,
        # head dim 64 first: it is the presets' head dim, so it is measured even if time runs short
        matmul_size=8192, attn_hidden=2048, attn_head_dims=(64, 128), attn_tokens=16384,
        attn_seq_lens=(1024, 2048, 4096, 8192, 16384),
        doc_tokens=16384, doc_row_len=8192, doc_len_ranges=((32, 1024), (256, 8192)), doc_gqa=4,
        norm_shapes=((16384, 768), (16384, 2048)), ce_shapes=((16384, 768, 32768), (16384, 2048, 32768)),
        correctness_tokens=8192, correctness_attention=((128, True), (64, False), (64, True)),
        train_presets=("125m", "1b"), train_tokens=65536, train_steps=10,
        compile_flex=True,
        # Soft limits in seconds, checked between measurements, keeping the run under 7 minutes.
        stage_budget_s={"env": 15, "correctness": 35, "attention": 140, "doc_attention": 70, "rmsnorm": 20,
                        "cross_entropy": 30, "train": 70},
    )  # fmt: skip


# ------------------------------------------------------------------------------------------- helpers


class Deadline:
    def __init__(self, seconds: float | None):
        self.end = None if seconds is None else time.perf_counter() + seconds

    def passed(self) -> bool:
        return self.end is not None and time.perf_counter() > self.end


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


def run_stage(name: str, fn: Callable[[Settings, Deadline], dict], s: Settings) -> dict:
    print(f"[gpu_bench] stage {name} ...", flush=True)
    start = time.perf_counter()
    record: dict = {"stage": name}
    try:
        record.update(fn(s, Deadline(s.stage_budget_s.get(name))))
    except Exception:  # a stage failing must not stop the others; the error is in its JSON
        record["error"] = traceback.format_exc()
        print(record["error"], file=sys.stderr, flush=True)
    record["seconds"] = round(time.perf_counter() - start, 2)
    write_json(s.out_dir / f"{name}.json", record)
    print(f"[gpu_bench] stage {name} done in {record['seconds']} s -> {s.out_dir / (name + '.json')}", flush=True)
    return record


def _kernels():
    """mmtrain.kernels with the Triton backend forced (the interpreter in the dry run)."""
    from mmtrain import kernels

    kernels.set_backend("triton")
    return kernels


# -------------------------------------------------------------------------------------------- stages


def stage_env(s: Settings, deadline: Deadline) -> dict:
    import triton

    info = {
        "dry_run": s.dry_run, "python": platform.python_version(), "torch": torch.__version__,
        "triton": triton.__version__, "cuda": torch.version.cuda, "device": str(s.device),
        "dtype": str(s.dtype),
    }  # fmt: skip
    if s.device.type == "cuda":
        props = torch.cuda.get_device_properties(s.device)
        info.update(gpu=props.name, sm_count=props.multi_processor_count, memory_gb=round(props.total_memory / 2**30, 1))
    n = s.matmul_size
    a = torch.randn(n, n, device=s.device, dtype=s.dtype)
    b = torch.randn(n, n, device=s.device, dtype=s.dtype)
    ms = bench_ms(lambda: a @ b, s)
    info["matmul"] = {"size": n, "dtype": str(s.dtype), "ms": ms, "tflops": tflops(2 * n**3, ms)}
    return info


def stage_correctness(s: Settings, deadline: Deadline) -> dict:
    """The kernels in s.dtype against fp32 references on the same device."""
    from mmtrain.kernels import reference

    kernels = _kernels()
    gen = torch.Generator(device=s.device).manual_seed(0)
    rng = random.Random(0)
    out: dict = {"dtype": str(s.dtype), "reference_dtype": "float32"}

    # attention: packed random documents (incl. length 1), GQA 4, both head dims, causal and not
    n = s.correctness_tokens
    lens = [1] + random_doc_lens(rng, 1, n - 1, 1, max(2, n // 4))[0]
    cu = cu_seqlens_from(lens, s.device)
    for head_dim, causal in s.correctness_attention:
        heads = max(4, s.attn_hidden // head_dim)
        q, k, v = (
            torch.randn(n, h, head_dim, generator=gen, device=s.device, dtype=s.dtype).requires_grad_()
            for h in (heads, heads // 4, heads // 4)
        )
        do = torch.randn(n, heads, head_dim, generator=gen, device=s.device, dtype=s.dtype)
        o = kernels.attention(q, k, v, cu, causal=causal)
        grads = torch.autograd.grad(o, (q, k, v), do)
        q32, k32, v32 = (t.detach().float().requires_grad_() for t in (q, k, v))
        o32 = reference.attention(q32, k32, v32, cu, causal)
        grads32 = torch.autograd.grad(o32, (q32, k32, v32), do.float())
        out[f"attention_d{head_dim}_{'causal' if causal else 'full'}"] = {
            "tokens": n, "docs": len(lens), "heads": heads, "kv_heads": heads // 4,
            "out": max_err(o, o32), **{name: max_err(g, g32) for name, g, g32 in zip(("dq", "dk", "dv"), grads, grads32)},
        }  # fmt: skip

    # rmsnorm
    rows, dim = s.norm_shapes[-1]
    x = torch.randn(rows, dim, generator=gen, device=s.device, dtype=s.dtype).requires_grad_()
    w = (1 + 0.1 * torch.randn(dim, generator=gen, device=s.device)).to(s.dtype).requires_grad_()
    dy = torch.randn(rows, dim, generator=gen, device=s.device, dtype=s.dtype)
    y = kernels.rms_norm(x, w)
    dx, dw = torch.autograd.grad(y, (x, w), dy)
    x32, w32 = x.detach().float().requires_grad_(), w.detach().float().requires_grad_()
    y32 = reference.rms_norm(x32, w32)
    dx32, dw32 = torch.autograd.grad(y32, (x32, w32), dy.float())
    out["rms_norm"] = {"shape": [rows, dim], "out": max_err(y, y32), "dx": max_err(dx, dx32), "dw": max_err(dw, dw32)}

    # linear cross-entropy, 1/8 of the rows ignored
    rows, dim, vocab = s.ce_shapes[-1]
    rows = min(rows, 8192)
    h = torch.randn(rows, dim, generator=gen, device=s.device, dtype=s.dtype).requires_grad_()
    wv = (torch.randn(vocab, dim, generator=gen, device=s.device) / math.sqrt(dim)).to(s.dtype).requires_grad_()
    t = torch.randint(0, vocab, (rows,), generator=gen, device=s.device)
    t[::8] = -100
    loss = kernels.linear_cross_entropy(h, wv, t)
    dh, dwv = torch.autograd.grad(loss, (h, wv))
    h32, wv32 = h.detach().float().requires_grad_(), wv.detach().float().requires_grad_()
    loss32 = reference.linear_cross_entropy(h32, wv32, t)
    dh32, dwv32 = torch.autograd.grad(loss32, (h32, wv32))
    out["linear_cross_entropy"] = {
        "shape": [rows, dim, vocab], "loss": loss.item(), "loss_ref": loss32.item(),  # sync
        "loss_abs_err": abs(loss.item() - loss32.item()), "dhidden": max_err(dh, dh32), "dweight": max_err(dwv, dwv32),
    }  # fmt: skip

    # Pass/fail on error / max |reference|: a few bf16 roundings (2**-8 each) for outputs, more for
    # gradients, which go through two matmuls with rounded inputs.
    failures = []
    for op, metrics in out.items():
        for name, err in metrics.items() if isinstance(metrics, dict) else ():
            if isinstance(err, dict) and "max_rel_to_max" in err:
                limit = CORRECTNESS_LIMITS["output" if name in ("out", "dx") else "gradient"]
                if not err["max_rel_to_max"] <= limit:  # also catches nan
                    failures.append(f"{op}.{name}")
    if not out["linear_cross_entropy"]["loss_abs_err"] <= CORRECTNESS_LIMITS["loss"]:
        failures.append("linear_cross_entropy.loss")
    out["limits"] = CORRECTNESS_LIMITS
    out["failures"] = failures
    return out


def _attention_providers(causal: bool, max_seqlen: int, kernels) -> dict:
    """name -> setup(q_BHSD, k, v) -> (fn, inputs), fn(*inputs) -> output. Every provider gets the
    same data in its natural layout: packed [B·S, H, D] for ours, [B, H, S, D] for SDPA."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    def ours(q, k, v):
        B, H, S, D = q.shape
        packed = [t.transpose(1, 2).reshape(B * S, t.shape[1], D).contiguous() for t in (q, k, v)]
        cu = torch.arange(0, B * S + 1, S, dtype=torch.int32, device=q.device)
        return (lambda *qkv: kernels.attention(*qkv, cu, causal=causal, max_seqlen=max_seqlen)), packed

    def sdpa(backend):
        def fn(*qkv):
            with sdpa_kernel([backend]):
                return F.scaled_dot_product_attention(*qkv, is_causal=causal)

        return lambda q, k, v: (fn, [q, k, v])

    return {"triton": ours, "sdpa_flash": sdpa(SDPBackend.FLASH_ATTENTION), "sdpa_cudnn": sdpa(SDPBackend.CUDNN_ATTENTION)}


def _error(e: Exception) -> str:
    return f"{type(e).__name__}: {str(e)[:300]}"


def _time_fwd_and_fwdbwd(fn, inputs: list[torch.Tensor], s: Settings, flops_fwd: float) -> dict:
    """Forward (inputs without grad, under no_grad) and forward+backward times of fn(*inputs).
    A mode that fails (a backend without that kernel) records its error."""
    out: dict = {}
    plain = [t.detach() for t in inputs]
    try:
        with torch.no_grad():
            ms = bench_ms(lambda: fn(*plain), s)
        out.update(fwd_ms=ms, fwd_tflops=tflops(flops_fwd, ms))
    except Exception as e:
        out["fwd_error"] = _error(e)
    try:
        with_grad = [t.detach().requires_grad_() for t in inputs]
        grad_out = torch.randn_like(fn(*plain))
        ms = bench_ms(lambda: torch.autograd.grad(fn(*with_grad), with_grad, grad_out), s)
        out.update(fwdbwd_ms=ms, fwdbwd_tflops=tflops(3.5 * flops_fwd, ms))
    except Exception as e:
        out["fwdbwd_error"] = _error(e)
    return out


def _add_speedups(row: dict, base: str) -> None:
    """row["speedup_vs_<base>"][mode] = base time / our time, for the modes both measured."""
    for mode in ("fwd", "fwdbwd"):
        if f"{mode}_ms" in row.get("triton", {}) and f"{mode}_ms" in row.get(base, {}):
            row.setdefault(f"speedup_vs_{base}", {})[mode] = row[base][f"{mode}_ms"] / row["triton"][f"{mode}_ms"]


def stage_attention(s: Settings, deadline: Deadline) -> dict:
    kernels = _kernels()
    rows = []
    for head_dim in s.attn_head_dims:
        heads = s.attn_hidden // head_dim
        for seq in s.attn_seq_lens:
            batch = s.attn_tokens // seq
            for causal in (True, False):
                row: dict = {"head_dim": head_dim, "heads": heads, "seq_len": seq, "batch": batch, "causal": causal}
                rows.append(row)
                if deadline.passed():
                    row["skipped"] = "stage time budget spent"
                    continue
                flops_fwd = 4 * batch * seq * seq * heads * head_dim / (2 if causal else 1)
                q, k, v = (torch.randn(batch, heads, seq, head_dim, device=s.device, dtype=s.dtype) for _ in range(3))
                for name, setup in _attention_providers(causal, seq, kernels).items():
                    row[name] = _time_fwd_and_fwdbwd(*setup(q, k, v), s, flops_fwd)
                for base in ("sdpa_flash", "sdpa_cudnn"):
                    _add_speedups(row, base)
                print(f"  attention {_fmt_row(row)}", flush=True)
    return {"dtype": str(s.dtype), "flops": "fwd 4*B*S^2*H*D (/2 causal); fwd+bwd 3.5x fwd", "rows": rows}


def _fmt_row(row: dict) -> str:
    parts = [f"D={row['head_dim']} S={row['seq_len']} causal={row['causal']}"]
    for name in ("triton", "sdpa_flash", "sdpa_cudnn", "flex"):
        if "fwdbwd_tflops" in row.get(name, {}):
            parts.append(f"{name} {row[name].get('fwd_tflops', float('nan')):.3g}/{row[name]['fwdbwd_tflops']:.3g}")
        elif "fwd_tflops" in row.get(name, {}):
            parts.append(f"{name} {row[name]['fwd_tflops']:.3g}/-")
    parts.append("TFLOP/s fwd/fwdbwd")
    return "  ".join(parts)


def stage_doc_attention(s: Settings, deadline: Deadline) -> dict:
    """Packed rows of random-length documents: ours (cu_seqlens) vs FlexAttention with a document
    block mask (built once per batch, outside the timing, as a training step would)."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    kernels = _kernels()
    # dynamic=False: one compiled graph per head dim; the block mask is a runtime input.
    flex = torch.compile(flex_attention, dynamic=False) if s.compile_flex else flex_attention
    rng = random.Random(0)
    N = s.doc_tokens
    # One mask_mod for the whole stage reading a buffer refilled per batch, as a training loop
    # would do: a new Python closure per batch could make the compiled FlexAttention recompile.
    doc_id_N = torch.zeros(N, dtype=torch.long, device=s.device)

    def mask_mod(b, h, q_idx, kv_idx):
        return (doc_id_N[q_idx] == doc_id_N[kv_idx]) & (q_idx >= kv_idx)

    results = []
    for head_dim in s.attn_head_dims:
        heads = s.attn_hidden // head_dim
        kv_heads = heads // s.doc_gqa
        for lo, hi in s.doc_len_ranges:
            for causal in (True,):  # the model's case (mask_mod is causal)
                doc_lens = random_doc_lens(rng, s.doc_tokens // s.doc_row_len, s.doc_row_len, lo, hi)
                lens = [n for row in doc_lens for n in row]
                row: dict = {
                    "head_dim": head_dim, "heads": heads, "kv_heads": kv_heads, "tokens": s.doc_tokens,
                    "row_len": s.doc_row_len, "doc_len_range": [lo, hi], "docs": len(lens), "causal": causal,
                    "seq_len": s.doc_row_len, "flex_compiled": s.compile_flex,
                }  # fmt: skip
                results.append(row)
                if deadline.passed():
                    row["skipped"] = "stage time budget spent"
                    continue
                flops_fwd = sum(4 * n * n * heads * head_dim for n in lens) / (2 if causal else 1)
                cu = cu_seqlens_from(lens, s.device)
                q, k, v = (torch.randn(N, h, head_dim, device=s.device, dtype=s.dtype) for h in (heads, kv_heads, kv_heads))

                block_mask = create_block_mask(mask_mod, None, None, N, N, device=str(s.device))
                ours = lambda *qkv: kernels.attention(*qkv, cu, causal=causal, max_seqlen=max(lens))  # noqa: E731
                flex_in = [t.transpose(0, 1).unsqueeze(0).contiguous() for t in (q, k, v)]  # [1, heads, N, D]
                flex_fn = lambda *qkv: flex(*qkv, block_mask=block_mask, enable_gqa=kv_heads != heads)  # noqa: E731
                row["triton"] = _time_fwd_and_fwdbwd(ours, [q, k, v], s, flops_fwd)
                # FlexAttention has no CPU backward: the dry run records that error for fwdbwd.
                row["flex"] = _time_fwd_and_fwdbwd(flex_fn, flex_in, s, flops_fwd)
                with torch.no_grad():  # the two must agree, or the timing means nothing
                    o_flex_1HND = flex_fn(*flex_in)
                    row["max_abs_diff_vs_flex"] = max_err(ours(q, k, v), o_flex_1HND[0].transpose(0, 1))["max_abs"]
                _add_speedups(row, "flex")
                print(f"  doc_attention docs={len(lens)} {_fmt_row(row)}", flush=True)
    return {"dtype": str(s.dtype), "flops": "sum over docs of 4*L^2*H*D (/2 causal); fwd+bwd 3.5x fwd", "rows": results}


def stage_rmsnorm(s: Settings, deadline: Deadline) -> dict:
    from mmtrain.kernels import reference

    kernels = _kernels()
    providers = {
        "triton": kernels.rms_norm, "eager": reference.rms_norm,
        "compiled": torch.compile(reference.rms_norm, dynamic=False),
    }  # fmt: skip
    results = []
    for rows, dim in s.norm_shapes:
        row: dict = {"shape": [rows, dim]}
        results.append(row)
        if deadline.passed():
            row["skipped"] = "stage time budget spent"
            continue
        x = torch.randn(rows, dim, device=s.device, dtype=s.dtype)
        w = torch.ones(dim, device=s.device, dtype=s.dtype)
        dy = torch.randn_like(x)
        nbytes = x.numel() * x.element_size()
        for name, fn in providers.items():
            if deadline.passed():
                row[name] = {"skipped": "stage time budget spent"}
                continue
            try:
                xg, wg = x.clone().requires_grad_(), w.clone().requires_grad_()
                with torch.no_grad():
                    fwd_ms = bench_ms(lambda: fn(x, w), s)
                fb_ms = bench_ms(lambda: torch.autograd.grad(fn(xg, wg), (xg, wg), dy), s)
                # bytes moved: fwd reads x, writes y; bwd reads x, dy, writes dx
                row[name] = {"fwd_ms": fwd_ms, "fwd_gbps": 2 * nbytes / fwd_ms / 1e6,
                             "fwdbwd_ms": fb_ms, "fwdbwd_gbps": 5 * nbytes / fb_ms / 1e6}  # fmt: skip
            except Exception as e:
                row[name] = {"error": _error(e)}
        for base in ("eager", "compiled"):
            _add_speedups(row, base)
    return {"dtype": str(s.dtype), "rows": results}


def _dense_linear_ce(hidden, weight, targets):
    """What a model without the fused kernel does: full logits, upcast to fp32, cross-entropy."""
    return F.cross_entropy((hidden @ weight.T).float(), targets, ignore_index=-100)


def stage_cross_entropy(s: Settings, deadline: Deadline) -> dict:
    kernels = _kernels()
    providers = {
        "triton": kernels.linear_cross_entropy, "eager": _dense_linear_ce,
        "compiled": torch.compile(_dense_linear_ce, dynamic=False),
    }  # fmt: skip
    results = []
    for rows, dim, vocab in s.ce_shapes:
        row: dict = {"rows": rows, "dim": dim, "vocab": vocab}
        results.append(row)
        if deadline.passed():
            row["skipped"] = "stage time budget spent"
            continue
        h = torch.randn(rows, dim, device=s.device, dtype=s.dtype)
        w = (torch.randn(vocab, dim, device=s.device) / math.sqrt(dim)).to(s.dtype)
        t = torch.randint(0, vocab, (rows,), device=s.device)
        t[::8] = -100
        flops_fb = 6 * rows * dim * vocab  # logits matmul forward + its two backward matmuls
        for name, fn in providers.items():
            if deadline.passed():
                row[name] = {"skipped": "stage time budget spent"}
                continue
            try:
                hg, wg = h.clone().requires_grad_(), w.clone().requires_grad_()
                step = lambda: torch.autograd.grad(fn(hg, wg, t), (hg, wg))  # noqa: E731
                fb_ms = bench_ms(step, s)
                row[name] = {"fwdbwd_ms": fb_ms, "fwdbwd_tflops": tflops(flops_fb, fb_ms),
                             "peak_memory_mb": peak_memory_mb(step, s)}  # fmt: skip
            except Exception as e:
                row[name] = {"error": _error(e)}
        for base in ("eager", "compiled"):
            _add_speedups(row, base)
    return {"dtype": str(s.dtype), "flops": "6*rows*dim*vocab per fwd+bwd", "rows": results}


def _train_config(name: str, s: Settings):
    from mmtrain.model import preset

    cfg = preset(name)
    changes = {"kernels": "triton"}
    if s.dry_run:  # a one-layer miniature of the tiny preset: the interpreter is slow
        changes.update(dim=64, n_layers=1, n_heads=2, n_kv_heads=1, max_seq_len=64)
    return dataclasses.replace(cfg, **changes)


def stage_train(s: Settings, deadline: Deadline) -> dict:
    """Whole training steps (forward, backward, AdamW) of model presets on one device: model and
    optimizer state in bf16 (model.to(bfloat16), torch.optim.AdamW(fused=True)), no fp32 master
    weights, Triton kernels forced, packed rows of random-length documents."""
    from mmtrain.data.batch import text_batch
    from mmtrain.model import FusionTransformer

    kernels = _kernels()
    env = json.loads((s.out_dir / "env.json").read_text()) if (s.out_dir / "env.json").exists() else {}
    matmul_tflops = env.get("matmul", {}).get("tflops")
    rng = random.Random(0)
    results = {"precision": f"params, grads and AdamW state in {s.dtype}; fused AdamW on CUDA", "presets": {}}
    for name in s.train_presets:
        entry: dict = {}
        results["presets"][name] = entry
        if deadline.passed():
            entry["skipped"] = "stage time budget spent"
            continue
        try:
            cfg = _train_config(name, s)
            seq = cfg.max_seq_len
            rows = max(1, s.train_tokens // seq)
            torch.manual_seed(0)
            model = FusionTransformer(cfg).to(device=s.device, dtype=s.dtype)
            opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=s.device.type == "cuda")
            batches = []
            for _ in range(2):
                doc_lens = random_doc_lens(rng, rows, seq, 16, seq)
                tokens = torch.randint(0, cfg.vocab_size, (rows, seq))
                batches.append(text_batch(tokens, doc_lens).to(s.device))
            entry.update(dim=cfg.dim, n_layers=cfg.n_layers, n_heads=cfg.n_heads, n_kv_heads=cfg.n_kv_heads,
                         vocab_size=cfg.vocab_size, seq_len=seq, rows=rows, tokens_per_step=rows * seq,
                         params=sum(p.numel() for p in model.parameters()),
                         flops_per_token=cfg.flops_per_token(seq))  # fmt: skip

            losses = []

            def step(i: int) -> None:
                loss = model(batches[i % 2])
                loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
                losses.append(loss.detach())

            warmup = 1 if s.dry_run else 3  # the first steps autotune and allocate
            for i in range(warmup):
                step(i)
            sync(s)
            if s.device.type == "cuda":
                torch.cuda.reset_peak_memory_stats()
            start = time.perf_counter()
            for i in range(s.train_steps):
                step(i)
            sync(s)
            elapsed = time.perf_counter() - start
            tokens_per_s = rows * seq * s.train_steps / elapsed
            achieved = tokens_per_s * cfg.flops_per_token(seq) / 1e12
            entry.update(
                step_ms=elapsed / s.train_steps * 1e3, tokens_per_s=tokens_per_s, achieved_tflops=achieved,
                mfu_vs_989=achieved / PEAK_BF16_TFLOPS,
                mfu_vs_matmul=achieved / matmul_tflops if matmul_tflops else None,
                losses=[x.item() for x in losses],  # sync
                peak_memory_gb=torch.cuda.max_memory_allocated() / 2**30 if s.device.type == "cuda" else None,
            )  # fmt: skip
            print(f"  train {name}: {tokens_per_s:,.0f} tokens/s, MFU {entry['mfu_vs_989']:.1%} of 989 TF/s", flush=True)
            del model, opt, batches
            if s.device.type == "cuda":
                torch.cuda.empty_cache()
        except Exception:  # e.g. the model package is not importable yet: record and go on
            entry["error"] = traceback.format_exc()
    return results


# ------------------------------------------------------------------------------------------- summary


def _ratio_cell(values: list[float], goal: float | None) -> str:
    if not values:
        return "n/a"
    text = f"min {min(values):.2f}x, mean {sum(values) / len(values):.2f}x"
    if goal is not None:
        text += f" (goal >= {goal}x: {'met' if min(values) >= goal else 'NOT met'})"
    return text


def summarize(results: dict[str, dict], long_seq: int = 2048) -> str:
    """The table of summary.md; attention ratios are taken over rows with seq_len >= long_seq."""
    lines = ["# GPU benchmark summary", "", "| measure | result |", "|---|---|"]
    env = results.get("env", {})
    if "matmul" in env:
        m = env["matmul"]
        lines.append(f"| device | {env.get('gpu', env.get('device'))}, torch {env['torch']}, triton {env['triton']} |")
        lines.append(f"| matmul {m['size']}^3 {m['dtype']} | {m['tflops']:.3g} TFLOP/s |")

    corr = results.get("correctness", {})
    worst = {}
    for key, val in corr.items():
        if isinstance(val, dict):
            for name, err in val.items():
                if isinstance(err, dict) and "max_rel_to_max" in err:
                    worst[f"{key}.{name}"] = err["max_rel_to_max"]
    if worst:
        name, err = max(worst.items(), key=lambda kv: kv[1])
        lines.append(f"| correctness (max error / max ref, worst) | {err:.2e} at {name} |")
    if "failures" in corr:
        verdict = "all within limits" if not corr["failures"] else "OUTSIDE limits: " + ", ".join(corr["failures"])
        lines.append(f"| correctness vs fp32 reference | {verdict} |")

    attn_rows = [r for r in results.get("attention", {}).get("rows", []) if "speedup_vs_sdpa_flash" in r]
    for mode in ("fwd", "fwdbwd"):
        long_rows = [r["speedup_vs_sdpa_flash"][mode] for r in attn_rows
                     if r["seq_len"] >= long_seq and mode in r["speedup_vs_sdpa_flash"]]  # fmt: skip
        goal = GOALS["attention_vs_flash"] if mode == "fwdbwd" else None
        lines.append(f"| attention {mode} vs SDPA-flash, S >= {long_seq} | {_ratio_cell(long_rows, goal)} |")
    cudnn = [r["speedup_vs_sdpa_cudnn"]["fwdbwd"] for r in results.get("attention", {}).get("rows", [])
             if "fwdbwd" in r.get("speedup_vs_sdpa_cudnn", {}) and r["seq_len"] >= long_seq]  # fmt: skip
    lines.append(f"| attention fwdbwd vs SDPA-cuDNN, S >= {long_seq} | {_ratio_cell(cudnn, None)} |")
    best = [r["triton"]["fwdbwd_tflops"] for r in attn_rows if "fwdbwd_tflops" in r.get("triton", {})]
    if best:
        lines.append(f"| attention fwdbwd, best | {max(best):.3g} TFLOP/s |")

    doc_rows = results.get("doc_attention", {}).get("rows", [])
    for mode in ("fwd", "fwdbwd"):
        vals = [r["speedup_vs_flex"][mode] for r in doc_rows if mode in r.get("speedup_vs_flex", {})]
        goal = GOALS["doc_attention_vs_flex"] if mode == "fwdbwd" else None
        lines.append(f"| document-masked {mode} vs FlexAttention | {_ratio_cell(vals, goal)} |")

    for stage, label in (("rmsnorm", "RMSNorm fwdbwd"), ("cross_entropy", "linear cross-entropy fwdbwd")):
        for base in ("eager", "compiled"):
            vals = [r[f"speedup_vs_{base}"]["fwdbwd"] for r in results.get(stage, {}).get("rows", [])
                    if "fwdbwd" in r.get(f"speedup_vs_{base}", {})]  # fmt: skip
            lines.append(f"| {label} vs {base} | {_ratio_cell(vals, None)} |")

    for name, entry in results.get("train", {}).get("presets", {}).items():
        if "mfu_vs_989" in entry:
            goal = GOALS.get(f"mfu_{name}")
            vs_mm = f", {entry['mfu_vs_matmul']:.1%} of measured matmul" if entry.get("mfu_vs_matmul") else ""
            met = f" (goal >= {goal:.0%}: {'met' if entry['mfu_vs_989'] >= goal else 'NOT met'})" if goal else ""
            lines.append(
                f"| train {name} | {entry['tokens_per_s']:,.0f} tokens/s, MFU {entry['mfu_vs_989']:.1%} of 989 TFLOP/s"
                f"{vs_mm}{met} |"
            )
        else:
            lines.append(f"| train {name} | failed or skipped, see train.json |")

    failed = [name for name, rec in results.items() if "error" in rec]
    if failed:
        lines.append(f"| stages that failed | {', '.join(failed)} (see their JSON) |")
    lines.append(f"| total time | {sum(rec.get('seconds', 0) for rec in results.values()):.0f} s |")
    return "\n".join(lines) + "\n"


STAGES: list[tuple[str, Callable[[Settings, Deadline], dict]]] = [
    ("env", stage_env),
    ("correctness", stage_correctness),
    ("attention", stage_attention),
    ("doc_attention", stage_doc_attention),
    ("rmsnorm", stage_rmsnorm),
    ("cross_entropy", stage_cross_entropy),
    ("train", stage_train),
]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--dry-run", action="store_true", help="CPU, Triton interpreter, tiny sizes")
    parser.add_argument("--stages", default=",".join(name for name, _ in STAGES), help="comma-separated subset")
    args = parser.parse_args(argv)
    if args.dry_run and os.environ.get("TRITON_INTERPRET") != "1":
        if "triton" in sys.modules:
            parser.error("--dry-run needs TRITON_INTERPRET=1 set before Triton is imported (gpu.sh does it)")
        os.environ["TRITON_INTERPRET"] = "1"
    if not args.dry_run and not torch.cuda.is_available():
        parser.error("no CUDA device; use --dry-run to exercise the script on CPU")
    if args.dry_run:  # FlexAttention warns when not compiled; the dry run does that on purpose
        warnings.filterwarnings("ignore", message="flex_attention called without torch.compile")
    args.out_dir.mkdir(parents=True, exist_ok=True)
    s = make_settings(args.out_dir, args.dry_run)
    wanted = set(args.stages.split(","))
    results = {name: run_stage(name, fn, s) for name, fn in STAGES if name in wanted}
    # the dry run's sequences are tiny: take its ratios over all of them
    summary = summarize(results, long_seq=0 if s.dry_run else 2048)
    (args.out_dir / "summary.md").write_text(summary)
    print("\n" + summary, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
