"""DeepSpeed wiring: the only module (with its siblings in mmtrain/distributed/) that calls deepspeed.

The DeepSpeed JSON is generated from the typed `EngineConfig` (never a second hand-written truth)
and saved in the run directory (`ds_config.json`).

Every function here takes named runtime objects (the engine, a config, sizes), never the run config.
"""

from __future__ import annotations

import contextlib
import datetime
import functools
import json
import logging
import math
import os
import platform
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

from mmtrain.distributed.config import EngineConfig

log = logging.getLogger("mmtrain.engine")
DS_CONFIG_FILE = "ds_config.json"


def init_distributed(cfg: EngineConfig, *, device: str = "auto") -> tuple[int, int, torch.device]:
    """Join the process group torchrun set up; returns (rank, world_size, device).

    `device` is launch.device (auto | cpu | cuda). Every collective outside DeepSpeed must run on
    the returned device (mmtrain.distributed.collectives.Collectives).
    """
    import deepspeed

    backend, use_cuda = resolve_backend(cfg, device)
    timeout = datetime.timedelta(minutes=cfg.timeout_minutes)
    # DeepSpeed builds its data-parallel groups with new_group() and no timeout, and torch gives
    # those its module default (30 min), not the world group's. Make engine.timeout_minutes that
    # default, so a stopped or dead rank ends every collective (ZeRO's included) within it.
    c10d = torch.distributed.distributed_c10d
    c10d.default_pg_timeout = c10d.default_pg_nccl_timeout = timeout
    deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False, timeout=timeout)
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    if use_cuda:
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        return rank, world, torch.device("cuda", local)
    return rank, world, torch.device("cpu")


def resolve_backend(cfg: EngineConfig, device: str = "auto") -> tuple[str, bool]:
    """(torch.distributed backend, use CUDA) for launch.device and engine.backend.

    A run asked to use a GPU stops here with the reason instead of falling back to gloo on CPU.
    """
    has_cuda = torch.cuda.is_available()
    if device not in ("auto", "cpu", "cuda"):
        raise ValueError(f"launch.device={device!r} must be one of auto, cpu, cuda")
    if device == "cuda" and not has_cuda:
        why = (f"this torch build ({torch.__version__}) has no CUDA" if torch.version.cuda is None
               else "no GPU is visible (CUDA_VISIBLE_DEVICES="
                    f"{os.environ.get('CUDA_VISIBLE_DEVICES', '<unset>')!r})")
        raise ValueError(f"launch.device='cuda' but {why} on {platform.node()}; set "
                         "launch.device=cpu (or auto) to train on CPU")
    if cfg.backend == "nccl" and (not has_cuda or device == "cpu"):
        raise ValueError("engine.backend='nccl' serves only CUDA tensors: it needs a GPU and "
                         "launch.device cuda or auto; use engine.backend=gloo (or auto) on CPU")
    if cfg.backend == "gloo" and device == "cuda":
        raise ValueError("engine.backend='gloo' trains on CPU but launch.device='cuda'; use "
                         "engine.backend=nccl (or auto) for GPUs")
    use_cuda = device == "cuda" or (device == "auto" and has_cuda and cfg.backend != "gloo")
    backend = cfg.backend if cfg.backend != "auto" else ("nccl" if use_cuda else "gloo")
    return backend, use_cuda


def ds_config(cfg: EngineConfig, *, micro_batch_size: int, world_size: int) -> dict[str, Any]:
    """The DeepSpeed config, generated from the typed config (grad_accum as given: pass
    `cfg.resolved(...)` when engine.global_batch_tokens is set)."""
    assert not cfg.global_batch_tokens, "resolve engine.global_batch_tokens first (cfg.resolved)"
    zero: dict[str, Any] = {"stage": cfg.zero_stage}
    if cfg.zero_stage >= 1:
        zero.update(overlap_comm=cfg.overlap_comm, reduce_bucket_size=cfg.bucket_size,
                    allgather_bucket_size=cfg.bucket_size, contiguous_gradients=True)
    if cfg.zero_stage == 3:
        zero.update(stage3_prefetch_bucket_size=cfg.bucket_size,
                    stage3_param_persistence_threshold=cfg.zero3_persistence_threshold)
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
        if cfg.zero_stage >= 1 and cfg.grad_dtype == "fp32":
            # Accumulate over micro-batches and reduce across ranks in fp32; DeepSpeed's default
            # for both is the parameters' dtype (bf16).
            config["data_types"] = {"grad_accum_dtype": "fp32"}
            config["communication_data_type"] = "fp32"
    elif cfg.precision == "fp16":
        # loss_scale 0: dynamic loss scaling, starting at 2**16, halved on overflow (the step is
        # skipped), doubled after loss_scale_window clean steps.
        config["fp16"] = {"enabled": True, "loss_scale": 0, "initial_scale_power": 16,
                          "loss_scale_window": 1000, "hysteresis": 2, "min_loss_scale": 1}
    return config


def write_ds_config(run_dir: str | Path, config: dict[str, Any]) -> Path:
    """Save the generated DeepSpeed JSON next to the run's config.json (what DeepSpeed was given)."""
    path = Path(run_dir) / DS_CONFIG_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)
    return path


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW groups: no weight decay on norms, biases and embeddings."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        # ZeRO-3 partitions p in place (p.ndim is then 1): its full shape is ds_shape.
        ndim = len(getattr(p, "ds_shape", p.shape))
        skip = ndim < 2 or "tok_embeddings" in name or name.endswith(".bias")
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
    """Construct the model; under ZeRO-3 inside DeepSpeed's partitioning context.

    Under `zero.Init` every submodule's parameters are partitioned as soon as its constructor
    returns, so the model's own `init_weights()` (called at the end of its constructor) sees empty
    shards and does nothing. We run it again with the parameters gathered (rank 0's values are
    broadcast on exit), which draws the same random numbers in the same order as an unpartitioned
    build: the same seed gives the same initial weights under ZeRO 0, 1, 2 and 3 (tested).
    Cost: the full model is materialised once per rank during this init.
    """
    if cfg.zero_stage != 3:
        return build().to(device)
    import deepspeed

    world = torch.distributed.get_world_size()
    init_config = ds_config(cfg, micro_batch_size=1, world_size=world)
    # No dtype= here: zero.Init takes it from the config's bf16/fp16 sections (fp32 when neither).
    # An explicit dtype is overridden on accelerators without fp16 (DeepSpeed 0.19 parses
    # `dtype or fp16 if fp16_ok else bf16 ...` so a CPU run got bf16 parameters for "fp32").
    with deepspeed.zero.Init(remote_device="cpu" if cfg.offload_params else None,
                             config_dict_or_path=init_config):
        model = build()
    init_weights = getattr(model, "init_weights", None)
    if init_weights is not None:
        params = list(model.parameters())
        with deepspeed.zero.GatheredParameters(params, modifier_rank=0):
            init_weights()
    return model


def build_optimizer(model: torch.nn.Module, cfg: EngineConfig) -> torch.optim.Optimizer:
    """AdamW (decoupled weight decay): FusedAdam on CUDA, DeepSpeedCPUAdam when the optimizer is
    offloaded (DeepSpeed refuses a client torch optimizer with ZeRO-Offload), torch's otherwise."""
    groups = param_groups(model, cfg.weight_decay)
    adam_kwargs = dict(lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps)
    if cfg.offload_optimizer:
        from deepspeed.ops.adam import DeepSpeedCPUAdam
        return DeepSpeedCPUAdam(groups, adamw_mode=True, **adam_kwargs)
    if torch.cuda.is_available():
        from deepspeed.ops.adam import FusedAdam
        return FusedAdam(groups, adam_w_mode=True, **adam_kwargs)
    return torch.optim.AdamW(groups, **adam_kwargs)


def build_engine(model: torch.nn.Module, cfg: EngineConfig, *, micro_batch_size: int,
                 world_size: int, total_steps: int,
                 run_dir: str | Path | None = None) -> tuple[Any, dict[str, Any]]:
    """deepspeed.initialize with AdamW and the LR schedule; with `run_dir`, rank 0 also writes the
    DeepSpeed JSON there (ds_config.json)."""
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    if cfg.precision == "fp16" and not get_accelerator().is_fp16_supported():
        raise ValueError(f"engine.precision='fp16' is not supported by DeepSpeed on this device "
                         f"({get_accelerator().device_name()}); use bf16 or fp32")
    config = ds_config(cfg, micro_batch_size=micro_batch_size, world_size=world_size)
    if run_dir is not None and torch.distributed.get_rank() == 0:
        write_ds_config(run_dir, config)
    optimizer = build_optimizer(model, cfg)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg, total_steps))
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer,
                                           lr_scheduler=scheduler, config=config)
    if engine.zero_optimization_partition_weights():
        _allow_calls_outside_forward(engine, ("token_losses", "logits_at"))
    return engine, config


def _allow_calls_outside_forward(engine: Any, names: tuple[str, ...]) -> None:
    """ZeRO-3: make `engine.module.token_losses(batch)` (evaluation) work as under ZeRO 0–2 by
    running these methods of this model instance inside `outside_forward(engine)`. The class is
    untouched; collective like a forward: every rank must make the same calls."""
    module = engine.module
    for name in names:
        method = getattr(module, name, None)
        if method is None:
            continue

        @functools.wraps(method)
        def wrapped(*args: Any, _method: Callable = method, **kwargs: Any) -> Any:
            with outside_forward(engine):
                return _method(*args, **kwargs)

        object.__setattr__(module, name, wrapped)


def snapshot_checkpoint(engine: Any, root: str, tag: str,
                        client_state: dict[str, Any]) -> Callable[[], list[Path]]:
    """Collective (DeepSpeed's own barriers). DeepSpeed's files of this rank, copied into host
    memory: training may change the live tensors as soon as this returns. Returns the function
    that writes and fsyncs them (on any thread; it issues no collective) and returns their paths.
    DeepSpeed's `latest` is not written: mmtrain.checkpoint commits.

    The universal-checkpoint marker goes into the client state so that a later resume on another
    world size can convert this checkpoint (DeepSpeed's converter refuses checkpoints without it).
    """
    from mmtrain.distributed import snapshot, universal

    host = snapshot.install(engine)
    state = {**client_state, **universal.client_state_marker()}
    engine.save_checkpoint(root, tag=tag, client_state=state, save_latest=False)
    return functools.partial(host.write, host.take())


def save_checkpoint(engine: Any, root: str, tag: str, client_state: dict[str, Any]) -> list[Path]:
    """`snapshot_checkpoint`, then write: this rank's files and their directory entries are on
    disk when it returns (tools and tests; training saves through mmtrain.checkpoint)."""
    from mmtrain.fileio import fsync_dir

    paths = snapshot_checkpoint(engine, root, tag, client_state)()
    for directory in sorted({p.parent for p in paths} | {Path(root)}):
        fsync_dir(directory)
    return paths


def load_checkpoint(engine: Any, root: str, tag: str, *, saved_world_size: int) -> dict[str, Any]:
    """Restore model, optimizer and LR schedule from root/tag, saved by `saved_world_size` ranks.

    On the same world size DeepSpeed reads its files directly. On another one a ZeRO checkpoint
    (whose optimizer state is partitioned by rank) is converted to DeepSpeed's universal layout on
    rank 0 and every rank loads its new partition from it (see mmtrain/distributed/universal.py).
    Called once the ranks agreed that every file passes its sha256 (mmtrain.checkpoint: each rank
    hashed its share): nothing here reads an unchecked file.
    """
    from mmtrain.distributed import universal
    from mmtrain.distributed.safe_load import weights_only_loads

    world = torch.distributed.get_world_size()
    with weights_only_loads():  # DeepSpeed's own reads too: tensors and plain data only
        if saved_world_size != world and universal.is_partitioned(Path(root) / tag):
            log.info("checkpoint %s/%s was saved by %d ranks; this run has %d: resharding "
                     "through a universal checkpoint", root, tag, saved_world_size, world)
            client_state = universal.load_resharded(engine, Path(root), tag)
        else:
            path, client_state = engine.load_checkpoint(root, tag=tag, load_optimizer_states=True,
                                                        load_lr_scheduler_states=True)
            if path is None:
                raise ValueError(f"DeepSpeed could not load checkpoint {root}/{tag}")
    client_state = dict(client_state or {})
    for key in universal.client_state_marker():
        client_state.pop(key, None)
    return client_state


@contextlib.contextmanager
def outside_forward(engine: Any) -> Iterator[None]:
    """Run model methods other than `forward` (token_losses, logits_at) on `engine.module`.

    Under ZeRO-3 a parameter used outside the submodule that owns it (the tied output embedding
    in the loss) is gathered only while DeepSpeed knows a forward is running; `engine(batch)`
    tells it, a direct `engine.module.token_losses(batch)` does not. This block does (build_engine
    already wraps token_losses and logits_at in it). The gathered parameter stays gathered until
    the next forward of the engine releases it. A no-op for ZeRO 0–2.
    """
    if not engine.zero_optimization_partition_weights():
        yield
        return
    from deepspeed.runtime.zero.parameter_offload import ensure_zero_ordered_dict

    modules = list(engine.module.modules())
    for module in modules:
        ensure_zero_ordered_dict(module)
        module._parameters._in_forward = True  # what DeepSpeed's forward prologue sets
    try:
        yield
    finally:
        for module in modules:
            module._parameters._in_forward = False


def skips_nonfinite_steps(engine: Any) -> bool:
    """Whether the optimizer checks the accumulated gradients for inf/NaN at the step boundary
    and skips that step (parameters, optimizer state and LR schedule untouched; counted in
    `skipped_steps`): DeepSpeed 0.19's ZeRO 1-3 optimizers do (ZeRO-2 tested in
    tests/test_health.py), the ZeRO-0 path does not."""
    return engine.zero_optimization_stage() >= 1


def skipped_steps(engine: Any) -> int:
    """Optimizer steps DeepSpeed skipped for non-finite gradients so far."""
    return int(engine.skipped_steps)


def current_lr(engine: Any) -> float:
    return float(engine.get_lr()[0])


def grad_norm(engine: Any) -> float:
    norm = engine.get_global_grad_norm()
    return float(norm) if norm is not None else float("nan")


def full_parameters(engine: Any) -> dict[str, torch.Tensor]:
    """Every parameter, whole, in fp32 on CPU: the optimizer's master weights where DeepSpeed keeps
    them (ZeRO 1–3, bf16 optimizer), else the module's own tensor. Collective under ZeRO-3: call on
    every rank."""
    from deepspeed.utils import safe_get_full_fp32_param

    out = {}
    for name, p in engine.module.named_parameters():
        full = safe_get_full_fp32_param(p)
        out[name] = (p.detach() if full is None else full).float().cpu().clone()
    return out


def full_optimizer_state(engine: Any, key: str) -> dict[str, torch.Tensor]:
    """One optimizer state (`exp_avg`, `exp_avg_sq`) per parameter, whole, on CPU. Collective under
    ZeRO-3."""
    from deepspeed.utils import safe_get_full_optimizer_state

    optimizer = engine.optimizer
    if hasattr(optimizer, "_lazy_init_hp_params_optimizer_state"):
        # DeepSpeed links each parameter to its optimizer-state fragment once, right after the
        # first param group's first step, when the other groups have no state yet; relink now.
        optimizer._hp_optimizer_states_linked = False
        optimizer._lazy_init_hp_params_optimizer_state()
    out = {}
    for name, p in engine.module.named_parameters():
        full = safe_get_full_optimizer_state(p, key)
        if full is None:  # ZeRO-0: the client optimizer holds the parameter itself
            opt = engine.optimizer
            opt = getattr(opt, "optimizer", opt)
            full = opt.state[p][key]
        out[name] = full.float().cpu().clone()
    return out
