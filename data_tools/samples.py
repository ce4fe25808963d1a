"""Turning one source row into one sample (runs in the build's worker processes).

Each source kind maps a row to an ordered list of parts — ("text", str), ("image", bytes),
("audio", bytes) — plus metadata; `assemble` then checks the text, checks and normalises the
media, and writes the sample with `encode_sample` (ARCHITECTURE.md, contract 1): a pair as
`KEY.jpg` + `KEY.txt` + `KEY.json` (metadata), an interleaved document as `KEY.json` (ordered
segments, source, meta) + `KEY.0.jpg`, `KEY.1.flac`, ... Anything wrong raises `Rejected`.

Kinds and their default columns (the first one present in a row is used; override with flags):
  image-text   image: image, image_path, path, filepath, file, jpg, url   text: caption, text, ...
  audio-text   audio: audio, audio_path, audio_filepath, path, file   text: text, transcript, ...
  interleaved  texts: texts   images: images (aligned lists, one of each pair null: OBELICS)
  mmc4         MMC4 JSONL: text_list + image_info (image_name / raw_url, matched_text_index)
  text         text: text, content
  wds          tars: KEY.jpg|png|webp|gif + KEY.txt [+ KEY.json] (img2dataset), audio pairs,
               text, or mmtrain's layout; --text-field takes the text from KEY.json
Media cells hold a path (relative to --media-root, by default the table's folder), raw bytes,
a {"bytes", "path"} struct (Hugging Face datasets), or a URL fetched by --download (download.py).
Other columns are kept in the sample's metadata.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import posixpath
from typing import Any

from data_tools.errors import Rejected
from data_tools.media import MediaOptions, prepare_audio, prepare_image
from data_tools.sources import RawRow
from mmtrain import storage
from mmtrain.data.schema import (SampleError, Segment, check_name, encode_sample, media_kind,
                                 parse_sample)

KINDS = ("image-text", "audio-text", "interleaved", "mmc4", "text", "wds")
MAX_KEY_BYTES = 80  # + ".12.webp" stays under the 100-byte ustar name limit
URL_SCHEMES = ("http://", "https://")

DEFAULT_COLUMNS = {
    "image-text": {"image": ("image", "image_path", "path", "filepath", "file", "jpg", "url",
                             "image_url"),
                   "text": ("caption", "text", "TEXT", "alt_text", "alt")},
    "audio-text": {"audio": ("audio", "audio_path", "audio_filepath", "path", "file", "filepath",
                             "url", "audio_url"),
                   "text": ("text", "transcript", "transcription", "sentence", "caption",
                            "normalized_text")},
    "interleaved": {"texts": ("texts",), "images": ("images",)},
    "mmc4": {},
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
    text_field: str = ""  # wds: dotted path of the text inside KEY.json ("caption.en")
    download: bool = False  # media URLs were fetched by download.py (else they are refused)

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"kind {self.kind!r} is not one of {', '.join(KINDS)}")
        unknown = set(self.columns) - set(DEFAULT_COLUMNS[self.kind])
        if unknown:
            raise ValueError(f"kind {self.kind} has no column role(s) {sorted(unknown)}; "
                             f"it uses {sorted(DEFAULT_COLUMNS[self.kind])}")
        if self.text_field and self.kind != "wds":
            raise ValueError("--text-field applies to `build wds` only (tables: --text-column)")
        if self.download and self.kind in ("text", "wds"):
            raise ValueError(f"--download has nothing to fetch for kind {self.kind}")


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
            key, parts, source, meta = _from_tar_sample(row.fields, spec.text_field)
        else:
            key = _table_key(row, spec.key_column)
            parts, used = _table_parts(row, spec)
            source = spec.kind
            meta = _jsonable({k: v for k, v in row.fields.items() if k not in used})
            meta.update(_fetched_urls(row.fields, used))
        members = assemble(key, parts, source=source, meta=meta, spec=spec)
    except Rejected as e:
        return Skipped(row.pos, row.source_row, e.code, str(e))
    return Built(row.pos, row.source_row, key, members)


def assemble(key: str, parts: list[tuple[str, Any]], *, source: str, meta: dict[str, Any],
             spec: SampleSpec) -> dict[str, bytes]:
    """Check the text, check and normalise the media; return the sample's members."""
    check_key(key)
    text = "".join(value for kind, value in parts if kind == "text")
    if not text.strip():
        raise Rejected("empty_text", "text is only whitespace" if text else "sample has no text")
    if len(text) > spec.media.max_text_chars:
        raise Rejected("text_too_long", f"{len(text)} text characters > --max-text-chars="
                       f"{spec.media.max_text_chars}")
    if len(text) < spec.min_text_chars:
        raise Rejected("filtered", f"{len(text)} text characters < --min-text-chars="
                       f"{spec.min_text_chars}")
    segments = []
    for kind, value in parts:
        if kind == "text":
            segments.append(Segment(type="text", text=value))
            continue
        prepare = prepare_image if kind == "image" else prepare_audio
        data, ext = prepare(value, spec.media)
        segments.append(Segment(type=kind, data=data, member=ext))
    members = encode_sample(segments, source=source, meta=meta)
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
    if "." in key.rsplit("/", 1)[-1]:
        raise Rejected("unsafe_name", f"key {key!r} has a '.' in its base name, which splits "
                       "WebDataset keys")
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
    if spec.kind == "mmc4":
        used |= {"text_list", "image_info"}
        return _mmc4_parts(row, spec), used
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


def _mmc4_parts(row: RawRow, spec: SampleSpec) -> list[tuple[str, Any]]:
    """MMC4: sentences `text_list`; each `image_info` entry goes before the sentence at its
    `matched_text_index` (several on one sentence keep their order), as OpenFlamingo reads MMC4.
    Images are `image_name` files under --media-root, or `raw_url` with --download."""
    texts, infos = _list(row.fields.get("text_list"), "text_list"), \
        _list(row.fields.get("image_info", []), "image_info")
    before: dict[int, list[Any]] = {}
    for i, info in enumerate(infos):
        where = info.get("matched_text_index") if isinstance(info, dict) else None
        if not isinstance(where, int) or not 0 <= where < len(texts):
            raise Rejected("bad_row", f"image_info[{i}] has no matched_text_index in "
                           f"0..{len(texts) - 1}")
        field = "raw_url" if spec.download else "image_name"
        if info.get(field) in (None, ""):
            raise Rejected("missing_media", f"image_info[{i}] has no {field!r}")
        before.setdefault(where, []).append(info[field])
    parts: list[tuple[str, Any]] = []
    for j, text in enumerate(texts):
        parts += [("image", load_media(v, row.media_root)) for v in before.get(j, [])]
        if sentence := _text(text, f"text_list[{j}]"):
            parts.append(("text", sentence if j == len(texts) - 1 else sentence + " "))
    return parts


def url_cells(fields: dict[str, Any], spec: SampleSpec) -> list[tuple[tuple, str]]:
    """Where the media URLs of a table row are, for --download: [(path into fields, URL)]."""
    def is_url(v: Any) -> bool:
        return isinstance(v, str) and v.startswith(URL_SCHEMES)

    if spec.kind == "mmc4":
        infos = fields.get("image_info")
        return [(("image_info", i, "raw_url"), info["raw_url"]) for i, info in
                enumerate(infos if isinstance(infos, list) else [])
                if isinstance(info, dict) and is_url(info.get("raw_url"))]
    row = RawRow(0, "", fields)
    try:
        if spec.kind == "interleaved":
            col = _column(row, spec, "images")
            fields[col] = images = _list(fields[col], col)  # CSV cells hold JSON arrays
            return [((col, i), v) for i, v in enumerate(images) if is_url(v)]
        col = _column(row, spec, "image" if spec.kind == "image-text" else "audio")
    except Rejected:
        return []  # make_sample reports the row
    return [((col,), fields[col])] if is_url(fields[col]) else []


def _fetched_urls(fields: dict[str, Any], used: set[str]) -> dict[str, str]:
    """Media columns that --download fetched keep their URL in the metadata (as img2dataset)."""
    return {col: fields[col]["path"] for col in used if isinstance(fields.get(col), dict)
            and str(fields[col].get("path", "")).startswith(URL_SCHEMES)}


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
                       "file (only http(s) URLs are fetched, with --download; pipe: is never "
                       "run)")
    if storage.is_url(media_root):  # a table in object storage: media beside it, by range read
        return _load_remote_media(value, media_root)
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


def _load_remote_media(value: str, media_root: str) -> bytes:
    relative = posixpath.normpath(value)
    if relative.startswith(("/", "../")) or relative == "..":
        raise Rejected("unsafe_path", f"{value!r} resolves outside --media-root {media_root}")
    url = storage.join(media_root, relative)
    try:
        return storage.with_retries(lambda: storage.read_bytes(url), what=url, retries=3,
                                    backoff=0.5)
    except FileNotFoundError:
        raise Rejected("missing_media", f"media file {url!r} does not exist") from None
    except storage.io_errors() as e:
        raise Rejected("missing_media", f"media file {url!r} cannot be read: {e}") from None


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

def _from_tar_sample(fields: dict[str, Any], text_field: str) -> tuple[str, list, str, dict]:
    """An existing WebDataset sample: a pair (img2dataset, audio), text, or mmtrain's layout.

    Every member is used or the sample is rejected: media members go into the sample, KEY.txt
    (or the --text-field of KEY.json) is its text, KEY.json its metadata.
    """
    key, members = fields["__key__"], fields["__members__"]
    check_key(key)
    for suffix in members:
        try:
            check_name(suffix, "member")
        except SampleError as e:
            raise Rejected("unsafe_name", str(e)) from None
    other = sorted(m for m in members if m.lower() not in ("json", "txt") and not media_kind(m))
    if other:
        raise Rejected("unsupported_format", f"members {[f'{key}.{m}' for m in other]} are not "
                       "an image (jpg/jpeg/png/webp/gif), audio (wav/flac/mp3/ogg/opus), txt or "
                       "json member")
    meta = _tar_json(key, members)
    if "segments" in meta:  # already mmtrain's layout: keep its metadata
        doc = _parse(key, members)
        parts = [(s.type, s.text if s.type == "text" else s.data) for s in doc.segments]
        return key, parts, doc.source or "wds", _jsonable(meta.get("meta", {}))
    media = sorted(m for m in members if media_kind(m))
    if len(media) > 1 or any("." in m for m in media):
        _parse(key, members)  # raises with the loader's own message
    text = _parse(key, {"txt": members["txt"]}).segments[0].text \
        if "txt" in members and members["txt"].strip() else ""
    if not text and text_field:
        text = _json_field(meta, text_field, key)
    elif not text:
        hint = [f for f in ("text", "caption") if isinstance(meta.get(f), (str, list))]
        if hint:
            raise Rejected("empty_text", f"{key} has no KEY.txt, but KEY.json has a {hint[0]!r} "
                           f"field: pass --text-field {hint[0]}")
    parts = [(media_kind(m), members[m]) for m in media] + ([("text", text)] if text else [])
    return key, parts, "wds", _jsonable(meta)


def _parse(key: str, members: dict[str, bytes]) -> Any:
    try:
        return parse_sample(key, members)
    except SampleError as e:
        raise Rejected("invalid_sample", str(e)) from None


def _tar_json(key: str, members: dict[str, bytes]) -> dict[str, Any]:
    if "json" not in members:
        return {}
    try:
        meta = json.loads(members["json"])
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise Rejected("bad_row", f"{key}.json is not valid JSON: {e}") from None
    if not isinstance(meta, dict):
        raise Rejected("bad_row", f"{key}.json is not a JSON object")
    return meta


def _json_field(meta: dict[str, Any], path: str, key: str) -> str:
    """The text at dotted `path` of KEY.json; a list of strings gives its first (LAION-Audio)."""
    value: Any = meta
    for part in path.split("."):
        if not isinstance(value, dict) or part not in value:
            raise Rejected("empty_text", f"{key}.json has no field {path!r} (--text-field)")
        value = value[part]
    if isinstance(value, list) and value and all(isinstance(v, str) for v in value):
        value = value[0]
    if not isinstance(value, str):
        raise Rejected("bad_row", f"{key}.json field {path!r} is {type(value).__name__}, not text")
    return value
