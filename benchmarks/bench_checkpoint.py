"""P6: checkpoint save throughput ÷ `torch.save` of the same training state (CPU, one process),
and how long a save blocks training, in training steps.

* ours:     `Checkpointer.save` + `wait` with the DeepSpeed engine (ZeRO-2, fp32, gloo world of 1
            in this process): DeepSpeed's model-states + ZeRO optimizer files, loader state, RNG,
            config, each fsync'd, sha256 of every file into MANIFEST.json, COMMITTED, atomic
            `latest` — the whole commit.
* baseline: one `torch.save` of the same state — the engine's module state_dict, its (ZeRO)
            optimizer state_dict and the LR scheduler's — into one file, then fsync: a checkpoint
            is one once it is on disk. The same `torch.save` without fsync is shown too.

MB/s = bytes written ÷ wall time until durable. Before every timed call `os.sync()` flushes all
dirty pages, so no call pays for another's writeback; both sides keep their last two checkpoints,
as training does (deleting a file right after writing it lets the next write reuse its pages, a
speed no real checkpointing loop sees). Rounds alternate; medians. Goal: ours ÷ baseline >= 1.0.

Blocking: the save is asynchronous (mmtrain/checkpoint.py): training waits only while the state is
copied into host memory (`Checkpointer.save` returns; `ckpt_blocking_s` in the training metrics).
Measured as a training loop sees it: step, save, step, step, ... (the writer runs meanwhile), then
wait. Reported: blocking ÷ the median plain step time (goal <= 1 step), and the steps taken while
the background writer ran (they share the CPU with it).

Check: the state at the save (parameters, Adam moments) is taken, training moves on, the checkpoint
is loaded back into the engine through Checkpointer.find_resume/load, and must equal that state
exactly; the benchmark fails otherwise. Defaults are the demo model (configs/tiny.yaml).

    python benchmarks/bench_checkpoint.py [--dim 256 --layers 4 --micro-batch 8 --seq-len 512]
                                          [--rounds 3] [--dir DIR] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mmtrain.checkpoint import Checkpointer  # noqa: E402
from mmtrain.distributed.safe_load import deepspeed_safe_globals  # noqa: E402
from mmtrain.config import RunConfig  # noqa: E402
from mmtrain.distributed import deepspeed as ds  # noqa: E402
from mmtrain.distributed.config import EngineConfig  # noqa: E402
from mmtrain.model import FusionTransformer, ModelConfig  # noqa: E402

from bench_engine import batches, init_world_of_one  # noqa: E402  (same world of one, same data)

GOAL, BLOCKING_GOAL = 1.0, 1.0


def dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def training_state(engine) -> dict[str, dict[str, torch.Tensor]]:
    return {"params": ds.full_parameters(engine),
            "exp_avg": ds.full_optimizer_state(engine, "exp_avg"),
            "exp_avg_sq": ds.full_optimizer_state(engine, "exp_avg_sq")}


def same_state(a: dict, b: dict) -> bool:
    return all(a[k].keys() == b[k].keys() and all(torch.equal(a[k][n], b[k][n]) for n in a[k])
               for k in a)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--micro-batch", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--dir", default=None, help="where to write (default: a temporary directory)")
    p.add_argument("--json", action="store_true")
    args = p.parse_args()

    init_world_of_one()
    model_cfg = ModelConfig(dim=args.dim, n_layers=args.layers, n_heads=max(1, args.dim // 32),
                            n_kv_heads=max(1, args.dim // 64), max_seq_len=args.seq_len)
    cfg = EngineConfig(zero_stage=2, backend="gloo", warmup_steps=1)
    data = batches(4, args.micro_batch, args.seq_len, model_cfg.vocab_size)

    torch.manual_seed(0)
    engine, _ = ds.build_engine(FusionTransformer(model_cfg), cfg,
                                micro_batch_size=args.micro_batch, world_size=1, total_steps=1000)
    done = [0]

    def engine_step() -> float:
        t0 = time.perf_counter()
        loss = engine(data[done[0] % len(data)])
        engine.backward(loss)
        engine.step()
        done[0] += 1
        return time.perf_counter() - t0

    engine_step()  # the optimizer state exists

    base = Path(args.dir or tempfile.mkdtemp(prefix="bench_ckpt_"))
    base.mkdir(parents=True, exist_ok=True)
    checkpointer = Checkpointer(base / "ours", rank=0, world_size=1, keep_last=2)
    run_config = RunConfig().to_dict()
    loader_state = {"version": 1,
                    "streams": {str(s): {"epoch": 0, "sample": 123} for s in range(8)}}

    def torch_save(target: Path, durable: bool) -> None:
        torch.save({"module": engine.module.state_dict(),
                    "optimizer": engine.optimizer.state_dict(),
                    "lr_scheduler": engine.lr_scheduler.state_dict()}, target)
        if durable:
            with open(target, "rb") as f:
                os.fsync(f.fileno())

    def ours(step: int) -> Path:
        return checkpointer.save(step, save_engine=lambda root, tag: ds.snapshot_checkpoint(
            engine, root, tag, {"step": step}), loader_state=loader_state, config=run_config)

    times = {"torch_save_fsync": [], "torch_save": [], "ours": []}
    sizes = {}
    for r in range(args.rounds):
        for durable, key in ((True, "torch_save_fsync"), (False, "torch_save")):
            target = base / f"{key}_{r}.pt"
            os.sync()
            t0 = time.perf_counter()
            torch_save(target, durable)
            times[key].append(time.perf_counter() - t0)
            sizes[key] = target.stat().st_size
            # keep the last 2, like the Checkpointer (keep_last=2): deleting a file right after
            # writing it would let the next write reuse its page-cache pages, a speed no real
            # checkpointing loop sees
            (base / f"{key}_{r - 2}.pt").unlink(missing_ok=True)
        os.sync()
        t0 = time.perf_counter()
        ckpt = ours(r + 1)
        checkpointer.wait()  # durable and committed
        times["ours"].append(time.perf_counter() - t0)
        sizes["ours"] = dir_bytes(ckpt)

    # The baseline wrote the same state: its last file loads back to the engine's parameters,
    # unchanged since (no step runs in the rounds).
    with torch.serialization.safe_globals(deepspeed_safe_globals()):  # the optimizer's loss scaler
        last = torch.load(base / f"torch_save_fsync_{args.rounds - 1}.pt", weights_only=True)["module"]
    baseline_ok = all(torch.equal(last[n], t) for n, t in engine.module.state_dict().items())

    # Blocking, as the training loop sees it: plain steps, then step, save, steps while the
    # background writer runs, wait.
    os.sync()
    plain = [engine_step() for _ in range(2)]
    saved_at = args.rounds + 1
    t0 = time.perf_counter()
    ours(saved_at)
    blocked = time.perf_counter() - t0
    at_save = training_state(engine)  # what the checkpoint must hold (the engine is unchanged)
    overlapped = [engine_step()]  # training goes on while the files are written
    t0 = time.perf_counter()
    checkpointer.wait()
    waited = time.perf_counter() - t0
    moved_on = not same_state(training_state(engine), at_save)

    # Load back what was saved, into the engine that has trained past it.
    restore = Checkpointer(base / "ours", rank=0, world_size=1, keep_last=2)
    ckpt = restore.find_resume()
    step = restore.load(ckpt, load_engine=lambda root, tag, world: ds.load_checkpoint(
        engine, root, tag, saved_world_size=world), load_loader=lambda states: None)
    identical = step == saved_at and same_state(training_state(engine), at_save)

    median = {k: statistics.median(v) for k, v in times.items()}
    mbps = {k: sizes[k] / median[k] / 1e6 for k in times}
    step_s = statistics.median(plain)
    result = {
        "model": {"dim": args.dim, "layers": args.layers, "micro_batch": args.micro_batch,
                  "seq_len": args.seq_len, "params_M": round(model_cfg.num_params() / 1e6, 2)},
        "bytes_MB": {k: round(v / 1e6, 1) for k, v in sizes.items()},
        "seconds": {k: round(v, 3) for k, v in median.items()},
        "MB_per_s": {k: round(v, 1) for k, v in mbps.items()},
        "ratio_MB_per_s": round(mbps["ours"] / mbps["torch_save_fsync"], 3),
        "ratio_MB_per_s_vs_page_cache": round(mbps["ours"] / mbps["torch_save"], 3),
        "goal": GOAL, "blocked_s": round(blocked, 3), "step_s": round(step_s, 3),
        "blocking_steps": round(blocked / step_s, 3), "blocking_goal_steps": BLOCKING_GOAL,
        "steps_during_write_s": [round(x, 3) for x in overlapped], "wait_after_s": round(waited, 3),
        "loads_back_identically": identical, "baseline_loads_back": baseline_ok, "training_moved_on": moved_on,
        "rounds": {k: [round(x, 3) for x in v] for k, v in times.items()},
        "dir": str(base),
    }
    if args.json:
        print(json.dumps(result))
    else:
        print(f"model {result['model']}, ZeRO-2 fp32, writing to {base}")
        for k, label in (("torch_save_fsync", "torch.save + fsync"),
                         ("torch_save", "torch.save, no fsync"),
                         ("ours", "mmtrain checkpoint (committed)")):
            print(f"  {label:30s} {result['bytes_MB'][k]:7.1f} MB in {result['seconds'][k]:6.3f} s"
                  f" = {result['MB_per_s'][k]:7.1f} MB/s")
        print(f"  ratio MB/s vs torch.save+fsync {result['ratio_MB_per_s']:.3f}x  "
              f"(goal >= {GOAL}x)  "
              f"{'OK' if result['ratio_MB_per_s'] >= GOAL else 'BELOW GOAL'}")
        print(f"  ratio MB/s vs no-fsync save    {result['ratio_MB_per_s_vs_page_cache']:.3f}x")
        print(f"  training blocked by a save     {blocked:.3f} s = {result['blocking_steps']:.3f} "
              f"steps of {step_s:.3f} s  (goal <= {BLOCKING_GOAL} step)  "
              f"{'OK' if result['blocking_steps'] <= BLOCKING_GOAL else 'ABOVE GOAL'}")
        print(f"  steps while the writer ran     {result['steps_during_write_s']} s; then waited "
              f"{waited:.3f} s for the commit")
        print(f"  loaded back identically        {'yes' if identical else 'NO'}")
        print(f"  baseline file loads back       {'yes' if baseline_ok else 'NO'}")
    if not args.dir:
        shutil.rmtree(base, ignore_errors=True)
    torch.distributed.destroy_process_group()
    return 0 if identical and moved_on and baseline_ok else 1


if __name__ == "__main__":
    sys.exit(main())
