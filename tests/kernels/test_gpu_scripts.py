"""The GPU tooling runs on CPU: the benchmark's dry run end to end (kernel stages; and the e2e
stage, which trains through `mmtrain train` and resumes), its comparisons fail on wrong outputs,
and the kernels compile for Hopper (sm_90a) with the real Triton compiler, which the
interpreter-based tests never invoke."""

import importlib.util
import json
import os
import random
import subprocess
import sys
import warnings
from pathlib import Path

import numpy
import pytest
import torch
import triton

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "benchmarks"))  # the benchmark's modules, imported by the unit tests below

# Triton 3.6's interpreter breaks on numpy >= 2.4; the dry run runs interpreted kernels.
_OLD_INTERPRETER = tuple(int(x) for x in triton.__version__.split(".")[:2]) <= (3, 6)
_NEW_NUMPY = tuple(int(x) for x in numpy.__version__.split(".")[:2]) >= (2, 4)
needs_interpreter = pytest.mark.skipif(_OLD_INTERPRETER and _NEW_NUMPY, reason="Triton <= 3.6 interpreter with numpy >= 2.4")
cpu_only = pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU machine run benchmarks/gpu.sh DIR itself")


def _env(**extra):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(REPO)
    env.update(extra)
    return env


def _dry_run(out: Path, stages: str, timeout: int) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["bash", str(REPO / "benchmarks" / "gpu.sh"), "--dry-run", str(out), "--stages", stages],
        env=_env(PYTHON=sys.executable), capture_output=True, text=True, timeout=timeout,
    )  # fmt: skip


@cpu_only
@needs_interpreter
def test_gpu_benchmark_dry_run(tmp_path):
    """benchmarks/gpu.sh --dry-run, kernel stages: every stage writes its JSON without error or
    failure, the summary is printed, and a training step of a miniature preset runs."""
    out = tmp_path / "bench"
    stages = ("env", "correctness", "attention", "dispatch", "rmsnorm", "cross_entropy", "train")
    res = _dry_run(out, ",".join(stages), timeout=300)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    for stage in stages:
        record = json.loads((out / f"{stage}.json").read_text())
        assert "error" not in record, record["error"]
        assert record["failed"] is False, record.get("failures")
    assert "# GPU benchmark summary" in res.stdout and (out / "summary.md").exists()
    assert "pure bf16 loop (no DeepSpeed, no loader, text-only) -- upper bound" in res.stdout

    correctness = json.loads((out / "correctness.json").read_text())
    assert correctness["attention_d32_causal"]["dq"]["max_abs"] < 1e-4  # fp32 in the dry run
    assert correctness["failures"] == []
    attention = json.loads((out / "attention.json").read_text())
    assert all("fwdbwd_ms" in row["triton"] and row["triton"]["check"]["ok"] for row in attention["rows"])
    dispatch = json.loads((out / "dispatch.json").read_text())
    winners = {row["label"]: row["winner"] for row in dispatch["rows"]}
    assert winners["packed"] == "triton"  # SDPA cannot express packed documents: never a candidate there
    if importlib.util.find_spec("mmtrain.model") is not None:
        tiny = json.loads((out / "train.json").read_text())["presets"]["tiny"]
        assert "tokens_per_s" in tiny, tiny.get("error")


@cpu_only
@needs_interpreter
@pytest.mark.slow
def test_gpu_benchmark_dry_run_e2e_and_doc_attention(tmp_path):
    """`--stages e2e,doc_attention`: `mmtrain train` (DeepSpeed, the real loader on shards with
    images and audio built by the stage) trains, checkpoints, resumes to the end, and the summary
    reads the run's metrics; packed attention is checked against the reference with real doc ids."""
    out = tmp_path / "bench"
    res = _dry_run(out, "e2e,doc_attention", timeout=400)
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-3000:]
    e2e = json.loads((out / "e2e.json").read_text())
    assert e2e["failed"] is False, e2e["failures"]
    run = e2e["runs"]["tiny-zero2"]
    assert run["resumed"] and run["metrics"]["steps_logged"] == [1, 2, 3]
    assert isinstance(run["metrics"]["tokens_per_s"], float)
    assert run["goals"]["vs_pure_loop"]["verdict"].startswith("n/a")  # the train stage did not run
    assert not (out / "e2e" / "runs" / "tiny-zero2" / "checkpoints").exists()  # deleted to keep the disk free
    assert "| e2e tiny-zero2 (ZeRO-2, resumed at step 2) |" in res.stdout
    doc = json.loads((out / "doc_attention.json").read_text())
    assert doc["failures"] == [] and all(row["flex"]["check"]["ok"] for row in doc["rows"])
    assert doc["rows"][0]["varlen_attn"]["skipped"].startswith("not available")


def test_doc_attention_check_fails_on_a_mask_without_documents():
    """The bug this stage had: FlexAttention with every doc id 0 computes plain causal attention
    over the whole row. Against the reference that output must fail the check."""
    from gpu_attention import check_provider, one_hnd_provider, reference_fwd_bwd
    from gpu_common import cu_seqlens_from, random_doc_lens
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    lens = random_doc_lens(random.Random(0), 1, 64, 8, 24)[0]
    N = sum(lens)
    gen = torch.Generator().manual_seed(0)
    q, k, v, do = (torch.randn(N, 2, 16, generator=gen) for _ in range(4))
    cu = cu_seqlens_from(lens, q.device)
    ref = reference_fwd_bwd(q, k, v, cu, True, do)
    for doc_id_N, ok in ((torch.zeros(N, dtype=torch.long), False),
                         (torch.repeat_interleave(torch.arange(len(lens)), torch.tensor(lens)), True)):
        mask = create_block_mask(lambda b, h, qi, ki: (doc_id_N[qi] == doc_id_N[ki]) & (qi >= ki), None, None, N, N,
                                 device="cpu")  # fmt: skip
        provider = one_hnd_provider(lambda *qkv: flex_attention(*qkv, block_mask=mask), q, k, v)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # FlexAttention warns when not compiled
            assert check_provider(provider, *ref, do, torch.float32)["ok"] is ok


def test_e2e_metrics_and_goals_read_missing_keys_as_na(tmp_path):
    from gpu_common import E2ERun
    from gpu_e2e import goals_for, read_metrics

    run = E2ERun(name="r", config="configs/125m.yaml", preset="125m", zero_stage=2, first_steps=3, total_steps=6)
    lines = [{"step": i, "split": "train", "tokens_per_s": 100.0 * i, "data_wait_pct": 1.0, "mfu": 0.5}
             for i in range(1, 7)]  # fmt: skip
    lines[2]["ckpt_blocking_s"] = 0.25
    (tmp_path / "metrics.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    m = read_metrics(tmp_path / "metrics.jsonl", run, warmup=1)
    assert m["steady_steps"] == 4 and m["tokens_per_s"] == 400.0  # steps 1 and 4 left out: median of 2,3,5,6
    assert m["mfu_executed"] == "n/a" and "mfu_executed" in m["missing_keys"]
    assert m["ckpt_blocking_s"] == 0.25
    goals = goals_for(run, m, pure_tokens_per_s=500.0)
    assert goals["vs_pure_loop"]["verdict"] == "NOT met"  # 0.8x < 0.9x
    assert goals["data_wait_pct"]["verdict"] == "met" and goals["mfu"]["verdict"] == "met"  # 50% >= 45%
    assert goals_for(run, m, pure_tokens_per_s=None)["vs_pure_loop"]["verdict"].startswith("n/a")


def test_requirements_check_names_what_is_missing(monkeypatch):
    import gpu_requirements

    modules = gpu_requirements.runtime_modules()  # from pyproject.toml
    assert {"deepspeed", "webdataset", "soundfile", "PIL", "yaml"} <= set(modules)
    monkeypatch.setattr(gpu_requirements, "runtime_modules", lambda: ["json", "no_such_module_for_mmtrain"])
    problems = gpu_requirements.check(["attention", "e2e"], dry_run=True)
    assert list(problems) == ["e2e"] and len(problems["e2e"]) == 1
    assert problems["e2e"][0].startswith("cannot import no_such_module_for_mmtrain")
    assert gpu_requirements.check(["attention"], dry_run=True) == {}


def test_kernels_compile_for_hopper():
    pytest.importorskip("triton.backends.nvidia.compiler")
    res = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "gpu_compile_check.py"), "--quick", "--jobs", "2"],
        env=_env(TRITON_DEFAULT_FP_FUSION="1"), capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert "0 failed" in res.stdout


def test_gpu_e2e_commands_are_valid_runs(tmp_path):
    """The e2e stage's GPU plan (recipes + overrides) passes `mmtrain train --dry-run` (config
    validation), so the GPU run cannot die on a bad key."""
    from gpu_common import make_settings
    from gpu_e2e import train_command

    s = make_settings(tmp_path, dry_run=False)
    for run in s.e2e_runs:
        cmd = train_command(run, s, tmp_path / "e2e", first=True) + ["--dry-run"]
        res = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=120, cwd=REPO)
        assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
        resolved = json.loads(res.stdout[res.stdout.index("{"):])
        assert resolved["engine"]["zero_stage"] == run.zero_stage and resolved["train"]["stop_after"] == run.first_steps
        assert resolved["engine"]["precision"] == "bf16" and resolved["launch"]["nproc"] == 1


def test_exit_status_and_stages_lacking_packages(tmp_path, monkeypatch):
    """Exit 1 when a stage reports failures (outputs outside tolerance); exit 2 when a stage lacks
    a package: that stage is not run and is marked failed, the others still run."""
    import gpu_bench

    monkeypatch.setattr(gpu_bench, "STAGES", [("env", gpu_bench.stage_env),
                                              ("e2e", lambda s, d: {"failures": ["a: out of tolerance"]})])
    monkeypatch.setattr(gpu_bench, "check_requirements", lambda stages, dry_run: {})
    assert gpu_bench.main(["--dry-run", str(tmp_path / "a"), "--stages", "env,e2e"]) == 1
    assert json.loads((tmp_path / "a" / "e2e.json").read_text())["failed"] is True
    assert "| stages that failed | e2e |" in (tmp_path / "a" / "summary.md").read_text()

    monkeypatch.setattr(gpu_bench, "check_requirements", lambda stages, dry_run: {"e2e": ["cannot import deepspeed"]})
    assert gpu_bench.main(["--dry-run", str(tmp_path / "b"), "--stages", "env,e2e"]) == 2
    assert json.loads((tmp_path / "b" / "env.json").read_text())["failed"] is False  # still ran
    assert json.loads((tmp_path / "b" / "e2e.json").read_text())["error"] == "not run: cannot import deepspeed"


@cpu_only
@pytest.mark.slow  # 12-26 s on 2 shared cores: process start, librosa's first call, tokenize-media
def test_gpu_tokenizers_stage_dry_run(tmp_path):
    """`--stages tokenizers` on CPU: both tokenizers' encode rows and the tokenize-media rows are
    measured, codes agree (the same device on both sides in the dry run), the untrained weights are
    said in the output, and the summary shows the ratios; an fp32 disagreement fails the stage."""
    import gpu_tokenizers

    out = tmp_path / "bench"
    res = _dry_run(out, "tokenizers", timeout=300)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    record = json.loads((out / "tokenizers.json").read_text())
    assert record["failed"] is False, record.get("error") or record["failures"]
    assert record["weights"] == "untrained" and "untrained" in res.stdout
    for kind in ("image", "audio"):
        rows = record["encode"][kind]["rows"]
        assert [r["batch"] for r in rows] == [4, 16]
        for row in rows:
            assert row["cpu_items_per_s"] > 0 and row["fp32"]["items_per_s_on_device"] > 0
            assert row["fp32"]["codes_agree_with_cpu"] == 1.0  # the same CPU computes both sides here
            assert 0.5 < row["bf16_autocast"]["codes_agree_with_cpu"] <= 1.0
    e2e = record["e2e"]["rows"][0]
    assert e2e["codes_agree"] == 1.0 and e2e["cpu"]["media_items"] == e2e["device"]["media_items"] > 0
    assert "| tokenizers: image encode, batch 16 (untrained weights) |" in res.stdout
    assert not (out / "tokenizers").exists()  # the synthetic corpus and outputs are removed

    assert gpu_tokenizers.agreement(torch.tensor([[1, 2], [3, 4]]), torch.tensor([[1, 2], [3, 5]])) == 0.75


def test_gpu_tokenizers_fail_when_codes_disagree(tmp_path, monkeypatch):
    """A device side that computes something else (other weights) fails the fp32 agreement check."""
    import gpu_tokenizers
    from gpu_common import Deadline, make_settings

    def other_weights(tok, device):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(1)
            return type(tok)(tok.config).eval().to(device)

    monkeypatch.setattr(gpu_tokenizers, "device_copy", other_weights)
    sizes = {"encode_batches": (4,), "min_seconds": 0.0, "min_reps": 1}
    rec = gpu_tokenizers.encode_rows("image", make_settings(tmp_path, dry_run=True), Deadline(None), sizes, threads=1)
    assert rec["rows"][0]["fp32"]["codes_agree_with_cpu"] < gpu_tokenizers.AGREEMENT_MIN
    assert len(rec["failures"]) == 1 and "fp32 codes agree with the CPU's" in rec["failures"][0]
