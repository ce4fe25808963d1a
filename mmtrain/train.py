"""The training loop, run by every rank (started by `mmtrain train` / `mmtrain launch`).

    python -m torch.distributed.run --nproc-per-node 2 -m mmtrain.train --config-json RUN/config.json

Reads top to bottom: set up → resume → loop of train_step with periodic log / eval / checkpoint.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import os
import random
import resource
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch.distributed.elastic.multiprocessing.errors import record

from mmtrain import kernels
from mmtrain.checkpoint import Checkpointer
from mmtrain.config import RunConfig, from_dict
from mmtrain.data.loader import ShardLoader, eval_batches, generation_eval_batches
from mmtrain.data.tokenizer import build_tokenizer
from mmtrain.distributed import deepspeed as ds
from mmtrain.distributed.collectives import Collectives
from mmtrain.evaluate import evaluate, generation_gains
from mmtrain.health import (EXIT_DIVERGED, Diverged, LossMonitor, PreemptionFlag, StepFlags,
                            parameters_finite)
from mmtrain.metrics import MetricsLogger, share_metrics
from mmtrain.model import FusionTransformer, ModelConfig
from mmtrain.requeue import after_preemption_save, is_restart
from mmtrain.watchdog import Watchdog

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
    rank, world, device = ds.init_distributed(cfg.engine, device=cfg.launch.device)
    coll = Collectives(device)  # every collective outside DeepSpeed, on the engine's device
    engine_cfg = cfg.engine_for(world)  # grad_accum derived from engine.global_batch_tokens
    run_dir = cfg.train.run_dir
    setup_logging(run_dir, rank)
    seed_everything(cfg.train.seed)
    kernels.set_backend(cfg.model.kernels)

    tokenizer = build_tokenizer(cfg.data.tokenizer)
    if tokenizer.vocab_size > cfg.model.vocab_size:
        raise ValueError(f"model.vocab_size={cfg.model.vocab_size} is smaller than the tokenizer's "
                         f"{tokenizer.vocab_size} tokens ({cfg.data.tokenizer})")
    spec = cfg.model.media()
    model = ds.build_model(lambda: FusionTransformer(cfg.model), engine_cfg, device)
    if cfg.train.compile:  # per block: parameter names, hence checkpoints, stay the same
        for block in model.layers:
            block.compile()
    engine, ds_json = ds.build_engine(model, engine_cfg, micro_batch_size=cfg.data.micro_batch_size,
                                      world_size=world, total_steps=cfg.train.steps,
                                      run_dir=run_dir)
    loader = ShardLoader(cfg.data, spec=spec, tokenizer=tokenizer, rank=rank, world_size=world,
                         quarantine=run_dir / "quarantine" / f"rank_{rank}.jsonl",
                         pin_memory=device.type == "cuda")
    checkpointer = Checkpointer(run_dir / "checkpoints", rank=rank, world_size=world,
                                keep_last=cfg.train.keep_last, comm=coll,
                                peer_timeout_s=60.0 * cfg.engine.timeout_minutes)
    metrics = MetricsLogger(run_dir, enabled=rank == 0, total_steps=cfg.train.steps)
    val = (eval_batches(cfg.data.val, cfg.data, spec=spec, tokenizer=tokenizer, rank=rank,
                        world_size=world, num_batches=cfg.train.eval_batches,
                        codes=loader.plan.codes)
           if cfg.data.val and cfg.train.eval_batches else [])
    # The generation gains (caption → image / audio codes), on items of the same held-out split.
    generated = {kind: cfg.model.code_range(kind) for kind in loader.media_tokenizers()}
    val_generation = (generation_eval_batches(cfg.data.val, cfg.data, spec=spec, tokenizer=tokenizer,
                                              rank=rank, world_size=world,
                                              items_per_kind=8 * cfg.train.eval_batches,
                                              codes=loader.plan.codes)
                      if val and generated else {})

    step = 0
    ckpt = None if fresh else checkpointer.find_resume(resume)
    if ckpt is not None:
        step = checkpointer.load(ckpt, load_engine=lambda root, tag, saved_world: ds.load_checkpoint(
                                     engine, root, tag, saved_world_size=saved_world),
                                 load_loader=loader.load_state_dict)
        log.info("resumed from %s at step %d", ckpt, step)
    elif rank == 0:
        log.info("starting fresh: %d ranks, %s, ZeRO-%d, %s, %.2fM parameters, %s", world, device,
                 cfg.engine.zero_stage, cfg.engine.precision, cfg.model.num_params() / 1e6,
                 cfg.global_batch_summary(world))

    def save(at: int) -> float:
        """Checkpoint step `at`; returns the seconds training was blocked (written and committed
        in the background, see mmtrain/checkpoint.py)."""
        t0 = time.perf_counter()
        if not parameters_finite(engine.module.parameters()):
            raise Diverged(f"step {at}: parameters are not finite; refusing to checkpoint them")
        checkpointer.save(at, loader_state=loader.state_dict(), config=cfg.to_dict(),
                          save_engine=lambda root, tag: ds.snapshot_checkpoint(
                              engine, root, tag, {"step": at}))
        flags.saved()
        watchdog.beat(at)  # a save is progress too
        return time.perf_counter() - t0

    def run_eval(at: int) -> dict[str, float]:
        engine.module.eval()
        result = evaluate(engine.module.token_losses, val, device, coll)
        if generated:
            result.update(generation_gains(engine.module.token_losses, val_generation, generated,
                                           device, coll))
        engine.module.train()
        metrics.log(at, result, prefix="val")
        if rank == 0:
            print(f"eval @ step {at}: loss {result['loss']:.4f} | caption loss "
                  f"{result['caption_loss']:.4f} (shuffled media {result['caption_loss_shuffled']:.4f})"
                  f" | media gain {result['media_gain']:+.4f} nats/caption token", flush=True)
            for kind in sorted(generated):
                if f"{kind}_generation_gain" in result:
                    print(f"eval @ step {at}: {kind} code loss {result[f'{kind}_code_loss']:.4f} "
                          f"(shuffled captions {result[f'{kind}_code_loss_shuffled']:.4f}) | "
                          f"{kind}-generation gain {result[f'{kind}_generation_gain']:+.4f} "
                          "nats/code", flush=True)
        return result

    preempt = PreemptionFlag()
    flags = StepFlags(coll, cfg.train.ckpt_minutes)
    monitor = LossMonitor(max_consecutive=cfg.train.max_skipped_steps, spike_z=cfg.train.spike_z)
    peak = peak_flops(cfg.train.peak_tflops, device)
    stop_at = min(cfg.train.steps, step + cfg.train.stop_after) if cfg.train.stop_after else cfg.train.steps
    engine.train()
    metrics.begin(step)
    watchdog = Watchdog(run_dir / "logs", rank, hang_seconds=cfg.train.hang_dump_minutes * 60)
    watchdog.start(step)  # stacks on disk when no step completes in time, and on SIGUSR2
    while step < stop_at:
        t0 = time.perf_counter()
        out = train_step(engine, loader, engine_cfg.grad_accum, device, flags, preempt)
        step += 1
        step_time = time.perf_counter() - t0
        watchdog.beat(step)
        if out.skipped:
            monitor.skipped(step)
        spike = not out.skipped and monitor.observe(step, out.loss)
        if cfg.train.eval_every and step % cfg.train.eval_every == 0 and val:
            run_eval(step)
        saving = (out.stop or out.save_due or step == stop_at  # stop: SIGTERM / SIGUSR1 somewhere
                  or bool(cfg.train.ckpt_every and step % cfg.train.ckpt_every == 0))
        blocked = save(step) if saving else None  # after the eval: it may draw random numbers
        if step % cfg.train.log_every == 0 or step == stop_at or out.skipped or saving:
            values = step_metrics(out, step_time, coll, model=cfg.model,
                                  seq_len=cfg.data.seq_len, peak=peak)
            values.update(lr=ds.current_lr(engine), grad_norm=ds.grad_norm(engine),
                          skipped_steps=monitor.skipped_total, loss_spike=float(spike),
                          skipped_samples=float(loader.skipped), epoch=float(loader.epochs()),
                          skipped_shards=float(loader.skipped_shards),
                          unreadable_shards=float(loader.unreadable_shards))
            if blocked is not None:
                values["ckpt_blocking_s"] = blocked
            values.update(share_metrics(loader.share_names, coll.sum(loader.dataset_rows())))
            metrics.log(step, values)
            metrics.progress(step, values)
        if out.stop:
            log.info("preemption signal: saved step %d; exiting once it is committed", step)
            checkpointer.wait()
            after_preemption_save(run_dir, rank=rank, signum=preempt.signal, step=step)  # SLURM
            loader.close()
            return {}
    result = run_eval(step) if val and step == cfg.train.steps else {}  # while the save is written
    checkpointer.wait()  # the last save is committed (this rank's part written) before exiting
    if rank == 0:
        latest = (run_dir / "checkpoints" / "latest").read_text().strip()
        print(f"run directory: {run_dir}\ncheckpoint:    {run_dir / 'checkpoints' / latest}\n"
              f"tensorboard:   tensorboard --logdir {run_dir / 'tb'}", flush=True)
    watchdog.stop()
    loader.close()  # stops the decode workers cleanly
    metrics.close()
    coll.barrier()
    return result


@dataclasses.dataclass
class StepOutput:
    loss: float  # mean over this rank's micro-batches (nan when skipped)
    counts: dict[str, int]
    data_wait: float
    skipped: bool  # a non-finite loss on some rank: no backward, no optimizer step
    stop: bool  # a preemption signal reached some rank
    save_due: bool  # the time-based checkpoint interval passed (rank 0's clock)


def train_step(engine, loader: ShardLoader, grad_accum: int, device: torch.device,
               flags: StepFlags, preempt: PreemptionFlag) -> StepOutput:
    """One optimizer step: grad_accum micro-batches through the DeepSpeed engine.

    Every micro-batch's loss is checked on all ranks before its backward. A non-finite one skips
    the step, leaving parameters and optimizer state untouched: in the first micro-batch at once
    (no backward); in a later one the earlier gradients are already accumulated, so the step runs
    to its boundary and the ZeRO 1-3 optimizer, which checks the gradients for inf/NaN there,
    skips it (ZeRO-0 has no such check: the run stops instead).
    """
    losses, counts, data_wait = [], {}, 0.0
    stop = save_due = poisoned = False
    skipped_before = ds.skipped_steps(engine)
    for micro in range(grad_accum):
        t0 = time.perf_counter()
        batch = loader.next_batch().to(device)
        data_wait += time.perf_counter() - t0
        for k, v in batch.counts.items():
            counts[k] = counts.get(k, 0) + v
        loss = engine(batch)
        nonfinite, stop_now, due_now = flags.agree(loss.detach(), preempt.set)
        stop, save_due = stop or stop_now, save_due or due_now
        if nonfinite and micro == 0:
            return StepOutput(math.nan, counts, data_wait, True, stop, save_due)
        if nonfinite and not poisoned:
            if not ds.skips_nonfinite_steps(engine):
                raise Diverged("non-finite loss in a later micro-batch of an accumulated step; "
                               "ZeRO-0 cannot skip it: use engine.zero_stage >= 1 or "
                               "engine.grad_accum=1")
            poisoned = True
        engine.backward(loss)
        engine.step()
        if not poisoned:
            losses.append(loss.item())  # sync (already synced by the flags above)
    if poisoned:
        if ds.skipped_steps(engine) == skipped_before:  # our invariant: DeepSpeed skipped it
            raise Diverged("DeepSpeed applied an optimizer step with non-finite gradients")
        return StepOutput(math.nan, counts, data_wait, True, stop, save_due)
    return StepOutput(sum(losses) / len(losses), counts, data_wait, False, stop, save_due)


def peak_flops(configured_tflops: float, device: torch.device) -> float:
    """Peak dense bf16 FLOP/s of one device (0 when unknown: MFU is then not reported)."""
    if configured_tflops:
        return configured_tflops * 1e12
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, tflops in (("H200", 989.0), ("H100", 989.0), ("A100", 312.0)):
            if key in name:
                return tflops * 1e12
    return 0.0


def step_metrics(out: StepOutput, step_time: float, coll: Collectives, *, model: ModelConfig,
                 seq_len: int, peak: float) -> dict[str, float]:
    """Loss averaged over ranks, throughput summed over ranks (one all-reduce, on the device).

    mfu          = tokens/s · (6·N + 12·L·d·T) / (peak FLOP/s · devices): the standard formula
                   (ModelConfig.flops_per_token), full-context attention at T = data.seq_len.
    mfu_executed = FLOPs executed / step time / (peak FLOP/s · devices), attention counted per
                   document with its causal half: 6·N per position + 12·L·d per query-key pair,
                   Σ n(n+1)/2 over the documents (ModelConfig.flops_executed).
    Both only when the peak is known (train.peak_tflops, or a known GPU).
    """
    keys = ("real_tokens", "text_tokens", "image_tokens", "audio_tokens", "pad_tokens", "docs",
            "split_docs", "dropped_docs", "attention_pairs")
    total = coll.sum([out.loss] + [float(out.counts.get(k, 0)) for k in keys] + [out.data_wait])
    world = coll.world_size
    tokens = total[1]
    values = {
        "loss": total[0] / world,
        "tokens_per_s": tokens / step_time,
        **{f"{k.removesuffix('_tokens')}_tokens_per_s": v / step_time
           for k, v in zip(keys[1:4], total[2:5])},
        "packing_efficiency": tokens / max(1.0, tokens + total[5]),
        "docs_per_s": total[6] / step_time, "split_docs": total[7], "dropped_docs": total[8],
        "data_wait_pct": 100.0 * total[10] / world / step_time, "step_time": step_time,
        "memory_gb": memory_gb(),
    }
    if peak:
        values["mfu"] = tokens / step_time * model.flops_per_token(seq_len) / (peak * world)
        executed = model.flops_executed(positions=int(tokens + total[5]), attention_pairs=int(total[9]))
        values["mfu_executed"] = executed / step_time / (peak * world)
    return values


def memory_gb() -> float:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


@record  # torchrun's failure summary then carries the rank's traceback
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="mmtrain rank entry point (started by torchrun)")
    parser.add_argument("--config-json", required=True, help="resolved config written by the launcher")
    parser.add_argument("--fresh", action="store_true")
    parser.add_argument("--resume", default=None)
    args = parser.parse_args(argv)
    # A restart by torchrun (`mmtrain launch --max-restarts`) continues from `latest` (which a
    # first start with --resume X moved to X): --resume (or --fresh) is for the first start only.
    if is_restart(os.environ):  # torchrun restart (any node's failure) or SLURM requeue
        args.fresh, args.resume = False, None
    cfg = from_dict(RunConfig, json.loads(Path(args.config_json).read_text()))
    try:
        train(cfg, fresh=args.fresh, resume=args.resume)
    except Diverged as e:
        log.error("training diverged: %s", e)
        return EXIT_DIVERGED
    return 0


if __name__ == "__main__":
    code = main()
    # Leave without the interpreter's native teardown, as decode workers do
    # (mmtrain.data.loader.exit_without_teardown): C++ thread pools (Arrow's, started by reading the
    # manifest's offsets) can abort it with "terminate called without an active exception" after
    # everything is written and committed. Exceptions still take the normal path above.
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
