"""Configuration of the DeepSpeed engine and optimizer. The DeepSpeed JSON is generated from it."""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(kw_only=True)
class EngineConfig:
    zero_stage: int = 2
    precision: str = "fp32"  # fp32 | bf16 | fp16 (fp16 uses dynamic loss scaling)
    lr: float = 3e-3
    min_lr_ratio: float = 0.1  # final lr = lr * min_lr_ratio
    warmup_steps: int = 10
    decay: str = "cosine"  # cosine | linear | constant
    weight_decay: float = 0.1  # not applied to norms, biases and embeddings
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0  # 0 disables clipping
    grad_accum: int = 1
    offload_optimizer: bool = False
    offload_params: bool = False  # ZeRO-3 only
    overlap_comm: bool = False
    bucket_size: int = 50_000_000
    # ZeRO-3: parameters with at most this many elements are kept whole on every rank (not
    # partitioned); DeepSpeed's default. 0 partitions everything (what the CPU tests use).
    zero3_persistence_threshold: int = 100_000
    backend: str = "auto"  # torch.distributed backend: auto (nccl on CUDA, gloo on CPU) | gloo | nccl
    timeout_minutes: float = 10.0  # collective timeout: a dead rank stops the job instead of hanging it

    def __post_init__(self) -> None:
        def require(ok: bool, key: str, why: str) -> None:
            if not ok:
                raise ValueError(f"engine.{key}={getattr(self, key)!r} {why}")

        require(self.zero_stage in (0, 1, 2, 3), "zero_stage", "must be 0, 1, 2 or 3")
        require(self.precision in ("fp32", "bf16", "fp16"), "precision", "must be fp32, bf16 or fp16")
        require(self.lr > 0, "lr", "must be > 0")
        require(0 <= self.min_lr_ratio <= 1, "min_lr_ratio", "must be in [0, 1]")
        require(self.warmup_steps >= 0, "warmup_steps", "must be >= 0")
        require(self.decay in ("cosine", "linear", "constant"), "decay", "must be cosine, linear or constant")
        require(self.weight_decay >= 0, "weight_decay", "must be >= 0")
        require(0 <= self.beta1 < 1, "beta1", "must be in [0, 1)")
        require(0 <= self.beta2 < 1, "beta2", "must be in [0, 1)")
        require(0 < self.eps < 1, "eps", "must be in (0, 1)")
        require(self.grad_clip >= 0, "grad_clip", "must be >= 0")
        require(self.grad_accum >= 1, "grad_accum", "must be >= 1")
        require(not self.offload_params or self.zero_stage == 3, "offload_params",
                "needs engine.zero_stage=3")
        require(not self.offload_optimizer or self.zero_stage >= 1, "offload_optimizer",
                "needs engine.zero_stage >= 1")
        require(self.backend in ("auto", "gloo", "nccl"), "backend", "must be auto, gloo or nccl")
        require(self.bucket_size > 0, "bucket_size", "must be > 0")
        require(self.zero3_persistence_threshold >= 0, "zero3_persistence_threshold", "must be >= 0")
        require(self.timeout_minutes > 0, "timeout_minutes", "must be > 0")
