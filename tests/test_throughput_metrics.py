"""Throughput metrics: MFU two ways (standard formula and FLOPs executed with per-document causal
attention), global batch in tokens, pinned host memory for host-to-GPU copies."""

import pytest
import torch
import torch.distributed as dist

from mmtrain.config import load_config
from mmtrain.data.batch import attention_pairs, needs_pinning, text_batch
from mmtrain.model import ModelConfig

MODEL = ModelConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2)


def test_attention_pairs_by_hand():
    assert attention_pairs([3, 5]) == 6 + 15  # 3·4/2 + 5·6/2 causal query-key pairs
    batch = text_batch(torch.zeros(2, 8, dtype=torch.int64), [[3, 5], [8]])
    assert batch.counts["attention_pairs"] == 6 + 15 + 36


def test_flops_executed_by_hand():
    n = MODEL._matmul_params()
    L, d = 2, 64
    assert MODEL.flops_executed(positions=16, attention_pairs=57) == 6 * n * 16 + 12 * L * d * 57
    # One full-context row of T tokens counted with T² pairs is the standard formula's T tokens.
    T = 128
    assert MODEL.flops_executed(positions=T, attention_pairs=T * T) == T * MODEL.flops_per_token(T)


def test_step_metrics_mfu_both_ways(tmp_path):
    from mmtrain.distributed.collectives import Collectives
    from mmtrain.train import StepOutput, step_metrics

    if dist.is_initialized():
        pytest.skip("a process group is already initialised in this process")
    counts = {"real_tokens": 14, "pad_tokens": 2, "text_tokens": 14, "docs": 3,
              "attention_pairs": 6 + 15 + 36}
    out = StepOutput(loss=2.5, counts=counts, data_wait=0.02, skipped=False, stop=False,
                     save_due=False)
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'init'}", rank=0, world_size=1)
    try:
        values = step_metrics(out, 2.0, Collectives("cpu"), model=MODEL, seq_len=8, peak=1e9)
        unknown_peak = step_metrics(out, 2.0, Collectives("cpu"), model=MODEL, seq_len=8, peak=0)
    finally:
        dist.destroy_process_group()
    assert values["loss"] == 2.5 and values["tokens_per_s"] == 7.0
    assert values["data_wait_pct"] == pytest.approx(1.0)
    assert values["mfu"] == pytest.approx(7.0 * MODEL.flops_per_token(8) / 1e9)
    executed = 6 * MODEL._matmul_params() * 16 + 12 * 2 * 64 * 57
    assert values["mfu_executed"] == pytest.approx(executed / 2.0 / 1e9)
    assert "mfu" not in unknown_peak and "mfu_executed" not in unknown_peak


def test_tokens_per_global_batch():
    cfg = load_config(None, ["engine.global_batch_tokens=32768", "data.seq_len=512",
                             "data.micro_batch_size=8"])
    assert cfg.engine_for(2).grad_accum == 4 and cfg.tokens_per_global_batch(2) == 32768
    assert cfg.global_batch_summary(2) == ("global batch 32,768 tokens = 2 ranks × 8 "
                                           "(data.micro_batch_size) × 4 (grad_accum) × 512 "
                                           "(data.seq_len)")
    with pytest.raises(ValueError, match="engine.global_batch_tokens=32768 is not a multiple of 3"):
        cfg.tokens_per_global_batch(3)
    tiny = load_config(None)  # the demo: engine.grad_accum as before
    assert tiny.engine_for(2).grad_accum == tiny.engine.grad_accum == 1


def test_host_to_gpu_copies_start_from_pinned_memory(monkeypatch):
    t = torch.zeros(3)
    assert needs_pinning(t, torch.device("cuda", 0)) and not needs_pinning(t, torch.device("cpu"))
    batch = text_batch(torch.zeros(2, 8, dtype=torch.int64), [[3, 5], [8]])
    pinned, moved = [], []

    def pin_memory(self):
        pinned.append(self)
        return self

    def to(self, device, non_blocking=False):  # this machine has no GPU: record the copy
        moved.append((torch.device(device), non_blocking))
        return self

    monkeypatch.setattr(torch.Tensor, "pin_memory", pin_memory)
    batch.to("cpu")
    assert not pinned  # a no-op on CPU
    monkeypatch.setattr(torch.Tensor, "to", to)
    batch.to("cuda:0")
    tensors = [v for v in batch.__dict__.values() if isinstance(v, torch.Tensor)]
    assert len(pinned) == len(tensors) and moved == [(torch.device("cuda", 0), True)] * len(tensors)


def test_preflight_prints_the_tokens_per_global_batch(capsys, demo_corpus, tmp_path):
    from launch.cli import main as launch_main
    from tests.launch.conftest import tiny_args

    args = [*tiny_args(demo_corpus, tmp_path / "runs", "r"), "--nproc-per-node", "2", "--dry-run"]
    rc = launch_main([*args, "--set", "engine.global_batch_tokens=4096"])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert ("global batch 4,096 tokens = 2 ranks × 2 (data.micro_batch_size) × 4 (grad_accum) × 256 "
            "(data.seq_len)") in out
    assert launch_main([*args, "--set", "engine.global_batch_tokens=3000"]) == 2
    captured = capsys.readouterr()
    assert "engine.global_batch_tokens=3000 is not a multiple of 2 ranks" in captured.out + captured.err


def test_the_loader_pins_batches_bound_for_a_gpu(monkeypatch, demo_corpus):
    from torch.utils.data._utils.pin_memory import pin_memory as torch_pin

    from mmtrain.data.loader import LoaderItem, ShardLoader
    from mmtrain.data.tokenizer import build_tokenizer

    batch = text_batch(torch.zeros(2, 8, dtype=torch.int64), [[3, 5], [8]])
    pinned = []
    monkeypatch.setattr(torch.Tensor, "pin_memory", lambda self: pinned.append(self) or self)
    item = torch_pin(LoaderItem(batch, {0: {"epoch": 1}}, []))  # what the pinning thread runs
    assert isinstance(item, LoaderItem) and item.states == {0: {"epoch": 1}}
    assert len(pinned) == sum(isinstance(v, torch.Tensor) for v in batch.__dict__.values())
    cfg = load_config(None, [f"data.train={demo_corpus / 'train'}", "data.num_streams=2",
                             "data.num_workers=0", 'data.image_tokenizer=""',
                             'data.audio_tokenizer=""'])
    tok = build_tokenizer(cfg.data.tokenizer)
    for pin in (False, True):
        loader = ShardLoader(cfg.data, spec=cfg.model.media(), tokenizer=tok, rank=0, world_size=1,
                             pin_memory=pin)
        assert loader._dataloader().pin_memory is pin


def test_an_elastic_launch_checks_the_global_batch_on_fewer_nodes(capsys, demo_corpus, tmp_path):
    from launch.cli import main as launch_main
    from launch.local import free_port
    from tests.launch.conftest import tiny_args

    args = [*tiny_args(demo_corpus, tmp_path / "runs", "r"), "--nnodes", "2:3", "--node-rank", "0",
            "--nproc-per-node", "1", "--rdzv-endpoint", f"127.0.0.1:{free_port()}", "--dry-run"]
    # 6144 tokens = 3 ranks × 2 × 256 × 4: also 2 ranks × 2 × 256 × 6
    assert launch_main([*args, "--set", "engine.global_batch_tokens=6144"]) == 0
    assert "global batch 6,144 tokens = 3 ranks" in capsys.readouterr().out
    # 1536 tokens = 3 ranks × 2 × 256 × 1, but not a multiple of 2 ranks × 2 × 256 = 1024
    assert launch_main([*args, "--set", "engine.global_batch_tokens=1536"]) == 2
    captured = capsys.readouterr()
    assert ("engine.global_batch_tokens=1536 is not a multiple of 2 ranks" in captured.out + captured.err
            and "an elastic restart may run on 2 ranks" in captured.out + captured.err)
