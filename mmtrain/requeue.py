"""A save forced by SIGUSR1 asks the batch system to run the job again.

SIGUSR1 is what a SLURM job of `mmtrain launch --slurm` receives shortly before its time limit
(`#SBATCH --signal=USR1@…`), and at preemption on clusters with
`PreemptParameters=send_user_signal`. The ranks save a checkpoint and exit 0; rank 0 then writes
RUN/REQUEUE_MARKER, and the batch script (launch/slurm.py) runs `scontrol requeue` when it finds
it: the requeued job resumes from that checkpoint. SIGTERM (a user's `scancel`, or a preemption
that SLURM requeues itself under PreemptMode=REQUEUE) saves and exits without the marker.
"""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path
from typing import Mapping

REQUEUE_MARKER = "requeue.json"


def after_preemption_save(run_dir: Path, *, rank: int, signum: int | None, step: int) -> Path | None:
    """On rank 0, after a save caused by SIGUSR1: write the marker (atomically); its path."""
    if rank != 0 or signum != signal.SIGUSR1:
        return None
    path = Path(run_dir) / REQUEUE_MARKER
    tmp = path.with_name(f".{REQUEUE_MARKER}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps({"step": step, "signal": "SIGUSR1", "time": time.time(),
                               "slurm_job_id": os.environ.get("SLURM_JOB_ID")}) + "\n")
    os.replace(tmp, path)
    return path


def is_restart(environ: Mapping[str, str]) -> bool:
    """True when this start of the ranks is not the job's first: a `--resume X` (or `--fresh`) was
    meant for the first start only; a restart continues from `latest`.

    MMTRAIN_ATTEMPT (launch.elastic_run) counts every start of the ranks on this node, also one
    caused by another node's failure, where torchrun's TORCHELASTIC_RESTART_COUNT stays 0 (used
    when the ranks were started by plain torchrun). SLURM_RESTART_COUNT > 0: a requeued job.
    """
    attempt = environ.get("MMTRAIN_ATTEMPT") or environ.get("TORCHELASTIC_RESTART_COUNT") or "0"
    return int(attempt) > 0 or int(environ.get("SLURM_RESTART_COUNT") or "0") > 0
