"""DeepSpeed wiring: the only module that calls `deepspeed`.

The DeepSpeed JSON is generated from the typed `EngineConfig` (never a second hand-written truth)
and saved in the run directory.
"""

from __future__ import annotations

import datetime
import math
import os
from typing import Any, Callable

import torch

from mmtrain.distributed.config import EngineConfig


def init_distributed(cfg: EngineConfig) -> tuple[int, int, torch.device]:
    """Join the process group torchrun set up; returns (rank, world_size, device)."""
    import deepspeed

    use_cuda = torch.cuda.is_available() and cfg.backend != "gloo"
    backend = cfg.backend if cfg.backend != "auto" else ("nccl" if use_cuda else "gloo")
    deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False,
                               timeout=datetime.timedelta(minutes=cfg.timeout_minutes))
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    if use_cuda:
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        return rank, world, torch.device("cuda", local)
    return rank, world, torch.device("cpu")


def ds_config(cfg: EngineConfig, *, micro_batch_size: int, world_size: int) -> dict[str, Any]:
    """The DeepSpeed config, generated from the typed config."""
    zero: dict[str, Any] = {"stage": cfg.zero_stage}
    if cfg.zero_stage >= 1:
        zero.update(overlap_comm=cfg.overlap_comm, reduce_bucket_size=cfg.bucket_size,
                    allgather_bucket_size=cfg.bucket_size, contiguous_gradients=True)
    if cfg.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    if cfg.offload_params:
        zero["offload_param"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    config: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": micro_batch_size,
        "gradient_accumulation_steps": cfg.grad_accum,
        "train_batch_size": micro_batch_size * cfg.grad_accum * world_size,
        "gradient_clipping": cfg.grad_clip,
        "zero_optimization": zero,
        "zero_allow_untested_optimizer": True,  # torch's AdamW on CPU
        "steps_per_print": 2**31 - 1,  # our own metrics do the reporting
        "wall_clock_breakdown": False,
    }
    if cfg.precision == "bf16":
        config["bf16"] = {"enabled": True}
    elif cfg.precision == "fp16":
        config["fp16"] = {"enabled": True, "loss_scale": 0, "initial_scale_power": 16,
                          "loss_scale_window": 1000, "hysteresis": 2, "min_loss_scale": 1}
    return config


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW groups: no weight decay on norms, biases and embeddings."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        skip = p.ndim < 2 or "tok_embeddings" in name or name.endswith(".bias")
        (no_decay if skip else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0}]


def lr_lambda(cfg: EngineConfig, total_steps: int) -> Callable[[int], float]:
    """Linear warmup, then cosine / linear decay to lr·min_lr_ratio (or constant)."""
    def factor(step: int) -> float:
        if step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        if cfg.decay == "constant":
            return 1.0
        progress = min(1.0, (step - cfg.warmup_steps) / max(1, total_steps - cfg.warmup_steps))
        shape = 0.5 * (1 + math.cos(math.pi * progress)) if cfg.decay == "cosine" else 1 - progress
        return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * shape
    return factor


def build_model(build: Callable[[], torch.nn.Module], cfg: EngineConfig,
                device: torch.device) -> torch.nn.Module:
    """Construct the model; under ZeRO-3 inside DeepSpeed's partitioning context."""
    if cfg.zero_stage == 3:
        import deepspeed

        with deepspeed.zero.Init(remote_device="cpu" if cfg.offload_params else None,
                                 config_dict_or_path={"zero_optimization": {"stage": 3}},
                                 dtype=_dtype(cfg)):
            return build()
    return build().to(device)


def _dtype(cfg: EngineConfig) -> torch.dtype:
    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[cfg.precision]


def build_engine(model: torch.nn.Module, cfg: EngineConfig, *, micro_batch_size: int,
                 world_size: int, total_steps: int) -> tuple[Any, dict[str, Any]]:
    """deepspeed.initialize with AdamW (FusedAdam on CUDA) and the LR schedule."""
    import deepspeed

    config = ds_config(cfg, micro_batch_size=micro_batch_size, world_size=world_size)
    groups = param_groups(model, cfg.weight_decay)
    adam_kwargs = dict(lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps)
    if torch.cuda.is_available() and not cfg.offload_optimizer:
        from deepspeed.ops.adam import FusedAdam
        optimizer = FusedAdam(groups, adam_w_mode=True, **adam_kwargs)
    else:
        optimizer = torch.optim.AdamW(groups, **adam_kwargs)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg, total_steps))
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer,
                                           lr_scheduler=scheduler, config=config)
    return engine, config


def save_checkpoint(engine: Any, root: str, tag: str, client_state: dict[str, Any]) -> None:
    """DeepSpeed's own files for this rank (DeepSpeed's `latest` is not written: we commit)."""
    engine.save_checkpoint(root, tag=tag, client_state=client_state, save_latest=False)


def load_checkpoint(engine: Any, root: str, tag: str) -> dict[str, Any]:
    path, client_state = engine.load_checkpoint(root, tag=tag, load_optimizer_states=True,
                                                load_lr_scheduler_states=True)
    if path is None:
        raise ValueError(f"DeepSpeed could not load checkpoint {root}/{tag}")
    return client_state or {}


def current_lr(engine: Any) -> float:
    return float(engine.get_lr()[0])


def grad_norm(engine: Any) -> float:
    norm = engine.get_global_grad_norm()
    return float(norm) if norm is not None else float("nan")
