"""Cross-entropy over a chunk of logits in Triton, writing the logits' gradient in place.

Shape legend: C = rows of one chunk, V = vocabulary, B = BLOCK_V (vocabulary columns per step).

One program per row makes two passes over the row's logits (kept in their own dtype, e.g. bf16):
pass 1 an online max / sum-of-exp in fp32 gives lse and loss = lse - logit[target]; pass 2, when a
gradient is wanted, overwrites the logits with grad_scale * (softmax - onehot(target)). So the
chunk never exists in fp32 and its memory is reused for the gradient (Liger-Kernel's fused linear
cross entropy). Rows whose target is ignore_index get loss 0 and gradient 0.

The chunking over rows and the matmuls around this kernel are in chunked_ce.py.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from .chunked_ce import _chunked_loss_and_grads, _mean_denominator, default_chunk_rows

_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


@triton.jit
def _cross_entropy_kernel(
    logits_ptr, targets_ptr, grad_scale_ptr, loss_ptr, stride_row, V, ignore_index,
    HAS_GRAD: tl.constexpr, BLOCK_V: tl.constexpr,
):  # fmt: skip
    row = tl.program_id(0).to(tl.int64)  # row * stride can exceed 2**31 for big chunks
    row_ptr = logits_ptr + row * stride_row
    target = tl.load(targets_ptr + row)
    offs_B = tl.arange(0, BLOCK_V)

    if target == ignore_index:
        tl.store(loss_ptr + row, 0.0)
        if HAS_GRAD:
            for v_start in range(0, V, BLOCK_V):
                offs = v_start + offs_B
                tl.store(row_ptr + offs, tl.zeros([BLOCK_V], dtype=row_ptr.dtype.element_ty), mask=offs < V)
        return

    # Pass 1: running max m and running sum of exp(x - m), per lane, merged at the end.
    m_B = tl.full([BLOCK_V], float("-inf"), dtype=tl.float32)
    s_B = tl.zeros([BLOCK_V], dtype=tl.float32)
    for v_start in range(0, V, BLOCK_V):
        offs = v_start + offs_B
        x_B = tl.load(row_ptr + offs, mask=offs < V, other=float("-inf")).to(tl.float32)
        m_new_B = tl.maximum(m_B, x_B)
        # Lanes still at -inf would give exp(-inf - -inf) = nan; they hold nothing yet.
        s_B = tl.where(m_new_B == float("-inf"), 0.0, s_B * tl.exp(m_B - m_new_B) + tl.exp(x_B - m_new_B))
        m_B = m_new_B
    m = tl.max(m_B, 0)
    lse = m + tl.log(tl.sum(s_B * tl.exp(m_B - m), 0))
    target_logit = tl.load(row_ptr + target).to(tl.float32)
    tl.store(loss_ptr + row, lse - target_logit)

    # Pass 2: d loss / d logits = softmax - onehot(target), times this row's grad scale.
    if HAS_GRAD:
        scale = tl.load(grad_scale_ptr + row)
        for v_start in range(0, V, BLOCK_V):
            offs = v_start + offs_B
            x_B = tl.load(row_ptr + offs, mask=offs < V, other=0.0).to(tl.float32)
            g_B = tl.exp(x_B - lse) - tl.where(offs == target, 1.0, 0.0)
            tl.store(row_ptr + offs, (g_B * scale).to(row_ptr.dtype.element_ty), mask=offs < V)


def cross_entropy_chunk_(
    logits_CV: torch.Tensor, targets_C: torch.Tensor, ignore_index: int, grad_scale_C: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per-row loss [C] (fp32) and, if grad_scale_C is given, the gradient of
    sum_r grad_scale_r * loss_r written INTO logits_CV (returned)."""
    C, V = logits_CV.shape
    if logits_CV.stride(1) != 1:
        raise ValueError("cross_entropy_chunk_ needs logits with unit stride over the vocabulary")
    loss_C = torch.empty(C, dtype=torch.float32, device=logits_CV.device)
    has_grad = grad_scale_C is not None
    # A dummy pointer when there is no gradient; the kernel never reads it then.
    scale_C = grad_scale_C.float().contiguous() if has_grad else loss_C
    block_v = 64 if _INTERPRET else min(8192, triton.next_power_of_2(V))
    if C > 0:
        _cross_entropy_kernel[(C,)](
            logits_CV, targets_C.contiguous(), scale_C, loss_C, logits_CV.stride(0), V, ignore_index,
            HAS_GRAD=has_grad, BLOCK_V=block_v, num_warps=1 if _INTERPRET else 16 if block_v >= 4096 else 8,
        )  # fmt: skip
    return loss_C, (logits_CV if has_grad else None)


# The chunked loop as custom ops (torch.library), so torch.compile keeps the Triton launches and
# the chunk loop opaque (see flash_attention.py). Same math as chunked_ce.LinearCrossEntropyFunction,
# which the reference backend uses: for "mean"/"sum" the gradients are computed in the forward and
# scaled in the backward; for "none" the backward recomputes the logits chunk by chunk. Gradients
# that are not needed come back as empty tensors (a custom op cannot return None).


@torch.library.custom_op("mmtrain::linear_cross_entropy_fwd", mutates_args=())
def _fwd_op(hidden_ND: torch.Tensor, weight_VD: torch.Tensor, targets_N: torch.Tensor, ignore_index: int,
            reduction: str, need_h: bool, need_w: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    chunk_rows = default_chunk_rows(weight_VD.shape[0])
    if reduction == "none" or not (need_h or need_w):
        loss_N, _, _ = _chunked_loss_and_grads(hidden_ND, weight_VD, targets_N, ignore_index, None, False, False,
                                               cross_entropy_chunk_, chunk_rows)  # fmt: skip
        loss = loss_N if reduction == "none" else loss_N.sum() / _mean_denominator(targets_N, ignore_index, reduction)
        return loss, hidden_ND.new_empty(0), weight_VD.new_empty(0)
    denom = _mean_denominator(targets_N, ignore_index, reduction)
    grad_scale_N = (1.0 / denom).expand(hidden_ND.shape[0])
    loss_N, grad_h, grad_w = _chunked_loss_and_grads(hidden_ND, weight_VD, targets_N, ignore_index, grad_scale_N,
                                                     need_h, need_w, cross_entropy_chunk_, chunk_rows)  # fmt: skip
    empty_h, empty_w = hidden_ND.new_empty(0), weight_VD.new_empty(0)
    return loss_N.sum() / denom, grad_h if grad_h is not None else empty_h, grad_w if grad_w is not None else empty_w


@_fwd_op.register_fake
def _(hidden_ND, weight_VD, targets_N, ignore_index, reduction, need_h, need_w):
    N = hidden_ND.shape[0]
    loss = hidden_ND.new_empty((N,) if reduction == "none" else (), dtype=torch.float32)
    with_grads = reduction != "none" and (need_h or need_w)
    grad_h = torch.empty_like(hidden_ND) if with_grads and need_h else hidden_ND.new_empty(0)
    grad_w = torch.empty_like(weight_VD) if with_grads and need_w else weight_VD.new_empty(0)
    return loss, grad_h, grad_w


@torch.library.custom_op("mmtrain::linear_cross_entropy_bwd_none", mutates_args=())
def _bwd_none_op(grad_N: torch.Tensor, hidden_ND: torch.Tensor, weight_VD: torch.Tensor, targets_N: torch.Tensor,
                 ignore_index: int, need_h: bool, need_w: bool) -> tuple[torch.Tensor, torch.Tensor]:
    _, grad_h, grad_w = _chunked_loss_and_grads(hidden_ND, weight_VD, targets_N, ignore_index, grad_N.float(), need_h,
                                                need_w, cross_entropy_chunk_, default_chunk_rows(weight_VD.shape[0]))
    return (grad_h if grad_h is not None else hidden_ND.new_empty(0),
            grad_w if grad_w is not None else weight_VD.new_empty(0))  # fmt: skip


@_bwd_none_op.register_fake
def _(grad_N, hidden_ND, weight_VD, targets_N, ignore_index, need_h, need_w):
    return (torch.empty_like(hidden_ND) if need_h else hidden_ND.new_empty(0),
            torch.empty_like(weight_VD) if need_w else weight_VD.new_empty(0))  # fmt: skip


def _setup_context(ctx, inputs, output):
    hidden_ND, weight_VD, targets_N, ignore_index, reduction, need_h, need_w = inputs
    ctx.reduction, ctx.ignore_index, ctx.need = reduction, ignore_index, (need_h, need_w)
    if reduction == "none":
        ctx.save_for_backward(hidden_ND, weight_VD, targets_N)
    else:
        ctx.save_for_backward(output[1], output[2])
    ctx.mark_non_differentiable(output[1], output[2])


def _backward(ctx, grad_loss, _grad_h, _grad_w):
    need_h, need_w = ctx.need
    if ctx.reduction == "none":
        hidden_ND, weight_VD, targets_N = ctx.saved_tensors
        grad_h, grad_w = _bwd_none_op(grad_loss, hidden_ND, weight_VD, targets_N, ctx.ignore_index, need_h, need_w)
    else:
        grad_h, grad_w = ctx.saved_tensors
        # grad_loss is a 0-d tensor: multiply on device, no sync.
        grad_h, grad_w = grad_h * grad_loss.to(grad_h.dtype), grad_w * grad_loss.to(grad_w.dtype)
    return (grad_h if need_h else None, grad_w if need_w else None, None, None, None, None, None)


_fwd_op.register_autograd(_backward, setup_context=_setup_context)


def linear_cross_entropy(
    hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100, reduction: str = "mean"
) -> torch.Tensor:
    """Triton-backed linear cross-entropy; inputs are validated by mmtrain.kernels."""
    need_h = hidden.requires_grad and torch.is_grad_enabled()
    need_w = weight.requires_grad and torch.is_grad_enabled()
    # contiguous: the gradient of hidden is written chunk by chunk into row slices
    loss, _, _ = _fwd_op(hidden.contiguous(), weight, targets, ignore_index, reduction, need_h, need_w)
    return loss
