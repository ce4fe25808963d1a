"""The sample layout inside a shard (ARCHITECTURE.md, contract 1).

Members are grouped as webdataset groups them: the key is the member name up to the first `.`
of its base name (a folder is part of the key: `dir/KEY.jpg` has the key `dir/KEY`), and the
suffix is the rest, lower-cased. Two layouts:

* The WebDataset pair convention that open_clip and the LAION tools read, for a pair or plain text:
  `KEY.jpg|jpeg|png|webp|gif` + `KEY.txt` [+ `KEY.json`, metadata] is [image, text];
  `KEY.wav|flac|mp3|ogg|opus` + `KEY.txt` [+ `KEY.json`] is [audio, text]; `KEY.txt` alone is text.
* Anything else (interleaved documents, text before the media, several media) is described by a
  `KEY.json` holding an ordered segment list, each media segment naming a member of the same key:

    {"schema": 1, "source": "synth", "segments": [
        {"type": "text", "text": "Look:"},
        {"type": "image", "member": "0.png"},        # the member KEY.0.png
        {"type": "text", "text": "a red circle."},
        {"type": "audio", "member": "1.wav"}]}

`encode_sample` writes the first layout wherever it fits and the second otherwise.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

SCHEMA_VERSION = 1
IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "gif")
AUDIO_EXTS = ("wav", "flac", "mp3", "ogg", "opus")
SEGMENT_TYPES = ("text", "image", "audio")
CODES_SUFFIX = ".codes.npy"  # media member M's codes, written by `mmtrain data tokenize-media`


class SampleError(ValueError):
    """A sample that cannot be used; the message says why (goes to quarantine/rejected logs)."""


@dataclasses.dataclass
class Segment:
    type: str  # text | image | audio
    text: str = ""  # for text
    data: bytes = b""  # encoded media bytes, for image / audio
    member: str = ""  # the member suffix the media came from, e.g. "0.png" (or the extension)
    codes: bytes = b""  # the stored codes member M.codes.npy of that media member, if any


@dataclasses.dataclass
class Document:
    key: str
    segments: list[Segment]
    source: str = ""

    @property
    def modalities(self) -> list[str]:
        return sorted({s.type for s in self.segments})


def check_name(name: str, what: str = "key") -> None:
    """Keys and member names stay inside the directory a tar is extracted to.

    A key may hold folders (`dir/KEY`, as webdataset reads it), but no absolute path, no empty,
    `.`-leading or `..` part, no backslash or NUL.
    """
    parts = name.split("/")
    if not name or "\\" in name or "\x00" in name or \
            any(not p or p.startswith(".") for p in parts):
        raise SampleError(f"unsafe {what} {name!r} (no absolute path, '..', empty or "
                          "'.'-leading part, backslash or NUL allowed)")


def media_kind(suffix: str) -> str:
    """'image', 'audio' or '' for a member suffix ("jpg", "0.png", "JPG")."""
    ext = suffix.rsplit(".", 1)[-1].lower()
    return "image" if ext in IMAGE_EXTS else "audio" if ext in AUDIO_EXTS else ""


def _text(data: bytes, what: str) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise SampleError(f"{what} is not UTF-8 ({e.reason} at byte {e.start})") from None


def parse_sample(key: str, members: dict[str, bytes]) -> Document:
    """A sample's members (suffix → bytes, e.g. {"json": ..., "0.png": ...}) → a Document."""
    check_name(key)
    lowered = {suffix.lower(): data for suffix, data in members.items()}
    if len(lowered) != len(members):
        raise SampleError(f"sample {key}: members {sorted(members)} differ only in case")
    members = lowered
    if "json" in members and _is_segment_json(members["json"]):
        return _parse_segments(key, members)
    media = [(ext, media_kind(ext)) for ext in sorted(members) if media_kind(ext)]
    if len(media) > 1 or (media and "." in media[0][0]):
        raise SampleError(f"sample {key}: media members {[m for m, _ in media]} without a "
                          "KEY.json segment list saying their order")
    segments = []
    if media:
        ext, kind = media[0]
        segments.append(Segment(type=kind, data=members[ext], member=ext,
                                codes=members.get(ext + CODES_SUFFIX, b"")))
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
    if not isinstance(meta["segments"], list):
        raise SampleError(f"sample {key}: KEY.json 'segments' is not a list")
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
        member = member.lower()  # suffixes are compared lower-cased, as webdataset groups them
        if member not in members:
            raise SampleError(f"sample {key}: segment {i} refers to missing member {key}.{member}")
        segments.append(Segment(type=seg["type"], data=members[member], member=member,
                                codes=members.get(member + CODES_SUFFIX, b"")))
    if not segments:
        raise SampleError(f"sample {key}: KEY.json has no segments")
    unused = sorted(m for m in members if media_kind(m)
                    and m not in {s.member for s in segments if s.type != "text"})
    if unused:
        raise SampleError(f"sample {key}: media members {unused} are not in KEY.json's segments")
    if "txt" in members:
        raise SampleError(f"sample {key}: a KEY.txt next to a KEY.json segment list (which text "
                          "is the sample's?)")
    return Document(key=key, segments=segments, source=str(meta.get("source", "")))


def segments_json(segments: list[dict[str, Any]], source: str, **extra: Any) -> bytes:
    """Serialise a segment-list KEY.json (the writer side of `_parse_segments`)."""
    meta = {"schema": SCHEMA_VERSION, "source": source, "segments": segments, **extra}
    return json.dumps(meta, sort_keys=True, ensure_ascii=False).encode("utf-8")


def encode_sample(segments: list[Segment], *, source: str,
                  meta: dict[str, Any] | None = None) -> dict[str, bytes]:
    """A sample's members (suffix → bytes): the writer side of `parse_sample`.

    Media segments carry their extension in `member` ("png"). [media, text] and [text] are
    written in the pair convention, KEY.json holding `meta` as it is (img2dataset's flat
    metadata); everything else as a segment list with members KEY.0.png, KEY.1.flac, ...
    """
    meta = meta or {}
    kinds = [s.type for s in segments]
    if kinds in (["image", "text"], ["audio", "text"], ["text"]) and "segments" not in meta \
            and segments[-1].text.strip():
        members = {"txt": segments[-1].text.encode("utf-8"),
                   "json": json.dumps(meta, sort_keys=True, ensure_ascii=False).encode("utf-8")}
        if len(segments) == 2:
            members[segments[0].member.lower()] = segments[0].data
        return members
    members, described = {}, []
    for seg in segments:
        if seg.type == "text":
            described.append({"type": "text", "text": seg.text})
            continue
        member = f"{len(members)}.{seg.member.lower()}"
        members[member] = seg.data
        described.append({"type": seg.type, "member": member})
    members["json"] = segments_json(described, source=source, **({"meta": meta} if meta else {}))
    return members
