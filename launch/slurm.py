"""SLURM: an sbatch script that runs one torchrun per node (srun) with c10d rendezvous on the first.

The script is written to RUN/launch/slurm.sbatch so it can be reviewed, kept and resubmitted (a
resubmitted job resumes from the newest committed checkpoint). The job requeues itself after the
save that SLURM's warning before the time limit (SIGUSR1) causes: the ranks leave
RUN/requeue.json (mmtrain.requeue) and the script runs `scontrol requeue`. `--requeue` also lets
SLURM requeue a preempted job itself; `--open-mode=append` keeps every run's output in the same
slurm-<job>.out (a requeued job keeps its id). Inside an allocation (salloc, or
an sbatch script of your own) `mmtrain launch --slurm` runs the same script with bash; inside a
job step (srun, one task per node) it runs this node's torchrun from the SLURM environment.

Every value that comes from the user is shell-quoted; values on `#SBATCH` lines (read by sbatch,
not bash) must be single plain words.
"""

from __future__ import annotations

import dataclasses
import re
import shlex
import subprocess

from launch.safety import check_env_name, check_sbatch_value

# Words of the torchrun command that the script computes at run time.
RDZV_HOST, RDZV_PORT, JOB_ID = "@@RDZV_HOST@@", "@@RDZV_PORT@@", "@@SLURM_JOB_ID@@"
_PLACEHOLDER = re.compile(r"@@([A-Z_]+)@@")
TIME_RE = re.compile(r"^(\d+-)?\d+(:\d{1,2}){0,2}$")


@dataclasses.dataclass(frozen=True, kw_only=True)
class SlurmJob:
    job_name: str
    nodes: int
    gpus_per_node: int  # 0: a CPU job (no --gpus-per-node)
    nproc_per_node: int
    time: str = ""  # D-HH:MM:SS, HH:MM:SS, MM; "" = the partition's default
    partition: str = ""
    account: str = ""
    qos: str = ""
    cpus_per_task: int = 0
    output: str = ""  # sbatch --output / --error (%j: job id)
    error: str = ""
    signal_seconds: int = 0  # >0: SIGUSR1 this long before the time limit (ranks save and exit)
    requeue_marker: str = ""  # RUN/requeue.json: the ranks saved on SIGUSR1; "" never requeues

    def __post_init__(self) -> None:
        check_sbatch_value(self.job_name, "job name")
        for key in ("partition", "account", "qos", "output", "error"):
            if getattr(self, key):
                check_sbatch_value(getattr(self, key), f"--{key}")
        if self.time and not TIME_RE.match(self.time):
            raise ValueError(f"--time {self.time!r} must look like HH:MM:SS, D-HH:MM:SS or minutes")
        if self.nodes < 1 or self.nproc_per_node < 1 or self.gpus_per_node < 0:
            raise ValueError("a SLURM job needs --nnodes >= 1 and --nproc-per-node >= 1")


def _word(word: str) -> str:
    """Quote one word; our run-time placeholders become "${NAME}" (only inside plain words)."""
    if not _PLACEHOLDER.search(word):
        return shlex.quote(word)
    if shlex.quote(word) != word:
        raise ValueError(f"cannot render {word!r}: a placeholder inside a word that needs quoting")
    return '"' + _PLACEHOLDER.sub(lambda m: "${" + m.group(1) + "}", word) + '"'


def _line(argv: list[str]) -> str:
    return " ".join(_word(w) for w in argv)


def sbatch_script(job: SlurmJob, *, cwd: str, env: dict[str, str], threads: int | None,
                  node_check_argv: list[str], torchrun_argv: list[str]) -> str:
    """The whole sbatch script, deterministic for given inputs (golden-file tested)."""
    sb = [f"--job-name={job.job_name}", f"--nodes={job.nodes}", "--ntasks-per-node=1",
          "--requeue", "--open-mode=append"]
    if job.gpus_per_node:
        sb.append(f"--gpus-per-node={job.gpus_per_node}")
    if job.cpus_per_task:
        sb.append(f"--cpus-per-task={job.cpus_per_task}")
    for key in ("time", "partition", "account", "qos", "output", "error"):
        if getattr(job, key):
            sb.append(f"--{key}={getattr(job, key)}")
    if job.signal_seconds:
        sb.append(f"--signal=USR1@{job.signal_seconds}")
    srun = ["srun", "--ntasks-per-node=1", "--kill-on-bad-exit=1"]
    if job.cpus_per_task:  # srun does not inherit sbatch's --cpus-per-task (SLURM >= 22.05)
        srun.append(f"--cpus-per-task={job.cpus_per_task}")
    what = f"{job.nodes} node{'s' if job.nodes > 1 else ''} x " + (
        f"{job.gpus_per_node} GPUs" if job.gpus_per_node else f"{job.nproc_per_node} CPU ranks")
    lines = [
        "#!/bin/bash",
        f"# {job.job_name}: {what}. Written by `mmtrain launch --slurm`; submit with sbatch.",
        "# Resubmitting this script resumes from the newest committed checkpoint.",
        *(f"#SBATCH {opt}" for opt in sb),
        "set -euo pipefail",
        f"cd {shlex.quote(cwd)}",
        "",
        "# environment of every rank (srun passes the batch environment on)",
        *(f"export {check_env_name(k)}={shlex.quote(v)}" for k, v in env.items()),
    ]
    if threads is not None:
        lines.append(f"export OMP_NUM_THREADS={threads}")
    else:
        lines += [f"# threads per rank: this node's CPUs over its {job.nproc_per_node} ranks",
                  f"OMP_NUM_THREADS=$(( ${{SLURM_CPUS_ON_NODE:-{job.nproc_per_node}}} / "
                  f"{job.nproc_per_node} ))",
                  "export OMP_NUM_THREADS=$(( OMP_NUM_THREADS > 0 ? OMP_NUM_THREADS : 1 ))"]
    lines += [
        "",
        "# c10d rendezvous on the first node of the allocation, on a port derived from the job id",
        'mapfile -t NODES < <(scontrol show hostnames "$SLURM_JOB_NODELIST")',
        'RDZV_HOST=${NODES[0]}',
        "RDZV_PORT=$(( 20000 + SLURM_JOB_ID % 20000 ))",
        'echo "mmtrain: job $SLURM_JOB_ID on ${#NODES[@]} nodes; rendezvous $RDZV_HOST:$RDZV_PORT"',
        "",
        "# preflight on every node: the GPUs asked for are visible, the rendezvous port is free",
        _line(srun + node_check_argv),
        "",
        "# one torchrun per node; when a rank dies, torchrun restarts all of them and they resume",
        "# from the newest committed checkpoint",
        *_requeue_block(job, _line(srun + torchrun_argv)),
        "",
    ]
    return "\n".join(lines)


def _requeue_block(job: SlurmJob, torchrun_line: str) -> list[str]:
    """Run the ranks; requeue the job if they saved because of SIGUSR1 (time limit ahead)."""
    if not job.requeue_marker:
        return [torchrun_line]
    marker = shlex.quote(job.requeue_marker)
    return [
        f"rm -f {marker}",
        "set +e",
        torchrun_line,
        "status=$?",
        "set -e",
        "# the ranks write this after the checkpoint that SIGUSR1 (the time limit is near) caused",
        f"if [ -f {marker} ]; then",
        '  echo "mmtrain: checkpoint saved before the time limit: requeueing job $SLURM_JOB_ID"',
        '  scontrol requeue "$SLURM_JOB_ID" || echo "mmtrain: scontrol requeue failed: resubmit '
        'this script to continue" >&2',
        "  exit 0",
        "fi",
        'exit "$status"',
    ]


def allocation(environ: dict[str, str]) -> str:
    """"": not in SLURM; "allocation": inside salloc/sbatch; "step": inside an srun task."""
    if environ.get("SLURM_STEP_ID") is not None and environ.get("SLURM_PROCID") is not None:
        return "step"
    return "allocation" if environ.get("SLURM_JOB_ID") else ""


def allocation_nodes(environ: dict[str, str]) -> int:
    return int(environ.get("SLURM_JOB_NUM_NODES") or environ.get("SLURM_NNODES") or 1)


def allocation_gpus_per_node(environ: dict[str, str]) -> int:
    """SLURM_GPUS_ON_NODE, or the count at the end of SLURM_GPUS_PER_NODE ("h100:8" → 8)."""
    for name in ("SLURM_GPUS_ON_NODE", "SLURM_GPUS_PER_NODE"):
        m = re.search(r"(\d+)$", environ.get(name, ""))
        if m:
            return int(m.group(1))
    return 0


def first_node(environ: dict[str, str]) -> str:
    """The first host of the job (the rendezvous host), from `scontrol show hostnames`."""
    nodelist = environ.get("SLURM_JOB_NODELIST") or environ.get("SLURM_NODELIST", "")
    out = subprocess.run(["scontrol", "show", "hostnames", nodelist], check=True,
                         capture_output=True, text=True).stdout.split()
    if not out:
        raise ValueError(f"cannot expand SLURM_JOB_NODELIST={nodelist!r}")
    return out[0]


def job_port(job_id: str, base: int = 20000) -> int:
    return base + int(job_id) % 20000
