"""Evaluation on held-out shards, and the media-gain test of fusion.

media gain = caption loss with the media shuffled across samples − caption loss with the real
media (nats per caption token). Caption tokens are the text right after an image or audio clip.
A model that ignores the media scores ~0; one that looks and listens scores clearly above 0.
"""

from __future__ import annotations

from typing import Callable

import torch

from mmtrain.data.batch import Batch
from mmtrain.distributed.collectives import Collectives


def shuffle_media(batch: Batch) -> Batch:
    """The same batch with every image (and audio clip) replaced by another one of the batch."""
    def roll(x: torch.Tensor) -> torch.Tensor:
        return x.roll(1, dims=0) if x.shape[0] > 1 else x
    return Batch(**{**batch.__dict__, "image_patches": roll(batch.image_patches),
                    "audio_tokens": roll(batch.audio_tokens)})


@torch.no_grad()
def evaluate(token_losses: Callable[[Batch], torch.Tensor], batches: list[Batch],
             device: torch.device, collectives: Collectives | None) -> dict[str, float]:
    """Loss over all text targets, caption loss with real and shuffled media, media gain.

    `token_losses(batch) -> [B, T]` runs the model; the sums are added over ranks through
    `collectives` (on `device`); None: this process alone.
    """
    # sums: loss, targets, caption loss real, caption loss shuffled, caption tokens
    sums = torch.zeros(5, dtype=torch.float64, device=device)
    for batch in batches:
        batch = batch.to(device)
        valid = batch.targets != -100
        real = token_losses(batch).double()
        shuffled = token_losses(shuffle_media(batch)).double()
        caption = batch.caption_mask
        sums += torch.stack([real[valid].sum(), valid.sum().double(), real[caption].sum(),
                             shuffled[caption].sum(), caption.sum().double()])
    totals = collectives.sum(sums) if collectives is not None else sums.tolist()  # sync
    loss, n, cap_real, cap_shuf, n_cap = totals
    n_cap = max(n_cap, 1.0)
    return {"loss": loss / max(n, 1.0), "caption_loss": cap_real / n_cap,
            "caption_loss_shuffled": cap_shuf / n_cap,
            "media_gain": (cap_shuf - cap_real) / n_cap, "caption_tokens": n_cap}


@torch.no_grad()
def generation_gains(token_losses: Callable[[Batch], torch.Tensor],
                     sets: dict[str, tuple[list[Batch], list[Batch]]],
                     code_ranges: dict[str, tuple[int, int]], device: torch.device,
                     collectives: Collectives | None) -> dict[str, float]:
    """Per generated kind: code loss with the true captions, with shuffled captions, and the gain

        {kind}_generation_gain = code loss (shuffled captions) − code loss (true captions)

    in nats per code (`loader.generation_eval_batches` makes the two sets; they hold the same
    codes). ~0 for a model that draws media regardless of the caption, clearly > 0 for one that
    draws what the caption says. Every rank must call this with the same kinds.
    """
    out: dict[str, float] = {}
    for kind in sorted(code_ranges):
        first, stop = code_ranges[kind]
        sums = torch.zeros(4, dtype=torch.float64, device=device)  # true, n, shuffled, n
        for i, batches in enumerate(sets.get(kind, ([], []))):
            for batch in batches:
                batch = batch.to(device)
                mask = (batch.targets >= first) & (batch.targets < stop)
                sums[2 * i] += token_losses(batch).double()[mask].sum()
                sums[2 * i + 1] += mask.sum()
        true, n_true, shuffled, n_shuffled = (collectives.sum(sums) if collectives is not None
                                              else sums.tolist())
        if n_true == 0 or n_shuffled == 0:
            continue
        out[f"{kind}_code_loss"] = true / n_true
        out[f"{kind}_code_loss_shuffled"] = shuffled / n_shuffled
        out[f"{kind}_generation_gain"] = shuffled / n_shuffled - true / n_true
    return out
