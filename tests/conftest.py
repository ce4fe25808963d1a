"""Shared fixtures: a small demo corpus built through the real data_tools path."""

from __future__ import annotations

import os
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
