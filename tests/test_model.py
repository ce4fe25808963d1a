import pytest
import torch

from mmtrain.data.batch import text_batch
from mmtrain.data.config import DataConfig
from mmtrain.data.loader import ShardLoader
from mmtrain.data.tokenizer import ByteTokenizer
from mmtrain.evaluate import shuffle_media
from mmtrain.model import PRESETS, FusionTransformer, ModelConfig, preset

TINY = ModelConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2)


@pytest.mark.parametrize("name, expected", [("125m", 125e6), ("350m", 350e6), ("1b", 1e9),
                                            ("7b", 7e9)])
def test_presets_build_on_meta_with_the_named_size(name, expected):
    cfg = preset(name)
    with torch.device("meta"):
        model = FusionTransformer(cfg)
    n = sum(p.numel() for p in model.parameters())
    assert n == cfg.num_params()
    assert abs(n - expected) / expected < 0.01, n


def test_tiny_preset_counts_and_flops():
    cfg = PRESETS["tiny"]()
    model = FusionTransformer(cfg)
    assert sum(p.numel() for p in model.parameters()) == cfg.num_params()
    n = cfg.num_params(exclude_embedding=True) + cfg.vocab_size * cfg.dim
    assert cfg.flops_per_token(512) == 6 * n + 12 * cfg.n_layers * cfg.dim * 512


def test_meta_build_then_init_matches_a_direct_build():
    torch.manual_seed(0)
    direct = FusionTransformer(TINY)
    with torch.device("meta"):
        meta = FusionTransformer(TINY)
    meta.to_empty(device="cpu")
    torch.manual_seed(0)
    meta.init_weights()
    for (n1, p1), (n2, p2) in zip(direct.named_parameters(), meta.named_parameters()):
        assert n1 == n2 and p1.shape == p2.shape
    assert all(torch.isfinite(p).all() for p in meta.parameters())


def real_batch(corpus):
    """The first loader batch that holds both an image and an audio clip (which batch that is
    depends on the shuffle, not on the model)."""
    cfg = DataConfig(train=str(corpus / "train"), num_workers=0, num_streams=2, seq_len=256,
                     micro_batch_size=2)
    loader = ShardLoader(cfg, spec=TINY.media(), tokenizer=ByteTokenizer(), rank=0, world_size=1)
    for _ in range(50):
        batch = loader.next_batch()
        if batch.image_patches.shape[0] and batch.audio_tokens.shape[0]:
            return batch
    raise AssertionError("50 demo batches without both an image and an audio clip")


def test_forward_backward_on_an_interleaved_batch(demo_corpus):
    torch.manual_seed(0)
    model = FusionTransformer(TINY)
    batch = real_batch(demo_corpus)
    assert batch.image_patches.shape[0] > 0 and batch.audio_tokens.shape[0] > 0
    loss = model(batch)
    assert torch.isfinite(loss) and 4.0 < loss.item() < 7.0  # ~ln(272) at init
    loss.backward()
    for name in ("image_encoder.proj.weight", "audio_encoder.proj.weight", "tok_embeddings.weight",
                 "layers.0.attention.wq.weight"):
        grad = dict(model.named_parameters())[name].grad
        assert grad is not None and grad.abs().sum() > 0, name


def test_media_changes_the_prediction_and_documents_are_isolated(demo_corpus):
    torch.manual_seed(0)
    model = FusionTransformer(TINY).eval()
    batch = real_batch(demo_corpus)
    with torch.no_grad():
        base = model.token_losses(batch)
        shuffled = model.token_losses(shuffle_media(batch))
    assert not torch.equal(base, shuffled)
    # Changing one document's tokens leaves every other document's losses unchanged.
    tokens = torch.randint(0, 256, (1, 32))
    a = text_batch(tokens.clone(), [[10, 22]])
    tokens[0, 12] = (tokens[0, 12] + 1) % 256
    b = text_batch(tokens, [[10, 22]])
    with torch.no_grad():
        la, lb = model.token_losses(a), model.token_losses(b)
    assert torch.equal(la[0, :10], lb[0, :10])
    assert not torch.equal(la[0, 10:], lb[0, 10:])


def test_activation_checkpointing_gives_the_same_gradients(demo_corpus):
    batch = real_batch(demo_corpus)
    grads = []
    for ckpt in (False, True):
        torch.manual_seed(0)
        cfg = ModelConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, activation_checkpointing=ckpt)
        model = FusionTransformer(cfg)
        model(batch).backward()
        grads.append(model.layers[0].attention.wq.weight.grad)
    torch.testing.assert_close(grads[0], grads[1], rtol=0, atol=0)
