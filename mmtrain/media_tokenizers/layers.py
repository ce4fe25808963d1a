"""Convolutional encoder/decoder stacks shared by the image (2-D) and audio (1-D) tokenizers.

A stack of stages, each halving (encoder) or doubling (decoder) the resolution, with one residual
block per stage. The quantizer between them is `vector_quantize_pytorch.FSQ` (finite scalar
quantization, Mentzer et al. 2023): no codebook to collapse, no commitment loss to tune.

Legend: B batch, C channels, S spatial positions (H×W for images, frames for audio), d = number of
FSQ levels (the latent's channels).
"""

from __future__ import annotations

import torch
from torch import nn
from vector_quantize_pytorch import FSQ


def _conv(dims: int) -> type[nn.Module]:
    return nn.Conv2d if dims == 2 else nn.Conv1d


def _norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(min(8, channels), channels)


class ResBlock(nn.Module):
    def __init__(self, dims: int, channels: int) -> None:
        super().__init__()
        conv = _conv(dims)
        c = channels
        self.body = nn.Sequential(_norm(c), nn.SiLU(), conv(c, c, 3, padding=1),
                                  _norm(c), nn.SiLU(), conv(c, c, 3, padding=1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


class Encoder(nn.Module):
    """[B, in_channels, S] → [B, d, S / 2^len(channels)]: each stage is a stride-2 convolution
    to its width and a residual block (nothing runs at full resolution but the first conv)."""

    def __init__(self, dims: int, in_channels: int, channels: tuple[int, ...],
                 latent: int) -> None:
        super().__init__()
        conv = _conv(dims)
        layers: list[nn.Module] = []
        for c_in, c_out in zip((in_channels, *channels), channels):
            layers += [conv(c_in, c_out, 4, stride=2, padding=1), ResBlock(dims, c_out)]
        layers += [_norm(channels[-1]), nn.SiLU(), conv(channels[-1], latent, 1)]
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class Decoder(nn.Module):
    """[B, d, S'] → [B, out_channels, S' · 2^len(channels)] (mirror of the encoder: nearest
    upsampling and a convolution per stage)."""

    def __init__(self, dims: int, out_channels: int, channels: tuple[int, ...],
                 latent: int) -> None:
        super().__init__()
        conv = _conv(dims)
        rev = channels[::-1]
        layers: list[nn.Module] = [conv(latent, rev[0], 3, padding=1), ResBlock(dims, rev[0])]
        for c_in, c_out in zip(rev, rev[1:]):
            layers += [nn.Upsample(scale_factor=2, mode="nearest"),
                       conv(c_in, c_out, 3, padding=1), ResBlock(dims, c_out)]
        layers += [nn.Upsample(scale_factor=2, mode="nearest"), _norm(rev[-1]), nn.SiLU(),
                   conv(rev[-1], out_channels, 3, padding=1)]
        self.net = nn.Sequential(*layers)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.net(z)


def check_architecture(section: str, channels: tuple[int, ...], levels: tuple[int, ...]) -> None:
    """ValueErrors naming the key, for the fields both tokenizer configs share."""
    if not 1 <= len(channels) <= 6 or any(c < 1 for c in channels):
        raise ValueError(f"{section}.channels={list(channels)} must hold 1 to 6 positive "
                         "widths (one per stage; each stage halves the resolution)")
    if not levels or any(lv < 3 for lv in levels):
        raise ValueError(f"{section}.levels={list(levels)} must be FSQ levels, each >= 3")
    size = 1
    for lv in levels:
        size *= lv
    if size > 65536:
        raise ValueError(f"{section}.levels={list(levels)} give {size} codes; at most 65536 "
                         "(codes are stored as uint16)")


class FSQAutoencoder(nn.Module):
    """Encoder → FSQ → decoder over `dims` spatial dimensions: the network both tokenizers share.
    Subclasses add their shapes, the conversions from bytes and back, and their quality measure."""

    fingerprint = ""  # set by load_tokenizer (files.py)

    def __init__(self, dims: int, in_channels: int, channels: tuple[int, ...],
                 levels: tuple[int, ...]) -> None:
        super().__init__()
        d = len(levels)
        self.encoder = Encoder(dims, in_channels, channels, d)
        self.quantizer = FSQ(levels=list(levels), dim=d, channel_first=True)
        self.decoder = Decoder(dims, in_channels, channels, d)

    def forward(self, x_BCS: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(reconstruction, unclamped; codes int64); for training."""
        z_hat, codes = self.quantizer(self.encoder(x_BCS))
        return self.decoder(z_hat), codes.long()

    @torch.no_grad()
    def encode(self, x_BCS: torch.Tensor) -> torch.Tensor:
        """Inputs [B, C, *S] → codes [B, *S'] int64 in [0, codebook_size)."""
        return batch_independent(lambda x: self.quantizer(self.encoder(x))[1].long(), x_BCS)

    def _decode(self, codes: torch.Tensor, finish) -> torch.Tensor:
        """Codes → `finish(decoder output)` (the subclass's clamp), batch-independent."""
        return batch_independent(
            lambda c: finish(self.decoder(self.quantizer.indices_to_codes(c))), codes.long())


def batch_independent(fn, x: torch.Tensor) -> torch.Tensor:
    """`fn(x)` (encode or decode) whose result for an item does not depend on the batch it is in.

    On the CPU, convolutions of a batch of one take other kernels than larger batches, whose
    results differ in the last bits; an item whose latent sits on a quantizer rounding boundary then
    gets another code (seen for ~0.2 % of the demo images, one code each), and a decoded picture
    another PNG. tokenize-media encodes in batches and the loader one item at a time; generate
    decodes its prompts together. So a lone item goes through as a pair of copies.
    """
    if x.shape[0] != 1:
        return fn(x)
    return fn(torch.cat([x, x]))[:1]

