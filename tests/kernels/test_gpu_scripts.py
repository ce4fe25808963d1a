"""The GPU tooling runs on CPU: the benchmark's dry run end to end, and the kernels compile for
Hopper (sm_90a) with the real Triton compiler, which the interpreter-based tests never invoke."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]


def _env(**extra):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(REPO)
    env.update(extra)
    return env


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU machine run benchmarks/gpu.sh DIR itself")
def test_gpu_benchmark_dry_run(tmp_path):
    """benchmarks/gpu.sh --dry-run: every stage writes its JSON without error, the summary is
    printed, and (when the model package is there) a training step of a miniature preset runs."""
    out = tmp_path / "bench"
    res = subprocess.run(
        ["bash", str(REPO / "benchmarks" / "gpu.sh"), "--dry-run", str(out)],
        env=_env(PYTHON=sys.executable), capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr[-3000:]
    for stage in ("env", "correctness", "attention", "doc_attention", "rmsnorm", "cross_entropy", "train"):
        record = json.loads((out / f"{stage}.json").read_text())
        assert "error" not in record, record["error"]
    assert "# GPU benchmark summary" in res.stdout and (out / "summary.md").exists()

    correctness = json.loads((out / "correctness.json").read_text())
    assert correctness["attention_d32_causal"]["dq"]["max_abs"] < 1e-4  # fp32 in the dry run
    assert correctness["failures"] == []
    attention = json.loads((out / "attention.json").read_text())
    assert all("fwdbwd_ms" in row["triton"] for row in attention["rows"])
    if importlib.util.find_spec("mmtrain.model") is not None:
        tiny = json.loads((out / "train.json").read_text())["presets"]["tiny"]
        assert "tokens_per_s" in tiny, tiny.get("error")


def test_kernels_compile_for_hopper():
    pytest.importorskip("triton.backends.nvidia.compiler")
    res = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "gpu_compile_check.py"), "--quick", "--jobs", "2"],
        env=_env(TRITON_DEFAULT_FP_FUSION="1"), capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert "0 failed" in res.stdout
