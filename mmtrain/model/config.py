"""Configuration of the fusion Transformer, and its presets (a dict of small functions)."""

from __future__ import annotations

import dataclasses
from typing import Callable

from mmtrain.data.config import MediaSpec


@dataclasses.dataclass(kw_only=True)
class ModelConfig:
    preset: str = "tiny"  # informational: which preset these values came from
    dim: int = 256
    n_layers: int = 4
    n_heads: int = 8
    n_kv_heads: int = 4  # grouped-query attention: must divide n_heads
    ffn_dim: int = 0  # 0: SwiGLU default, 8/3·dim rounded up to ffn_multiple_of
    ffn_multiple_of: int = 64
    vocab_size: int = 272  # >= the tokenizer's vocabulary (bytes + specials = 265)
    max_seq_len: int = 512
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    tie_embeddings: bool = True
    init_std: float = 0.02
    activation_checkpointing: bool = False
    kernels: str = "auto"  # auto (per-case fastest correct on CUDA, reference on CPU) | triton | reference
    # Modality encoders (their geometry is what the loader decodes to).
    image_size: int = 32
    patch_size: int = 8
    image_encoder_layers: int = 0  # 0: linear patch projection; >0: a small MLP stack
    n_mels: int = 40
    audio_seconds: float = 1.0
    audio_frames_per_token: int = 4
    # Media generation (docs/architecture.md, "Any-to-any"): codebook sizes of the image and audio
    # tokenizers (data.image_tokenizer / data.audio_tokenizer; 0: that modality is never generated).
    # Their codes are output vocabulary placed after the text vocabulary: image codes at
    # [vocab_size, vocab_size + image_codes), audio codes right after them.
    image_codes: int = 0
    audio_codes: int = 0
    code_loss_weight: float = 1.0  # weight of a code target in the loss (a text target weighs 1)

    def __post_init__(self) -> None:
        def require(ok: bool, key: str, why: str) -> None:
            if not ok:
                raise ValueError(f"model.{key}={getattr(self, key)!r} {why}")

        require(self.dim > 0, "dim", "must be > 0")
        require(self.n_layers > 0, "n_layers", "must be > 0")
        require(self.n_heads > 0 and self.dim % self.n_heads == 0, "n_heads",
                f"must divide model.dim={self.dim}")
        require(self.n_kv_heads > 0 and self.n_heads % self.n_kv_heads == 0, "n_kv_heads",
                f"must divide model.n_heads={self.n_heads}")
        require(self.head_dim % 2 == 0, "n_heads", f"gives an odd head_dim={self.head_dim} (RoPE needs even)")
        require(self.ffn_dim >= 0, "ffn_dim", "must be >= 0")
        require(self.ffn_multiple_of > 0, "ffn_multiple_of", "must be > 0")
        require(self.vocab_size >= 265, "vocab_size", "must be >= 265 (bytes + special tokens)")
        require(self.max_seq_len > 0, "max_seq_len", "must be > 0")
        require(self.kernels in ("auto", "triton", "reference"), "kernels",
                "must be auto, triton or reference")
        require(self.patch_size > 0 and self.image_size % self.patch_size == 0, "image_size",
                f"must be a multiple of model.patch_size={self.patch_size}")
        require(self.image_encoder_layers >= 0, "image_encoder_layers", "must be >= 0")
        require(self.n_mels > 0, "n_mels", "must be > 0")
        require(self.audio_seconds > 0, "audio_seconds", "must be > 0")
        require(self.audio_frames_per_token > 0, "audio_frames_per_token", "must be > 0")
        require(self.init_std > 0, "init_std", "must be > 0")
        require(0 < self.norm_eps < 1, "norm_eps", "must be in (0, 1)")
        require(self.rope_theta > 0, "rope_theta", "must be > 0")
        require(self.image_codes >= 0, "image_codes", "must be >= 0")
        require(self.audio_codes >= 0, "audio_codes", "must be >= 0")
        require(self.code_loss_weight > 0, "code_loss_weight", "must be > 0")

    @property
    def total_vocab(self) -> int:
        """Rows of the embedding table and the output head: text vocabulary + media codes."""
        return self.vocab_size + self.image_codes + self.audio_codes

    def code_range(self, kind: str) -> tuple[int, int]:
        """[first, stop) token ids of the image or audio codes."""
        first = self.media().code_first(kind)
        return first, first + (self.image_codes if kind == "image" else self.audio_codes)

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def hidden_dim(self) -> int:
        if self.ffn_dim:
            return self.ffn_dim
        hidden = int(8 * self.dim / 3)
        return self.ffn_multiple_of * ((hidden + self.ffn_multiple_of - 1) // self.ffn_multiple_of)

    def media(self) -> MediaSpec:
        return MediaSpec(image_size=self.image_size, patch_size=self.patch_size,
                         audio_seconds=self.audio_seconds, n_mels=self.n_mels,
                         audio_frames_per_token=self.audio_frames_per_token,
                         text_vocab=self.vocab_size, image_codes=self.image_codes,
                         audio_codes=self.audio_codes)

    def num_params(self, *, exclude_embedding: bool = False) -> int:
        """Parameter count from the shapes alone (no model needed); matches FusionTransformer."""
        d, kv = self.dim, self.n_kv_heads * self.head_dim
        attn = d * d + 2 * d * kv + d * d
        mlp = 3 * d * self.hidden_dim
        per_layer = attn + mlp + 2 * d
        media = self.media()
        image = media.patch_dim * d + d + self.image_encoder_layers * (2 * d * d + 2 * d)
        audio = media.audio_token_dim * d + d
        embed = self.total_vocab * d
        head = 0 if self.tie_embeddings else self.total_vocab * d
        total = self.n_layers * per_layer + d + image + audio + embed + head
        return total - embed if exclude_embedding else total

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token: 6·N + 12·L·d·T (N: parameters without the input embedding).

        The standard estimate (Kaplan et al.; PaLM appendix B): 6·N for the matmuls of forward and
        backward, 12·L·d·T for attention scores and values at context T. With packed documents the
        real attention cost is lower; we keep the standard formula so MFU compares across systems.
        """
        return 6 * self._matmul_params() + 12 * self.n_layers * self.dim * seq_len

    def flops_executed(self, *, positions: int, attention_pairs: int) -> float:
        """Training FLOPs a batch executes (the `mfu_executed` metric): 6·N per position the
        model runs on (padding included) + 12·L·d per causal query-key pair inside a document
        (`Batch.counts["attention_pairs"]` = Σ n(n+1)/2 over cu_seqlens). The constants are those
        of `flops_per_token`: a row of T tokens counted with T² pairs gives T·flops_per_token(T).
        Activation checkpointing's recomputed forward is not counted (model FLOPs, as in MFU).
        """
        return 6 * self._matmul_params() * positions + 12 * self.n_layers * self.dim * attention_pairs

    def _matmul_params(self) -> int:
        n = self.num_params(exclude_embedding=True)
        if self.tie_embeddings:  # the tied embedding still does the output projection's matmul
            n += self.total_vocab * self.dim
        return n


def _tiny() -> ModelConfig:
    return ModelConfig(preset="tiny")


def _llm(name: str, *, dim: int, n_layers: int, n_heads: int, n_kv_heads: int, ffn_dim: int,
         max_seq_len: int, tie: bool) -> ModelConfig:
    return ModelConfig(preset=name, dim=dim, n_layers=n_layers, n_heads=n_heads,
                       n_kv_heads=n_kv_heads, ffn_dim=ffn_dim, vocab_size=32768,
                       max_seq_len=max_seq_len, tie_embeddings=tie, image_size=224, patch_size=14,
                       image_encoder_layers=2, n_mels=80, audio_seconds=10.0,
                       audio_frames_per_token=4)


PRESETS: dict[str, Callable[[], ModelConfig]] = {
    "tiny": _tiny,
    "125m": lambda: _llm("125m", dim=768, n_layers=12, n_heads=12, n_kv_heads=4, ffn_dim=2816,
                         max_seq_len=2048, tie=True),
    "350m": lambda: _llm("350m", dim=1024, n_layers=24, n_heads=16, n_kv_heads=8, ffn_dim=3200,
                         max_seq_len=2048, tie=True),
    "1b": lambda: _llm("1b", dim=2048, n_layers=16, n_heads=32, n_kv_heads=8, ffn_dim=7552,
                       max_seq_len=4096, tie=True),
    "7b": lambda: _llm("7b", dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, ffn_dim=13568,
                       max_seq_len=4096, tie=False),
}


def preset(name: str) -> ModelConfig:
    if name not in PRESETS:
        raise ValueError(f"model preset {name!r} is unknown (known: {', '.join(PRESETS)})")
    return PRESETS[name]()
