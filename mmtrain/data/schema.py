"""The sample layout inside a shard (ARCHITECTURE.md, contract 1).

Members are grouped by key (everything before the first `.` of the base name). A sample is
described by `KEY.json`:

    {"schema": 1, "source": "synth", "segments": [
        {"type": "text", "text": "Look:"},
        {"type": "image", "member": "0.png"},        # the member KEY.0.png
        {"type": "text", "text": "a red circle."},
        {"type": "audio", "member": "1.wav"}]}

Layouts users already have are read as they are: `KEY.jpg|png|webp` + `KEY.txt` is
[image, text] (img2dataset), `KEY.wav|flac` + `KEY.txt` is [audio, text], `KEY.txt` alone is text.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

SCHEMA_VERSION = 1
IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
AUDIO_EXTS = ("wav", "flac")
SEGMENT_TYPES = ("text", "image", "audio")


class SampleError(ValueError):
    """A sample that cannot be used; the message says why (goes to quarantine/rejected logs)."""


@dataclasses.dataclass
class Segment:
    type: str  # text | image | audio
    text: str = ""  # for text
    data: bytes = b""  # encoded media bytes, for image / audio
    member: str = ""  # the member suffix the media came from, e.g. "0.png"


@dataclasses.dataclass
class Document:
    key: str
    segments: list[Segment]
    source: str = ""

    @property
    def modalities(self) -> list[str]:
        return sorted({s.type for s in self.segments})


def check_name(name: str, what: str = "key") -> None:
    """Keys and member names must not escape a directory or hide path parts."""
    if not name or "/" in name or "\\" in name or name.startswith(".") or ".." in name \
            or "\x00" in name:
        raise SampleError(f"unsafe {what} {name!r} (no '/', '..', leading '.', NUL allowed)")


def _text(data: bytes, what: str) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise SampleError(f"{what} is not UTF-8 ({e.reason} at byte {e.start})") from None


def parse_sample(key: str, members: dict[str, bytes]) -> Document:
    """Turn a sample's members (suffix → bytes, e.g. {"json": ..., "0.png": ...}) into a Document."""
    check_name(key)
    if "json" in members and _is_segment_json(members["json"]):
        return _parse_segments(key, members)
    media = [(ext, kind) for kind, exts in (("image", IMAGE_EXTS), ("audio", AUDIO_EXTS))
             for ext in exts if ext in members]
    if len(media) > 1:
        raise SampleError(f"sample {key}: several media members {[m for m, _ in media]} "
                          "without a KEY.json saying their order")
    segments = []
    if media:
        ext, kind = media[0]
        segments.append(Segment(type=kind, data=members[ext], member=ext))
    if "txt" in members:
        text = _text(members["txt"], f"sample {key}: member txt")
        if text.strip():
            segments.append(Segment(type="text", text=text))
    if not segments:
        raise SampleError(f"sample {key}: no usable members (has {sorted(members)})")
    return Document(key=key, segments=segments, source="pairs")


def _is_segment_json(data: bytes) -> bool:
    try:
        meta = json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError):
        return False
    return isinstance(meta, dict) and "segments" in meta


def _parse_segments(key: str, members: dict[str, bytes]) -> Document:
    meta: dict[str, Any] = json.loads(members["json"])
    version = meta.get("schema")
    if version != SCHEMA_VERSION:
        raise SampleError(f"sample {key}: KEY.json schema {version!r} is not {SCHEMA_VERSION}")
    segments = []
    for i, seg in enumerate(meta["segments"]):
        if not isinstance(seg, dict) or seg.get("type") not in SEGMENT_TYPES:
            raise SampleError(f"sample {key}: segment {i} has no valid type ({SEGMENT_TYPES})")
        if seg["type"] == "text":
            if not isinstance(seg.get("text"), str):
                raise SampleError(f"sample {key}: text segment {i} has no 'text' string")
            segments.append(Segment(type="text", text=seg["text"]))
            continue
        member = seg.get("member")
        if not isinstance(member, str):
            raise SampleError(f"sample {key}: {seg['type']} segment {i} has no 'member'")
        check_name(member, "member")
        if member not in members:
            raise SampleError(f"sample {key}: segment {i} refers to missing member {key}.{member}")
        segments.append(Segment(type=seg["type"], data=members[member], member=member))
    if not segments:
        raise SampleError(f"sample {key}: KEY.json has no segments")
    return Document(key=key, segments=segments, source=str(meta.get("source", "")))


def segments_json(segments: list[dict[str, Any]], source: str, **extra: Any) -> bytes:
    """Serialise a KEY.json (the writer side of `parse_sample`)."""
    meta = {"schema": SCHEMA_VERSION, "source": source, "segments": segments, **extra}
    return json.dumps(meta, sort_keys=True, ensure_ascii=False).encode("utf-8")
