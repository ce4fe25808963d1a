"""Triton cross-entropy (fused with the chunked output projection) against the reference.

The reference is F.cross_entropy on dense logits in fp64 from the same inputs. Tolerances (absolute
and relative): fp32 loss and grads 1e-4; fp16 loss 1e-2, grads 1e-2 (logits rounded to fp16 before
the softmax, as in training); bf16 (GPU only) 5e-2.
"""

import pytest
import torch
import torch.nn.functional as F

import mmtrain.kernels as kernels
from mmtrain.kernels import reference
from mmtrain.kernels.chunked_ce import linear_cross_entropy_chunked
from mmtrain.kernels.cross_entropy import cross_entropy_chunk_

TOLERANCES = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 5e-2}


def _inputs(n, d, vocab, dtype, device, ignore_every=4):
    g = torch.Generator(device=device).manual_seed(0)
    hidden = torch.randn(n, d, generator=g, device=device, dtype=dtype).requires_grad_()
    weight = (torch.randn(vocab, d, generator=g, device=device) / d**0.5).to(dtype).requires_grad_()
    targets = torch.randint(0, vocab, (n,), generator=g, device=device)
    targets[::ignore_every] = -100
    return hidden, weight, targets


def _dense(hidden, weight, targets, reduction):
    h64, w64 = hidden.detach().double().requires_grad_(), weight.detach().double().requires_grad_()
    return F.cross_entropy(h64 @ w64.T, targets, reduction=reduction), h64, w64


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_linear_cross_entropy_matches_reference(dtype, reduction, device):
    """Several chunks (chunk_rows=32 over 75 rows) and a vocabulary that is not a multiple of the
    kernel's vocabulary block."""
    hidden, weight, targets = _inputs(75, 32, 200, dtype, device)
    loss = linear_cross_entropy_chunked(hidden, weight, targets, -100, reduction, cross_entropy_chunk_, chunk_rows=32)
    dense, h64, w64 = _dense(hidden, weight, targets, reduction)
    grad_out = torch.rand_like(dense) + 0.5
    dh, dw = torch.autograd.grad(loss, (hidden, weight), grad_out.to(loss.dtype))
    dh_ref, dw_ref = torch.autograd.grad(dense, (h64, w64), grad_out)

    tol = TOLERANCES[dtype]
    assert loss.dtype == torch.float32 and dh.dtype == dtype and dw.dtype == dtype
    torch.testing.assert_close(loss.double(), dense, atol=tol, rtol=tol)
    torch.testing.assert_close(dh.double(), dh_ref, atol=tol, rtol=tol)
    torch.testing.assert_close(dw.double(), dw_ref, atol=tol, rtol=tol)


def test_chunk_kernel_matches_reference_chunk(device):
    """The kernel alone: loss per row and the in-place gradient, with ignored rows."""
    g = torch.Generator(device=device).manual_seed(1)
    logits = torch.randn(9, 130, generator=g, device=device) * 4
    targets = torch.tensor([0, 129, -100, 5, 64, 63, -100, 1, 100], device=device)
    scale = torch.rand(9, generator=g, device=device)
    loss_ref, grad_ref = reference.cross_entropy_chunk(logits, targets, -100, scale)
    loss_only, none = cross_entropy_chunk_(logits.clone(), targets, -100, None)
    buf = logits.clone()
    loss, grad = cross_entropy_chunk_(buf, targets, -100, scale)
    assert none is None and grad.data_ptr() == buf.data_ptr()  # written in place
    torch.testing.assert_close(loss_only, loss_ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(loss, loss_ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(grad, grad_ref, atol=1e-6, rtol=1e-5)
    assert torch.all(grad[targets == -100] == 0) and torch.all(loss[targets == -100] == 0)


def test_dispatch_uses_triton_and_handles_all_ignored(device, triton_backend):
    hidden, weight, targets = _inputs(40, 16, 70, torch.float32, device)
    loss = kernels.linear_cross_entropy(hidden, weight, targets)
    dense, _, _ = _dense(hidden, weight, targets, "mean")
    torch.testing.assert_close(loss.double(), dense, atol=1e-4, rtol=1e-4)
    empty = kernels.linear_cross_entropy(hidden, weight, torch.full_like(targets, -100))
    assert empty.item() == 0.0  # sync


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="bf16 kernels are checked on GPU only")
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_linear_cross_entropy_bf16_gpu(reduction, triton_backend):
    hidden, weight, targets = _inputs(5000, 256, 50257, torch.bfloat16, "cuda")
    loss = kernels.linear_cross_entropy(hidden, weight, targets, reduction=reduction)
    dense, h64, w64 = _dense(hidden, weight, targets, reduction)
    grad_out = torch.ones_like(dense)
    dh, dw = torch.autograd.grad(loss, (hidden, weight), grad_out.to(loss.dtype))
    dh_ref, dw_ref = torch.autograd.grad(dense, (h64, w64), grad_out)
    tol = TOLERANCES[torch.bfloat16]
    torch.testing.assert_close(loss.double(), dense, atol=tol, rtol=tol)
    # gradients are scaled by 1/n for "mean": compare relative to their own size
    for got, want in ((dh, dh_ref), (dw, dw_ref)):
        scale = want.abs().max()
        torch.testing.assert_close(got.double() / scale, want / scale, atol=tol, rtol=tol)
