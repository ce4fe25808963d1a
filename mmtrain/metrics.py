"""Metrics: TensorBoard event files and metrics.jsonl (rank 0), plus a one-line progress print."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any


class MetricsLogger:
    def __init__(self, run_dir: Path, *, enabled: bool, total_steps: int) -> None:
        self.enabled, self.total_steps = enabled, total_steps
        self.start = time.monotonic()
        self.start_step: int | None = None
        self.writer = None
        self.jsonl = None
        if enabled:
            from torch.utils.tensorboard import SummaryWriter  # needs the tensorboard package

            self.writer = SummaryWriter(log_dir=str(run_dir / "tb"))
            self.jsonl = open(run_dir / "metrics.jsonl", "a")

    def log(self, step: int, values: dict[str, float], *, prefix: str = "train") -> None:
        """`values` go to TensorBoard as `prefix/name`; a name with a `/` (`data/share/laion`) is
        already a full tag and is logged as it is, under the same name as in metrics.jsonl."""
        if not self.enabled:
            return
        for name, value in values.items():
            self.writer.add_scalar(name if "/" in name else f"{prefix}/{name}", value, step)
        self.jsonl.write(json.dumps({"step": step, "split": prefix, "time": time.time(),
                                     **values}) + "\n")
        self.jsonl.flush()

    def begin(self, step: int) -> None:
        """The loop starts (or resumes) at `step`: elapsed time and ETA count from here."""
        self.start_step, self.start = step, time.monotonic()

    def progress(self, step: int, values: dict[str, Any]) -> None:
        """`step 40/300 | loss 2.8123 | 6,130 tok/s | elapsed 0:41 | eta 4:26`."""
        if not self.enabled:
            return
        elapsed = time.monotonic() - self.start
        done = step - (self.start_step or 0)
        eta = elapsed / done * (self.total_steps - step) if done > 0 else math.nan
        print(f"step {step}/{self.total_steps} | loss {values['loss']:.4f} | "
              f"lr {values['lr']:.2e} | {values['tokens_per_s']:,.0f} tok/s | "
              + (f"mfu {values['mfu']:.1%} | " if "mfu" in values else "")
              + (f"skipped {values['skipped_steps']:.0f} | " if values.get("skipped_steps") else "")
              + f"elapsed {_hms(elapsed)} | eta {_hms(eta)}", flush=True)

    def close(self) -> None:
        if self.enabled:
            self.writer.close()
            self.jsonl.close()


def share_metrics(names: list[str], rows: list[float]) -> dict[str, float]:
    """`data/share/<name>`: each dataset's share of the rows trained so far. `rows` are the run's
    totals per dataset (summed over ranks: ShardLoader.dataset_rows on every rank)."""
    total = sum(rows)
    return {f"data/share/{name}": (n / total if total else 0.0) for name, n in zip(names, rows)}


def _hms(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    m, s = divmod(int(seconds), 60)
    h, m = divmod(m, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"
