"""The batch contract between loader and model (ARCHITECTURE.md, contract 2).

Legend: B rows, T tokens per row, N documents (padding runs count as documents), P patches per
image, Dp values per patch, A tokens per audio clip, Da values per audio token.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import torch

from mmtrain.data.config import MediaSpec
from mmtrain.data.packing import IGNORE, Row


@dataclasses.dataclass
class Batch:
    tokens: torch.Tensor  # [B, T] int64; media positions hold a placeholder id
    targets: torch.Tensor  # [B, T] int64; IGNORE (-100) where no loss is taken
    positions: torch.Tensor  # [B, T] int64; restart at 0 for every document
    cu_seqlens: torch.Tensor  # [N + 1] int32 over the flattened B·T tokens
    max_seqlen: int
    image_patches: torch.Tensor  # [n_images, P, Dp] float32
    image_index: torch.Tensor  # [n_images · P] int64: flat positions in B·T the patches fill
    audio_tokens: torch.Tensor  # [n_audio, A, Da] float32
    audio_index: torch.Tensor  # [n_audio · A] int64
    caption_mask: torch.Tensor  # [B, T] bool: the target is a caption token describing media
    counts: dict[str, int]  # text/image/audio/pad tokens, documents, rows (for metrics)
    doc_keys: list = dataclasses.field(default_factory=list)  # (stream, key) of documents started
    # [n_code_targets] int64: flat positions in B·T whose target is a media code (weighted by
    # model.code_loss_weight in the loss); computed here so the model needs no host sync.
    code_index: torch.Tensor = dataclasses.field(
        default_factory=lambda: torch.zeros(0, dtype=torch.int64))

    def to(self, device: torch.device | str) -> "Batch":
        """The batch on `device`. Host-to-GPU copies start from page-locked memory (pinned here
        unless the loader already pinned it), so `non_blocking` really overlaps them with compute;
        from pageable memory the copy would be synchronous. A no-op pass on CPU."""
        device = torch.device(device)
        moved = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        for name, value in moved.items():
            if isinstance(value, torch.Tensor):
                if needs_pinning(value, device):
                    value = value.pin_memory()
                moved[name] = value.to(device, non_blocking=True)
        return Batch(**moved)

    def pin_memory(self) -> "Batch":
        """The batch in page-locked host memory (torch's DataLoader calls this in its pinning
        thread when built with pin_memory=True)."""
        moved = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        return Batch(**{k: v.pin_memory() if isinstance(v, torch.Tensor) else v
                        for k, v in moved.items()})

    @property
    def num_rows(self) -> int:
        return self.tokens.shape[0]


def attention_pairs(doc_lens: list[int]) -> int:
    """Query-key pairs causal document-masked attention computes: Σ n(n+1)/2 over the documents
    (padding runs included: the kernel processes them like documents). The standard MFU formula
    counts T² per row of T tokens instead (full context, no causal half)."""
    return sum(n * (n + 1) // 2 for n in doc_lens)


def needs_pinning(tensor: torch.Tensor, device: torch.device) -> bool:
    """A host tensor bound for a CUDA device, not yet page-locked."""
    return device.type == "cuda" and tensor.device.type == "cpu" and not tensor.is_pinned()


def collate_rows(rows: list[Row], spec: MediaSpec, *, image_token: int, audio_token: int) -> Batch:
    T = len(rows[0].tokens)
    doc_lens = [n for row in rows for n in row.doc_lens]
    cu = np.zeros(len(doc_lens) + 1, np.int32)
    np.cumsum(doc_lens, out=cu[1:])
    images = {"image": ([], []), "audio": ([], [])}
    for b, row in enumerate(rows):
        for kind, start, values in row.media:
            arrays, index = images[kind]
            arrays.append(values)
            index.append(np.arange(b * T + start, b * T + start + len(values)))
    tokens = np.stack([r.tokens for r in rows])

    def stacked(kind: str, n: int, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
        arrays, index = images[kind]
        if not arrays:
            return torch.zeros(0, n, dim), torch.zeros(0, dtype=torch.int64)
        return torch.from_numpy(np.stack(arrays)), torch.from_numpy(np.concatenate(index))

    image_patches, image_index = stacked("image", spec.patches_per_image, spec.patch_dim)
    audio_tokens, audio_index = stacked("audio", spec.tokens_per_audio, spec.audio_token_dim)
    real = sum(r.real_tokens for r in rows)
    targets = np.stack([r.targets for r in rows])
    has_codes = spec.image_codes + spec.audio_codes > 0  # without codes text_vocab may be unset (0)
    code_targets = (targets >= spec.text_vocab) & has_codes
    code_tokens = (tokens >= spec.text_vocab) & has_codes
    counts = {
        "rows": len(rows),
        "docs": sum(len(r.doc_lens) - (r.real_tokens < T) for r in rows),
        "image_tokens": int((tokens == image_token).sum()),
        "audio_tokens": int((tokens == audio_token).sum()),
        "pad_tokens": len(rows) * T - real,
        "real_tokens": real,
        "images": len(images["image"][0]),
        "audio_clips": len(images["audio"][0]),
        "attention_pairs": attention_pairs(doc_lens),
        "code_tokens": int(code_tokens.sum()),
        "code_targets": int(code_targets.sum()),
        "targets": int((targets != IGNORE).sum()),
    }
    counts["text_tokens"] = real - counts["image_tokens"] - counts["audio_tokens"] - \
        counts["code_tokens"]
    return Batch(
        tokens=torch.from_numpy(tokens),
        targets=torch.from_numpy(targets),
        positions=torch.from_numpy(np.stack([r.positions for r in rows])),
        cu_seqlens=torch.from_numpy(cu),
        max_seqlen=int(max(doc_lens)),
        image_patches=image_patches, image_index=image_index,
        audio_tokens=audio_tokens, audio_index=audio_index,
        caption_mask=torch.from_numpy(np.stack([r.caption for r in rows])),
        counts=counts,
        code_index=torch.from_numpy(np.flatnonzero(code_targets).astype(np.int64)),
    )


def text_batch(tokens: torch.Tensor, doc_lens: list[list[int]], spec: MediaSpec | None = None) -> Batch:
    """A text-only batch from token ids [B, T] and per-row document lengths (benchmarks, tests).

    Targets are next tokens within each document; positions restart per document.
    """
    B, T = tokens.shape
    if len(doc_lens) != B or any(sum(lens) != T for lens in doc_lens):
        raise ValueError(f"doc_lens must give {B} rows whose lengths sum to {T}")
    spec = spec or MediaSpec(image_size=32, patch_size=8, audio_seconds=1.0, n_mels=40,
                             audio_frames_per_token=4)
    targets = torch.full_like(tokens, IGNORE)
    positions = torch.zeros_like(tokens)
    flat = [n for lens in doc_lens for n in lens]
    at = 0
    for n in flat:
        b, t = divmod(at, T)
        targets[b, t:t + n - 1] = tokens[b, t + 1:t + n]
        positions[b, t:t + n] = torch.arange(n)
        at += n
    cu = torch.zeros(len(flat) + 1, dtype=torch.int32)
    cu[1:] = torch.cumsum(torch.tensor(flat), 0)
    return Batch(tokens=tokens, targets=targets, positions=positions, cu_seqlens=cu,
                 max_seqlen=max(flat),
                 image_patches=torch.zeros(0, spec.patches_per_image, spec.patch_dim),
                 image_index=torch.zeros(0, dtype=torch.int64),
                 audio_tokens=torch.zeros(0, spec.tokens_per_audio, spec.audio_token_dim),
                 audio_index=torch.zeros(0, dtype=torch.int64),
                 caption_mask=torch.zeros(B, T, dtype=torch.bool),
                 counts={"rows": B, "docs": len(flat), "text_tokens": B * T, "image_tokens": 0,
                         "audio_tokens": 0, "pad_tokens": 0, "real_tokens": B * T,
                         "images": 0, "audio_clips": 0, "attention_pairs": attention_pairs(flat),
                         "code_tokens": 0, "code_targets": 0,
                         "targets": int((targets != IGNORE).sum())})
