"""No environment value, host name or path can run a shell command through what the launcher
renders. Each generated line or script is executed by bash with harmless stubs in place of python,
srun, scontrol, pdsh and ssh: the marker files that `$(…)`, backticks or `;` would create must not
appear, and the stubs must receive the hostile values literally."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from launch.hostfile import node_commands
from launch.local import free_port
from launch.plan import node_torchrun_argv, render_slurm_script
from launch.safety import shell_line
from tests.conftest import REPO, cli_env
from tests.launch.conftest import plan_for, tiny_args

STUB = """#!{python}
import json, os, sys
with open(os.environ["STUB_LOG"], "a") as f:
    f.write(json.dumps({{"prog": os.path.basename(sys.argv[0]), "argv": sys.argv[1:],
                        "env": {{k: v for k, v in os.environ.items() if k.startswith("NCCL_")}}}})
            + "\\n")
{extra}
"""


def evil_values(marks: Path) -> dict[str, str]:
    return {"NCCL_EVIL_SUBST": f"$(touch {marks}/subst)",
            "NCCL_EVIL_TICKS": f"`touch {marks}/ticks`",
            "NCCL_EVIL_SEMI": f"eth0; touch {marks}/semi",
            "NCCL_EVIL_QUOTES": f"a'b\"c $(touch {marks}/q)",
            "NCCL_EVIL_NEWLINE": f"eth0\ntouch {marks}/newline"}


@pytest.fixture
def stubs(tmp_path):
    """A bin/ directory of recording stubs; returns (bin dir, log reader)."""
    bin_dir, log = tmp_path / "bin", tmp_path / "stub.log"
    bin_dir.mkdir()
    for name, extra in [("python", ""), ("srun", ""), ("pdsh", ""), ("ssh", ""),
                        ("scontrol", "print('nodeA'); print('nodeB')")]:
        path = bin_dir / name
        path.write_text(STUB.format(python=sys.executable, extra=extra))
        path.chmod(0o755)

    def calls(prog: str) -> list[dict]:
        if not log.is_file():
            return []
        return [c for c in map(json.loads, log.read_text().splitlines()) if c["prog"] == prog]

    return bin_dir, log, calls


def run_bash(args: list[str], *, cwd: Path, bin_dir: Path, log: Path, **env: str) -> None:
    base = {"PATH": f"{bin_dir}:/usr/bin:/bin", "STUB_LOG": str(log), "HOME": str(cwd), **env}
    subprocess.run(["bash", *args], cwd=cwd, env=base, check=True, timeout=60)


def assert_no_marks(marks: Path) -> None:
    assert sorted(p.name for p in marks.iterdir()) == [], "a hostile value was executed"


def test_torchrun_lines_keep_hostile_values_literal(tmp_path, stubs):
    bin_dir, log, calls = stubs
    marks = tmp_path / "marks"
    marks.mkdir()
    evil = evil_values(marks)
    flags = [w for k, v in evil.items() for w in ("--env", f"{k}={v}")]
    plan = plan_for(["--nnodes", "2", "--node-rank", "0", "--rdzv-endpoint", "127.0.0.1:29500",
                     *flags], [f"train.runs_dir={tmp_path}/runs", "train.name=run;touch semi2"],
                    python=str(bin_dir / "python"), cwd=str(tmp_path))
    for node in range(2):
        run_bash(["-c", shell_line(node_torchrun_argv(plan, node), env=plan.env_set)],
                 cwd=marks, bin_dir=bin_dir, log=log)
    assert_no_marks(marks)
    runs = calls("python")
    assert len(runs) == 2
    for call in runs:
        assert {k: call["env"][k] for k in evil} == evil
        assert call["argv"][-2:] == ["--config-json",
                                     f"{tmp_path}/runs/run;touch semi2/config.json"]


def test_slurm_script_keeps_hostile_values_literal(tmp_path, stubs):
    bin_dir, log, calls = stubs
    marks = tmp_path / "marks"
    marks.mkdir()
    evil = evil_values(marks)
    plan = plan_for(["--slurm", "--nnodes", "2", "--nproc-per-node", "2", "--max-restarts", "1"],
                    [f"train.runs_dir={tmp_path}/runs", "train.name=job1"],
                    environ={"HOME": "/nonexistent", **evil}, python=str(bin_dir / "python"),
                    cwd=str(tmp_path))
    script = tmp_path / "job.sbatch"
    script.write_text(render_slurm_script(plan))
    run_bash([str(script)], cwd=marks, bin_dir=bin_dir, log=log, SLURM_JOB_ID="4242",
             SLURM_JOB_NODELIST="node[A-B]", SLURM_CPUS_ON_NODE="4")
    assert_no_marks(marks)
    steps = calls("srun")
    assert len(steps) == 2  # the per-node preflight, then torchrun
    for step in steps:
        assert {k: step["env"][k] for k in evil} == evil
    torchrun = steps[1]["argv"]
    assert "--rdzv-endpoint" in torchrun and torchrun[torchrun.index("--rdzv-endpoint") + 1] == \
        "nodeA:24242"
    assert torchrun[torchrun.index("--rdzv-id") + 1] == "4242"
    assert steps[0]["argv"][-4:] == ["--rdzv-host", "nodeA", "--port", "24242"]


@pytest.mark.parametrize("argv, overrides, message", [
    (["--slurm", "--partition", "gpu\ntouch x"], [],
     "--partition 'gpu\\ntouch x' must be one plain word"),
    (["--slurm", "--account", "a;b"], [], "must be one plain word"),
    (["--slurm", "--time", "1:00;x"], [], "--time"),
    (["--slurm"], ["train.name=run;touch x"], "job name 'run;touch x' must be one plain word"),
    (["--nnodes", "2", "--node-rank", "1", "--rdzv-endpoint", "node1;touch x:29500"], [],
     "is not a valid host name"),
    (["--nnodes", "2", "--node-rank", "1", "--master-addr", "$(touch x)"], [],
     "is not a valid host name"),
    (["--local-addr", "a b"], [], "is not a valid host name"),
    (["--env", "A B=1"], [], "must look like NAME=VALUE"),
])
def test_hostile_names_are_refused(argv, overrides, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        plan_for(argv, overrides)


def test_hostfile_mode_refuses_paths_deepspeed_would_not_quote(tmp_path):
    hostfile = tmp_path / "hosts"
    hostfile.write_text("node0 slots=2\n")
    with pytest.raises(ValueError, match="working directory '/shared/my work'"):
        plan_for(["--hostfile", str(hostfile)], [], cwd="/shared/my work")
    with pytest.raises(ValueError, match="rank argument"):
        plan_for(["--hostfile", str(hostfile), "--resume", "/ckpt/$(x)"], [])


@pytest.mark.slow
def test_hostfile_through_the_real_deepspeed_runner(demo_corpus, tmp_path, stubs):
    """DeepSpeed's runner builds the per-node shell command; pdsh (a stub) hands it over. Hostile
    values in the launcher's environment reach env.json, never that command."""
    bin_dir, log, calls = stubs
    marks = tmp_path / "marks"
    marks.mkdir()
    evil = evil_values(marks)
    hostfile = tmp_path / "hosts"
    hostfile.write_text("localhost slots=1\n127.0.0.1 slots=1\n")
    env = {**cli_env(), **evil, "PATH": f"{bin_dir}:{cli_env()['PATH']}", "STUB_LOG": str(log),
           "MLFLOW_EVIL": f"$(touch {marks}/mlflow)"}
    proc = subprocess.run([sys.executable, "-m", "launch.cli",
                           *tiny_args(demo_corpus, tmp_path / "runs", "hf", "train.steps=2"),
                           "--hostfile", str(hostfile), "--master-port", str(free_port())],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (pdsh,) = calls("pdsh")
    assert pdsh["argv"][:5] == ["-S", "-f", "1024", "-w", "localhost,127.0.0.1"]
    remote = " ".join(pdsh["argv"][5:])  # what ssh runs on every node
    for value in evil.values():
        assert value not in remote and "touch" not in remote
    run_dir = tmp_path / "runs" / "hf"
    plan_env = json.loads((run_dir / "launch" / "env.json").read_text())
    assert {k: plan_env[k] for k in evil} == evil  # carried, literally, in the file

    # What we print for the dry run is what DeepSpeed really runs on each node.
    ours = node_commands(python=sys.executable, cwd=str(REPO),
                         active={"localhost": [0], "127.0.0.1": [0]}, master_addr="localhost",
                         master_port=int(remote.split("--master_port=")[1].split()[0]),
                         rank_log_dir=str(run_dir / "logs" / "deepspeed"),
                         rank_argv=pdsh["argv"][pdsh["argv"].index("launch.rank_env"):])
    assert remote.replace("%n", "1").split() == ours[1][1].split()

    # Run that command as ssh would (python replaced by a recording stub): nothing executes.
    run_bash(["-c", remote.replace("%n", "0").replace(sys.executable, str(bin_dir / "python"))],
             cwd=marks, bin_dir=bin_dir, log=log)
    assert_no_marks(marks)
    (rank_launcher,) = calls("python")
    assert rank_launcher["argv"][:3] == ["-u", "-m", "deepspeed.launcher.launch"]
