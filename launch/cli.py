"""`mmtrain launch`: one machine or many, through torchrun, a DeepSpeed hostfile or SLURM.

    mmtrain launch --nproc-per-node 8                                    # this machine
    mmtrain launch --nnodes 2 --node-rank 0 --rdzv-endpoint node0:29500  # on node0 (node1: 1)
    mmtrain launch --hostfile hosts.txt                                  # every host, over ssh
    mmtrain launch --slurm --nnodes 4 --gpus-per-node 8 --time 24:00:00  # sbatch, submitted

Order of work: resolve the config → decide the plan (launch.plan) → preflight (launch.preflight;
every failure one line, no rank started) → write RUN/config.json → run the engine's launcher
(launch.supervise), which restarts failed ranks (--max-restarts) from the newest committed
checkpoint. `--dry-run` stops before writing anything and prints every node's command.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from launch import plan as plans
from launch import preflight
from launch.local import build_demo_data, needs_demo_data, train_datasets
from launch.supervise import (Outcome, child_env, describe_exit, last_error, run_child,
                              torchrun_failure)
from mmtrain.config import add_config_args

DOCS = "docs/multinode.md"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="mmtrain launch", formatter_class=argparse.RawDescriptionHelpFormatter,
        description=__doc__.split("\n\n")[0] + "\n\n" + __doc__.split("\n\n")[1],
        epilog=f"Per-rank logs: RUN/logs/. Examples and troubleshooting: {DOCS}")
    add_config_args(p)
    g = p.add_argument_group("nodes and ranks (torchrun)")
    g.add_argument("--nproc-per-node", type=int, help="ranks per node (default: launch.nproc; "
                   "with --slurm: --gpus-per-node)")
    g.add_argument("--nnodes", metavar="N|MIN:MAX", help="number of nodes (default 1; --slurm in "
                   "an allocation: its node count); MIN:MAX is elastic (c10d): after a node fails "
                   "the job restarts on the nodes that are left, down to MIN")
    g.add_argument("--node-rank", type=int, help="this node's rank, 0 … nnodes-1 (node 0 hosts "
                   "the rendezvous); needed with --nnodes > 1")
    g.add_argument("--rdzv-endpoint", metavar="HOST:PORT", help="c10d rendezvous on node 0 "
                   "(recommended for several nodes: restarts span all nodes)")
    g.add_argument("--rdzv-id", help="rendezvous id (default: train.name)")
    g.add_argument("--rdzv-timeout", type=int, default=600, metavar="S",
                   help="seconds a node waits for the others to join (default 600)")
    g.add_argument("--rdzv-last-call", type=int, metavar="S", help="with --nnodes MIN:MAX: once "
                   "MIN nodes joined, seconds to wait for more before going on (torchrun's "
                   "default: 30)")
    g.add_argument("--master-addr", metavar="HOST", help="static rendezvous on HOST (torchrun), "
                   "or the DeepSpeed master (--hostfile; default: its first host)")
    g.add_argument("--master-port", type=int, metavar="PORT", help="port of --master-addr "
                   "(default 29500; one node: a free port)")
    g.add_argument("--local-addr", metavar="ADDR", help="this node's address as the others "
                   "reach it (when its host name resolves wrongly, e.g. in containers)")
    g = p.add_argument_group("DeepSpeed hostfile (every node started over pdsh/ssh)")
    g.add_argument("--hostfile", metavar="FILE", help="lines 'HOST slots=N'")
    g.add_argument("--include", metavar="SPEC", help="use only these: 'host1@host2:0,2'")
    g.add_argument("--exclude", metavar="SPEC", help="leave these out: 'host2' or 'host1:3'")
    g.add_argument("--ssh-port", type=int, metavar="PORT")
    g = p.add_argument_group("SLURM (sbatch script with srun + torchrun)")
    g.add_argument("--slurm", action="store_true", help="write and submit an sbatch script (inside "
                   "an allocation: run it here)")
    g.add_argument("--gpus-per-node", type=int, metavar="G")
    g.add_argument("--time", metavar="HH:MM:SS")
    g.add_argument("--partition")
    g.add_argument("--account")
    g.add_argument("--qos")
    g.add_argument("--cpus-per-task", type=int, metavar="C")
    g.add_argument("--job-name", help="default: train.name")
    g = p.add_argument_group("restarts")
    g.add_argument("--max-restarts", type=int, metavar="R", help="restart the job up to R times "
                   "when a rank dies; it resumes from the newest committed checkpoint (default: "
                   "3 on several nodes, 0 on one)")
    g.add_argument("--monitor-interval", type=float, default=1.0, metavar="S",
                   help="how often torchrun checks its ranks (default 1 s)")
    g.add_argument("--shutdown-timeout", type=int, default=60, metavar="S", help="seconds the "
                   "ranks get to save and exit after SIGTERM before they are killed (default 60)")
    g = p.add_argument_group("run")
    g.add_argument("--fresh", action="store_true", help="start at step 0: the run's checkpoints "
                   "(and metrics.jsonl) are moved to RUN/set-aside-<time>/, nothing is deleted")
    g.add_argument("--resume", help="resume from this checkpoint (step_XXXXXXXX or a path)")
    g.add_argument("--global-batch", type=int, metavar="N", help="rows per optimizer step over all "
                   "ranks; sets engine.grad_accum (N must split evenly over ranks × micro-batch)")
    g.add_argument("--env", action="append", default=[], metavar="NAME=VALUE",
                   help="extra environment variable for every rank (repeatable; taken literally)")
    g.add_argument("--dry-run", action="store_true", help="run the preflight, print every node's "
                   "command and environment, start nothing")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    from mmtrain.config import load_config

    try:
        cfg = load_config(args.config, args.overrides)
    except ValueError as e:
        return fail(f"config: {e}")
    try:
        plan = plans.build_plan(args, cfg)
    except ValueError as e:
        return fail(str(e))
    builds_demo = plan.mode == "torchrun" and plan.nnodes == 1 and needs_demo_data(cfg)
    if builds_demo and not args.dry_run:
        try:
            build_demo_data(cfg)
        except ValueError as e:
            return fail(f"data: {e}")
        builds_demo = False
    report = run_preflight(plan, args, dry_run=args.dry_run, builds_demo=builds_demo)
    if args.dry_run:
        report.print(sys.stdout)
        print(plans.describe(plan), flush=True)
        return 0 if report.ok else 2
    report.print(sys.stderr)
    if not report.ok:
        return 2
    if plan.fresh and plan.node_rank == 0:
        moved = set_aside(plan.run_dir)
        if moved:
            print(f"mmtrain launch: --fresh: previous checkpoints moved to {moved}", flush=True)
    write_config(plan)
    return execute(plan)


def fail(message: str) -> int:
    print(f"mmtrain launch: preflight failed: {message}", file=sys.stderr, flush=True)
    return 2


# ------------------------------------------------------------------------------------ preflight


def run_preflight(plan: plans.LaunchPlan, args: argparse.Namespace, *, dry_run: bool,
                  builds_demo: bool) -> preflight.Report:
    """Every check for this mode; mutates plan.cfg when --global-batch sets engine.grad_accum."""
    cfg, report = plan.cfg, preflight.Report()
    report.warnings += plan.warnings
    report.check(lambda: preflight.check_tokenizer(cfg.data.tokenizer))
    if args.global_batch is not None:
        report.check(lambda: _global_batch(plan, args.global_batch))
    per_node = plan.world // plan.nnodes
    report.check(lambda: preflight.global_batch_tokens(  # an elastic restart may have fewer nodes
        plan.cfg, plan.world, fewer=tuple(n * per_node for n in range(plan.min_nodes or plan.nnodes,
                                                                      plan.nnodes))))
    if builds_demo:
        report.notes.append(f"the demo corpus will be built in {Path(cfg.data.train).parent}")
    else:
        dirs = train_datasets(cfg)  # data.mix replaces data.train
        if cfg.data.val and cfg.train.eval_batches:
            dirs.append((cfg.data.val, "data.val"))
        for directory, key in dirs:
            report.check(lambda d=directory, k=key: preflight.check_dataset(d, k))
        if report.ok:
            report.check(lambda: _layout(plan))
    ckpts = plan.run_dir / "checkpoints"
    report.check(lambda: preflight.check_writable(ckpts, create=not dry_run))
    if plan.node_rank == 0:
        report.check(lambda: preflight.check_resume(ckpts, resume=args.resume, fresh=args.fresh,
                                                    world=plan.world, report=report))
    if plan.mode == "torchrun":
        _torchrun_checks(plan, report, dry_run=dry_run)
    elif plan.mode == "hostfile":
        _hostfile_checks(plan, report, dry_run=dry_run)
    elif plan.mode == "slurm" and not dry_run and not plan.slurm_where:
        if shutil.which("sbatch") is None:
            report.failures.append("--slurm: `sbatch` is not on PATH (run this on a SLURM login "
                                   "node, or use --dry-run to only write the script)")
    return report


def _layout(plan: plans.LaunchPlan) -> str:
    from mmtrain.data.index import read_dataset_index  # local folders and URLs

    datasets = train_datasets(plan.cfg)
    # With data.mix this is the total over its datasets; the loader checks each one's share.
    shards = sum(len(read_dataset_index(location)["shards"]) for location, _ in datasets)
    preflight.check_layout(num_shards=shards, num_streams=plan.cfg.data.num_streams,
                           world=plan.world, workers=plan.cfg.data.num_workers,
                           what=" + ".join(f"{key}={location}" for location, key in datasets))
    d, e = plan.cfg.data, plan.cfg.engine
    try:
        accum = plan.cfg.engine_for(plan.world).grad_accum  # from engine.global_batch_tokens
    except ValueError:  # already reported by the preflight.global_batch_tokens check
        accum = e.grad_accum
    rows = d.micro_batch_size * accum * plan.world
    return (f"{plan.world} ranks; global batch {rows} rows "
            f"= {d.micro_batch_size} (data.micro_batch_size) × {accum} (engine.grad_accum) "
            f"× {plan.world} ranks; {d.num_streams} logical streams over {shards} shards")


def _global_batch(plan: plans.LaunchPlan, global_batch: int) -> str:
    if plan.min_nodes:
        raise ValueError(f"--global-batch fixes engine.grad_accum for {plan.world} ranks, but with "
                         f"--nnodes {plan.min_nodes}:{plan.nnodes} a restart may have fewer: give a "
                         "fixed --nnodes, or set engine.grad_accum")
    accum = preflight.global_batch_accum(global_batch, world=plan.world,
                                         micro_batch=plan.cfg.data.micro_batch_size)
    engine = dataclasses.replace(plan.cfg.engine, grad_accum=accum)
    plan.cfg = dataclasses.replace(plan.cfg, engine=engine)
    return f"--global-batch {global_batch}: engine.grad_accum={accum}"


def _torchrun_checks(plan: plans.LaunchPlan, report: preflight.Report, *, dry_run: bool) -> None:
    rdzv = plan.rdzv
    assert rdzv is not None
    port, what = int(rdzv.port), ("rendezvous" if rdzv.backend == "c10d" else "--master-addr")
    if plan.nnodes == 1 and rdzv.host in ("127.0.0.1", "localhost"):
        report.check(lambda: preflight.check_port_free(port, f"{what} port"))
    elif plan.node_rank == 0:
        report.check(lambda: preflight.check_rendezvous_host(rdzv.host, port, what))
    elif dry_run:
        report.check(lambda: preflight.resolve(rdzv.host, what) and None)
    else:
        report.check(lambda: preflight.check_reachable(rdzv.host, port, what,
                                                       wait=rdzv.join_timeout))
    if plan.device == "cuda":
        report.check(lambda: preflight.check_gpus(plan.nproc_per_node, f"node {plan.node_rank}"))


def _hostfile_checks(plan: plans.LaunchPlan, report: preflight.Report, *, dry_run: bool) -> None:
    if shutil.which("pdsh") is None:
        message = ("the DeepSpeed launcher starts the nodes with pdsh, which is not on PATH "
                   "(apt install pdsh)")
        (report.warnings if dry_run else report.failures).append(message)
    for host, slots in plan.hosts.items():
        report.check(lambda h=host: preflight.resolve(h, "hostfile host") and None)
        if plan.device == "cuda" and preflight.is_local_host(host):
            report.check(lambda h=host, n=len(slots): preflight.check_gpus(n, f"host {h}"))
    if preflight.is_local_host(plan.master_addr):
        report.check(lambda: preflight.check_port_free(plan.master_port, "--master-port"))


# ------------------------------------------------------------------------------------ running


def write_config(plan: plans.LaunchPlan) -> None:
    """RUN/config.json, atomically: every node writes the same bytes (shared or not)."""
    plan.run_dir.mkdir(parents=True, exist_ok=True)
    text = json.dumps(plan.cfg.to_dict(), indent=2, sort_keys=True) + "\n"
    tmp = plan.config_path.with_name(f".config.json.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, plan.config_path)


def set_aside(run_dir: Path) -> Path | None:
    """--fresh: move checkpoints/ and metrics.jsonl out of the way (renames; nothing deleted)."""
    ckpts = run_dir / "checkpoints"
    if not ckpts.is_dir() or not any(ckpts.iterdir()):
        return None
    dest = Path(tempfile.mkdtemp(prefix=time.strftime("set-aside-%Y%m%d-%H%M%S-"), dir=run_dir))
    os.replace(ckpts, dest / "checkpoints")
    if (run_dir / "metrics.jsonl").is_file():
        os.replace(run_dir / "metrics.jsonl", dest / "metrics.jsonl")
    return dest


def execute(plan: plans.LaunchPlan) -> int:
    kind = "GPU" if plan.device == "cuda" else "CPU"
    print(f"mmtrain launch: {plan.mode}, {plan.nnodes} node(s) × {plan.nproc_per_node} {kind} "
          f"ranks = {plan.world}; run directory {plan.run_dir}; rank logs {plan.run_dir / 'logs'}",
          flush=True)
    if plan.mode == "torchrun":
        return run_torchrun(plan)
    if plan.mode == "hostfile":
        return run_hostfile(plan)
    return run_slurm(plan)


def run_torchrun(plan: plans.LaunchPlan) -> int:
    log_dir = plan.torchrun_log_dir(plan.node_rank)
    log_dir.mkdir(parents=True, exist_ok=True)
    outcome = run_child(plans.node_torchrun_argv(plan, plan.node_rank), child_env(plan.env_set))
    if outcome.returncode == 0 or outcome.signal:
        return finish(plan, outcome)
    failure = torchrun_failure(outcome, log_dir)
    restarts = max(0, failure.attempts - 1)
    head = (f"gave up after {restarts} restart{'s' if restarts != 1 else ''} "
            f"({failure.attempts} attempts, --max-restarts {plan.max_restarts})"
            if plan.max_restarts else "failed (no restarts: --max-restarts 0)")
    lines = [f"mmtrain launch: the job {head}"]
    if failure.rank:
        lines.append(f"  first failure: {failure.rank}, exit code {failure.exitcode}")
    lines.append(f"  last error: {failure.error or '(no Python error; see the rank logs)'}")
    if failure.log:
        lines.append(f"  its log: {failure.log}")
    return report_end(plan, lines, outcome.returncode)


def run_hostfile(plan: plans.LaunchPlan) -> int:
    """The DeepSpeed runner has no restarts of its own: rerun it, resuming, up to R times."""
    plan.launch_dir.mkdir(parents=True, exist_ok=True)
    env_json = plan.launch_dir / "env.json"
    fd = os.open(env_json, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.fchmod(fd, 0o600)  # it may hold tokens (HF_TOKEN, …)
    with os.fdopen(fd, "w") as f:
        json.dump(plans.hostfile_env(plan), f, indent=1, sort_keys=True)
    from launch.hostfile import runner_environment

    env = runner_environment(dict(os.environ),
                             disabled_env_file=str(plan.launch_dir / "no-deepspeed-env-file"))
    attempt_plan, outcome = plan, None
    for attempt in range(plan.max_restarts + 1):
        if attempt:
            print(f"mmtrain launch: restart {attempt}/{plan.max_restarts}: resuming from the "
                  "newest committed checkpoint", file=sys.stderr, flush=True)
            attempt_plan = dataclasses.replace(plan, rank_args=[])  # the newest, not --resume X
        outcome = run_child(plans.deepspeed_runner_argv(attempt_plan), env)
        if outcome.returncode == 0 or outcome.signal:
            return finish(plan, outcome)
    assert outcome is not None
    head = (f"gave up after {plan.max_restarts} restarts" if plan.max_restarts
            else "failed (no restarts: --max-restarts 0)")
    lines = [f"mmtrain launch: the job {head} ({describe_exit(outcome.returncode)})",
             f"  last error: {last_error(outcome.tail) or '(see the rank logs)'}",
             f"  rank logs: {plan.run_dir / 'logs'}"]
    return report_end(plan, lines, outcome.returncode)


def run_slurm(plan: plans.LaunchPlan) -> int:
    plan.launch_dir.mkdir(parents=True, exist_ok=True)
    (plan.run_dir / "logs").mkdir(parents=True, exist_ok=True)
    script = plan.launch_dir / "slurm.sbatch"
    script.write_text(plans.render_slurm_script(plan))
    script.chmod(0o755)
    if plan.slurm_where == "allocation":
        print(f"mmtrain launch: inside allocation {os.environ.get('SLURM_JOB_ID')}: running "
              f"{script}", flush=True)
        outcome = run_child(["bash", str(script)], dict(os.environ))
        if outcome.returncode == 0 or outcome.signal:
            return finish(plan, outcome)
        return report_end(plan, [f"mmtrain launch: the job's steps failed "
                                 f"({describe_exit(outcome.returncode)})",
                                 f"  last error: {last_error(outcome.tail) or '(see the logs)'}",
                                 f"  rank logs: {plan.run_dir / 'logs'}"], outcome.returncode)
    proc = subprocess.run(["sbatch", "--parsable", str(script)], capture_output=True, text=True)
    if proc.returncode:
        print(f"mmtrain launch: sbatch failed: {proc.stderr.strip()}", file=sys.stderr)
        return proc.returncode
    job = proc.stdout.strip().split(";")[0]
    logs = plan.run_dir / "logs"
    print(f"submitted job {job}: {script}\n  output: {logs}/slurm-{job}.out (+ .err)\n"
          f"  watch:  squeue -j {job}; stop (saves a checkpoint): scancel --signal=TERM {job}",
          flush=True)
    return 0


def finish(plan: plans.LaunchPlan, outcome: Outcome) -> int:
    if outcome.returncode == 0:
        print(f"mmtrain launch: done; newest checkpoint {newest_checkpoint(plan)}", flush=True)
        return 0
    assert outcome.signal is not None
    name = signal.Signals(outcome.signal).name
    report_end(plan, [f"mmtrain launch: stopped by {name}: the ranks were asked to save a "
                      f"checkpoint and exit ({describe_exit(outcome.returncode)} from the engine)"],
               outcome.returncode)
    return 128 + outcome.signal  # the shell's convention for "ended by this signal"


def report_end(plan: plans.LaunchPlan, lines: list[str], returncode: int) -> int:
    lines.append(f"  newest committed checkpoint: {newest_checkpoint(plan)} (the next launch "
                 "resumes from it)")
    print("\n".join(lines), file=sys.stderr, flush=True)
    return returncode if returncode > 0 else 1


def newest_checkpoint(plan: plans.LaunchPlan) -> str:
    from mmtrain.checkpoint import resume_candidates  # `latest`, then its ancestors

    found = resume_candidates(plan.run_dir / "checkpoints")
    return str(found[0]) if found else "none"


if __name__ == "__main__":  # same as `mmtrain launch` (the tests run it this way)
    from mmtrain.errors import exit_code

    sys.exit(exit_code("mmtrain launch", main, sys.argv[1:]))
