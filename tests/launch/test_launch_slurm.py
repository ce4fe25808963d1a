"""SLURM: submitting writes and submits the reviewed script; inside an allocation the plan comes
from its environment (nodes, GPUs), and inside an srun task it is this node's torchrun."""

from __future__ import annotations

import sys

import pytest

from launch.cli import main as launch_main
from launch.plan import node_torchrun_argv
from tests.launch.conftest import plan_for, tiny_args

CFG = ["train.name=job", "train.runs_dir=/shared/runs"]


def stub(bin_dir, name: str, body: str) -> None:
    bin_dir.mkdir(exist_ok=True)
    path = bin_dir / name
    path.write_text(f"#!{sys.executable}\nimport sys\n{body}\n")
    path.chmod(0o755)


def test_inside_an_allocation_its_nodes_and_gpus_are_used():
    plan = plan_for(["--slurm"], CFG, environ={"HOME": "/x", "SLURM_JOB_ID": "77",
                                               "SLURM_JOB_NUM_NODES": "2",
                                               "SLURM_GPUS_PER_NODE": "h100:4"})
    assert (plan.mode, plan.slurm_where, plan.nnodes, plan.nproc_per_node, plan.world) == (
        "slurm", "allocation", 2, 4, 8)
    assert plan.device == "cuda"


def test_inside_an_srun_task_it_is_this_nodes_torchrun(tmp_path, monkeypatch):
    stub(tmp_path / "bin", "scontrol", "print('nodeA'); print('nodeB'); print('nodeC')")
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}:/usr/bin:/bin")
    environ = {"HOME": "/x", "SLURM_JOB_ID": "77", "SLURM_STEP_ID": "0", "SLURM_PROCID": "2",
               "SLURM_NNODES": "3", "SLURM_NODEID": "2", "SLURM_JOB_NODELIST": "node[A-C]",
               "SLURM_NTASKS_PER_NODE": "1"}
    plan = plan_for(["--slurm", "--nproc-per-node", "8", "--max-restarts", "2"], CFG,
                    environ=environ)
    assert (plan.mode, plan.nnodes, plan.node_rank, plan.world) == ("torchrun", 3, 2, 24)
    argv = node_torchrun_argv(plan, plan.node_rank)
    assert argv[argv.index("--rdzv-endpoint") + 1] == "nodeA:20077"
    assert "is_host=0" in argv[argv.index("--rdzv-conf") + 1]
    with pytest.raises(ValueError, match="one `mmtrain launch` per node"):
        plan_for(["--slurm"], CFG, environ={**environ, "SLURM_NTASKS_PER_NODE": "8(x3)"})


def test_submit_writes_the_script_and_calls_sbatch(demo_corpus, tmp_path, monkeypatch, capsys):
    stub(tmp_path / "bin", "sbatch",
         f"open({str(tmp_path / 'sbatch.args')!r}, 'w').write(' '.join(sys.argv[1:]))\n"
         "print('31337;cluster')")
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}:/usr/bin:/bin")
    for name in ("SLURM_JOB_ID", "SLURM_STEP_ID", "SLURM_PROCID"):
        monkeypatch.delenv(name, raising=False)
    rc = launch_main([*tiny_args(demo_corpus, tmp_path / "runs", "sj"), "--slurm", "--nnodes", "2",
                      "--nproc-per-node", "2", "--time", "1:00:00", "--partition", "cpu"])
    out = capsys.readouterr().out
    assert rc == 0, out
    run = tmp_path / "runs" / "sj"
    script = run / "launch" / "slurm.sbatch"
    assert (tmp_path / "sbatch.args").read_text() == f"--parsable {script}"
    assert "submitted job 31337" in out and f"{run}/logs/slurm-31337.out" in out
    text = script.read_text()
    assert "#SBATCH --nodes=2" in text and "#SBATCH --partition=cpu" in text
    assert "--nnodes 2 --nproc-per-node 2" in text and (run / "config.json").is_file()


def test_inside_an_allocation_the_script_runs_here(demo_corpus, tmp_path, monkeypatch, capsys):
    calls = tmp_path / "srun.calls"
    stub(tmp_path / "bin", "srun",
         f"open({str(calls)!r}, 'a').write(' '.join(sys.argv[1:]) + '\\n')")
    stub(tmp_path / "bin", "scontrol", "print('nodeA'); print('nodeB')")
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}:/usr/bin:/bin")
    for name, value in {"SLURM_JOB_ID": "77", "SLURM_JOB_NUM_NODES": "2",
                        "SLURM_JOB_NODELIST": "node[A-B]", "SLURM_CPUS_ON_NODE": "4"}.items():
        monkeypatch.setenv(name, value)
    for name in ("SLURM_STEP_ID", "SLURM_PROCID", "SLURM_GPUS_ON_NODE", "SLURM_GPUS_PER_NODE"):
        monkeypatch.delenv(name, raising=False)
    rc = launch_main([*tiny_args(demo_corpus, tmp_path / "runs", "alloc"), "--slurm",
                      "--nproc-per-node", "2"])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "inside allocation 77" in out
    preflight, torchrun = calls.read_text().splitlines()
    assert "launch.preflight --node-check --gpus 0 --rdzv-host nodeA --port 20077" in preflight
    assert ("--nnodes 2 --nproc-per-node 2 --rdzv-backend c10d --rdzv-endpoint nodeA:20077"
            in torchrun)


def test_a_save_before_the_time_limit_requeues_the_job(demo_corpus, tmp_path, monkeypatch,
                                                       capfd):
    """The ranks leave RUN/requeue.json after a SIGUSR1 save (mmtrain.requeue); the script then
    runs `scontrol requeue` for its own job and ends 0. Here srun plays the ranks."""
    run = tmp_path / "runs" / "rq"
    calls = tmp_path / "scontrol.calls"
    stub(tmp_path / "bin", "srun",
         "if 'launch.elastic_run' in sys.argv:\n"
         f"    open({str(run / 'requeue.json')!r}, 'w').write('{{}}')\n"
         "    sys.exit(1)  # torchrun ends non-zero after forwarding the signal")
    stub(tmp_path / "bin", "scontrol",
         f"if sys.argv[1] == 'requeue': open({str(calls)!r}, 'a').write(' '.join(sys.argv[1:]))\n"
         "else: print('nodeA')")
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}:/usr/bin:/bin")
    for name, value in {"SLURM_JOB_ID": "77", "SLURM_JOB_NUM_NODES": "1",
                        "SLURM_JOB_NODELIST": "nodeA"}.items():
        monkeypatch.setenv(name, value)
    for name in ("SLURM_STEP_ID", "SLURM_PROCID", "SLURM_GPUS_ON_NODE", "SLURM_GPUS_PER_NODE"):
        monkeypatch.delenv(name, raising=False)
    (run).mkdir(parents=True)
    (run / "requeue.json").write_text("{}")  # a stale marker from an earlier run is removed first
    calls.write_text("")
    args = [*tiny_args(demo_corpus, tmp_path / "runs", "rq"), "--slurm", "--nproc-per-node", "2"]
    assert launch_main(args) == 0, capfd.readouterr()
    assert calls.read_text() == "requeue 77"
    assert "requeueing job 77" in capfd.readouterr().out
    # without the marker (a finished run, or a SIGTERM stop) the job is not requeued
    stub(tmp_path / "bin", "srun", "pass")
    calls.write_text("")
    assert launch_main(args) == 0 and calls.read_text() == ""


def test_cuda_jobs_request_their_gpus_and_cpus():
    cfg = [*CFG, "launch.device=cuda", "launch.nproc=4", "data.num_workers=3"]
    plan = plan_for(["--slurm", "--nnodes", "2"], cfg)
    job = plan.slurm_job
    assert (plan.device, job.gpus_per_node, job.nproc_per_node, plan.world) == ("cuda", 4, 4, 8)
    assert job.cpus_per_task == 4 * (2 + 3)  # per rank: 2 threads + one per decode worker
    assert any("requests 4 GPUs per node" in w for w in plan.warnings)
    assert plan_for(["--slurm", "--nproc-per-node", "2"], cfg).slurm_job.gpus_per_node == 2
    assert plan_for(["--slurm", "--cpus-per-task", "64"], cfg).slurm_job.cpus_per_task == 64
    auto = plan_for(["--slurm"], CFG)  # no GPUs asked for: a CPU job, and it says so
    assert auto.device == "cpu" and auto.slurm_job.gpus_per_node == 0
    assert any("a CPU job (gloo)" in w for w in auto.warnings)
    with pytest.raises(ValueError, match="launch.device=cpu with 8 GPUs per node"):
        plan_for(["--slurm", "--gpus-per-node", "8"], [*CFG, "launch.device=cpu"])
    with pytest.raises(ValueError, match="--nproc-per-node 8 exceeds --gpus-per-node 4"):
        plan_for(["--slurm", "--gpus-per-node", "4", "--nproc-per-node", "8"], cfg)


def test_only_rank_0_and_only_sigusr1_ask_for_a_requeue(tmp_path):
    import json
    import signal

    from mmtrain.requeue import after_preemption_save

    assert after_preemption_save(tmp_path, rank=0, signum=signal.SIGTERM, step=5) is None
    assert after_preemption_save(tmp_path, rank=1, signum=signal.SIGUSR1, step=5) is None
    assert not list(tmp_path.iterdir())
    path = after_preemption_save(tmp_path, rank=0, signum=signal.SIGUSR1, step=5)
    assert path == tmp_path / "requeue.json" and json.loads(path.read_text())["step"] == 5


@pytest.mark.parametrize("environ, restart", [
    ({}, False),
    ({"TORCHELASTIC_RESTART_COUNT": "0", "MMTRAIN_ATTEMPT": "0"}, False),
    ({"TORCHELASTIC_RESTART_COUNT": "0", "MMTRAIN_ATTEMPT": "1"}, True),  # another node failed
    ({"TORCHELASTIC_RESTART_COUNT": "2"}, True),  # plain torchrun (`mmtrain train`)
    ({"SLURM_RESTART_COUNT": "1", "MMTRAIN_ATTEMPT": "0"}, True),  # a requeued SLURM job
])
def test_resume_and_fresh_apply_to_the_first_start_only(environ, restart):
    from mmtrain.requeue import is_restart

    assert is_restart(environ) is restart
