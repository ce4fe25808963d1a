"""DeepSpeed's checkpoint reads, made to unpickle with weights_only=True.

DeepSpeed (0.19) reads its checkpoint files with `torch.load(..., weights_only=False)`: its
engine, its ZeRO-3 and universal loaders and its converters (ds_to_universal, zero_to_fp32). A
crafted file would run code on unpickling. Our first line of defence is the checkpoint MANIFEST
(nothing is read before every hash matches); this is the second, for a file whose MANIFEST entry
was rewritten too: inside `weights_only_loads()`, every `torch.load` in the process is forced to
weights_only=True, with the few plain-data DeepSpeed classes its files hold allowed by name.
A file holding anything else is refused with `pickle.UnpicklingError` before any of it runs.
"""

from __future__ import annotations

import contextlib
import functools
import threading
from typing import Iterator

import torch

_lock = threading.RLock()  # re-entrant: a guarded load may call another


def deepspeed_safe_globals() -> list[type]:
    """Plain-data classes found in DeepSpeed checkpoints (ZeRO 0–3, fp32/bf16/fp16, universal)."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]


@contextlib.contextmanager
def weights_only_loads() -> Iterator[None]:
    """Within this block, `torch.load` ignores weights_only=False and allows only tensors, plain
    containers and `deepspeed_safe_globals()`."""
    original = torch.load

    @functools.wraps(original)
    def load(*args, **kwargs):
        kwargs["weights_only"] = True
        return original(*args, **kwargs)

    with _lock, torch.serialization.safe_globals(deepspeed_safe_globals()):
        torch.load = load
        try:
            yield
        finally:
            torch.load = original
