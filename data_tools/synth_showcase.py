"""What the demo model draws and plays: generated pictures and sounds for demo captions, judged.

After `mmtrain train` (the embedded demo), the launcher calls `showcase(run_dir)`: the run's last
checkpoint generates one picture per caption of a fixed set of demo image captions and one clip
per audio caption (`mmtrain.generate.generate_media`, KV cache, classifier-free guidance), writes
them to RUN/samples/ with a contact sheet (`image_sheet.png`: each generated picture above the
corpus's own picture for that caption), and judges them (`synth_judge`: named colours in the named
places for pictures, beep count and pitch for sounds) against their own caption and, as the chance
baseline, against the caption of the next item.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import torch
from PIL import Image, ImageDraw

from data_tools.synth import make_audio, make_image
from data_tools.synth_judge import match_rate, mismatch_baseline
from mmtrain.data.tokenizer import build_tokenizer
from mmtrain.export import load_checkpoint_model
from mmtrain.fileio import atomic_write_bytes
from mmtrain.generate import (Sampling, generate_media, load_media_tokenizer, media_bytes,
                              recorded_media_fingerprints)

SHEET_SCALE = 3  # a 32x32 picture is drawn 96x96 on the contact sheet


def demo_captions(kind: str, count: int, seed: int = 1234) -> list[tuple[str, bytes]]:
    """`count` (caption, real media) pairs made the way the demo corpus makes them, from a seed
    the corpus does not use (so they are new draws, though captions repeat: there are few)."""
    make = make_image if kind == "image" else make_audio
    out = []
    for i in range(count):
        data, caption = make(random.Random(f"showcase/{seed}/{kind}/{i}"))
        out.append((caption, data))
    return out


def showcase(run_dir: str | Path, *, count: int = 48, cfg_scale: float = 2.0, seed: int = 0,
             temperature: float = 0.5, top_k: int = 0, caption_seed: int = 1234) -> dict[str, dict[str, float]]:
    """Generate, write and judge `count` pictures and sounds with the run's last checkpoint.

    The sampling defaults (temperature 0.5, guidance 2) were chosen on other caption seeds (7, 99)
    among 0–1 and 1–3: stronger guidance or colder sampling blended the colours of the pictures.
    Returns {kind: {"match": rate with the own caption, "chance": rate with the next caption}}
    for each kind the model generates. Files: RUN/samples/{image,audio}-NNN.{png,wav},
    RUN/samples/captions.json, RUN/samples/image_sheet.png and RUN/samples/judged.json.
    """
    model, cfg, ckpt = load_checkpoint_model(str(run_dir))
    tok = build_tokenizer(cfg.data.tokenizer)
    recorded = recorded_media_fingerprints(ckpt)
    out_dir = Path(run_dir) / "samples"
    out_dir.mkdir(parents=True, exist_ok=True)
    results: dict[str, dict[str, float]] = {}
    captions_by_kind: dict[str, list[str]] = {}
    sheet_rows: list[tuple[list[bytes], list[bytes]]] = []
    for kind in ("image", "audio"):
        directory = cfg.data.image_tokenizer if kind == "image" else cfg.data.audio_tokenizer
        if not directory or not (cfg.model.image_codes if kind == "image" else cfg.model.audio_codes):
            continue
        media_tok, _ = load_media_tokenizer(kind, directory, model_cfg=cfg.model,
                                            recorded=recorded, where=str(ckpt))
        pairs = demo_captions(kind, count, caption_seed)
        captions = [caption for caption, _ in pairs]
        with torch.no_grad():
            codes = generate_media(model, tok, media_tok, kind, captions, cfg_scale=cfg_scale,
                                   sampling=Sampling(temperature=temperature, top_k=top_k,
                                                     seed=seed))
        files = media_bytes(media_tok, codes)
        suffix = "png" if kind == "image" else "wav"
        for i, data in enumerate(files):
            atomic_write_bytes(out_dir / f"{kind}-{i + 1:03d}.{suffix}", data)
        results[kind] = {"match": match_rate(files, captions),
                         "chance": mismatch_baseline(files, captions)}
        captions_by_kind[kind] = captions
        if kind == "image":
            sheet_rows.append((files, [data for _, data in pairs]))
    atomic_write_bytes(out_dir / "captions.json",
                       (json.dumps(captions_by_kind, indent=1) + "\n").encode())
    atomic_write_bytes(out_dir / "judged.json", (json.dumps(
        {"checkpoint": str(ckpt), "cfg_scale": cfg_scale, "temperature": temperature,
         "seed": seed, "results": results}, indent=1) + "\n").encode())
    if sheet_rows:
        generated, real = sheet_rows[0]
        atomic_write_bytes(out_dir / "image_sheet.png",
                           contact_sheet(generated, real, captions_by_kind["image"]))
    return results


def contact_sheet(generated: list[bytes], real: list[bytes], captions: list[str],
                  per_row: int = 6) -> bytes:
    """A PNG: columns of (generated picture, the corpus's picture for the caption, caption)."""
    import io

    s = 32 * SHEET_SCALE
    cell_w, cell_h = s + 40, 2 * s + 44
    rows = (len(generated) + per_row - 1) // per_row
    sheet = Image.new("RGB", (per_row * cell_w, rows * cell_h), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    for i, (gen, ref, caption) in enumerate(zip(generated, real, captions)):
        x, y = (i % per_row) * cell_w + 20, (i // per_row) * cell_h + 4
        for j, data in enumerate((gen, ref)):
            with Image.open(io.BytesIO(data)) as img:
                sheet.paste(img.convert("RGB").resize((s, s), Image.Resampling.NEAREST),
                            (x, y + j * (s + 2)))
        words = caption.split()
        lines = [" ".join(words[:3]), " ".join(words[3:6]), " ".join(words[6:])]
        for k, line in enumerate(filter(None, lines)):
            draw.text((x - 16, y + 2 * s + 4 + 11 * k), line, fill=(0, 0, 0))
    buf = io.BytesIO()
    sheet.save(buf, format="PNG", optimize=True)
    return buf.getvalue()


def summary(results: dict[str, dict[str, float]], count: int) -> str:
    """The lines the demo prints."""
    what = {"image": ("pictures", "named colours in the named places"),
            "audio": ("sounds", "named number of beeps at the named pitch")}
    return "\n".join(
        f"generated {what[kind][0]} with {what[kind][1]}: {100 * r['match']:.0f}% of {count} "
        f"(judged against another caption, i.e. chance: {100 * r['chance']:.0f}%)"
        for kind, r in results.items())

