"""Configuration of the data pipeline (shards → logical streams → decode → pack → Batch)."""

from __future__ import annotations

import dataclasses
import math


@dataclasses.dataclass(frozen=True, kw_only=True)
class MediaSpec:
    """The media geometry the model expects; the loader decodes to exactly this.

    Owned by the model config (`ModelConfig.media()`), handed to the loader as a runtime object.
    """

    image_size: int  # images are resized (aspect kept, letterboxed) to image_size × image_size
    patch_size: int
    audio_seconds: float  # clips are cropped / zero-padded to this duration
    n_mels: int
    audio_frames_per_token: int  # consecutive log-mel frames stacked into one audio token
    sample_rate: int = 16000
    n_fft: int = 400
    hop_length: int = 160
    # Generated media (ModelConfig.code_range): codes of a kind are token ids after the text
    # vocabulary (text_vocab), image codes first; 0 codes: that kind is never generated.
    text_vocab: int = 0
    image_codes: int = 0
    audio_codes: int = 0

    def code_first(self, kind: str) -> int:
        """The token id of code 0 of `kind` ("image" or "audio")."""
        return self.text_vocab + (0 if kind == "image" else self.image_codes)

    @property
    def patches_per_image(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @property
    def patch_dim(self) -> int:
        return 3 * self.patch_size * self.patch_size

    @property
    def audio_frames(self) -> int:
        n = math.ceil(self.audio_seconds * self.sample_rate / self.hop_length)
        return n - n % self.audio_frames_per_token  # whole tokens only

    @property
    def tokens_per_audio(self) -> int:
        return self.audio_frames // self.audio_frames_per_token

    @property
    def audio_token_dim(self) -> int:
        return self.n_mels * self.audio_frames_per_token


@dataclasses.dataclass(kw_only=True)
class DataConfig:
    """Where the shards are and how they become packed rows."""

    train: str = "data/demo/train"  # a directory (or file:// / http(s):// base) with dataset.json
    mix: dict[str, float] = dataclasses.field(default_factory=dict)  # {dir: weight}: replaces train
    allow_pipe: bool = False  # follow `pipe:` shard URLs (they run a shell command)
    val: str = "data/demo/val"  # held-out shards for evaluation ("" to skip)
    synth_if_missing: bool = False  # build the demo corpus if absent (only configs/tiny.yaml does)
    synth_samples: int = 4000
    synth_seed: int = 0
    tokenizer: str = "bytes"  # "bytes" or a tokenizer.json from `mmtrain data train-tokenizer`
    seq_len: int = 512  # tokens per packed row
    micro_batch_size: int = 8  # rows per rank per micro-step
    num_streams: int = 8  # logical streams per dataset: fixed for a run, independent of ranks/workers
    num_workers: int = 1  # decode worker processes per rank (0: decode in the training process)
    shuffle_shards: int = 4  # shard slices a stream reads at once, interleaved (cross-shard shuffle)
    shuffle_buffer: int = 256  # samples in each stream's seeded shuffle buffer
    seed: int = 0
    long_docs: str = "split"  # a document longer than a row: "split" across rows, or "drop"
    allow_data_change: bool = False  # resume even if the dataset fingerprint changed
    max_consecutive_failures: int = 50  # stop, naming the shard, after this many bad samples in a row
    io_retries: int = 5  # retries of a failed shard open / read, with exponential backoff
    io_backoff: float = 0.5  # seconds before the first retry (doubled each time, at most 60)
    max_shard_failures: int = 3  # unreadable shards in a row before stopping (naming the shard)
    max_open_shards: int = 4  # open files / connections per consumer (rank or decode worker)
    read_ahead: int = 2  # blocks fetched ahead per remote shard being read
    io_block_mb: int = 8  # a shard is read in blocks of this many MiB (one range request each)
    max_image_pixels: int = 50_000_000  # decompression-bomb guard, checked from the header
    # Media generation (docs/architecture.md, "Any-to-any"). A media item of a kind with a
    # tokenizer becomes, with probability generation_fraction (decided per item from data.seed and
    # the sample key), a generation target: the text right after it (its caption) moves in front
    # of it, and the item enters the sequence as <begin> codes <end>, the codes being targets.
    # Otherwise it stays a continuous input, as without a tokenizer.
    image_tokenizer: str = ""  # a directory from `mmtrain data train-media-tokenizer image`
    audio_tokenizer: str = ""  # the same for audio
    generation_fraction: float = 0.5
    caption_dropout: float = 0.1  # a generation target's caption is dropped this often (for CFG)
    codes: str = "auto"  # auto: stored KEY.M.codes.npy members when dataset.json's media_codes
    #                      fingerprint is the tokenizer's, else encode on the fly | stored | encode

    def __post_init__(self) -> None:
        def require(ok: bool, key: str, why: str) -> None:
            if not ok:
                raise ValueError(f"data.{key}={getattr(self, key)!r} {why}")

        require(bool(self.train) or bool(self.mix), "train", "must name a shard directory")
        for name, weight in self.mix.items():
            if not weight > 0:
                raise ValueError(f"data.mix.{name}={weight!r} must be > 0")
        require(self.seq_len >= 16, "seq_len", "must be >= 16")
        require(self.micro_batch_size >= 1, "micro_batch_size", "must be >= 1")
        require(self.num_streams >= 1, "num_streams", "must be >= 1")
        require(self.num_workers >= 0, "num_workers", "must be >= 0")
        require(self.shuffle_shards >= 1, "shuffle_shards", "must be >= 1 (1: one shard at a time)")
        require(self.shuffle_buffer >= 1, "shuffle_buffer", "must be >= 1 (1: no shuffle buffer)")
        require(self.long_docs in ("split", "drop"), "long_docs", "must be 'split' or 'drop'")
        require(self.synth_samples >= 10, "synth_samples", "must be >= 10")
        require(self.max_consecutive_failures >= 1, "max_consecutive_failures", "must be >= 1")
        require(self.max_image_pixels >= 1, "max_image_pixels", "must be >= 1")
        require(self.io_retries >= 0, "io_retries", "must be >= 0")
        require(0 <= self.io_backoff <= 60, "io_backoff", "must be in [0, 60] seconds")
        require(self.max_shard_failures >= 1, "max_shard_failures", "must be >= 1")
        require(self.max_open_shards >= 1, "max_open_shards", "must be >= 1")
        require(self.read_ahead >= 0, "read_ahead", "must be >= 0")
        require(1 <= self.io_block_mb <= 1024, "io_block_mb", "must be in [1, 1024]")
        require(0 <= self.generation_fraction <= 1, "generation_fraction", "must be in [0, 1]")
        require(0 <= self.caption_dropout < 1, "caption_dropout", "must be in [0, 1)")
        require(self.codes in ("auto", "stored", "encode"), "codes",
                "must be auto, stored or encode")
