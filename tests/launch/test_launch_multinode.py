"""`mmtrain launch` end to end on CPU (gloo): two "nodes" on this machine, a killed rank under
--max-restarts, a crash loop, SIGTERM. Every run trains the tiny model on the demo corpus for the
same 6 steps with a checkpoint after each, so losses can be compared bit for bit (CPU, same world
size, one thread per rank)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from launch.local import free_port
from mmtrain.checkpoint import committed_steps, verify
from tests.conftest import REPO, cli_env
from tests.launch.conftest import cmdline, descendants, losses, tiny_args

pytestmark = pytest.mark.slow
STEPS = 6
RUN = (f"train.steps={STEPS}", "train.ckpt_every=1")


def env() -> dict[str, str]:
    e = cli_env()
    e.pop("TRITON_INTERPRET", None)  # set by the kernel tests' conftest; would hide the crash below
    return e


def start(corpus: Path, runs: Path, name: str, *flags: str, overrides=RUN) -> subprocess.Popen:
    argv = [sys.executable, "-m", "launch.cli", *tiny_args(corpus, runs, name, *overrides), *flags]
    return subprocess.Popen(argv, cwd=REPO, env=env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def finish(proc: subprocess.Popen, expect: int = 0, timeout: float = 300) -> tuple[str, str]:
    out, err = proc.communicate(timeout=timeout)
    assert proc.returncode == expect, f"exit {proc.returncode}\n{out[-3000:]}\n{err[-5000:]}"
    return out, err


def rank_pids(launcher: int) -> list[int]:
    return [p for p in descendants(launcher)  # the ranks, not torchrun's agent (launch.elastic_run)
            if "mmtrain.train" in cmdline(p) and "launch.elastic_run" not in cmdline(p)]


@pytest.fixture(scope="module")
def baseline(demo_corpus, tmp_path_factory) -> Path:
    """One node, two ranks, no interruption: the reference losses."""
    runs = tmp_path_factory.mktemp("runs")
    out, _ = finish(start(demo_corpus, runs, "one-node", "--nproc-per-node", "2"))
    run = runs / "one-node"
    assert sorted(losses(run)) == list(range(1, STEPS + 1)) and "mmtrain launch: done" in out
    # Per-rank logs: the rank's own log, and torchrun's stdout/stderr of every rank.
    assert (run / "logs" / "rank_0.log").is_file() and (run / "logs" / "rank_1.log").is_file()
    (attempt,) = (run / "logs" / "torchrun" / "node0").glob("*/attempt_0")
    assert (attempt / "0" / "stdout.log").is_file() and (attempt / "1" / "stderr.log").is_file()
    return run


def test_two_nodes_train_like_one(demo_corpus, baseline, tmp_path):
    port = free_port()
    common = ("--nnodes", "2", "--nproc-per-node", "1", "--rdzv-endpoint", f"127.0.0.1:{port}")
    node1 = start(demo_corpus, tmp_path, "two-nodes", *common, "--node-rank", "1")  # waits for 0
    time.sleep(1)
    node0 = start(demo_corpus, tmp_path, "two-nodes", *common, "--node-rank", "0")
    finish(node0)
    finish(node1)
    assert losses(tmp_path / "two-nodes") == losses(baseline)


def test_killed_rank_restarts_and_resumes(demo_corpus, baseline, tmp_path):
    proc = start(demo_corpus, tmp_path, "killed", "--nproc-per-node", "2", "--max-restarts", "2",
                 "--monitor-interval", "0.5")
    latest = tmp_path / "killed" / "checkpoints" / "latest"
    deadline = time.monotonic() + 240
    while not (latest.is_file() and latest.read_text().strip() >= "step_00000002"):
        assert proc.poll() is None and time.monotonic() < deadline, "no checkpoint was committed"
        time.sleep(0.02)
    ranks = rank_pids(proc.pid)
    assert len(ranks) == 2, "training ended before the kill"
    os.kill(ranks[-1], signal.SIGKILL)
    finish(proc)

    run = tmp_path / "killed"
    attempts = sorted(p.name for p in (run / "logs" / "torchrun" / "node0").glob("*/attempt_*"))
    assert attempts == ["attempt_0", "attempt_1"], "the job did not restart"
    resumed = [line for line in (run / "logs" / "rank_0.log").read_text().splitlines()
               if "resumed from" in line]
    assert len(resumed) == 1, resumed
    step = int(resumed[0].rsplit("at step", 1)[1])
    assert 2 <= step < STEPS
    got, want = losses(run), losses(baseline)
    assert sorted(got) == list(range(1, STEPS + 1))
    for s in range(step + 1, STEPS + 1):  # computed after the resume
        assert got[s] == want[s], f"step {s}: {got[s]!r} != {want[s]!r}"


def test_crash_loop_gives_up_with_the_last_error(demo_corpus, baseline, tmp_path):
    """A failure that repeats on every attempt (here: Triton kernels forced on CPU, which only the
    ranks find out) ends after --max-restarts restarts, names the error, damages no checkpoint."""
    ckpts = tmp_path / "crash" / "checkpoints"
    shutil.copytree(baseline / "checkpoints", ckpts)
    before = {p.name: sorted(f.name for f in p.rglob("*")) for p in committed_steps(ckpts)}
    latest = (ckpts / "latest").read_text()
    proc = start(demo_corpus, tmp_path, "crash", "--nproc-per-node", "2", "--max-restarts", "1",
                 "--monitor-interval", "0.5",
                 overrides=(f"train.steps={STEPS + 2}", "train.ckpt_every=1",
                            "model.kernels=triton"))
    _, err = finish(proc, expect=1)
    assert "the job gave up after 1 restart (2 attempts, --max-restarts 1)" in err
    assert "last error: ValueError: kernel backend 'triton' was forced for tensors on cpu" in err
    assert f"newest committed checkpoint: {ckpts / latest.strip()}" in err
    assert {p.name: sorted(f.name for f in p.rglob("*")) for p in committed_steps(ckpts)} == before
    for ckpt in committed_steps(ckpts):
        verify(ckpt)
    assert (ckpts / "latest").read_text() == latest


def test_sigusr1_reaches_the_ranks_which_save_and_ask_for_a_requeue(demo_corpus, tmp_path):
    """SIGUSR1 (SLURM's warning before the time limit; SIGTERM takes the same path without the
    marker) to `mmtrain launch`: every rank saves and exits; rank 0 leaves RUN/requeue.json."""
    proc = start(demo_corpus, tmp_path, "stopped", "--nproc-per-node", "2",
                 overrides=("train.steps=500", "train.ckpt_every=0"))
    metrics = tmp_path / "stopped" / "metrics.jsonl"
    deadline = time.monotonic() + 240
    while not (metrics.is_file() and metrics.read_text().count("\n") >= 2):
        assert proc.poll() is None and time.monotonic() < deadline, "training did not start"
        time.sleep(0.05)
    ranks = rank_pids(proc.pid)
    proc.send_signal(signal.SIGUSR1)
    _, err = finish(proc, expect=128 + signal.SIGUSR1, timeout=120)
    assert "stopped by SIGUSR1" in err
    assert not [p for p in ranks if Path(f"/proc/{p}").exists()], "a rank outlived the launcher"
    (ckpt,) = committed_steps(tmp_path / "stopped" / "checkpoints")[:1]
    verify(ckpt)
    step = int(ckpt.name.split("_")[1])
    assert 2 <= step < 500
    marker = json.loads((tmp_path / "stopped" / "requeue.json").read_text())
    assert (marker["step"], marker["signal"]) == (step, "SIGUSR1")


def test_world_size_changes_through_launch(demo_corpus, tmp_path):
    """2 ranks → 1 → 2 (a node lost, then back): each launch resumes the previous one's checkpoint,
    converted by the ranks; preflight says so instead of refusing."""
    run, seen = tmp_path / "elastic", []
    for nproc, resumed_at in ((2, None), (1, 2), (2, 4)):
        proc = start(demo_corpus, tmp_path, "elastic", "--nproc-per-node", str(nproc),
                     overrides=(f"train.steps={STEPS}", "train.stop_after=2", "train.ckpt_every=2"))
        _, err = finish(proc)
        if resumed_at:
            assert (f"step_{resumed_at:08d} (committed" in err and
                    f"saved by {3 - nproc} ranks and this launch has {nproc}" in err), err
        log = (run / "logs" / "rank_0.log").read_text()
        seen.append([line.rsplit("at step", 1)[1].strip() for line in log.splitlines()
                     if "resumed from" in line])
    assert seen == [[], ["2"], ["2", "4"]]
    got = losses(run)
    assert sorted(got) == list(range(1, STEPS + 1)) and all(0 < v < 20 for v in got.values()), got


def rank_of(pid: int) -> int:
    env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    return int(next(v for v in env if v.startswith(b"RANK=")).split(b"=", 1)[1])


def test_a_stopped_rank_leaves_the_others_stacks_then_the_job_resumes(demo_corpus, baseline,
                                                                      tmp_path):
    """SIGSTOP one rank: the other rank's watchdog writes its stacks to RUN/logs/ (within
    train.hang_dump_minutes), its collective times out (engine.timeout_minutes), and torchrun
    restarts the job, which resumes and matches the uninterrupted run."""
    proc = start(demo_corpus, tmp_path, "hang", "--nproc-per-node", "2", "--max-restarts", "1",
                 "--monitor-interval", "0.5", "--shutdown-timeout", "2",
                 overrides=(*RUN, "train.hang_dump_minutes=0.07", "engine.timeout_minutes=0.25"))
    run = tmp_path / "hang"
    latest = run / "checkpoints" / "latest"
    deadline, stopped = time.monotonic() + 240, None
    try:
        while not (latest.is_file() and latest.read_text().strip() >= "step_00000002"):
            assert proc.poll() is None and time.monotonic() < deadline, "no checkpoint committed"
            time.sleep(0.02)
        stopped = next(p for p in rank_pids(proc.pid) if rank_of(p) == 1)
        stopped_at = time.time()
        os.kill(stopped, signal.SIGSTOP)
        finish(proc)
    finally:
        if stopped is not None and Path(f"/proc/{stopped}").exists():
            os.kill(stopped, signal.SIGKILL)
        if proc.poll() is None:
            proc.kill()
    (attempt_1,) = (run / "logs" / "torchrun" / "node0").glob("*/attempt_1")
    dumps = [p for p in (run / "logs").glob("stacks_rank_0_2*.txt")
             if p.stat().st_mtime >= stopped_at]
    assert dumps, "rank 0 wrote no stacks while rank 1 was stopped"
    assert min(p.stat().st_mtime for p in dumps) < attempt_1.stat().st_mtime, \
        "the stacks came after the restart"
    text = dumps[0].read_text()
    # rank 0's main thread waits in a collective (all_reduce of a step, or a checkpoint barrier)
    assert "no step completed for" in text and "torch/distributed/distributed_c10d.py" in text, text
    got, want = losses(run), losses(baseline)
    assert sorted(got) == list(range(1, STEPS + 1))
    resumed = [line for line in (run / "logs" / "rank_0.log").read_text().splitlines()
               if "resumed from" in line]
    step = int(resumed[-1].rsplit("at step", 1)[1])
    for s in range(step + 1, STEPS + 1):
        assert got[s] == want[s], f"step {s}: {got[s]!r} != {want[s]!r}"


def two_nodes_past_step_2(demo_corpus, tmp_path, name, nnodes, *extra):
    """Start 2 loopback nodes × 1 rank (node 1 first: it waits for node 0) and wait until the run
    has committed step 2; returns (node0, node1, run directory)."""
    port = free_port()
    common = ("--nnodes", nnodes, "--nproc-per-node", "1", "--rdzv-endpoint", f"127.0.0.1:{port}",
              "--monitor-interval", "0.5", *extra)
    node1 = start(demo_corpus, tmp_path, name, *common, "--node-rank", "1")
    time.sleep(1)
    node0 = start(demo_corpus, tmp_path, name, *common, "--node-rank", "0")
    run = tmp_path / name
    latest = run / "checkpoints" / "latest"
    deadline = time.monotonic() + 240
    while not (latest.is_file() and latest.read_text().strip() >= "step_00000002"):
        assert node0.poll() is None and node1.poll() is None and time.monotonic() < deadline, \
            "no checkpoint was committed"
        time.sleep(0.02)
    return node0, node1, run


def test_a_rank_killed_on_one_node_restarts_both_nodes(demo_corpus, baseline, tmp_path):
    """2 nodes × 1 rank on loopback (--max-restarts defaults to 3 on several nodes): kill node 1's
    rank; both nodes restart, resume, and train like the uninterrupted run. Every start of the
    ranks keeps its own log folder on both nodes (node 0's first traceback is not overwritten)."""
    node0, node1, run = two_nodes_past_step_2(demo_corpus, tmp_path, "xnode", "2")
    (victim,) = rank_pids(node1.pid)
    os.kill(victim, signal.SIGKILL)
    finish(node0)
    finish(node1)

    for node in ("node0", "node1"):
        attempts = sorted((run / "logs" / "torchrun" / node).glob("*/attempt_*"))
        assert [p.name for p in attempts] == ["attempt_0", "attempt_1"], (node, attempts)
        assert all((p / "0" / "stderr.log").is_file() for p in attempts)
    resumed = [line for line in (run / "logs" / "rank_0.log").read_text().splitlines()
               if "resumed from" in line]
    assert len(resumed) == 1, resumed
    step = int(resumed[0].rsplit("at step", 1)[1])
    got, want = losses(run), losses(baseline)
    assert 2 <= step < STEPS and sorted(got) == list(range(1, STEPS + 1))
    for s in range(step + 1, STEPS + 1):
        assert got[s] == want[s], f"step {s}: {got[s]!r} != {want[s]!r}"


def test_an_elastic_job_goes_on_without_a_lost_node(demo_corpus, tmp_path):
    """--nnodes 1:2 and node 1 lost for good (its launcher, agent and rank killed): node 0's job
    restarts alone, the ranks convert the 2-rank checkpoint to 1 rank, and the run finishes."""
    node0, node1, run = two_nodes_past_step_2(demo_corpus, tmp_path, "elastic", "1:2",
                                              "--rdzv-last-call", "10")
    for pid in [node1.pid, *descendants(node1.pid)]:
        os.kill(pid, signal.SIGKILL)
    node1.communicate()
    finish(node0)

    log = (run / "logs" / "rank_0.log").read_text()
    assert "resharding through a universal checkpoint" in log
    assert sorted(losses(run)) == list(range(1, STEPS + 1))
    final = json.loads((run / "checkpoints" / f"step_{STEPS:08d}" / "MANIFEST.json").read_text())
    assert final["world_size"] == 1
