"""Fused RMSNorm forward and backward in Triton.

Shape legend: R = rows (all leading dims flattened), D = normalised dim, B = BLOCK_D (D rounded up
to a power of two), P = programs of the backward.

y = x * rstd * w with rstd = 1 / sqrt(mean(x^2) + eps), all in fp32, y stored in x's dtype.
The forward saves rstd [R] (fp32) for the backward. Backward, with x_hat = x * rstd:
    dx = rstd * (dy * w - x_hat * mean(dy * w * x_hat))
    dw = sum over rows of dy * x_hat
dw is reduced without atomics: each of P programs walks rows pid, pid + P, ... and writes its own
fp32 partial sum [D]; the P partials are summed afterwards (deterministic).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


@triton.jit
def _rms_norm_fwd_kernel(x_ptr, w_ptr, y_ptr, rstd_ptr, stride_x, stride_y, D, eps, BLOCK_D: tl.constexpr):
    row = tl.program_id(0)
    offs_B = tl.arange(0, BLOCK_D)
    mask_B = offs_B < D
    x_B = tl.load(x_ptr + row * stride_x + offs_B, mask=mask_B, other=0.0).to(tl.float32)
    w_B = tl.load(w_ptr + offs_B, mask=mask_B, other=0.0).to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(x_B * x_B, 0) / D + eps)
    tl.store(y_ptr + row * stride_y + offs_B, (x_B * rstd * w_B).to(y_ptr.dtype.element_ty), mask=mask_B)
    tl.store(rstd_ptr + row, rstd)


@triton.jit
def _rms_norm_bwd_kernel(
    dy_ptr, x_ptr, w_ptr, rstd_ptr, dx_ptr, dw_partial_ptr,
    stride_dy, stride_x, stride_dx, R, D, ROWS_PER_PROGRAM, BLOCK_D: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    offs_B = tl.arange(0, BLOCK_D)
    mask_B = offs_B < D
    w_B = tl.load(w_ptr + offs_B, mask=mask_B, other=0.0).to(tl.float32)
    dw_B = tl.zeros([BLOCK_D], dtype=tl.float32)
    # A contiguous block of rows per program keeps the reads of consecutive programs apart in memory.
    row_lo = pid * ROWS_PER_PROGRAM
    row_hi = tl.minimum(row_lo + ROWS_PER_PROGRAM, R)
    for row in range(row_lo, row_hi):
        x_B = tl.load(x_ptr + row * stride_x + offs_B, mask=mask_B, other=0.0).to(tl.float32)
        dy_B = tl.load(dy_ptr + row * stride_dy + offs_B, mask=mask_B, other=0.0).to(tl.float32)
        rstd = tl.load(rstd_ptr + row)
        x_hat_B = x_B * rstd
        dyw_B = dy_B * w_B
        dx_B = rstd * (dyw_B - x_hat_B * (tl.sum(dyw_B * x_hat_B, 0) / D))
        tl.store(dx_ptr + row * stride_dx + offs_B, dx_B.to(dx_ptr.dtype.element_ty), mask=mask_B)
        dw_B += dy_B * x_hat_B
    tl.store(dw_partial_ptr + pid * D + offs_B, dw_B, mask=mask_B)


def _num_warps(block_d: int) -> int:
    # One row per program: more warps for wider rows, as Liger-Kernel's calculate_settings does.
    if _INTERPRET:
        return 1
    return 16 if block_d >= 8192 else 8 if block_d >= 2048 else 4 if block_d >= 512 else 2


def _backward_programs(rows: int, device: torch.device) -> int:
    if device.type == "cuda":
        return min(rows, 4 * torch.cuda.get_device_properties(device).multi_processor_count)
    return min(rows, 4)


# Custom ops (torch.library) rather than an autograd.Function, so torch.compile keeps the Triton
# launches opaque (see flash_attention.py).


@torch.library.custom_op("mmtrain::rms_norm_fwd", mutates_args=())
def _fwd_op(x_RD: torch.Tensor, weight: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """x_RD [R, D] with unit stride over D -> (y [R, D], rstd [R] fp32)."""
    R, D = x_RD.shape
    y_RD = torch.empty((R, D), dtype=x_RD.dtype, device=x_RD.device)
    rstd_R = torch.empty(R, dtype=torch.float32, device=x_RD.device)
    block_d = triton.next_power_of_2(D)
    if R > 0:
        _rms_norm_fwd_kernel[(R,)](
            x_RD, weight, y_RD, rstd_R, x_RD.stride(0), y_RD.stride(0), D, eps,
            BLOCK_D=block_d, num_warps=_num_warps(block_d),
        )  # fmt: skip
    return y_RD, rstd_R


@_fwd_op.register_fake
def _(x_RD, weight, eps):
    return torch.empty_like(x_RD, memory_format=torch.contiguous_format), x_RD.new_empty(x_RD.shape[0], dtype=torch.float32)


@torch.library.custom_op("mmtrain::rms_norm_bwd", mutates_args=())
def _bwd_op(dy_RD: torch.Tensor, x_RD: torch.Tensor, weight: torch.Tensor, rstd_R: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    R, D = x_RD.shape
    if dy_RD.stride(-1) != 1:
        dy_RD = dy_RD.contiguous()
    dx_RD = torch.empty_like(x_RD)
    P = max(1, _backward_programs(R, x_RD.device))
    rows_per_program = triton.cdiv(R, P)
    dw_partial_PD = torch.zeros((P, D), dtype=torch.float32, device=x_RD.device)
    block_d = triton.next_power_of_2(D)
    if R > 0:
        _rms_norm_bwd_kernel[(P,)](
            dy_RD, x_RD, weight, rstd_R, dx_RD, dw_partial_PD,
            dy_RD.stride(0), x_RD.stride(0), dx_RD.stride(0), R, D, rows_per_program,
            BLOCK_D=block_d, num_warps=_num_warps(block_d),
        )  # fmt: skip
    return dx_RD, dw_partial_PD.sum(0).to(weight.dtype)


@_bwd_op.register_fake
def _(dy_RD, x_RD, weight, rstd_R):
    return torch.empty_like(x_RD), torch.empty_like(weight)


def _setup_context(ctx, inputs, output):
    x_RD, weight, _ = inputs
    ctx.save_for_backward(x_RD, weight, output[1])
    ctx.mark_non_differentiable(output[1])


def _backward(ctx, dy_RD, drstd_R):
    x_RD, weight, rstd_R = ctx.saved_tensors
    dx_RD, dw = _bwd_op(dy_RD, x_RD, weight, rstd_R)
    return dx_RD, dw, None


_fwd_op.register_autograd(_backward, setup_context=_setup_context)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Triton RMSNorm; inputs are validated by mmtrain.kernels.rms_norm."""
    if triton.next_power_of_2(x.shape[-1]) > 65536:
        raise ValueError(f"Triton rms_norm keeps one row in registers; dim {x.shape[-1]} is too large")
    D = x.shape[-1]
    x_RD = x.reshape(-1, D)
    if x_RD.stride(-1) != 1:
        x_RD = x_RD.contiguous()
    y_RD, _ = _fwd_op(x_RD, weight.contiguous(), eps)
    return y_RD.view(x.shape)
