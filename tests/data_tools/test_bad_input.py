"""Bad input never crashes a build, is never lost silently, and never writes outside OUT."""

from __future__ import annotations

import io
import json
import os
import tarfile

import numpy as np
import soundfile
import webdataset as wds

from data_tools.shards import read_dataset_index


def tree(root) -> dict[str, int]:
    return {str(p.relative_to(root)): p.stat().st_size for p in sorted(root.rglob("*"))}


def outside(root, out_name: str = "out") -> dict[str, int]:
    return {p: s for p, s in tree(root).items() if p.split("/")[0] != out_name}


def built_keys(out) -> list[str]:
    urls = [str(out / s["name"]) for s in read_dataset_index(out)["shards"]]
    return [s["__key__"] for s in wds.WebDataset(urls, shardshuffle=False)]


def test_bad_image_rows_are_rejected_with_reasons(tmp_path, fx, capsys):
    src = tmp_path / "src"
    (src / "m").mkdir(parents=True)
    png = fx.image_bytes(0)
    jpg = fx.image_bytes(1, size=(64, 64), fmt="JPEG")
    files = {
        "good.png": png, "good2.jpg": jpg, "noise.png": os.urandom(300),
        "cut.png": png[: len(png) // 2], "cut.jpg": jpg[: len(jpg) // 2],
        "bomb.png": fx.bomb_png(), "big.png": fx.bomb_png(10_000, 6_000),
        "anim.gif": fx.image_bytes(2, fmt="GIF"), "x.bmp": fx.image_bytes(3, fmt="BMP"),
    }
    for name, data in files.items():
        (src / "m" / name).write_bytes(data)
    (tmp_path / "outside.png").write_bytes(png)
    marker = tmp_path / "pwned"
    rows = [  # (expected code or None, row)
        (None, {"key": "ok1", "image": "m/good.png", "caption": "fine"}),
        ("missing_media", {"key": "r1", "image": "m/nope.png", "caption": "missing"}),
        ("corrupt_image", {"key": "r2", "image": "m/noise.png", "caption": "noise"}),
        ("corrupt_image", {"key": "r3", "image": "m/cut.png", "caption": "truncated png"}),
        ("corrupt_image", {"key": "r4", "image": "m/cut.jpg", "caption": "truncated jpeg"}),
        ("image_too_large", {"key": "r5", "image": "m/bomb.png", "caption": "bomb"}),
        ("image_too_large", {"key": "r6", "image": "m/big.png", "caption": "60 Mpx"}),
        (None, {"key": "r7", "image": "m/anim.gif", "caption": "gif: stored as PNG"}),
        ("unsupported_format", {"key": "r8", "image": "m/x.bmp", "caption": "bmp"}),
        ("empty_text", {"key": "r9", "image": "m/good.png", "caption": ""}),
        ("empty_text", {"key": "r10", "image": "m/good.png", "caption": "  \n"}),
        ("empty_text", {"key": "r11", "image": "m/good.png", "caption": None}),
        (None, {"key": "a/b", "image": "m/good.png", "caption": "a folder, as webdataset keys"}),
        ("unsafe_name", {"key": "../../escape", "image": "m/good.png", "caption": "dots"}),
        ("unsafe_name", {"key": "/abs", "image": "m/good.png", "caption": "absolute"}),
        ("unsafe_name", {"key": "k.jpg", "image": "m/good.png", "caption": "dot in key"}),
        ("unsafe_path", {"key": "r12", "image": "../outside.png", "caption": "escapes root"}),
        ("unsafe_path", {"key": "r13", "image": str(tmp_path / "outside.png"), "caption": "abs"}),
        ("unsupported_format", {"key": "r14", "image": "http://example.com/a.jpg",
                                "caption": "url"}),
        ("unsupported_format", {"key": "r15", "image": f"pipe:touch {marker}", "caption": "pipe"}),
        ("duplicate_key", {"key": "ok1", "image": "m/good2.jpg", "caption": "same key"}),
        ("bad_row", {"key": "r16", "picture": "m/good.png", "caption": "no image column"}),
        ("bad_row", "{not json"),
        ("bad_row", {"key": "r17", "image": 12, "caption": "int"}),
        ("missing_media", {"key": "r18", "image": "m", "caption": "a directory"}),
        (None, {"key": "ok2", "image": "m/good2.jpg", "caption": "also fine"}),
    ]
    fx.write_jsonl(src / "pairs.jsonl", [r for _, r in rows])
    before = tree(tmp_path)

    out = tmp_path / "out"
    rc, stdout, _ = fx.run(capsys, "build", "image-text", src / "pairs.jsonl", "-o", out,
                           "--max-samples", "1", "--workers", "2")
    assert rc == 0
    rejected = fx.read_jsonl(out / "rejected.jsonl")
    expected = [(f"{src / 'pairs.jsonl'}:{i}", code) for i, (code, _) in enumerate(rows) if code]
    assert [(r["source_row"], r["code"]) for r in rejected] == expected
    assert all(r["reason"] for r in rejected)
    assert "resolves outside" in rejected[[c for _, c in expected].index("unsafe_path")]["reason"]
    assert built_keys(out) == ["ok1", "r7", "a/b", "ok2"]

    n_bad = sum(1 for code, _ in rows if code)
    assert f"rejected {n_bad} rows" in stdout and "corrupt_image 3" in stdout
    assert read_dataset_index(out)["rejected"] == n_bad
    assert not marker.exists()  # pipe: media are never run
    assert outside(tmp_path) == before  # nothing written outside OUT


def test_bad_audio_rows(tmp_path, fx, capsys):
    wav, flac = fx.audio_bytes(0), fx.audio_bytes(1, fmt="FLAC")
    buf = io.BytesIO()
    soundfile.write(buf, np.zeros(8000, np.float32), 16000, format="OGG", subtype="VORBIS")
    files = {"ok.wav": wav, "ok.flac": flac, "cut.wav": wav[: len(wav) // 2],
             "cut.flac": flac[: len(flac) // 2], "noise.wav": b"RIFF" + os.urandom(200),
             "clip.ogg": buf.getvalue(), "text.wav": b"this is not audio at all"}
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    rows = [(None, {"audio": "ok.wav", "text": "a"}),
            ("corrupt_audio", {"audio": "cut.wav", "text": "truncated wav"}),
            ("corrupt_audio", {"audio": "cut.flac", "text": "truncated flac"}),
            ("corrupt_audio", {"audio": "noise.wav", "text": "noise"}),
            (None, {"audio": "clip.ogg", "text": "ogg vorbis"}),
            ("unsupported_format", {"audio": "text.wav", "text": "not audio"}),
            ("empty_text", {"audio": "ok.flac", "text": ""}),
            (None, {"audio": "ok.flac", "text": "b"})]
    fx.write_jsonl(tmp_path / "clips.jsonl", [r for _, r in rows])
    rc, stdout, _ = fx.run(capsys, "build", "audio-text", tmp_path / "clips.jsonl",
                           "-o", tmp_path / "out")
    assert rc == 0 and "3 samples" in stdout
    codes = [r["code"] for r in fx.read_jsonl(tmp_path / "out/rejected.jsonl")]
    assert codes == [code for code, _ in rows if code]


def test_bad_tar_members_and_truncated_tar(tmp_path, fx, capsys):
    png = fx.image_bytes(0)
    fx.write_tar(tmp_path / "a.tar", [
        ("good.png", png), ("good.txt", b"fine"),
        ("../../evil.png", png), ("../../evil.txt", b"escape"),
        ("/abs/x.png", png), ("/abs/x.txt", b"absolute"),
        ("dir/k.png", png), ("dir/k.txt", b"subdir"),
        ("two.png", png), ("two.jpg", fx.image_bytes(1, fmt="JPEG")), ("two.txt", b"ambiguous"),
        ("bad.png", png), ("bad.txt", b"\xff\xfe not utf-8"),
        ("meta.png", png), ("meta.txt", b"bad json"), ("meta.json", b"{oops"),
        ("last.png", png), ("last.txt", b"also fine")])
    full = tmp_path / "b_full.tar"
    fx.write_tar(full, [("k0.png", png), ("k0.txt", b"x"), ("k1.png", png), ("k1.txt", b"y")])
    with tarfile.open(full) as tar:
        cut = tar.getmember("k1.png").offset_data + 10
    (tmp_path / "b.tar").write_bytes(full.read_bytes()[:cut])  # ends inside a member
    full.unlink()
    before = tree(tmp_path)

    rc, stdout, _ = fx.run(capsys, "build", "wds", tmp_path / "a.tar", tmp_path / "b.tar",
                           "-o", tmp_path / "out")
    assert rc == 0
    assert built_keys(tmp_path / "out") == ["good", "dir/k", "last", "k0"]
    rejected = fx.read_jsonl(tmp_path / "out/rejected.jsonl")
    by_row = {r["source_row"].split(":", 1)[1]: r["code"] for r in rejected}
    assert by_row["../../evil"] == by_row["/abs/x"] == "unsafe_name"
    assert by_row["two"] == by_row["bad"] == "invalid_sample"
    assert by_row["meta"] == "bad_row"
    assert rejected[-1]["code"] == "bad_source" and "b.tar" in rejected[-1]["source_row"]
    assert outside(tmp_path) == before
    assert not (tmp_path.parent / "evil.png").exists()
    assert f"rejected {len(rejected)} rows" in stdout


def test_corrupt_table_and_all_rows_rejected(tmp_path, fx, capsys):
    (tmp_path / "broken.parquet").write_bytes(b"PAR1 this is not parquet")
    fx.write_jsonl(tmp_path / "t.jsonl", [{"text": ""}, {"text": "   "}])
    rc, stdout, _ = fx.run(capsys, "build", "text", tmp_path / "broken.parquet",
                           tmp_path / "t.jsonl", "-o", tmp_path / "out")
    assert rc == 0 and "0 samples in 0 shards" in stdout
    codes = [r["code"] for r in fx.read_jsonl(tmp_path / "out/rejected.jsonl")]
    assert codes == ["bad_source", "empty_text", "empty_text"]
    index = read_dataset_index(tmp_path / "out")
    assert index["totals"]["samples"] == 0 and index["rejected"] == 3
    assert json.loads((tmp_path / "out/dataset.json").read_text())["shards"] == []
