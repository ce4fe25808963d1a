"""`mmtrain data verify` passes a good dataset and names every kind of damage."""

from __future__ import annotations

import os

import pytest

from data_tools.shards import write_dataset_index, write_shard
from mmtrain.data.schema import segments_json


@pytest.fixture
def dataset(tmp_path, fx, capsys):
    (tmp_path / "a.wav").write_bytes(fx.audio_bytes(0))
    rows = fx.image_table(tmp_path, 12)
    fx.write_parquet(tmp_path / "pairs.parquet", rows)
    out = tmp_path / "out"
    rc, _, _ = fx.run(capsys, "build", "image-text", tmp_path / "pairs.parquet", "-o", out,
                      "--max-samples", "4")
    assert rc == 0
    return out


def test_good_dataset_verifies(dataset, fx, capsys):
    rc, out, _ = fx.run(capsys, "verify", dataset, "--workers", "2")
    assert rc == 0 and out.startswith("OK") and "3 shards, 12 samples" in out and "MB/s" in out


def test_flipped_byte(dataset, fx, capsys):
    path = dataset / "shard-000001.tar"
    data = bytearray(path.read_bytes())
    data[len(data) // 3] ^= 0x01
    path.write_bytes(bytes(data))
    rc, out, _ = fx.run(capsys, "verify", dataset)
    assert rc == 1 and "PROBLEM shard-000001.tar: sha256" in out
    assert "shard-000000.tar" not in out and out.splitlines()[-1].startswith("FAILED")


def test_truncated_shard(dataset, fx, capsys):
    path = dataset / "shard-000002.tar"
    data = path.read_bytes()
    path.write_bytes(data[:1500])  # inside the second sample
    rc, out, _ = fx.run(capsys, "verify", dataset, "--no-decode")
    assert rc == 1
    assert f"shard-000002.tar: 1500 bytes, dataset.json says {len(data)}" in out
    assert "shard-000002.tar: unreadable after key" in out
    assert "shard-000002.tar: sha256" in out


def test_deleted_and_unlisted_shards(dataset, fx, capsys):
    os.rename(dataset / "shard-000000.tar", dataset / "shard-000099.tar")
    rc, out, _ = fx.run(capsys, "verify", dataset)
    assert rc == 1
    assert "PROBLEM shard-000000.tar: missing" in out
    assert "PROBLEM shard-000099.tar: a shard file that dataset.json does not list" in out


def test_undecodable_member_with_matching_hash(tmp_path, fx, capsys):
    """A shard written by another tool: hashes match, but an image does not decode."""
    png = fx.image_bytes(0)
    samples = [("good", {"json": segments_json([{"type": "image", "member": "0.png"},
                                                {"type": "text", "text": "ok"}], "t"),
                         "0.png": png}, "r0"),
               ("bad", {"json": segments_json([{"type": "image", "member": "0.png"},
                                               {"type": "text", "text": "cut"}], "t"),
                        "0.png": png[:40]}, "r1")]
    info, rows = write_shard(tmp_path / "shard-000000.tar", iter(samples))
    write_dataset_index(tmp_path, [info], rows)
    rc, out, _ = fx.run(capsys, "verify", tmp_path)
    assert rc == 1 and "sample bad: member 0.png: not a readable image" in out, out
    assert "sample good" not in out
    assert fx.run(capsys, "verify", tmp_path, "--no-decode")[0] == 0


def test_missing_dataset_json(tmp_path, fx, capsys):
    rc, out, _ = fx.run(capsys, "verify", tmp_path)
    assert rc == 1 and "dataset.json does not exist" in out
