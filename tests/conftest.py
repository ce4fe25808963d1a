"""Shared fixtures: a small demo corpus built through the real data_tools path."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def demo_corpus(tmp_path_factory) -> Path:
    """ROOT with ROOT/train (6 shards) and ROOT/val, made by `data_tools.synth`."""
    from data_tools.synth import synth_corpus

    root = tmp_path_factory.mktemp("demo")
    synth_corpus(root, samples=480, seed=3, shards=6, workers=1)
    return root


def cli_env() -> dict[str, str]:
    """Environment for subprocesses running `python -m mmtrain` from the repo."""
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env["PYTHONUNBUFFERED"] = "1"
    return env


# The tiny model and data layout every CLI-level test trains (a few seconds per step on 2 cores).
# No media generation unless a test asks for it (GENERATION_SETTINGS): the demo config's media
# tokenizers would otherwise be trained first.
TINY_SETTINGS = {"model.dim": 64, "model.n_layers": 2, "model.n_heads": 4, "model.n_kv_heads": 2,
                 "data.seq_len": 256, "data.micro_batch_size": 2, "data.num_streams": 4,
                 "train.log_every": 1, "data.image_tokenizer": '""', "data.audio_tokenizer": '""',
                 "model.image_codes": 0, "model.audio_codes": 0}


def tiny_train_cmd(corpus: Path, runs: Path, name: str, settings: dict, *extra: str) -> list[str]:
    """`python -m mmtrain train` on `corpus` with the tiny settings, `settings` and `extra` args."""
    values = {"data.train": corpus / "train", "data.val": corpus / "val", **TINY_SETTINGS,
              "train.runs_dir": runs, "train.name": name, **settings}
    cmd = [sys.executable, "-m", "mmtrain", "train"]
    for key, value in values.items():
        cmd += ["--set", f"{key}={value}"]
    return cmd + list(extra)


def run_tiny_train(corpus: Path, runs: Path, name: str, settings: dict,
                   *extra: str) -> subprocess.CompletedProcess:
    proc = subprocess.run(tiny_train_cmd(corpus, runs, name, settings, *extra), env=cli_env(),
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc
