"""PyTorch's own attention kernels behind mmtrain's packed attention signature, as candidates
for the `auto` dispatch (mmtrain/kernels/autotune.py) and as anchors for the GPU benchmark.

    varlen_attention(q, k, v, cu_seqlens, causal, max_seqlen)   torch.nn.attention.varlen.varlen_attn
    sdpa_attention(q, k, v, cu_seqlens, causal, max_seqlen, backend=None)
                                                                 F.scaled_dot_product_attention, only
                                                                 where every document has the same
                                                                 length (one document per row)

All take q [N, H, D], k/v [N, K, D] (K divides H) and cu_seqlens int32 [num_docs + 1] and return
[N, H, D], like mmtrain.kernels.attention. Shape legend: N = packed tokens, H = query heads,
K = key/value heads, D = head dim, B = rows, L = tokens per row.
"""

from __future__ import annotations

import inspect
import math

import torch
import torch.nn.functional as F


def varlen_unavailable(device: torch.device | str) -> str | None:
    """Why varlen_attn cannot run here, or None when it can (torch >= 2.10 with CUDA)."""
    try:
        from torch.nn.attention.varlen import varlen_attn  # noqa: F401
    except ImportError:
        return f"torch.nn.attention.varlen.varlen_attn is not in torch {torch.__version__} (added in 2.10)"
    if torch.device(device).type != "cuda":
        return "varlen_attn runs FlashAttention-2 kernels: CUDA only"
    return None


def _varlen_keywords(causal: bool, grouped: bool) -> dict:
    """The causal / GQA keywords of the installed varlen_attn. Its signature changed between
    releases: torch 2.10 takes is_causal=; later releases take window_size=(-1, 0) for causal and
    enable_gqa= for grouped-query attention."""
    from torch.nn.attention.varlen import varlen_attn

    params = inspect.signature(varlen_attn).parameters
    kwargs: dict = {}
    if "is_causal" in params:
        kwargs["is_causal"] = causal
    elif "window_size" in params:
        kwargs["window_size"] = (-1, 0) if causal else (-1, -1)
    elif causal:
        raise RuntimeError("this torch's varlen_attn has neither is_causal nor window_size")
    if grouped and "enable_gqa" in params:
        kwargs["enable_gqa"] = True
    # Without enable_gqa, k/v are passed with their K heads: FlashAttention-2 handles K < H itself;
    # the benchmark and the auto dispatch compare every output with the reference anyway.
    return kwargs


def varlen_attention(q_NHD, k_NKD, v_NKD, cu_seqlens, causal: bool, max_seqlen: int) -> torch.Tensor:
    """FlashAttention-2 varlen through torch.nn.attention.varlen.varlen_attn (differentiable)."""
    from torch.nn.attention.varlen import varlen_attn

    kwargs = _varlen_keywords(causal, k_NKD.shape[1] != q_NHD.shape[1])
    return varlen_attn(q_NHD, k_NKD, v_NKD, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, **kwargs)


def is_dense(num_tokens: int, cu_seqlens: torch.Tensor, max_seqlen: int) -> bool:
    """True when every document has length max_seqlen, i.e. the packed tokens are B rows of one
    document each, which plain SDPA expresses. Needs no host sync: the lengths sum to num_tokens
    and none exceeds max_seqlen, so they are all equal exactly when num_docs * max_seqlen == N."""
    return max_seqlen > 0 and (cu_seqlens.numel() - 1) * max_seqlen == num_tokens


def sdpa_attention(q_NHD, k_NKD, v_NKD, cu_seqlens, causal: bool, max_seqlen: int, backend=None) -> torch.Tensor:
    """F.scaled_dot_product_attention over rows of one document each; `backend` (an
    torch.nn.attention.SDPBackend) forces one SDPA kernel, None lets PyTorch choose."""
    N, H, D = q_NHD.shape
    K = k_NKD.shape[1]
    if not is_dense(N, cu_seqlens, max_seqlen):
        raise ValueError("sdpa_attention needs documents of one length (one document per row); "
                         "packed documents of different lengths need a varlen kernel")
    B, L = N // max_seqlen, max_seqlen
    q_BHLD, k_BKLD, v_BKLD = (t.view(B, L, t.shape[1], D).transpose(1, 2) for t in (q_NHD, k_NKD, v_NKD))
    kwargs = {"is_causal": causal, "scale": 1.0 / math.sqrt(D)}
    if K != H:
        kwargs["enable_gqa"] = True
    if backend is None:
        o_BHLD = F.scaled_dot_product_attention(q_BHLD, k_BKLD, v_BKLD, **kwargs)
    else:
        from torch.nn.attention import sdpa_kernel

        with sdpa_kernel([backend]):
            o_BHLD = F.scaled_dot_product_attention(q_BHLD, k_BKLD, v_BKLD, **kwargs)
    return o_BHLD.transpose(1, 2).reshape(N, H, D)
