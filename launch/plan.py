"""A launch plan: every decision of `mmtrain launch` made once, before anything runs.

`build_plan` turns the command-line options and the resolved config into a `LaunchPlan` (mode,
nodes, ranks, rendezvous, restarts, environment). `node_torchrun_argv`, `deepspeed_runner_argv`
and `render_slurm_script` render what runs; `describe` is the dry run, which prints exactly that.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from collections import OrderedDict
from pathlib import Path

from launch import environment, hostfile, slurm
from launch.local import device_kind, free_port
from launch.safety import check_host, check_plain, check_port, parse_endpoint, shell_line
from launch.torchrun import Rendezvous, torchrun_argv
from mmtrain.config import RunConfig
from mmtrain.requeue import REQUEUE_MARKER

DEFAULT_PORT = 29500
# --max-restarts when not given: a multi-node job survives a few node or rank failures by itself;
# on one node a failure is most often a bug that a restart would only repeat (and hide).
MULTI_NODE_RESTARTS = 3
# torchrun's agents share their rendezvous TCPStore with the ranks by default, and in this torch
# it keeps the previous attempt's keys: after a restart a rank can read a dead peer's address and
# fail in gloo/NCCL connect ("Connection refused"; pytorch/pytorch#167288). This documented
# opt-out gives every attempt a fresh store hosted by its rank 0.
RESTART_ENV = {"TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"}


@dataclasses.dataclass(kw_only=True)
class LaunchPlan:
    mode: str  # "torchrun" (this node's torchrun; 1 node = local) | "hostfile" | "slurm"
    cfg: RunConfig
    cwd: Path
    run_dir: Path  # absolute
    python: str
    nnodes: int  # with --nnodes MIN:MAX: MAX
    node_rank: int
    nproc_per_node: int
    world: int
    device: str  # "cpu" | "cuda"
    max_restarts: int
    monitor_interval: float
    shutdown_timeout: int
    rank_args: list[str]  # --resume X (first attempt), after the config
    env_set: dict[str, str]  # what we set for the ranks (+ --env)
    env_carried: dict[str, str]  # what we carry from this shell (hostfile, SLURM)
    fresh: bool = False  # set the run's checkpoints aside before starting (see launch.cli)
    min_nodes: int = 0  # --nnodes MIN:MAX: MIN (elastic); 0: exactly nnodes
    rdzv: Rendezvous | None = None
    # hostfile mode
    hostfile: str = ""
    include: str = ""
    exclude: str = ""
    ssh_port: int | None = None
    hosts: "OrderedDict[str, list[int]]" = dataclasses.field(default_factory=OrderedDict)
    master_addr: str = ""
    master_port: int = DEFAULT_PORT
    # SLURM
    slurm_job: slurm.SlurmJob | None = None
    slurm_where: str = ""  # "" (submit) | "allocation" (run the script here)
    slurm_threads: int | None = None  # None: the script splits the node's CPUs over its ranks
    warnings: list[str] = dataclasses.field(default_factory=list)

    @property
    def config_path(self) -> Path:
        return self.run_dir / "config.json"

    @property
    def launch_dir(self) -> Path:
        return self.run_dir / "launch"

    def torchrun_log_dir(self, node_rank: int | None) -> Path:
        base = self.run_dir / "logs" / "torchrun"
        return base if node_rank is None else base / f"node{node_rank}"

    def rank_argv(self) -> list[str]:
        """The rank program after `python -m` (the same on every rank)."""
        train = ["mmtrain.train", "--config-json", str(self.config_path), *self.rank_args]
        if self.mode == "hostfile":
            return ["launch.rank_env", "--env-json", str(self.launch_dir / "env.json"),
                    "--run-module", *train]
        return train


def build_plan(args: argparse.Namespace, cfg: RunConfig, *, environ: dict[str, str] | None = None,
               cwd: Path | None = None, python: str | None = None) -> LaunchPlan:
    """Decide everything; raise ValueError (one clear line) on inconsistent options.

    `environ`, `cwd` and `python` default to this process's; tests pin them (golden files).
    """
    environ = dict(os.environ if environ is None else environ)
    cwd = Path(cwd) if cwd is not None else Path.cwd()
    run_dir = cfg.train.run_dir if cfg.train.run_dir.is_absolute() else cwd / cfg.train.run_dir
    # --fresh is done by the launcher (the checkpoints are set aside), not passed to the ranks: a
    # restarted attempt, or a resubmitted SLURM script, must resume rather than start over again.
    rank_args = ["--resume", args.resume] if args.resume else []
    if args.fresh and args.resume:
        raise ValueError("--fresh and --resume exclude each other")
    if args.rdzv_last_call is not None and (args.rdzv_last_call < 0 or not args.nnodes
                                            or ":" not in str(args.nnodes)):
        raise ValueError("--rdzv-last-call S (S >= 0) applies to an elastic --nnodes MIN:MAX")
    if args.slurm and args.hostfile:
        raise ValueError("--slurm and --hostfile are two ways to start the nodes: pick one")
    common = dict(cfg=cfg, cwd=cwd, run_dir=run_dir, python=python or sys.executable,
                  max_restarts=args.max_restarts or 0, monitor_interval=args.monitor_interval,
                  shutdown_timeout=args.shutdown_timeout, rank_args=rank_args, fresh=args.fresh)
    extra_env = environment.parse_env_assignments(args.env)
    if args.max_restarts is not None and args.max_restarts < 0:
        raise ValueError(f"--max-restarts {args.max_restarts} must be >= 0")

    if args.hostfile:
        plan = _hostfile_plan(args, cfg, environ, common)
    elif args.slurm and slurm.allocation(environ) != "step":
        plan = _slurm_plan(args, cfg, environ, common)
    else:
        plan = _torchrun_plan(args, cfg, environ, common)
    plan.env_set.update(extra_env)
    if args.max_restarts is None and plan.nnodes > 1 and not (plan.rdzv and
                                                               plan.rdzv.backend == "static"):
        plan.max_restarts = MULTI_NODE_RESTARTS
    return plan


def parse_nnodes(text: str | None) -> tuple[int, int]:
    """`--nnodes N` → (N, N); `--nnodes MIN:MAX` → (MIN, MAX)."""
    if text is None:
        return 1, 1
    low, sep, high = text.partition(":")
    if not low.isdigit() or (sep and not high.isdigit()):
        raise ValueError(f"--nnodes {text!r} must be a node count N, or MIN:MAX (e.g. 2:4)")
    low_n, high_n = int(low), int(high) if sep else int(low)
    if not 1 <= low_n <= high_n:
        raise ValueError(f"--nnodes {text}: needs 1 <= MIN <= MAX")
    return low_n, high_n


def _torchrun_plan(args, cfg: RunConfig, environ: dict[str, str], common: dict) -> LaunchPlan:
    nproc = args.nproc_per_node or cfg.launch.nproc
    min_nodes, nnodes = parse_nnodes(args.nnodes)
    node_rank = args.node_rank
    if args.slurm:  # inside an srun task: this node's part, from the SLURM environment
        if min_nodes != nnodes:
            raise ValueError("--nnodes MIN:MAX is for --rdzv-endpoint launches; under SLURM the "
                             "node count is the allocation's")
        nnodes = int(environ.get("SLURM_NNODES") or environ.get("SLURM_JOB_NUM_NODES") or 1)
        min_nodes = nnodes
        node_rank = int(environ["SLURM_NODEID"])
        if int(environ.get("SLURM_NTASKS_PER_NODE", "1").split("(")[0] or 1) != 1:
            raise ValueError("inside srun, run one `mmtrain launch` per node "
                             "(srun --ntasks-per-node=1 …)")
        port = args.master_port or slurm.job_port(environ.get("SLURM_JOB_ID", "0"))
        endpoint = args.rdzv_endpoint or f"{slurm.first_node(environ)}:{port}"
    else:
        endpoint = args.rdzv_endpoint
        if nnodes > 1 and node_rank is None:
            raise ValueError(f"--nnodes {args.nnodes}: give each node its --node-rank "
                             f"(0 … {nnodes - 1}); node rank 0 hosts the rendezvous")
        if min_nodes != nnodes and not endpoint:
            raise ValueError(f"--nnodes {args.nnodes} (elastic) needs the c10d rendezvous: "
                             "--rdzv-endpoint HOST:PORT")
    node_rank = node_rank or 0
    if nnodes < 1 or not 0 <= node_rank < nnodes:
        raise ValueError(f"--node-rank {node_rank} must be in 0 … {nnodes - 1} (--nnodes {nnodes})")
    if nproc < 1:
        raise ValueError(f"--nproc-per-node {nproc} must be >= 1")
    if endpoint:
        host, port = parse_endpoint(endpoint, "--rdzv-endpoint")
        rdzv = Rendezvous(backend="c10d", host=host, port=str(port),
                          run_id=args.rdzv_id or cfg.train.name, join_timeout=args.rdzv_timeout,
                          local_addr=args.local_addr,
                          last_call=args.rdzv_last_call if min_nodes != nnodes else None)
    elif args.master_addr or nnodes > 1:
        if not args.master_addr:
            raise ValueError(f"--nnodes {nnodes} needs a rendezvous: --rdzv-endpoint HOST:PORT "
                             "(c10d, recommended) or --master-addr HOST [--master-port PORT]")
        host = check_host(args.master_addr, "--master-addr")
        port = check_port(args.master_port or DEFAULT_PORT, "--master-port")
        rdzv = Rendezvous(backend="static", host=host, port=str(port), run_id=cfg.train.name,
                          local_addr=args.local_addr)
        if args.max_restarts:  # static restarts reuse the agent's store: see RESTART_ENV
            raise ValueError("--max-restarts needs the c10d rendezvous: use --rdzv-endpoint "
                             f"{host}:{port} instead of --master-addr/--master-port")
    else:  # one node: c10d on loopback, a free port unless one was given
        port = check_port(args.master_port, "--master-port") if args.master_port else free_port()
        rdzv = Rendezvous(backend="c10d", host="127.0.0.1", port=str(port),
                          run_id=args.rdzv_id or cfg.train.name, join_timeout=args.rdzv_timeout,
                          local_addr=args.local_addr)
    if args.local_addr:
        check_host(args.local_addr, "--local-addr")
    device = device_kind(cfg)
    env = environment.rank_settings(device=device, threads_per_rank=cfg.launch.threads_per_rank,
                                    nproc_per_node=nproc, log_dir=str(common["run_dir"] / "logs"),
                                    environ=environ)
    if rdzv.backend == "c10d":
        env.update(RESTART_ENV)
    return LaunchPlan(mode="torchrun", nnodes=nnodes, node_rank=node_rank, nproc_per_node=nproc,
                      world=nnodes * nproc, device=device, rdzv=rdzv, env_set=env,
                      env_carried={}, min_nodes=min_nodes if min_nodes != nnodes else 0, **common)


def _hostfile_plan(args, cfg: RunConfig, environ: dict[str, str], common: dict) -> LaunchPlan:
    pool = hostfile.read_hostfile(args.hostfile)
    hosts = hostfile.filter_hosts(pool, args.include or "", args.exclude or "")
    slots = {len(s) for s in hosts.values()}
    if args.nnodes is not None or args.node_rank is not None or args.rdzv_endpoint:
        raise ValueError("with --hostfile the nodes and slots come from the hostfile: drop "
                         "--nnodes/--node-rank/--rdzv-endpoint (filter with --include/--exclude)")
    master = check_host(args.master_addr or next(iter(hosts)), "--master-addr")
    port = check_port(args.master_port or DEFAULT_PORT, "--master-port")
    cwd = str(common["cwd"])
    why = "the DeepSpeed pdsh runner puts it unquoted into the command line it runs on every node"
    check_plain(cwd, "working directory", why)
    check_plain(str(common["run_dir"]), "run directory", why)
    check_plain(common["python"], "python interpreter path", why)
    for arg in common["rank_args"]:
        check_plain(arg, "rank argument", why)
    device = device_kind(cfg)
    nproc = max(slots)
    carried = environment.carried(environ)
    carried.update(environment.read_deepspeed_env_files(
        [os.path.join(environ.get("HOME", os.path.expanduser("~")), ".deepspeed_env"),
         os.path.join(cwd, ".deepspeed_env")]))
    warnings: list[str] = []
    if len(slots) > 1:
        warnings.append(f"hosts have different slot counts {sorted(slots)}: OMP_NUM_THREADS is "
                        f"set for {nproc} ranks per node")
    return LaunchPlan(mode="hostfile", nnodes=len(hosts), node_rank=0, nproc_per_node=nproc,
                      world=sum(len(s) for s in hosts.values()), device=device,
                      env_set=environment.rank_settings(
                          device=device, threads_per_rank=cfg.launch.threads_per_rank,
                          nproc_per_node=nproc, log_dir=str(common["run_dir"] / "logs"),
                          environ=environ),
                      env_carried=carried, hostfile=str(Path(args.hostfile).resolve()),
                      include=args.include or "", exclude=args.exclude or "",
                      ssh_port=args.ssh_port, hosts=hosts, master_addr=master, master_port=port,
                      warnings=warnings, **common)


def _slurm_plan(args, cfg: RunConfig, environ: dict[str, str], common: dict) -> LaunchPlan:
    where = slurm.allocation(environ)
    min_nodes, nnodes = parse_nnodes(args.nnodes) if args.nnodes else (1, 1)
    if min_nodes != nnodes:
        raise ValueError("--nnodes MIN:MAX is for --rdzv-endpoint launches; with --slurm give the "
                         "node count (a requeued job resumes on the nodes it gets)")
    if not args.nnodes and where == "allocation":
        nnodes = slurm.allocation_nodes(environ)
    if args.node_rank is not None or args.rdzv_endpoint or args.master_addr:
        raise ValueError("with --slurm the nodes and the rendezvous come from the allocation: drop "
                         "--node-rank/--rdzv-endpoint/--master-addr")
    device, gpus, nproc, warnings = _slurm_devices(args, cfg, environ, where)
    logs = common["run_dir"] / "logs"
    job = slurm.SlurmJob(job_name=args.job_name or cfg.train.name, nodes=nnodes, gpus_per_node=gpus,
                         nproc_per_node=nproc, time=args.time or "", partition=args.partition or "",
                         account=args.account or "", qos=args.qos or "",
                         cpus_per_task=args.cpus_per_task or slurm_cpus_per_node(cfg, nproc),
                         output=str(logs / "slurm-%j.out"), error=str(logs / "slurm-%j.err"),
                         signal_seconds=args.shutdown_timeout + 60 if args.time else 0,
                         requeue_marker=str(common["run_dir"] / REQUEUE_MARKER))
    threads = (cfg.launch.threads_per_rank or
               (int(environ["OMP_NUM_THREADS"]) if environ.get("OMP_NUM_THREADS", "").isdigit()
                else None) or
               (max(1, args.cpus_per_task // nproc) if args.cpus_per_task else None))
    env_set = {**environment.rank_settings(device=device, threads_per_rank=0, nproc_per_node=None,
                                           log_dir=str(logs), environ=environ), **RESTART_ENV}
    rdzv = Rendezvous(backend="c10d", host=slurm.RDZV_HOST, port=slurm.RDZV_PORT,
                      run_id=slurm.JOB_ID, join_timeout=args.rdzv_timeout)
    if args.resume:
        warnings.append(f"--resume {args.resume} is written into the script: it applies to the "
                        "job's first run (a requeued run resumes from the newest checkpoint), and "
                        "again to every new submission of the script; drop it once the job saved")
    return LaunchPlan(mode="slurm", nnodes=nnodes, node_rank=0, nproc_per_node=nproc,
                      world=nnodes * nproc, device=device, rdzv=rdzv, env_set=env_set,
                      env_carried=environment.carried(environ), slurm_job=job, slurm_where=where,
                      slurm_threads=threads, warnings=warnings, **common)


def _slurm_devices(args, cfg: RunConfig, environ: dict[str, str],
                   where: str) -> tuple[str, int, int, list[str]]:
    """(device, GPUs per node to request, ranks per node, warnings) of a SLURM job.

    The login node that writes the script may have no GPU (or other GPUs): the job's device comes
    from launch.device and --gpus-per-node, never from this machine. A CUDA job always requests
    its GPUs: --gpus-per-node, else the allocation's, else one per rank (--nproc-per-node or
    launch.nproc). No GPUs and launch.device=auto is a CPU job, said so.
    """
    warnings: list[str] = []
    gpus = args.gpus_per_node if args.gpus_per_node is not None else (
        slurm.allocation_gpus_per_node(environ) if where == "allocation" else 0)
    if gpus < 0:
        raise ValueError(f"--gpus-per-node {gpus} must be >= 0")
    if gpus and cfg.launch.device == "cpu":
        raise ValueError(f"launch.device=cpu with {gpus} GPUs per node: drop --gpus-per-node, or "
                         "set launch.device=cuda (or auto)")
    device = "cuda" if gpus or cfg.launch.device == "cuda" else "cpu"
    nproc = args.nproc_per_node or gpus or cfg.launch.nproc
    if device == "cuda" and not gpus:
        gpus = nproc
        warnings.append(f"launch.device=cuda and no --gpus-per-node: the job requests {gpus} GPUs "
                        f"per node, one per rank ({'--nproc-per-node' if args.nproc_per_node else 'launch.nproc'})")
    elif device == "cpu" and cfg.launch.device == "auto":
        warnings.append("launch.device=auto and no --gpus-per-node: a CPU job (gloo); for GPUs set "
                        "launch.device=cuda or --gpus-per-node")
    if device == "cuda" and nproc > gpus:
        raise ValueError(f"--nproc-per-node {nproc} exceeds --gpus-per-node {gpus}")
    return device, gpus, nproc, warnings


def slurm_cpus_per_node(cfg: RunConfig, nproc: int) -> int:
    """--cpus-per-task when not given (one task per node runs all its ranks): per rank, its compute
    threads (launch.threads_per_rank, at least 2: the training thread and the communication /
    DeepSpeed helpers) plus one per decode worker (data.num_workers). SLURM's default, 1 CPU per
    task, would pin every rank of the node and its loaders to a single core."""
    return nproc * (max(2, cfg.launch.threads_per_rank) + cfg.data.num_workers)


# ------------------------------------------------------------------------------------ rendering


def node_torchrun_argv(plan: LaunchPlan, node_rank: int | None) -> list[str]:
    assert plan.rdzv is not None
    nnodes = f"{plan.min_nodes}:{plan.nnodes}" if plan.min_nodes else str(plan.nnodes)
    return torchrun_argv(python=plan.python, nnodes=nnodes, node_rank=node_rank,
                         nproc_per_node=plan.nproc_per_node, rdzv=plan.rdzv,
                         max_restarts=plan.max_restarts, monitor_interval=plan.monitor_interval,
                         shutdown_timeout=plan.shutdown_timeout,
                         log_dir=str(plan.torchrun_log_dir(node_rank)), rank_argv=plan.rank_argv())


def deepspeed_runner_argv(plan: LaunchPlan) -> list[str]:
    return hostfile.deepspeed_argv(
        python=plan.python, hostfile=plan.hostfile, include=plan.include, exclude=plan.exclude,
        master_addr=plan.master_addr, master_port=plan.master_port, ssh_port=plan.ssh_port,
        rank_log_dir=str(plan.run_dir / "logs" / "deepspeed"), rank_argv=plan.rank_argv())


def hostfile_env(plan: LaunchPlan) -> dict[str, str]:
    """RUN/launch/env.json: carried first, then what we set (ours win, --env wins over both)."""
    return {**plan.env_carried, **plan.env_set}


def render_slurm_script(plan: LaunchPlan) -> str:
    assert plan.slurm_job is not None
    node_check = [plan.python, "-m", "launch.preflight", "--node-check",
                  "--gpus", str(plan.slurm_job.gpus_per_node if plan.device == "cuda" else 0),
                  "--rdzv-host", slurm.RDZV_HOST, "--port", slurm.RDZV_PORT]
    env = {**plan.env_carried, **plan.env_set}
    env.pop("OMP_NUM_THREADS", None)
    return slurm.sbatch_script(plan.slurm_job, cwd=str(plan.cwd), env=env,
                               threads=plan.slurm_threads,
                               node_check_argv=node_check,
                               torchrun_argv=node_torchrun_argv(plan, None))


def describe(plan: LaunchPlan) -> str:
    """The dry run: the exact commands and environment of every node."""
    kind = "GPU" if plan.device == "cuda" else "CPU"
    out = [f"mode: {plan.mode}; {plan.nnodes} node{'s' if plan.nnodes > 1 else ''}, "
           f"{plan.world} {kind} ranks; run directory {plan.run_dir}"]
    if plan.max_restarts:
        out.append(f"restarts: up to {plan.max_restarts}, each resuming from the newest committed "
                   "checkpoint")
    if plan.min_nodes:
        out.append(f"elastic: {plan.min_nodes} to {plan.nnodes} nodes; a restart goes on with the "
                   f"nodes that rejoin (at least {plan.min_nodes}), and the ranks convert the "
                   "checkpoint to the new world size")
    if plan.mode == "slurm":
        out += [f"sbatch script ({plan.launch_dir / 'slurm.sbatch'}):", "",
                render_slurm_script(plan)]
        return "\n".join(out)
    if plan.mode == "hostfile":
        env = hostfile_env(plan)
        out.append(f"environment of every rank, from {plan.launch_dir / 'env.json'} "
                   "(applied by launch.rank_env, no shell):")
        out += [f"  {k}={v!r}" for k, v in env.items()]
        out.append("on this machine:")
        out.append("  " + shell_line(deepspeed_runner_argv(plan)))
        out.append("which starts on each node (through pdsh):")
        for host, line in hostfile.node_commands(
                python=plan.python, cwd=str(plan.cwd), active=plan.hosts,
                master_addr=plan.master_addr, master_port=plan.master_port,
                rank_log_dir=str(plan.run_dir / "logs" / "deepspeed"), rank_argv=plan.rank_argv()):
            out.append(f"  {host}: {line}")
        return "\n".join(out)
    out.append("environment set for the ranks (on top of this shell's):")
    out += [f"  {k}={v!r}" for k, v in plan.env_set.items()]
    for node in range(plan.nnodes):
        here = " (this node)" if node == plan.node_rank else ""
        out.append(f"node {node}{here}:")
        out.append("  " + shell_line(node_torchrun_argv(plan, node), env=plan.env_set))
    return "\n".join(out)
