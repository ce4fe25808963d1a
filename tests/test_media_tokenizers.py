"""Media tokenizers (issue 15, phase 1): shapes, versioned fingerprinted files, training through
`mmtrain data train-media-tokenizer` on a tiny synthetic corpus, and `tokenize-media` output.

The tokenizers here are narrow (channels 16,32) and train for a few dozen steps: enough to
show that training improves reconstruction, not the quality of the default ones (measured in
docs/architecture.md).
"""

from __future__ import annotations

import contextlib
import io
import json
import random
import tarfile

import numpy as np
import pytest
import soundfile
import torch
from PIL import Image

from data_tools.cli import main as data_main
from data_tools.media_tokenizer import tokenize_media
from data_tools.shards import read_dataset_index, write_dataset_index, write_shard
from data_tools.synth import make_audio, make_image, synth_corpus
from data_tools.verify import verify
from mmtrain.data.schema import Segment, encode_sample, parse_sample
from mmtrain.media_tokenizers import (CODES_SUFFIX, AudioTokenizer, GriffinLimVocoder,
                                      ImageTokenizer, build_tokenizer, codes_from_npy,
                                      load_tokenizer, read_tokenizer_info, save_tokenizer,
                                      tokenizer_fingerprint)

SMALL = "16,32"


def _small(kind: str):
    return build_tokenizer(kind, channels=(16, 32))


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("media_corpus")
    synth_corpus(root, samples=160, seed=5, shards=2, workers=1, val_fraction=0.25)
    return root


@pytest.fixture(scope="module")
def trained(corpus, tmp_path_factory):
    """Tokenizer directories trained by the command, and what the command printed."""
    out = tmp_path_factory.mktemp("media_tok")
    printed = {}
    for kind, steps in (("image", 60), ("audio", 40)):
        buf = io.StringIO()
        with contextlib.redirect_stdout(buf):
            rc = data_main(["train-media-tokenizer", kind, str(corpus / "train"), "--val",
                            str(corpus / "val"), "-o", str(out / kind), "--steps", str(steps),
                            "--batch-size", "16", "--channels", SMALL, "--lr", "3e-3"])
        assert rc == 0
        printed[kind] = buf.getvalue()
    return out, printed


def test_round_trip_shapes_and_media_out():
    torch.manual_seed(0)
    image, audio = _small("image"), _small("audio")
    png, _ = make_image(random.Random(1))
    wav, _ = make_audio(random.Random(2))
    x_img = torch.from_numpy(np.stack([image.input_from_bytes(png)] * 2))
    assert tuple(x_img.shape) == (2, 3, 32, 32) and x_img.min() >= -1 and x_img.max() <= 1
    codes = image.encode(x_img)
    assert codes.shape == (2, 8, 8) and image.code_shape == (8, 8) and image.codebook_size == 1000
    assert codes.dtype == torch.int64 and 0 <= int(codes.min()) and int(codes.max()) < 1000
    pixels = image.decode(codes)
    assert pixels.shape == (2, 3, 32, 32) and pixels.abs().max() <= 1
    assert Image.open(io.BytesIO(image.to_png(pixels[0]))).size == (32, 32)

    x_aud = torch.from_numpy(np.stack([audio.input_from_bytes(wav)] * 3))
    assert tuple(x_aud.shape) == (3, 40, 100)
    codes = audio.encode(x_aud)
    assert codes.shape == (3, 25) and audio.code_shape == (25,)
    mel = audio.decode(codes)
    assert mel.shape == (3, 40, 100)
    wave = audio.to_wave(mel[0], GriffinLimVocoder(n_iter=4))
    assert wave.shape == (16000,) and wave.dtype == np.float32 and np.isfinite(wave).all()
    assert soundfile.info(io.BytesIO(AudioTokenizer.to_wav(wave, 16000))).frames == 16000
    # Batched features are the one-by-one ones (tokenize-media batches, the API allows both).
    other, _ = make_audio(random.Random(3))
    raws = np.stack([audio.raw_from_bytes(wav), audio.raw_from_bytes(other)])
    assert np.allclose(audio.features(raws)[0], x_aud[0].numpy(), atol=1e-5)

    with pytest.raises(ValueError, match=r"decodes \[B, 8, 8\]"):
        image.decode(torch.zeros(1, 4, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="outside"):
        audio.decode(torch.full((1, 25), 1000))


def test_bad_configs_name_the_key(tmp_path, capsys):
    for flags, says in ((["--steps", "0"], "steps=0 must be >= 1"),
                        (["--levels", "2,5"], "image_tokenizer.levels=[2, 5]")):
        assert data_main(["train-media-tokenizer", "image", str(tmp_path), "-o",
                          str(tmp_path / "tok"), *flags]) == 2
        assert says in capsys.readouterr().err  # before any data is read (there is none)
    with pytest.raises(ValueError, match=r"image_tokenizer\.image_size=30"):
        build_tokenizer("image", image_size=30)
    with pytest.raises(ValueError, match=r"audio_tokenizer\.levels"):
        build_tokenizer("audio", levels=(2, 5))
    with pytest.raises(ValueError, match="65536"):
        build_tokenizer("image", levels=(8, 8, 8, 8, 8, 8))
    with pytest.raises(ValueError, match="kind 'video'"):
        build_tokenizer("video")


def test_files_are_versioned_and_fingerprinted(tmp_path):
    torch.manual_seed(0)
    tok = _small("image")
    fp = save_tokenizer(tok, tmp_path / "tok", quality={"psnr_db": 1.0})
    assert tokenizer_fingerprint(tmp_path / "tok") == fp and len(fp) == 64
    loaded = load_tokenizer(tmp_path / "tok")
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    assert torch.equal(loaded.encode(x), tok.eval().encode(x)) and loaded.fingerprint == fp
    with pytest.raises(ValueError, match="holds the image tokenizer, not audio"):
        load_tokenizer(tmp_path / "tok", kind="audio")

    config_path = tmp_path / "tok" / "config.json"
    weights_path = tmp_path / "tok" / "weights.safetensors"
    info = json.loads(config_path.read_text())
    # Another config with the same weights: the fingerprint no longer matches.
    other = {**info, "config": {**info["config"], "levels": [5, 5, 5, 5]}}
    config_path.write_text(json.dumps(other))
    with pytest.raises(ValueError, match="weights.safetensors: fingerprint .* does not match"):
        load_tokenizer(tmp_path / "tok")
    config_path.write_text(json.dumps(info))
    assert read_tokenizer_info(tmp_path / "tok")["quality"] == {"psnr_db": 1.0}
    # A flipped byte in the weights.
    data = bytearray(weights_path.read_bytes())
    data[-1] ^= 1
    weights_path.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="weights.safetensors: fingerprint"):
        tokenizer_fingerprint(tmp_path / "tok")
    # Another format version.
    config_path.write_text(json.dumps({**info, "format_version": 2}))
    with pytest.raises(ValueError, match="config.json: format_version 2; this mmtrain reads "
                                         "version 1"):
        load_tokenizer(tmp_path / "tok")
    with pytest.raises(ValueError, match="config.json is missing"):
        load_tokenizer(tmp_path / "nothing")


def test_training_improves_reconstruction(trained):
    out, printed = trained
    image = read_tokenizer_info(out / "image")
    audio = read_tokenizer_info(out / "audio")
    assert image["quality"]["psnr_db"] > image["quality"]["at_init"] + 3, image["quality"]
    assert audio["quality"]["mel_distance_db"] < audio["quality"]["at_init"] - 3, audio["quality"]
    assert image["code_shape"] == [8, 8] and audio["code_shape"] == [25]
    assert image["training"]["steps"] == 60 and image["quality"]["items"] > 0
    assert f"PSNR {image['quality']['psnr_db']:.2f} dB" in printed["image"]
    assert f"mel distance {audio['quality']['mel_distance_db']:.2f} dB" in printed["audio"]
    # An existing tokenizer is not replaced without --overwrite.
    assert data_main(["train-media-tokenizer", "image", "x", "-o", str(out / "image")]) == 2


def test_training_is_deterministic_from_the_seed(corpus, tmp_path):
    """Without --val, the keys hashing into 10 % are held out; the same seed gives the same
    tokenizer (fingerprint), and --overwrite replaces one."""
    args = ["train-media-tokenizer", "audio", str(corpus / "train"), "-o", str(tmp_path / "a"),
            "--steps", "10", "--batch-size", "16", "--channels", SMALL]
    with contextlib.redirect_stdout(io.StringIO()):
        assert data_main(args) == 0
        first = read_tokenizer_info(tmp_path / "a")
        assert data_main(args + ["--overwrite"]) == 0
    assert read_tokenizer_info(tmp_path / "a")["fingerprint"] == first["fingerprint"]
    assert first["quality"]["held_out"].startswith("keys hashing into 10%")
    assert first["quality"]["items"] > 0


def test_tokenize_media_adds_codes_and_keeps_everything_else(corpus, trained, tmp_path):
    out, _ = trained
    src, dst = corpus / "val", tmp_path / "codes"
    assert data_main(["tokenize-media", str(src), "--tokenizer", str(out / "image"),
                      "--tokenizer", str(out / "audio"), "-o", str(dst), "--batch-size", "7"]) == 0
    index, src_index = read_dataset_index(dst), read_dataset_index(src)
    assert [s["name"] for s in index["shards"]] == [s["name"] for s in src_index["shards"]]
    assert index["totals"]["samples"] == src_index["totals"]["samples"] and index["rejected"] == 0
    assert index["media_codes"]["image"]["fingerprint"] == tokenizer_fingerprint(out / "image")
    assert index["media_codes"]["audio"]["code_shape"] == [25]
    assert verify(dst).ok

    image, audio = load_tokenizer(out / "image"), load_tokenizer(out / "audio")
    counted = {"image": 0, "audio": 0}
    same = total = 0
    for shard in index["shards"]:
        before = _members(src / shard["name"])
        after = _members(dst / shard["name"])
        for key, members in before.items():
            added = {m: d for m, d in after[key].items() if m not in members}
            assert {m: after[key][m] for m in members} == members  # byte for byte
            doc = parse_sample(key, after[key])
            media = [s for s in doc.segments if s.type != "text"]
            assert sorted(added) == sorted(s.member + CODES_SUFFIX for s in media)
            for seg in media:
                tok = image if seg.type == "image" else audio
                codes = codes_from_npy(added[seg.member + CODES_SUFFIX])
                assert codes.shape == tok.code_shape
                x = torch.from_numpy(tok.input_from_bytes(seg.data))[None]
                same += int((torch.from_numpy(codes)[None] == tok.encode(x)).sum())
                total += codes.size
                out_shape = tok.decode(torch.from_numpy(codes)[None]).shape[1:]
                assert tuple(out_shape) == tok.input_shape
                counted[seg.type] += 1
    assert counted["image"] > 0 and counted["audio"] > 0
    # The codes are the tokenizer's (encoded in batches there, one by one here: float sums in
    # another order may move a value across an FSQ rounding boundary, rarely).
    assert same >= 0.99 * total


def test_tokenize_media_rejects_undecodable_media(trained, tmp_path):
    out, _ = trained
    good, _ = make_image(random.Random(0))
    samples = [(key, encode_sample([Segment(type="image", data=data, member="png"),
                                    Segment(type="text", text="a shape.")], source="t"), key)
               for key, data in (("good", good), ("bad", b"\x89PNG\r\n\x1a\n not an image"))]
    src = tmp_path / "src"
    src.mkdir()
    info, rows = write_shard(src / "shard-000000.tar", iter(samples))
    write_dataset_index(src, [info], rows)
    assert data_main(["tokenize-media", str(src), "--tokenizer", str(out / "image"),
                      "-o", str(tmp_path / "dst")]) == 0
    assert read_dataset_index(tmp_path / "dst")["totals"]["samples"] == 1
    rejected = [json.loads(line) for line in (tmp_path / "dst" / "rejected.jsonl").open()]
    assert [(r["shard"], r["key"]) for r in rejected] == [("shard-000000.tar", "bad")]
    assert "image" in rejected[0]["reason"]
    # Writing over the input is refused (it would delete the shards it reads).
    assert data_main(["tokenize-media", str(src), "--tokenizer", str(out / "image"),
                      "-o", str(src), "--overwrite"]) == 2
    assert read_dataset_index(src)["totals"]["samples"] == 2


def test_tokenize_media_killed_midway_leaves_no_dataset(corpus, trained, tmp_path, monkeypatch):
    out, _ = trained
    real, calls = ImageTokenizer.encode, []

    def dies_on_third_batch(self, x):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt  # as a kill would, in the middle of the first shard
        return real(self, x)

    monkeypatch.setattr(ImageTokenizer, "encode", dies_on_third_batch)
    with pytest.raises(KeyboardInterrupt):
        tokenize_media(str(corpus / "train"), [str(out / "image")], str(tmp_path / "dst"),
                       batch=4)
    assert sorted(p.name for p in (tmp_path / "dst").iterdir()) == []  # no shard, no temp file


def _members(path) -> dict[str, dict[str, bytes]]:
    samples: dict[str, dict[str, bytes]] = {}
    with tarfile.open(path) as tar:
        for m in tar.getmembers():
            key, suffix = m.name.split(".", 1)
            samples.setdefault(key, {})[suffix] = tar.extractfile(m).read()
    return samples
