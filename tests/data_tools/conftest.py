"""Fixture makers for the shard-tool tests: tiny images, audio, tables and tars in tmp_path."""

from __future__ import annotations

import io
import json
import struct
import tarfile
import types
import zlib
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import soundfile
from PIL import Image

from data_tools.cli import main


def image_bytes(seed: int = 0, size: tuple[int, int] = (24, 16), fmt: str = "PNG") -> bytes:
    """A small image whose pixels depend on `seed` (distinct seeds: distinct images)."""
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)
    img = Image.fromarray(base).resize(size, Image.Resampling.NEAREST)
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


def audio_bytes(seed: int = 0, seconds: float = 0.25, rate: int = 16000, channels: int = 1,
                fmt: str = "WAV") -> bytes:
    rng = np.random.default_rng(seed)
    wave = (0.1 * rng.standard_normal((int(seconds * rate), channels))).astype(np.float32)
    buf = io.BytesIO()
    soundfile.write(buf, wave, rate, format=fmt, subtype="PCM_16")
    return buf.getvalue()


def bomb_png(width: int = 100_000, height: int = 100_000) -> bytes:
    """A tiny PNG whose header declares a huge image (a decompression bomb)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = struct.pack(">I", zlib.crc32(kind + data))
        return struct.pack(">I", len(data)) + kind + data + crc

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8-bit RGB
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header)
            + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b""))


def write_parquet(path: Path, rows: list[dict]) -> Path:
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def write_csv(path: Path, rows: list[dict], delimiter: str = ",") -> Path:
    import csv

    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]), delimiter=delimiter)
        w.writeheader()
        w.writerows(rows)
    return path


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def write_tar(path: Path, members: list[tuple[str, bytes]]) -> Path:
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def image_table(tmp: Path, n: int, *, prefix: str = "img") -> list[dict]:
    """n image files on disk and their rows (path relative to tmp, caption, an extra column)."""
    (tmp / "media").mkdir(exist_ok=True)
    rows = []
    for i in range(n):
        name = f"media/{prefix}{i}.png"
        (tmp / name).write_bytes(image_bytes(i))
        rows.append({"image": name, "caption": f"picture number {i}", "score": i / 10})
    return rows


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def run(capsys: pytest.CaptureFixture, *argv: str | Path) -> tuple[int, str, str]:
    """`mmtrain data ARGV` in this process; (exit code, stdout, stderr)."""
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


@pytest.fixture
def fx() -> types.SimpleNamespace:
    return types.SimpleNamespace(
        image_bytes=image_bytes, audio_bytes=audio_bytes, bomb_png=bomb_png,
        write_parquet=write_parquet, write_csv=write_csv, write_jsonl=write_jsonl,
        write_tar=write_tar, image_table=image_table, read_jsonl=read_jsonl, run=run)
