"""The DeepSpeed JSON is generated from the typed EngineConfig: ZeRO 0–3, offload, bf16 / fp16."""

import json
import math

import pytest
import torch

from mmtrain.distributed import deepspeed as ds
from mmtrain.distributed.config import EngineConfig
from mmtrain.model import FusionTransformer, ModelConfig


def config(**kw) -> dict:
    return ds.ds_config(EngineConfig(**kw), micro_batch_size=4, world_size=8)


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_every_zero_stage(stage):
    cfg = config(zero_stage=stage, grad_accum=2, bucket_size=1000, zero3_persistence_threshold=7)
    zero = cfg["zero_optimization"]
    assert zero["stage"] == stage
    assert cfg["train_batch_size"] == 4 * 2 * 8
    assert cfg["train_micro_batch_size_per_gpu"] == 4 and cfg["gradient_accumulation_steps"] == 2
    assert ("reduce_bucket_size" in zero) == (stage >= 1)
    assert zero.get("stage3_param_persistence_threshold") == (7 if stage == 3 else None)
    assert "bf16" not in cfg and "fp16" not in cfg  # fp32 by default
    json.dumps(cfg)  # plain JSON


def test_offload_sections():
    cfg = config(zero_stage=3, offload_optimizer=True, offload_params=True)
    assert cfg["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
    assert cfg["zero_optimization"]["offload_param"]["device"] == "cpu"
    assert "offload_param" not in config(zero_stage=2, offload_optimizer=True)["zero_optimization"]
    with pytest.raises(ValueError, match="engine.offload_params"):
        EngineConfig(zero_stage=2, offload_params=True)
    with pytest.raises(ValueError, match="engine.offload_optimizer"):
        EngineConfig(zero_stage=0, offload_optimizer=True)


def test_precision_sections():
    assert config(precision="bf16")["bf16"] == {"enabled": True}
    fp16 = config(precision="fp16")["fp16"]
    assert fp16["enabled"] and fp16["loss_scale"] == 0  # 0 = dynamic loss scaling
    assert fp16["initial_scale_power"] == 16 and fp16["min_loss_scale"] == 1
    with pytest.raises(ValueError, match="engine.precision"):
        EngineConfig(precision="fp8")
    with pytest.raises(ValueError, match="engine.zero3_persistence_threshold"):
        EngineConfig(zero3_persistence_threshold=-1)


def test_ds_config_is_written_to_the_run_dir(tmp_path):
    cfg = config(zero_stage=1)
    path = ds.write_ds_config(tmp_path / "run", cfg)
    assert path == tmp_path / "run" / "ds_config.json"
    assert json.loads(path.read_text()) == cfg


def test_no_weight_decay_on_norms_biases_embeddings():
    model = FusionTransformer(ModelConfig(dim=64, n_layers=1, n_heads=4, n_kv_heads=2))
    decay, no_decay = ds.param_groups(model, 0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for p in decay["params"]}
    skipped = {names[id(p)] for p in no_decay["params"]}
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert "layers.0.attention.wq.weight" in decayed and "image_encoder.proj.weight" in decayed
    assert {"tok_embeddings.weight", "norm.weight", "image_encoder.proj.bias"} <= skipped
    assert decayed.isdisjoint(skipped) and len(decayed | skipped) == len(names)


def test_universal_marker_is_what_deepspeeds_converter_requires():
    from deepspeed.checkpoint.constants import UNIVERSAL_CHECKPOINT_INFO

    from mmtrain.distributed import universal

    assert UNIVERSAL_CHECKPOINT_INFO in universal.client_state_marker()
    torch.save(universal.client_state_marker(), "/dev/null")  # picklable as plain data


def test_bf16_reduces_and_accumulates_gradients_in_fp32():
    cfg = config(zero_stage=2, precision="bf16", overlap_comm=True)
    assert cfg["data_types"] == {"grad_accum_dtype": "fp32"}
    assert cfg["communication_data_type"] == "fp32"
    assert cfg["zero_optimization"]["overlap_comm"] is True
    plain = config(zero_stage=2, precision="bf16", grad_dtype="bf16")
    assert "data_types" not in plain and "communication_data_type" not in plain
    assert "data_types" not in config(zero_stage=2)  # fp32 training: nothing to say
    with pytest.raises(ValueError, match="engine.grad_dtype"):
        EngineConfig(precision="fp32", grad_dtype="bf16")
    with pytest.raises(ValueError, match="engine.grad_dtype.*zero_stage >= 1"):
        EngineConfig(precision="bf16", zero_stage=0)  # DeepSpeed 0.19: fp32 accumulation needs ZeRO
    assert "data_types" not in config(zero_stage=0, precision="bf16", grad_dtype="bf16")


def test_global_batch_in_tokens_derives_grad_accum():
    cfg = EngineConfig(global_batch_tokens=4 * 1024 * 8 * 3)
    assert cfg.grad_accum_for(world_size=8, micro_batch_size=4, seq_len=1024) == 3
    resolved = cfg.resolved(world_size=8, micro_batch_size=4, seq_len=1024)
    assert resolved.grad_accum == 3 and resolved.global_batch_tokens == 0
    assert ds.ds_config(resolved, micro_batch_size=4, world_size=8)["gradient_accumulation_steps"] == 3
    with pytest.raises(ValueError, match=r"engine.global_batch_tokens=98304 is not a multiple of 5 "
                       r"ranks × data.micro_batch_size=4 × data.seq_len=1024 = 20480 tokens per "
                       r"micro-step; use e.g. 81920 or 102400"):
        cfg.grad_accum_for(world_size=5, micro_batch_size=4, seq_len=1024)
    with pytest.raises(ValueError, match="use e.g. 20480$"):  # smaller than one micro-step
        EngineConfig(global_batch_tokens=1000).grad_accum_for(world_size=5, micro_batch_size=4,
                                                              seq_len=1024)
    with pytest.raises(ValueError, match="engine.grad_accum=2 and engine.global_batch_tokens"):
        EngineConfig(grad_accum=2, global_batch_tokens=4096)
    assert EngineConfig(grad_accum=2).grad_accum_for(world_size=3, micro_batch_size=1,
                                                     seq_len=7) == 2  # 0: grad_accum as given


@pytest.mark.parametrize("device,backend,match", [
    ("cuda", "auto", "launch.device='cuda' but this torch build"),
    ("auto", "nccl", "engine.backend='nccl' serves only CUDA tensors"),
    ("cpu", "nccl", "engine.backend='nccl' serves only CUDA tensors"),
])
def test_no_silent_cpu_fallback(device, backend, match):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    with pytest.raises(ValueError, match=match):
        ds.resolve_backend(EngineConfig(backend=backend), device)
    assert ds.resolve_backend(EngineConfig(), "auto") == ("gloo", False)
    assert ds.resolve_backend(EngineConfig(backend="gloo"), "cpu") == ("gloo", False)


def test_cuda_without_a_gpu_stops_before_any_rank_starts(tmp_path, capsys):
    """`mmtrain train --set launch.device=cuda` on this CPU machine: a clear error, no ranks."""
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    from launch.local import run_local
    from mmtrain.config import load_config

    cfg = load_config(None, [f"train.runs_dir={tmp_path}", "launch.device=cuda",
                             f"data.train={tmp_path}/d/train", f"data.val={tmp_path}/d/val",
                             "data.synth_samples=40", "data.num_streams=2"])
    with pytest.raises(ValueError, match="launch.device='cuda'.*set launch.device=cpu"):
        run_local(cfg)
    assert "starting" not in capsys.readouterr().out


def _bf16_zero2_steps(rank: int, world: int) -> dict:
    from tests.engine.workers import MODEL, batch

    cfg = EngineConfig(zero_stage=2, precision="bf16", grad_accum=2, warmup_steps=0,
                       overlap_comm=True)
    ds.init_distributed(cfg)
    torch.manual_seed(0)
    engine, _ = ds.build_engine(FusionTransformer(ModelConfig(**MODEL)), cfg, micro_batch_size=2,
                                world_size=world, total_steps=4)
    losses = []
    for micro in range(4):  # two optimizer steps of two micro-batches
        loss = engine(batch(rank, micro + 1))
        engine.backward(loss)
        engine.step()
        losses.append(loss.item())  # sync
    return {"losses": losses, "steps": engine.global_steps,
            "accum": engine.optimizer.gradient_accumulation_dtype,
            "comm": engine.communication_data_type, "overlap": engine.zero_overlap_comm()}


def test_bf16_zero2_steps_with_fp32_gradients_on_two_ranks(tmp_path):
    from tests.engine.helpers import run_distributed

    for r in run_distributed(_bf16_zero2_steps, 2, tmp_path):
        assert r["steps"] == 2 and all(map(math.isfinite, r["losses"]))
        assert r["accum"] == torch.float32 and r["comm"] == torch.float32 and r["overlap"]
