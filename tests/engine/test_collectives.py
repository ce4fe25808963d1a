"""Collectives run on the engine's device, never on stray CPU tensors.

NCCL serves only CUDA tensors; a CPU machine has no CUDA. So the ranks here join a process group
that, like NCCL, serves ONE device type other than cpu: torch's `lazy` device (real tensors,
computed on the CPU by its TorchScript backend). Its data moves through a real gloo group on CPU
copies; a tensor of any other device type is refused with NCCL's own message. A raw CPU
all-reduce (what StepFlags / step_metrics / evaluate did before) fails on it; the same calls
through `Collectives(lazy)` (StepFlags.agree, step_metrics, evaluate) pass with the right numbers.
"""

from __future__ import annotations

import datetime
import math

import pytest
import torch
import torch.distributed as dist

from tests.engine.helpers import run_distributed

DEVICE = "lazy"


class _OneDeviceGroup(dist.ProcessGroup):
    """A process group serving only `lazy` tensors, relayed through gloo on CPU copies."""

    def __init__(self, store, rank: int, size: int, timeout: datetime.timedelta) -> None:
        from torch._C._distributed_c10d import ProcessGroupGloo
        super().__init__(rank, size)
        self.gloo = ProcessGroupGloo(store, rank, size, timeout)

    @staticmethod
    def _check(tensors) -> None:
        for t in tensors:
            if t.device.type != DEVICE:  # what NCCL says for a CPU tensor
                raise RuntimeError(f"No backend type associated with device type {t.device.type}")

    @staticmethod
    def _done(result):
        from torch._C._distributed_c10d import _create_work_from_future
        future = torch.futures.Future()
        future.set_result(result)
        return _create_work_from_future(future)

    def _relay(self, outputs, call):
        copies = [t.cpu() for t in outputs]
        call(copies).wait()
        for t, c in zip(outputs, copies):
            t.copy_(c)
        return self._done(outputs)

    def allreduce(self, tensors, opts):
        self._check(tensors)
        return self._relay(tensors, lambda cpu: self.gloo.allreduce(cpu, opts))

    def broadcast(self, tensors, opts):
        self._check(tensors)
        return self._relay(tensors, lambda cpu: self.gloo.broadcast(cpu, opts))

    def allgather(self, output_lists, inputs, opts):
        self._check(inputs + [t for out in output_lists for t in out])
        (outputs,) = output_lists
        copies = [t.cpu() for t in inputs]
        return self._relay(outputs, lambda cpu: self.gloo.allgather([cpu], copies, opts))

    def barrier(self, opts):
        return self.gloo.barrier(opts)

    def getBackendName(self) -> str:
        return "lazyrelay"


def _join_one_device_group(rank: int, world: int, init_file: str) -> None:
    import torch._lazy.ts_backend
    torch._lazy.ts_backend.init()
    dist.Backend.register_backend("lazyrelay", _OneDeviceGroup, devices=[DEVICE])
    dist.init_process_group(f"{DEVICE}:lazyrelay", init_method=f"file://{init_file}", rank=rank,
                            world_size=world)


def _worker(rank: int, world: int, init_file: str) -> dict:
    from mmtrain.data.batch import text_batch
    from mmtrain.distributed.collectives import Collectives
    from mmtrain.evaluate import evaluate
    from mmtrain.health import StepFlags
    from mmtrain.model import ModelConfig
    from mmtrain.train import StepOutput, step_metrics

    _join_one_device_group(rank, world, init_file)
    out: dict = {}
    try:  # the control: this group refuses what the old code sent
        dist.all_reduce(torch.tensor([1.0]), op=dist.ReduceOp.MAX)
        out["raw_cpu"] = "passed"
    except RuntimeError as e:
        out["raw_cpu"] = str(e)
    coll = Collectives(torch.device(DEVICE))
    out["sum"] = coll.sum([rank + 1.0, 0.5])
    out["max"] = coll.max(torch.tensor([float(rank), -float(rank)]))  # a CPU tensor is moved
    out["bcast"] = coll.broadcast_json({"tag": f"step_{rank}", "ok": rank == 1}, src=1)
    out["gather"] = coll.all_gather_json(["rank"] * (rank + 1))
    coll.barrier()
    flags = StepFlags(coll, ckpt_minutes=0.0)
    loss = torch.tensor(math.nan if rank == 1 else 2.0, device=DEVICE)
    out["agree"] = flags.agree(loss, stop=rank == 0)
    step = StepOutput(loss=1.0 + rank, counts={"real_tokens": 10, "attention_pairs": 30},
                      data_wait=0.0, skipped=False, stop=False, save_due=False)
    out["metrics"] = step_metrics(step, 1.0, coll, model=ModelConfig(dim=64, n_layers=2, n_heads=4,
                                  n_kv_heads=2), seq_len=8, peak=1e12)
    batch = text_batch(torch.arange(16).reshape(2, 8), [[3, 5], [8]])
    out["eval"] = evaluate(lambda b: torch.full(b.tokens.shape, 1.0 + rank, device=b.tokens.device),
                           [batch], torch.device(DEVICE), coll)
    return out


def test_collectives_on_a_group_that_serves_one_non_cpu_device(tmp_path):
    results = run_distributed(_worker, 2, tmp_path, str(tmp_path / "init"))
    for rank, r in enumerate(results):
        assert r["raw_cpu"] == "No backend type associated with device type cpu", rank
        assert r["sum"] == [3.0, 1.0]
        assert r["max"] == [1.0, 0.0]
        assert r["bcast"] == {"tag": "step_1", "ok": True}
        assert r["gather"] == [["rank"], ["rank", "rank"]]
        assert r["agree"] == (True, True, False)  # rank 1's NaN and rank 0's stop reach both
        assert r["metrics"]["loss"] == 1.5 and r["metrics"]["tokens_per_s"] == 20.0
        assert r["eval"]["loss"] == 1.5  # equal target counts on both ranks: the mean of 1 and 2


@pytest.mark.parametrize("values", [[1.5, -2.0], torch.tensor([[1.5], [-2.0]])])
def test_world_of_one_on_cpu(tmp_path, values):
    """The plain gloo path (the CPU demo) through the same helper."""
    from mmtrain.distributed.collectives import Collectives
    if dist.is_initialized():
        pytest.skip("a process group is already initialised in this process")
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'init'}", rank=0, world_size=1)
    try:
        coll = Collectives("cpu")
        assert coll.sum(values) == [1.5, -2.0]
        assert coll.max(values) == [1.5, -2.0]
        assert coll.broadcast_json({"a": [1, 2]}) == {"a": [1, 2]}
        assert coll.all_gather_json("x") == ["x"]
        coll.barrier()
    finally:
        dist.destroy_process_group()
