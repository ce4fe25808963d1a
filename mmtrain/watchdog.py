"""Hang diagnosis: every rank's Python stacks on disk when training stops making progress.

A hang in a collective costs the collective timeout (engine.timeout_minutes) and then ends in a
timeout error that says nothing about *where* each rank was. Each rank therefore runs:

* a progress watchdog (a daemon thread): when no step completes within `train.hang_dump_minutes`,
  it writes the stacks of all the rank's threads to `RUN/logs/stacks_rank_K_<time>.txt`, and again
  each further interval the stall lasts (at most `MAX_DUMPS_PER_STALL` files). The timeout is below
  the collective timeout (validated), so the files exist before the ranks fail and restart.
* `faulthandler` on SIGUSR2 (`kill -USR2 <pid>`, or `scancel --signal=USR2`): the stacks of all
  threads are appended to `RUN/logs/stacks_rank_K_sigusr2.txt`. It is written from C, so it works
  while the main thread is stuck inside a collective, where a Python signal handler would not run.
* `faulthandler` for fatal signals (SIGSEGV, SIGABRT, …): stacks on stderr, i.e. the rank's log.

The rank that is truly stuck (or stopped) may not dump; its peers' stacks show which collective
they wait in, and the NCCL flight recorder (set up by `mmtrain launch`) shows the collectives.
"""

from __future__ import annotations

import faulthandler
import io
import logging
import os
import signal
import socket
import sys
import threading
import time
from pathlib import Path
from typing import Callable, TextIO

log = logging.getLogger("mmtrain.watchdog")
MAX_DUMPS_PER_STALL = 5

_active: "Watchdog | None" = None  # one per process: a new one (a new train() call) replaces it


class Watchdog:
    """Call `beat(step)` whenever a step completes; `stop()` when training ends."""

    def __init__(self, log_dir: Path, rank: int, *, hang_seconds: float,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.log_dir, self.rank, self.hang_seconds, self.clock = Path(log_dir), rank, hang_seconds, clock
        self.step, self.last_beat, self.dumps = 0, clock(), 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._sigusr2_file: TextIO | None = None

    def start(self, step: int) -> "Watchdog":
        global _active
        if _active is not None:
            _active.stop()
        _active = self
        self.log_dir.mkdir(parents=True, exist_ok=True)
        try:
            faulthandler.enable(file=sys.stderr, all_threads=True)
        except (AttributeError, ValueError, io.UnsupportedOperation):  # stderr without a fileno
            faulthandler.enable(file=sys.__stderr__, all_threads=True)
        self._sigusr2_file = open(self.log_dir / f"stacks_rank_{self.rank}_sigusr2.txt", "a")
        faulthandler.register(signal.SIGUSR2, file=self._sigusr2_file, all_threads=True,
                              chain=False)
        self.beat(step)
        if self.hang_seconds > 0:
            self._thread = threading.Thread(target=self._watch, name="mmtrain-watchdog",
                                            daemon=True)
            self._thread.start()
        return self

    def beat(self, step: int) -> None:
        self.step, self.last_beat, self.dumps = step, self.clock(), 0

    def stop(self) -> None:
        global _active
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=5)
        if self._sigusr2_file is not None:
            faulthandler.unregister(signal.SIGUSR2)
            self._sigusr2_file.close()
            self._sigusr2_file = None
        if _active is self:
            _active = None

    def _watch(self) -> None:
        poll = min(1.0, self.hang_seconds / 4)
        while not self._stop.wait(poll):
            stalled = self.clock() - self.last_beat
            if stalled >= self.hang_seconds * (self.dumps + 1) and self.dumps < MAX_DUMPS_PER_STALL:
                self.dumps += 1
                self.dump(f"no step completed for {stalled:.0f} s (train.hang_dump_minutes="
                          f"{self.hang_seconds / 60:g}) after step {self.step}")

    def dump(self, reason: str) -> Path:
        """Write the stacks of every thread of this process to a new file; return its path."""
        stamp = time.strftime("%Y%m%d-%H%M%S")
        path = self.log_dir / f"stacks_rank_{self.rank}_{stamp}.txt"
        n = 1
        while path.exists():  # two dumps in one second
            path, n = self.log_dir / f"stacks_rank_{self.rank}_{stamp}_{n}.txt", n + 1
        with open(path, "w") as f:
            f.write(f"rank {self.rank} (pid {os.getpid()} on {socket.gethostname()}) at "
                    f"{time.strftime('%Y-%m-%d %H:%M:%S %Z')}: {reason}\n\n")
            f.flush()
            faulthandler.dump_traceback(file=f, all_threads=True)
        log.warning("%s: stacks of every thread written to %s", reason, path)
        return path
