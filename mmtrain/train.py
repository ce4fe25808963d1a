"""The training loop, run by every rank (started by `mmtrain train` / `mmtrain launch`).

    python -m torch.distributed.run --nproc-per-node 2 -m mmtrain.train --config-json RUN/config.json

Reads top to bottom: set up → resume → loop of train_step with periodic log / eval / checkpoint.
"""

from __future__ import annotations

import argparse
import logging
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from mmtrain import kernels
from mmtrain.checkpoint import Checkpointer
from mmtrain.config import RunConfig, from_dict
from mmtrain.data.loader import ShardLoader, eval_batches
from mmtrain.data.tokenizer import build_tokenizer
from mmtrain.distributed import deepspeed as ds
from mmtrain.evaluate import evaluate
from mmtrain.metrics import MetricsLogger
from mmtrain.model import FusionTransformer

log = logging.getLogger("mmtrain.train")


def setup_logging(run_dir: Path, rank: int) -> None:
    (run_dir / "logs").mkdir(parents=True, exist_ok=True)
    handlers: list[logging.Handler] = [logging.FileHandler(run_dir / "logs" / f"rank_{rank}.log")]
    if rank == 0:
        handlers.append(logging.StreamHandler(sys.stdout))
    logging.basicConfig(level=logging.INFO, handlers=handlers, force=True,
                        format=f"%(asctime)s [rank {rank}] %(name)s: %(message)s")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def train(cfg: RunConfig, *, fresh: bool = False, resume: str | None = None) -> dict[str, float]:
    rank, world, device = ds.init_distributed(cfg.engine)
    run_dir = cfg.train.run_dir
    setup_logging(run_dir, rank)
    seed_everything(cfg.train.seed)
    kernels.set_backend(cfg.model.kernels)

    tokenizer = build_tokenizer(cfg.data.tokenizer)
    if tokenizer.vocab_size > cfg.model.vocab_size:
        raise ValueError(f"model.vocab_size={cfg.model.vocab_size} is smaller than the tokenizer's "
                         f"{tokenizer.vocab_size} tokens ({cfg.data.tokenizer})")
    spec = cfg.model.media()
    model = ds.build_model(lambda: FusionTransformer(cfg.model), cfg.engine, device)
    engine, ds_json = ds.build_engine(model, cfg.engine, micro_batch_size=cfg.data.micro_batch_size,
                                      world_size=world, total_steps=cfg.train.steps)
    loader = ShardLoader(cfg.data, spec=spec, tokenizer=tokenizer, rank=rank, world_size=world,
                         quarantine=run_dir / "quarantine" / f"rank_{rank}.jsonl")
    checkpointer = Checkpointer(run_dir / "checkpoints", rank=rank, world_size=world,
                                keep_last=cfg.train.keep_last, barrier=dist.barrier)
    metrics = MetricsLogger(run_dir, enabled=rank == 0, total_steps=cfg.train.steps)
    val = (eval_batches(cfg.data.val, cfg.data, spec=spec, tokenizer=tokenizer, rank=rank,
                        world_size=world, num_batches=cfg.train.eval_batches)
           if cfg.data.val and cfg.train.eval_batches else [])

    step = 0
    ckpt = None if fresh else checkpointer.find_resume(resume)
    if ckpt is not None:
        step = checkpointer.load(ckpt, load_engine=lambda root, tag: ds.load_checkpoint(engine, root, tag),
                                 load_loader=loader.load_state_dict)
        log.info("resumed from %s at step %d", ckpt, step)
    elif rank == 0:
        log.info("starting fresh: %d ranks, %s, ZeRO-%d, %s, %.2fM parameters", world, device,
                 cfg.engine.zero_stage, cfg.engine.precision, cfg.model.num_params() / 1e6)

    def save(at: int) -> Path:
        return checkpointer.save(
            at, save_engine=lambda root, tag: ds.save_checkpoint(engine, root, tag, {"step": at}),
            loader_state=loader.state_dict(), config=cfg.to_dict())

    def run_eval(at: int) -> dict[str, float]:
        engine.module.eval()
        result = evaluate(engine.module.token_losses, val, device,
                          lambda t: dist.all_reduce(t, op=dist.ReduceOp.SUM))
        engine.module.train()
        metrics.log(at, result, prefix="val")
        if rank == 0:
            print(f"eval @ step {at}: loss {result['loss']:.4f} | caption loss {result['caption_loss']:.4f} "
                  f"(shuffled media {result['caption_loss_shuffled']:.4f}) | media gain "
                  f"{result['media_gain']:+.4f} nats/caption token", flush=True)
        return result

    engine.train()
    last_saved = step
    stop_at = min(cfg.train.steps, step + cfg.train.stop_after) if cfg.train.stop_after else cfg.train.steps
    while step < stop_at:
        t0 = time.perf_counter()
        loss, counts, data_wait = train_step(engine, loader, cfg.engine.grad_accum, device)
        step += 1
        step_time = time.perf_counter() - t0
        if step % cfg.train.log_every == 0 or step == cfg.train.steps:
            values = step_metrics(engine, loss, counts, data_wait, step_time, world)
            metrics.log(step, values)
            metrics.progress(step, values)
        if cfg.train.eval_every and step % cfg.train.eval_every == 0 and val:
            run_eval(step)
        if cfg.train.ckpt_every and step % cfg.train.ckpt_every == 0:
            save(step)
            last_saved = step
    if last_saved != step:
        save(step)
    result = run_eval(step) if val and step == cfg.train.steps else {}
    if rank == 0:
        print(f"run directory: {run_dir}\ncheckpoint:    {run_dir / 'checkpoints'}/"
              f"{(run_dir / 'checkpoints' / 'latest').read_text().strip()}\n"
              f"tensorboard:   tensorboard --logdir {run_dir / 'tb'}", flush=True)
    metrics.close()
    dist.barrier()
    return result


def train_step(engine, loader: ShardLoader, grad_accum: int, device: torch.device):
    """One optimizer step: grad_accum micro-batches through the DeepSpeed engine."""
    losses, counts, data_wait = [], {}, 0.0
    for _ in range(grad_accum):
        t0 = time.perf_counter()
        batch = loader.next_batch().to(device)
        data_wait += time.perf_counter() - t0
        loss = engine(batch)
        engine.backward(loss)
        engine.step()
        losses.append(loss.detach())
        for k, v in batch.counts.items():
            counts[k] = counts.get(k, 0) + v
    return torch.stack(losses).mean(), counts, data_wait


def step_metrics(engine, loss: torch.Tensor, counts: dict[str, int], data_wait: float,
                 step_time: float, world: int) -> dict[str, float]:
    """Loss averaged over ranks, throughput summed over ranks (one all-reduce)."""
    keys = ("real_tokens", "text_tokens", "image_tokens", "audio_tokens", "pad_tokens")
    packed = torch.tensor([loss.item()] + [float(counts.get(k, 0)) for k in keys],  # sync
                          dtype=torch.float64)
    dist.all_reduce(packed, op=dist.ReduceOp.SUM)
    total = packed.tolist()
    tokens = total[1]
    return {
        "loss": total[0] / world, "lr": ds.current_lr(engine), "grad_norm": ds.grad_norm(engine),
        "tokens_per_s": tokens / step_time,
        **{f"{k.removesuffix('_tokens')}_tokens_per_s": v / step_time
           for k, v in zip(keys[1:4], total[2:5])},
        "packing_efficiency": tokens / max(1.0, tokens + total[5]),
        "data_wait_pct": 100.0 * data_wait / step_time, "step_time": step_time,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="mmtrain rank entry point (started by torchrun)")
    parser.add_argument("--config-json", required=True, help="resolved config written by the launcher")
    parser.add_argument("--fresh", action="store_true")
    parser.add_argument("--resume", default=None)
    args = parser.parse_args(argv)
    import json
    cfg = from_dict(RunConfig, json.loads(Path(args.config_json).read_text()))
    train(cfg, fresh=args.fresh, resume=args.resume)
    return 0


if __name__ == "__main__":
    sys.exit(main())
