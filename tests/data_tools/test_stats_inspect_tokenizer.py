"""`synth`, `stats`, `inspect`, `train-tokenizer` and every command's --help."""

from __future__ import annotations

import json

import pytest
from PIL import Image

from data_tools.cli import build_parser, main
from data_tools.stats import compute_stats
from data_tools.tokenizer_train import iter_texts
from mmtrain.data.tokenizer import SPECIAL_TOKENS, BPETokenizer

COMMANDS = ("build", "synth", "verify", "stats", "inspect", "dedup", "split", "train-tokenizer",
            "train-media-tokenizer", "tokenize-media")


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo")
    assert main(["synth", str(root), "--samples", "80", "--shards", "2", "--workers", "1"]) == 0
    return root


def test_synth_writes_verifiable_train_and_val(demo, fx, capsys):
    for side in ("train", "val"):
        rc, out, _ = fx.run(capsys, "verify", demo / side)
        assert rc == 0, out
    assert json.loads((demo / "train/dataset.json").read_text())["totals"]["samples"] == 80


def test_stats_per_modality(demo, fx, capsys):
    s = compute_stats(demo / "train", scan=True)
    mods = s["modalities"]
    assert s["samples"] == 80 and mods["text"]["samples"] == 80
    assert 0 < mods["image"]["samples"] < 80 and 0 < mods["audio"]["samples"] < 80
    assert mods["image"]["est_tokens"] == 18 * mods["image"]["items"]
    assert s["media"]["image_formats"] == {"PNG": mods["image"]["items"]}
    assert s["media"]["audio_seconds"]["max"] == pytest.approx(1.0)
    assert sum(s["mix"].values()) == 80
    rc, out, _ = fx.run(capsys, "stats", demo / "train")
    assert rc == 0
    lines = out.splitlines()
    assert any(line.startswith("image") for line in lines)
    assert any(line.startswith("audio") for line in lines) and "p50" in out
    rc, out, _ = fx.run(capsys, "stats", demo / "train", "--json")
    assert json.loads(out)["samples"] == 80


def test_inspect_samples_key_and_contact_sheet(demo, tmp_path, fx, capsys):
    sheet = tmp_path / "sheet.png"
    rc, out, _ = fx.run(capsys, "inspect", demo / "train", "-n", "12", "--contact-sheet", sheet)
    assert rc == 0 and out.count("── train-") == 12 and "text" in out
    with Image.open(sheet) as img:
        assert img.format == "PNG" and img.width >= 128
    assert "contact sheet of" in out

    rc, out, _ = fx.run(capsys, "inspect", demo / "train", "--key", "train-000041")
    assert rc == 0 and out.count("── ") == 1 and "train-000041" in out
    assert "synth:train:41" in out  # the source row, from the manifest
    rc, out, _ = fx.run(capsys, "inspect", demo / "train", "--key", "train-000000")
    assert rc == 0 and 'meta {"source": "synth/image"}' in out  # a pair's KEY.json
    assert "[0] image  png" in out and "[1] text" in out
    rc, _, err = fx.run(capsys, "inspect", demo / "train", "--key", "nope")
    assert rc == 2 and "not in" in err


def test_train_tokenizer_round_trip(demo, tmp_path, fx, capsys):
    path = tmp_path / "tok" / "tokenizer.json"
    rc, out, _ = fx.run(capsys, "train-tokenizer", demo / "train", "-o", path,
                        "--vocab-size", "400", "--min-frequency", "1")
    assert rc == 0 and "byte-level BPE" in out
    tok = BPETokenizer(path)  # the loader's class: finds every special token
    assert set(tok.special) == set(SPECIAL_TOKENS)
    assert 300 < tok.vocab_size <= 400
    texts = list(iter_texts([str(demo / "train")]))
    assert len(texts) > 80
    for text in texts[:50] + ["unseen wörds ✓ 12345"]:
        ids = tok.encode(text)
        assert tok.decode(ids) == text
    assert len(tok.encode(texts[0])) < len(texts[0].encode())  # merges learned
    spelled = tok.encode("<|image|>")  # text that spells a special token stays text
    assert tok.image not in spelled and tok.decode(spelled) == "<|image|>"
    rc, _, err = fx.run(capsys, "train-tokenizer", demo / "train", "-o", path,
                        "--vocab-size", "100")
    assert rc == 2 and "--vocab-size" in err


@pytest.mark.parametrize("command", COMMANDS)
def test_help_explains_inputs_outputs_with_example(command, capsys):
    with pytest.raises(SystemExit) as e:
        main([command, "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert f"usage: mmtrain data {command}" in out
    assert "example:\n  mmtrain data " + command in out


def test_every_command_is_listed():
    sub = next(a for a in build_parser()._actions if a.dest == "command")
    assert tuple(sub.choices) == COMMANDS
