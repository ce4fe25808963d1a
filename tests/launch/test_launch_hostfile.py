"""Hostfile parsing and --include/--exclude: strict, and the same selection as DeepSpeed's own."""

from __future__ import annotations

import json
import os
import re

import pytest

from launch.hostfile import filter_hosts, parse_hostfile, runner_environment, world_info_b64
from launch.rank_env import apply

POOL_TEXT = """# comment
worker-0 slots=4
worker-1 slots=4   # trailing comment

10.0.0.7 slots=2
"""


def test_parse_keeps_order_and_slots():
    assert list(parse_hostfile(POOL_TEXT).items()) == [("worker-0", 4), ("worker-1", 4),
                                                       ("10.0.0.7", 2)]


@pytest.mark.parametrize("text, message", [
    ("worker-0 slots=4\nworker-1\n", "line 2: expected 'HOST slots=N', got 'worker-1'"),
    ("worker-0 slots=four\n", "line 1: expected 'HOST slots=N'"),
    ("worker-0 slots=4\nworker-0 slots=2\n", "line 2: host 'worker-0' is listed twice"),
    ("worker-0 slots=0\n", "needs at least 1"),
    ("# nothing\n\n", "lists no hosts"),
    ("node1;touch /tmp/x slots=8\n", "expected 'HOST slots=N'"),
    ("node1;reboot slots=8\n", "is not a valid host name"),
    ("$(touch${IFS}x) slots=8\n", "is not a valid host name"),
    ("-oProxyCommand=x slots=8\n", "is not a valid host name"),
])
def test_bad_hostfiles_name_the_line(text, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        parse_hostfile(text, "hostfile h")


@pytest.mark.parametrize("include, exclude", [
    ("", ""), ("worker-0", ""), ("worker-1:0,2@10.0.0.7", ""), ("worker-0:3@worker-0:1", ""),
    ("", "worker-1"), ("", "worker-0:0,1@10.0.0.7:1"), ("", "worker-1:0@worker-1:3"),
])
def test_filters_select_what_deepspeed_selects(include, exclude):
    from deepspeed.launcher.runner import parse_inclusion_exclusion

    pool = parse_hostfile(POOL_TEXT)
    ours = filter_hosts(pool, include, exclude)
    theirs = parse_inclusion_exclusion(dict(pool), include, exclude)
    assert list(ours.items()) == [(h, list(s)) for h, s in theirs.items()]


@pytest.mark.parametrize("include, exclude, message", [
    ("worker-9", "", "host 'worker-9' is not in the hostfile"),
    ("worker-0:7", "", "worker-0 has no slot '7'"),
    ("worker-0", "worker-1", "mutually exclusive"),
    ("", "worker-0@worker-1@10.0.0.7", "leave no slots"),
    ("worker-0;touch x", "", "is not in the hostfile"),
])
def test_bad_filters(include, exclude, message):
    with pytest.raises(ValueError, match=message):
        filter_hosts(parse_hostfile(POOL_TEXT), include, exclude)


def test_world_info_is_deepspeeds_encoding():
    from deepspeed.launcher.runner import encode_world_info

    active = filter_hosts(parse_hostfile(POOL_TEXT), "", "worker-1:0")
    assert world_info_b64(active) == encode_world_info(active)


def test_runner_environment_keeps_nothing_deepspeed_would_export():
    env = runner_environment({"PATH": "/bin", "NCCL_SOCKET_IFNAME": "$(touch x)",
                              "PYTHONPATH": "/a b", "UCX_TLS": "tcp", "MLFLOW_X": "1",
                              "MV2_Y": "2", "HOME": "/root"}, disabled_env_file="/run/none")
    assert env == {"PATH": "/bin", "HOME": "/root", "DS_ENV_FILE": "/run/none"}


def test_rank_env_applies_values_literally(monkeypatch, tmp_path):
    for name in ("NCCL_SOCKET_IFNAME", "OMP_NUM_THREADS"):  # restored after the test
        monkeypatch.setenv(name, "before")
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,3")
    env = {"NCCL_SOCKET_IFNAME": "$(touch x); `y`", "OMP_NUM_THREADS": "4", "RANK": "0",
           "CUDA_VISIBLE_DEVICES": "0"}
    (tmp_path / "env.json").write_text(json.dumps(env))
    apply(json.loads((tmp_path / "env.json").read_text()))
    assert os.environ["NCCL_SOCKET_IFNAME"] == "$(touch x); `y`"
    assert os.environ["OMP_NUM_THREADS"] == "4"
    assert os.environ["RANK"] == "3" and os.environ["CUDA_VISIBLE_DEVICES"] == "2,3"
