"""The e2e stage: training through the command users run, measured from the run's own metrics.

For each planned run (Settings.e2e_runs): `python -m mmtrain train --config RECIPE --set ...` on one
device, with DeepSpeed, the recipe's precision (bf16 with fp32 master weights on GPU), ZeRO stage
and activation checkpointing, reading shards with images and audio that the stage builds first with
`python -m mmtrain data synth` (in OUT/e2e/data). Each run trains `first_steps` and checkpoints
(train.stop_after), then a second invocation resumes from that checkpoint and trains to
`total_steps`. The stage then reads RUN/metrics.jsonl: tokens_per_s, data_wait_pct, mfu (standard
6N + 12·L·d·S), mfu_executed (per-document attention) and ckpt_blocking_s (a key the run does not
log reads as "n/a" and is reported as missing), over the steady-state steps (the first
Settings.e2e_warmup_steps of each invocation are left out: autotuning, allocation, loader warm-up),
and sets
them beside the pure loop's tokens/s (the `train` stage) for the same preset.

A run that exits non-zero, does not resume, or stops short fails the stage; goals not met do not.
Checkpoints are deleted after each run (their size is recorded): a 1b ZeRO checkpoint with fp32
master weights and Adam moments is ~17 GB.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

from gpu_common import Deadline, E2ERun, Settings

REPO = Path(__file__).resolve().parent.parent
MIN_SECONDS_FOR_A_RUN = 90  # on GPU: two invocations' start-up alone take about this long
GOALS = {"vs_pure_loop": 0.9, "data_wait_pct": 2.0, "mfu": {"125m": 0.45, "1b": 0.55}}
METRIC_KEYS = ("tokens_per_s", "data_wait_pct", "mfu", "mfu_executed", "step_time", "memory_gb")


def _run(cmd: list[str], log_path: Path, timeout: float | None) -> int:
    """Run cmd in its own process group with output to log_path; on timeout the whole group
    (torchrun and its ranks) is stopped and 124 returned."""
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=REPO, start_new_session=True,
                                env={**os.environ, "PYTHONUNBUFFERED": "1"})
        try:
            return proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
            return 124


def build_data(s: Settings, data_dir: Path) -> dict:
    """Shards with text, images and audio, through `mmtrain data synth` (kept if already built)."""
    if (data_dir / "train" / "dataset.json").is_file():
        return {"data": str(data_dir), "built": "reused"}
    shards = 2 if s.dry_run else 16
    workers = 1 if s.dry_run else min(8, os.cpu_count() or 1)
    cmd = [sys.executable, "-m", "mmtrain", "data", "synth", str(data_dir), "--samples", str(s.e2e_synth_samples),
           "--shards", str(shards), "--workers", str(workers)]  # fmt: skip
    start = time.perf_counter()
    rc = _run(cmd, data_dir.parent / "synth.log", timeout=None if s.dry_run else 300)
    if rc != 0:
        raise RuntimeError(f"`{' '.join(cmd)}` exited {rc}; see {data_dir.parent / 'synth.log'}")
    return {"data": str(data_dir), "samples": s.e2e_synth_samples, "shards": shards,
            "seconds": round(time.perf_counter() - start, 1)}  # fmt: skip


def build_fused_adam(e2e_dir: Path, timeout: float) -> dict:
    """DeepSpeed JIT-compiles FusedAdam (the engine's optimizer on CUDA) on first use, unless it
    was prebuilt, and caches it in ~/.cache/torch_extensions: do that here, timed, so the first
    run's time is training, not compiling."""
    code = "from deepspeed.ops.op_builder import FusedAdamBuilder; FusedAdamBuilder().load()"
    start = time.perf_counter()
    rc = _run([sys.executable, "-c", code], e2e_dir / "fused_adam.log", timeout)
    out = {"fused_adam_load_s": round(time.perf_counter() - start, 1)}
    if rc != 0:
        out["failure"] = f"building DeepSpeed's FusedAdam exited {rc}; see {e2e_dir / 'fused_adam.log'}"
    return out


def train_command(run: E2ERun, s: Settings, e2e_dir: Path, *, first: bool) -> list[str]:
    sets = [*s.e2e_common, *run.overrides,
            f"data.train={e2e_dir / 'data' / 'train'}", f"data.val={e2e_dir / 'data' / 'val'}",
            f"train.runs_dir={e2e_dir / 'runs'}", f"train.name={run.name}", f"engine.zero_stage={run.zero_stage}",
            f"train.steps={run.total_steps}", f"train.ckpt_every={run.first_steps}"]  # fmt: skip
    if first:
        sets.append(f"train.stop_after={run.first_steps}")
    cmd = [sys.executable, "-m", "mmtrain", "train", "--config", str(REPO / run.config)]
    for item in sets:
        cmd += ["--set", item]
    return cmd + (["--fresh"] if first else [])


def read_metrics(path: Path, run: E2ERun, warmup: int) -> dict:
    """Steady-state figures from metrics.jsonl: medians over the steps outside each invocation's
    first `warmup` steps; keys the run did not log are "n/a" and listed under missing_keys."""
    lines = [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []
    train = [r for r in lines if r.get("split", "train") == "train"]
    warm = set(range(1, warmup + 1)) | set(range(run.first_steps + 1, run.first_steps + warmup + 1))
    steady = [r for r in train if r["step"] not in warm]
    out: dict = {"steps_logged": [r["step"] for r in train], "steady_steps": len(steady), "missing_keys": []}
    for key in METRIC_KEYS:
        values = [r[key] for r in steady if isinstance(r.get(key), (int, float))]
        if values:
            out[key] = statistics.median(values)
        else:
            out[key] = "n/a"
            out["missing_keys"].append(key)
    # checkpoint blocking time is logged on the steps that saved (or in their own lines)
    blocking = [r["ckpt_blocking_s"] for r in lines if isinstance(r.get("ckpt_blocking_s"), (int, float))]
    out["ckpt_blocking_s"] = max(blocking) if blocking else "n/a"  # the worst save
    out["ckpt_blocking_s_all"] = blocking
    if not blocking:
        out["missing_keys"].append("ckpt_blocking_s")
    return out


def goals_for(run: E2ERun, metrics: dict, pure_tokens_per_s: float | None) -> dict:
    """'met' / 'NOT met' / 'n/a (why)' per goal."""

    def verdict(value, ok) -> str:
        return "met" if ok(value) else "NOT met"

    out: dict = {}
    tps = metrics.get("tokens_per_s")
    if isinstance(tps, float | int) and pure_tokens_per_s:
        ratio = tps / pure_tokens_per_s
        out["vs_pure_loop"] = {"ratio": ratio, "goal": GOALS["vs_pure_loop"],
                               "verdict": verdict(ratio, lambda r: r >= GOALS["vs_pure_loop"])}
    else:
        out["vs_pure_loop"] = {"verdict": "n/a (no pure-loop figure for this preset: run the train stage)"
                               if not pure_tokens_per_s else "n/a (no tokens_per_s)"}
    wait = metrics.get("data_wait_pct")
    out["data_wait_pct"] = ({"value": wait, "goal": GOALS["data_wait_pct"],
                             "verdict": verdict(wait, lambda w: w <= GOALS["data_wait_pct"])}
                            if isinstance(wait, float | int) else {"verdict": "n/a (not logged)"})
    goal = GOALS["mfu"].get(run.preset)
    mfu = metrics.get("mfu")
    if goal is None:
        out["mfu"] = {"verdict": f"n/a (no goal for preset {run.preset})"}
    elif isinstance(mfu, float | int):
        out["mfu"] = {"value": mfu, "goal": goal, "verdict": verdict(mfu, lambda m: m >= goal)}
    else:
        out["mfu"] = {"verdict": "n/a (mfu not logged)"}
    return out


def _dir_gb(path: Path) -> float:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / 2**30 if path.exists() else 0.0


def train_and_resume(run: E2ERun, s: Settings, e2e_dir: Path, deadline: Deadline) -> dict:
    """Both invocations of one run; returns what happened, with "failure" set when it went wrong."""
    entry: dict = {"config": run.config, "zero_stage": run.zero_stage, "steps": [run.first_steps, run.total_steps]}
    run_dir = e2e_dir / "runs" / run.name
    for first in (True, False):
        label = "first" if first else "resume"
        cmd = train_command(run, s, e2e_dir, first=first)
        entry[f"{label}_command"] = " ".join(cmd)
        left = deadline.left()
        timeout = None if left is None else max(30.0, left + 30)
        start = time.perf_counter()
        rc = _run(cmd, e2e_dir / f"{run.name}.{label}.log", timeout)
        entry[f"{label}_seconds"] = round(time.perf_counter() - start, 1)
        if rc != 0:
            tail = (e2e_dir / f"{run.name}.{label}.log").read_text()[-2000:]
            entry["failure"] = f"{label} invocation exited {rc}" + (" (timed out)" if rc == 124 else "")
            entry["log_tail"] = tail
            shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)  # keep the disk free for the next run
            return entry
    log = (e2e_dir / f"{run.name}.resume.log").read_text()
    entry["resumed"] = "resumed from" in log and f"step_{run.first_steps:08d}" in log
    entry["checkpoint_gb"] = round(_dir_gb(run_dir / "checkpoints"), 2)
    entry["metrics"] = read_metrics(run_dir / "metrics.jsonl", run, s.e2e_warmup_steps)
    steps = entry["metrics"]["steps_logged"]
    if not entry["resumed"]:
        entry["failure"] = f"the second invocation did not resume from step {run.first_steps}"
    elif not steps or max(steps) != run.total_steps:
        entry["failure"] = f"metrics end at step {max(steps) if steps else None}, expected {run.total_steps}"
    shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)  # keep the disk free for the next run
    return entry


def stage_e2e(s: Settings, deadline: Deadline) -> dict:
    e2e_dir = (s.out_dir / "e2e").resolve()
    e2e_dir.mkdir(parents=True, exist_ok=True)
    result: dict = {"data": build_data(s, e2e_dir / "data"), "warmup_steps_left_out": s.e2e_warmup_steps,
                    "goals": GOALS, "runs": {}, "failures": []}  # fmt: skip
    if s.device.type == "cuda":
        result["optimizer_build"] = build_fused_adam(e2e_dir, timeout=max(60.0, deadline.left() or 600.0))
        if "failure" in result["optimizer_build"]:
            result["failures"].append(result["optimizer_build"]["failure"])
            return result
    pure_path = s.out_dir / "train.json"
    pure = json.loads(pure_path.read_text()).get("presets", {}) if pure_path.exists() else {}
    for run in s.e2e_runs:
        left = deadline.left()
        if left is not None and left < MIN_SECONDS_FOR_A_RUN:
            result["runs"][run.name] = {"skipped": f"stage time budget spent ({left:.0f} s left)"}
            continue
        print(f"  e2e {run.name}: {run.config}, ZeRO-{run.zero_stage}, {run.first_steps} steps + resume to "
              f"{run.total_steps}", flush=True)
        entry = train_and_resume(run, s, e2e_dir, deadline)
        result["runs"][run.name] = entry
        if "failure" in entry:
            result["failures"].append(f"{run.name}: {entry['failure']}")
            print(f"  e2e {run.name}: FAILED: {entry['failure']}", flush=True)
            continue
        other = result["runs"].get(run.compare_with or "", {}).get("metrics", {}).get("tokens_per_s")
        if run.compare_with:
            mine = entry["metrics"]["tokens_per_s"]
            entry["vs_" + run.compare_with] = (mine / other if isinstance(other, float | int) and isinstance(mine, float | int)
                                               else f"n/a ({run.compare_with} not measured in this run)")
        pure_tps = pure.get(run.preset, {}).get("tokens_per_s")
        entry["pure_loop_tokens_per_s"] = pure_tps if pure_tps else "n/a"
        entry["goals"] = goals_for(run, entry["metrics"], pure_tps)
        m = entry["metrics"]
        print(f"  e2e {run.name}: {_fmt(m['tokens_per_s'], ',.0f')} tokens/s, data wait "
              f"{_fmt(m['data_wait_pct'], '.2f')}%, MFU {_fmt(m['mfu'], '.1%')}, executed "
              f"{_fmt(m['mfu_executed'], '.1%')}, ckpt blocking {_fmt(m['ckpt_blocking_s'], '.2f')} s"
              + (f"; missing: {', '.join(m['missing_keys'])}" if m["missing_keys"] else ""), flush=True)
    return result


def _fmt(value, spec: str) -> str:
    return format(value, spec) if isinstance(value, float | int) else str(value)


def summary_lines(results: dict) -> list[str]:
    """Rows of summary.md for the e2e stage."""
    lines = []
    e2e = results.get("e2e", {})
    if "optimizer_build" in e2e:
        build = e2e["optimizer_build"]
        lines.append(f"| e2e: DeepSpeed FusedAdam load (JIT build unless cached) | {build['fused_adam_load_s']} s"
                     + (f"; {build['failure']}" if "failure" in build else "") + " |")
    for name, entry in e2e.get("runs", {}).items():
        if "metrics" not in entry or "failure" in entry:
            lines.append(f"| e2e {name} | {entry.get('failure', entry.get('skipped', 'failed'))} (see e2e.json) |")
            continue
        m, g = entry["metrics"], entry["goals"]
        pure = entry["pure_loop_tokens_per_s"]
        ratio = g["vs_pure_loop"]
        parts = [
            f"{_fmt(m['tokens_per_s'], ',.0f')} tokens/s vs pure loop {_fmt(pure, ',.0f')}"
            + (f" = {ratio['ratio']:.2f}x (goal >= {ratio['goal']}x: {ratio['verdict']})" if "ratio" in ratio
               else f" ({ratio['verdict']})"),
            f"data wait {_fmt(m['data_wait_pct'], '.2f')}% ({g['data_wait_pct']['verdict']}"
            + (f", goal <= {GOALS['data_wait_pct']}%)" if "goal" in g["data_wait_pct"] else ")"),
            f"MFU standard {_fmt(m['mfu'], '.1%')} ({g['mfu']['verdict']}"
            + (f", goal >= {g['mfu']['goal']:.0%})" if "goal" in g["mfu"] else ")"),
            f"MFU executed {_fmt(m['mfu_executed'], '.1%')}",
            f"checkpoint blocking (worst save) {_fmt(m['ckpt_blocking_s'], '.2f')} s",
        ]
        for key, value in entry.items():
            if key.startswith("vs_"):
                parts.append(f"tokens/s {key.replace('_', ' ', 1)}: {_fmt(value, '.2f')}" + ("x" if isinstance(value, float) else ""))
        if m["missing_keys"]:
            parts.append(f"not logged by the run: {', '.join(m['missing_keys'])}")
        lines.append(f"| e2e {name} (ZeRO-{entry['zero_stage']}, resumed at step {entry['steps'][0]}) | "
                     + "; ".join(parts) + " |")
    return lines
