"""The real CLI on a tiny model: resume on another world size in one command, then export, eval
and generate from the checkpoints.

    A  2 ranks, ZeRO-2, 6 steps (checkpoints at 3 and 6)
    B  1 rank (grad_accum 2: same global batch), --resume A's step 3   → steps 4–6 ≈ A's
    C  1 rank (grad_accum 2), ZeRO-3 (all parameters partitioned), 6 steps (checkpoints at 3, 6)
    D  2 ranks, ZeRO-3, --resume C's step 3                            → steps 4–6 ≈ C's

Tolerance for the resumed losses: rtol 1e-3. Measured: max rel. diff 2.3e-4 (step 4), 1.5e-4
(step 5), 6e-5 (step 6), both directions. Parameters are restored exactly (test_resharding.py);
the difference is the loss *reported*: the same 4 rows make each global batch, but 2 ranks × 1
micro-batch and 1 rank × 2 micro-batches pair them differently, and each micro-batch loss is a
mean over its own text tokens.
"""

import io
import json
import subprocess
import sys
import tarfile
from contextlib import redirect_stdout
from pathlib import Path

import pytest
import torch

from tests.conftest import cli_env, run_tiny_train

pytestmark = pytest.mark.slow
STEPS, SAVE_AT = 6, 3


def train(corpus: Path, runs: Path, name: str, *extra: str) -> subprocess.CompletedProcess:
    return run_tiny_train(corpus, runs, name, {"data.num_workers": 1, "train.steps": STEPS,
                                               "train.ckpt_every": SAVE_AT, "train.eval_batches": 2},
                          *extra)


def metrics(run_dir: Path, split: str) -> dict[int, dict]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r for r in rows if r["split"] == split}


@pytest.fixture(scope="module")
def runs(demo_corpus, tmp_path_factory):
    runs = tmp_path_factory.mktemp("runs")
    step3 = f"checkpoints/step_{SAVE_AT:08d}"
    one_rank = ("--set", "launch.nproc=1", "--set", "engine.grad_accum=2")
    out = {"A": train(demo_corpus, runs, "A")}
    out["B"] = train(demo_corpus, runs, "B", *one_rank, "--resume", str(runs / "A" / step3))
    zero3 = ("--set", "engine.zero_stage=3", "--set", "engine.zero3_persistence_threshold=0")
    out["C"] = train(demo_corpus, runs, "C", *one_rank, *zero3)
    out["D"] = train(demo_corpus, runs, "D", *zero3, "--resume", str(runs / "C" / step3))
    return runs, out


@pytest.mark.parametrize("saved, resumed", [("A", "B"), ("C", "D")])
def test_resume_on_another_world_size_continues_training(runs, saved, resumed):
    root, procs = runs
    assert "resumed from" in procs[resumed].stdout
    log = (root / resumed / "logs" / "rank_0.log").read_text()
    assert "resharding through a universal checkpoint" in log
    ref, got = metrics(root / saved, "train"), metrics(root / resumed, "train")
    assert sorted(got) == list(range(SAVE_AT + 1, STEPS + 1))
    for step in got:
        assert got[step]["loss"] == pytest.approx(ref[step]["loss"], rel=1e-3), step
        assert got[step]["lr"] == pytest.approx(ref[step]["lr"], rel=1e-12), step  # schedule continues
    assert not list((root / saved / "checkpoints").glob(".universal*"))  # converted copy removed
    # the committed checkpoint it came from is untouched and still verifies
    from mmtrain.checkpoint import verify
    verify(root / saved / "checkpoints" / f"step_{SAVE_AT:08d}")


def test_export_round_trip_and_deepspeeds_zero_to_fp32(runs, tmp_path):
    from safetensors.torch import load_file

    from mmtrain import export
    from mmtrain.model import FusionTransformer

    root, _ = runs
    ckpts = root / "A" / "checkpoints"
    assert export.main([str(root / "A"), str(tmp_path / "out")]) == 0  # run dir → its latest
    model = export.load_exported(tmp_path / "out")
    assert isinstance(model, FusionTransformer) and model.output is None  # tied
    exported = load_file(str(tmp_path / "out" / "model.safetensors"))
    assert exported.keys() == dict(model.named_parameters()).keys()
    assert json.loads((tmp_path / "out" / "config.json").read_text())["dim"] == 64

    # DeepSpeed's own script, copied next to our checkpoints, reads them the same way
    subprocess.run([sys.executable, str(ckpts / "zero_to_fp32.py"), str(ckpts), str(tmp_path / "ds"),
                    "--tag", f"step_{STEPS:08d}", "--safe_serialization"],
                   env=cli_env(), check=True, capture_output=True, timeout=300)
    theirs = load_file(str(tmp_path / "ds" / "model.safetensors"))
    assert theirs.keys() == exported.keys()
    for name in exported:
        assert torch.equal(theirs[name], exported[name]), name

    # the exported model computes what the checkpointed one does (one CPU process, no DeepSpeed)
    same, _, _ = export.load_checkpoint_model(ckpts / f"step_{STEPS:08d}")
    for name, p in same.named_parameters():
        assert torch.equal(p, exported[name])


def test_eval_matches_the_training_eval(runs):
    from mmtrain import eval_cli

    root, _ = runs
    out = io.StringIO()
    with redirect_stdout(out):  # C ran on 1 rank: its final eval saw the same 2 batches
        assert eval_cli.main([str(root / "C"), "--batches", "2", "--json"]) == 0
    result = json.loads(out.getvalue().strip().splitlines()[-1])
    logged = metrics(root / "C", "val")[STEPS]
    assert result["step"] == STEPS
    assert result["loss"] == pytest.approx(logged["loss"], rel=1e-5)
    assert result["media_gain"] == pytest.approx(logged["media_gain"], abs=1e-5)
    assert 0 <= result["caption_accuracy"] <= 1 and 0 < result["text_accuracy"] <= 1
    text = io.StringIO()
    with redirect_stdout(text):
        assert eval_cli.main([str(root / "C"), "--batches", "1"]) == 0
    assert "media gain" in text.getvalue() and "caption-token accuracy" in text.getvalue()


def test_generate_with_text_image_and_audio(runs, demo_corpus, tmp_path):
    from mmtrain import generate
    from mmtrain.data.tokenizer import ByteTokenizer
    from mmtrain.export import load_checkpoint_model

    root, _ = runs
    media = {}
    with tarfile.open(sorted((demo_corpus / "val").glob("*.tar"))[0]) as tar:
        for member in tar.getmembers():
            ext = member.name.rsplit(".", 1)[-1]
            if ext in ("png", "wav") and ext not in media:
                media[ext] = tmp_path / f"prompt.{ext}"
                media[ext].write_bytes(tar.extractfile(member).read())
    args = [str(root / "A"), "--prompt", "Look:", "--image", str(media["png"]),
            "--audio", str(media["wav"]), "--max-new-tokens", "6"]
    outputs = []
    for _ in range(2):
        out = io.StringIO()
        with redirect_stdout(out):
            assert generate.main(args) == 0
        outputs.append(out.getvalue())
    assert outputs[0] == outputs[1]  # greedy is deterministic
    prompts = tmp_path / "prompts.txt"  # a batch: one output line per prompt, in order
    prompts.write_text("Look:\nThe\n")
    out = io.StringIO()
    with redirect_stdout(out):
        assert generate.main([*args[:1], "--prompts-file", str(prompts), *args[3:]]) == 0
    lines = out.getvalue().split("\n")
    assert len(lines) == 3 and lines[2] == ""
    assert lines[0] == generate.one_line(outputs[0].removesuffix("\n"))

    model, _, _ = load_checkpoint_model(root / "A")
    tok = ByteTokenizer()
    doc = generate.prompt_document("The", None, None)
    greedy = generate.generate(model, tok, doc, max_new_tokens=5, temperature=0.0, seed=0)
    sampled = [generate.generate(model, tok, doc, max_new_tokens=5, temperature=1.0, seed=s)
               for s in (1, 1)]
    assert len(greedy) <= 5 and all(0 <= i < 256 for i in greedy)  # text bytes, no specials
    assert sampled[0] == sampled[1]  # seeded sampling
    with pytest.raises(ValueError, match="nothing to continue"):
        generate.prompt_document("", None, None)
