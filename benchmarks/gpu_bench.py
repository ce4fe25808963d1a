"""One-call GPU benchmark of mmtrain's kernels and training (run it through benchmarks/gpu.sh).

    python3 benchmarks/gpu_bench.py OUT_DIR            # on one GPU, < 10 minutes on an H200
    python3 benchmarks/gpu_bench.py --dry-run OUT_DIR  # on CPU, Triton interpreter, tiny sizes

Stages, each writing OUT_DIR/<stage>.json as soon as it finishes (a failing stage records its
error and the script goes on; the exit status is 1 if any stage failed):
    env            versions, device, and a bf16 matmul (8192^3) as the achievable-peak yardstick
    correctness    bf16 Triton kernels vs fp32 references on the GPU (max errors, limits)
    attention      full rows: TFLOP/s vs PyTorch SDPA (flash and cuDNN backends)   [gpu_attention.py]
    doc_attention  packed documents vs varlen_attn and FlexAttention (document mask) [gpu_attention.py]
    dispatch       the `auto` attention dispatch's choice per preset shape           [gpu_attention.py]
    rmsnorm        vs eager PyTorch and torch.compile
    cross_entropy  linear + cross-entropy vs eager PyTorch and torch.compile (time and memory)
    train          pure bf16 loop (no DeepSpeed, no loader, text-only) -- upper bound: tokens/s, MFU
    e2e            `mmtrain train` with DeepSpeed and the real loader, resumed once   [gpu_e2e.py]
    tokenizers     media tokenizers' encode items/s vs all CPU cores (untrained)  [gpu_tokenizers.py]
Last, OUT_DIR/summary.md: a short table with the ratios against the goals, also printed.

Every stage that compares outputs fails when one is outside the stated tolerance (attention:
mmtrain.kernels.autotune.TOLERANCES, per dtype; others: CORRECTNESS_LIMITS).

FLOPs: attention forward 4·B·S²·H·D (halved when causal), backward 2.5x forward, so forward +
backward = 3.5x forward; document-masked rows count sum over documents of 4·L²·H·D (halved when
causal). Training: cfg.flops_per_token(S) = 6·N + 12·L·d·S per token. MFU is against 989 TFLOP/s
(H100/H200 dense bf16) and against the matmul measured in the env stage.

`mmtrain` is imported from the repository root (gpu.sh sets PYTHONPATH); the kernel stages need
only torch and Triton, the train stage the model package, the e2e stage everything `mmtrain train`
needs (gpu.sh checks those imports first).
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

from gpu_attention import add_speedups, stage_attention, stage_dispatch, stage_doc_attention
from gpu_common import (PEAK_BF16_TFLOPS, Deadline, Settings, bench_ms, cu_seqlens_from, error_text,
                        kernels_forced_triton, make_settings, max_err, peak_memory_mb, random_doc_lens, sync,
                        tflops, tolerance_text, write_json)
from gpu_e2e import stage_e2e
from gpu_e2e import summary_lines as e2e_summary_lines
from gpu_requirements import check as check_requirements
from gpu_tokenizers import stage_tokenizers
from gpu_tokenizers import summary_lines as tokenizers_summary_lines

# correctness, rmsnorm and cross_entropy stages: max error / max |fp32 reference| for outputs and
# gradients, absolute for the loss
CORRECTNESS_LIMITS = {"output": 2e-2, "gradient": 5e-2, "loss": 2e-2}
GOALS = {"attention_vs_flash": 1.2, "doc_attention_vs_flex": 1.3, "mfu_125m": 0.45, "mfu_1b": 0.55}
PURE_LOOP = "pure bf16 loop (no DeepSpeed, no loader, text-only) -- upper bound"


def run_stage(name: str, fn: Callable[[Settings, Deadline], dict], s: Settings, started: float) -> dict:
    """Run one stage; it has failed when it raised or reported failures (outputs outside tolerance).
    Its time budget is its own, cut to what is left of the total from `started`."""
    print(f"[gpu_bench] stage {name} ...", flush=True)
    start = time.perf_counter()
    budget = s.stage_budget_s.get(name)
    if s.total_budget_s is not None:
        left = max(0.0, s.total_budget_s - (start - started))
        budget = left if budget is None else min(budget, left)
    record: dict = {"stage": name, "budget_s": budget}
    try:
        record.update(fn(s, Deadline(budget)))
    except Exception:  # a stage failing must not stop the others; the error is in its JSON
        record["error"] = traceback.format_exc()
        print(record["error"], file=sys.stderr, flush=True)
    record["failed"] = "error" in record or bool(record.get("failures"))
    record["seconds"] = round(time.perf_counter() - start, 2)
    write_json(s.out_dir / f"{name}.json", record)
    verdict = "FAILED" if record["failed"] else "done"
    print(f"[gpu_bench] stage {name} {verdict} in {record['seconds']} s -> {s.out_dir / (name + '.json')}", flush=True)
    for failure in record.get("failures", []):
        print(f"[gpu_bench]   {name}: {failure}", flush=True)
    return record


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

    kernels = kernels_forced_triton()
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


def stage_rmsnorm(s: Settings, deadline: Deadline) -> dict:
    from mmtrain.kernels import reference

    kernels = kernels_forced_triton()
    providers = {
        "triton": kernels.rms_norm, "eager": reference.rms_norm,
        "compiled": torch.compile(reference.rms_norm, dynamic=False),
    }  # fmt: skip
    results, failures = [], []
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
        y32 = reference.rms_norm(x.float(), w.float())
        for name, fn in providers.items():
            if deadline.passed():
                row[name] = {"skipped": "stage time budget spent"}
                continue
            try:
                err = max_err(fn(x, w), y32)["max_rel_to_max"]  # the outputs must agree before timing means anything
                if not err <= CORRECTNESS_LIMITS["output"]:
                    failures.append(f"{rows}x{dim} {name}: output error / max ref {err:.3g} > {CORRECTNESS_LIMITS['output']}")
                xg, wg = x.clone().requires_grad_(), w.clone().requires_grad_()
                with torch.no_grad():
                    fwd_ms = bench_ms(lambda: fn(x, w), s)
                fb_ms = bench_ms(lambda: torch.autograd.grad(fn(xg, wg), (xg, wg), dy), s)
                # bytes moved: fwd reads x, writes y; bwd reads x, dy, writes dx
                row[name] = {"fwd_ms": fwd_ms, "fwd_gbps": 2 * nbytes / fwd_ms / 1e6, "out_err_rel_to_max": err,
                             "fwdbwd_ms": fb_ms, "fwdbwd_gbps": 5 * nbytes / fb_ms / 1e6}  # fmt: skip
            except Exception as e:
                row[name] = {"error": error_text(e)}
        for base in ("eager", "compiled"):
            add_speedups(row, base)
    return {"dtype": str(s.dtype), "limits": CORRECTNESS_LIMITS, "rows": results, "failures": failures}


def _dense_linear_ce(hidden, weight, targets):
    """What a model without the fused kernel does: full logits, upcast to fp32, cross-entropy."""
    return F.cross_entropy((hidden @ weight.T).float(), targets, ignore_index=-100)


def stage_cross_entropy(s: Settings, deadline: Deadline) -> dict:
    kernels = kernels_forced_triton()
    providers = {
        "triton": kernels.linear_cross_entropy, "eager": _dense_linear_ce,
        "compiled": torch.compile(_dense_linear_ce, dynamic=False),
    }  # fmt: skip
    from mmtrain.kernels import reference

    results, failures = [], []
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
        loss32 = reference.linear_cross_entropy(h.float(), w.float(), t).item()  # sync
        for name, fn in providers.items():
            if deadline.passed():
                row[name] = {"skipped": "stage time budget spent"}
                continue
            try:
                loss_err = abs(fn(h, w, t).item() - loss32)  # sync
                if not loss_err <= CORRECTNESS_LIMITS["loss"]:
                    failures.append(f"{rows}x{dim}x{vocab} {name}: loss error {loss_err:.3g} > {CORRECTNESS_LIMITS['loss']}")
                hg, wg = h.clone().requires_grad_(), w.clone().requires_grad_()
                step = lambda: torch.autograd.grad(fn(hg, wg, t), (hg, wg))  # noqa: E731
                fb_ms = bench_ms(step, s)
                row[name] = {"fwdbwd_ms": fb_ms, "fwdbwd_tflops": tflops(flops_fb, fb_ms), "loss_abs_err": loss_err,
                             "peak_memory_mb": peak_memory_mb(step, s)}  # fmt: skip
            except Exception as e:
                row[name] = {"error": error_text(e)}
        for base in ("eager", "compiled"):
            add_speedups(row, base)
    return {"dtype": str(s.dtype), "flops": "6*rows*dim*vocab per fwd+bwd", "limits": CORRECTNESS_LIMITS,
            "rows": results, "failures": failures}  # fmt: skip


def _train_config(name: str, s: Settings):
    from mmtrain.model import preset

    cfg = preset(name)
    changes = {"kernels": "triton"}
    if s.dry_run:  # a one-layer miniature of the tiny preset: the interpreter is slow
        changes.update(dim=64, n_layers=1, n_heads=2, n_kv_heads=1, max_seq_len=64)
    return dataclasses.replace(cfg, **changes)


def stage_train(s: Settings, deadline: Deadline) -> dict:
    """The pure bf16 loop (no DeepSpeed, no loader, text-only): an upper bound, not the trainer.
    Whole training steps (forward, backward, AdamW) of model presets on one device: model and
    optimizer state in bf16 (model.to(bfloat16), torch.optim.AdamW(fused=True)), no fp32 master
    weights, no activation checkpointing, Triton kernels forced, packed rows of random-length
    text documents. The e2e stage measures what users run."""
    from mmtrain.data.batch import text_batch
    from mmtrain.model import FusionTransformer

    kernels = kernels_forced_triton()
    env = json.loads((s.out_dir / "env.json").read_text()) if (s.out_dir / "env.json").exists() else {}
    matmul_tflops = env.get("matmul", {}).get("tflops")
    rng = random.Random(0)
    results = {"what": PURE_LOOP, "precision": f"params, grads and AdamW state in {s.dtype}; fused AdamW on CUDA",
               "presets": {}}  # fmt: skip
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
            print(f"  {PURE_LOOP}: {name}: {tokens_per_s:,.0f} tokens/s, MFU {entry['mfu_vs_989']:.1%} of 989 TF/s", flush=True)
            del model, opt, batches
            if s.device.type == "cuda":
                torch.cuda.empty_cache()
        except Exception:  # record and go on with the next preset; the stage has failed
            entry["error"] = traceback.format_exc()
            results.setdefault("failures", []).append(f"{name}: {entry['error'].strip().splitlines()[-1]}")
    return results


# ------------------------------------------------------------------------------------------- summary



def _ratio_cell(values: list[float], goal: float | None) -> str:
    if not values:
        return "n/a"
    text = f"min {min(values):.2f}x, mean {sum(values) / len(values):.2f}x"
    if goal is not None:
        text += f" (goal >= {goal}x: {'met' if min(values) >= goal else 'NOT met'})"
    return text


def _speedups(rows: list[dict], base: str, mode: str, min_seq: int = 0) -> list[float]:
    return [r[f"speedup_vs_{base}"][mode] for r in rows
            if mode in r.get(f"speedup_vs_{base}", {}) and r.get("seq_len", 0) >= min_seq]  # fmt: skip


def _kernel_lines(results: dict[str, dict], long_seq: int) -> list[str]:
    lines = []
    corr = results.get("correctness", {})
    worst = {f"{op}.{name}": err["max_rel_to_max"] for op, val in corr.items() if isinstance(val, dict)
             for name, err in val.items() if isinstance(err, dict) and "max_rel_to_max" in err}  # fmt: skip
    if worst:
        name, err = max(worst.items(), key=lambda kv: kv[1])
        lines.append(f"| correctness (max error / max ref, worst) | {err:.2e} at {name} |")
    if "failures" in corr:
        verdict = "all within limits" if not corr["failures"] else "OUTSIDE limits: " + ", ".join(corr["failures"])
        lines.append(f"| correctness vs fp32 reference | {verdict} |")

    attn = results.get("attention", {}).get("rows", [])
    for base, label in (("sdpa_flash", "SDPA-flash"), ("sdpa_cudnn", "SDPA-cuDNN")) if "attention" in results else ():
        for mode in ("fwd", "fwdbwd"):
            goal = GOALS["attention_vs_flash"] if (base, mode) == ("sdpa_flash", "fwdbwd") else None
            cell = _ratio_cell(_speedups(attn, base, mode, long_seq), goal)
            lines.append(f"| attention {mode} vs {label}, S >= {long_seq} | {cell} |")
    best = [r["triton"]["fwdbwd_tflops"] for r in attn if "fwdbwd_tflops" in r.get("triton", {})]
    if best:
        lines.append(f"| attention fwdbwd, best | {max(best):.3g} TFLOP/s |")

    docs = results.get("doc_attention", {}).get("rows", [])
    for base, label in (("varlen_attn", "varlen_attn (FA2)"), ("flex", "FlexAttention")) if "doc_attention" in results else ():
        for mode in ("fwd", "fwdbwd"):
            goal = GOALS["doc_attention_vs_flex"] if (base, mode) == ("flex", "fwdbwd") else None
            skipped = {r.get(base, {}).get("skipped") for r in docs} - {None}
            cell = _ratio_cell(_speedups(docs, base, mode), goal)
            lines.append(f"| document-masked {mode} vs {label} | {cell if cell != 'n/a' or not skipped else next(iter(skipped))} |")
    for stage in ("attention", "doc_attention", "dispatch"):
        if stage in results and "failures" in results[stage]:
            f = results[stage]["failures"]
            lines.append(f"| {stage}: outputs vs fp32 reference | {'all within tolerance' if not f else 'OUTSIDE tolerance: ' + ', '.join(f)} |")

    for row in results.get("dispatch", {}).get("rows", []):
        if "winner" in row:
            times = ", ".join(f"{t['name']} {t['ms']:.3g} ms" if t["ms"] is not None else f"{t['name']}: {t['failure']}"
                              for t in row["trials"])  # fmt: skip
            lines.append(f"| auto attention, {row['label']} ({row['docs']}) | {row['winner']} ({times}) |")

    for stage, label in (("rmsnorm", "RMSNorm fwdbwd"), ("cross_entropy", "linear cross-entropy fwdbwd")):
        for base in ("eager", "compiled") if stage in results else ():
            cell = _ratio_cell(_speedups(results.get(stage, {}).get("rows", []), base, "fwdbwd"), None)
            lines.append(f"| {label} vs {base} | {cell} |")
    return lines


def summarize(results: dict[str, dict], long_seq: int = 2048) -> str:
    """The table of summary.md; attention ratios are taken over rows with seq_len >= long_seq."""
    lines = ["# GPU benchmark summary", "", "| measure | result |", "|---|---|"]
    env = results.get("env", {})
    if "matmul" in env:
        m = env["matmul"]
        lines.append(f"| device | {env.get('gpu', env.get('device'))}, torch {env['torch']}, triton {env['triton']} |")
        lines.append(f"| matmul {m['size']}^3 {m['dtype']} | {m['tflops']:.3g} TFLOP/s |")
    lines.append(f"| attention tolerance | {tolerance_text()} |")
    lines += _kernel_lines(results, long_seq)

    for name, entry in results.get("train", {}).get("presets", {}).items():
        if "mfu_vs_989" in entry:
            vs_mm = f", {entry['mfu_vs_matmul']:.1%} of measured matmul" if entry.get("mfu_vs_matmul") else ""
            lines.append(f"| {PURE_LOOP}: {name} | {entry['tokens_per_s']:,.0f} tokens/s, MFU {entry['mfu_vs_989']:.1%} "
                         f"of 989 TFLOP/s{vs_mm} (not the trainer: see e2e) |")
        else:
            lines.append(f"| {PURE_LOOP}: {name} | failed or skipped, see train.json |")
    lines += e2e_summary_lines(results)
    lines += tokenizers_summary_lines(results)

    failed = [name for name, rec in results.items() if rec.get("failed")]
    lines.append(f"| stages that failed | {', '.join(failed) if failed else 'none'} |")
    lines.append(f"| total time | {sum(rec.get('seconds', 0) for rec in results.values()):.0f} s |")
    return "\n".join(lines) + "\n"


STAGES: list[tuple[str, Callable[[Settings, Deadline], dict]]] = [
    ("env", stage_env),
    ("correctness", stage_correctness),
    ("attention", stage_attention),
    ("doc_attention", stage_doc_attention),
    ("dispatch", stage_dispatch),
    ("rmsnorm", stage_rmsnorm),
    ("cross_entropy", stage_cross_entropy),
    ("train", stage_train),
    ("e2e", stage_e2e),
    ("tokenizers", stage_tokenizers),
]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--dry-run", action="store_true", help="CPU, Triton interpreter, tiny sizes")
    parser.add_argument("--stages", default=",".join(name for name, _ in STAGES), help="comma-separated subset")
    parser.add_argument("--e2e-runs", default="", help="comma-separated subset of the e2e stage's runs (default: all)")
    args = parser.parse_args(argv)
    wanted = args.stages.split(",")
    unknown = sorted(set(wanted) - {name for name, _ in STAGES})
    if unknown:
        parser.error(f"unknown stage(s) {', '.join(unknown)}; known: {', '.join(name for name, _ in STAGES)}")
    if args.dry_run and os.environ.get("TRITON_INTERPRET") != "1":
        if "triton" in sys.modules:
            parser.error("--dry-run needs TRITON_INTERPRET=1 set before Triton is imported (gpu.sh does it)")
        os.environ["TRITON_INTERPRET"] = "1"
    if not args.dry_run and not torch.cuda.is_available():
        parser.error("no CUDA device; use --dry-run to exercise the script on CPU")
    if args.dry_run:  # FlexAttention warns when not compiled; the dry run does that on purpose
        warnings.filterwarnings("ignore", message="flex_attention called without torch.compile")
    # Before anything runs: a missing package would otherwise fail a stage minutes in. The stages
    # that lack something are not run (and count as failed); the others still are.
    missing = check_requirements(wanted, args.dry_run)
    for stage, problems in missing.items():
        for problem in problems:
            print(f"[gpu_bench] stage {stage} cannot run: {problem}", file=sys.stderr)
    if missing:
        print("[gpu_bench] put the missing wheels in REPO/.whl/ (gpu.sh installs them with pip --no-index; "
              "see docs/benchmarks.md) or install them", file=sys.stderr, flush=True)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    s = make_settings(args.out_dir, args.dry_run)
    if args.e2e_runs:
        known = {run.name: run for run in s.e2e_runs}
        chosen = args.e2e_runs.split(",")
        if set(chosen) - set(known):
            parser.error(f"unknown e2e run(s) {', '.join(sorted(set(chosen) - set(known)))}; known: {', '.join(known)}")
        s = dataclasses.replace(s, e2e_runs=tuple(known[name] for name in chosen))
    results, started = {}, time.perf_counter()
    for name, fn in STAGES:
        if name in missing:
            results[name] = {"stage": name, "error": "not run: " + "; ".join(missing[name]), "failed": True}
            write_json(s.out_dir / f"{name}.json", results[name])
        elif name in wanted:
            results[name] = run_stage(name, fn, s, started)
    # the dry run's sequences are tiny: take its ratios over all of them
    summary = summarize(results, long_seq=0 if s.dry_run else 2048)
    (args.out_dir / "summary.md").write_text(summary)
    print("\n" + summary, flush=True)
    if missing:
        return 2
    return 1 if any(rec["failed"] for rec in results.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
