"""The Triton kernels are torch.library custom ops, so torch.compile does not break them: the ops
pass torch.library.opcheck (schema, fake tensors, autograd registration), and a function calling
all three compiles with fullgraph=True (no graph break) to the same loss and gradients as eager.
The aot_eager backend traces through the same fake / autograd registrations as inductor without
generating code, which keeps this fast on CPU; the kernels run in Triton's interpreter."""

import torch

import mmtrain.kernels as kernels
from mmtrain.kernels import cross_entropy, flash_attention, rmsnorm


def _inputs():
    gen = torch.Generator().manual_seed(0)
    lens = [5, 20, 7]
    cu = torch.tensor([0, 5, 25, 32], dtype=torch.int32)
    q = torch.randn(32, 4, 16, generator=gen, requires_grad=True)
    k, v = (torch.randn(32, 2, 16, generator=gen, requires_grad=True) for _ in range(2))
    w_norm = (1 + 0.1 * torch.randn(64, generator=gen)).requires_grad_()
    w_out = (0.1 * torch.randn(300, 64, generator=gen)).requires_grad_()
    targets = torch.randint(0, 300, (32,), generator=gen)
    targets[::5] = -100
    return q, k, v, cu, max(lens), w_norm, w_out, targets


def _loss(q, k, v, cu, max_seqlen, w_norm, w_out, targets):
    o = kernels.attention(q, k, v, cu, causal=True, max_seqlen=max_seqlen)
    h = kernels.rms_norm(o.reshape(o.shape[0], -1), w_norm)
    return kernels.linear_cross_entropy(h, w_out, targets)


def test_custom_ops_pass_opcheck(triton_backend):
    q, k, v, cu, max_seqlen, w_norm, w_out, targets = _inputs()
    torch.library.opcheck(flash_attention._fwd_op, (q, k, v, cu, True, max_seqlen))
    x = torch.randn(32, 64, requires_grad=True)
    torch.library.opcheck(rmsnorm._fwd_op, (x, w_norm, 1e-6))
    for reduction in ("mean", "none"):
        torch.library.opcheck(cross_entropy._fwd_op, (x, w_out, targets, -100, reduction, True, True))


def test_compiled_function_matches_eager_without_graph_breaks(triton_backend):
    inputs = _inputs()
    leaves = [t for t in inputs if isinstance(t, torch.Tensor) and t.requires_grad]
    compiled = torch.compile(_loss, backend="aot_eager", fullgraph=True)
    got = compiled(*inputs)  # first: compiled before any eager call of the ops
    got_grads = torch.autograd.grad(got, leaves)
    want = _loss(*inputs)
    want_grads = torch.autograd.grad(want, leaves)
    torch.testing.assert_close(got, want)
    for g, w in zip(got_grads, want_grads):
        torch.testing.assert_close(g, w)


def _tiny_losses(compiled: bool, steps: int = 2) -> list[float]:
    from mmtrain.data.batch import text_batch
    from mmtrain.model import FusionTransformer, ModelConfig

    torch.manual_seed(0)
    model = FusionTransformer(ModelConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, activation_checkpointing=True))
    names = list(model.state_dict())
    if compiled:  # what train.compile does (train.py), with a backend that needs no C++ toolchain
        for block in model.layers:
            block.compile(backend="aot_eager", fullgraph=True)
    assert list(model.state_dict()) == names  # checkpoints keep their layout
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    gen = torch.Generator().manual_seed(1)
    losses = []
    for doc_lens in ([[1, 20, 27], [48]], [[16, 32], [30, 18]])[:steps]:  # cu_seqlens and max_seqlen change
        loss = model(text_batch(torch.randint(0, 256, (2, 48), generator=gen), doc_lens))
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses


def test_model_with_compiled_blocks_trains_like_eager(triton_backend):
    """Compiled blocks (activation checkpointing on, documents changing between steps) give the
    eager losses; parameter names are unchanged, so checkpoints are too."""
    torch.testing.assert_close(torch.tensor(_tiny_losses(True)), torch.tensor(_tiny_losses(False)))


def test_train_compile_refuses_zero3():
    import pytest

    from mmtrain.config import load_config

    with pytest.raises(ValueError, match="train.compile=true needs engine.zero_stage <= 2"):
        load_config(None, ["train.compile=true", "engine.zero_stage=3"])
    assert load_config(None, ["train.compile=true"]).train.compile is True
