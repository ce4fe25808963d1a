"""`mmtrain data build` from each source kind; the shards are read by plain webdataset and tar."""

from __future__ import annotations

import io
import json
import shutil
import subprocess

import numpy as np
import pyarrow.parquet as pq
import pytest
import soundfile
import webdataset as wds
from PIL import Image

from data_tools.shards import read_dataset_index, sha256_file
from mmtrain.data.schema import parse_sample


def wds_samples(out) -> list[dict]:
    urls = [str(out / s["name"]) for s in read_dataset_index(out)["shards"]]
    return list(wds.WebDataset(urls, shardshuffle=False))


def segments(sample: dict) -> list[dict]:
    return json.loads(sample["json"])["segments"]


def test_image_text_parquet_read_by_webdataset_and_tar(tmp_path, fx, capsys):
    rows = fx.image_table(tmp_path, 5)
    fx.write_parquet(tmp_path / "pairs.parquet", rows)
    rc, out, _ = fx.run(capsys, "build", "image-text", tmp_path / "pairs.parquet",
                        "-o", tmp_path / "out", "--max-samples", "2")
    assert rc == 0 and "5 samples in 3 shards" in out and "rejected 0 rows" in out

    samples = wds_samples(tmp_path / "out")
    assert [s["__key__"] for s in samples] == [f"{i:09d}" for i in range(5)]
    first = samples[0]  # the WebDataset pair convention: KEY.png + KEY.txt + KEY.json
    assert first["png"] == (tmp_path / "media/img0.png").read_bytes()  # untouched bytes
    assert first["txt"] == b"picture number 0"
    assert json.loads(first["json"]) == {"score": 0.0}  # extra columns kept as metadata

    listing = subprocess.run(["tar", "-tf", str(tmp_path / "out/shard-000000.tar")],
                             capture_output=True, text=True, check=True).stdout.split()
    assert listing == ["000000000.json", "000000000.png", "000000000.txt",
                       "000000001.json", "000000001.png", "000000001.txt"]

    # open_clip's reading of image-text shards
    urls = [str(tmp_path / "out" / s["name"])
            for s in read_dataset_index(tmp_path / "out")["shards"]]
    pairs = list(wds.WebDataset(urls, shardshuffle=False).decode("pil").to_tuple("jpg;png", "txt"))
    assert len(pairs) == 5 and pairs[3][0].size == (24, 16) and pairs[3][1] == "picture number 3"

    manifest = pq.read_table(tmp_path / "out/manifest.parquet").to_pylist()
    assert len(manifest) == 5
    row = manifest[0]
    assert row["shard"] == "shard-000000.tar" and row["modalities"] == ["image", "text"]
    assert (row["n_images"], row["n_audio"], row["text_chars"]) == (1, 0, 16)
    assert row["est_tokens_text"] == 16 and row["est_tokens_image"] > 0
    assert row["source_row"].endswith("pairs.parquet:0") and len(row["content_hash"]) == 64
    index = read_dataset_index(tmp_path / "out")
    assert index["totals"]["samples"] == 5
    for shard in index["shards"]:
        assert sha256_file(tmp_path / "out" / shard["name"]) == shard["sha256"]


@pytest.mark.parametrize("fmt", ["csv", "tsv", "jsonl"])
def test_image_text_csv_tsv_jsonl_with_custom_columns(tmp_path, fx, capsys, fmt):
    rows = [{"file_name": r["image"], "alt": r["caption"], "id": f"k{i}"}
            for i, r in enumerate(fx.image_table(tmp_path, 3))]
    path = tmp_path / f"pairs.{fmt}"
    if fmt == "jsonl":
        fx.write_jsonl(path, rows)
    else:
        fx.write_csv(path, rows, delimiter="\t" if fmt == "tsv" else ",")
    rc, out, _ = fx.run(capsys, "build", "image-text", path, "-o", tmp_path / "out",
                        "--image-column", "file_name", "--text-column", "alt",
                        "--key-column", "id")
    assert rc == 0, out
    samples = wds_samples(tmp_path / "out")
    assert [s["__key__"] for s in samples] == ["k0", "k1", "k2"]
    assert samples[2]["txt"] == b"picture number 2"


def test_image_bytes_and_hf_struct_cells(tmp_path, fx, capsys):
    png, jpg = fx.image_bytes(1), fx.image_bytes(2, fmt="JPEG")
    fx.write_parquet(tmp_path / "t.parquet", [
        {"jpg": png, "TEXT": "raw bytes"},
        {"jpg": jpg, "TEXT": "jpeg bytes"}])
    fx.write_parquet(tmp_path / "u.parquet", [{"image": {"bytes": png, "path": None},
                                               "caption": "hf struct"}])
    rc, out, _ = fx.run(capsys, "build", "image-text", tmp_path / "t.parquet",
                        tmp_path / "u.parquet", "-o", tmp_path / "out")
    assert rc == 0 and "3 samples" in out
    samples = wds_samples(tmp_path / "out")
    assert samples[0]["png"] == png and samples[1]["jpg"] == jpg
    assert samples[2]["txt"] == b"hf struct"


def test_img2dataset_tars_reshard_and_filter(tmp_path, fx, capsys):
    members = []
    for i in range(6):
        size = (8, 8) if i == 5 else (24, 16)
        members += [(f"{i:09d}.jpg", fx.image_bytes(i, size, "JPEG")),
                    (f"{i:09d}.txt", f"caption {i}".encode()),
                    (f"{i:09d}.json", json.dumps({"url": f"http://x/{i}", "width": 24}).encode())]
    fx.write_tar(tmp_path / "00000.tar", members[:9])
    fx.write_tar(tmp_path / "00001.tar", [("./" + n, d) for n, d in members[9:]])  # tar -C . 
    rc, out, _ = fx.run(capsys, "build", "wds", tmp_path / "00000.tar", tmp_path / "00001.tar",
                        "-o", tmp_path / "out", "--min-image-side", "10", "--max-samples", "4")
    assert rc == 0 and "5 samples in 2 shards" in out and "filtered 1" in out
    samples = wds_samples(tmp_path / "out")
    assert [s["__key__"] for s in samples] == [f"{i:09d}" for i in range(5)]  # keys kept
    assert json.loads(samples[1]["json"]) == {"url": "http://x/1", "width": 24}
    assert samples[1]["txt"] == b"caption 1" and samples[1]["jpg"] == members[3][1]

    # our own shards are a valid wds input too: re-shard them, content unchanged
    rc, out, _ = fx.run(capsys, "build", "wds", tmp_path / "out", "-o", tmp_path / "again",
                        "--max-samples", "100")
    assert rc == 0 and "5 samples in 1 shards" in out
    again = wds_samples(tmp_path / "again")
    assert [(s["json"], s["jpg"], s["txt"]) for s in again] == \
        [(s["json"], s["jpg"], s["txt"]) for s in samples]


def test_pipe_inputs_only_with_allow_pipe(tmp_path, fx, capsys):
    fx.write_tar(tmp_path / "a.tar", [("k.png", fx.image_bytes(0)), ("k.txt", b"hi")])
    pipe = f"pipe:cat {tmp_path / 'a.tar'}"
    rc, _, err = fx.run(capsys, "build", "wds", pipe, "-o", tmp_path / "out")
    assert rc == 2 and "--allow-pipe" in err and not (tmp_path / "out").exists()
    rc, out, _ = fx.run(capsys, "build", "wds", pipe, "-o", tmp_path / "out", "--allow-pipe")
    assert rc == 0 and "1 samples" in out


def test_interleaved_documents_keep_order(tmp_path, fx, capsys):
    (tmp_path / "a.png").write_bytes(fx.image_bytes(1))
    (tmp_path / "b.png").write_bytes(fx.image_bytes(2))
    fx.write_parquet(tmp_path / "docs.parquet", [
        {"texts": ["Intro.", None, "Between.", None, "End."],
         "images": [None, "a.png", None, "b.png", None],
         "general_metadata": json.dumps({"url": "http://doc"})},
        {"texts": ["Only text."], "images": [None], "general_metadata": "{}"}])
    jpg = fx.image_bytes(3, fmt="JPEG")  # images as bytes (a binary list column)
    fx.write_parquet(tmp_path / "docs2.parquet", [{"texts": [None, "After."],
                                                   "images": [jpg, None]}])
    rc, out, _ = fx.run(capsys, "build", "interleaved", tmp_path / "docs.parquet",
                        tmp_path / "docs2.parquet", "-o", tmp_path / "out")
    assert rc == 0 and "3 samples" in out
    doc, text_only, from_bytes = wds_samples(tmp_path / "out")
    assert segments(doc) == [
        {"type": "text", "text": "Intro."}, {"type": "image", "member": "0.png"},
        {"type": "text", "text": "Between."}, {"type": "image", "member": "1.png"},
        {"type": "text", "text": "End."}]
    assert doc["0.png"] == (tmp_path / "a.png").read_bytes()
    assert json.loads(doc["json"])["meta"] == {"general_metadata": '{"url": "http://doc"}'}
    assert text_only["txt"] == b"Only text."  # [text] and [image, text]: the pair layout
    assert json.loads(text_only["json"]) == {"general_metadata": "{}"}
    assert from_bytes["jpg"] == jpg and from_bytes["txt"] == b"After."
    members = {k: v for k, v in doc.items() if not k.startswith("__")}
    assert [s.type for s in parse_sample(doc["__key__"], members).segments] == \
        ["text", "image", "text", "image", "text"]


def test_audio_text_wav_and_flac(tmp_path, fx, capsys):
    (tmp_path / "a.wav").write_bytes(fx.audio_bytes(0))
    (tmp_path / "b.flac").write_bytes(fx.audio_bytes(1, fmt="FLAC"))
    fx.write_csv(tmp_path / "clips.csv", [{"audio_filepath": "a.wav", "transcript": "hello"},
                                          {"audio_filepath": "b.flac", "transcript": "world"}])
    rc, out, _ = fx.run(capsys, "build", "audio-text", tmp_path / "clips.csv",
                        "-o", tmp_path / "out")
    assert rc == 0 and "2 samples" in out
    a, b = wds_samples(tmp_path / "out")
    assert a["txt"] == b"hello" and b["txt"] == b"world"
    assert a["wav"] == (tmp_path / "a.wav").read_bytes() and "flac" in b
    manifest = pq.read_table(tmp_path / "out/manifest.parquet").to_pylist()
    assert [r["n_audio"] for r in manifest] == [1, 1] and manifest[0]["est_tokens_audio"] > 0


def test_text_jsonl(tmp_path, fx, capsys):
    fx.write_jsonl(tmp_path / "t.jsonl", [{"text": "first document", "lang": "en"},
                                          {"text": "second one"}])
    rc, out, _ = fx.run(capsys, "build", "text", tmp_path / "t.jsonl", "-o", tmp_path / "out")
    assert rc == 0 and "2 samples" in out
    first = wds_samples(tmp_path / "out")[0]
    assert first["txt"] == b"first document" and json.loads(first["json"]) == {"lang": "en"}


def test_max_bytes_limits_shards_and_builds_are_identical(tmp_path, fx, capsys):
    rows = fx.image_table(tmp_path, 40)
    (tmp_path / "media/huge.png").write_bytes(np_noise_png(160))
    rows[20] = {"image": "media/huge.png", "caption": "bigger than a shard", "score": 0.0}
    fx.write_parquet(tmp_path / "pairs.parquet", rows)
    for name in ("a", "b"):
        rc, _, _ = fx.run(capsys, "build", "image-text", tmp_path / "pairs.parquet",
                          "-o", tmp_path / name, "--max-bytes", "20K", "--workers",
                          "2" if name == "a" else "1")
        assert rc == 0
    a, b = read_dataset_index(tmp_path / "a"), read_dataset_index(tmp_path / "b")
    big = [s for s in a["shards"] if s["bytes"] > 20 * 1024]
    assert len(a["shards"]) > 3 and len(big) == 1 and big[0]["samples"] == 1  # a shard of its own
    assert a["shards"] == b["shards"] and a["fingerprint"] == b["fingerprint"]  # workers: same


def np_noise_png(side: int) -> bytes:
    pixels = np.random.default_rng(0).integers(0, 256, (side, side, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


def test_media_normalisation(tmp_path, fx, capsys):
    (tmp_path / "big.png").write_bytes(fx.image_bytes(0, size=(200, 100)))
    (tmp_path / "small.png").write_bytes(fx.image_bytes(1, size=(20, 10)))
    fx.write_jsonl(tmp_path / "i.jsonl", [{"image": "big.png", "caption": "big"},
                                          {"image": "small.png", "caption": "small"}])
    rc, _, _ = fx.run(capsys, "build", "image-text", tmp_path / "i.jsonl", "-o",
                      tmp_path / "img", "--image-max-side", "64", "--image-format", "jpeg")
    assert rc == 0
    big, small = wds_samples(tmp_path / "img")
    assert Image.open(io.BytesIO(big["jpg"])).size == (64, 32)
    assert Image.open(io.BytesIO(small["jpg"])).format == "JPEG"

    (tmp_path / "st.wav").write_bytes(fx.audio_bytes(0, seconds=2.0, rate=44100, channels=2))
    (tmp_path / "ok.wav").write_bytes(fx.audio_bytes(1, seconds=0.5, rate=16000))
    fx.write_jsonl(tmp_path / "a.jsonl", [{"audio": "st.wav", "text": "stereo"},
                                          {"audio": "ok.wav", "text": "ok"}])
    rc, _, _ = fx.run(capsys, "build", "audio-text", tmp_path / "a.jsonl", "-o", tmp_path / "aud",
                      "--audio-mono", "--audio-sample-rate", "16000", "--audio-max-seconds", "1",
                      "--audio-format", "flac", "--workers", "1")
    assert rc == 0
    stereo, ok = wds_samples(tmp_path / "aud")
    info = soundfile.info(io.BytesIO(stereo["flac"]))
    assert (info.channels, info.samplerate, info.frames) == (1, 16000, 16000)
    assert soundfile.info(io.BytesIO(ok["flac"])).frames == 8000


def test_output_dir_holding_another_dataset_is_refused(tmp_path, fx, capsys):
    fx.write_jsonl(tmp_path / "t.jsonl", [{"text": "a"}])
    (tmp_path / "out").mkdir()
    shutil.copy(tmp_path / "t.jsonl", tmp_path / "out" / "dataset.json")
    rc, _, err = fx.run(capsys, "build", "text", tmp_path / "t.jsonl", "-o", tmp_path / "out")
    assert rc == 2 and "--overwrite" in err
    rc, _, err = fx.run(capsys, "build", "text", tmp_path / "missing.jsonl", "-o", tmp_path / "o2")
    assert rc == 2 and "does not exist" in err
