"""The tiny model trains to the same losses with the Triton kernels (interpreted on CPU) as with
the PyTorch references: the kernels are drop-in, parameter names and layout unchanged."""

import torch

import mmtrain.kernels as kernels
from mmtrain.data.batch import text_batch
from mmtrain.model import FusionTransformer, ModelConfig

CFG = ModelConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2)  # head_dim 16, GQA 2


def train_losses(backend: str, steps: int = 3) -> tuple[list[float], dict]:
    kernels.set_backend(backend)
    try:
        torch.manual_seed(0)
        model = FusionTransformer(CFG)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
        gen = torch.Generator().manual_seed(1)
        losses = []
        for _ in range(steps):
            batch = text_batch(torch.randint(0, 256, (2, 48), generator=gen), [[1, 20, 27], [48]])
            loss = model(batch)
            loss.backward()
            opt.step()
            opt.zero_grad()
            losses.append(loss.item())
        return losses, {k: v.detach().clone() for k, v in model.state_dict().items()}
    finally:
        kernels.set_backend("auto")


def test_tiny_trains_to_the_same_loss_with_interpreted_kernels_and_references():
    ref_losses, ref_state = train_losses("reference")
    tri_losses, tri_state = train_losses("triton")
    # fp32 throughout; tolerances cover accumulation-order differences over 3 AdamW steps.
    torch.testing.assert_close(torch.tensor(tri_losses), torch.tensor(ref_losses), rtol=1e-4, atol=1e-4)
    assert ref_state.keys() == tri_state.keys()
    for name in ref_state:
        torch.testing.assert_close(tri_state[name], ref_state[name], rtol=1e-3, atol=1e-4)
