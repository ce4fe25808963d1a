"""DeepSpeed hostfiles (`host slots=N`), --include/--exclude, and the DeepSpeed launcher command.

The DeepSpeed launcher (`deepspeed.launcher.runner`) starts every node over pdsh/ssh. We parse
the hostfile first, strictly, so a bad file fails in preflight with its line number and a host
name can never carry shell syntax. Filters follow DeepSpeed's grammar exactly:
`NODE_SPEC[@NODE_SPEC ...]`, `NODE_SPEC = NAME[:SLOT[,SLOT ...]]` (tested against DeepSpeed's own
parser in tests/launch/test_hostfile.py).

The environment does not travel through DeepSpeed's exports: its pdsh runner writes
`export K="V";` into the remote command line, where `$(…)` in a value would run on every node.
Instead the launcher writes RUN/launch/env.json and every rank starts as
`python -m launch.rank_env --env-json RUN/launch/env.json --run-module mmtrain.train …`, which
applies it with no shell in between.
"""

from __future__ import annotations

import base64
import json
import re
from collections import OrderedDict
from pathlib import Path

from launch.safety import check_host

LINE_RE = re.compile(r"^(\S+)\s+slots=(\d+)\s*(#.*)?$")
# Prefixes the DeepSpeed runner exports into its remote command line (runner.EXPORT_ENVS plus the
# CUDA accelerator's "NCCL"): we remove them from the runner's environment and carry them in
# env.json instead.
DEEPSPEED_EXPORTED = ("MLFLOW", "PYTHON", "MV2", "UCX", "NCCL")


def parse_hostfile(text: str, source: str = "hostfile") -> "OrderedDict[str, int]":
    """`host slots=N` lines (comments with #, blank lines) → {host: slots}, in file order."""
    pool: OrderedDict[str, int] = OrderedDict()
    for n, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        m = LINE_RE.match(line)
        if not m:
            raise ValueError(f"{source} line {n}: expected 'HOST slots=N', got {line!r}")
        host, slots = m.group(1), int(m.group(2))
        check_host(host, f"{source} line {n}: host")
        if host in pool:
            raise ValueError(f"{source} line {n}: host {host!r} is listed twice")
        if slots < 1:
            raise ValueError(f"{source} line {n}: {host} has slots={slots}; needs at least 1")
        pool[host] = slots
    if not pool:
        raise ValueError(f"{source} lists no hosts (expected lines like 'node0 slots=8')")
    return pool


def read_hostfile(path: str | Path) -> "OrderedDict[str, int]":
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"hostfile {path} does not exist")
    return parse_hostfile(path.read_text(), source=f"hostfile {path}")


def _parse_filter(spec: str, pool: dict[str, int], flag: str) -> dict[str, list[int]]:
    nodes: dict[str, list[int]] = {}
    for node in spec.split("@"):
        host, sep, slots = node.partition(":")
        if host not in pool:
            raise ValueError(f"{flag} {spec!r}: host {host!r} is not in the hostfile")
        picked = nodes.setdefault(host, [])
        if sep:
            for s in slots.split(","):
                if not s.isdigit() or int(s) >= pool[host]:
                    raise ValueError(f"{flag} {spec!r}: {host} has no slot {s!r} "
                                     f"(slots 0-{pool[host] - 1})")
                picked.append(int(s))
    return nodes


def filter_hosts(pool: dict[str, int], include: str = "", exclude: str = ""
                 ) -> "OrderedDict[str, list[int]]":
    """Apply --include / --exclude (DeepSpeed semantics) → {host: [slot, …]} in hostfile order."""
    if include and exclude:
        raise ValueError("--include and --exclude are mutually exclusive")
    active = {h: list(range(n)) for h, n in pool.items()}
    if include:
        chosen = _parse_filter(include, pool, "--include")
        active = {h: sorted(set(s)) if s else active[h] for h, s in chosen.items()}
    elif exclude:
        for host, slots in _parse_filter(exclude, pool, "--exclude").items():
            active[host] = [s for s in active[host] if slots and s not in slots]
    out = OrderedDict((h, active[h]) for h in pool if active.get(h))
    if not out:
        raise ValueError("--include/--exclude leave no slots to run on")
    return out


def world_info_b64(active: dict[str, list[int]]) -> str:
    """DeepSpeed's --world_info encoding (runner.encode_world_info)."""
    return base64.urlsafe_b64encode(json.dumps(active).encode()).decode()


def deepspeed_argv(*, python: str, hostfile: str, include: str, exclude: str, master_addr: str,
                   master_port: int, ssh_port: int | None, rank_log_dir: str,
                   rank_argv: list[str]) -> list[str]:
    """The DeepSpeed runner command (run with no shell) that starts every node."""
    argv = [python, "-u", "-m", "deepspeed.launcher.runner", "--hostfile", hostfile]
    if include:
        argv += ["--include", include]
    if exclude:
        argv += ["--exclude", exclude]
    argv += ["--master_addr", master_addr, "--master_port", str(master_port), "--launcher", "pdsh"]
    if ssh_port:
        argv += ["--ssh_port", str(ssh_port)]
    argv += ["--no_local_rank", "--enable_each_rank_log", rank_log_dir, "--module", *rank_argv]
    return argv


def node_commands(*, python: str, cwd: str, active: dict[str, list[int]], master_addr: str,
                  master_port: int, rank_log_dir: str, rank_argv: list[str]
                  ) -> list[tuple[str, str]]:
    """What pdsh runs on each node (as DeepSpeed's PDSHRunner builds it), for the dry run."""
    info = world_info_b64(active)
    out = []
    for i, host in enumerate(active):
        # DeepSpeed exports PYTHONPATH=<cwd> (the only variable left for it to export, see
        # runner_environment), then cds there.
        words = [f"export PYTHONPATH={cwd};", "cd", cwd + ";", python, "-u", "-m",
                 "deepspeed.launcher.launch",
                 f"--world_info={info}", f"--node_rank={i}", f"--master_addr={master_addr}",
                 f"--master_port={master_port}", "--module", "--no_local_rank",
                 f"--enable_each_rank_log={rank_log_dir}", *rank_argv]
        out.append((host, " ".join(words)))
    return out


def runner_environment(environ: dict[str, str], *, disabled_env_file: str) -> dict[str, str]:
    """The DeepSpeed runner's own environment: nothing it would export unquoted to the nodes."""
    env = {k: v for k, v in environ.items() if not k.startswith(DEEPSPEED_EXPORTED)}
    env["DS_ENV_FILE"] = disabled_env_file  # its .deepspeed_env files are carried in env.json
    return env
