"""Helpers for the engine tests: run a function on N gloo ranks in fresh processes."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable

import torch
import torch.multiprocessing as mp

from launch.local import free_port


def _entry(rank: int, world: int, port: int, fn: Callable, out: str, args: tuple) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank), CUDA_VISIBLE_DEVICES="")
    torch.set_num_threads(1)
    result = fn(rank, world, *args)
    torch.save(result, Path(out) / f"rank_{rank}.pt")
    if torch.distributed.is_initialized():
        torch.distributed.barrier()  # no rank tears down gloo while a peer still talks to it
        torch.distributed.destroy_process_group()


def run_distributed(fn: Callable, world_size: int, tmp: Path, *args: Any) -> list[Any]:
    """Run `fn(rank, world_size, *args)` on `world_size` processes (gloo through DeepSpeed's
    init); returns each rank's result. `fn` must live in an importable module."""
    out = Path(tmp) / f"results-{free_port()}"
    out.mkdir(parents=True)
    mp.start_processes(_entry, args=(world_size, free_port(), fn, str(out), args),
                       nprocs=world_size, join=True, start_method="spawn")
    return [torch.load(out / f"rank_{r}.pt", weights_only=False) for r in range(world_size)]
