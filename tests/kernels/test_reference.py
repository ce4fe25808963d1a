"""The PyTorch references (the CPU training path and the kernels' ground truth) and the dispatch.

Tolerances: references in fp64 are compared with naive fp64 formulas at atol=rtol=1e-10; fp32 at
atol=rtol=1e-5.
"""

import itertools
import logging
import math

import pytest
import torch
import torch.nn.functional as F

import mmtrain.kernels as kernels
from mmtrain.kernels import reference
from mmtrain.kernels.chunked_ce import linear_cross_entropy_chunked


def _cu(lens):
    return torch.tensor([0, *itertools.accumulate(lens)], dtype=torch.int32)


def _qkv(n, h, kv, d, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(n, heads, d, generator=g, dtype=dtype, requires_grad=True) for heads in (h, kv, kv)]


# ------------------------------------------------------------------------------------------ attention


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("heads", [(4, 4), (4, 2), (4, 1)])
@pytest.mark.parametrize("lens", [[7, 1, 30, 1, 12], [300, 5, 700, 1], [1], [0, 9, 0, 4]])
def test_reference_attention_matches_naive_per_document(causal, heads, lens):
    """Windowed SDPA with a block-diagonal mask == dense softmax attention run one document at a
    time: forward and gradients."""
    h, kv = heads
    cu = _cu(lens)
    q, k, v = _qkv(int(cu[-1]), h, kv, 16)
    do = torch.randn_like(q)
    out = reference.attention(q, k, v, cu, causal, window_tokens=64)
    grads = torch.autograd.grad(out, (q, k, v), do)
    out_naive = reference.attention_naive(q, k, v, cu, causal)
    grads_naive = torch.autograd.grad(out_naive, (q, k, v), do)
    torch.testing.assert_close(out, out_naive, atol=1e-10, rtol=1e-10)
    for g, g_naive in zip(grads, grads_naive):
        torch.testing.assert_close(g, g_naive, atol=1e-10, rtol=1e-10)


def test_attention_naive_is_textbook_softmax():
    """The naive reference itself, against a hand-written loop over tokens for one tiny doc."""
    q, k, v = _qkv(5, 2, 1, 4)
    cu = _cu([2, 3])
    out = reference.attention_naive(q, k, v, cu, causal=True)
    for doc_start, doc_end in [(0, 2), (2, 5)]:
        for i in range(doc_start, doc_end):
            for head in range(2):
                keys = range(doc_start, i + 1)
                w = torch.stack([q[i, head] @ k[j, 0] / math.sqrt(4) for j in keys]).softmax(0)
                expected = sum(w[t] * v[j, 0] for t, j in enumerate(keys))
                torch.testing.assert_close(out[i, head], expected)


def test_document_windows_hold_whole_documents():
    windows = reference.document_windows([100, 200, 50, 600, 10], window_tokens=300)
    assert windows == [(0, 300, [100, 200]), (300, 350, [50]), (350, 950, [600]), (950, 960, [10])]


def test_reference_attention_is_deterministic():
    cu = _cu([40, 3, 70])
    q, k, v = _qkv(113, 4, 2, 16, dtype=torch.float32)
    out1, out2 = reference.attention(q, k, v, cu), reference.attention(q, k, v, cu)
    assert torch.equal(out1, out2)


# ------------------------------------------------------------------------------------------- rms_norm


def test_reference_rms_norm():
    x = torch.randn(3, 5, 48, dtype=torch.float64)
    w = torch.randn(48, dtype=torch.float64)
    expected = x / torch.sqrt((x * x).mean(-1, keepdim=True) + 1e-6) * w
    torch.testing.assert_close(reference.rms_norm(x, w), expected, atol=1e-10, rtol=1e-10)
    out16 = kernels.rms_norm(x.half(), w.float())
    assert out16.dtype == torch.float16


# -------------------------------------------------------------------------------------- cross-entropy


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("chunk_rows", [16, 1000])
def test_reference_linear_cross_entropy_matches_dense(reduction, chunk_rows):
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(70, 24, generator=g, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(50, 24, generator=g, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(0, 50, (70,), generator=g)
    targets[::5] = -100
    loss = linear_cross_entropy_chunked(
        hidden, weight, targets, -100, reduction, reference.cross_entropy_chunk, chunk_rows
    )
    dense = F.cross_entropy(hidden @ weight.T, targets, reduction=reduction)
    # the loss is fp32 by design; compare at fp32 precision
    torch.testing.assert_close(loss.double(), dense, atol=1e-5, rtol=1e-5)
    grad_out = torch.randn_like(dense)
    grads = torch.autograd.grad(loss, (hidden, weight), grad_out.to(loss.dtype))
    grads_dense = torch.autograd.grad(dense, (hidden, weight), grad_out)
    for got, want in zip(grads, grads_dense):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_linear_cross_entropy_all_ignored_is_zero():
    hidden = torch.randn(8, 4, requires_grad=True)
    weight = torch.randn(10, 4, requires_grad=True)
    loss = kernels.linear_cross_entropy(hidden, weight, torch.full((8,), -100))
    assert loss.item() == 0.0
    loss.backward()
    assert torch.all(hidden.grad == 0) and torch.all(weight.grad == 0)


def test_linear_cross_entropy_without_grad():
    with torch.no_grad():
        loss = kernels.linear_cross_entropy(torch.randn(8, 4), torch.randn(10, 4), torch.randint(0, 10, (8,)))
    assert loss.dim() == 0 and loss.isfinite()


# ------------------------------------------------------------------------------------------- dispatch


def test_backend_selection(monkeypatch):
    assert kernels.get_backend("cpu") == "reference"
    assert kernels.get_backend(torch.device("cuda", 0)) == "triton"
    with pytest.raises(ValueError, match="kernel backend must be one of"):
        kernels.set_backend("cuda")
    kernels.set_backend("triton")
    try:
        monkeypatch.delenv("TRITON_INTERPRET", raising=False)
        with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
            kernels.get_backend("cpu")
        monkeypatch.setenv("TRITON_INTERPRET", "1")
        assert kernels.get_backend("cpu") == "triton"
    finally:
        kernels.set_backend("auto")


def test_backend_logged_once_per_op(caplog, reference_backend):
    with caplog.at_level(logging.INFO, logger="mmtrain.kernels"):
        for _ in range(3):
            kernels.rms_norm(torch.randn(2, 8), torch.ones(8))
    messages = [r.getMessage() for r in caplog.records if "rms_norm" in r.getMessage()]
    assert messages == ["kernel rms_norm: reference backend (requested 'reference', device cpu)"]


def test_attention_rejects_bad_inputs():
    q, k, v = _qkv(10, 4, 2, 8, dtype=torch.float32)
    with pytest.raises(ValueError, match="start at 0 and end at total_tokens=10"):
        kernels.attention(q, k, v, _cu([4, 5]))
    with pytest.raises(ValueError, match="start at 0"):
        kernels.attention(q, k, v, torch.tensor([1, 10], dtype=torch.int32))
    with pytest.raises(ValueError, match="int32"):
        kernels.attention(q, k, v, torch.tensor([0, 10]))
    q3, k3, v3 = _qkv(10, 4, 3, 8, dtype=torch.float32)
    with pytest.raises(ValueError, match="n_kv_heads=3 must divide n_heads=4"):
        kernels.attention(q3, k3, v3, _cu([10]))
    with pytest.raises(ValueError, match="packed q"):
        kernels.attention(q[None], k, v, _cu([10]))


def test_other_ops_reject_bad_inputs():
    with pytest.raises(ValueError, match="weight must be"):
        kernels.rms_norm(torch.randn(2, 8), torch.ones(4))
    with pytest.raises(ValueError, match="reduction must be"):
        kernels.linear_cross_entropy(torch.randn(2, 4), torch.randn(5, 4), torch.zeros(2, dtype=torch.long), reduction="avg")
    with pytest.raises(ValueError, match="share a dtype"):
        kernels.linear_cross_entropy(torch.randn(2, 4), torch.randn(5, 4).double(), torch.zeros(2, dtype=torch.long))


def test_import_pulls_no_heavy_dependencies():
    """`import mmtrain.kernels` (and the CPU path) must not import Triton, DeepSpeed or WebDataset:
    the GPU benchmark image has no DeepSpeed, and CPU-only installs may have no Triton."""
    import subprocess
    import sys
    from pathlib import Path

    code = (
        "import sys, torch, mmtrain.kernels as k\n"
        "k.rms_norm(torch.randn(2, 8), torch.ones(8))\n"
        "k.attention(*(torch.randn(4, 2, 8) for _ in range(3)), torch.tensor([0, 4], dtype=torch.int32))\n"
        "print(sorted(m for m in ('triton', 'deepspeed', 'webdataset') if m in sys.modules))\n"
    )
    repo = Path(__file__).resolve().parents[2]
    res = subprocess.run([sys.executable, "-c", code], cwd=repo, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "[]"
