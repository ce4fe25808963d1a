"""`mmtrain data stats`: what is in a dataset, per modality, from its manifest.

Counts, estimated tokens and size distributions come from manifest.parquet alone (fast, no shard
is read). `--scan` also reads the shards' media headers for image resolutions, audio durations
and the bytes each modality takes.
"""

from __future__ import annotations

import collections
import io
from pathlib import Path
from typing import Any

import numpy as np
import soundfile
from PIL import Image

from data_tools.dataset import iter_samples, read_manifest
from data_tools.shards import read_dataset_index
from mmtrain.data.schema import SampleError, parse_sample

MODALITIES = ("text", "image", "audio")


def compute_stats(directory: str | Path, *, scan: bool = False) -> dict[str, Any]:
    directory = str(directory)  # a folder or a URL
    index = read_dataset_index(directory)
    m = read_manifest(directory)
    n = len(m["key"])
    has = {mod: np.array([mod in mods for mods in m["modalities"]], dtype=bool)
           for mod in MODALITIES}
    tokens = {mod: np.array(m[f"est_tokens_{mod}"], dtype=np.int64) for mod in MODALITIES}
    items = {"text": np.array(m["text_chars"]), "image": np.array(m["n_images"]),
             "audio": np.array(m["n_audio"])}
    stats: dict[str, Any] = {
        "directory": str(directory), "fingerprint": index["fingerprint"],
        "shards": index["totals"]["shards"], "samples": n, "bytes": index["totals"]["bytes"],
        "rejected_at_build": index.get("rejected"),
        "modalities": {mod: {
            "samples": int(has[mod].sum()),
            "items": int(items[mod].sum()),  # text: characters; media: clips / images
            "est_tokens": int(tokens[mod].sum()),
            "est_tokens_per_sample": _dist(tokens[mod][has[mod]]),
        } for mod in MODALITIES},
        "mix": dict(collections.Counter("+".join(mods) for mods in m["modalities"]).most_common()),
        "bytes_per_sample": _dist(np.array(m["bytes"])),
        "text_chars_per_sample": _dist(items["text"]),
        "images_per_sample": _dist(items["image"]),
        "audio_per_sample": _dist(items["audio"]),
    }
    if scan:
        stats["media"] = _scan_media(directory)
    return stats


def _dist(values: np.ndarray) -> dict[str, float]:
    if len(values) == 0:
        return {}
    p50, p90, p99 = np.percentile(values, [50, 90, 99])
    return {"mean": round(float(values.mean()), 1), "p50": float(p50), "p90": float(p90),
            "p99": float(p99), "max": float(values.max())}


def _scan_media(directory: Path) -> dict[str, Any]:
    sides: list[int] = []
    durations: list[float] = []
    formats, rates, channels, media_bytes = (collections.Counter() for _ in range(4))
    for _, key, members in iter_samples(directory):
        try:
            doc = parse_sample(key, members)
        except SampleError:
            continue  # `verify` reports these
        for seg in doc.segments:
            if seg.type == "text":
                media_bytes["text"] += len(seg.text.encode("utf-8"))
                continue
            media_bytes[seg.type] += len(seg.data)
            try:
                if seg.type == "image":
                    img = Image.open(io.BytesIO(seg.data))  # header only
                    sides.append(max(img.size))
                    formats[img.format] += 1
                else:
                    info = soundfile.info(io.BytesIO(seg.data))
                    durations.append(info.duration)
                    rates[info.samplerate] += 1
                    channels[info.channels] += 1
            except Exception:  # undecodable headers: `verify` reports them
                continue
    return {"bytes": dict(media_bytes), "image_max_side": _dist(np.array(sides)),
            "image_formats": dict(formats), "audio_seconds": _dist(np.array(durations)),
            "audio_sample_rates": dict(rates), "audio_channels": dict(channels)}


def format_stats(s: dict[str, Any]) -> str:
    lines = [f"{s['directory']}: {s['shards']} shards, {s['samples']} samples, "
             f"{s['bytes'] / 1e6:.1f} MB, fingerprint {s['fingerprint'][:12]}"
             + (f", {s['rejected_at_build']} rows rejected at build"
                if s.get("rejected_at_build") is not None else ""),
             "",
             f"{'modality':<9}{'samples':>9}{'items':>11}{'est.tokens':>13}   "
             "tokens/sample  mean / p50 / p90 / p99 / max"]
    for mod, row in s["modalities"].items():
        d = row["est_tokens_per_sample"]
        dist = " / ".join(f"{d[k]:g}" for k in ("mean", "p50", "p90", "p99", "max")) if d else "-"
        unit = "chars" if mod == "text" else ""
        lines.append(f"{mod:<9}{row['samples']:>9}{row['items']:>11}{row['est_tokens']:>13}   "
                     f"{dist}" + (f"   (items = {unit})" if unit else ""))
    lines += ["", "per sample           mean / p50 / p90 / p99 / max"]
    for name in ("bytes_per_sample", "text_chars_per_sample", "images_per_sample",
                 "audio_per_sample"):
        d = s[name]
        if d:
            lines.append(f"{name:<23}" + " / ".join(f"{d[k]:g}" for k in
                                                    ("mean", "p50", "p90", "p99", "max")))
    lines += ["", "mix: " + ", ".join(f"{k} {v}" for k, v in s["mix"].items())]
    if "media" in s:
        media = s["media"]
        lines.append("bytes by modality: " + ", ".join(f"{k} {v / 1e6:.2f} MB"
                                                       for k, v in media["bytes"].items()))
        for name in ("image_max_side", "audio_seconds"):
            d = media[name]
            if d:
                lines.append(f"{name:<23}" + " / ".join(f"{d[k]:g}" for k in
                                                        ("mean", "p50", "p90", "p99", "max")))
        for name in ("image_formats", "audio_sample_rates", "audio_channels"):
            if media[name]:
                lines.append(f"{name}: " + ", ".join(f"{k} {v}" for k, v in media[name].items()))
    return "\n".join(lines)
