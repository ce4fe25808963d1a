"""PyTorch references for the kernels: the CPU training path and the ground truth of the tests.

Shape legend: N = total packed tokens, H = query heads, K = key/value heads, D = head dim (or model
dim for rms_norm / cross-entropy), V = vocabulary, L = tokens in one attention window, C = rows in
one cross-entropy chunk.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

# Documents are grouped into windows of up to this many tokens (a longer document gets its own);
# one SDPA call per window with a block-diagonal mask. Larger windows waste work on masked-out
# pairs (cost ~L^2), smaller ones pay more per-call overhead. Measured fwd+bwd on 2 CPU cores, 8 rows
# of 512 tokens, 4 heads x 64: documents of 20-500 tokens: 256 -> 57 ms, 512 -> 73 ms, one call per
# document -> 61 ms; documents of 20-100 tokens: 256 -> 47 ms, 512 -> 67 ms, per document -> 113 ms.
ATTENTION_WINDOW_TOKENS = 256


def document_windows(doc_lens: list[int], window_tokens: int) -> list[tuple[int, int, list[int]]]:
    """Greedily group consecutive documents into windows of at most window_tokens tokens; a longer
    document gets a window of its own. Returns (start, end, doc_lens_in_window) per window."""
    windows: list[tuple[int, int, list[int]]] = []
    start, end, lens = 0, 0, []
    for n in doc_lens:
        if lens and end - start + n > window_tokens:
            windows.append((start, end, lens))
            start, lens = end, []
        lens.append(n)
        end += n
    if lens:
        windows.append((start, end, lens))
    return windows


def _window_mask(doc_lens: list[int], causal: bool, device: torch.device) -> torch.Tensor:
    """Boolean [L, L] mask, True where query i may attend to key j (same document, j <= i if causal)."""
    doc_id_L = torch.repeat_interleave(
        torch.arange(len(doc_lens), device=device), torch.tensor(doc_lens, device=device)
    )
    mask_LL = doc_id_L[:, None] == doc_id_L[None, :]
    if causal:
        mask_LL = torch.tril(mask_LL)
    return mask_LL


def attention(
    q_NHD: torch.Tensor,
    k_NKD: torch.Tensor,
    v_NKD: torch.Tensor,
    cu_seqlens: torch.Tensor,
    causal: bool = True,
    max_seqlen: int | None = None,
    window_tokens: int = ATTENTION_WINDOW_TOKENS,
) -> torch.Tensor:
    """Document-masked attention over a packed sequence: one SDPA call per window of whole
    documents. Deterministic, differentiable, never builds an [N, N] mask."""
    del max_seqlen  # the windows are sized from cu_seqlens itself
    H, K = q_NHD.shape[1], k_NKD.shape[1]
    doc_lens = torch.diff(cu_seqlens).tolist()  # sync (cu_seqlens is small)
    out_parts = []
    for start, end, lens in document_windows(doc_lens, window_tokens):
        # SDPA layout [1, heads, L, D]; kv heads repeated so query head h reads kv head h // (H/K).
        q_1HLD = q_NHD[start:end].transpose(0, 1).unsqueeze(0)
        k_1HLD = k_NKD[start:end].transpose(0, 1).unsqueeze(0).repeat_interleave(H // K, dim=1)
        v_1HLD = v_NKD[start:end].transpose(0, 1).unsqueeze(0).repeat_interleave(H // K, dim=1)
        if len(lens) == 1:  # a single document needs no mask: use the fused causal path
            o_1HLD = F.scaled_dot_product_attention(q_1HLD, k_1HLD, v_1HLD, is_causal=causal)
        else:
            mask_LL = _window_mask(lens, causal, q_NHD.device)
            o_1HLD = F.scaled_dot_product_attention(q_1HLD, k_1HLD, v_1HLD, attn_mask=mask_LL)
        out_parts.append(o_1HLD.squeeze(0).transpose(0, 1))
    return torch.cat(out_parts, dim=0)


def attention_naive(
    q_NHD: torch.Tensor, k_NKD: torch.Tensor, v_NKD: torch.Tensor, cu_seqlens: torch.Tensor, causal: bool = True
) -> torch.Tensor:
    """Dense softmax(QK^T/sqrt(D))V in fp32 (fp64 for fp64 inputs), one document at a time. Only
    for tests (slow, obvious)."""
    H, K, D = q_NHD.shape[1], k_NKD.shape[1], q_NHD.shape[2]
    compute_dtype = torch.promote_types(q_NHD.dtype, torch.float32)
    out = torch.empty_like(q_NHD)
    bounds = cu_seqlens.tolist()
    for start, end in zip(bounds[:-1], bounds[1:]):
        q = q_NHD[start:end].to(compute_dtype).transpose(0, 1)  # [H, n, D]
        k = k_NKD[start:end].to(compute_dtype).transpose(0, 1).repeat_interleave(H // K, dim=0)
        v = v_NKD[start:end].to(compute_dtype).transpose(0, 1).repeat_interleave(H // K, dim=0)
        scores = q @ k.transpose(1, 2) / math.sqrt(D)  # [H, n, n]
        if causal:
            n = end - start
            allowed = torch.ones(n, n, dtype=torch.bool, device=q.device).tril()
            scores = scores.masked_fill(~allowed, float("-inf"))
        out[start:end] = (scores.softmax(-1) @ v).transpose(0, 1).to(q_NHD.dtype)
    return out


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """x / sqrt(mean(x^2) + eps) * weight over the last dim, computed in fp32, returned in x.dtype."""
    compute_dtype = torch.promote_types(x.dtype, torch.float32)  # fp32, or fp64 for fp64 tests
    x32 = x.to(compute_dtype)
    rstd = torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return (x32 * rstd * weight.to(compute_dtype)).to(x.dtype)


def cross_entropy_chunk(
    logits_CV: torch.Tensor, targets_C: torch.Tensor, ignore_index: int, grad_scale_C: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per-row loss (fp32, 0 where ignored) of one chunk of logits and, if grad_scale_C is given,
    d(sum_r grad_scale_r * loss_r)/d logits in the logits' dtype. The Triton twin of this function
    overwrites the logits with their gradient; this one returns a new tensor."""
    logits32 = logits_CV.float()
    valid_C = targets_C != ignore_index
    safe_targets_C = torch.where(valid_C, targets_C, 0)
    lse_C = torch.logsumexp(logits32, dim=-1)
    target_logit_C = logits32.gather(1, safe_targets_C[:, None]).squeeze(1)
    loss_C = torch.where(valid_C, lse_C - target_logit_C, 0.0)
    if grad_scale_C is None:
        return loss_C, None
    grad32 = torch.softmax(logits32, dim=-1)
    grad32[torch.arange(len(targets_C), device=grad32.device), safe_targets_C] -= 1.0
    grad32 *= torch.where(valid_C, grad_scale_C.float(), 0.0)[:, None]
    return loss_C, grad32.to(logits_CV.dtype)


def linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    ignore_index: int = -100,
    reduction: str = "mean",
) -> torch.Tensor:
    """Cross-entropy of hidden @ weight.T against targets, chunked over rows (see chunked_ce.py)."""
    from .chunked_ce import linear_cross_entropy_chunked

    return linear_cross_entropy_chunked(hidden, weight, targets, ignore_index, reduction, cross_entropy_chunk)
