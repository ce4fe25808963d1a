"""Loader resume equivalence: same layout → identical batches; other layout → no loss, no dupes."""

import dataclasses
import json

import pytest
import torch

from mmtrain.data.config import DataConfig
from mmtrain.data.loader import LogicalStream, ShardLoader, StreamPlan, StreamState
from mmtrain.data.tokenizer import ByteTokenizer
from mmtrain.model import ModelConfig

TOK = ByteTokenizer()
SPEC = ModelConfig().media()


def make_cfg(corpus, **kw) -> DataConfig:
    base = dict(train=str(corpus / "train"), num_workers=0, num_streams=4, seq_len=256,
                micro_batch_size=2, shuffle_buffer=8)
    return DataConfig(**{**base, **kw})


def loader(cfg, rank=0, world=1):
    return ShardLoader(cfg, spec=SPEC, tokenizer=TOK, rank=rank, world_size=world)


def same(a, b):
    for f in ("tokens", "targets", "positions", "cu_seqlens", "image_patches", "image_index",
              "audio_tokens", "audio_index", "caption_mask"):
        assert torch.equal(getattr(a, f), getattr(b, f)), f
    assert a.doc_keys == b.doc_keys


def roundtrip(states):
    return [json.loads(json.dumps(s)) for s in states]  # plain JSON, as saved


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_gives_identical_batches(demo_corpus, workers):
    cfg = make_cfg(demo_corpus, num_workers=workers)
    straight = loader(cfg)
    expected = [straight.next_batch() for _ in range(7)]
    first = loader(cfg)
    for i in range(3):
        same(first.next_batch(), expected[i])
    resumed = loader(cfg)
    resumed.load_state_dict(roundtrip([first.state_dict()]))
    for i in range(3, 7):
        same(resumed.next_batch(), expected[i])


def consumed_keys(loaders, steps):
    keys = []
    for _ in range(steps):
        for ld in loaders:
            keys += ld.next_batch().doc_keys
    return keys


def stream_prefix(cfg, stream, n):
    """The first n documents logical stream `stream` yields when read uninterrupted."""
    s = LogicalStream(stream, StreamPlan(cfg), cfg, SPEC, TOK, StreamState())
    keys = []
    for row, _, _ in s.rows():
        keys += row.keys
        if len(keys) >= n:
            return keys[:n]


@pytest.mark.parametrize("before, after", [(2, 1), (1, 2), (2, 4)])
def test_world_size_change_loses_and_repeats_nothing(demo_corpus, before, after):
    cfg = make_cfg(demo_corpus)
    old = [loader(cfg, r, before) for r in range(before)]
    keys = consumed_keys(old, 5)
    states = roundtrip([ld.state_dict() for ld in old])
    new = [loader(cfg, r, after) for r in range(after)]
    for ld in new:
        ld.load_state_dict(states)
    keys += consumed_keys(new, 6)
    assert len(keys) == len(set(keys)), "a document was served twice"
    for stream in range(cfg.num_streams):
        mine = [k for s, k in keys if s == stream]
        assert mine == stream_prefix(cfg, stream, len(mine)), f"stream {stream} lost or reordered"


def test_worker_count_change_loses_and_repeats_nothing(demo_corpus):
    cfg2 = make_cfg(demo_corpus, num_workers=2)
    first = loader(cfg2)
    keys = consumed_keys([first], 4)
    cfg1 = dataclasses.replace(cfg2, num_workers=0)
    second = loader(cfg1)
    second.load_state_dict(roundtrip([first.state_dict()]))
    keys += consumed_keys([second], 4)
    assert len(keys) == len(set(keys))
    for stream in range(cfg1.num_streams):
        mine = [k for s, k in keys if s == stream]
        assert mine == stream_prefix(cfg1, stream, len(mine))


def test_changed_data_or_layout_is_refused(demo_corpus):
    cfg = make_cfg(demo_corpus)
    state = loader(cfg).state_dict()
    changed = dict(state, fingerprint="0" * 64)
    with pytest.raises(ValueError, match="changed since the checkpoint"):
        loader(cfg).load_state_dict([changed])
    loader(dataclasses.replace(cfg, allow_data_change=True)).load_state_dict([changed])
    with pytest.raises(ValueError, match="num_streams"):
        loader(dataclasses.replace(cfg, num_streams=3)).load_state_dict([state])


def test_too_few_shards_or_streams_fail_at_start(demo_corpus):
    with pytest.raises(ValueError, match=r"num_streams=5000 exceeds the \d+ samples in 6 shards"):
        loader(make_cfg(demo_corpus, num_streams=5000))
    with pytest.raises(ValueError, match="fewer than the 4 consumers"):
        loader(make_cfg(demo_corpus, num_streams=3, num_workers=2), rank=0, world=2)


def test_every_rank_gets_batches_past_the_epoch_end(demo_corpus):
    """Streams loop over epochs, so no rank runs dry (and hangs the others)."""
    cfg = make_cfg(demo_corpus, num_streams=6, micro_batch_size=8)
    ranks = [loader(cfg, r, 2) for r in range(2)]
    for _ in range(12):
        for ld in ranks:
            ld.next_batch()
    assert all(ld.epochs() >= 1 for ld in ranks)


CLOSE_SCRIPT = """
import sys
from mmtrain.data.config import DataConfig
from mmtrain.data.loader import ShardLoader
from mmtrain.data.tokenizer import ByteTokenizer
from mmtrain.model import ModelConfig
cfg = DataConfig(train=sys.argv[1], num_workers=2, num_streams=4, seq_len=256, micro_batch_size=2)
loader = ShardLoader(cfg, spec=ModelConfig().media(), tokenizer=ByteTokenizer(), rank=0,
                     world_size=1)
loader.next_batch()
loader.close()
loader.close()  # idempotent
print("closed")
"""


def test_close_shuts_decode_workers_down_silently(demo_corpus):
    """A loader with 2 decode workers, one batch taken, closed, process exits: no abort noise."""
    import subprocess
    import sys

    from tests.conftest import cli_env

    proc = subprocess.run([sys.executable, "-c", CLOSE_SCRIPT, str(demo_corpus / "train")],
                          capture_output=True, text=True, timeout=300, env=cli_env())
    assert proc.returncode == 0 and "closed" in proc.stdout, proc.stderr[-2000:]
    for noise in ("terminate called", "killed by signal", "Aborted", "Traceback"):
        assert noise not in proc.stderr, proc.stderr[-2000:]


@pytest.mark.parametrize("key", ["shuffle_shards", "shuffle_buffer"])
def test_shuffle_settings_are_validated(key):
    with pytest.raises(ValueError, match=f"data.{key}=0 must be >= 1"):
        DataConfig(**{key: 0})
