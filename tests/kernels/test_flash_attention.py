"""Triton flash attention against the reference: output and dq, dk, dv.

On CPU the kernels run under TRITON_INTERPRET=1 (see conftest.py), whose tiles are BLOCK_M=32 /
BLOCK_N=16 (forward, dq) and 16 / 32 (dk/dv), so documents of 1-70 tokens cross tile edges in every
way. The reference is the fp64 naive per-document attention on the same (rounded) inputs.

Tolerances: |got - want| <= tol * max(1, max |want|) + tol * |want|, with tol for fp32 1e-4
(interpreter only: on a GPU the kernels take fp16/bf16); fp16 out 5e-3, grads 1e-2 (fp16 inputs,
fp16 probabilities into the second matmul, fp32 accumulation); bf16 (GPU only) out 3e-2, grads 6e-2.
"""

import itertools

import pytest
import torch

import mmtrain.kernels as kernels
from mmtrain.kernels import reference

TOLERANCES = {  # dtype: (out atol=rtol, grad atol=rtol)
    torch.float32: (1e-4, 1e-4),
    torch.float16: (5e-3, 1e-2),
    torch.bfloat16: (3e-2, 6e-2),
}

# Ragged documents: length-1 documents, lengths below, at and above the tile sizes, not multiples.
DOC_LENS = {
    1: [37, 1, 20, 16, 1, 9],
    2: [1, 64, 3, 33],
    4: [70, 1, 1, 25],
}

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="bf16 kernels are checked on GPU only")


def _cu(lens, device):
    return torch.tensor([0, *itertools.accumulate(lens)], dtype=torch.int32, device=device)


def _check(lens, n_heads, n_kv_heads, head_dim, causal, dtype, device, seed=0):
    cu = _cu(lens, device)
    n = sum(lens)
    g = torch.Generator(device=device).manual_seed(seed)
    q, k, v = (
        torch.randn(n, heads, head_dim, generator=g, device=device, dtype=dtype).requires_grad_()
        for heads in (n_heads, n_kv_heads, n_kv_heads)
    )
    do = torch.randn(n, n_heads, head_dim, generator=g, device=device, dtype=dtype)

    out = kernels.attention(q, k, v, cu, causal=causal)
    grads = torch.autograd.grad(out, (q, k, v), do)

    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    out_ref = reference.attention_naive(q64, k64, v64, cu, causal)
    grads_ref = torch.autograd.grad(out_ref, (q64, k64, v64), do.double())

    tol_out, tol_grad = TOLERANCES[dtype]
    assert out.dtype == dtype and out.shape == q.shape
    _assert_close(out, out_ref, tol_out, "out")
    for name, got, want in zip(("dq", "dk", "dv"), grads, grads_ref):
        assert got.dtype == dtype
        _assert_close(got, want, tol_grad, name)


def _assert_close(got, want, tol, name):
    """Absolute error scaled by the reference's magnitude (gradients of long documents grow)."""
    atol = tol * max(1.0, want.abs().max().item())
    torch.testing.assert_close(got.double(), want.double(), atol=atol, rtol=tol, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize("group", [1, 2, 4], ids=lambda g: f"gqa{g}")
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_flash_attention_matches_reference(dtype, head_dim, group, causal, device, triton_backend):
    if dtype == torch.float32 and device.type == "cuda":
        pytest.skip("fp32 attention is an interpreter-only dtype")
    _check(DOC_LENS[group], n_heads=4, n_kv_heads=4 // group, head_dim=head_dim, causal=causal, dtype=dtype, device=device)


@pytest.mark.parametrize("head_dim", [16, 32])
def test_flash_attention_small_head_dims(head_dim, device, triton_backend):
    _check([5, 40, 1], n_heads=2, n_kv_heads=1, head_dim=head_dim, causal=True, dtype=_dtype(device), device=device)


def test_flash_attention_single_token_and_empty_documents(device, triton_backend):
    _check([0, 1, 0, 1, 2], n_heads=2, n_kv_heads=2, head_dim=16, causal=True, dtype=_dtype(device), device=device)


def _dtype(device):
    """fp32 under the interpreter, fp16 on a GPU (where the kernels do not take fp32)."""
    return torch.float16 if device.type == "cuda" else torch.float32


def test_flash_attention_accepts_strided_inputs(device, triton_backend):
    """q, k, v as views of one fused projection (how a model produces them)."""
    cu = _cu([20, 13], device)
    qkv = torch.randn(33, 4 + 2 + 2, 32, device=device, dtype=_dtype(device), requires_grad=True)
    q, k, v = qkv.split([4, 2, 2], dim=1)
    out = kernels.attention(q, k, v, cu)
    out.sum().backward()
    q_, k_, v_ = (t.detach().requires_grad_() for t in (q, k, v))
    out_ref = reference.attention(q_, k_, v_, cu)
    out_ref.sum().backward()
    tol = TOLERANCES[_dtype(device)][1]
    _assert_close(out, out_ref, tol, "out")
    _assert_close(qkv.grad, torch.cat([q_.grad, k_.grad, v_.grad], dim=1), tol, "dqkv")


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # numpy, on the NaN the interpreter computes
def test_documents_are_isolated(device, triton_backend):
    """NaN in every other document (q, k, v and the incoming gradient) must not reach this one: its
    output and gradients equal those of the document attended alone. A kernel that read other
    documents' tiles and masked them would produce NaN (0 * NaN)."""
    lens = [10, 50, 7]
    cu = _cu(lens, device)
    mine = slice(10, 60)
    q, k, v, do = (torch.full((67, 2, 16), float("nan"), device=device, dtype=_dtype(device)) for _ in range(4))
    for t in (q, k, v, do):
        t[mine] = torch.randn(50, 2, 16, device=device, dtype=_dtype(device))
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    out = kernels.attention(q, k, v, cu, causal=False)
    grads = torch.autograd.grad(out, (q, k, v), do)

    alone = [t[mine].detach().requires_grad_() for t in (q, k, v)]
    out_alone = reference.attention(*alone, _cu([50], device), causal=False)
    grads_alone = torch.autograd.grad(out_alone, alone, do[mine])
    tol = TOLERANCES[_dtype(device)][1]
    _assert_close(out[mine], out_alone, tol, "out")
    for name, got, want in zip(("dq", "dk", "dv"), grads, grads_alone):
        _assert_close(got[mine], want, tol, name)


@pytest.mark.skipif(torch.cuda.is_available(), reason="relies on the interpreter's fixed tile sizes")
@pytest.mark.filterwarnings("ignore::RuntimeWarning")
def test_tiles_above_the_causal_diagonal_are_never_read(triton_backend):
    """One causal document of 64 tokens = two 32-token tiles in every kernel under the interpreter.
    Keys of tile 1 are never needed by queries of tile 0 (forward, dq); queries of tile 0 are never
    needed by keys of tile 1 (dk, dv). Poisoning them with NaN must leave those results clean."""
    from mmtrain.kernels.flash_attention import _BWD_DKV_AUTOTUNE, _BWD_DQ_AUTOTUNE, _FWD_AUTOTUNE

    (fwd,), (dq,), (dkv,) = _FWD_AUTOTUNE["configs"], _BWD_DQ_AUTOTUNE["configs"], _BWD_DKV_AUTOTUNE["configs"]
    assert fwd.kwargs["BLOCK_M"] == dq.kwargs["BLOCK_M"] == dkv.kwargs["BLOCK_N"] == 32
    cu = _cu([64], "cpu")
    first, second = slice(0, 32), slice(32, 64)

    # forward and dq of the first query tile: keys and values of the second tile are NaN
    q, k, v = (torch.randn(64, 2, 16) for _ in range(3))
    k[second], v[second] = float("nan"), float("nan")
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    out = kernels.attention(q, k, v, cu)
    do = torch.zeros_like(out)
    do[first] = torch.randn(32, 2, 16)
    (dq,) = torch.autograd.grad(out, (q,), do)
    expected = reference.attention(q[first].detach(), k[first].detach(), v[first].detach(), _cu([32], "cpu"))
    torch.testing.assert_close(out[first], expected, atol=1e-5, rtol=1e-5)
    assert torch.isfinite(dq[first]).all()

    # dk, dv of the second key tile: queries and incoming gradients of the first tile are NaN
    q, k, v = (torch.randn(64, 2, 16) for _ in range(3))
    q[first] = float("nan")
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    out = kernels.attention(q, k, v, cu)
    do = torch.randn_like(out)
    do[first] = float("nan")
    dk, dv = torch.autograd.grad(out, (k, v), do)
    assert torch.isfinite(dk[second]).all() and torch.isfinite(dv[second]).all()


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize("group", [1, 4], ids=lambda g: f"gqa{g}")
@pytest.mark.parametrize("head_dim", [64, 128])
def test_flash_attention_bf16_gpu(head_dim, group, causal, triton_backend):
    lens = [1, 300, 129, 64, 1, 700, 5]
    _check(lens, n_heads=8, n_kv_heads=8 // group, head_dim=head_dim, causal=causal, dtype=torch.bfloat16, device="cuda")
