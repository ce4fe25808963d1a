"""A run that generates media, through the commands a user types: `mmtrain train` with media
tokenizers (codes encoded on the fly in a decode worker), then `mmtrain eval` and
`mmtrain generate --image-out/--audio-out` on its checkpoint. The tokenizers are untrained (seeded):
this checks the plumbing; tests/test_demo.py checks that the demo really learns to generate."""

from __future__ import annotations

import io
import json
import subprocess
import sys

import pytest
import soundfile
import torch
from PIL import Image

from tests.conftest import cli_env, run_tiny_train

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def generation_run(demo_corpus, tmp_path_factory):
    from mmtrain.media_tokenizers import build_tokenizer, save_tokenizer

    root = tmp_path_factory.mktemp("generation_run")
    for kind in ("image", "audio"):
        torch.manual_seed(0)
        save_tokenizer(build_tokenizer(kind), root / "tok" / kind)
    settings = {"data.image_tokenizer": root / "tok" / "image",
                "data.audio_tokenizer": root / "tok" / "audio",
                "model.image_codes": 1000, "model.audio_codes": 1000,
                "model.code_loss_weight": 0.5, "data.generation_fraction": 0.5,
                "data.num_workers": 1, "train.steps": 3, "train.eval_batches": 2}
    proc = run_tiny_train(demo_corpus, root / "runs", "gen", settings)
    return root, root / "runs" / "gen", proc


def test_training_reports_generation_gains_and_records_the_tokenizers(generation_run):
    root, run, proc = generation_run
    assert "image-generation gain" in proc.stdout and "audio-generation gain" in proc.stdout
    val = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()
           if json.loads(line)["split"] == "val"][-1]
    for key in ("image_generation_gain", "audio_generation_gain", "image_code_loss",
                "audio_code_loss_shuffled", "media_gain"):
        assert key in val, key
    from mmtrain.media_tokenizers import tokenizer_fingerprint

    state = json.loads((run / "checkpoints" / "step_00000003" / "loader" / "rank_1.json").read_text())
    assert state["media_tokenizers"] == {kind: tokenizer_fingerprint(root / "tok" / kind)
                                         for kind in ("image", "audio")}


def test_eval_prints_the_generation_gains(generation_run):
    _, run, _ = generation_run
    proc = subprocess.run([sys.executable, "-m", "mmtrain", "eval", str(run), "--json"],
                          env=cli_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert {"image_generation_gain", "audio_generation_gain", "media_gain"} <= set(result)


def test_generate_writes_a_picture_and_a_sound(generation_run, tmp_path):
    _, run, _ = generation_run
    proc = subprocess.run([sys.executable, "-m", "mmtrain", "generate", str(run), "--prompt",
                           "a red circle left of a blue square.", "--image-out",
                           str(tmp_path / "x.png"), "--audio-out", str(tmp_path / "y.wav"),
                           "--cfg", "2", "--temperature", "1", "--seed", "3"],
                          env=cli_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    with Image.open(tmp_path / "x.png") as img:
        assert img.size == (32, 32) and img.mode == "RGB"
    wave, rate = soundfile.read(io.BytesIO((tmp_path / "y.wav").read_bytes()))
    assert rate == 16000 and len(wave) == 16000
