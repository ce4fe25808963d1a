"""The command lines of a 4-node × 8-GPU job, per mode, match reviewed golden files, and the
engines' own argument parsers read them as intended (DeepSpeed's runner, torchrun)."""

from __future__ import annotations

import subprocess

import pytest

from launch.plan import deepspeed_runner_argv, describe, node_torchrun_argv, render_slurm_script
from tests.launch.conftest import plan_for

ENV = {"HOME": "/nonexistent", "TERM": "xterm", "NCCL_DEBUG": "WARN", "NCCL_SOCKET_IFNAME": "ib0",
       "NCCL_IB_HCA": "mlx5", "CUDA_VISIBLE_DEVICES": "0,1", "PYTHONPATH": "/shared/mmtrain"}
CFG = ["train.name=fusion-7b", "train.runs_dir=/shared/runs", "data.train=/shared/data/train",
       "data.val=/shared/data/val", "launch.device=cuda"]


def test_slurm_script_4x8(golden):
    plan = plan_for(["--slurm", "--nnodes", "4", "--gpus-per-node", "8", "--time", "2-00:00:00",
                     "--partition", "gpu", "--account", "proj42", "--cpus-per-task", "96",
                     "--max-restarts", "3"], CFG, environ=ENV)
    script = render_slurm_script(plan)
    golden("slurm_4x8.sbatch", script)
    assert plan.world == 32
    subprocess.run(["bash", "-n"], input=script, text=True, check=True)  # parses as bash


def test_hostfile_command_4x8(golden, tmp_path):
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("# 4 nodes x 8 GPUs\n" + "".join(f"node{i} slots=8\n" for i in range(4)))
    plan = plan_for(["--hostfile", str(hostfile), "--max-restarts", "2"],
                    CFG + ["launch.threads_per_rank=12"], environ=ENV)
    golden("hostfile_4x8.txt", describe(plan).replace(str(hostfile), "/shared/hostfile"))
    assert plan.world == 32 and plan.master_addr == "node0"

    from deepspeed.launcher.runner import parse_args  # the runner reads our command as meant

    argv = deepspeed_runner_argv(plan)
    assert argv[1:4] == ["-u", "-m", "deepspeed.launcher.runner"]
    ds = parse_args(argv[4:])
    assert (ds.hostfile, ds.master_addr, ds.master_port) == (str(hostfile), "node0", 29500)
    assert ds.no_local_rank and ds.module and ds.launcher == "pdsh"
    assert ds.user_script == "launch.rank_env"
    assert ds.user_args == ["--env-json", "/shared/runs/fusion-7b/launch/env.json", "--run-module",
                            "mmtrain.train", "--config-json", "/shared/runs/fusion-7b/config.json"]


def test_hostfile_include_exclude_reach_deepspeed(tmp_path):
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("".join(f"node{i} slots=8\n" for i in range(4)))
    plan = plan_for(["--hostfile", str(hostfile), "--exclude", "node3@node2:0,1"], CFG, environ=ENV)
    assert list(plan.hosts) == ["node0", "node1", "node2"] and plan.world == 22
    argv = deepspeed_runner_argv(plan)
    assert argv[argv.index("--exclude") + 1] == "node3@node2:0,1" and plan.master_addr == "node0"


def test_torchrun_commands_4x8(golden):
    plan = plan_for(["--nnodes", "4", "--node-rank", "0", "--nproc-per-node", "8",
                     "--rdzv-endpoint", "node0:29500", "--max-restarts", "3"],
                    CFG + ["launch.threads_per_rank=12"], environ=ENV)
    golden("torchrun_4x8.txt", describe(plan))

    from torch.distributed.run import get_args_parser

    for node in range(4):
        argv = node_torchrun_argv(plan, node)
        assert argv[1:3] == ["-m", "launch.elastic_run"]  # torchrun, numbering attempts by start
        tr = get_args_parser().parse_args(argv[3:])
        assert (tr.nnodes, tr.nproc_per_node, tr.rdzv_backend, tr.rdzv_endpoint) == (
            "4", "8", "c10d", "node0:29500")
        assert tr.max_restarts == 3 and tr.module and tr.training_script == "mmtrain.train"
        assert f"is_host={int(node == 0)}" in tr.rdzv_conf


def test_elastic_node_range_reaches_torchrun():
    from torch.distributed.run import get_args_parser

    plan = plan_for(["--nnodes", "2:4", "--node-rank", "0", "--rdzv-endpoint", "node0:29500"], CFG)
    argv = node_torchrun_argv(plan, 0)
    tr = get_args_parser().parse_args(argv[3:])
    assert tr.nnodes == "2:4" and (plan.min_nodes, plan.nnodes, plan.world) == (2, 4, 8)
    assert plan.max_restarts == 3  # several nodes: restarts by default
    assert "last_call_timeout" not in tr.rdzv_conf  # torchrun's default unless given
    plan = plan_for(["--nnodes", "2:4", "--node-rank", "0", "--rdzv-endpoint", "node0:29500",
                     "--rdzv-last-call", "5"], CFG)
    tr = get_args_parser().parse_args(node_torchrun_argv(plan, 0)[3:])
    assert tr.rdzv_conf == "join_timeout=600,last_call_timeout=5,is_host=1"
    for argv, message in [
        (["--nnodes", "2:4", "--node-rank", "0", "--master-addr", "node0"], "needs the c10d"),
        (["--nnodes", "4:2", "--node-rank", "0", "--rdzv-endpoint", "node0:1"], "1 <= MIN <= MAX"),
        (["--nnodes", "two", "--node-rank", "0"], "must be a node count N, or MIN:MAX"),
        (["--slurm", "--nnodes", "2:4"], "MIN:MAX is for --rdzv-endpoint launches"),
        (["--rdzv-last-call", "5"], "applies to an elastic --nnodes MIN:MAX"),
    ]:
        with pytest.raises(ValueError, match=message):
            plan_for(argv, CFG)


def test_restarts_default_to_three_on_several_nodes_only(tmp_path):
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("node0 slots=8\nnode1 slots=8\n")
    assert plan_for(["--hostfile", str(hostfile)], CFG).max_restarts == 3
    assert plan_for(["--hostfile", str(hostfile), "--include", "node0"], CFG).max_restarts == 0
    one = plan_for([], CFG)
    two = plan_for(["--nnodes", "2", "--node-rank", "1", "--rdzv-endpoint", "node0:29500"], CFG)
    static = plan_for(["--nnodes", "2", "--node-rank", "1", "--master-addr", "node0"], CFG)
    mine = plan_for(["--nnodes", "2", "--node-rank", "1", "--rdzv-endpoint", "node0:29500",
                     "--max-restarts", "0"], CFG)
    assert (one.max_restarts, two.max_restarts, static.max_restarts, mine.max_restarts) == (
        0, 3, 0, 0)  # static rendezvous cannot restart across nodes


def test_flight_recorder_for_gpu_ranks_unless_the_user_set_it():
    gpu = plan_for([], CFG, environ={"HOME": "/x", "TORCH_FR_BUFFER_SIZE": "100"})
    assert gpu.env_set["TORCH_NCCL_DUMP_ON_TIMEOUT"] == "1"
    assert gpu.env_set["TORCH_NCCL_DEBUG_INFO_TEMP_FILE"] == \
        "/shared/runs/fusion-7b/logs/nccl_trace_rank_"
    assert "TORCH_NCCL_TRACE_BUFFER_SIZE" not in gpu.env_set  # the user's (other) name wins
    cpu = plan_for([], [*CFG[:-1], "launch.device=cpu"])
    assert not [k for k in cpu.env_set if "NCCL" in k]
