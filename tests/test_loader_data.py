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

import numpy as np

from data_tools.shards import ShardInfo, write_dataset_index
from data_tools.synth import make_sample
from mmtrain.data.config import DataConfig
from mmtrain.data.loader import (ShardLoader, StreamPlan, StreamState, consumer_items,
                                 share_names)
from mmtrain.metrics import share_metrics
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


WORDS = "the a red blue circle square sound of rain over hills quiet loud seven".split()


def text_dataset(root: Path, name: str, sizes: list[int], seed: int = 0) -> Path:
    """Text-only shards (`KEY.txt`) of the given sample counts; keys are NAME-SHARD-INDEX."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    infos = []
    for s, n in enumerate(sizes):
        samples = [(f"{name}-{s:02d}-{i:04d}",
                    {"txt": " ".join(rng.choice(WORDS, rng.integers(5, 40))).encode()})
                   for i in range(n)]
        infos.append(write_raw_shard(root / f"shard-{s:05d}.tar", samples))
    write_dataset_index(root, infos, [])
    return root


MIX_WEIGHTS = {"tiny": 0.01, "quarter": 0.25, "rest": 0.74}


@pytest.fixture(scope="module")
def mix3(tmp_path_factory):
    root = tmp_path_factory.mktemp("mix")
    return {str(text_dataset(root / name, name, [60, 60, 60], seed=i)): w
            for i, (name, w) in enumerate(MIX_WEIGHTS.items())}


def mix_cfg(mix: dict[str, float], **kw) -> DataConfig:
    return DataConfig(**{**dict(train=next(iter(mix)), mix=mix, num_workers=0, num_streams=6,
                                seq_len=64, micro_batch_size=4), **kw})


@pytest.mark.parametrize("ranks, workers", [(1, 1), (1, 4), (2, 1), (2, 3), (3, 1), (3, 2)])
def test_mix_shares_match_weights_at_any_layout(mix3, ranks, workers):
    """Each dataset's share of the rows is its weight ±1.5 points from 2,000 rows on, for the run
    and for every rank, with ranks × workers consumers simulated in one process as they run:
    each rank's DataLoader takes batches from its workers in turn, all ranks step together."""
    cfg = mix_cfg(mix3)
    plan = StreamPlan(cfg)
    consumers = ranks * workers
    fresh = {s: StreamState() for s in range(plan.num_streams)}
    gens = [consumer_items(plan, cfg, SPEC, TOK, fresh, c, consumers) for c in range(consumers)]
    rows = {}  # stream → rows delivered
    weights = np.array(list(MIX_WEIGHTS.values()))
    rank_of = {s: c // workers for c in range(consumers)
               for s in plan.streams_of_consumer(c, consumers)}
    checked, step = 0, 0
    while sum(rows.values()) < 3000:
        for r in range(ranks):
            item = next(gens[r * workers + step % workers])
            rows.update({s: st["rows"] for s, st in item.states.items()})
        step += 1
        per = np.zeros((ranks, len(weights)))
        for s, n in rows.items():
            per[rank_of[s], plan.dataset(s)] += n
        if per.sum() >= 2000:
            share = per.sum(0) / per.sum()
            assert np.abs(share - weights).max() <= 0.015, (step, share)
            checked += 1
    rank_share = per / per.sum(1, keepdims=True)
    assert np.abs(rank_share - weights).max() <= 0.015, rank_share  # no rank sees one dataset
    assert checked > 50


def test_mix_elastic_resume_loses_and_repeats_nothing_per_dataset(mix3):
    """2 ranks → 3 ranks with a three-dataset mix: per dataset, 0 missing and 0 duplicated."""
    cfg = mix_cfg(mix3)
    old = [ShardLoader(cfg, spec=SPEC, tokenizer=TOK, rank=r, world_size=2) for r in range(2)]
    keys = [k for _ in range(30) for ld in old for k in ld.next_batch().doc_keys]
    states = [json.loads(json.dumps(ld.state_dict())) for ld in old]
    new = [ShardLoader(cfg, spec=SPEC, tokenizer=TOK, rank=r, world_size=3) for r in range(3)]
    for ld in new:
        ld.load_state_dict(states)
    keys += [k for _ in range(30) for ld in new for k in ld.next_batch().doc_keys]
    plan = StreamPlan(cfg)
    for d, name in enumerate(MIX_WEIGHTS):
        served = [(s, k) for s, k in keys if plan.dataset(s) == d]
        assert served and all(k.startswith(name) for _, k in served)
        for stream in range(d * cfg.num_streams, (d + 1) * cfg.num_streams):
            mine = [k for s, k in served if s == stream]
            expected = stream_prefix(plan, cfg, stream, len(mine))
            assert mine == expected, f"{name} stream {stream}: a sample was lost or served twice"


def stream_prefix(plan, cfg, stream, n):
    from mmtrain.data.loader import LogicalStream

    keys = []
    for row, _, _ in LogicalStream(stream, plan, cfg, SPEC, TOK, StreamState()).rows():
        keys += row.keys
        if len(keys) >= n:
            return keys[:n]


def test_share_metrics_count_all_ranks_and_survive_resume(mix3):
    cfg = mix_cfg(mix3)
    old = [ShardLoader(cfg, spec=SPEC, tokenizer=TOK, rank=r, world_size=2) for r in range(2)]
    for _ in range(40):
        for ld in old:
            ld.next_batch()
    totals = np.sum([ld.dataset_rows() for ld in old], axis=0)
    assert totals.sum() == 2 * 40 * cfg.micro_batch_size
    shares = share_metrics(old[0].share_names, totals.tolist())
    assert list(shares) == ["data/share/tiny", "data/share/quarter", "data/share/rest"]
    assert abs(shares["data/share/quarter"] - 0.25) < 0.03
    new = [ShardLoader(cfg, spec=SPEC, tokenizer=TOK, rank=r, world_size=3) for r in range(3)]
    for ld in new:
        ld.load_state_dict([json.loads(json.dumps(o.state_dict())) for o in old])
    assert np.sum([ld.dataset_rows() for ld in new], axis=0).tolist() == totals.tolist()


def test_share_names_are_last_path_components_made_unique():
    assert share_names(["/data/a/laion", "s3://bucket/x/laion/", "cc3m", "/d/laion"]) == \
        ["laion", "laion-2", "cc3m", "laion-3"]


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
    """A sample of the synth corpus in the JSON-segment layout whose first media member `0.*` is
    an image (kind 'image') or audio (kind 'audio')."""
    for j in range(i * 50, i * 50 + 500):
        key, members, _ = make_sample(7, "bad", j)
        if ("0.png" if kind == "image" else "0.wav") in members:
            return f"bad-{i:05d}", members


@pytest.fixture(scope="module")
def bad_corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("bad")
    shards, corrupt = [], set()
    for s in range(4):
        samples = []
        for i in range(s * 50, s * 50 + 50):
            key, members = media_sample(i, "image" if i % 2 else "audio")
            media = next(m for m in members if m.startswith("0."))
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
        media = next(m for m in members if m.startswith("0."))
        members[media] = b"not an image"
        samples.append((key, members))
    infos = [write_raw_shard(tmp_path / f"shard-{s}.tar", samples) for s in range(2)]
    write_dataset_index(tmp_path, infos, [])
    with pytest.raises(RuntimeError, match=r"5 consecutive bad samples in shard .*shard-"):
        loader(tmp_path, max_consecutive_failures=5).next_batch()


def test_quarantine_is_deterministic_and_never_duplicated_after_resume(bad_corpus, tmp_path):
    """A crash after the checkpoint re-reads the same bad samples: none is recorded twice, and the
    file equals an uninterrupted run's. Reasons carry no object addresses."""
    root, _ = bad_corpus
    straight = loader(root, tmp_path / "a")
    for _ in range(40):
        straight.next_batch()
    expected = (tmp_path / "a" / "quarantine.jsonl").read_text().splitlines()
    first = loader(root, tmp_path / "b")
    for _ in range(12):
        first.next_batch()
    state = json.loads(json.dumps(first.state_dict()))  # the checkpoint
    for _ in range(20):  # more records written, then a crash
        first.next_batch()
    resumed = loader(root, tmp_path / "b")
    resumed.load_state_dict([state])
    for _ in range(28):
        resumed.next_batch()
    lines = (tmp_path / "b" / "quarantine.jsonl").read_text().splitlines()
    assert len(lines) == len(set(lines)), "a quarantine record was written twice"
    assert lines == expected
    assert " at 0x" not in "".join(lines)
    assert {json.loads(line)["key"] for line in lines} >= {"bad-00010", "bad-00061"}


def test_skip_message_names_the_quarantine_file_or_says_there_is_none(bad_corpus, tmp_path, caplog):
    root, _ = bad_corpus
    for where, expected in ((tmp_path, str(tmp_path / "quarantine.jsonl")),
                            (None, "no quarantine file")):
        caplog.clear()
        ld = loader(root, where)
        while not any("skipped" in r.message for r in caplog.records):
            ld.next_batch()
        message = next(r.message for r in caplog.records if "skipped" in r.message)
        assert expected in message and "see None" not in message


# --------------------------------------------------------------------------- shuffle

def stream_docs(train: Path, n: int, **kw) -> list[str]:
    """The first n documents of logical stream 0 of a one-stream loader, in order."""
    from mmtrain.data.loader import LogicalStream

    cfg = DataConfig(**{**dict(train=str(train), num_workers=0, num_streams=1, seq_len=64), **kw})
    keys: list[str] = []
    for row, _, _ in LogicalStream(0, StreamPlan(cfg), cfg, SPEC, TOK, StreamState()).rows():
        keys += row.keys
        if len(keys) >= n:
            return keys[:n]


def same_shard_adjacent(keys: list[str]) -> float:
    shard = [k.split("-")[1] for k in keys]
    return float(np.mean([a == b for a, b in zip(shard, shard[1:])]))


def test_shuffle_spans_shards(tmp_path):
    """Adjacent documents come from the same shard ~1/shuffle_shards of the time (in-shard
    windows alone: nearly always), and the shuffled epoch is still every sample once."""
    train = text_dataset(tmp_path / "s", "s", [40] * 8)
    in_shard = stream_docs(train, 320, shuffle_shards=1, shuffle_buffer=64)
    across = stream_docs(train, 320, shuffle_shards=4, shuffle_buffer=256)
    assert same_shard_adjacent(in_shard) > 0.9
    assert same_shard_adjacent(across) < 0.35, same_shard_adjacent(across)
    assert sorted(across) == sorted(in_shard) and len(set(across)) == 320  # one epoch, exactly
    assert across == stream_docs(train, 320, shuffle_shards=4, shuffle_buffer=256)  # seeded


def test_small_remainder_shard_is_not_over_sampled(tmp_path):
    """Streams read equal slices of each epoch's sample order, so a 10-sample last shard's
    samples are seen as often as the others' (by whole shards per stream: ~4/3 as often)."""
    train = text_dataset(tmp_path / "r", "r", [40, 40, 40, 40, 40, 10])
    plan = StreamPlan(DataConfig(train=str(train), num_streams=2))
    for epoch in range(3):
        slices = [plan.slices(s, epoch) for s in range(2)]
        assert [sum(b - a for _, a, b in sl) for sl in slices] == [105, 105]
        covered = sorted((shard, i) for sl in slices for shard, a, b in sl for i in range(a, b))
        assert covered == sorted((s, i) for s, n in enumerate(plan.sets[0].samples) for i in range(n))
    ld = loader(train, num_streams=2, seq_len=256, micro_batch_size=8)
    seen = Counter()
    while sum(seen.values()) < 10 * 210:
        seen.update(k for _, k in ld.next_batch().doc_keys)
    small = [n for k, n in seen.items() if k.startswith("r-05")]
    other = [n for k, n in seen.items() if not k.startswith("r-05")]
    assert len(seen) == 210
    assert 0.92 < np.mean(small) / np.mean(other) < 1.08, (np.mean(small), np.mean(other))
