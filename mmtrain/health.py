"""Training health: non-finite steps skipped and counted, loss spikes flagged, preemption signals.

All decisions that change control flow are agreed by every rank through one small all-reduce per
step (`StepFlags`), so no rank leaves a collective the others are still in.
"""

from __future__ import annotations

import logging
import math
import signal
import time

import torch

from mmtrain.distributed.collectives import Collectives

log = logging.getLogger("mmtrain.health")
EXIT_DIVERGED = 3  # a distinct exit code: M consecutive non-finite steps


class Diverged(RuntimeError):
    pass


class PreemptionFlag:
    """SIGTERM / SIGUSR1 set a flag; the loop saves a checkpoint and exits 0 at the next step."""

    def __init__(self) -> None:
        self.signal: int | None = None
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, self._handle)

    def _handle(self, signum: int, frame) -> None:  # noqa: ARG002 (signal handler signature)
        self.signal = signum

    @property
    def set(self) -> bool:
        return self.signal is not None


class StepFlags:
    """Per-step agreement across ranks: [non-finite loss, stop requested, time to save]."""

    def __init__(self, collectives: Collectives, ckpt_minutes: float) -> None:
        self.collectives, self.ckpt_seconds = collectives, ckpt_minutes * 60
        self.rank = collectives.rank
        self.last_save = time.monotonic()

    def agree(self, loss: torch.Tensor, stop: bool) -> tuple[bool, bool, bool]:
        due = self.ckpt_seconds > 0 and self.rank == 0 and \
            time.monotonic() - self.last_save >= self.ckpt_seconds  # rank 0's clock decides
        # Built on the loss's device: one all-reduce (max) and one host sync, no extra .item().
        nonfinite = (~torch.isfinite(loss.detach())).reshape(1).to(torch.float64)
        flags = torch.cat([nonfinite, nonfinite.new_tensor([float(stop), float(due)])])
        nonfinite_all, stop_all, due_all = (bool(x) for x in self.collectives.max(flags))  # sync
        return nonfinite_all, stop_all, due_all

    def saved(self) -> None:
        self.last_save = time.monotonic()


class LossMonitor:
    """Counts skipped steps (stops after `max_consecutive`), flags spikes beyond a z-score."""

    def __init__(self, *, max_consecutive: int, spike_z: float, warmup: int = 20) -> None:
        self.max_consecutive, self.spike_z, self.warmup = max_consecutive, spike_z, warmup
        self.skipped_total = 0
        self.consecutive = 0
        self.spikes = 0
        self._n, self._mean, self._var = 0, 0.0, 0.0

    def skipped(self, step: int) -> None:
        self.skipped_total += 1
        self.consecutive += 1
        log.warning("step %d: non-finite loss on some rank; step skipped (%d in a row, %d total)",
                    step, self.consecutive, self.skipped_total)
        if self.consecutive >= self.max_consecutive:
            raise Diverged(f"{self.consecutive} consecutive non-finite steps (up to step {step}); "
                           "stopping without saving the bad state")

    def observe(self, step: int, loss: float) -> bool:
        """Record a finite loss; True if it is a spike (z-score over an exponential average)."""
        self.consecutive = 0
        spike = False
        if self._n >= self.warmup and self._var > 0:
            z = (loss - self._mean) / math.sqrt(self._var)
            spike = self.spike_z > 0 and z > self.spike_z
            if spike:
                self.spikes += 1
                log.warning("step %d: loss spike %.4f (z=%.1f over mean %.4f)", step, loss, z, self._mean)
        alpha = 0.05 if self._n >= self.warmup else 1.0 / (self._n + 1)
        delta = loss - self._mean
        self._mean += alpha * delta
        self._var = (1 - alpha) * (self._var + alpha * delta * delta)
        self._n += 1
        return spike


def parameters_finite(params) -> bool:
    """Local check (each rank checks the parameters or partitions it holds)."""
    for p in params:
        data = getattr(p, "ds_tensor", None)  # ZeRO-3 keeps this rank's partition here
        data = p.data if data is None else data
        if data.numel() and not torch.isfinite(data).all():
            return False
    return True
