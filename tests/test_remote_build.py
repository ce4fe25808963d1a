"""`mmtrain data` against a real S3-compatible server on loopback (moto's server mode).

A build to s3:// that is killed leaves only complete shard objects and no dataset.json; a rerun
from another machine (a fresh staging folder) resumes from the bucket, with no sample written
twice, and ends bit-identical to an uninterrupted local build. verify, stats, inspect, split and
dedup read the remote dataset; split and dedup write remote ones.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from mmtrain import storage
from mmtrain.data.index import read_dataset_index, read_manifest
from tests.conftest import REPO, cli_env
from tests.remote_servers import make_bucket, s3_server


@pytest.fixture(scope="module")
def s3():
    with s3_server() as env:
        make_bucket("data")
        yield env


def data_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "mmtrain", "data", *args]


def build_args(demo_corpus, out):
    return ["build", "wds", str(demo_corpus / "train"), "-o", str(out), "--max-samples", "40",
            "--workers", "1", "--no-progress"]


def cli(capsys, *argv: str) -> tuple[int, str, str]:
    """`mmtrain data ARGV` in this process (the loopback S3 server's environment is set)."""
    from data_tools.cli import main

    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def test_killed_build_to_s3_resumes_from_the_bucket_without_duplicates(s3, demo_corpus, tmp_path,
                                                                       capsys, monkeypatch):
    env = {**cli_env(), **s3, "MMTRAIN_STAGING_DIR": str(tmp_path / "staging-a")}
    url = "s3://data/killed"
    proc = subprocess.Popen(data_cmd(*build_args(demo_corpus, url)), env=env, cwd=REPO,
                            start_new_session=True, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while not storage.exists(f"{url}/shard-000002.tar"):
        assert proc.poll() is None, proc.stderr.read().decode()
        assert time.monotonic() < deadline, "the build uploaded no shards"
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not storage.exists(f"{url}/dataset.json"), "the build finished before it was killed"
    uploaded = storage.listdir(url)

    clean = tmp_path / "clean"
    assert cli(capsys, *build_args(demo_corpus, clean))[0] == 0
    for name in uploaded:  # every shard object under its final name is complete
        if name.endswith(".tar"):
            assert storage.read_bytes(f"{url}/{name}") == (clean / name).read_bytes(), name

    # The rerun comes from "another machine": an empty staging folder; the bucket is the truth.
    monkeypatch.setenv("MMTRAIN_STAGING_DIR", str(tmp_path / "staging-b"))
    rc, out, err = cli(capsys, *build_args(demo_corpus, url))
    assert rc == 0 and "kept from an earlier run" in out, err
    remote, local = read_dataset_index(url), read_dataset_index(clean)
    assert remote["shards"] == local["shards"] and remote["fingerprint"] == local["fingerprint"]
    keys = read_manifest(url, ["key"])["key"]
    assert len(keys) == len(set(keys)) == local["totals"]["samples"]  # no sample twice
    manifest = storage.read_bytes(f"{url}/manifest.parquet")
    assert manifest == (clean / "manifest.parquet").read_bytes()
    for shard in local["shards"]:
        assert storage.read_bytes(f"{url}/{shard['name']}") == (clean / shard["name"]).read_bytes()
    assert "0 problems" in cli(capsys, "verify", url)[1]


def test_data_commands_read_and_write_object_storage(s3, demo_corpus, tmp_path, capsys,
                                                     monkeypatch):
    monkeypatch.setenv("MMTRAIN_STAGING_DIR", str(tmp_path / "staging"))
    url = "s3://data/tools"
    assert cli(capsys, *build_args(demo_corpus, url))[0] == 0
    assert "0 problems" in cli(capsys, "verify", url)[1]
    rc, out, _ = cli(capsys, "stats", url, "--json")
    assert rc == 0 and json.loads(out)["samples"] == read_dataset_index(url)["totals"]["samples"]
    assert "──" in cli(capsys, "inspect", url, "-n", "2")[1]
    assert cli(capsys, "split", url, "-o", "s3://data/split", "--val-fraction", "0.25")[0] == 0
    rc, out, _ = cli(capsys, "dedup", url, "s3://data/split/val", "-o", "s3://data/dedup")
    assert rc == 0
    for out_url in ("s3://data/split/train", "s3://data/split/val", "s3://data/dedup"):
        assert "0 problems" in cli(capsys, "verify", out_url)[1]
    val = read_dataset_index("s3://data/split/val")["totals"]["samples"]
    kept = read_dataset_index("s3://data/dedup")["totals"]["samples"]
    assert f"kept {kept} of {json.loads(cli(capsys, 'stats', url, '--json')[1])['samples'] + val}" \
        in out
    assert storage.exists("s3://data/dedup/removed.jsonl")

    # --overwrite with other options: the old dataset is withdrawn, then replaced.
    before = {n for n in storage.listdir(url) if n.endswith(".tar")}
    rc, out, err = cli(capsys, *build_args(demo_corpus, url)[:-5], "--max-samples", "200",
                       "--workers", "1", "--no-progress", "--overwrite")
    assert rc == 0, err
    after = read_dataset_index(url)
    assert {n for n in storage.listdir(url) if n.endswith(".tar")} == \
        {s["name"] for s in after["shards"]} and len(after["shards"]) < len(before)
    assert "0 problems" in cli(capsys, "verify", url)[1]

    # A remote output that holds a dataset is refused without --overwrite; http(s) is read-only.
    rc, _, err = cli(capsys, "split", url, "-o", "s3://data/split", "--val-fraction", "0.25")
    assert rc != 0 and "already holds a dataset" in err
    rc, _, err = cli(capsys, *build_args(demo_corpus, "https://example.invalid/ds"))
    assert rc != 0 and "read-only" in err
