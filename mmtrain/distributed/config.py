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
    grad_accum: int = 1  # micro-batches per optimizer step (derived when global_batch_tokens > 0)
    # >0: tokens per optimizer step over all ranks; grad_accum is then derived at start from the
    # world size, data.micro_batch_size and data.seq_len (it must divide exactly). 0: grad_accum.
    global_batch_tokens: int = 0
    offload_optimizer: bool = False
    offload_params: bool = False  # ZeRO-3 only
    overlap_comm: bool = False  # ZeRO: overlap gradient reduction with the backward pass
    # bf16 with ZeRO >= 1: dtype gradients are accumulated over micro-batches and reduced across
    # ranks in (DeepSpeed data_types.grad_accum_dtype and communication_data_type). fp32 keeps the
    # bits bf16 rounds away when many micro-batches / ranks are summed; bf16 halves the traffic.
    grad_dtype: str = "fp32"
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
        require(self.global_batch_tokens >= 0, "global_batch_tokens", "must be >= 0")
        require(self.global_batch_tokens == 0 or self.grad_accum == 1, "grad_accum",
                f"and engine.global_batch_tokens={self.global_batch_tokens} are both set: the "
                "global batch in tokens derives grad_accum; set one of them "
                "(engine.global_batch_tokens=0 uses engine.grad_accum)")
        require(self.grad_dtype in ("fp32", "bf16"), "grad_dtype", "must be fp32 or bf16")
        require(self.grad_dtype == "fp32" or self.precision == "bf16", "grad_dtype",
                f"applies to engine.precision=bf16 only (precision is {self.precision!r})")
        require(not (self.precision == "bf16" and self.zero_stage == 0 and self.grad_dtype == "fp32"),
                "grad_dtype", "with engine.precision=bf16 needs engine.zero_stage >= 1 (DeepSpeed "
                "accumulates bf16 gradients in fp32 only under ZeRO); set engine.grad_dtype=bf16 "
                "for ZeRO-0")
        require(not self.offload_params or self.zero_stage == 3, "offload_params",
                "needs engine.zero_stage=3")
        require(not self.offload_optimizer or self.zero_stage >= 1, "offload_optimizer",
                "needs engine.zero_stage >= 1")
        require(self.backend in ("auto", "gloo", "nccl"), "backend", "must be auto, gloo or nccl")
        require(self.bucket_size > 0, "bucket_size", "must be > 0")
        require(self.zero3_persistence_threshold >= 0, "zero3_persistence_threshold", "must be >= 0")
        require(self.timeout_minutes > 0, "timeout_minutes", "must be > 0")

    def grad_accum_for(self, *, world_size: int, micro_batch_size: int, seq_len: int) -> int:
        """Micro-batches per optimizer step on `world_size` ranks: engine.grad_accum, or derived
        from engine.global_batch_tokens (a clear error when it does not divide exactly)."""
        if not self.global_batch_tokens:
            return self.grad_accum
        per_micro_step = world_size * micro_batch_size * seq_len
        accum, rest = divmod(self.global_batch_tokens, per_micro_step)
        if rest or not accum:
            near = sorted({max(1, accum) * per_micro_step, (accum + 1) * per_micro_step})
            raise ValueError(
                f"engine.global_batch_tokens={self.global_batch_tokens} is not a multiple of "
                f"{world_size} ranks × data.micro_batch_size={micro_batch_size} × "
                f"data.seq_len={seq_len} = {per_micro_step} tokens per micro-step; use e.g. "
                + " or ".join(map(str, near)))
        return accum

    def resolved(self, *, world_size: int, micro_batch_size: int, seq_len: int) -> "EngineConfig":
        """The config DeepSpeed is built from: grad_accum derived for this world size
        (global_batch_tokens is then 0: nothing is left to derive)."""
        accum = self.grad_accum_for(world_size=world_size, micro_batch_size=micro_batch_size,
                                    seq_len=seq_len)
        return dataclasses.replace(self, grad_accum=accum, global_batch_tokens=0)
