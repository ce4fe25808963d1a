"""Rank functions for the engine tests (run in fresh processes by helpers.run_distributed).

Model: the tiny CPU test model (dim 64, 2 layers); data: fixed text batches, one per (rank,
step), all with the same shape and document lengths, so that the mean loss over 2 ranks equals
the mean over 2 accumulated micro-batches on 1 rank.
"""

from __future__ import annotations

from pathlib import Path

import torch

from mmtrain.data.batch import text_batch
from mmtrain.distributed import deepspeed as ds
from mmtrain.distributed.config import EngineConfig
from mmtrain.model import FusionTransformer, ModelConfig

STAGES = (0, 1, 2, 3)
SAVED_STEPS = 3  # steps before the checkpoint; two more are taken after it
TAG = f"step_{SAVED_STEPS:08d}"
MODEL = dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=256)


TEXT = b"the cat sat on the mat and the dog sat on the log; " * 8


def batch(sample: int, step: int):
    """The micro-batch of data shard `sample` (= rank on 2 ranks) at `step` (1-based): two rows
    of 64 bytes of a learnable text, at offsets fixed by (sample, step)."""
    g = torch.Generator().manual_seed(1000 * step + sample)
    starts = torch.randint(0, len(TEXT) - 64, (2,), generator=g).tolist()
    tokens = torch.tensor([list(TEXT[s:s + 64]) for s in starts])
    return text_batch(tokens, [[40, 24], [30, 34]])


def engine_config(stage: int, grad_accum: int = 1) -> EngineConfig:
    # zero3_persistence_threshold=0: really partition every parameter of the tiny model.
    return EngineConfig(zero_stage=stage, warmup_steps=2, grad_accum=grad_accum,
                        zero3_persistence_threshold=0)


def build(stage: int, world: int, *, seed: int, grad_accum: int = 1):
    cfg = engine_config(stage, grad_accum)
    torch.manual_seed(seed)
    model = ds.build_model(lambda: FusionTransformer(ModelConfig(**MODEL)), cfg, torch.device("cpu"))
    decayed = [n for n, p in model.named_parameters()
               if any(p is q for q in ds.param_groups(model, 0.1)[0]["params"])]
    engine, _ = ds.build_engine(model, cfg, micro_batch_size=2, world_size=world, total_steps=10)
    return engine, decayed


def train_step(engine, rank: int, world: int, step: int) -> float:
    """One optimizer step over the global batch of `step` (samples 0 and 1), split over ranks."""
    samples = [rank] if world == 2 else [0, 1]
    losses = []
    for sample in samples:
        loss = engine(batch(sample, step))
        engine.backward(loss)
        engine.step()
        losses.append(loss.detach())
    mean = torch.stack(losses).mean()
    torch.distributed.all_reduce(mean)
    return float(mean) / world  # sync


def snapshot(engine) -> dict:
    """Everything a resume must restore, gathered whole (collective under ZeRO-3)."""
    return {"params": ds.full_parameters(engine),
            "exp_avg": ds.full_optimizer_state(engine, "exp_avg"),
            "exp_avg_sq": ds.full_optimizer_state(engine, "exp_avg_sq"),
            "lr": ds.current_lr(engine), "global_steps": engine.global_steps,
            "adam_steps": sorted(float(state["step"]) for state in _inner(engine).state.values()),
            "weight_decay": [g["weight_decay"] for g in engine.optimizer.param_groups]}


def _inner(engine) -> torch.optim.Optimizer:
    """The torch optimizer under DeepSpeed's ZeRO wrapper (ZeRO-0: the client optimizer)."""
    return getattr(engine.optimizer, "optimizer", engine.optimizer)


def train_and_save(rank: int, world: int, root: str) -> dict:
    """2 ranks, every stage: same seed; train, save at step 3, snapshot, train steps 4 and 5."""
    rank, world, _ = ds.init_distributed(engine_config(0))
    out = {}
    for stage in STAGES:
        engine, decayed = build(stage, world, seed=0)
        initial = ds.full_parameters(engine)
        losses = [train_step(engine, rank, world, s) for s in range(1, SAVED_STEPS + 1)]
        ds.save_checkpoint(engine, f"{root}/zero{stage}", TAG, {"step": SAVED_STEPS})
        snap = snapshot(engine)
        engine.module.eval()
        # ZeRO-3 (everything partitioned): a method other than forward, called directly
        token_losses = engine.module.token_losses(batch(rank, 1)).detach().clone()
        engine.module.train()
        losses += [train_step(engine, rank, world, s) for s in (SAVED_STEPS + 1, SAVED_STEPS + 2)]
        out[stage] = {"initial": initial, "losses": losses, "snapshot": snap,
                      "token_losses": token_losses, "decayed": decayed}
    return out


def load_and_continue(rank: int, world: int, root: str, saved_world: int, load_tag: str,
                      save_tag: str | None) -> dict:
    """Every stage: build with another seed, load `load_tag` (saved by `saved_world` ranks),
    snapshot, save it again on this world size as `save_tag`, train steps 4 and 5."""
    rank, world, _ = ds.init_distributed(engine_config(0))
    out = {}
    for stage in STAGES:
        engine, _ = build(stage, world, seed=123, grad_accum=2 if world == 1 else 1)
        client = ds.load_checkpoint(engine, f"{root}/zero{stage}", load_tag,
                                    saved_world_size=saved_world)
        snap = snapshot(engine)
        if save_tag:
            ds.save_checkpoint(engine, f"{root}/zero{stage}", save_tag, {"step": SAVED_STEPS})
        losses = [train_step(engine, rank, world, s) for s in (SAVED_STEPS + 1, SAVED_STEPS + 2)]
        leftovers = sorted(p.name for p in Path(f"{root}/zero{stage}").iterdir()
                           if p.name.startswith(".universal"))
        out[stage] = {"snapshot": snap, "losses": losses, "client_step": client.get("step"),
                      "leftovers": leftovers}
    return out
