"""`dedup` (exact across sources, near-duplicate images) and `split` (by key hash)."""

from __future__ import annotations

import io
import random

import pyarrow.parquet as pq
import webdataset as wds
from PIL import Image, ImageDraw, ImageEnhance

from data_tools.dedup import dhash
from data_tools.shards import read_dataset_index
from data_tools.split import is_val


def keys_and_texts(out) -> list[tuple[str, str]]:
    urls = [str(out / s["name"]) for s in read_dataset_index(out)["shards"]]
    return [(s["__key__"], s["json"].decode()) for s in wds.WebDataset(urls, shardshuffle=False)]


def photo(seed: int, size=(96, 64)) -> Image.Image:
    """Smooth shapes on a background: perceptual hashes are stable for it, distinct by seed."""
    rng = random.Random(seed)
    img = Image.new("RGB", size, tuple(rng.randrange(256) for _ in range(3)))
    draw = ImageDraw.Draw(img)
    for _ in range(6):
        x, y = rng.randrange(size[0]), rng.randrange(size[1])
        draw.ellipse((x, y, x + rng.randrange(20, 60), y + rng.randrange(15, 40)),
                     fill=tuple(rng.randrange(256) for _ in range(3)))
    return img


def encode(img: Image.Image, fmt: str = "PNG", **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def test_dhash_near_and_far():
    a = photo(0)
    near = ImageEnhance.Brightness(a.resize((120, 80))).enhance(1.05)  # rescaled, brighter, JPEG
    assert bin(dhash(encode(a)) ^ dhash(encode(near, "JPEG", quality=70))).count("1") <= 4
    assert bin(dhash(encode(a)) ^ dhash(encode(photo(1)))).count("1") > 10


def test_dedup_exact_across_sources_and_near_images(tmp_path, fx, capsys):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    for i in range(3):
        (tmp_path / "a" / f"{i}.png").write_bytes(encode(photo(i)))
    (tmp_path / "b" / "copy.png").write_bytes(encode(photo(0)))  # exact copy of a/0.png
    (tmp_path / "b" / "resized.jpg").write_bytes(
        encode(photo(1).resize((120, 80)), "JPEG", quality=80))  # near copy of a/1.png
    (tmp_path / "b" / "new.png").write_bytes(encode(photo(3)))
    fx.write_jsonl(tmp_path / "a/t.jsonl", [{"image": f"{i}.png", "caption": f"c{i}",
                                              "url": f"http://a/{i}"} for i in range(3)])
    fx.write_jsonl(tmp_path / "b/t.jsonl", [
        {"image": "copy.png", "caption": "c0", "url": "http://mirror/0"},  # same content
        {"image": "resized.jpg", "caption": "c1"},
        {"image": "new.png", "caption": "c3"},
        {"image": "copy.png", "caption": "other caption"}])  # same image, other text: kept
    for name in ("a", "b"):
        assert fx.run(capsys, "build", "image-text", tmp_path / name / "t.jsonl",
                      "-o", tmp_path / f"ds_{name}")[0] == 0

    rc, out, _ = fx.run(capsys, "dedup", tmp_path / "ds_a", tmp_path / "ds_b",
                        "-o", tmp_path / "exact")
    assert rc == 0 and "kept 6 of 7" in out and "1 exact" in out
    assert [k for k, _ in keys_and_texts(tmp_path / "exact")] == [
        "0-000000000", "0-000000001", "0-000000002", "1-000000001", "1-000000002", "1-000000003"]

    rc, out, _ = fx.run(capsys, "dedup", tmp_path / "ds_a", tmp_path / "ds_b",
                        "-o", tmp_path / "near", "--near-images")
    assert rc == 0 and "kept 4 of 7" in out and "1 exact and 2 near" in out
    kept = [k for k, _ in keys_and_texts(tmp_path / "near")]
    assert kept == ["0-000000000", "0-000000001", "0-000000002", "1-000000002"]
    removed = fx.read_jsonl(tmp_path / "near/removed.jsonl")
    assert [(r["key"], r["reason"]) for r in removed] == [
        ("000000000", "exact"), ("000000001", "near"), ("000000003", "near")]
    assert removed[1]["duplicate_of"].endswith("ds_a:000000001")
    manifest = pq.read_table(tmp_path / "near/manifest.parquet").to_pylist()
    assert [r["key"] for r in manifest] == kept  # with its own manifest
    assert fx.run(capsys, "verify", tmp_path / "near")[0] == 0
    rc, _, err = fx.run(capsys, "dedup", tmp_path / "ds_a", "-o", tmp_path / "near")
    assert rc == 2 and "--overwrite" in err


def test_split_is_reproducible_and_disjoint(tmp_path, fx, capsys):
    fx.write_jsonl(tmp_path / "t.jsonl", [{"text": f"document {i}"} for i in range(200)])
    assert fx.run(capsys, "build", "text", tmp_path / "t.jsonl", "-o", tmp_path / "all",
                  "--max-samples", "30")[0] == 0
    for name in ("s1", "s2"):
        rc, out, _ = fx.run(capsys, "split", tmp_path / "all", "-o", tmp_path / name,
                            "--val-fraction", "0.2", "--seed", "3")
        assert rc == 0 and "/val:" in out
    train, val = keys_and_texts(tmp_path / "s1/train"), keys_and_texts(tmp_path / "s1/val")
    assert 20 <= len(val) <= 60 and len(train) + len(val) == 200
    assert sorted(train + val) == sorted(keys_and_texts(tmp_path / "all"))
    assert all(is_val(k, 0.2, 3) for k, _ in val) and not any(is_val(k, 0.2, 3) for k, _ in train)
    for side in ("train", "val"):
        assert read_dataset_index(tmp_path / "s1" / side)["shards"] == \
            read_dataset_index(tmp_path / "s2" / side)["shards"]  # same bytes, same sha256
    other_seed = tmp_path / "s3"
    rc, _, _ = fx.run(capsys, "split", tmp_path / "all", "-o", other_seed, "--val-fraction", "0.2")
    assert rc == 0
    assert keys_and_texts(other_seed / "val") != val
