"""Training and evaluating a media tokenizer on inputs already in memory.

The inputs are what `tokenizer.input_from_bytes` makes (pixels [N, 3, H, W] or log-mel
[N, M, F]); reading them from shards is the caller's job (`data_tools/media_tokenizer.py`), so
this runs the same from the command line and from a training run. Deterministic from `seed` on
one thread count: batch order comes from a seeded generator (seed torch before building the
tokenizer for the same initial weights, as `mmtrain data train-media-tokenizer` does).
"""

from __future__ import annotations

import dataclasses
import math
import time
from typing import Callable

import numpy as np
import torch

from mmtrain.media_tokenizers.files import MediaTokenizer


@dataclasses.dataclass(frozen=True, kw_only=True)
class FitConfig:
    steps: int = 600
    batch_size: int = 64
    lr: float = 2e-3
    warmup: int = 20  # steps of linear warm-up; then cosine decay to 10 % of lr
    seed: int = 0
    log_every: int = 100

    def __post_init__(self) -> None:
        for key in ("steps", "batch_size", "log_every"):
            if getattr(self, key) < 1:
                raise ValueError(f"{key.replace('_', '-')}={getattr(self, key)} must be >= 1")
        if not 0 < self.lr < 1:
            raise ValueError(f"lr={self.lr} must be in (0, 1)")
        if self.warmup < 0:
            raise ValueError(f"warmup={self.warmup} must be >= 0")


def _lr_at(step: int, cfg: FitConfig) -> float:
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    progress = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return cfg.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def fit(tokenizer: MediaTokenizer, inputs: np.ndarray, cfg: FitConfig,
        log: Callable[[str], None] = print) -> dict:
    """Train `tokenizer` in place on `inputs` [N, ...]; returns a record of the run."""
    if len(inputs) == 0:
        raise ValueError(f"no {tokenizer.kind} inputs to train the tokenizer on")
    order = np.random.default_rng(cfg.seed)
    data = torch.from_numpy(np.ascontiguousarray(inputs, dtype=np.float32))
    device = next(tokenizer.parameters()).device
    opt = torch.optim.AdamW(tokenizer.parameters(), lr=cfg.lr, weight_decay=0.0)
    tokenizer.train()
    t0 = time.perf_counter()
    loss_sum, seen = 0.0, 0
    for step in range(cfg.steps):
        for group in opt.param_groups:
            group["lr"] = _lr_at(step, cfg)
        pick = order.integers(0, len(data), min(cfg.batch_size, len(data)))
        batch = data[torch.from_numpy(pick)].to(device)
        recon, _ = tokenizer(batch)
        loss = tokenizer.loss(batch, recon)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(tokenizer.parameters(), 1.0)
        opt.step()
        loss_sum, seen = loss_sum + loss.item(), seen + 1  # sync
        if (step + 1) % cfg.log_every == 0 or step + 1 == cfg.steps:
            log(f"{tokenizer.kind} tokenizer step {step + 1}/{cfg.steps}  loss "
                f"{loss_sum / seen:.4f}  {time.perf_counter() - t0:.1f} s")
            loss_sum, seen = 0.0, 0
    tokenizer.eval()
    return {"steps": cfg.steps, "batch_size": cfg.batch_size, "lr": cfg.lr, "seed": cfg.seed,
            "items": len(inputs), "seconds": round(time.perf_counter() - t0, 1)}


@torch.no_grad()
def evaluate(tokenizer: MediaTokenizer, inputs: np.ndarray, batch_size: int = 256) -> dict:
    """Reconstruction quality through the codes (encode → decode) on `inputs` [N, ...]:
    {quality_name: mean over items, "items": N, "codes_used": distinct codes seen}."""
    if len(inputs) == 0:
        raise ValueError(f"no held-out {tokenizer.kind} inputs to measure the tokenizer on")
    was_training = tokenizer.training
    tokenizer.eval()
    device = next(tokenizer.parameters()).device
    scores, used = [], set()
    for start in range(0, len(inputs), batch_size):
        x = torch.from_numpy(np.ascontiguousarray(inputs[start:start + batch_size],
                                                  dtype=np.float32)).to(device)
        codes = tokenizer.encode(x)
        scores.append(tokenizer.quality(x, tokenizer.decode(codes)).cpu())
        used.update(torch.unique(codes).tolist())
    tokenizer.train(was_training)
    return {tokenizer.quality_name: round(float(torch.cat(scores).mean()), 3),
            "items": len(inputs), "codes_used": len(used)}
