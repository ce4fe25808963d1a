"""Preflight: every problem a user can have before a multi-node launch is one clear line on stderr,
a non-zero exit, within seconds, and no rank is started (no config.json is written)."""

from __future__ import annotations

import hashlib
import json
import shutil
import socket
import time
from pathlib import Path

import pytest

from launch.cli import main as launch_main
from launch.local import free_port
from tests.launch.conftest import tiny_args


def preflight_fails(capsys, tmp_path: Path, argv: list[str], *messages: str) -> str:
    t0 = time.monotonic()
    rc = launch_main(argv)
    err = capsys.readouterr().err
    assert rc == 2, err
    assert time.monotonic() - t0 < 15, "preflight must answer in seconds"
    for message in messages:
        assert message in err, err
    assert not list(tmp_path.rglob("config.json")), "a rank was started (config.json written)"
    return err


@pytest.fixture
def corpus_copy(demo_corpus, tmp_path) -> Path:
    root = tmp_path / "corpus"
    shutil.copytree(demo_corpus / "train", root / "train")
    return root


def make_checkpoint(root: Path, step: int, *, world: int, committed: bool = True) -> Path:
    ckpt = root / f"step_{step:08d}"
    (ckpt / "loader").mkdir(parents=True)
    (ckpt / "loader" / "rank_0.json").write_text("{}")
    (ckpt / "model.pt").write_bytes(b"weights")
    files = {rel: hashlib.sha256((ckpt / rel).read_bytes()).hexdigest()
             for rel in ("loader/rank_0.json", "model.pt")}
    (ckpt / "MANIFEST.json").write_text(json.dumps({"step": step, "world_size": world,
                                                    "files": files}))
    if committed:
        (ckpt / "COMMITTED").write_text(f"{step}\n")
        (root / "latest").write_text(ckpt.name + "\n")
    return ckpt


def test_missing_shard(capsys, corpus_copy, tmp_path):
    (corpus_copy / "train" / "shard-00002.tar").unlink()
    preflight_fails(capsys, tmp_path, tiny_args(corpus_copy, tmp_path / "runs", "r"),
                    "data.train: shard", "shard-00002.tar listed in dataset.json is missing")


def test_changed_shard(capsys, corpus_copy, tmp_path):
    with open(corpus_copy / "train" / "shard-00001.tar", "ab") as f:
        f.write(b"\0" * 512)
    preflight_fails(capsys, tmp_path, tiny_args(corpus_copy, tmp_path / "runs", "r"),
                    "shard-00001.tar has", "the shards changed since dataset.json was written")


def test_no_dataset(capsys, tmp_path):
    preflight_fails(capsys, tmp_path, tiny_args(tmp_path / "nothing", tmp_path / "runs", "r",
                                                "data.synth_if_missing=false"),
                    "data.train=", "dataset.json does not exist")


def test_bad_hostfile(capsys, demo_corpus, tmp_path):
    hostfile = tmp_path / "hosts"
    hostfile.write_text("node0 slots=8\nnode1 slots 8\n")
    preflight_fails(capsys, tmp_path, [*tiny_args(demo_corpus, tmp_path / "runs", "r"),
                                       "--hostfile", str(hostfile)],
                    f"hostfile {hostfile} line 2: expected 'HOST slots=N', got 'node1 slots 8'")


def test_busy_port(capsys, demo_corpus, tmp_path):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        preflight_fails(capsys, tmp_path, [*tiny_args(demo_corpus, tmp_path / "runs", "r"),
                                           "--master-port", str(port)],
                        f"port {port} is already in use")


@pytest.mark.parametrize("flags, message", [
    (["--nproc-per-node", "4", "--global-batch", "6"],
     "--global-batch 6 is not divisible by the world size 4"),
    (["--nproc-per-node", "4", "--global-batch", "12"],
     "--global-batch 12 gives 3 rows per rank, not a multiple of data.micro_batch_size=2"),
    (["--nproc-per-node", "8"], "data.num_streams=4 is fewer than the 8 consumers"),
])
def test_batch_and_layout_must_divide(capsys, demo_corpus, tmp_path, flags, message):
    preflight_fails(capsys, tmp_path, [*tiny_args(demo_corpus, tmp_path / "runs", "r"), *flags],
                    message)


def test_global_batch_sets_grad_accum(capsys, demo_corpus, tmp_path):
    rc = launch_main([*tiny_args(demo_corpus, tmp_path / "runs", "r"), "--nproc-per-node", "2",
                      "--global-batch", "16", "--dry-run"])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "--global-batch 16: engine.grad_accum=4" in out


def test_resume_checkpoint_must_be_committed_and_intact(capsys, demo_corpus, tmp_path):
    ckpts = tmp_path / "runs" / "r" / "checkpoints"
    make_checkpoint(ckpts, 2, world=2, committed=False)
    args = tiny_args(demo_corpus, tmp_path / "runs", "r")
    preflight_fails(capsys, tmp_path, [*args, "--resume", "step_00000002"],
                    "--resume step_00000002:", "is not committed (no COMMITTED marker)")
    good = make_checkpoint(ckpts, 4, world=2)
    (good / "model.pt").write_bytes(b"tampered")
    preflight_fails(capsys, tmp_path, [*args, "--resume", str(good)],
                    "file model.pt fails its sha256 check")


def test_another_world_size_is_converted_not_refused(capsys, demo_corpus, tmp_path):
    make_checkpoint(tmp_path / "runs" / "r" / "checkpoints", 6, world=4)
    assert launch_main([*tiny_args(demo_corpus, tmp_path / "runs", "r"), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "step_00000006 (committed, 2 files pass their sha256); it was saved by 4 ranks and " \
        "this launch has 2: the ranks convert it" in out, out


def test_checkpoint_directory_must_be_writable(capsys, demo_corpus, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    preflight_fails(capsys, tmp_path, tiny_args(demo_corpus, blocker / "runs", "r"),
                    f"checkpoint directory {blocker}/runs/r/checkpoints is not writable")


def test_gpus_asked_for_must_be_visible(capsys, demo_corpus, tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has GPUs")
    preflight_fails(capsys, tmp_path, tiny_args(demo_corpus, tmp_path / "runs", "r",
                                                "launch.device=cuda"),
                    "node 0 is asked for 2 GPUs but 0 are visible there")


def test_rendezvous_problems(capsys, demo_corpus, tmp_path):
    args = tiny_args(demo_corpus, tmp_path / "runs", "r")
    port = free_port()
    preflight_fails(capsys, tmp_path, [*args, "--nnodes", "2", "--node-rank", "1",
                                       "--rdzv-endpoint", f"127.0.0.1:{port}",
                                       "--rdzv-timeout", "1"],
                    f"127.0.0.1:{port} is not reachable after 1 s", "is node rank 0 started")
    preflight_fails(capsys, tmp_path, [*args, "--nnodes", "2", "--node-rank", "0",
                                       "--rdzv-endpoint", "192.0.2.1:29500"],
                    "192.0.2.1 (192.0.2.1) is not an address of this machine")
    preflight_fails(capsys, tmp_path, [*args, "--nnodes", "2", "--rdzv-endpoint", "node0:29500"],
                    "--nnodes 2: give each node its --node-rank")
    preflight_fails(capsys, tmp_path, [*args, "--master-addr", "127.0.0.1", "--max-restarts", "1"],
                    "--max-restarts needs the c10d rendezvous")


def test_every_failure_is_reported_at_once(capsys, corpus_copy, tmp_path):
    (corpus_copy / "train" / "shard-00000.tar").unlink()
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        err = preflight_fails(capsys, tmp_path, [
            *tiny_args(corpus_copy, tmp_path / "runs", "r", "data.tokenizer=/no/tokenizer.json"),
            "--master-port", str(port), "--global-batch", "3"],
            "preflight failed (4 problems; no rank was started)", "shard-00000.tar",
            "data.tokenizer='/no/tokenizer.json': no such file", f"port {port}",
            "--global-batch 3 is not divisible")
    assert err.count("\n  - ") == 4


def test_dry_run_prints_and_starts_nothing(capsys, demo_corpus, tmp_path):
    rc = launch_main([*tiny_args(demo_corpus, tmp_path / "runs", "r"), "--dry-run",
                      "--max-restarts", "2"])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "-m launch.elastic_run --nnodes 1 --nproc-per-node 2 --rdzv-backend c10d" in out
    assert "--max-restarts 2" in out and "OMP_NUM_THREADS=1" in out
    assert not (tmp_path / "runs").exists()


def test_fresh_sets_the_checkpoints_aside(capsys, demo_corpus, tmp_path):
    """--fresh is the launcher's job (restarts must resume, not start over): the old checkpoints
    are moved, never deleted, and the ranks are not told --fresh."""
    from launch.cli import set_aside
    from tests.launch.conftest import plan_for

    run = tmp_path / "runs" / "r"
    old = make_checkpoint(run / "checkpoints", 4, world=2)
    (run / "metrics.jsonl").write_text("{}\n")
    args = tiny_args(demo_corpus, tmp_path / "runs", "r")
    assert launch_main([*args, "--fresh", "--dry-run"]) == 0
    assert "will be moved to" in capsys.readouterr().out and old.is_dir()  # dry run: untouched
    plan = plan_for(["--fresh", "--max-restarts", "2"], [f"train.runs_dir={tmp_path / 'runs'}",
                                                         "train.name=r"])
    assert "--fresh" not in plan.rank_argv()
    moved = set_aside(run)
    assert moved is not None and (moved / "checkpoints" / old.name / "COMMITTED").is_file()
    assert (moved / "metrics.jsonl").is_file() and not (run / "checkpoints").exists()


def test_a_missing_user_dataset_is_an_error_naming_it(capsys, tmp_path):
    """Only the embedded demo (no --config) builds its data when missing: a typo in a user
    recipe's path stops `mmtrain train` before anything is built or started."""
    from mmtrain.cli import main

    recipe = tmp_path / "mine.yaml"
    recipe.write_text(f"data:\n  train: {tmp_path}/corpus/trian\n  val: {tmp_path}/corpus/val\n"
                      f"train:\n  runs_dir: {tmp_path}/runs\n")
    assert main(["train", "--config", str(recipe)]) == 2
    err = capsys.readouterr().err
    assert (f"data.train='{tmp_path}/corpus/trian': no dataset.json in {tmp_path}/corpus/trian"
            in err), err
    assert not (tmp_path / "corpus").exists() and not (tmp_path / "runs").exists()


def test_a_mix_replaces_data_train(capsys, demo_corpus, tmp_path):
    """`data.mix` with `data.synth_if_missing=false`: its datasets are checked, not data.train."""
    from launch.local import ensure_demo_data
    from mmtrain.config import load_config

    a, b = demo_corpus / "train", demo_corpus / "val"
    mix = (f"data.mix={{{a}: 2, {b}: 1}}", "data.synth_if_missing=false")
    args = tiny_args(tmp_path / "nothing", tmp_path / "runs", "r", *mix)  # data.train: missing
    assert launch_main([*args, "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert f"data.mix.{a}: 6 shards" in out and f"data.mix.{b}:" in out, out
    ensure_demo_data(load_config(None, [o for o in args if o != "--set"]))  # what `mmtrain train` runs
    assert not (tmp_path / "nothing").exists()
    missing = tmp_path / "nothing" / "b"
    args = tiny_args(tmp_path / "nothing", tmp_path / "runs", "r", f"data.mix={{{a}: 2, {missing}: 1}}")
    preflight_fails(capsys, tmp_path, args, f"data.mix.{missing}={str(missing)!r}:")
    with pytest.raises(ValueError, match=f"data.mix.{missing}='{missing}': no dataset.json"):
        ensure_demo_data(load_config(None, [o for o in args if o != "--set"]))


def test_elastic_dry_run_and_a_fixed_global_batch(capsys, demo_corpus, tmp_path):
    args = [*tiny_args(demo_corpus, tmp_path / "runs", "r"), "--nnodes", "1:2", "--node-rank", "0",
            "--nproc-per-node", "1", "--rdzv-endpoint", f"127.0.0.1:{free_port()}"]
    assert launch_main([*args, "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "--nnodes 1:2" in out and "elastic: 1 to 2 nodes" in out
    assert "restarts: up to 3" in out  # several nodes: restarts by default
    preflight_fails(capsys, tmp_path, [*args, "--global-batch", "4"],
                    "--global-batch fixes engine.grad_accum for 2 ranks, but with --nnodes 1:2")
