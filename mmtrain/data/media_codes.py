"""Media items as generation targets: which items, and their codes (issue 15, docs/architecture.md
"Any-to-any").

A media item of a kind that has a tokenizer (data.image_tokenizer / data.audio_tokenizer) becomes a
generation target with probability data.generation_fraction; its caption (the text segment right
after it) is then dropped with probability data.caption_dropout. Both draws are a pure function of
(data.seed, sample key, segment index), so packing stays a pure function of the document sequence
and resume stays exact. A target's codes come from the sample's stored member `M.codes.npy`
(written by `mmtrain data tokenize-media`) when the dataset recorded the same tokenizer
fingerprint, otherwise from the tokenizer on the fly (data.codes says which are allowed).

Token ids: a code c of kind k is `spec.code_first[k] + c` (image codes right after the text
vocabulary, audio codes after them: ModelConfig.code_range).
"""

from __future__ import annotations

import hashlib
from typing import Any

import numpy as np

from mmtrain.data.config import DataConfig, MediaSpec
from mmtrain.data.schema import SampleError

KINDS = ("image", "audio")
INPUT, GENERATE, GENERATE_UNCONDITIONAL = "input", "generate", "generate-unconditional"


def _uniforms(seed: int, key: str, index: int) -> tuple[float, float]:
    """Two uniform numbers in [0, 1) that depend only on (seed, key, index)."""
    digest = hashlib.blake2b(f"{seed}\0{key}\0{index}".encode(), digest_size=16).digest()
    a, b = int.from_bytes(digest[:8], "little"), int.from_bytes(digest[8:], "little")
    return a / 2.0 ** 64, b / 2.0 ** 64


class MediaCodes:
    """The kinds this run generates, their tokenizers, and the per-item choices.

    Built in the training process (cheap: reads and checks the tokenizer files); the tokenizer
    networks themselves load lazily, in whichever process first encodes an item on the fly.
    """

    def __init__(self, cfg: DataConfig, spec: MediaSpec) -> None:
        from mmtrain.media_tokenizers import read_tokenizer_info

        self.fraction, self.dropout, self.seed = cfg.generation_fraction, cfg.caption_dropout, cfg.seed
        self.mode = cfg.codes
        self.dirs: dict[str, str] = {}
        self.fingerprints: dict[str, str] = {}
        self.first: dict[str, int] = {}
        self.length: dict[str, int] = {}  # codes per item
        self.codebook: dict[str, int] = {}
        self._tokenizers: dict[str, Any] = {}
        for kind, directory in (("image", cfg.image_tokenizer), ("audio", cfg.audio_tokenizer)):
            codes = spec.image_codes if kind == "image" else spec.audio_codes
            if not directory:
                continue
            info = read_tokenizer_info(directory)  # checks version and fingerprint
            if info["kind"] != kind:
                raise ValueError(f"data.{kind}_tokenizer={directory!r} holds a {info['kind']} "
                                 "tokenizer")
            if info["codebook_size"] != codes:
                raise ValueError(f"data.{kind}_tokenizer={directory!r} has {info['codebook_size']} "
                                 f"codes but model.{kind}_codes={codes}: set model.{kind}_codes="
                                 f"{info['codebook_size']}")
            self.dirs[kind] = str(directory)
            self.fingerprints[kind] = info["fingerprint"]
            self.first[kind] = spec.code_first(kind)
            self.length[kind] = int(np.prod(info["code_shape"]))
            self.codebook[kind] = codes

    def __getstate__(self) -> dict[str, Any]:  # sent to decode workers without loaded networks
        return {**self.__dict__, "_tokenizers": {}}

    # ---- which items

    def decisions(self, key: str, kinds: list[str]) -> list[str]:
        """INPUT, GENERATE or GENERATE_UNCONDITIONAL for each segment (by its type)."""
        out = []
        for index, kind in enumerate(kinds):
            if kind not in self.dirs or self.fraction == 0:
                out.append(INPUT)
                continue
            u_generate, u_drop = _uniforms(self.seed, key, index)
            if u_generate >= self.fraction:
                out.append(INPUT)
            else:
                out.append(GENERATE_UNCONDITIONAL if u_drop < self.dropout else GENERATE)
        return out

    def stored_kinds(self, index: dict[str, Any]) -> frozenset[str]:
        """The kinds whose stored codes members a dataset (its dataset.json) lets us use."""
        recorded = index.get("media_codes") or {}
        usable = frozenset(kind for kind in self.dirs
                           if (recorded.get(kind) or {}).get("fingerprint") == self.fingerprints[kind])
        if self.mode == "stored":
            missing = sorted(set(self.dirs) - usable)
            if missing:
                raise ValueError(
                    f"data.codes=stored but the dataset's dataset.json records no {'/'.join(missing)} "
                    f"codes made by the configured tokenizer (fingerprints "
                    f"{', '.join(self.fingerprints[k][:12] for k in missing)}): run `mmtrain data "
                    "tokenize-media` with it, or set data.codes=auto")
        return frozenset() if self.mode == "encode" else usable

    # ---- codes

    def token_ids(self, kind: str, data: bytes, stored: bytes, use_stored: bool) -> np.ndarray:
        """The item's code token ids [n] int64 (SampleError when the media or codes are bad)."""
        if use_stored and stored:
            try:
                from mmtrain.media_tokenizers import codes_from_npy

                codes = codes_from_npy(stored).reshape(-1)
            except ValueError as e:
                raise SampleError(f"{kind} codes member: {e}") from None
            if codes.size != self.length[kind] or (codes.size and codes.max() >= self.codebook[kind]):
                raise SampleError(f"{kind} codes member holds {codes.size} codes up to "
                                  f"{codes.max() if codes.size else None}; the tokenizer makes "
                                  f"{self.length[kind]} below {self.codebook[kind]}")
        elif use_stored and self.mode == "stored":
            raise SampleError(f"{kind} item has no codes member (data.codes=stored; the dataset "
                              "was tokenized: was the sample changed since?)")
        else:
            codes = self.encode(kind, data)
        return codes.astype(np.int64) + self.first[kind]

    def encode(self, kind: str, data: bytes) -> np.ndarray:
        """Tokenize one item on the fly: bytes → codes [n] (0-based)."""
        import torch

        tokenizer = self.tokenizer(kind)
        x = torch.from_numpy(tokenizer.input_from_bytes(data))[None]  # SampleError if bad
        return tokenizer.encode(x)[0].reshape(-1).numpy()

    def tokenizer(self, kind: str):
        if kind not in self._tokenizers:
            from mmtrain.media_tokenizers import load_tokenizer

            tok = load_tokenizer(self.dirs[kind], kind=kind)
            if tok.fingerprint != self.fingerprints[kind]:
                raise ValueError(f"data.{kind}_tokenizer={self.dirs[kind]!r} changed while the run "
                                 "was starting (fingerprint differs)")
            self._tokenizers[kind] = tok
        return self._tokenizers[kind]

