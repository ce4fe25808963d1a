"""The early-fusion decoder: text, image patches and audio frames in one token sequence.

A plain nn.Module with no distributed code. Attention, RMSNorm and the loss go through the single
dispatch points in `mmtrain.kernels`.

Legend: B rows, T tokens per row, N = B·T packed tokens, D model dim, H query heads,
K key/value heads, Dh head dim, V vocabulary, P patches per image, A tokens per audio clip.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from mmtrain import kernels
from mmtrain.data.batch import Batch
from mmtrain.model.config import ModelConfig


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return kernels.rms_norm(x, self.weight, self.eps)


def apply_rope(x_NHD: torch.Tensor, positions_N: torch.Tensor, theta: float) -> torch.Tensor:
    """Rotary embedding at the given positions (which restart at 0 for every document)."""
    half = x_NHD.shape[-1] // 2
    freqs = theta ** (-torch.arange(half, device=x_NHD.device, dtype=torch.float32) / half)
    angles = positions_N.float()[:, None] * freqs[None]  # [N, Dh/2]
    cos, sin = angles.cos()[:, None, :], angles.sin()[:, None, :]
    x1, x2 = x_NHD.float()[..., :half], x_NHD.float()[..., half:]
    out = torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)
    return out.to(x_NHD.dtype)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.rope_theta = cfg.rope_theta
        self.wq = nn.Linear(cfg.dim, cfg.n_heads * cfg.head_dim, bias=False)
        self.wk = nn.Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=False)
        self.wv = nn.Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=False)
        self.wo = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.dim, bias=False)

    def forward(self, x_ND: torch.Tensor, positions_N: torch.Tensor, cu_seqlens: torch.Tensor,
                max_seqlen: int) -> torch.Tensor:
        N = x_ND.shape[0]
        q = apply_rope(self.wq(x_ND).view(N, self.n_heads, self.head_dim), positions_N, self.rope_theta)
        k = apply_rope(self.wk(x_ND).view(N, self.n_kv_heads, self.head_dim), positions_N, self.rope_theta)
        v = self.wv(x_ND).view(N, self.n_kv_heads, self.head_dim)
        out = kernels.attention(q, k, v, cu_seqlens, causal=True, max_seqlen=max_seqlen)
        return self.wo(out.reshape(N, -1))


class FeedForward(nn.Module):
    """SwiGLU."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.w1 = nn.Linear(dim, hidden, bias=False)
        self.w3 = nn.Linear(dim, hidden, bias=False)
        self.w2 = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.attention_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.attention = Attention(cfg)
        self.ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.feed_forward = FeedForward(cfg.dim, cfg.hidden_dim)

    def forward(self, x: torch.Tensor, positions: torch.Tensor, cu_seqlens: torch.Tensor,
                max_seqlen: int) -> torch.Tensor:
        x = x + self.attention(self.attention_norm(x), positions, cu_seqlens, max_seqlen)
        return x + self.feed_forward(self.ffn_norm(x))


class ResidualMLP(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(dim, dim), nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.fc2(F.gelu(self.fc1(x)))


class ImageEncoder(nn.Module):
    """Patches [n, P, Dp] → embeddings [n·P, D]: a linear projection, optionally an MLP stack."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.proj = nn.Linear(cfg.media().patch_dim, cfg.dim)
        self.layers = nn.ModuleList(ResidualMLP(cfg.dim) for _ in range(cfg.image_encoder_layers))

    def forward(self, patches: torch.Tensor) -> torch.Tensor:
        x = self.proj(patches.reshape(-1, patches.shape[-1]))
        for layer in self.layers:
            x = layer(x)
        return x


class AudioEncoder(nn.Module):
    """Stacked log-mel frames [n, A, Da] → embeddings [n·A, D]."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.proj = nn.Linear(cfg.media().audio_token_dim, cfg.dim)

    def forward(self, frames: torch.Tensor) -> torch.Tensor:
        return self.proj(frames.reshape(-1, frames.shape[-1]))


class FusionTransformer(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.tok_embeddings = nn.Embedding(cfg.total_vocab, cfg.dim)
        self.image_encoder = ImageEncoder(cfg)
        self.audio_encoder = AudioEncoder(cfg)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.output = None if cfg.tie_embeddings else nn.Linear(cfg.dim, cfg.total_vocab, bias=False)
        if not any(p.is_meta for p in self.parameters()):
            self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        """The one place weights are initialised (also after building on the meta device)."""
        std = self.cfg.init_std
        residual_std = std / math.sqrt(2 * self.cfg.n_layers)  # GPT-2: scale residual outputs
        for name, module in self.named_modules():
            if isinstance(module, nn.Linear):
                is_residual_out = name.endswith(("attention.wo", "feed_forward.w2"))
                nn.init.normal_(module.weight, 0.0, residual_std if is_residual_out else std)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Embedding):
                nn.init.normal_(module.weight, 0.0, std)
            elif isinstance(module, RMSNorm):
                nn.init.ones_(module.weight)

    @property
    def output_weight(self) -> torch.Tensor:
        return self.tok_embeddings.weight if self.output is None else self.output.weight

    def embed(self, batch: Batch) -> torch.Tensor:
        """Token embeddings with media embeddings scattered into their placeholder positions."""
        x_ND = self.tok_embeddings(batch.tokens.reshape(-1))
        # The encoders run even on an empty media list: every parameter then takes part in every
        # backward, on every rank (ZeRO reduces gradients in buckets that must match across ranks).
        image = self.image_encoder(batch.image_patches.to(x_ND.dtype))
        x_ND = x_ND.index_copy(0, batch.image_index, image.to(x_ND.dtype))
        audio = self.audio_encoder(batch.audio_tokens.to(x_ND.dtype))
        return x_ND.index_copy(0, batch.audio_index, audio.to(x_ND.dtype))

    def hidden(self, batch: Batch) -> torch.Tensor:
        """Final hidden states [N, D] (after the last norm)."""
        x = self.embed(batch)
        positions = batch.positions.reshape(-1)
        for layer in self.layers:
            if self.cfg.activation_checkpointing and self.training:
                x = checkpoint(layer, x, positions, batch.cu_seqlens, batch.max_seqlen,
                               use_reentrant=False)
            else:
                x = layer(x, positions, batch.cu_seqlens, batch.max_seqlen)
        return self.norm(x)

    def forward(self, batch: Batch) -> torch.Tensor:
        """Mean next-token loss over the targets of the batch, a media-code target weighing
        model.code_loss_weight and a text target 1: (Σ_all l + (w − 1)·Σ_code l) / (n + (w − 1)·n_code)."""
        hidden, targets = self.hidden(batch), batch.targets.reshape(-1)
        w, n_code = self.cfg.code_loss_weight, batch.counts.get("code_targets", 0)
        if w == 1.0 or n_code == 0:
            return kernels.linear_cross_entropy(hidden, self.output_weight, targets)
        total = kernels.linear_cross_entropy(hidden, self.output_weight, targets, reduction="sum")
        codes = kernels.linear_cross_entropy(hidden[batch.code_index], self.output_weight,
                                             targets[batch.code_index], reduction="sum")
        n = batch.counts["targets"]  # counted by collate_rows, no host sync
        return (total + (w - 1.0) * codes) / (n + (w - 1.0) * n_code)

    def token_losses(self, batch: Batch) -> torch.Tensor:
        """Per-target losses [B, T] (0 where the target is ignored), for evaluation."""
        losses = kernels.linear_cross_entropy(self.hidden(batch), self.output_weight,
                                              batch.targets.reshape(-1), reduction="none")
        return losses.view_as(batch.targets)

    @torch.no_grad()
    def logits_at(self, batch: Batch, flat_index: torch.Tensor) -> torch.Tensor:
        """Logits [len(flat_index), V] at selected positions (generation)."""
        h = self.hidden(batch)[flat_index]
        return (h @ self.output_weight.t()).float()
