"""P6: checkpoint save throughput ÷ `torch.save` of the same training state (CPU, one process),
and how long training is blocked by a save.

* ours:     `Checkpointer.save` with the DeepSpeed engine (ZeRO-2, fp32, gloo world of 1 in this
            process): DeepSpeed's model-states + ZeRO optimizer files (fsync'd by
            mmtrain.distributed.deepspeed.save_checkpoint), loader state, RNG, config, sha256 of
            every file into MANIFEST.json, COMMITTED, atomic `latest` — the whole commit.
* baseline: one `torch.save` of the same state — the engine's module state_dict, its (ZeRO)
            optimizer state_dict and the LR scheduler's — into one file, then fsync: a checkpoint
            is one once it is on disk. The same `torch.save` without fsync is shown too.

MB/s = bytes written ÷ wall time of the call. Before every timed call `os.sync()` flushes all
dirty pages, so no call pays for another's writeback; both sides keep their last two checkpoints,
as training does (deleting a file right after writing it lets the next write reuse its pages, a
speed no real checkpointing loop sees). Rounds alternate; medians. Goal: ours ÷ baseline >= 1.0.
The save is synchronous: training is blocked for the wall time of the save call, measured here
between two training steps.

    python benchmarks/bench_checkpoint.py [--dim 512 --layers 6] [--rounds 5] [--dir DIR] [--json]
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
from mmtrain.config import RunConfig  # noqa: E402
from mmtrain.data.batch import text_batch  # noqa: E402
from mmtrain.distributed import deepspeed as ds  # noqa: E402
from mmtrain.distributed.config import EngineConfig  # noqa: E402
from mmtrain.model import FusionTransformer, ModelConfig  # noqa: E402

from bench_engine import init_world_of_one  # noqa: E402  (the same in-process world of one)

GOAL = 1.0



def dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--dir", default=None, help="where to write (default: a temporary directory)")
    p.add_argument("--json", action="store_true")
    args = p.parse_args()

    init_world_of_one()
    model_cfg = ModelConfig(dim=args.dim, n_layers=args.layers, n_heads=max(1, args.dim // 64),
                            n_kv_heads=max(1, args.dim // 128), max_seq_len=128)
    cfg = EngineConfig(zero_stage=2, backend="gloo", warmup_steps=1)
    batch = text_batch(torch.randint(0, 256, (2, 128)), [[64, 64], [128]])

    torch.manual_seed(0)
    engine, _ = ds.build_engine(FusionTransformer(model_cfg), cfg, micro_batch_size=2, world_size=1,
                                total_steps=100)

    def engine_step() -> None:
        loss = engine(batch)
        engine.backward(loss)
        engine.step()

    for _ in range(2):  # the optimizer state exists
        engine_step()

    base = Path(args.dir or tempfile.mkdtemp(prefix="bench_ckpt_"))
    base.mkdir(parents=True, exist_ok=True)
    checkpointer = Checkpointer(base / "ours", rank=0, world_size=1, keep_last=2,
                                barrier=torch.distributed.barrier)
    run_config = RunConfig().to_dict()
    loader_state = {"version": 1, "streams": {str(s): {"epoch": 0, "sample": 123} for s in range(8)}}
    def torch_save(target: Path, durable: bool) -> None:
        torch.save({"module": engine.module.state_dict(), "optimizer": engine.optimizer.state_dict(),
                    "lr_scheduler": engine.lr_scheduler.state_dict()}, target)
        if durable:
            with open(target, "rb") as f:
                os.fsync(f.fileno())

    def ours(step: int) -> Path:
        return checkpointer.save(step, save_engine=lambda root, tag: ds.save_checkpoint(
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
        times["ours"].append(time.perf_counter() - t0)
        sizes["ours"] = dir_bytes(ckpt)

    # Blocked time, seen from the training loop: step, save, step.
    os.sync()
    engine_step()
    t0 = time.perf_counter()
    ours(args.rounds + 1)
    blocked = time.perf_counter() - t0
    t0 = time.perf_counter()
    engine_step()
    step = time.perf_counter() - t0

    mbps = {k: sizes[k] / statistics.median(v) / 1e6 for k, v in times.items()}
    median = {k: statistics.median(v) for k, v in times.items()}
    result = {
        "model": {"dim": args.dim, "layers": args.layers,
                  "params_M": round(model_cfg.num_params() / 1e6, 2)},
        "bytes_MB": {k: round(v / 1e6, 1) for k, v in sizes.items()},
        "seconds": {k: round(v, 3) for k, v in median.items()},
        "MB_per_s": {k: round(v, 1) for k, v in mbps.items()},
        "ratio_MB_per_s": round(mbps["ours"] / mbps["torch_save_fsync"], 3),
        "ratio_MB_per_s_vs_page_cache": round(mbps["ours"] / mbps["torch_save"], 3),
        "goal": GOAL, "blocked_s": round(blocked, 3), "step_s": round(step, 3),
        "rounds": {k: [round(x, 3) for x in v] for k, v in times.items()},
        "dir": str(base),
    }
    if args.json:
        print(json.dumps(result))
    else:
        print(f"model {result['model']}, ZeRO-2 fp32, writing to {base}")
        for k, label in (("torch_save_fsync", "torch.save + fsync"),
                         ("torch_save", "torch.save, no fsync"),
                         ("ours", "mmtrain checkpoint (durable)")):
            print(f"  {label:30s} {result['bytes_MB'][k]:7.1f} MB in {result['seconds'][k]:6.3f} s"
                  f" = {result['MB_per_s'][k]:7.1f} MB/s")
        print(f"  ratio MB/s vs torch.save+fsync {result['ratio_MB_per_s']:.3f}x  (goal >= {GOAL}x)  "
              f"{'OK' if result['ratio_MB_per_s'] >= GOAL else 'BELOW GOAL'}")
        print(f"  ratio MB/s vs no-fsync save    {result['ratio_MB_per_s_vs_page_cache']:.3f}x")
        print(f"  training blocked by a save     {result['blocked_s']:.3f} s "
              f"(one training step: {result['step_s']:.3f} s)")
    if not args.dir:
        shutil.rmtree(base, ignore_errors=True)
    torch.distributed.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
