"""Turning one source row into one sample (runs in the build's worker processes).

Each source kind maps a row to an ordered list of parts — ("text", str), ("image", bytes),
("audio", bytes) — plus metadata; `assemble` then checks and normalises the media, and writes the
sample in the layout of ARCHITECTURE.md: `KEY.json` (ordered segments, source, meta) and one
member per medium (`KEY.0.jpg`, `KEY.1.flac`, ...). Anything wrong raises `Rejected`.

Kinds and their default columns (the first one present in a row is used; override with flags):
  image-text   image: image, image_path, path, filepath, file, jpg   text: caption, text, TEXT, alt
  audio-text   audio: audio, audio_path, audio_filepath, path, file   text: text, transcript, ...
  interleaved  texts: texts   images: images (aligned lists, one of each pair null: OBELICS / MMC4)
  text         text: text, content
  wds          tars: KEY.jpg|png|webp + KEY.txt [+ KEY.json] (img2dataset), or mmtrain's layout
Media cells hold a path (relative to --media-root, by default the table's folder), raw bytes, or
a {"bytes", "path"} struct (Hugging Face datasets). Other columns are kept in KEY.json "meta".
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Any

from data_tools.errors import Rejected
from data_tools.media import MediaOptions, prepare_audio, prepare_image
from data_tools.sources import RawRow
from mmtrain.data.schema import SampleError, check_name, parse_sample, segments_json

KINDS = ("image-text", "audio-text", "interleaved", "text", "wds")
MAX_KEY_BYTES = 80  # + ".12.webp" stays under the 100-byte ustar name limit

DEFAULT_COLUMNS = {
    "image-text": {"image": ("image", "image_path", "path", "filepath", "file", "jpg"),
                   "text": ("caption", "text", "TEXT", "alt_text", "alt")},
    "audio-text": {"audio": ("audio", "audio_path", "audio_filepath", "path", "file", "filepath"),
                   "text": ("text", "transcript", "transcription", "sentence", "caption",
                            "normalized_text")},
    "interleaved": {"texts": ("texts",), "images": ("images",)},
    "text": {"text": ("text", "content")},
    "wds": {},
}


@dataclasses.dataclass(frozen=True, kw_only=True)
class SampleSpec:
    """How rows become samples: everything a worker needs, fixed for a build."""

    kind: str
    columns: dict[str, str] = dataclasses.field(default_factory=dict)  # role → column name
    key_column: str = "key"  # "" to always number the samples
    media: MediaOptions = MediaOptions()
    min_text_chars: int = 0

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"kind {self.kind!r} is not one of {', '.join(KINDS)}")
        unknown = set(self.columns) - set(DEFAULT_COLUMNS[self.kind])
        if unknown:
            raise ValueError(f"kind {self.kind} has no column role(s) {sorted(unknown)}; "
                             f"it uses {sorted(DEFAULT_COLUMNS[self.kind])}")


@dataclasses.dataclass
class Built:
    pos: int
    source_row: str
    key: str
    members: dict[str, bytes]


@dataclasses.dataclass
class Skipped:
    pos: int
    source_row: str
    code: str
    reason: str


def make_sample(row: RawRow, spec: SampleSpec) -> Built | Skipped:
    """One row → a checked sample, or the reason it is skipped."""
    if row.error is not None:
        return Skipped(row.pos, row.source_row, *row.error)
    try:
        if spec.kind == "wds":
            key, parts, source, meta = _from_tar_sample(row.fields)
        else:
            key = _table_key(row, spec.key_column)
            parts, used = _table_parts(row, spec)
            source = spec.kind
            meta = _jsonable({k: v for k, v in row.fields.items() if k not in used})
        members = assemble(key, parts, source=source, meta=meta, spec=spec)
    except Rejected as e:
        return Skipped(row.pos, row.source_row, e.code, str(e))
    return Built(row.pos, row.source_row, key, members)


def assemble(key: str, parts: list[tuple[str, Any]], *, source: str, meta: dict[str, Any],
             spec: SampleSpec) -> dict[str, bytes]:
    """Check and normalise the parts; return the sample's members {suffix: bytes}."""
    check_key(key)
    members: dict[str, bytes] = {}
    segments: list[dict[str, Any]] = []
    for kind, value in parts:
        if kind == "text":
            segments.append({"type": "text", "text": value})
            continue
        prepare = prepare_image if kind == "image" else prepare_audio
        data, ext = prepare(value, spec.media)
        member = f"{len(members)}.{ext}"
        members[member] = data
        segments.append({"type": kind, "member": member})
    text = "".join(s["text"] for s in segments if s["type"] == "text")
    if not text.strip():
        raise Rejected("empty_text", "text is only whitespace" if text else "sample has no text")
    if len(text) < spec.min_text_chars:
        raise Rejected("filtered", f"{len(text)} text characters < --min-text-chars="
                       f"{spec.min_text_chars}")
    members["json"] = segments_json(segments, source=source, **({"meta": meta} if meta else {}))
    try:
        parse_sample(key, members)  # the loader's own parser: the shard writer will run it too
    except SampleError as e:
        raise Rejected("invalid_sample", str(e)) from None
    return members


def check_key(key: str) -> None:
    try:
        check_name(key, "key")
    except SampleError as e:
        raise Rejected("unsafe_name", str(e)) from None
    if "." in key:
        raise Rejected("unsafe_name", f"key {key!r} contains '.', which splits WebDataset keys")
    if len(key.encode("utf-8")) > MAX_KEY_BYTES:
        raise Rejected("unsafe_name", f"key {key[:40]!r}... is longer than {MAX_KEY_BYTES} bytes")


# --------------------------------------------------------------------------------------- tables

def _table_key(row: RawRow, key_column: str) -> str:
    value = row.fields.get(key_column) if key_column else None
    if value is None or value == "":
        return f"{row.pos:09d}"
    return str(value)


def _column(row: RawRow, spec: SampleSpec, role: str) -> str:
    if role in spec.columns:
        name = spec.columns[role]
        if name not in row.fields:
            raise Rejected("bad_row", f"no column {name!r} (--{role}-column); row has "
                           f"{sorted(row.fields)[:20]}")
        return name
    for name in DEFAULT_COLUMNS[spec.kind][role]:
        if name in row.fields:
            return name
    raise Rejected("bad_row", f"no {role} column: none of {list(DEFAULT_COLUMNS[spec.kind][role])} "
                   f"(set --{role}-column); row has {sorted(row.fields)[:20]}")


def _table_parts(row: RawRow, spec: SampleSpec) -> tuple[list[tuple[str, Any]], set[str]]:
    """The ordered parts of a table row, and the columns they used."""
    used = {spec.key_column}
    if spec.kind == "interleaved":
        texts_col, images_col = _column(row, spec, "texts"), _column(row, spec, "images")
        used |= {texts_col, images_col}
        return _interleaved_parts(row.fields[texts_col], row.fields[images_col],
                                  row.media_root), used
    text_col = _column(row, spec, "text")
    used.add(text_col)
    text = _text(row.fields[text_col], text_col)
    if spec.kind == "text":
        return [("text", text)], used
    media_role = "image" if spec.kind == "image-text" else "audio"
    media_col = _column(row, spec, media_role)
    used.add(media_col)
    return [(media_role, load_media(row.fields[media_col], row.media_root)), ("text", text)], used


def _interleaved_parts(texts: Any, images: Any, media_root: str) -> list[tuple[str, Any]]:
    texts, images = _list(texts, "texts"), _list(images, "images")
    if len(texts) != len(images):
        raise Rejected("bad_row", f"texts has {len(texts)} entries, images {len(images)}; "
                       "they must be aligned")
    parts: list[tuple[str, Any]] = []
    for i, (text, image) in enumerate(zip(texts, images)):
        if (text is None) == (image is None):
            raise Rejected("bad_row", f"position {i}: exactly one of texts[{i}] and images[{i}] "
                           "must be null")
        if image is not None:
            parts.append(("image", load_media(image, media_root)))
        elif text := _text(text, f"texts[{i}]"):  # empty strings carry nothing
            parts.append(("text", text))
    return parts


def _list(value: Any, name: str) -> list:
    if isinstance(value, str):  # CSV cells hold JSON arrays
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            pass
    if not isinstance(value, (list, tuple)):
        raise Rejected("bad_row", f"{name} is {type(value).__name__}, not a list")
    return list(value)


def _text(value: Any, column: str) -> str:
    if value is None:
        return ""
    if isinstance(value, bytes):
        try:
            return value.decode("utf-8")
        except UnicodeDecodeError:
            raise Rejected("bad_row", f"{column} is not UTF-8 text") from None
    if not isinstance(value, str):
        raise Rejected("bad_row", f"{column} is {type(value).__name__}, not text")
    return value


def load_media(value: Any, media_root: str) -> bytes:
    """A media cell (path, bytes, or {"bytes", "path"}) → the file's bytes."""
    if isinstance(value, dict):  # Hugging Face Image / Audio struct
        value = value.get("bytes") or value.get("path")
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value)
    if value is None or value == "":
        raise Rejected("missing_media", "no media in this row (null or empty cell)")
    if not isinstance(value, str):
        raise Rejected("bad_row", f"media cell is {type(value).__name__}, not a path or bytes")
    if value.startswith("pipe:") or "://" in value:
        raise Rejected("unsupported_format", f"{value[:100]!r} is a URL or pipe:, not a local "
                       "file (media are never downloaded or run)")
    root = os.path.realpath(media_root)
    path = os.path.realpath(os.path.join(root, value))
    if os.path.commonpath([root, path]) != root:
        raise Rejected("unsafe_path", f"{value!r} resolves outside --media-root {root}")
    try:
        with open(path, "rb") as f:
            return f.read()
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
        raise Rejected("missing_media", f"media file {value!r} does not exist") from None
    except OSError as e:
        raise Rejected("missing_media", f"media file {value!r} cannot be read: {e}") from None


def _jsonable(value: Any) -> Any:
    """Metadata as JSON: bytes are left out, NaN is null, other types become strings."""
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()
                if not isinstance(v, (bytes, bytearray))}
    if isinstance(value, (list, tuple)):
        return [None if isinstance(v, (bytes, bytearray)) else _jsonable(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    return str(value)


# ----------------------------------------------------------------------------------------- tars

def _from_tar_sample(fields: dict[str, Any]) -> tuple[str, list, str, dict]:
    """An existing WebDataset sample (img2dataset pair, audio pair, text, or mmtrain layout)."""
    key, members = fields["__key__"], fields["__members__"]
    check_key(key)
    for suffix in members:
        try:
            check_name(suffix, "member")
        except SampleError as e:
            raise Rejected("unsafe_name", str(e)) from None
    try:
        doc = parse_sample(key, members)
    except SampleError as e:
        raise Rejected("invalid_sample", str(e)) from None
    meta: dict[str, Any] = {}
    if "json" in members:
        try:
            meta = json.loads(members["json"])
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise Rejected("bad_row", f"{key}.json is not valid JSON: {e}") from None
        if not isinstance(meta, dict):
            raise Rejected("bad_row", f"{key}.json is not a JSON object")
        if "segments" in meta:  # already mmtrain's layout: keep its metadata
            meta = meta.get("meta", {})
    parts = [(s.type, s.text if s.type == "text" else s.data) for s in doc.segments]
    return key, parts, doc.source if doc.source != "pairs" else "wds", _jsonable(meta)
