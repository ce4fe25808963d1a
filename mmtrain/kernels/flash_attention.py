"""Flash attention (FA2-style) over packed documents, forward and backward, in Triton.

Shape legend: N = total packed tokens, H = query heads, K = key/value heads, D = head dim,
M = query rows of one tile (BLOCK_M), T = key/value rows of one tile (BLOCK_N).

Layout: q [N, H, D], k/v [N, K, D], cu_seqlens int32 [num_docs + 1]. Every program works inside one
document: the grid is (tile index within the document, document, head), so a tile never straddles
two documents, and programs whose tile starts past their document's end exit at once. Tiles that are
entirely above the causal diagonal are never visited: the loop bounds stop at the diagonal. In the
forward and dq kernels only the tiles that touch the diagonal or the document's end are masked; the
others run a mask-free loop.

Query head h reads key/value head h // (H / K) (grouped-query attention); in the backward each
key/value program sums dk/dv over the H / K query heads of its group, so there are no atomics and
the result is deterministic.

The forward saves the output and the log-sum-exp of each row (base 2, of the scores already scaled
by softmax_scale * log2(e)), nothing else. The backward recomputes the probabilities from it.
"""

from __future__ import annotations

import math
import os

import torch
import triton
import triton.language as tl

LOG2_E = 1.4426950408889634
SUPPORTED_HEAD_DIMS = (16, 32, 64, 128)

_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


def _autotune(hopper: dict[int, list[tuple[int, int, int, int]]], interpret: tuple[int, int]) -> dict:
    """triton.autotune arguments. hopper maps a head dim (64 or 128; smaller dims use 64's list) to
    its candidates (BLOCK_M, BLOCK_N, num_warps, num_stages): each list was checked to compile for
    sm_90a within shared memory and without register spills beyond a few bytes, with Triton 3.6
    and 3.9 (benchmarks/gpu_compile_check.py).
    Under the interpreter: one small config, so tests do not benchmark and still cross tile edges."""
    if _INTERPRET:
        config = triton.Config({"BLOCK_M": interpret[0], "BLOCK_N": interpret[1]}, num_warps=1, num_stages=1)
        return dict(configs=[config], key=["HEAD_DIM", "CAUSAL", "seqlen_bucket"])
    candidates = {c for cs in hopper.values() for c in cs}
    configs = [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s) for m, n, w, s in sorted(candidates)]

    def for_head_dim(configs, named_args, **kwargs):
        head_dim = kwargs.get("HEAD_DIM", named_args.get("HEAD_DIM"))
        wanted = set(hopper[128 if head_dim > 64 else 64])
        return [c for c in configs if (c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages) in wanted]

    key = ["HEAD_DIM", "CAUSAL", "seqlen_bucket"]
    return dict(configs=configs, key=key, prune_configs_by={"early_config_prune": for_head_dim})


def _seqlen_bucket(max_seqlen: int) -> int:
    """Autotune key for the document lengths: short documents favour other tiles than long ones.
    Powers of two from 16 to 4096, all multiples of 16, so Triton compiles the kernel only once for
    all of them (it specializes integer arguments on divisibility by 16) and only re-benchmarks."""
    return min(max(16, triton.next_power_of_2(max_seqlen)), 4096)


# Forward and dq loop over key tiles for one query tile: BLOCK_M must be a multiple of BLOCK_N so the
# causal diagonal starts on a key-tile edge (the mask-free loop stops there). The dk/dv kernel's
# lists keep the transposed shape (BLOCK_N, its key tile, a multiple of BLOCK_M).
_FWD_AUTOTUNE = _autotune(
    {64: [(128, 64, 4, 3), (128, 64, 8, 3), (128, 128, 8, 3), (64, 64, 4, 4)],
     128: [(128, 64, 8, 3), (128, 64, 8, 4), (128, 128, 8, 3), (64, 64, 4, 3)]},
    interpret=(32, 16),
)  # fmt: skip
_BWD_DQ_AUTOTUNE = _autotune(
    {64: [(128, 64, 8, 2), (128, 32, 4, 3), (64, 64, 4, 3), (64, 64, 4, 2), (64, 32, 4, 2)],
     128: [(128, 64, 8, 2), (128, 32, 8, 3), (64, 64, 8, 3)]},
    interpret=(32, 16),
)  # fmt: skip
_BWD_DKV_AUTOTUNE = _autotune(
    {64: [(32, 128, 8, 3), (64, 128, 8, 3), (32, 64, 4, 3), (64, 64, 4, 3)],
     128: [(32, 64, 8, 3), (32, 128, 8, 3), (64, 64, 8, 2), (32, 64, 4, 3)]},
    interpret=(16, 32),
)  # fmt: skip


# --------------------------------------------------------------------------------------------- forward


@triton.jit
def _fwd_inner(
    acc_MD, m_M, l_M, q_MD, k_ptr, v_ptr, stride_kn, stride_vn,
    offs_m, offs_d, seqlen, n_lo, n_hi, qk_scale,
    MASKED: tl.constexpr, CAUSAL: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    """Online softmax over key tiles [n_lo, n_hi) of one document. MASKED applies the document-end
    and causal masks (only needed on the tiles touching them)."""
    offs_t = tl.arange(0, BLOCK_N)
    for n_start in range(n_lo, n_hi, BLOCK_N):
        offs_n = n_start + offs_t
        k_ptrs = k_ptr + offs_n[:, None] * stride_kn + offs_d[None, :]
        v_ptrs = v_ptr + offs_n[:, None] * stride_vn + offs_d[None, :]
        if MASKED:  # the last tile may run past the document
            k_TD = tl.load(k_ptrs, mask=offs_n[:, None] < seqlen, other=0.0)
            v_TD = tl.load(v_ptrs, mask=offs_n[:, None] < seqlen, other=0.0)
        else:
            k_TD = tl.load(k_ptrs)
            v_TD = tl.load(v_ptrs)
        s_MT = tl.dot(q_MD, tl.trans(k_TD)) * qk_scale
        if MASKED:
            keep_MT = offs_n[None, :] < seqlen
            if CAUSAL:
                keep_MT = keep_MT & (offs_m[:, None] >= offs_n[None, :])
            s_MT = tl.where(keep_MT, s_MT, float("-inf"))
        m_new_M = tl.maximum(m_M, tl.max(s_MT, 1))
        p_MT = tl.exp2(s_MT - m_new_M[:, None])
        alpha_M = tl.exp2(m_M - m_new_M)
        l_M = l_M * alpha_M + tl.sum(p_MT, 1)
        acc_MD = tl.dot(p_MT.to(v_TD.dtype), v_TD, acc_MD * alpha_M[:, None])
        m_M = m_new_M
    return acc_MD, m_M, l_M


@triton.autotune(**_FWD_AUTOTUNE)
@triton.jit
def _fwd_kernel(
    q_ptr, k_ptr, v_ptr, o_ptr, lse_ptr, cu_seqlens_ptr, qk_scale, seqlen_bucket,
    stride_qn, stride_qh, stride_kn, stride_kh, stride_vn, stride_vh, stride_on, stride_oh, stride_lse_h,
    GROUP: tl.constexpr, CAUSAL: tl.constexpr, HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    pid_m, doc, head = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    if CAUSAL:  # the last query tiles have the most keys to visit: launch them first
        pid_m = tl.num_programs(0) - 1 - pid_m
    doc_start = tl.load(cu_seqlens_ptr + doc)
    seqlen = tl.load(cu_seqlens_ptr + doc + 1) - doc_start
    m_start = pid_m * BLOCK_M
    if m_start >= seqlen:  # the grid is sized for the longest document
        return
    kv_head = head // GROUP
    offs_m = m_start + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    row_mask = offs_m[:, None] < seqlen
    q_MD = tl.load(
        q_ptr + (doc_start + offs_m[:, None]) * stride_qn + head * stride_qh + offs_d[None, :], mask=row_mask, other=0.0
    )
    k_ptr += doc_start * stride_kn + kv_head * stride_kh
    v_ptr += doc_start * stride_vn + kv_head * stride_vh

    m_M = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_M = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc_MD = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    # Key tiles [0, mask_from) need no mask: all keys are inside the document and (causal) at or
    # below every query row of this tile. Tiles [mask_from, n_end) are masked. Causal: nothing past
    # the tile's last row is visited.
    if CAUSAL:
        mask_from = m_start
        n_end = tl.minimum(m_start + BLOCK_M, seqlen)
    else:
        mask_from = (seqlen // BLOCK_N) * BLOCK_N
        n_end = seqlen
    acc_MD, m_M, l_M = _fwd_inner(
        acc_MD, m_M, l_M, q_MD, k_ptr, v_ptr, stride_kn, stride_vn, offs_m, offs_d, seqlen,
        0, mask_from, qk_scale, False, CAUSAL, BLOCK_N,
    )  # fmt: skip
    acc_MD, m_M, l_M = _fwd_inner(
        acc_MD, m_M, l_M, q_MD, k_ptr, v_ptr, stride_kn, stride_vn, offs_m, offs_d, seqlen,
        mask_from, n_end, qk_scale, True, CAUSAL, BLOCK_N,
    )  # fmt: skip
    # Every real row saw at least its own key, so l_M > 0 there; padding rows are not stored.
    acc_MD = acc_MD / l_M[:, None]
    tl.store(
        o_ptr + (doc_start + offs_m[:, None]) * stride_on + head * stride_oh + offs_d[None, :],
        acc_MD.to(o_ptr.dtype.element_ty),
        mask=row_mask,
    )
    tl.store(lse_ptr + head * stride_lse_h + doc_start + offs_m, m_M + tl.log2(l_M), mask=offs_m < seqlen)


# -------------------------------------------------------------------------------------------- backward


@triton.jit
def _bwd_delta_kernel(o_ptr, do_ptr, delta_ptr, N, H, HEAD_DIM: tl.constexpr, BLOCK: tl.constexpr):
    """delta[h, n] = sum_d o[n, h, d] * do[n, h, d] (o, do contiguous [N, H, D]); the rowwise term
    of softmax's backward."""
    pid = tl.program_id(0)
    offs_r = pid * BLOCK + tl.arange(0, BLOCK)  # flat (token, head) rows
    offs_d = tl.arange(0, HEAD_DIM)
    mask = offs_r[:, None] < N * H
    o_RD = tl.load(o_ptr + offs_r[:, None] * HEAD_DIM + offs_d[None, :], mask=mask, other=0.0).to(tl.float32)
    do_RD = tl.load(do_ptr + offs_r[:, None] * HEAD_DIM + offs_d[None, :], mask=mask, other=0.0).to(tl.float32)
    token, head = offs_r // H, offs_r % H
    tl.store(delta_ptr + head * N + token, tl.sum(o_RD * do_RD, 1), mask=offs_r < N * H)


@triton.jit
def _bwd_dq_inner(
    dq_MD, q_MD, do_MD, lse_M, delta_M, k_ptr, v_ptr, stride_kn, stride_vn,
    offs_m, offs_d, seqlen, n_lo, n_hi, qk_scale,
    MASKED: tl.constexpr, CAUSAL: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    offs_t = tl.arange(0, BLOCK_N)
    for n_start in range(n_lo, n_hi, BLOCK_N):
        offs_n = n_start + offs_t
        k_ptrs = k_ptr + offs_n[:, None] * stride_kn + offs_d[None, :]
        v_ptrs = v_ptr + offs_n[:, None] * stride_vn + offs_d[None, :]
        if MASKED:  # the last tile may run past the document
            k_TD = tl.load(k_ptrs, mask=offs_n[:, None] < seqlen, other=0.0)
            v_TD = tl.load(v_ptrs, mask=offs_n[:, None] < seqlen, other=0.0)
        else:
            k_TD = tl.load(k_ptrs)
            v_TD = tl.load(v_ptrs)
        p_MT = tl.exp2(tl.dot(q_MD, tl.trans(k_TD)) * qk_scale - lse_M[:, None])
        if MASKED:
            keep_MT = offs_n[None, :] < seqlen
            if CAUSAL:
                keep_MT = keep_MT & (offs_m[:, None] >= offs_n[None, :])
            p_MT = tl.where(keep_MT, p_MT, 0.0)
        dp_MT = tl.dot(do_MD, tl.trans(v_TD))
        ds_MT = p_MT * (dp_MT - delta_M[:, None])
        dq_MD = tl.dot(ds_MT.to(k_TD.dtype), k_TD, dq_MD)
    return dq_MD


@triton.autotune(**_BWD_DQ_AUTOTUNE)
@triton.jit
def _bwd_dq_kernel(
    q_ptr, k_ptr, v_ptr, do_ptr, dq_ptr, lse_ptr, delta_ptr, cu_seqlens_ptr, qk_scale, sm_scale, seqlen_bucket,
    stride_qn, stride_qh, stride_kn, stride_kh, stride_vn, stride_vh, stride_lse_h,
    GROUP: tl.constexpr, CAUSAL: tl.constexpr, HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    """dq for one query tile: the forward's loop again, with p recomputed from the saved lse.
    q, do and dq share q's strides (do and dq are made contiguous like q)."""
    pid_m, doc, head = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    if CAUSAL:  # the last query tiles have the most keys to visit: launch them first
        pid_m = tl.num_programs(0) - 1 - pid_m
    doc_start = tl.load(cu_seqlens_ptr + doc)
    seqlen = tl.load(cu_seqlens_ptr + doc + 1) - doc_start
    m_start = pid_m * BLOCK_M
    if m_start >= seqlen:
        return
    kv_head = head // GROUP
    offs_m = m_start + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    row_mask = offs_m[:, None] < seqlen
    q_offsets = (doc_start + offs_m[:, None]) * stride_qn + head * stride_qh + offs_d[None, :]
    q_MD = tl.load(q_ptr + q_offsets, mask=row_mask, other=0.0)
    do_MD = tl.load(do_ptr + q_offsets, mask=row_mask, other=0.0)
    lse_M = tl.load(lse_ptr + head * stride_lse_h + doc_start + offs_m, mask=offs_m < seqlen, other=0.0)
    delta_M = tl.load(delta_ptr + head * stride_lse_h + doc_start + offs_m, mask=offs_m < seqlen, other=0.0)
    k_ptr += doc_start * stride_kn + kv_head * stride_kh
    v_ptr += doc_start * stride_vn + kv_head * stride_vh

    dq_MD = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    if CAUSAL:
        mask_from = m_start
        n_end = tl.minimum(m_start + BLOCK_M, seqlen)
    else:
        mask_from = (seqlen // BLOCK_N) * BLOCK_N
        n_end = seqlen
    dq_MD = _bwd_dq_inner(
        dq_MD, q_MD, do_MD, lse_M, delta_M, k_ptr, v_ptr, stride_kn, stride_vn, offs_m, offs_d, seqlen,
        0, mask_from, qk_scale, False, CAUSAL, BLOCK_N,
    )  # fmt: skip
    dq_MD = _bwd_dq_inner(
        dq_MD, q_MD, do_MD, lse_M, delta_M, k_ptr, v_ptr, stride_kn, stride_vn, offs_m, offs_d, seqlen,
        mask_from, n_end, qk_scale, True, CAUSAL, BLOCK_N,
    )  # fmt: skip
    tl.store(dq_ptr + q_offsets, (dq_MD * sm_scale).to(dq_ptr.dtype.element_ty), mask=row_mask)


@triton.jit
def _bwd_dkv_inner(
    dk_TD, dv_TD, k_TD, v_TD, q_ptr, do_ptr, lse_ptr, delta_ptr, stride_qn,
    offs_n, offs_d, seqlen, m_lo, m_hi, qk_scale,
    CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr,
):  # fmt: skip
    """Accumulate dk, dv of one key tile over query tiles [m_lo, m_hi) of one query head. Works on
    transposed scores (keys x queries) so no accumulator needs transposing."""
    offs_r = tl.arange(0, BLOCK_M)
    for m_start in range(m_lo, m_hi, BLOCK_M):
        offs_m = m_start + offs_r
        q_mask = offs_m[:, None] < seqlen
        q_MD = tl.load(q_ptr + offs_m[:, None] * stride_qn + offs_d[None, :], mask=q_mask, other=0.0)
        do_MD = tl.load(do_ptr + offs_m[:, None] * stride_qn + offs_d[None, :], mask=q_mask, other=0.0)
        lse_M = tl.load(lse_ptr + offs_m, mask=offs_m < seqlen, other=0.0)
        delta_M = tl.load(delta_ptr + offs_m, mask=offs_m < seqlen, other=0.0)
        pT_TM = tl.exp2(tl.dot(k_TD, tl.trans(q_MD)) * qk_scale - lse_M[None, :])
        keep_TM = offs_m[None, :] < seqlen
        if CAUSAL:
            keep_TM = keep_TM & (offs_m[None, :] >= offs_n[:, None])
        pT_TM = tl.where(keep_TM, pT_TM, 0.0)
        dv_TD = tl.dot(pT_TM.to(do_MD.dtype), do_MD, dv_TD)
        dpT_TM = tl.dot(v_TD, tl.trans(do_MD))
        dsT_TM = pT_TM * (dpT_TM - delta_M[None, :])
        dk_TD = tl.dot(dsT_TM.to(q_MD.dtype), q_MD, dk_TD)
    return dk_TD, dv_TD


@triton.autotune(**_BWD_DKV_AUTOTUNE)
@triton.jit
def _bwd_dkv_kernel(
    q_ptr, k_ptr, v_ptr, do_ptr, dk_ptr, dv_ptr, lse_ptr, delta_ptr, cu_seqlens_ptr, qk_scale, sm_scale,
    seqlen_bucket, stride_qn, stride_qh, stride_kn, stride_kh, stride_lse_h,
    GROUP: tl.constexpr, CAUSAL: tl.constexpr, HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    """dk, dv for one key tile of one key/value head, summed over the GROUP query heads that read
    it. k, v, dk, dv share k's strides; q and do share q's."""
    pid_n, doc, kv_head = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    doc_start = tl.load(cu_seqlens_ptr + doc)
    seqlen = tl.load(cu_seqlens_ptr + doc + 1) - doc_start
    n_start = pid_n * BLOCK_N
    if n_start >= seqlen:
        return
    offs_n = n_start + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    kv_mask = offs_n[:, None] < seqlen
    kv_offsets = (doc_start + offs_n[:, None]) * stride_kn + kv_head * stride_kh + offs_d[None, :]
    k_TD = tl.load(k_ptr + kv_offsets, mask=kv_mask, other=0.0)
    v_TD = tl.load(v_ptr + kv_offsets, mask=kv_mask, other=0.0)

    # Causal: queries before the key tile never see it, so the loop starts at the tile's first key.
    # One masked loop (unlike the forward): a separate mask-free loop here costs registers that the
    # two fp32 accumulators need (checked with benchmarks/gpu_compile_check.py: spills at D=128).
    m_lo = n_start if CAUSAL else 0

    dk_TD = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
    dv_TD = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
    for g in range(GROUP):
        head = kv_head * GROUP + g
        dk_TD, dv_TD = _bwd_dkv_inner(
            dk_TD, dv_TD, k_TD, v_TD,
            q_ptr + doc_start * stride_qn + head * stride_qh, do_ptr + doc_start * stride_qn + head * stride_qh,
            lse_ptr + head * stride_lse_h + doc_start, delta_ptr + head * stride_lse_h + doc_start, stride_qn,
            offs_n, offs_d, seqlen, m_lo, seqlen, qk_scale, CAUSAL, BLOCK_M,
        )  # fmt: skip
    tl.store(dk_ptr + kv_offsets, (dk_TD * sm_scale).to(dk_ptr.dtype.element_ty), mask=kv_mask)
    tl.store(dv_ptr + kv_offsets, dv_TD.to(dv_ptr.dtype.element_ty), mask=kv_mask)


# ---------------------------------------------------------------------------- custom ops + entry


def _attention_forward(q_NHD, k_NKD, v_NKD, cu_seqlens, causal, max_seqlen):
    N, H, D = q_NHD.shape
    K = k_NKD.shape[1]
    num_docs = cu_seqlens.numel() - 1
    o_NHD = torch.empty_like(q_NHD)
    lse_HN = torch.empty((H, N), dtype=torch.float32, device=q_NHD.device)
    sm_scale = 1.0 / math.sqrt(D)
    grid = lambda meta: (triton.cdiv(max_seqlen, meta["BLOCK_M"]), num_docs, H)  # noqa: E731
    _fwd_kernel[grid](
        q_NHD, k_NKD, v_NKD, o_NHD, lse_HN, cu_seqlens, sm_scale * LOG2_E, _seqlen_bucket(max_seqlen),
        q_NHD.stride(0), q_NHD.stride(1), k_NKD.stride(0), k_NKD.stride(1), v_NKD.stride(0), v_NKD.stride(1),
        o_NHD.stride(0), o_NHD.stride(1), lse_HN.stride(0),
        GROUP=H // K, CAUSAL=causal, HEAD_DIM=D,
    )  # fmt: skip
    return o_NHD, lse_HN


def _attention_backward(do_NHD, q_NHD, k_NKD, v_NKD, o_NHD, lse_HN, cu_seqlens, causal, max_seqlen):
    N, H, D = q_NHD.shape
    K = k_NKD.shape[1]
    num_docs = cu_seqlens.numel() - 1
    sm_scale = 1.0 / math.sqrt(D)
    delta_HN = torch.empty_like(lse_HN)
    _bwd_delta_kernel[(triton.cdiv(N * H, 64),)](o_NHD, do_NHD, delta_HN, N, H, HEAD_DIM=D, BLOCK=64)

    dq_NHD = torch.empty_like(q_NHD)
    grid_q = lambda meta: (triton.cdiv(max_seqlen, meta["BLOCK_M"]), num_docs, H)  # noqa: E731
    _bwd_dq_kernel[grid_q](
        q_NHD, k_NKD, v_NKD, do_NHD, dq_NHD, lse_HN, delta_HN, cu_seqlens, sm_scale * LOG2_E, sm_scale,
        _seqlen_bucket(max_seqlen),
        q_NHD.stride(0), q_NHD.stride(1), k_NKD.stride(0), k_NKD.stride(1), v_NKD.stride(0), v_NKD.stride(1),
        lse_HN.stride(0), GROUP=H // K, CAUSAL=causal, HEAD_DIM=D,
    )  # fmt: skip

    dk_NKD, dv_NKD = torch.empty_like(k_NKD), torch.empty_like(v_NKD)
    grid_kv = lambda meta: (triton.cdiv(max_seqlen, meta["BLOCK_N"]), num_docs, K)  # noqa: E731
    _bwd_dkv_kernel[grid_kv](
        q_NHD, k_NKD, v_NKD, do_NHD, dk_NKD, dv_NKD, lse_HN, delta_HN, cu_seqlens, sm_scale * LOG2_E, sm_scale,
        _seqlen_bucket(max_seqlen),
        q_NHD.stride(0), q_NHD.stride(1), k_NKD.stride(0), k_NKD.stride(1), lse_HN.stride(0),
        GROUP=H // K, CAUSAL=causal, HEAD_DIM=D,
    )  # fmt: skip
    return dq_NHD, dk_NKD, dv_NKD


# Custom ops (torch.library), not an autograd.Function: torch.compile treats them as opaque calls
# with known output shapes (the fake implementations) instead of tracing into the Triton launches,
# whose autotuner (prune_configs_by) and grid lambdas it does not support.


@torch.library.custom_op("mmtrain::flash_attention_fwd", mutates_args=())
def _fwd_op(q_NHD: torch.Tensor, k_NKD: torch.Tensor, v_NKD: torch.Tensor, cu_seqlens: torch.Tensor,
            causal: bool, max_seqlen: int) -> tuple[torch.Tensor, torch.Tensor]:
    return _attention_forward(q_NHD, k_NKD, v_NKD, cu_seqlens, causal, max_seqlen)


@_fwd_op.register_fake
def _(q_NHD, k_NKD, v_NKD, cu_seqlens, causal, max_seqlen):
    N, H, _ = q_NHD.shape
    return torch.empty_like(q_NHD), q_NHD.new_empty((H, N), dtype=torch.float32)


@torch.library.custom_op("mmtrain::flash_attention_bwd", mutates_args=())
def _bwd_op(do_NHD: torch.Tensor, q_NHD: torch.Tensor, k_NKD: torch.Tensor, v_NKD: torch.Tensor,
            o_NHD: torch.Tensor, lse_HN: torch.Tensor, cu_seqlens: torch.Tensor, causal: bool,
            max_seqlen: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _attention_backward(do_NHD.contiguous(), q_NHD, k_NKD, v_NKD, o_NHD, lse_HN, cu_seqlens, causal, max_seqlen)


@_bwd_op.register_fake
def _(do_NHD, q_NHD, k_NKD, v_NKD, o_NHD, lse_HN, cu_seqlens, causal, max_seqlen):
    return torch.empty_like(q_NHD), torch.empty_like(k_NKD), torch.empty_like(v_NKD)


def _setup_context(ctx, inputs, output):
    q_NHD, k_NKD, v_NKD, cu_seqlens, causal, max_seqlen = inputs
    o_NHD, lse_HN = output
    ctx.save_for_backward(q_NHD, k_NKD, v_NKD, o_NHD, lse_HN, cu_seqlens)
    ctx.causal, ctx.max_seqlen = causal, max_seqlen
    ctx.mark_non_differentiable(lse_HN)


def _backward(ctx, do_NHD, dlse_HN):
    q_NHD, k_NKD, v_NKD, o_NHD, lse_HN, cu_seqlens = ctx.saved_tensors
    dq, dk, dv = _bwd_op(do_NHD, q_NHD, k_NKD, v_NKD, o_NHD, lse_HN, cu_seqlens, ctx.causal, ctx.max_seqlen)
    return dq, dk, dv, None, None, None


_fwd_op.register_autograd(_backward, setup_context=_setup_context)


def flash_attention(q_NHD, k_NKD, v_NKD, cu_seqlens, causal: bool, max_seqlen: int) -> torch.Tensor:
    """Triton attention; inputs are validated by mmtrain.kernels.attention."""
    D = q_NHD.shape[2]
    if D not in SUPPORTED_HEAD_DIMS:
        raise ValueError(f"Triton attention supports head dims {SUPPORTED_HEAD_DIMS}, got {D}")
    # fp32 is for the interpreter (tests); its tiles were not sized for a GPU's shared memory.
    supported = (torch.float16, torch.bfloat16) if q_NHD.is_cuda else (torch.float16, torch.bfloat16, torch.float32)
    if q_NHD.dtype not in supported:
        raise ValueError(f"Triton attention on {q_NHD.device.type} supports {supported}, got {q_NHD.dtype}")
    if max(q_NHD.numel(), k_NKD.numel()) >= 2**31:  # offsets are int32 in the kernels
        raise ValueError(f"Triton attention supports fewer than 2**31 elements per tensor, got q {tuple(q_NHD.shape)}")
    if cu_seqlens.numel() - 1 > 65535:
        raise ValueError(f"Triton attention supports at most 65535 documents per call, got {cu_seqlens.numel() - 1}")
    if max_seqlen == 0:
        return torch.empty_like(q_NHD)
    # Contiguous [N, heads, D]: the kernels assume unit stride over D, and the backward reuses
    # q's strides for do/dq and k's for v/dk/dv.
    o_NHD, _ = _fwd_op(q_NHD.contiguous(), k_NKD.contiguous(), v_NKD.contiguous(), cu_seqlens, causal, max_seqlen)
    return o_NHD
