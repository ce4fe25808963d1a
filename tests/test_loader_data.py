"""Loader sources (file://, http://, pipe: gating, weighted mixing) and bad data handling."""

import functools
import hashlib
import http.server
import io
import json
import struct
import tarfile
import threading
import zlib
from collections import Counter
from pathlib import Path

import pytest

from data_tools.shards import ShardInfo, write_dataset_index
from data_tools.synth import make_sample
from mmtrain.data.config import DataConfig
from mmtrain.data.loader import ShardLoader
from mmtrain.data.tokenizer import ByteTokenizer
from mmtrain.model import ModelConfig

TOK = ByteTokenizer()
SPEC = ModelConfig().media()


def loader(train, tmp_path=None, **kw):
    cfg = DataConfig(**{**dict(train=str(train), num_workers=0, num_streams=2, seq_len=256,
                               micro_batch_size=4, shuffle_buffer=4), **kw})
    q = tmp_path / "quarantine.jsonl" if tmp_path else None
    return ShardLoader(cfg, spec=SPEC, tokenizer=TOK, rank=0, world_size=1, quarantine=q)


def test_file_url_and_http_url_read_the_same_batches(demo_corpus):
    local = loader(demo_corpus / "train").next_batch()
    via_file = loader(f"file://{demo_corpus / 'train'}").next_batch()
    assert via_file.doc_keys == local.doc_keys
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(demo_corpus))
    handler.log_message = lambda *a: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        via_http = loader(f"http://127.0.0.1:{server.server_port}/train").next_batch()
    finally:
        server.shutdown()
    assert via_http.doc_keys == local.doc_keys


def test_pipe_urls_need_explicit_permission(tmp_path):
    with pytest.raises(ValueError, match="data.allow_pipe"):
        loader(f"pipe:cat {tmp_path}")


def test_weighted_mix_is_deterministic_and_proportional(tmp_path):
    from data_tools.synth import synth_split

    for name in ("a", "b"):
        synth_split(tmp_path / name, split=name, samples=240, seed=1, samples_per_shard=40, workers=1)
    mix = {str(tmp_path / "a"): 0.75, str(tmp_path / "b"): 0.25}
    one = loader(tmp_path / "a", num_streams=4, mix=mix)
    keys = [k for _ in range(8) for _, k in one.next_batch().doc_keys]
    again = loader(tmp_path / "a", num_streams=4, mix=mix)
    assert keys == [k for _ in range(8) for _, k in again.next_batch().doc_keys]
    share = Counter(k.split("-")[0] for k in keys)
    assert 0.6 < share["a"] / len(keys) < 0.9, share


# --------------------------------------------------------------------------- bad data

def png_bomb_header(width=100_000, height=100_000) -> bytes:
    """A tiny PNG whose header declares width × height pixels."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\0" * 100)) + chunk(b"IEND", b""))


def write_raw_shard(path: Path, samples) -> ShardInfo:
    with tarfile.open(path, "w") as tar:
        for key, members in samples:
            for suffix, data in members.items():
                info = tarfile.TarInfo(f"{key}.{suffix}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    data = path.read_bytes()
    return ShardInfo(path.name, hashlib.sha256(data).hexdigest(), len(samples), len(data))


def media_sample(i: int, kind: str):
    """A sample of the synth corpus with an image (kind 'image') or audio (kind 'audio')."""
    for j in range(i * 50, i * 50 + 500):
        key, members, _ = make_sample(7, "bad", j)
        if any(m.endswith("png" if kind == "image" else "wav") for m in members):
            return f"bad-{i:05d}", members


@pytest.fixture(scope="module")
def bad_corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("bad")
    shards, corrupt = [], set()
    for s in range(4):
        samples = []
        for i in range(s * 50, s * 50 + 50):
            key, members = media_sample(i, "image" if i % 2 else "audio")
            media = next(m for m in members if m != "json")
            if i == 10:
                members[media] = b"\x89PNG\r\n\x1a\n garbage"  # corrupt image / audio bytes
            elif i == 61:
                members[media] = b"RIFF\x00\x00garbage"
            elif i == 112:
                del members[media]  # the sample's JSON refers to a missing member
            elif i == 163:
                members[media] = png_bomb_header() if media.endswith("png") else members[media]
                members = {k.replace(".wav", ".png") if k == media else k: v
                           for k, v in members.items()}
                members["json"] = members["json"].replace(b".wav", b".png").replace(
                    b'"audio"', b'"image"')
            if i in (10, 61, 112, 163):
                corrupt.add(key)
            samples.append((key, members))
        shards.append(write_raw_shard(root / f"shard-{s:05d}.tar", samples))
    # A truncated shard (half its bytes) and a zero-byte shard, both still listed with 50 samples.
    full = [(f"trunc-{i:05d}", media_sample(300 + i, "image")[1]) for i in range(50)]
    info = write_raw_shard(root / "shard-00004.tar", full)
    data = (root / "shard-00004.tar").read_bytes()
    (root / "shard-00004.tar").write_bytes(data[: len(data) // 2])
    shards.append(info)
    (root / "shard-00005.tar").write_bytes(b"")
    shards.append(ShardInfo("shard-00005.tar", hashlib.sha256(b"").hexdigest(), 50, 0))
    write_dataset_index(root, shards, [])
    return root, corrupt


def test_bad_samples_and_shards_are_skipped_counted_and_quarantined(bad_corpus, tmp_path):
    root, corrupt = bad_corpus
    ld = loader(root, tmp_path)
    for _ in range(60):  # a full epoch of all streams and more
        b = ld.next_batch()
        assert b.tokens.shape == (4, 256)
        assert b.counts["real_tokens"] >= 0.9 * b.tokens.numel()  # batches stay full
    assert ld.epochs() >= 1
    records = [json.loads(line) for line in (tmp_path / "quarantine.jsonl").read_text().splitlines()]
    bad_keys = {r["key"] for r in records if r["key"] != "*"}
    assert corrupt <= bad_keys
    reasons = " ".join(r["reason"] for r in records)
    assert "decompression bomb" in reasons and "missing member" in reasons
    shard_notes = {r["shard"]: r["reason"] for r in records if r["key"] == "*"}
    assert "shard-00005.tar" in shard_notes and "shard-00004.tar" in shard_notes
    assert "dataset.json says 50" in shard_notes["shard-00004.tar"]
    assert ld.skipped >= len(corrupt)


def test_skipping_is_deterministic_so_resume_stays_exact(bad_corpus):
    root, _ = bad_corpus
    straight = loader(root)
    expected = [straight.next_batch().doc_keys for _ in range(30)]
    first = loader(root)
    for i in range(12):
        assert first.next_batch().doc_keys == expected[i]
    resumed = loader(root)
    resumed.load_state_dict([json.loads(json.dumps(first.state_dict()))])
    assert [resumed.next_batch().doc_keys for _ in range(18)] == expected[12:]


def test_consecutive_failures_stop_with_the_shard_named(tmp_path):
    samples = []
    for i in range(20):
        key, members = media_sample(i, "image")
        media = next(m for m in members if m != "json")
        members[media] = b"not an image"
        samples.append((key, members))
    infos = [write_raw_shard(tmp_path / f"shard-{s}.tar", samples) for s in range(2)]
    write_dataset_index(tmp_path, infos, [])
    with pytest.raises(RuntimeError, match=r"5 consecutive bad samples in shard .*shard-"):
        loader(tmp_path, max_consecutive_failures=5).next_batch()
