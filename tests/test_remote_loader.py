"""The loader on remote storage and on failing storage, against real servers on loopback.

- s3:// (moto's S3 server) and http:// (http.server with Range) give the same batches as local
  disk, and resume exactly with 2 simulated ranks (0 missing, 0 duplicated samples).
- A shard that fails its first requests is retried with backoff and loses nothing; one that keeps
  failing is counted, recorded (kind "io") and reported, never skipped silently; several in a row
  stop the run with an error naming the shard.
- Running out of file descriptors is an error naming the cause.
- A resume in the middle of a shard seeks to the sample's byte offset from the manifest; old
  manifests without offsets still read.
"""

from __future__ import annotations

import collections
import importlib.util
import json
import os
import resource
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from mmtrain import storage
from mmtrain.data.config import DataConfig
from mmtrain.data.loader import LogicalStream, ShardLoader, StreamPlan, StreamState
from mmtrain.data.shard_io import ShardIO
from mmtrain.data.tokenizer import ByteTokenizer
from mmtrain.model import ModelConfig
from tests.remote_servers import http_server, make_bucket, s3_server

TOK = ByteTokenizer()
SPEC = ModelConfig().media()


@pytest.fixture(scope="module")
def s3_corpus(demo_corpus):
    """The demo corpus's train split copied to s3://loader/train on a loopback S3 server."""
    with s3_server():
        make_bucket("loader")
        for path in sorted((demo_corpus / "train").iterdir()):
            if path.is_file():
                storage.put_file(path, f"s3://loader/train/{path.name}")
        yield "s3://loader/train"


def make_cfg(train, **kw) -> DataConfig:
    base = dict(train=str(train), num_workers=0, num_streams=4, seq_len=256, micro_batch_size=2,
                shuffle_buffer=8, io_backoff=0.01)
    return DataConfig(**{**base, **kw})


def keys_of(cfg, steps, rank=0, world=1, state=None, quarantine=None):
    ld = ShardLoader(cfg, spec=SPEC, tokenizer=TOK, rank=rank, world_size=world,
                     quarantine=quarantine)
    if state is not None:
        ld.load_state_dict(state)
    keys = [k for _ in range(steps) for k in ld.next_batch().doc_keys]
    ld.close()
    return keys, ld


def test_s3_reads_what_local_disk_reads_and_resumes_exactly_on_two_ranks(demo_corpus, s3_corpus):
    local = make_cfg(demo_corpus / "train")
    remote = make_cfg(s3_corpus)
    assert StreamPlan(remote).fingerprint == StreamPlan(local).fingerprint
    assert keys_of(remote, 4)[0] == keys_of(local, 4)[0]

    # 2 simulated ranks: 3 steps, save, resume on 2 ranks for 3 more; vs 6 steps straight.
    straight = [keys_of(remote, 6, r, 2)[0] for r in range(2)]
    first = [keys_of(remote, 3, r, 2) for r in range(2)]
    states = [json.loads(json.dumps(ld.state_dict())) for _, ld in first]
    resumed = [keys_of(remote, 3, r, 2, state=states)[0] for r in range(2)]
    for r in range(2):
        assert first[r][0] + resumed[r] == straight[r]
    served = [k for r in range(2) for k in first[r][0] + resumed[r]]
    counts = collections.Counter(served)
    assert max(counts.values()) == 1  # 0 duplicated
    assert set(served) == {k for r in range(2) for k in straight[r]}  # 0 missing


def test_flaky_http_shards_are_retried_and_lose_nothing(demo_corpus):
    local = make_cfg(demo_corpus / "train")
    expected = keys_of(local, 4)[0]
    with http_server(demo_corpus / "train", fail_first=2) as (url, requests):
        cfg = make_cfg(url, io_retries=3)
        got, ld = keys_of(cfg, 4)
    assert got == expected
    assert ld.skipped_shards == 0 and ld.unreadable_shards == 0
    tars = {p: n for p, n in requests.items() if p.endswith(".tar")}
    assert tars and all(n > 2 for n in tars.values())  # every shard failed twice, then read


def test_a_shard_that_keeps_failing_is_counted_recorded_and_reported(demo_corpus, tmp_path):
    quarantine = tmp_path / "quarantine" / "rank_0.jsonl"
    with http_server(demo_corpus / "train", fail_first=10**6,
                     fail_paths=(r"shard-0*1\.tar$",)) as (url, _):
        cfg = make_cfg(url, io_retries=1)
        got, ld = keys_of(cfg, 6, quarantine=quarantine)
    assert got and ld.unreadable_shards >= 1 and ld.skipped_shards >= 1
    records = [json.loads(line) for line in quarantine.read_text().splitlines()]
    io = [r for r in records if r.get("kind") == "io"]
    assert io and all(r["shard"].endswith("1.tar") and r["key"] == "*" for r in io)
    assert "failed after 2 tries" in io[0]["reason"]


def test_unreadable_shards_in_a_row_stop_with_an_error_naming_the_shard(demo_corpus):
    with http_server(demo_corpus / "train", fail_first=10**6) as (url, _):
        cfg = make_cfg(url, io_retries=1, max_shard_failures=2)
        with pytest.raises(RuntimeError, match=r"2 unreadable shards in a row.*shard-\d+\.tar"):
            keys_of(cfg, 2)


def test_running_out_of_file_descriptors_names_the_cause(demo_corpus):
    cfg = make_cfg(demo_corpus / "train")
    keys_of(cfg, 1)  # imports everything a batch needs (an import needs descriptors too)
    ld = ShardLoader(cfg, spec=SPEC, tokenizer=TOK, rank=0, world_size=1)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    in_use = len(os.listdir("/proc/self/fd"))
    resource.setrlimit(resource.RLIMIT_NOFILE, (in_use, hard))
    try:
        with pytest.raises(RuntimeError, match="out of file descriptors") as e:
            ld.next_batch()
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    assert "read no usable sample" not in str(e.value)


def test_open_handles_are_bounded_per_consumer(demo_corpus):
    shards = sorted(str(p) for p in (demo_corpus / "train").glob("*.tar"))
    io = ShardIO(max_open=2, block_size=512)  # tiny blocks: many reads, interleaved
    streams = [io.open(url) for url in shards]
    data = {url: b"" for url in shards}
    while any(s.pos < s.size for s in streams):
        for s in streams:
            data[s.url] += s.read(700)
            assert io.open_handles() <= 2
    for url in shards:
        assert data[url] == Path(url).read_bytes()
    io.close()


def _stream(cfg, stream=0):
    return LogicalStream(stream, StreamPlan(cfg), cfg, SPEC, TOK, StreamState())


def test_mid_shard_reads_seek_to_the_manifest_offset(demo_corpus, tmp_path):
    cfg = make_cfg(demo_corpus / "train")
    s = _stream(cfg)
    everything = [raw["__key__"] for raw in s._read_tar(0)]
    k = len(everything) // 2
    offset, drop = s.shards.seek_point(0, k)
    assert offset > 0 and drop == 0  # a seek, not a re-read
    assert [raw["__key__"] for raw in s._read_tar(0, k)] == everything[k:]

    # A dataset built before offsets were recorded: same samples, read from the shard's start.
    old = tmp_path / "old"
    old.mkdir()
    for path in (demo_corpus / "train").iterdir():
        if path.is_file():
            (old / path.name).write_bytes(path.read_bytes())
    table = pq.read_table(old / "manifest.parquet")
    pq.write_table(table.drop(["offset"]), old / "manifest.parquet")
    s_old = _stream(make_cfg(old))
    assert s_old.shards.seek_point(0, k) == (0, k)
    assert [raw["__key__"] for raw in s_old._read_tar(0, k)] == everything[k:]


def test_a_missing_backend_names_the_install_command():
    if importlib.util.find_spec("gcsfs") is not None:
        pytest.skip("gcsfs is installed here: the extra is not missing")
    with pytest.raises(ValueError, match=r"gs://.*pip install -e '\.\[gcs\]'"):
        storage.read_bytes("gs://bucket/ds/dataset.json")


def test_a_resume_inside_a_shuffle_group_seeks_and_continues_exactly(demo_corpus):
    import numpy as np

    cfg = make_cfg(demo_corpus / "train", shuffle_shards=2, shuffle_buffer=16)
    s = _stream(cfg)
    slices = s.plan.slices(0, 0)[:2]
    straight = [(k, raw["__key__"]) for k, _, raw in s._group_samples(0, 0, slices, 0)]
    start = len(straight) // 2
    rng = np.random.default_rng([cfg.seed, 0, 0, 0])
    assert _stream(cfg)._seek_group(rng, slices, start) is not None  # seeks, no re-read
    resumed = [(k, raw["__key__"]) for k, _, raw in _stream(cfg)._group_samples(0, 0, slices,
                                                                                 start)]
    assert resumed == straight[start:]


def test_data_mix_takes_urls_beside_local_folders(demo_corpus, s3_corpus):
    cfg = make_cfg(demo_corpus / "train", mix={s3_corpus: 1.0, str(demo_corpus / "train"): 1.0})
    got, ld = keys_of(cfg, 3)
    assert got and ld.share_names == ["train", "train-2"]
    assert all(rows > 0 for rows in ld.dataset_rows())
