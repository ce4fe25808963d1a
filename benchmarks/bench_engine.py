"""P2: training-step throughput of the DeepSpeed engine ÷ a plain PyTorch loop (CPU, one process).

Both train the same FusionTransformer from the same seed on the same packed text batches with
AdamW (same param groups, same LR schedule, gradient clipping at 1.0):

* plain:     forward → backward → clip_grad_norm_ → AdamW.step → LambdaLR.step → zero_grad
* DeepSpeed: mmtrain.distributed.deepspeed.build_engine (ZeRO-2 by default, fp32) on a gloo world
             of 1 started in this process: engine(batch) → engine.backward → engine.step

Timed steps alternate between the two in rounds (plain, engine, plain, engine, ...) so that load
from other processes on a shared machine hits both alike; the ratio is of the medians over
rounds. Goal: engine ÷ plain >= 0.9.

    python benchmarks/bench_engine.py [--dim 256 --layers 4 --seq-len 512 --micro-batch 4]
                                      [--rounds 5 --steps 4] [--zero 2] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mmtrain.data.batch import text_batch  # noqa: E402
from mmtrain.distributed import deepspeed as ds  # noqa: E402
from mmtrain.distributed.config import EngineConfig  # noqa: E402
from mmtrain.model import FusionTransformer, ModelConfig  # noqa: E402

GOAL = 0.9


def init_world_of_one() -> None:
    """A gloo process group of one rank in this process (what torchrun would set up)."""
    from launch.local import free_port

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), RANK="0", WORLD_SIZE="1",
                      LOCAL_RANK="0")
    ds.init_distributed(EngineConfig(backend="gloo"))


def batches(n: int, micro_batch: int, seq_len: int, vocab: int) -> list:
    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(n):
        tokens = torch.randint(0, 256, (micro_batch, seq_len), generator=g)
        cut = seq_len // 3  # three documents per row: the attention is document-masked
        out.append(text_batch(tokens, [[cut, cut, seq_len - 2 * cut]] * micro_batch))
    assert vocab >= 256
    return out


class Plain:
    def __init__(self, model_cfg: ModelConfig, cfg: EngineConfig, total: int) -> None:
        torch.manual_seed(0)
        self.model = FusionTransformer(model_cfg).train()
        self.opt = torch.optim.AdamW(ds.param_groups(self.model, cfg.weight_decay), lr=cfg.lr,
                                     betas=(cfg.beta1, cfg.beta2), eps=cfg.eps)
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, ds.lr_lambda(cfg, total))
        self.clip = cfg.grad_clip

    def step(self, batch) -> torch.Tensor:
        loss = self.model(batch)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.clip)
        self.opt.step()
        self.sched.step()
        self.opt.zero_grad(set_to_none=True)
        return loss.detach()


class Engine:
    def __init__(self, model_cfg: ModelConfig, cfg: EngineConfig, micro_batch: int, total: int) -> None:
        torch.manual_seed(0)
        model = ds.build_model(lambda: FusionTransformer(model_cfg), cfg, torch.device("cpu"))
        self.engine, _ = ds.build_engine(model, cfg, micro_batch_size=micro_batch, world_size=1,
                                         total_steps=total)
        self.engine.train()

    def step(self, batch) -> torch.Tensor:
        loss = self.engine(batch)
        self.engine.backward(loss)
        self.engine.step()
        return loss.detach()


def timed(trainer, data: list) -> float:
    t0 = time.perf_counter()
    for batch in data:
        loss = trainer.step(batch)
    loss.item()  # sync (a no-op on CPU, kept for the habit)
    return time.perf_counter() - t0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--micro-batch", type=int, default=4)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--steps", type=int, default=4, help="timed steps per round and trainer")
    p.add_argument("--zero", type=int, default=2, choices=(0, 1, 2, 3))
    p.add_argument("--json", action="store_true")
    args = p.parse_args()

    init_world_of_one()
    model_cfg = ModelConfig(dim=args.dim, n_layers=args.layers, n_heads=max(1, args.dim // 64),
                            n_kv_heads=max(1, args.dim // 128), max_seq_len=args.seq_len)
    cfg = EngineConfig(zero_stage=args.zero, backend="gloo", warmup_steps=2)
    total = 2 + args.rounds * args.steps
    data = batches(args.steps, args.micro_batch, args.seq_len, model_cfg.vocab_size)
    plain, engine = Plain(model_cfg, cfg, total), Engine(model_cfg, cfg, args.micro_batch, total)
    for trainer in (plain, engine):  # warm-up: allocator, first-step optimizer state
        timed(trainer, data[:2])
    # both saw the same data from the same init: their losses agree (a check on the comparison)
    check = [float(plain.step(data[0])), float(engine.step(data[0]))]

    tokens = args.steps * args.micro_batch * args.seq_len
    rates = {"plain": [], "engine": []}
    for _ in range(args.rounds):
        rates["plain"].append(tokens / timed(plain, data))
        rates["engine"].append(tokens / timed(engine, data))
    plain_tps, engine_tps = (statistics.median(rates[k]) for k in ("plain", "engine"))
    result = {
        "model": {"dim": args.dim, "layers": args.layers,
                  "params_M": round(model_cfg.num_params() / 1e6, 2),
                  "seq_len": args.seq_len, "micro_batch": args.micro_batch},
        "zero_stage": args.zero, "threads": torch.get_num_threads(),
        "plain_tokens_per_s": round(plain_tps), "engine_tokens_per_s": round(engine_tps),
        "ratio": round(engine_tps / plain_tps, 3), "goal": GOAL,
        "rounds": {k: [round(v) for v in vs] for k, vs in rates.items()},
        "loss_check": {"plain": check[0], "engine": check[1]},
    }
    if args.json:
        print(json.dumps(result))
    else:
        print(f"model {result['model']}, ZeRO-{args.zero}, {result['threads']} threads")
        print(f"  plain PyTorch loop   {plain_tps:10,.0f} tokens/s")
        print(f"  DeepSpeed engine     {engine_tps:10,.0f} tokens/s")
        print(f"  ratio                {result['ratio']:.3f}x  (goal >= {GOAL}x)  "
              f"{'OK' if result['ratio'] >= GOAL else 'BELOW GOAL'}")
        print(f"  same-step loss check plain {check[0]:.6f} | engine {check[1]:.6f}")
    torch.distributed.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
