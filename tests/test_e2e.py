"""End to end: 2 gloo ranks under DeepSpeed ZeRO-2 on a corpus built through data_tools.

Run A trains 2k steps straight; run B trains k steps, stops (checkpointed), resumes and trains to
2k. B's per-step losses after the resume must equal A's bit for bit (CPU, same world size).
"""

import json
import subprocess
from pathlib import Path

import pytest

from tests.conftest import run_tiny_train

pytestmark = pytest.mark.slow
K = 5  # 10 steps: long enough to meet micro-batches without images on one rank


def train(corpus: Path, runs: Path, name: str, *extra: str) -> subprocess.CompletedProcess:
    return run_tiny_train(corpus, runs, name, {"data.num_workers": 0, "train.steps": 2 * K,
                                               "train.ckpt_every": 0, "train.eval_batches": 2},
                          *extra)


def losses(run_dir: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if r["split"] == "train"}


def test_resume_is_bit_identical_and_run_dir_is_complete(demo_corpus, tmp_path):
    a = train(demo_corpus, tmp_path, "A")
    train(demo_corpus, tmp_path, "B", "--set", f"train.stop_after={K}")
    ckpts = tmp_path / "B" / "checkpoints"
    assert (ckpts / "latest").read_text().strip() == f"step_{K:08d}"
    b = train(demo_corpus, tmp_path, "B")
    assert "resumed from" in b.stdout and f"step_{K:08d}" in b.stdout

    la, lb = losses(tmp_path / "A"), losses(tmp_path / "B")
    assert sorted(la) == list(range(1, 2 * K + 1)) and sorted(lb) == list(range(1, 2 * K + 1))
    for step in range(1, 2 * K + 1):
        assert la[step] == lb[step], f"step {step}: {la[step]!r} != {lb[step]!r}"
    assert la[2 * K] < la[1]
    last = [json.loads(line) for line in (tmp_path / "A" / "metrics.jsonl").read_text().splitlines()
            if json.loads(line)["split"] == "train"][-1]
    for key in ("lr", "grad_norm", "tokens_per_s", "image_tokens_per_s", "audio_tokens_per_s",
                "docs_per_s", "split_docs", "dropped_docs", "packing_efficiency", "data_wait_pct",
                "skipped_steps", "skipped_samples", "memory_gb"):
        assert key in last, key
    assert 0 <= last["ckpt_blocking_s"] < 60  # step 10 saved: training blocked that long
    assert last["data/share/train"] == 1.0  # data.mix shares: tests/test_loader_data.py

    # What the user is told and what the run directory holds (ARCHITECTURE.md §5).
    run = tmp_path / "A"
    assert "media gain" in a.stdout and "tensorboard --logdir" in a.stdout
    assert list((run / "tb").glob("events.out.tfevents.*"))
    assert json.loads((run / "config.json").read_text())["train"]["name"] == "A"
    assert (run / "logs" / "rank_0.log").is_file() and (run / "logs" / "rank_1.log").is_file()
    step_dir = run / "checkpoints" / f"step_{2 * K:08d}"
    for rel in ("COMMITTED", "MANIFEST.json", "config.json", "loader/rank_0.json",
                "loader/rank_1.json", "rng/rank_0.pt", "rng/rank_1.pt",
                "mp_rank_00_model_states.pt"):
        assert (step_dir / rel).is_file(), rel
    manifest = json.loads((step_dir / "MANIFEST.json").read_text())
    assert "loader/rank_1.json" in manifest["files"] and manifest["world_size"] == 2
