"""The DeepSpeed JSON is generated from the typed EngineConfig: ZeRO 0–3, offload, bf16 / fp16."""

import json

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
