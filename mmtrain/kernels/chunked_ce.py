"""Linear + cross-entropy, chunked over rows so the full [N, V] logits never exist at once.

The chunk loop (_chunked_loss_and_grads) is shared by both backends; only the per-chunk "logits ->
loss and grad of logits" step differs (PyTorch in reference.py, a Triton kernel in cross_entropy.py).
The reference goes through the autograd.Function below, the Triton backend through custom ops in
cross_entropy.py (so torch.compile does not trace into the Triton launches).

Shape legend: N = rows (tokens), D = hidden dim, V = vocabulary, C = rows in one chunk.

For reduction "mean"/"sum" the gradients are computed during the forward, chunk by chunk (the
Liger-Kernel "fused linear cross entropy" recipe): each chunk's logits are used once for the loss
and once for the gradient, and freed. The backward only scales them by grad_output. For reduction
"none" the per-row weights of the gradient are only known in the backward, which therefore
recomputes the logits chunk by chunk.
"""

from __future__ import annotations

from typing import Callable

import torch

# Bound one chunk of logits to this many elements (2**27 bf16 = 256 MiB).
CHUNK_LOGIT_ELEMENTS = 2**27

# (logits_CV, targets_C, ignore_index, grad_scale_C or None) -> (loss_C fp32, grad_logits_CV or None)
ChunkFn = Callable[[torch.Tensor, torch.Tensor, int, "torch.Tensor | None"], "tuple[torch.Tensor, torch.Tensor | None]"]

REDUCTIONS = ("mean", "sum", "none")


def default_chunk_rows(vocab_size: int) -> int:
    """Rows per chunk: as many as fit CHUNK_LOGIT_ELEMENTS, rounded to a multiple of 128 (GEMM-friendly)."""
    return max(128, (CHUNK_LOGIT_ELEMENTS // vocab_size) // 128 * 128)


def _chunked_loss_and_grads(
    hidden_ND: torch.Tensor,
    weight_VD: torch.Tensor,
    targets_N: torch.Tensor,
    ignore_index: int,
    grad_scale_N: torch.Tensor | None,
    need_grad_hidden: bool,
    need_grad_weight: bool,
    chunk_fn: ChunkFn,
    chunk_rows: int,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Per-row loss [N] fp32 and, when grad_scale_N is given, the gradients of
    sum_r grad_scale_r * loss_r with respect to hidden and weight."""
    N = hidden_ND.shape[0]
    loss_N = torch.empty(N, dtype=torch.float32, device=hidden_ND.device)
    with_grad = grad_scale_N is not None
    grad_hidden_ND = torch.empty_like(hidden_ND) if with_grad and need_grad_hidden else None
    # fp32 accumulator: summing many chunks' contributions in bf16 would lose precision.
    grad_weight_VD = (
        torch.zeros(weight_VD.shape, dtype=torch.float32, device=weight_VD.device)
        if with_grad and need_grad_weight
        else None
    )
    for start in range(0, N, chunk_rows):
        end = min(start + chunk_rows, N)
        hidden_CD = hidden_ND[start:end]
        logits_CV = hidden_CD @ weight_VD.T
        scale_C = grad_scale_N[start:end] if with_grad else None
        loss_N[start:end], grad_logits_CV = chunk_fn(logits_CV, targets_N[start:end], ignore_index, scale_C)
        if grad_hidden_ND is not None:
            torch.matmul(grad_logits_CV, weight_VD, out=grad_hidden_ND[start:end])
        if grad_weight_VD is not None:
            if weight_VD.dtype == torch.float32:
                grad_weight_VD.addmm_(grad_logits_CV.T, hidden_CD)
            else:
                grad_weight_VD += grad_logits_CV.T @ hidden_CD
        del logits_CV, grad_logits_CV
    if grad_weight_VD is not None:
        grad_weight_VD = grad_weight_VD.to(weight_VD.dtype)
    return loss_N, grad_hidden_ND, grad_weight_VD


class LinearCrossEntropyFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden_ND, weight_VD, targets_N, ignore_index, reduction, chunk_fn, chunk_rows):
        ctx.reduction, ctx.ignore_index, ctx.chunk_fn, ctx.chunk_rows = reduction, ignore_index, chunk_fn, chunk_rows
        hidden_ND = hidden_ND.contiguous()  # its gradient is written chunk by chunk into row slices
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        if reduction == "none" or not (need_h or need_w):
            loss_N, _, _ = _chunked_loss_and_grads(
                hidden_ND, weight_VD, targets_N, ignore_index, None, False, False, chunk_fn, chunk_rows
            )
            ctx.save_for_backward(hidden_ND, weight_VD, targets_N)
            if reduction == "none":
                return loss_N
            return loss_N.sum() / _mean_denominator(targets_N, ignore_index, reduction)

        # mean/sum: gradients now, scaled by grad_output in the backward.
        denom = _mean_denominator(targets_N, ignore_index, reduction)
        grad_scale_N = (1.0 / denom).expand(hidden_ND.shape[0])
        loss_N, grad_h, grad_w = _chunked_loss_and_grads(
            hidden_ND, weight_VD, targets_N, ignore_index, grad_scale_N, need_h, need_w, chunk_fn, chunk_rows
        )
        ctx.save_for_backward(grad_h, grad_w)
        return loss_N.sum() / denom

    @staticmethod
    def backward(ctx, grad_out):
        if ctx.reduction == "none":
            hidden_ND, weight_VD, targets_N = ctx.saved_tensors
            _, grad_h, grad_w = _chunked_loss_and_grads(
                hidden_ND, weight_VD, targets_N, ctx.ignore_index, grad_out.float(),
                ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.chunk_fn, ctx.chunk_rows,
            )  # fmt: skip
        else:
            grad_h, grad_w = ctx.saved_tensors
            # grad_out is a 0-d tensor: multiply on device, no sync.
            grad_h = grad_h * grad_out.to(grad_h.dtype) if grad_h is not None else None
            grad_w = grad_w * grad_out.to(grad_w.dtype) if grad_w is not None else None
        return grad_h, grad_w, None, None, None, None, None


def _mean_denominator(targets_N: torch.Tensor, ignore_index: int, reduction: str) -> torch.Tensor:
    """Number of non-ignored targets for "mean" (at least 1, so no targets gives loss 0), else 1."""
    if reduction == "mean":
        return (targets_N != ignore_index).sum().clamp(min=1).float()
    return torch.ones((), dtype=torch.float32, device=targets_N.device)


def linear_cross_entropy_chunked(
    hidden_ND: torch.Tensor,
    weight_VD: torch.Tensor,
    targets_N: torch.Tensor,
    ignore_index: int,
    reduction: str,
    chunk_fn: ChunkFn,
    chunk_rows: int | None = None,
) -> torch.Tensor:
    if chunk_rows is None:
        chunk_rows = default_chunk_rows(weight_VD.shape[0])
    return LinearCrossEntropyFunction.apply(
        hidden_ND, weight_VD, targets_N, ignore_index, reduction, chunk_fn, chunk_rows
    )
