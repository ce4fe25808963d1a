"""`mmtrain data inspect`: print samples of a dataset, optionally as a contact sheet of images."""

from __future__ import annotations

import io
import json
import math
from pathlib import Path
from typing import Any, Iterator, TextIO

import soundfile
from PIL import Image, ImageDraw

from data_tools.dataset import iter_samples, read_manifest, source_rows
from data_tools.shards import MANIFEST, iter_shard
from mmtrain import storage
from mmtrain.data.schema import SampleError, parse_sample

CELL = 128  # contact sheet thumbnail size
TEXT_PREVIEW = 200


def inspect(directory: str | Path, *, n: int = 5, key: str = "", contact_sheet: str = "",
            out: TextIO) -> int:
    """Print `n` samples (or the sample `key`); returns how many were shown."""
    directory = str(directory)  # a folder or a URL
    sources = source_rows(directory)
    thumbs: list[tuple[str, Image.Image]] = []
    shown = 0
    for shard, k, members in _select(directory, n, key):
        out.write(describe_sample(k, members, shard=shard, source_row=sources.get((shard, k), "")))
        out.write("\n")
        shown += 1
        if contact_sheet:
            thumbs.extend(_thumbnails(k, members))
    if key and not shown:
        raise ValueError(f"key {key!r} is not in {directory}/{MANIFEST}")
    if contact_sheet:
        write_contact_sheet(thumbs, contact_sheet)
        out.write(f"contact sheet of {len(thumbs)} images: {contact_sheet}\n")
    return shown


def _select(directory: Path, n: int, key: str) -> Iterator[tuple[str, str, dict[str, bytes]]]:
    if not key:
        for i, sample in enumerate(iter_samples(directory)):
            if i >= n:
                return
            yield sample
        return
    table = read_manifest(directory, ["shard", "key"])
    shards = [s for s, k in zip(table["shard"], table["key"]) if k == key]
    for shard in shards[:1]:
        for k, members in iter_shard(storage.join(directory, shard)):
            if k == key:
                yield shard, k, members
                return


def describe_sample(key: str, members: dict[str, bytes], *, shard: str = "",
                    source_row: str = "") -> str:
    lines = [f"── {key}  ({shard}" + (f", source {source_row}" if source_row else "") + ")"]
    try:
        doc = parse_sample(key, members)
    except SampleError as e:
        return "\n".join(lines + [f"   unreadable: {e}"]) + "\n"
    meta = _meta(members)
    if meta:
        lines.append(f"   meta {json.dumps(meta, ensure_ascii=False)[:TEXT_PREVIEW]}")
    for i, seg in enumerate(doc.segments):
        if seg.type == "text":
            text = seg.text if len(seg.text) <= TEXT_PREVIEW else seg.text[:TEXT_PREVIEW] + "…"
            lines.append(f"   [{i}] text   {json.dumps(text, ensure_ascii=False)} "
                         f"({len(seg.text)} chars)")
        else:
            lines.append(f"   [{i}] {seg.type:<6} {seg.member}  {_media_info(seg.type, seg.data)}"
                         f"  {len(seg.data) / 1024:.1f} KB")
    return "\n".join(lines) + "\n"


def _meta(members: dict[str, bytes]) -> Any:
    """A segment list's "meta", or a pair's whole KEY.json (img2dataset's metadata)."""
    try:
        meta = json.loads(members["json"]) if "json" in members else None
    except ValueError:
        return None
    return meta.get("meta") if isinstance(meta, dict) and "segments" in meta else meta


def _media_info(kind: str, data: bytes) -> str:
    try:
        if kind == "image":
            img = Image.open(io.BytesIO(data))
            return f"{img.size[0]}x{img.size[1]} {img.format}"
        info = soundfile.info(io.BytesIO(data))
        return f"{info.duration:.2f} s {info.samplerate} Hz {info.channels} ch {info.format}"
    except Exception as e:  # corrupt media: show it, `verify` reports it
        return f"undecodable ({type(e).__name__})"


def _thumbnails(key: str, members: dict[str, bytes]) -> list[tuple[str, Image.Image]]:
    try:
        doc = parse_sample(key, members)
    except SampleError:
        return []
    thumbs = []
    for seg in doc.segments:
        if seg.type == "image":
            try:
                img = Image.open(io.BytesIO(seg.data)).convert("RGB")
            except Exception:  # undecodable: left out of the sheet
                continue
            img.thumbnail((CELL, CELL))
            thumbs.append((f"{key}.{seg.member}", img))
    return thumbs


def write_contact_sheet(thumbs: list[tuple[str, Image.Image]], path: str | Path) -> None:
    cols = max(1, math.ceil(math.sqrt(len(thumbs))))
    rows = max(1, math.ceil(len(thumbs) / cols))
    label = 14
    sheet = Image.new("RGB", (cols * CELL, rows * (CELL + label)), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    for i, (name, img) in enumerate(thumbs):
        x, y = (i % cols) * CELL, (i // cols) * (CELL + label)
        sheet.paste(img, (x + (CELL - img.width) // 2, y + (CELL - img.height) // 2))
        draw.text((x + 2, y + CELL + 1), name[:20], fill=(0, 0, 0))
    sheet.save(path, format="PNG")
