"""Helpers for the launcher tests: plans built with pinned paths, tiny runs, process trees."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from launch.cli import build_parser
from launch.plan import LaunchPlan, build_plan
from mmtrain.config import load_config

# The tiny model of tests/test_e2e.py; threads pinned so one node and two nodes compute the same.
TINY = ["model.dim=64", "model.n_layers=2", "model.n_heads=4", "model.n_kv_heads=2",
        "data.seq_len=256", "data.micro_batch_size=2", "data.num_streams=4", "data.num_workers=0",
        "train.log_every=1", "train.eval_batches=0", "launch.threads_per_rank=1",
        'data.image_tokenizer=""', 'data.audio_tokenizer=""', "model.image_codes=0",
        "model.audio_codes=0"]  # no media generation (tests/conftest.py, TINY_SETTINGS)


def sets(*overrides: str) -> list[str]:
    return [word for o in overrides for word in ("--set", o)]


def tiny_args(corpus: Path, runs: Path, name: str, *overrides: str) -> list[str]:
    return sets(*TINY, f"data.train={corpus / 'train'}", f"data.val={corpus / 'val'}",
                f"train.runs_dir={runs}", f"train.name={name}", *overrides)


def plan_for(argv: list[str], overrides: list[str], *, environ: dict[str, str] | None = None,
             cwd: str = "/shared/mmtrain", python: str = "/shared/venv/bin/python") -> LaunchPlan:
    """A plan with pinned environment, working directory and interpreter (golden files)."""
    args = build_parser().parse_args(argv)
    cfg = load_config(None, overrides)
    return build_plan(args, cfg, environ=environ or {"HOME": "/nonexistent"}, cwd=Path(cwd),
                      python=python)


def losses(run_dir: Path) -> dict[int, float]:
    """Train loss per step; a step logged twice (before a crash, again after the resume) keeps
    its last value."""
    out = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        if row["split"] == "train":
            out[row["step"]] = row["loss"]
    return out


def descendants(pid: int) -> list[int]:
    """All processes below `pid`, from /proc (no psutil)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry))
    out, todo = [], [pid]
    while todo:
        kids = children.get(todo.pop(), [])
        out += kids
        todo += kids
    return out


def cmdline(pid: int) -> list[str]:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0")
    except OSError:
        return []


@pytest.fixture
def golden():
    """Compare text with tests/launch/golden/NAME; MMTRAIN_UPDATE_GOLDEN=1 rewrites the file."""
    root = Path(__file__).parent / "golden"

    def check(name: str, text: str) -> None:
        path = root / name
        if os.environ.get("MMTRAIN_UPDATE_GOLDEN") == "1":
            path.write_text(text)
        assert path.is_file(), f"{path} missing: run with MMTRAIN_UPDATE_GOLDEN=1, review it"
        assert text == path.read_text(), f"{name} changed; review, then MMTRAIN_UPDATE_GOLDEN=1"

    return check
