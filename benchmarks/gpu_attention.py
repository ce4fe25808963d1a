"""Attention stages of the GPU benchmark: dense rows, document-masked packed rows, and the `auto`
dispatch's per-case decisions. Every provider's output and gradients are compared with the fp32
reference (mmtrain.kernels.reference.attention) on the same inputs, within the tolerance of the
provider's dtype (mmtrain.kernels.autotune.TOLERANCES); a row outside it fails the stage.

Shape legend: N = packed tokens, H = query heads, K = key/value heads, D = head dim, B = rows,
S = tokens per row.
"""

from __future__ import annotations

import dataclasses
import random
from typing import Callable

import torch
import torch.nn.functional as F

from gpu_common import (Deadline, Settings, bench_ms, cu_seqlens_from, error_text, kernels_forced_triton,
                        random_doc_lens, tflops, tolerance_text)


@dataclasses.dataclass
class Provider:
    """One implementation on the benchmark's data, in its own layout."""

    fn: Callable[..., torch.Tensor]  # fn(*inputs) -> output in the provider's layout
    inputs: list[torch.Tensor]  # q, k, v in the provider's layout
    to_packed: Callable[[torch.Tensor], torch.Tensor]  # provider layout -> [N, heads, D]
    from_packed: Callable[[torch.Tensor], torch.Tensor]  # [N, H, D] -> provider layout


def _same(t: torch.Tensor) -> torch.Tensor:
    return t


def packed_provider(fn, q, k, v) -> Provider:
    return Provider(fn, [q, k, v], _same, _same)


def bhsd_provider(fn, q, k, v, batch: int, seq: int) -> Provider:
    """[B, heads, S, D] layout (SDPA)."""

    def to_bhsd(t):
        return t.view(batch, seq, t.shape[1], t.shape[2]).transpose(1, 2).contiguous()

    def to_packed(t):
        return t.transpose(1, 2).reshape(batch * seq, t.shape[1], t.shape[3])

    return Provider(fn, [to_bhsd(t) for t in (q, k, v)], to_packed, to_bhsd)


def one_hnd_provider(fn, q, k, v) -> Provider:
    """[1, heads, N, D] layout (FlexAttention)."""

    def to_1hnd(t):
        return t.transpose(0, 1).unsqueeze(0).contiguous()

    return Provider(fn, [to_1hnd(t) for t in (q, k, v)], lambda t: t[0].transpose(0, 1), to_1hnd)


# ------------------------------------------------------------------------------- timing and checking


def time_fwd_and_fwdbwd(p: Provider, s: Settings, flops_fwd: float) -> dict:
    """Forward (inputs without grad, under no_grad) and forward+backward times of p.fn(*inputs).
    A mode that fails (a backend without that kernel) records its error."""
    out: dict = {}
    plain = [t.detach() for t in p.inputs]
    try:
        with torch.no_grad():
            ms = bench_ms(lambda: p.fn(*plain), s)
        out.update(fwd_ms=ms, fwd_tflops=tflops(flops_fwd, ms))
    except Exception as e:
        out["fwd_error"] = error_text(e)
    try:
        with_grad = [t.detach().requires_grad_() for t in p.inputs]
        grad_out = torch.randn_like(p.fn(*plain))
        ms = bench_ms(lambda: torch.autograd.grad(p.fn(*with_grad), with_grad, grad_out), s)
        out.update(fwdbwd_ms=ms, fwdbwd_tflops=tflops(3.5 * flops_fwd, ms))
    except Exception as e:
        out["fwdbwd_error"] = error_text(e)
    return out


def reference_fwd_bwd(q, k, v, cu, causal: bool, do: torch.Tensor):
    """fp32 output and gradients of the reference, all packed [N, heads, D]."""
    from mmtrain.kernels import reference

    qkv32 = [t.detach().float().requires_grad_() for t in (q, k, v)]
    out = reference.attention(*qkv32, cu, causal)
    grads = torch.autograd.grad(out, qkv32, do.float())
    return out.detach(), [g.detach() for g in grads]


def check_provider(p: Provider, ref_out, ref_grads, do_NHD, dtype: torch.dtype) -> dict:
    """Error / allowed error (<= 1 agrees) of the provider's output and, when its backward runs,
    gradients; "ok" is False when any compared value is outside the tolerance."""
    from mmtrain.kernels.autotune import error_ratio

    result: dict = {}
    with torch.no_grad():
        result["out"] = error_ratio(p.to_packed(p.fn(*[t.detach() for t in p.inputs])), ref_out, dtype)
    try:
        with_grad = [t.detach().requires_grad_() for t in p.inputs]
        grads = torch.autograd.grad(p.fn(*with_grad), with_grad, p.from_packed(do_NHD))
        for name, g, g32 in zip(("dq", "dk", "dv"), grads, ref_grads):
            result[name] = error_ratio(p.to_packed(g), g32, dtype, grad=True)
    except Exception as e:  # e.g. FlexAttention without a CPU backward: only the output is compared
        result["grads_not_compared"] = error_text(e)
    result["ok"] = all(v <= 1.0 for k, v in result.items() if k in ("out", "dq", "dk", "dv"))
    return result


def measure(row: dict, name: str, p: Provider, s: Settings, flops_fwd: float, ref, do_NHD) -> None:
    """row[name] = timings + comparison; a provider that cannot run at all records its error."""
    try:
        row[name] = {"check": check_provider(p, *ref, do_NHD, s.dtype)}
    except Exception as e:
        row[name] = {"error": error_text(e)}
        return
    row[name].update(time_fwd_and_fwdbwd(p, s, flops_fwd))


def add_speedups(row: dict, base: str) -> None:
    """row["speedup_vs_<base>"][mode] = base time / our time, for the modes both measured."""
    for mode in ("fwd", "fwdbwd"):
        if f"{mode}_ms" in row.get("triton", {}) and f"{mode}_ms" in row.get(base, {}):
            row.setdefault(f"speedup_vs_{base}", {})[mode] = row[base][f"{mode}_ms"] / row["triton"][f"{mode}_ms"]


def row_failures(row: dict, label: str) -> list[str]:
    """'label: provider' for every provider whose comparison failed."""
    return [f"{label}: {name}" for name, val in row.items()
            if isinstance(val, dict) and val.get("check", {}).get("ok") is False]  # fmt: skip


def fmt_row(row: dict, names=("triton", "varlen_attn", "sdpa_flash", "sdpa_cudnn", "flex")) -> str:
    parts = [f"D={row['head_dim']} S={row['seq_len']} causal={row['causal']}"]
    for name in names:
        if "fwdbwd_tflops" in row.get(name, {}):
            parts.append(f"{name} {row[name].get('fwd_tflops', float('nan')):.3g}/{row[name]['fwdbwd_tflops']:.3g}")
        elif "fwd_tflops" in row.get(name, {}):
            parts.append(f"{name} {row[name]['fwd_tflops']:.3g}/-")
    parts.append("TFLOP/s fwd/fwdbwd")
    return "  ".join(parts)


# ------------------------------------------------------------------------------------------- stages


def stage_attention(s: Settings, deadline: Deadline) -> dict:
    """Full rows (one document per row): ours vs SDPA forced to flash and to cuDNN."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    kernels = kernels_forced_triton()

    def sdpa(backend, causal):
        def fn(*qkv):
            with sdpa_kernel([backend]):
                return F.scaled_dot_product_attention(*qkv, is_causal=causal)

        return fn

    rows, failures = [], []
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
                N = batch * seq
                flops_fwd = 4 * batch * seq * seq * heads * head_dim / (2 if causal else 1)
                q, k, v, do = (torch.randn(N, heads, head_dim, device=s.device, dtype=s.dtype) for _ in range(4))
                cu = torch.arange(0, N + 1, seq, dtype=torch.int32, device=s.device)
                ref = reference_fwd_bwd(q, k, v, cu, causal, do)
                ours = lambda *qkv: kernels.attention(*qkv, cu, causal=causal, max_seqlen=seq)  # noqa: E731
                providers = {"triton": packed_provider(ours, q, k, v)}
                for name, backend in (("sdpa_flash", SDPBackend.FLASH_ATTENTION), ("sdpa_cudnn", SDPBackend.CUDNN_ATTENTION)):
                    providers[name] = bhsd_provider(sdpa(backend, causal), q, k, v, batch, seq)
                for name, p in providers.items():
                    measure(row, name, p, s, flops_fwd, ref, do)
                del ref
                for base in ("sdpa_flash", "sdpa_cudnn"):
                    add_speedups(row, base)
                failures += row_failures(row, f"D={head_dim} S={seq} causal={causal}")
                print(f"  attention {fmt_row(row)}", flush=True)
    return {"dtype": str(s.dtype), "flops": "fwd 4*B*S^2*H*D (/2 causal); fwd+bwd 3.5x fwd",
            "tolerance": tolerance_text(), "rows": rows, "failures": failures}  # fmt: skip


def stage_doc_attention(s: Settings, deadline: Deadline) -> dict:
    """Packed rows of random-length documents: ours (cu_seqlens) vs varlen_attn (FlashAttention-2
    inside PyTorch, the same packed layout) and FlexAttention with a document block mask (built once
    per batch, outside the timing, as a training step would)."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    from mmtrain.kernels.attention_backends import varlen_attention, varlen_unavailable

    kernels = kernels_forced_triton()
    # dynamic=False: one compiled graph per head dim; the block mask is a runtime input.
    flex = torch.compile(flex_attention, dynamic=False) if s.compile_flex else flex_attention
    varlen_skip = varlen_unavailable(s.device)
    rng = random.Random(0)
    N = s.doc_tokens
    # One mask_mod for the whole stage reading a buffer refilled per batch, as a training loop
    # would do: a new Python closure per batch could make the compiled FlexAttention recompile.
    doc_id_N = torch.zeros(N, dtype=torch.long, device=s.device)

    def mask_mod(b, h, q_idx, kv_idx):
        return (doc_id_N[q_idx] == doc_id_N[kv_idx]) & (q_idx >= kv_idx)

    results, failures = [], []
    for head_dim in s.attn_head_dims:
        heads = s.attn_hidden // head_dim
        kv_heads = heads // s.doc_gqa
        for lo, hi in s.doc_len_ranges:
            causal = True  # the model's case (mask_mod is causal)
            doc_lens = random_doc_lens(rng, s.doc_tokens // s.doc_row_len, s.doc_row_len, lo, hi)
            lens = [n for row in doc_lens for n in row]
            row: dict = {
                "head_dim": head_dim, "heads": heads, "kv_heads": kv_heads, "tokens": N,
                "row_len": s.doc_row_len, "doc_len_range": [lo, hi], "docs": len(lens), "causal": causal,
                "seq_len": s.doc_row_len, "flex_compiled": s.compile_flex,
            }  # fmt: skip
            results.append(row)
            if deadline.passed():
                row["skipped"] = "stage time budget spent"
                continue
            flops_fwd = sum(4 * n * n * heads * head_dim for n in lens) / (2 if causal else 1)
            cu = cu_seqlens_from(lens, s.device)
            # The document of every token: FlexAttention's mask reads it (filled before the mask is built).
            doc_id_N.copy_(torch.repeat_interleave(torch.arange(len(lens), device=s.device),
                                                   torch.tensor(lens, device=s.device)))
            q, k, v = (torch.randn(N, h, head_dim, device=s.device, dtype=s.dtype) for h in (heads, kv_heads, kv_heads))
            do = torch.randn_like(q)
            ref = reference_fwd_bwd(q, k, v, cu, causal, do)
            block_mask = create_block_mask(mask_mod, None, None, N, N, device=str(s.device))
            ours = lambda *qkv: kernels.attention(*qkv, cu, causal=causal, max_seqlen=max(lens))  # noqa: E731
            varlen = lambda *qkv: varlen_attention(*qkv, cu, causal, max(lens))  # noqa: E731
            flex_fn = lambda *qkv: flex(*qkv, block_mask=block_mask, enable_gqa=kv_heads != heads)  # noqa: E731
            measure(row, "triton", packed_provider(ours, q, k, v), s, flops_fwd, ref, do)
            if varlen_skip:
                row["varlen_attn"] = {"skipped": f"not available: {varlen_skip}"}
            else:
                measure(row, "varlen_attn", packed_provider(varlen, q, k, v), s, flops_fwd, ref, do)
            # FlexAttention has no CPU backward: the dry run records that error for fwdbwd.
            measure(row, "flex", one_hnd_provider(flex_fn, q, k, v), s, flops_fwd, ref, do)
            del ref
            for base in ("varlen_attn", "flex"):
                add_speedups(row, base)
            failures += row_failures(row, f"D={head_dim} docs {lo}-{hi}")
            print(f"  doc_attention docs={len(lens)} {fmt_row(row)}", flush=True)
    return {"dtype": str(s.dtype), "flops": "sum over docs of 4*L^2*H*D (/2 causal); fwd+bwd 3.5x fwd",
            "tolerance": tolerance_text(), "rows": results, "failures": failures}  # fmt: skip


def stage_dispatch(s: Settings, deadline: Deadline) -> dict:
    """The `auto` attention dispatch's decision for the presets' attention shapes: the chooser
    `set_backend("auto")` builds on CUDA (kernels.attention_autotuner), run on each case's data;
    the dry run builds the same chooser with CPU candidates and a wall-clock timer."""
    from mmtrain import kernels
    from mmtrain.kernels import attention_autotuner, attention_case

    timer = (lambda name, fn: bench_ms(fn, s)) if s.dry_run else None
    tuner = attention_autotuner(s.device.type, timer=timer)
    rng = random.Random(1)
    rows, failures = [], []
    for label, heads, kv_heads, head_dim, row_len, doc_range in s.dispatch_cases:
        row: dict = {"label": label, "heads": heads, "kv_heads": kv_heads, "head_dim": head_dim, "row_len": row_len,
                     "docs": "one per row" if doc_range is None else f"uniform {doc_range[0]}-{doc_range[1]}"}
        rows.append(row)
        if deadline.passed():
            row["skipped"] = "stage time budget spent"
            continue
        n_rows = max(1, s.dispatch_tokens // row_len)
        if doc_range is None:
            lens = [row_len] * n_rows
        else:
            lens = [n for r in random_doc_lens(rng, n_rows, row_len, *doc_range) for n in r]
        N = sum(lens)
        q, k, v = (torch.randn(N, h, head_dim, device=s.device, dtype=s.dtype) for h in (heads, kv_heads, kv_heads))
        cu = cu_seqlens_from(lens, s.device)
        case = attention_case(q, k, cu, True, max(lens))
        try:
            row["winner"] = tuner.pick(case, q, k, v, cu, True, max(lens))
            row["case"] = case.describe()
            row["trials"] = [dataclasses.asdict(t) for t in tuner.trials[case]]
        except Exception as e:
            row["error"] = error_text(e)
            failures.append(f"{label}: {row['error']}")
            continue
        if row["winner"] == tuner.fallback:
            failures.append(f"{label}: no candidate agreed with the reference")
        print(f"  dispatch {label}: {row['winner']}  " + "  ".join(
            f"{t['name']} {t['ms']:.3g} ms" if t["ms"] is not None else f"{t['name']} -" for t in row["trials"]), flush=True)
    kernels.set_backend("auto")
    return {"dtype": str(s.dtype), "tolerance": tolerance_text(), "timing": "fwd+bwd, median of 5 after 1 warm-up",
            "rows": rows, "failures": failures}  # fmt: skip
