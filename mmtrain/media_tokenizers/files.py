"""A trained media tokenizer on disk: a directory with two files.

    DIR/weights.safetensors   the parameters (safetensors: no pickle)
    DIR/config.json           {"format": "mmtrain-media-tokenizer", "format_version": 1,
                               "kind": "image"|"audio", "config": {...architecture and features},
                               "fingerprint": sha256, "codebook_size", "code_shape",
                               "quality": {...}, "training": {...}}

The fingerprint is sha256(canonical JSON of format, format_version, kind, config ‖ NUL ‖ the
weights file's bytes): what decides which code a given input gets. `quality` and `training` are a
record of how it was made and are not part of it. Both files are written atomically, config.json
last: a crash in between leaves no config.json, or an older one whose fingerprint does not match
the new weights; loading refuses both, naming the file.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
from pathlib import Path
from typing import Any, Union

import torch
import numpy as np
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from mmtrain.fileio import atomic_write_bytes
from mmtrain.media_tokenizers.audio import AudioTokenizer, AudioTokenizerConfig
from mmtrain.media_tokenizers.image import ImageTokenizer, ImageTokenizerConfig

FORMAT = "mmtrain-media-tokenizer"
FORMAT_VERSION = 1
CONFIG_JSON = "config.json"
WEIGHTS = "weights.safetensors"

MediaTokenizer = Union[ImageTokenizer, AudioTokenizer]
KINDS: dict[str, tuple[type, type]] = {
    "image": (ImageTokenizer, ImageTokenizerConfig),
    "audio": (AudioTokenizer, AudioTokenizerConfig),
}


def build_tokenizer(kind: str, **config: Any) -> MediaTokenizer:
    """A fresh (untrained) tokenizer of `kind` with the config fields given."""
    if kind not in KINDS:
        raise ValueError(f"media tokenizer kind {kind!r} is unknown (known: {', '.join(KINDS)})")
    module, config_cls = KINDS[kind]
    return module(config_cls(**config))


def _spec(kind: str, config: dict[str, Any]) -> dict[str, Any]:
    return {"format": FORMAT, "format_version": FORMAT_VERSION, "kind": kind, "config": config}


def _fingerprint(spec: dict[str, Any], weights: bytes) -> str:
    h = hashlib.sha256(json.dumps(spec, sort_keys=True, separators=(",", ":")).encode())
    h.update(b"\0")
    h.update(weights)
    return h.hexdigest()


def save_tokenizer(tokenizer: MediaTokenizer, directory: str | Path, *,
                   quality: dict[str, Any] | None = None,
                   training: dict[str, Any] | None = None) -> str:
    """Write the tokenizer directory (weights, then config.json); returns its fingerprint."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in tokenizer.state_dict().items()}
    weights = st_save(state)  # no metadata: its order in the header varies between runs
    config = json.loads(json.dumps(dataclasses.asdict(tokenizer.config)))  # tuples → lists
    spec = _spec(tokenizer.kind, config)
    fingerprint = _fingerprint(spec, weights)
    meta = {**spec, "fingerprint": fingerprint, "codebook_size": tokenizer.codebook_size,
            "code_shape": list(tokenizer.code_shape), "quality": quality or {},
            "training": training or {}}
    atomic_write_bytes(directory / WEIGHTS, weights)
    atomic_write_bytes(directory / CONFIG_JSON, (json.dumps(meta, indent=2) + "\n").encode())
    return fingerprint


def read_tokenizer_info(directory: str | Path) -> dict[str, Any]:
    """config.json, checked (format, version, fingerprint against the weights file)."""
    info, _ = _read_checked(Path(directory))
    return info


def tokenizer_fingerprint(directory: str | Path) -> str:
    """The fingerprint of the tokenizer in `directory`, verified against its files (this is what
    checkpoints and tokenized datasets record)."""
    return read_tokenizer_info(directory)["fingerprint"]


def _read_checked(directory: Path) -> tuple[dict[str, Any], bytes]:
    config_path, weights_path = directory / CONFIG_JSON, directory / WEIGHTS
    if not config_path.is_file():
        raise ValueError(f"{config_path}: no media tokenizer here (config.json is missing; "
                         "train one with `mmtrain data train-media-tokenizer`)")
    try:
        info = json.loads(config_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{config_path}: not valid JSON ({e})") from None
    if not isinstance(info, dict) or info.get("format") != FORMAT:
        raise ValueError(f"{config_path}: not a media tokenizer config (format is not {FORMAT!r})")
    if info.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{config_path}: format_version {info.get('format_version')!r}; this "
                         f"mmtrain reads version {FORMAT_VERSION}")
    if info.get("kind") not in KINDS or not isinstance(info.get("config"), dict):
        raise ValueError(f"{config_path}: 'kind' must be one of {list(KINDS)} and 'config' an "
                         "object")
    if not weights_path.is_file():
        raise ValueError(f"{weights_path}: missing (the tokenizer directory is incomplete)")
    weights = weights_path.read_bytes()
    actual = _fingerprint(_spec(info["kind"], info["config"]), weights)
    if actual != info.get("fingerprint"):
        raise ValueError(f"{weights_path}: fingerprint {actual[:16]}… does not match "
                         f"{str(info.get('fingerprint'))[:16]}… recorded in {config_path} "
                         "(the weights or the config changed after the tokenizer was written)")
    return info, weights


def load_tokenizer(directory: str | Path, *, kind: str = "",
                   device: str | torch.device = "cpu") -> MediaTokenizer:
    """The tokenizer in `directory`, in eval mode, after checking version and fingerprint.

    `kind`: refuse a tokenizer of another kind ("image" or "audio"; "" accepts either).
    """
    directory = Path(directory)
    info, weights = _read_checked(directory)
    if kind and info["kind"] != kind:
        raise ValueError(f"{directory / CONFIG_JSON}: holds the {info['kind']} tokenizer, "
                         f"not {kind}")
    module, config_cls = KINDS[info["kind"]]
    fields = {f.name for f in dataclasses.fields(config_cls)}
    unknown = sorted(set(info["config"]) - fields)
    if unknown:
        raise ValueError(f"{directory / CONFIG_JSON}: unknown config fields {unknown}")
    config = {k: tuple(v) if isinstance(v, list) else v for k, v in info["config"].items()}
    tokenizer = module(config_cls(**config))
    try:
        tokenizer.load_state_dict(st_load(weights), strict=True)
    except (SafetensorError, RuntimeError) as e:
        raise ValueError(f"{directory / WEIGHTS}: does not fit its config ({e})") from None
    tokenizer.fingerprint = info["fingerprint"]
    return tokenizer.to(device).eval()


# ---------------------------------------------------------------- codes stored in a shard

def codes_to_npy(codes: np.ndarray) -> bytes:
    """One item's codes → the bytes of a uint16 .npy (what `tokenize-media` stores)."""
    codes = np.asarray(codes)
    if codes.size and (codes.min() < 0 or codes.max() > np.iinfo(np.uint16).max):
        raise ValueError("codes outside [0, 65535] do not fit a codes member")
    buf = io.BytesIO()
    np.save(buf, codes.astype(np.uint16), allow_pickle=False)
    return buf.getvalue()


def codes_from_npy(data: bytes, *, what: str = "codes member") -> np.ndarray:
    """The bytes of a codes member → int64 array; never unpickles. ValueError naming `what`."""
    try:
        codes = np.load(io.BytesIO(data), allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:
        raise ValueError(f"{what}: not a .npy array ({e})") from None
    if codes.dtype != np.uint16:
        raise ValueError(f"{what}: dtype {codes.dtype}, expected uint16")
    return codes.astype(np.int64)
