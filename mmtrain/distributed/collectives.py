"""Every collective outside DeepSpeed, on the engine's device.

NCCL serves only CUDA tensors: a group whose only backend is NCCL raises "No backend type
associated with device type cpu" for a CPU tensor. So nothing in mmtrain calls
`torch.distributed` collectives directly; it asks a `Collectives` built with the engine's device
(the one `ds.init_distributed` returns), which puts every tensor there.

API (stable; other modules depend on it):

    coll = Collectives(device)          # torch.device the process group serves (cuda:K or cpu)
    coll.rank, coll.world_size
    coll.sum([a, b, ...]) -> [float]    # element-wise sum over ranks (float64), python floats
    coll.max([a, b, ...]) -> [float]    # element-wise max over ranks
    coll.broadcast_json(obj, src=0)     # rank src's JSON-able obj, returned on every rank
    coll.all_gather_json(obj) -> list   # every rank's JSON-able obj, in rank order
    coll.barrier()                      # returns once every rank has called it

`sum`/`max` take a sequence of numbers or a tensor (any device; flattened). Every call is
collective (every rank makes the same calls in the same order) and blocks until the result is on
the host (a host-device sync). Objects travel as UTF-8 JSON, never pickle, so a peer can't make
this process execute code.
"""

from __future__ import annotations

import json
from typing import Any, Sequence

import torch
import torch.distributed as dist


class Collectives:
    """The process group's collectives, with every tensor on `device` (see the module docstring)."""

    def __init__(self, device: torch.device | str, group: Any = None) -> None:
        self.device = torch.device(device)
        self.group = group  # None: the default process group

    @property
    def rank(self) -> int:
        return dist.get_rank(self.group)

    @property
    def world_size(self) -> int:
        return dist.get_world_size(self.group)

    def sum(self, values: Sequence[float] | torch.Tensor) -> list[float]:
        return self._all_reduce(values, dist.ReduceOp.SUM)

    def max(self, values: Sequence[float] | torch.Tensor) -> list[float]:
        return self._all_reduce(values, dist.ReduceOp.MAX)

    def _all_reduce(self, values: Sequence[float] | torch.Tensor, op: Any) -> list[float]:
        if isinstance(values, torch.Tensor):
            tensor = values.detach().reshape(-1).to(self.device, torch.float64, copy=True)
        else:
            tensor = torch.tensor([float(v) for v in values], dtype=torch.float64, device=self.device)
        dist.all_reduce(tensor, op=op, group=self.group)
        return tensor.tolist()  # sync

    def barrier(self) -> None:
        """A one-element all-reduce on the device, waited for on the host: unlike a bare
        `dist.barrier()` it needs no guess of which device NCCL should use."""
        self.sum([0.0])

    def broadcast_json(self, obj: Any = None, src: int = 0) -> Any:
        """Rank `src`'s `obj` on every rank (others pass anything, e.g. None)."""
        payload = _encode(obj) if self.rank == src else torch.zeros(0, dtype=torch.uint8)
        size = torch.tensor([payload.numel()], dtype=torch.int64, device=self.device)
        dist.broadcast(size, src=src, group=self.group)
        n = int(size.item())  # sync
        data = payload.to(self.device) if self.rank == src else \
            torch.empty(n, dtype=torch.uint8, device=self.device)
        dist.broadcast(data, src=src, group=self.group)
        return _decode(data, n)

    def all_gather_json(self, obj: Any) -> list[Any]:
        """[rank 0's obj, rank 1's obj, ...] on every rank."""
        payload = _encode(obj).to(self.device)
        size = torch.tensor([payload.numel()], dtype=torch.int64, device=self.device)
        sizes = [torch.empty_like(size) for _ in range(self.world_size)]
        dist.all_gather(sizes, size, group=self.group)
        lengths = [int(s.item()) for s in sizes]  # sync
        padded = torch.zeros(max(lengths), dtype=torch.uint8, device=self.device)
        padded[:payload.numel()] = payload
        gathered = [torch.empty_like(padded) for _ in lengths]
        dist.all_gather(gathered, padded, group=self.group)
        return [_decode(g, n) for g, n in zip(gathered, lengths)]


def _encode(obj: Any) -> torch.Tensor:
    raw = json.dumps(obj, sort_keys=True, allow_nan=True).encode()
    return torch.frombuffer(bytearray(raw), dtype=torch.uint8)


def _decode(data: torch.Tensor, n: int) -> Any:
    return json.loads(bytes(data[:n].cpu().tolist()))  # sync
