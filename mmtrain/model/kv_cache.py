"""Inference only: prefill prompts once, then decode one token per step against cached keys/values.

The training path (`FusionTransformer.forward` / `hidden`) is not used or changed here. `prefill`
and `decode_step` apply the same modules in the same order as `Block.forward` (norm → attention →
residual → norm → SwiGLU → residual), so the parameters, their names and the checkpoint layout are
the training model's; tests/test_generate.py checks the logits against the full forward.

Legend: B prompts (one cache row each), N packed prompt tokens, D model dim, H query heads,
K key/value heads, G = H / K query heads per kv head, Dh head dim, L cached tokens, V vocabulary.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from mmtrain import kernels
from mmtrain.data.batch import Batch
from mmtrain.model.fusion import Block, FusionTransformer, apply_rope


class KVCache:
    """Rotated keys and values of every layer, [B, K, capacity, Dh] each, and the tokens held per
    row. Row b holds positions 0 .. lengths[b] - 1 of its own sequence (prompt, then generated)."""

    def __init__(self, model: FusionTransformer, batch_size: int, capacity: int) -> None:
        cfg = model.cfg
        weight = model.tok_embeddings.weight
        shape = (batch_size, cfg.n_kv_heads, capacity, cfg.head_dim)
        self.k = [weight.new_zeros(shape) for _ in range(cfg.n_layers)]
        self.v = [weight.new_zeros(shape) for _ in range(cfg.n_layers)]
        self.lengths = torch.zeros(batch_size, dtype=torch.long, device=weight.device)
        self.capacity = capacity

    @property
    def batch_size(self) -> int:
        return self.lengths.shape[0]


@torch.no_grad()
def prefill(model: FusionTransformer, batch: Batch, capacity: int) -> tuple[torch.Tensor, KVCache]:
    """Run the prompts (one document each, packed in `batch`, media included) through the model
    once with the varlen attention dispatch. Returns the logits after each prompt's last token
    [B, V] (fp32) and a cache of capacity tokens per prompt holding the prompts' keys/values."""
    bounds = batch.cu_seqlens.tolist()  # small, on the host
    lens = [b - a for a, b in zip(bounds[:-1], bounds[1:])]
    if max(lens) > capacity:
        raise ValueError(f"a prompt of {max(lens)} tokens does not fit a cache of {capacity}")
    cache = KVCache(model, len(lens), capacity)
    x_ND = model.embed(batch)
    positions_N = batch.positions.reshape(-1)
    for i, layer in enumerate(model.layers):
        h_ND = layer.attention_norm(x_ND)
        q, k, v = _qkv(layer, h_ND, positions_N)
        out = kernels.attention(q, k, v, batch.cu_seqlens, causal=True, max_seqlen=batch.max_seqlen)
        x_ND = _finish_block(layer, x_ND, out)
        for b, (start, n) in enumerate(zip(bounds[:-1], lens)):  # packed → one cache row per prompt
            cache.k[i][b, :, :n] = k[start:start + n].transpose(0, 1)
            cache.v[i][b, :, :n] = v[start:start + n].transpose(0, 1)
    cache.lengths = torch.tensor(lens, dtype=torch.long, device=cache.lengths.device)
    last = torch.tensor(bounds[1:], device=x_ND.device) - 1
    return _logits(model, x_ND[last]), cache


@torch.no_grad()
def decode_step(model: FusionTransformer, cache: KVCache, tokens_B: torch.Tensor) -> torch.Tensor:
    """Append one text token per row at position cache.lengths[b]; returns the logits after it
    [B, V] (fp32). The single query attends to the row's cached tokens and itself (plain SDPA:
    the varlen dispatch takes equal query and key lengths)."""
    if tokens_B.shape != (cache.batch_size,):
        raise ValueError(f"decode_step takes one token per cache row: {cache.batch_size}, "
                         f"got shape {tuple(tokens_B.shape)}")
    L = int(cache.lengths.max()) + 1  # sync; attend over the longest row's tokens only
    if L > cache.capacity:
        raise ValueError(f"the KV cache is full ({cache.capacity} tokens per row)")
    B, cfg = cache.batch_size, model.cfg
    G = cfg.n_heads // cfg.n_kv_heads
    positions_B = cache.lengths
    rows = torch.arange(B, device=positions_B.device)
    # True where the key is a real token of the row: positions 0 .. lengths[b] (the new one).
    keys_L = torch.arange(L, device=positions_B.device)
    mask_B11L = (keys_L[None, :] <= positions_B[:, None])[:, None, None, :]
    x_BD = model.tok_embeddings(tokens_B)
    for i, layer in enumerate(model.layers):
        q, k, v = _qkv(layer, layer.attention_norm(x_BD), positions_B)
        cache.k[i][rows, :, positions_B] = k
        cache.v[i][rows, :, positions_B] = v
        # Query head h reads kv head h // G (as kernels.attention does): group the G query heads
        # of each kv head as SDPA's "query length" axis, so the cache is never repeated.
        q_BKGD = q.view(B, cfg.n_kv_heads, G, cfg.head_dim)
        out = F.scaled_dot_product_attention(q_BKGD, cache.k[i][:, :, :L], cache.v[i][:, :, :L],
                                             attn_mask=mask_B11L)
        x_BD = _finish_block(layer, x_BD, out.reshape(B, cfg.n_heads, cfg.head_dim))
    cache.lengths = positions_B + 1
    return _logits(model, x_BD)


def _qkv(layer: Block, h: torch.Tensor, positions: torch.Tensor):
    """Rotated q [n, H, Dh], k [n, K, Dh] and v [n, K, Dh], as Attention.forward computes them."""
    a, n = layer.attention, h.shape[0]
    q = apply_rope(a.wq(h).view(n, a.n_heads, a.head_dim), positions, a.rope_theta)
    k = apply_rope(a.wk(h).view(n, a.n_kv_heads, a.head_dim), positions, a.rope_theta)
    return q, k, a.wv(h).view(n, a.n_kv_heads, a.head_dim)


def _finish_block(layer: Block, x: torch.Tensor, attn_out: torch.Tensor) -> torch.Tensor:
    """The rest of Block.forward once the attention output [n, H, Dh] is known."""
    x = x + layer.attention.wo(attn_out.reshape(x.shape[0], -1))
    return x + layer.feed_forward(layer.ffn_norm(x))


def _logits(model: FusionTransformer, x: torch.Tensor) -> torch.Tensor:
    return (model.norm(x) @ model.output_weight.t()).float()  # as FusionTransformer.logits_at
