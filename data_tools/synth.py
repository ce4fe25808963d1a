"""The embedded demo corpus: procedurally generated, deterministic from a seed, no download.

Captions depend on the media, so a model can only predict them by looking and listening:
images of coloured shapes ("a red circle left of a blue square."), audio clips of beeps
("three high beeps."). Four kinds of documents: pure text, image–caption, audio–caption and
interleaved documents mixing text, several images and audio clips. Written through the same
shard writer as `mmtrain data build`.
"""

from __future__ import annotations

import io
import math
import random
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import soundfile
from PIL import Image, ImageDraw

from data_tools.shards import ShardInfo, write_dataset_index, write_shard
from mmtrain.data.schema import Segment, encode_sample

COLOURS = {"red": (220, 30, 30), "green": (30, 170, 40), "blue": (30, 60, 220),
           "yellow": (235, 215, 20), "purple": (140, 40, 170), "orange": (245, 140, 20)}
SHAPES = ("circle", "square", "triangle")
PITCHES = {"low": 220.0, "middle": 523.0, "high": 1320.0}
COUNT_WORDS = ("one", "two", "three", "four")
NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine",
                "ten", "eleven", "twelve")
IMAGE_SIZE = 32
SAMPLE_RATE = 16000
KIND_WEIGHTS = {"text": 0.15, "image": 0.35, "audio": 0.25, "interleaved": 0.25}


# --------------------------------------------------------------------------------- media makers

def draw_shape(draw: ImageDraw.ImageDraw, shape: str, colour: str, box: tuple[int, int, int, int]) -> None:
    x0, y0, x1, y1 = box
    fill = COLOURS[colour]
    if shape == "circle":
        draw.ellipse(box, fill=fill)
    elif shape == "square":
        draw.rectangle(box, fill=fill)
    else:
        draw.polygon([((x0 + x1) // 2, y0), (x1, y1), (x0, y1)], fill=fill)


def make_image(rng: random.Random) -> tuple[bytes, str]:
    """A PNG of one or two shapes and the caption that describes it."""
    img = Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), (245, 245, 245))
    draw = ImageDraw.Draw(img)
    c1, s1 = rng.choice(list(COLOURS)), rng.choice(SHAPES)
    if rng.random() < 0.5:
        j = rng.randint(-2, 2)
        draw_shape(draw, s1, c1, (5 + j, 5 + j, 26 + j, 26 + j))
        caption = f"a {c1} {s1}."
    else:
        c2 = rng.choice([c for c in COLOURS if c != c1])
        s2 = rng.choice(SHAPES)
        if rng.random() < 0.5:  # side by side
            draw_shape(draw, s1, c1, (1, 9, 14, 22))
            draw_shape(draw, s2, c2, (17, 9, 30, 22))
            relation = "left of"
        else:
            draw_shape(draw, s1, c1, (9, 1, 22, 14))
            draw_shape(draw, s2, c2, (9, 17, 22, 30))
            relation = "above"
        caption = f"a {c1} {s1} {relation} a {c2} {s2}."
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue(), caption


def make_audio(rng: random.Random) -> tuple[bytes, str]:
    """A WAV clip of 1–4 beeps at one pitch (1 s, 16 kHz) and its caption."""
    count = rng.randint(1, 4)
    pitch = rng.choice(list(PITCHES))
    t = np.arange(int(0.12 * SAMPLE_RATE)) / SAMPLE_RATE
    beep = 0.5 * np.sin(2 * math.pi * PITCHES[pitch] * t) * np.hanning(len(t))
    wave = np.zeros(SAMPLE_RATE, dtype=np.float32)
    start = int(rng.uniform(0.0, 0.08) * SAMPLE_RATE)
    for i in range(count):
        at = start + i * int(0.22 * SAMPLE_RATE)
        wave[at:at + len(beep)] += beep
    wave += np.random.default_rng(rng.getrandbits(32)).normal(0, 0.005, SAMPLE_RATE).astype(np.float32)
    buf = io.BytesIO()
    soundfile.write(buf, wave, SAMPLE_RATE, format="WAV", subtype="PCM_16")
    noun = "beep" if count == 1 else "beeps"
    return buf.getvalue(), f"{COUNT_WORDS[count - 1]} {pitch} {noun}."


def make_text(rng: random.Random) -> str:
    """Short procedural facts: learnable, media-free text."""
    sentences = []
    for _ in range(rng.randint(2, 6)):
        form = rng.randrange(3)
        if form == 0:
            a, b = rng.randint(0, 6), rng.randint(0, 6)
            sentences.append(f"{NUMBER_WORDS[a]} plus {NUMBER_WORDS[b]} is {NUMBER_WORDS[a + b]}.")
        elif form == 1:
            c = rng.choice(list(COLOURS))
            thing = {"red": "a tomato", "green": "grass", "blue": "the sky", "yellow": "a lemon",
                     "purple": "a plum", "orange": "an orange"}[c]
            sentences.append(f"{thing} is {c}.")
        else:
            s = rng.choice(SHAPES)
            sides = {"circle": "no corners", "square": "four corners", "triangle": "three corners"}[s]
            sentences.append(f"a {s} has {sides}.")
    return " ".join(sentences)


# ---------------------------------------------------------------------------------- documents

def make_sample(seed: int, split: str, index: int) -> tuple[str, dict[str, bytes], str]:
    """One sample, a pure function of (seed, split, index). Pairs and pure text are written in
    the WebDataset pair convention (KEY.png + KEY.txt + KEY.json), interleaved documents as a
    segment list (`encode_sample`)."""
    rng = random.Random(f"{seed}/{split}/{index}")
    kind = rng.choices(list(KIND_WEIGHTS), weights=list(KIND_WEIGHTS.values()))[0]
    key = f"{split}-{index:06d}"
    segments: list[Segment] = []

    def add_media(make, ext: str) -> str:
        data, caption = make(rng)
        segments.append(Segment(type="image" if ext == "png" else "audio", data=data, member=ext))
        return caption

    def add_text(text: str) -> None:
        segments.append(Segment(type="text", text=text))

    if kind == "text":
        add_text(make_text(rng))
    elif kind == "image":
        add_text(add_media(make_image, "png"))
    elif kind == "audio":
        add_text(add_media(make_audio, "wav"))
    else:
        for _ in range(rng.randint(2, 4)):
            if rng.random() < 0.6:
                add_text(rng.choice(["here is a picture:", "look at this:", "another image:"]))
                add_text(f"it shows {add_media(make_image, 'png')}")
            else:
                add_text(rng.choice(["listen:", "here is a sound:", "now a clip:"]))
                add_text(f"you hear {add_media(make_audio, 'wav')}")
    members = encode_sample(segments, source=f"synth/{kind}",
                            meta={"source": f"synth/{kind}"} if kind != "interleaved" else None)
    return key, members, f"synth:{split}:{index}"


def _write_synth_shard(args: tuple[Path, int, str, int, int]) -> tuple[ShardInfo, list[dict]]:
    path, seed, split, start, stop = args
    return write_shard(path, (make_sample(seed, split, i) for i in range(start, stop)))


def synth_split(out_dir: str | Path, *, split: str, samples: int, seed: int,
                samples_per_shard: int = 500, workers: int = 2) -> dict:
    """Write `samples` demo samples as shards + manifest.parquet + dataset.json into out_dir."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    jobs = [(out / f"shard-{i:05d}.tar", seed, split, start, min(start + samples_per_shard, samples))
            for i, start in enumerate(range(0, samples, samples_per_shard))]
    if workers > 1 and len(jobs) > 1:
        with ProcessPoolExecutor(max_workers=workers) as pool:
            results = list(pool.map(_write_synth_shard, jobs))
    else:
        results = [_write_synth_shard(job) for job in jobs]
    shards = [info for info, _ in results]
    rows = [row for _, shard_rows in results for row in shard_rows]
    return write_dataset_index(out, shards, rows, source={"synth": {"seed": seed, "split": split}})


def synth_corpus(root: str | Path, *, samples: int = 4000, seed: int = 0, val_fraction: float = 0.1,
                 shards: int = 8, workers: int = 2) -> tuple[dict, dict]:
    """The demo corpus: root/train and root/val (held out: generated from another split name)."""
    root = Path(root)
    per_shard = max(1, math.ceil(samples / shards))
    train = synth_split(root / "train", split="train", samples=samples, seed=seed,
                        samples_per_shard=per_shard, workers=workers)
    n_val = max(2, int(samples * val_fraction))
    val = synth_split(root / "val", split="val", samples=n_val, seed=seed,
                      samples_per_shard=math.ceil(n_val / 2), workers=workers)
    return train, val
