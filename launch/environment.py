"""The environment every rank gets: what we set, and what we carry over from the launching shell.

torchrun ranks on this machine inherit the launcher's whole environment anyway; for the modes
that start processes elsewhere (DeepSpeed hostfile over pdsh/ssh, SLURM batch scripts) the
variables below are carried explicitly, so the ranks see what the user's shell had, and the dry
run shows it.
"""

from __future__ import annotations

import os
import re

from launch.safety import ENV_NAME_RE

# Prefixes of variables that tune communication, threading and CUDA: carried to every rank.
CARRY_PREFIXES = ("NCCL_", "TORCH_NCCL_", "CUDA_", "TORCH_", "PYTORCH_", "GLOO_", "OMP_", "MKL_",
                  "KMP_", "UCX_", "FI_", "NVIDIA_", "TRITON_", "HF_", "MMTRAIN_")
CARRY_NAMES = ("PYTHONPATH", "LD_LIBRARY_PATH",
               # where object storage is (not secrets: written into scripts; keys come from each
               # node's own credentials: instance role, ~/.aws, or --env)
               "AWS_ENDPOINT_URL", "AWS_DEFAULT_REGION", "AWS_REGION", "AWS_PROFILE",
               "GOOGLE_APPLICATION_CREDENTIALS")
# Set per node / per rank by the engine that starts the ranks: never carried from here.
NEVER_CARRY = ("CUDA_VISIBLE_DEVICES", "RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE",
               "MASTER_ADDR", "MASTER_PORT", "GROUP_RANK", "ROLE_RANK", "TORCHELASTIC_RUN_ID",
               "TORCHELASTIC_RESTART_COUNT", "TORCHELASTIC_MAX_RESTARTS", "TORCHELASTIC_ERROR_FILE")


def carried(environ: dict[str, str] | None = None) -> dict[str, str]:
    """The variables of `environ` (default: ours) that go to every rank, sorted by name."""
    environ = dict(os.environ if environ is None else environ)
    out = {}
    for name, value in sorted(environ.items()):
        if name in NEVER_CARRY or not ENV_NAME_RE.match(name):
            continue
        if name.startswith(CARRY_PREFIXES) or name in CARRY_NAMES:
            out[name] = value
    return out


def rank_settings(*, device: str, threads_per_rank: int, nproc_per_node: int | None,
                  log_dir: str, environ: dict[str, str] | None = None) -> dict[str, str]:
    """Variables we set for the ranks (on top of the carried ones).

    OMP_NUM_THREADS: launch.threads_per_rank when set; else an OMP_NUM_THREADS the user exported
    (left alone); else this node's cores split over its ranks. `nproc_per_node=None` leaves the
    split to the place that knows the node's cores (the SLURM script). GPU ranks also get the NCCL
    flight recorder (`flight_recorder`), unless the user set those variables.
    """
    environ = dict(os.environ if environ is None else environ)
    env = {"PYTHONUNBUFFERED": "1"}
    if threads_per_rank:
        env["OMP_NUM_THREADS"] = str(threads_per_rank)
    elif "OMP_NUM_THREADS" not in environ and nproc_per_node is not None:
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // nproc_per_node))
    if device == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""  # CPU ranks: gloo, even on a machine with GPUs
    elif "TORCH_NCCL_ASYNC_ERROR_HANDLING" not in environ:
        # A rank whose peer died must fail its collective (and so be restarted by torchrun)
        # instead of hanging: NCCL errors and engine.timeout_minutes then abort the process.
        env["TORCH_NCCL_ASYNC_ERROR_HANDLING"] = "1"
    if device != "cpu":
        env.update(flight_recorder(log_dir, environ))
    return env


def flight_recorder(log_dir: str, environ: dict[str, str]) -> dict[str, str]:
    """NCCL's flight recorder: the last collectives of every rank, dumped to
    LOG_DIR/nccl_trace_rank_<rank> when a collective times out (what each rank was waiting for).
    Each setting the user made (under either of torch's names) is left alone."""
    wanted = {("TORCH_NCCL_TRACE_BUFFER_SIZE", "TORCH_FR_BUFFER_SIZE"): "2000",
              ("TORCH_NCCL_DUMP_ON_TIMEOUT",): "1",
              ("TORCH_NCCL_DEBUG_INFO_TEMP_FILE", "TORCH_FR_DUMP_TEMP_FILE"):
                  os.path.join(log_dir, "nccl_trace_rank_")}
    return {names[0]: value for names, value in wanted.items()
            if not any(name in environ for name in names)}


def parse_env_assignments(items: list[str]) -> dict[str, str]:
    """`--env KEY=VALUE` flags → dict; the value is taken literally (never evaluated)."""
    out = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or not ENV_NAME_RE.match(name):
            raise ValueError(f"--env {item!r} must look like NAME=VALUE with a shell variable name")
        out[name] = value
    return out


def read_deepspeed_env_files(paths: list[str]) -> dict[str, str]:
    """The `.deepspeed_env` files the DeepSpeed runner would read (KEY=VALUE lines)."""
    out = {}
    for path in paths:
        if not os.path.isfile(path):
            continue
        with open(path) as f:
            for n, line in enumerate(f, 1):
                line = line.strip()
                if not line or line.startswith("#"):
                    continue
                name, sep, value = line.partition("=")
                if not sep or not re.match(ENV_NAME_RE, name.strip()):
                    raise ValueError(f"{path} line {n}: expected NAME=VALUE, got {line!r}")
                out[name.strip()] = value.strip()
    return out
