"""DeepSpeed's checkpoint files, copied into host memory so that the training loop can go on while
they are written (mmtrain.checkpoint writes them in a background thread).

DeepSpeed 0.19 routes every file of `engine.save_checkpoint` through `engine.checkpoint_engine`
(`save(state_dict, path)`; `TorchCheckpointEngine` calls `torch.save` there). `HostCopyEngine`
takes its place: `save` copies every tensor of the state to the CPU (the optimizer's and the
module's tensors are live and change at the next step) and keeps (path, copy); `write` later
`torch.save`s each copy in the same format DeepSpeed would have written, and fsyncs it. Loading is
DeepSpeed's own (`TorchCheckpointEngine.load`, inside mmtrain's weights-only guard).

Cost: one host copy of this rank's checkpoint state, kept for the next save.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any, Callable

import torch
from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine


class HostCopyEngine(TorchCheckpointEngine):
    """A DeepSpeed checkpoint engine whose `save` only copies the state into host memory.

    The host buffers of one save are reused by the next (same file, same tensor order, shape and
    dtype): no page faults or pinned allocations after the first save. So the files of one save
    must be written (`write`) before the next `save`; mmtrain.checkpoint.Checkpointer waits for
    the previous save first.
    """

    def __init__(self, config_params: Any = None) -> None:
        super().__init__(config_params)
        self.name = "mmtrain.HostCopyEngine"
        self.pending: list[tuple[Path, Any]] = []
        self.buffers: dict[tuple[str, int], torch.Tensor] = {}
        self.device_copies = False  # a non-blocking copy from an accelerator is in flight

    def save(self, state_dict: Any, path: str) -> None:
        self.pending.append((Path(path), self._to_host(state_dict, Path(path).name)))

    def preserves_storage_sharing(self) -> bool:
        # DeepSpeed then skips its own clone_tensors_for_torch_save: _to_host already gives every
        # tensor its own compact storage (a slice of a flat buffer is not saved whole).
        return False

    def take(self) -> list[tuple[Path, Any]]:
        """The files queued since the last call (this rank's part of one checkpoint), their
        copies complete."""
        if self.device_copies:
            torch.cuda.synchronize()  # sync: the host buffers are filled
            self.device_copies = False
        pending, self.pending = self.pending, []
        return pending

    def write(self, files: list[tuple[Path, Any]]) -> list[Path]:
        """torch.save every queued copy and fsync it (not its directory); returns the paths."""
        for path, state in files:
            # to a path, as DeepSpeed does: torch's C++ writer (a file object would be called
            # back from C++ for every record)
            torch.save(state, path, _use_new_zipfile_serialization=self.zipfile_serialization)
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        return [path for path, _ in files]

    def _to_host(self, state: Any, file: str) -> Any:
        order = iter(range(1 << 62))

        def copy_tensor(t: torch.Tensor) -> torch.Tensor:
            t = t.detach()
            key = (file, next(order))
            buf = self.buffers.get(key)
            if not t.is_contiguous():
                return t.to("cpu", copy=True)
            if buf is None or buf.shape != t.shape or buf.dtype != t.dtype:
                buf = torch.empty(t.shape, dtype=t.dtype, pin_memory=t.is_cuda)
                self.buffers[key] = buf
            buf.copy_(t, non_blocking=t.is_cuda)
            self.device_copies |= t.is_cuda
            return buf

        return to_host(state, {}, copy_tensor)


def install(engine: Any) -> HostCopyEngine:
    """Make `engine` save through a HostCopyEngine (once); returns it."""
    if not isinstance(engine.checkpoint_engine, HostCopyEngine):
        engine.checkpoint_engine = HostCopyEngine(engine._config)
    return engine.checkpoint_engine


def to_host(obj: Any, memo: dict[int, Any],
            copy_tensor: Callable[[torch.Tensor], torch.Tensor]) -> Any:
    """A copy of `obj` with every tensor replaced by `copy_tensor(tensor)` (a CPU copy), sharing
    preserved (a tensor reached twice, such as a tied weight, is copied once). Containers are
    rebuilt; other leaves are deep copied (DeepSpeed's loss scaler, for one, changes after the
    save)."""
    if id(obj) in memo:
        return memo[id(obj)]
    if isinstance(obj, torch.Tensor):
        out = copy_tensor(obj)
    elif isinstance(obj, dict):
        out = copy.copy(obj)  # keeps the dict's class (OrderedDict)
        for key, value in obj.items():
            out[key] = to_host(value, memo, copy_tensor)
    elif isinstance(obj, list):
        out = [to_host(v, memo, copy_tensor) for v in obj]
    elif type(obj) is tuple:
        out = tuple(to_host(v, memo, copy_tensor) for v in obj)
    else:
        out = copy.deepcopy(obj)
    memo[id(obj)] = out
    return out
