"""Crash-safe WebDataset shard writing, with `manifest.parquet` and `dataset.json`.

Every shard is written under a temporary name, fsynced, then renamed: a killed build never leaves
a final-named partial shard (webdataset's own ShardWriter writes straight to the final name).
Tar members carry fixed metadata (mtime 0, uid 0, mode 0644) so the same samples always give the
same bytes and the same sha256.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
import re
import tarfile
from pathlib import Path
from typing import Any, Iterable, Iterator

import pyarrow as pa
import pyarrow.parquet as pq
from webdataset import tariterators

# The index reader lives with the loader (mmtrain/data/index.py); this module writes the format.
from mmtrain import storage
from mmtrain.data.index import DATASET_JSON, DATASET_SCHEMA_VERSION, MANIFEST  # noqa: F401
from mmtrain.data.index import read_dataset_index  # noqa: F401 (for data_tools modules)
from mmtrain.data.schema import Document, check_name, parse_sample
from mmtrain.fileio import atomic_write_bytes, fsync_dir, sha256_file  # noqa: F401 (sha256_file: part of this module's API)

# Rough token estimates for the manifest (exact counts depend on the model's media geometry).
EST_TOKENS_PER_IMAGE = 18
EST_TOKENS_PER_AUDIO = 27

MANIFEST_SCHEMA = pa.schema([
    ("shard", pa.string()),
    ("key", pa.string()),
    ("bytes", pa.int64()),
    ("modalities", pa.list_(pa.string())),
    ("n_images", pa.int32()),
    ("n_audio", pa.int32()),
    ("text_chars", pa.int64()),
    ("est_tokens_text", pa.int64()),
    ("est_tokens_image", pa.int64()),
    ("est_tokens_audio", pa.int64()),
    ("content_hash", pa.string()),
    ("source_row", pa.string()),
    ("offset", pa.int64()),  # byte offset of the sample's first tar header (null: older builds)
])


def content_hash(members: dict[str, bytes]) -> str:
    """Hash of a sample's content, for exact dedup: its ordered segments (texts and media bytes).

    Independent of the key, the member names and the KEY.json metadata, so the same caption and
    image found in two sources under other keys (and other metadata) hash the same.
    """
    return document_hash(parse_sample("k", members))


def document_hash(doc: Document) -> str:
    h = hashlib.sha256()
    for seg in doc.segments:
        data = seg.text.encode("utf-8") if seg.type == "text" else seg.data
        h.update(seg.type.encode() + b"\0" + len(data).to_bytes(8, "little"))
        h.update(data)
    return h.hexdigest()


def manifest_row(doc: Document, *, shard: str, nbytes: int, chash: str,
                 source_row: str) -> dict[str, Any]:
    n_images = sum(s.type == "image" for s in doc.segments)
    n_audio = sum(s.type == "audio" for s in doc.segments)
    text = "".join(s.text for s in doc.segments if s.type == "text")
    return {
        "shard": shard, "key": doc.key, "bytes": nbytes, "modalities": doc.modalities,
        "n_images": n_images, "n_audio": n_audio, "text_chars": len(text),
        "est_tokens_text": len(text.encode("utf-8")),
        "est_tokens_image": n_images * EST_TOKENS_PER_IMAGE,
        "est_tokens_audio": n_audio * EST_TOKENS_PER_AUDIO,
        "content_hash": chash, "source_row": source_row,
    }


@dataclasses.dataclass
class ShardInfo:
    name: str
    sha256: str
    samples: int
    bytes: int


def write_shard(path: Path, samples: Iterable[tuple[str, dict[str, bytes], str]]
                ) -> tuple[ShardInfo, list[dict[str, Any]]]:
    """Write one tar shard atomically. `samples` yields (key, {suffix: bytes}, source_row).

    Returns the shard's info and its manifest rows. Each sample is validated with the same parser
    the loader uses, so a shard never holds a sample the loader cannot read.
    """
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    rows: list[dict[str, Any]] = []
    h = hashlib.sha256()
    try:
        with open(tmp, "wb") as raw:
            out = _HashingWriter(raw, h)
            for key, members, source_row in samples:
                doc = parse_sample(key, members)
                nbytes, offset = 0, out.written  # a resume in this shard seeks here
                for suffix in sorted(members, key=_member_order):
                    check_name(suffix, "member")
                    data = members[suffix]
                    out.write(_ustar_header(f"{key}.{suffix}", len(data)))
                    out.write(data)
                    out.write(bytes(-len(data) % tarfile.BLOCKSIZE))
                    nbytes += len(data)
                rows.append(manifest_row(doc, shard=path.name, nbytes=nbytes,
                                         chash=document_hash(doc), source_row=source_row))
                rows[-1]["offset"] = offset
            # end of archive: two zero blocks, then zeros to a whole record (as tarfile does)
            out.write(bytes(tar_file_bytes(out.written) - out.written))
            raw.flush()
            os.fsync(raw.fileno())
        os.replace(tmp, path)
        fsync_dir(path.parent)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return ShardInfo(path.name, h.hexdigest(), len(rows), path.stat().st_size), rows


def tar_member_bytes(key: str, members: dict[str, bytes]) -> int:
    """Bytes a sample takes in a tar: a 512-byte header per member plus its data padded to 512."""
    return sum(512 + -(-len(data) // 512) * 512 for data in members.values())


def tar_file_bytes(member_bytes: int) -> int:
    """Size of a `w|` tar holding `member_bytes` of members: end blocks, padded to a record."""
    return -(-(member_bytes + 2 * 512) // tarfile.RECORDSIZE) * tarfile.RECORDSIZE


def split_member_name(name: str) -> tuple[str, str]:
    """WebDataset grouping (`webdataset.tariterators.base_plus_ext`): the key is everything before
    the first '.' of the base name, folders included; the suffix is the rest, lower-cased.

    A leading "./" (tars made with `tar -cf x.tar .`) is dropped. ("", "") for a name without a
    suffix (webdataset skips those).
    """
    key, suffix = tariterators.base_plus_ext(_strip_dot_slash(name))
    return (key, suffix.lower()) if key is not None else ("", "")


def _strip_dot_slash(name: str) -> str:
    return re.sub(r"^(\./)+", "", name)


def iter_tar_groups(fileobj: Any, url: str = "") -> Iterator[tuple[str, dict[str, bytes]]]:
    """Samples of a tar stream as (key, {suffix: bytes}), read exactly as the loader reads them:
    webdataset's `tar_file_iterator` and `group_by_keys` (regular files only, nothing extracted to
    disk, suffixes lower-cased, a repeated suffix in one sample is a ValueError).

    Tar errors (truncated, corrupt) propagate to the caller. Unlike plain `tarfile`, an
    uncompressed tar that stops without its end-of-archive blocks is an error too (tarfile reads
    a tar cut at a member boundary as a valid, shorter one).
    """
    reader = _EndCheckingReader(fileobj, url)
    last = [""]  # name of the member being read: tar_file_iterator calls select_files first
    errors: list[BaseException] = []

    def select(name: str) -> bool:
        last[0] = name
        return True

    def stop(e: BaseException) -> bool:  # tar_file_iterator's handler: stop, keep the error
        errors.append(e)
        return False

    files = ({**f, "__url__": url} for f in tariterators.tar_file_iterator(
        reader, handler=stop, select_files=select, rename_files=_strip_dot_slash))
    for sample in tariterators.group_by_keys(files):
        if errors and sample["__key__"] == split_member_name(last[0])[0]:
            break  # the sample whose member failed to read: incomplete, never yielded
        yield sample["__key__"], {k: v for k, v in sample.items() if not k.startswith("__")}
    if errors:
        raise errors[0]
    reader.check_end()


class _EndCheckingReader(io.RawIOBase):
    """Passes reads through and checks, at the end, that an uncompressed tar ends with its two
    zero end-of-archive blocks. (A tar cut right after a member whose data ends in >= 1 KiB of
    zeros still passes; dataset.json's sample counts catch that for built shards.)"""

    def __init__(self, raw: Any, url: str) -> None:
        self.raw, self.url = raw, url
        self.head: bytes | None = None
        self.prev = self.last = b""  # the last two reads, kept by reference (no copy per read)

    def __repr__(self) -> str:  # in webdataset's error messages: no object address
        return self.url or "tar stream"

    def readable(self) -> bool:
        return True

    def read(self, n: int = -1) -> bytes:
        data = self.raw.read(n)
        if self.head is None:
            self.head = data[:6]
        if data:
            self.prev, self.last = self.last, data
        return data

    def readinto(self, b: Any) -> int:
        data = self.read(len(b))
        b[:len(data)] = data
        return len(data)

    def check_end(self) -> None:
        while self.read(1 << 20):  # tarfile stops at the first end block: read the rest
            pass
        compressed = (self.head or b"").startswith((b"\x1f\x8b", b"BZh", b"\xfd7zXZ"))
        tail = (self.prev + self.last)[-2 * tarfile.BLOCKSIZE:]
        if self.head and not compressed and tail != bytes(2 * tarfile.BLOCKSIZE):
            raise tarfile.ReadError("tar ends without its end-of-archive blocks: truncated")


def iter_shard(path: str | Path) -> Iterator[tuple[str, dict[str, bytes]]]:
    with storage.open_read(path) as f:  # a local file or a URL
        yield from iter_tar_groups(f, str(path))


def _ustar_header(name: str, size: int) -> bytes:
    """A member's 512-byte header: fixed metadata (mtime 0, uid 0, mode 0644), so the same
    samples always give the same bytes. The members' data is written straight after it; going
    through tarfile.addfile copies every member twice more (a third of the write time)."""
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = size, 0, 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    return info.tobuf(tarfile.USTAR_FORMAT, "utf-8", "surrogateescape")


def _member_order(suffix: str) -> tuple[int, str]:
    return (0 if suffix == "json" else 1, suffix)  # KEY.json first: readers see the layout first


class _HashingWriter(io.RawIOBase):
    """A write-only file object that hashes what passes through (one pass over the bytes)."""

    def __init__(self, raw: Any, h: Any) -> None:
        self.raw, self.h, self.written = raw, h, 0

    def writable(self) -> bool:
        return True

    def write(self, b: Any) -> int:
        self.h.update(b)
        self.written += len(b)
        return self.raw.write(b)


def write_dataset_index(out_dir: Path, shards: list[ShardInfo], rows: list[dict[str, Any]],
                        **extra: Any) -> dict[str, Any]:
    """Write manifest.parquet and dataset.json (atomically) for the shards in `out_dir`."""
    shards = sorted(shards, key=lambda s: s.name)
    table = pa.Table.from_pylist(sorted(rows, key=lambda r: (r["shard"], r["key"])),
                                 schema=MANIFEST_SCHEMA)
    buf = pa.BufferOutputStream()
    pq.write_table(table, buf)
    atomic_write_bytes(out_dir / MANIFEST, buf.getvalue().to_pybytes())
    fingerprint = hashlib.sha256(
        "".join(f"{s.name}:{s.sha256}\n" for s in shards).encode()).hexdigest()
    index = {
        "schema_version": DATASET_SCHEMA_VERSION,
        "fingerprint": fingerprint,
        "shards": [dataclasses.asdict(s) for s in shards],
        "totals": {"shards": len(shards), "samples": sum(s.samples for s in shards),
                   "bytes": sum(s.bytes for s in shards)},
        **extra,
    }
    atomic_write_bytes(out_dir / DATASET_JSON, (json.dumps(index, indent=2) + "\n").encode())
    return index
