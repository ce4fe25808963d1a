"""Kernels with one dispatch point per op: Triton on CUDA, the PyTorch reference on CPU.

    attention(q, k, v, cu_seqlens, causal=True, max_seqlen=None)   packed varlen, GQA, doc-masked
    rms_norm(x, weight, eps=1e-6)
    linear_cross_entropy(hidden, weight, targets, ignore_index=-100, reduction="mean")
    set_backend("auto" | "triton" | "reference"), get_backend(device)

"auto" picks the reference for CPU tensors. On CUDA, rms_norm and linear_cross_entropy run the
Triton kernels, and attention runs, per case, the fastest backend that agrees with the reference on
this device: ours (Triton), torch's varlen_attn (FlashAttention-2), or SDPA (flash / cuDNN) where
every document has the same length (see autotune.py; attention_choices() lists the decisions).
Forcing "triton" or "reference" skips that choice. Forcing "triton" on CPU tensors runs the kernels
in Triton's interpreter and needs TRITON_INTERPRET=1 in the environment before Triton is first
imported (that is how the tests run them). The backend each op resolves to is logged once, the
first time the op runs. Importing this package never imports Triton.

Shape legend: N = total packed tokens, H = query heads, K = key/value heads, D = head dim,
V = vocabulary.
"""

from __future__ import annotations

import logging
import os

import torch

from . import reference
from .attention_backends import is_dense, sdpa_attention, varlen_attention, varlen_unavailable
from .autotune import AttentionAutotuner, AttentionCase, seq_bucket

__all__ = ["attention", "rms_norm", "linear_cross_entropy", "set_backend", "get_backend", "attention_choices"]

logger = logging.getLogger("mmtrain.kernels")

BACKENDS = ("auto", "triton", "reference")
_backend = "auto"
_logged_ops: set[str] = set()


def set_backend(name: str) -> None:
    """Choose the kernel backend for all ops ("auto", "triton" or "reference")."""
    global _backend
    if name not in BACKENDS:
        raise ValueError(f"kernel backend must be one of {BACKENDS}, got {name!r}")
    _backend = name
    _logged_ops.clear()  # a new choice is worth logging again


def get_backend(device: torch.device | str) -> str:
    """The backend ops on tensors of this device run with: "triton" or "reference". (In "auto"
    on CUDA, attention then chooses per case among triton, varlen_attn and SDPA.)"""
    device = torch.device(device)
    if _backend == "auto":
        return "triton" if device.type == "cuda" else "reference"
    if _backend == "triton" and device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError(
            f"kernel backend 'triton' was forced for tensors on {device.type}; Triton kernels run "
            "only on CUDA, or on CPU under Triton's interpreter (set TRITON_INTERPRET=1 before "
            "starting Python). Use set_backend('auto') or 'reference' instead."
        )
    return _backend


def _resolve(op: str, device: torch.device) -> str:
    backend = get_backend(device)
    if op not in _logged_ops and not torch.compiler.is_compiling():  # no logging inside a trace
        _logged_ops.add(op)
        shown = "per-case choice" if op == "attention" and _backend == "auto" and backend == "triton" else backend
        logger.info("kernel %s: %s backend (requested %r, device %s)", op, shown, _backend, device.type)
    return backend


def _check_attention_inputs(q, k, v, cu_seqlens, max_seqlen) -> int | None:
    """Validate shapes; returns max_seqlen (computed from cu_seqlens when not given)."""
    if q.dim() != 3 or k.dim() != 3 or v.dim() != 3:
        raise ValueError(
            f"attention expects packed q [N, H, D], k/v [N, K, D]; got q {tuple(q.shape)}, "
            f"k {tuple(k.shape)}, v {tuple(v.shape)}"
        )
    (N, H, D), (Nk, K, Dk) = q.shape, k.shape
    if k.shape != v.shape or Nk != N or Dk != D:
        raise ValueError(f"k and v must be [{N}, K, {D}]; got k {tuple(k.shape)}, v {tuple(v.shape)}")
    if H % K != 0:
        raise ValueError(f"n_kv_heads={K} must divide n_heads={H}")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"q, k, v must share a dtype; got {q.dtype}, {k.dtype}, {v.dtype}")
    if cu_seqlens.device != q.device:
        raise ValueError(f"cu_seqlens is on {cu_seqlens.device} but q is on {q.device}")
    if cu_seqlens.dim() != 1 or cu_seqlens.dtype != torch.int32 or cu_seqlens.numel() < 2:
        raise ValueError(
            f"cu_seqlens must be int32 [num_docs + 1] with at least one document; "
            f"got {cu_seqlens.dtype} {tuple(cu_seqlens.shape)}"
        )
    # Checking the values needs them on the host: do it when that is free (CPU cu_seqlens) or when
    # we must sync anyway to find max_seqlen. On CUDA with max_seqlen given, no sync per call;
    # under torch.compile never (a data-dependent branch), so max_seqlen must be given there.
    if torch.compiler.is_compiling():
        if max_seqlen is None:
            raise ValueError("attention under torch.compile needs max_seqlen (the longest document)")
    elif cu_seqlens.device.type == "cpu" or max_seqlen is None:
        bounds = cu_seqlens.tolist()  # sync on CUDA
        if bounds[0] != 0 or bounds[-1] != N:
            raise ValueError(f"cu_seqlens must start at 0 and end at total_tokens={N}; got {bounds[0]} .. {bounds[-1]}")
        lens = [b - a for a, b in zip(bounds[:-1], bounds[1:])]
        if min(lens) < 0:
            raise ValueError("cu_seqlens must be non-decreasing")
        if max_seqlen is None:
            max_seqlen = max(lens)
    return max_seqlen


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor,
    causal: bool = True,
    max_seqlen: int | None = None,
) -> torch.Tensor:
    """Document-masked (varlen) attention, softmax scale 1/sqrt(D).

    q [N, H, D], k/v [N, K, D] with K dividing H, cu_seqlens int32 [num_docs + 1] from 0 to N.
    Token i of a document attends to the tokens of its own document (those at or before i when
    causal). max_seqlen (the longest document) saves a host sync on CUDA when given. Returns
    [N, H, D] in q's dtype.
    """
    max_seqlen = _check_attention_inputs(q, k, v, cu_seqlens, max_seqlen)
    backend = _resolve("attention", q.device)
    if backend == "triton" and _backend == "auto" and not torch.compiler.is_compiling():  # CUDA: the per-case choice
        case = attention_case(q, k, cu_seqlens, causal, max_seqlen)
        backend = _attention_tuner().pick(case, q, k, v, cu_seqlens, causal, max_seqlen)
    return _ATTENTION_IMPLS[backend](q, k, v, cu_seqlens, causal, max_seqlen)


def _triton_attention(q, k, v, cu_seqlens, causal, max_seqlen):
    from .flash_attention import flash_attention

    return flash_attention(q, k, v, cu_seqlens, causal, max_seqlen)


def _sdpa(backend_name: str):
    def run(q, k, v, cu_seqlens, causal, max_seqlen):
        from torch.nn.attention import SDPBackend

        return sdpa_attention(q, k, v, cu_seqlens, causal, max_seqlen, getattr(SDPBackend, backend_name))

    return run


_ATTENTION_IMPLS = {
    "triton": _triton_attention,
    "reference": reference.attention,
    "varlen_attn": varlen_attention,
    "sdpa_flash": _sdpa("FLASH_ATTENTION"),
    "sdpa_cudnn": _sdpa("CUDNN_ATTENTION"),
}
_tuner: AttentionAutotuner | None = None
_device_names: dict[torch.device, str] = {}


def attention_case(q, k, cu_seqlens, causal, max_seqlen) -> AttentionCase:
    if q.device not in _device_names:
        _device_names[q.device] = torch.cuda.get_device_name(q.device) if q.device.type == "cuda" else q.device.type
    return AttentionCase(device=_device_names[q.device], dtype=str(q.dtype).removeprefix("torch."),
                         head_dim=q.shape[2], gqa=q.shape[1] // k.shape[1], causal=causal,
                         packed=not is_dense(q.shape[0], cu_seqlens, max_seqlen),
                         seq_bucket=seq_bucket(max_seqlen))


def attention_autotuner(device_type: str = "cuda", timer=None) -> AttentionAutotuner:
    """A fresh chooser with the candidates that exist for this device type (what "auto" uses on
    CUDA; the GPU benchmark builds one to show the decisions, its dry run one for CPU)."""
    candidates = {name: _ATTENTION_IMPLS[name] for name in ("triton", "sdpa_flash", "sdpa_cudnn")}
    why_not = varlen_unavailable(device_type)
    if why_not is None:
        candidates["varlen_attn"] = varlen_attention
    else:
        logger.info("attention candidate varlen_attn skipped: %s", why_not)
    dense_only = lambda case: not case.packed  # noqa: E731
    return AttentionAutotuner(candidates, reference=reference.attention, timer=timer,
                              applies={"sdpa_flash": dense_only, "sdpa_cudnn": dense_only})


def _attention_tuner() -> AttentionAutotuner:
    global _tuner
    if _tuner is None:
        _tuner = attention_autotuner("cuda")
    return _tuner


def attention_choices() -> list[dict]:
    """The auto dispatch's decisions so far in this process: case, winner, and every candidate's
    time and error (empty on CPU, or when a backend was forced)."""
    return [] if _tuner is None else _tuner.table()


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """x * rsqrt(mean(x^2, -1) + eps) * weight, computed in fp32, returned in x.dtype."""
    if weight.dim() != 1 or weight.shape[0] != x.shape[-1]:
        raise ValueError(f"rms_norm weight must be [{x.shape[-1]}], got {tuple(weight.shape)}")
    if _resolve("rms_norm", x.device) == "triton":
        from .rmsnorm import rms_norm as rms_norm_triton

        return rms_norm_triton(x, weight, eps)
    return reference.rms_norm(x, weight, eps)


def linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    ignore_index: int = -100,
    reduction: str = "mean",
) -> torch.Tensor:
    """Cross-entropy of hidden [N, D] @ weight[V, D].T against targets [N], chunked over rows so
    the full fp32 [N, V] logits never exist. reduction: "mean" over non-ignored targets (0 if
    there are none), "sum", or "none" (per-row fp32 loss [N], 0 where ignored)."""
    from .chunked_ce import REDUCTIONS

    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(
            f"linear_cross_entropy expects hidden [N, D] and weight [V, D]; got {tuple(hidden.shape)} "
            f"and {tuple(weight.shape)}"
        )
    if targets.shape != hidden.shape[:1]:
        raise ValueError(f"targets must be [{hidden.shape[0]}], got {tuple(targets.shape)}")
    # The chunked matmul runs inside an autograd.Function / custom op, which autocast does not reach: apply
    # autocast's dtype here (the casts are differentiable), otherwise insist on one dtype.
    if torch.is_autocast_enabled(hidden.device.type):
        dtype = torch.get_autocast_dtype(hidden.device.type)
        hidden, weight = hidden.to(dtype), weight.to(dtype)
    elif hidden.dtype != weight.dtype:
        raise ValueError(f"hidden ({hidden.dtype}) and weight ({weight.dtype}) must share a dtype")
    if _resolve("linear_cross_entropy", hidden.device) == "triton":
        from .cross_entropy import linear_cross_entropy as linear_cross_entropy_triton

        return linear_cross_entropy_triton(hidden, weight, targets, ignore_index, reduction)
    return reference.linear_cross_entropy(hidden, weight, targets, ignore_index, reduction)
