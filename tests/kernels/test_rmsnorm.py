"""Triton RMSNorm against the reference: output, dx and dweight.

The reference runs in fp64 on the same inputs. Tolerances (absolute and relative): fp32 1e-5;
fp16 output and dx 2e-3 (one fp16 rounding of values ~1), dweight 1e-2 (a sum over all rows, each
term read from fp16 inputs); bf16 (GPU only) 2e-2 / 5e-2.
"""

import pytest
import torch

import mmtrain.kernels as kernels
from mmtrain.kernels import reference

TOLERANCES = {torch.float32: (1e-5, 1e-5), torch.float16: (2e-3, 1e-2), torch.bfloat16: (2e-2, 5e-2)}


def _check(shape, dtype, weight_dtype, device):
    g = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(shape, generator=g, device=device, dtype=dtype).requires_grad_()
    w = (1 + 0.1 * torch.randn(shape[-1], generator=g, device=device)).to(weight_dtype).requires_grad_()
    dy = torch.randn(shape, generator=g, device=device, dtype=dtype)
    y = kernels.rms_norm(x, w, eps=1e-5)
    dx, dw = torch.autograd.grad(y, (x, w), dy)

    x64, w64 = x.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    y_ref = reference.rms_norm(x64, w64, eps=1e-5)
    dx_ref, dw_ref = torch.autograd.grad(y_ref, (x64, w64), dy.double())

    tol, tol_dw = TOLERANCES[dtype]
    assert y.dtype == dtype and dx.dtype == dtype and dw.dtype == weight_dtype
    torch.testing.assert_close(y.double(), y_ref, atol=tol, rtol=tol)
    torch.testing.assert_close(dx.double(), dx_ref, atol=tol, rtol=tol)
    torch.testing.assert_close(dw.double(), dw_ref, atol=tol_dw, rtol=tol_dw)


@pytest.mark.parametrize("shape", [(3, 37, 48), (130, 64), (1, 96)], ids=["3d-d48", "rows130", "row1"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_rms_norm_matches_reference(shape, dtype, device, triton_backend):
    _check(shape, dtype, dtype, device)


def test_rms_norm_fp16_input_fp32_weight(device, triton_backend):
    _check((20, 48), torch.float16, torch.float32, device)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="bf16 kernels are checked on GPU only")
@pytest.mark.parametrize("dim", [768, 2048, 5000])
def test_rms_norm_bf16_gpu(dim, triton_backend):
    _check((4, 1000, dim), torch.bfloat16, torch.bfloat16, "cuda")
