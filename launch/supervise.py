"""Run the engine's launcher (torchrun, the DeepSpeed runner, bash for SLURM) as a child process.

* Signals sent to `mmtrain launch` (SIGTERM, SIGINT, SIGHUP, SIGQUIT, SIGUSR1) are forwarded once to
  the child, which forwards them to the ranks; on SIGTERM/SIGUSR1 the ranks save a checkpoint and
  exit. Ctrl-C (SIGINT) is passed on as SIGTERM, so it stops the job the same graceful way.
* The child's stderr passes through line by line and its tail is kept, so that when the job fails
  we can say which rank failed first, with its last error, and how many restarts were used.
"""

from __future__ import annotations

import collections
import dataclasses
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

FORWARD = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT, signal.SIGUSR1)
FORWARD_AS = {signal.SIGINT: signal.SIGTERM}  # what the child gets for what we got
ERROR_LINE = re.compile(r"^(?:\[(?:default|rank)\d+\]:\s*)*([A-Za-z_][\w.]*(?:Error|Exception|Exit|"
                        r"Interrupt|Failure)\b.*)$")
CXX_WHAT = re.compile(r"^(?:\[(?:default|rank)\d+\]:\s*)*what\(\):\s+(.*)$")


@dataclasses.dataclass
class Outcome:
    returncode: int
    signal: int | None  # the signal we forwarded, if one stopped the job
    tail: list[str]  # the child's last stderr lines
    started: float


def run_child(argv: list[str], env: dict[str, str], *, tail_lines: int = 400) -> Outcome:
    """Run `argv` (no shell) in its own session, forwarding our signals to it once."""
    started = time.time()
    tail: collections.deque[str] = collections.deque(maxlen=tail_lines)
    # Own session: a Ctrl-C in the terminal reaches torchrun once (from us), not twice.
    proc = subprocess.Popen(argv, env=env, stderr=subprocess.PIPE, text=True, errors="replace",
                            bufsize=1, start_new_session=True)
    received: list[int] = []

    def forward(signum: int, frame) -> None:  # noqa: ARG001 (signal handler signature)
        received.append(signum)
        try:
            proc.send_signal(FORWARD_AS.get(signum, signum))
        except ProcessLookupError:
            pass

    previous = {sig: signal.signal(sig, forward) for sig in FORWARD}

    def pump() -> None:
        assert proc.stderr is not None
        for line in proc.stderr:
            sys.stderr.write(line)
            sys.stderr.flush()
            tail.append(line.rstrip("\n"))

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    try:
        while True:
            try:
                rc = proc.wait()
                break
            except InterruptedError:  # pragma: no cover (PEP 475 retries for us)
                continue
    finally:
        reader.join(timeout=5)
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return Outcome(rc, received[0] if received else None, list(tail), started)


@dataclasses.dataclass
class Failure:
    attempts: int  # attempts made (1 + restarts used); 0 when unknown
    rank: str  # "rank 1 (local rank 1)" or ""
    exitcode: str
    error: str  # the last exception line of the failing rank
    log: str  # the failing rank's log file, when known


def torchrun_failure(outcome: Outcome, log_root: Path) -> Failure:
    """Read torchrun's "Root Cause" summary and the failing rank's stderr from its --log-dir."""
    rank = local_rank = exitcode = ""
    text = outcome.tail
    for i, line in enumerate(text):
        if line.startswith("Root Cause"):
            for follow in text[i + 1:i + 12]:
                m = re.match(r"\s*rank\s*:\s*(\d+) \(local_rank: (\d+)\)", follow)
                if m:
                    rank, local_rank = m.groups()
                m = re.match(r"\s*exitcode\s*:\s*(\S+)(?: \(pid: \d+\))?\s*(.*)$", follow)
                if m:
                    exitcode = " ".join(x for x in m.groups() if x)
    run_dir = newest_run_dir(log_root, since=outcome.started)
    attempts, log, error = 0, "", ""
    if run_dir is not None:
        tries = sorted((p for p in run_dir.glob("attempt_*") if p.is_dir()),
                       key=lambda p: int(p.name.split("_")[1]))
        attempts = len(tries)
        if tries and local_rank:
            path = tries[-1] / local_rank / "stderr.log"
            if path.is_file():
                log = str(path)
                error = last_error(path.read_text(errors="replace").splitlines())
    if not error:
        error = last_error(text)
    who = f"rank {rank} (local rank {local_rank})" if rank else ""
    return Failure(attempts, who, exitcode, error, log)


def newest_run_dir(log_root: Path, since: float) -> Path | None:
    """torchrun makes `<log_dir>/<run_id>_<random>/` per agent start: the one this launch made."""
    if not log_root.is_dir():
        return None
    dirs = [p for p in log_root.iterdir() if p.is_dir() and p.stat().st_mtime >= since - 1]
    return max(dirs, key=lambda p: p.stat().st_mtime) if dirs else None


def last_error(lines: list[str]) -> str:
    """The last `SomethingError: message` line (torch's rank prefixes removed), or the message of
    a C++ exception that aborted the process (`what():  …`)."""
    for line in reversed(lines):
        cxx = CXX_WHAT.match(line.strip())
        if cxx:
            return f"C++ exception: {cxx.group(1)}"
        m = ERROR_LINE.match(line.strip())
        if m and not m.group(1).startswith(("torch.distributed.elastic.multiprocessing.errors.",
                                             "ChildFailedError")):
            return m.group(1)
    return ""


def describe_exit(returncode: int) -> str:
    if returncode < 0:
        try:
            return f"killed by {signal.Signals(-returncode).name}"
        except ValueError:
            return f"killed by signal {-returncode}"
    return f"exit code {returncode}"


def child_env(*layers: dict[str, str]) -> dict[str, str]:
    env = dict(os.environ)
    for layer in layers:
        env.update(layer)
    return env
