"""`mmtrain train` on data at URLs, against real servers on loopback.

- s3:// (moto's S3 server): build → verify → 2 ranks train → SIGKILL after a checkpoint →
  resume to the end. (Sample accounting at resume — 0 missing, 0 duplicated — is asserted at
  the loader level with 2 simulated ranks in test_remote_loader.py.)
- http:// (http.server): a dataset served over HTTP trains; no local folder is made from the URL
  even with data.synth_if_missing=true.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time

import pytest

from tests.conftest import cli_env, tiny_train_cmd
from tests.remote_servers import http_server, make_bucket, s3_server

pytestmark = pytest.mark.slow


def metrics(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def train_cmd(train, val, runs, name, **settings):
    values = {"data.num_workers": 1, "train.eval_batches": 1, **settings}
    cmd = tiny_train_cmd(runs / "unused", runs, name, values)
    cmd[cmd.index(f"data.train={runs / 'unused' / 'train'}")] = f"data.train={train}"
    cmd[cmd.index(f"data.val={runs / 'unused' / 'val'}")] = f"data.val={val}"
    return cmd


def test_two_ranks_train_from_s3_killed_and_resumed(demo_corpus, tmp_path, capsys, monkeypatch):
    from data_tools.cli import main as data_main

    with s3_server() as s3:
        make_bucket("runs")
        monkeypatch.setenv("MMTRAIN_STAGING_DIR", str(tmp_path / "staging"))
        for split in ("train", "val"):
            assert data_main(["build", "wds", str(demo_corpus / split), "-o",
                              f"s3://runs/demo/{split}", "--workers", "1", "--max-samples",
                              "80", "--no-progress"]) == 0
            assert data_main(["verify", f"s3://runs/demo/{split}"]) == 0
        capsys.readouterr()

        env = {**cli_env(), **s3}
        cmd = train_cmd("s3://runs/demo/train", "s3://runs/demo/val", tmp_path, "s3run",
                        **{"train.steps": 4, "train.ckpt_every": 1})
        proc = subprocess.Popen(cmd, env=env, cwd=tmp_path, start_new_session=True,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        latest = tmp_path / "s3run" / "checkpoints" / "latest"
        deadline = time.monotonic() + 300
        while not latest.is_file():
            assert proc.poll() is None, proc.stdout.read()[-3000:]
            assert time.monotonic() < deadline, "no checkpoint was committed"
            time.sleep(0.1)
        os.killpg(proc.pid, signal.SIGKILL)  # the whole job: torchrun and both ranks
        proc.wait()
        killed_at = latest.read_text().strip()
        assert killed_at != "step_00000004", "the run ended before it was killed"

        resumed = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True,
                                 timeout=600)
        assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    logs = "".join(p.read_text() for p in (tmp_path / "s3run" / "logs").rglob("*.log"))
    assert "resumed from" in logs and killed_at in logs
    train_rows = [m for m in metrics(tmp_path / "s3run") if m["split"] == "train"]
    assert train_rows[-1]["step"] == 4
    assert train_rows[-1]["skipped_shards"] == 0 and train_rows[-1]["unreadable_shards"] == 0
    assert not list(tmp_path.glob("s3*:*")), "a local folder was made from the URL"


def test_an_http_served_dataset_trains_and_makes_no_local_folder(demo_corpus, tmp_path):
    with http_server(demo_corpus) as (url, requests):
        cmd = train_cmd(f"{url}/train", f"{url}/val", tmp_path, "web",
                        **{"launch.nproc": 1, "train.steps": 2, "train.ckpt_every": 0,
                           "data.num_workers": 0,
                           "data.synth_if_missing": "true"})
        proc = subprocess.run(cmd, env=cli_env(), cwd=tmp_path, capture_output=True, text=True,
                              timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert [m["step"] for m in metrics(tmp_path / "web") if m["split"] == "train"][-1] == 2
    assert any(p.endswith(".tar") for p in requests)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith("http:")], \
        "a local folder was made from the URL"
