"""A judge for the demo corpus: does a picture or a sound match a demo caption?

The demo corpus (`data_tools.synth`) draws its media from its captions, so a caption can be
checked against a picture or a sound with a few lines of numpy: which named colour sits where,
how many beeps at which pitch. That turns "the generated image looks like its caption" into a
number (issue 15): judge each generated item against the caption it was generated from, and
against a caption of another item (`mismatch_baseline`, the chance level).

Generated media are blurry: images come back from 8x8 codes (PSNR about 24 dB), sounds from
Griffin-Lim over a 40-bin mel spectrogram. So the judge reads only what survives that:
- images: each pixel is explained as a blend of the light grey background and one named colour
  (`synth.COLOURS`); pixels that are mostly colour vote for it, weighted by how much colour
  they hold, and the majority per region wins. The layout (one centred shape, two side by side,
  two stacked) comes from the spread of the coloured pixels. `match` = colours in their places
  and the layout. Shapes are judged too (bounding-box fill ratio, narrow top for triangles) but
  reported apart and left out of `match`: at 32x32 they are the attribute blur erodes first.
- audio: beeps are counted as bursts of the energy envelope; the pitch is the strongest
  frequency, taken as the nearest of `synth.PITCHES` in log frequency. `match` = count and pitch.

Pure numpy / PIL / soundfile: no torch, no model.
"""

from __future__ import annotations

import io
import re
from typing import Sequence

import numpy as np

from data_tools.synth import COLOURS, COUNT_WORDS, PITCHES, SHAPES

BACKGROUND = np.array((245.0, 245.0, 245.0))
RELATIONS = ("left of", "above")
_NAMES = list(COLOURS)
_COLOURS = np.array([COLOURS[c] for c in _NAMES], dtype=np.float64)  # [K, 3]

_COLOUR = "|".join(COLOURS)
_SHAPE = "|".join(SHAPES)
_ONE_SHAPE = re.compile(rf"a ({_COLOUR}) ({_SHAPE})")
_TWO_SHAPES = re.compile(rf"a ({_COLOUR}) ({_SHAPE}) (left of|above) a ({_COLOUR}) ({_SHAPE})")
_PITCH = "|".join(PITCHES)
_BEEPS = re.compile(rf"(one) ({_PITCH}) beep|({'|'.join(COUNT_WORDS[1:])}) ({_PITCH}) beeps")

# Image thresholds. Chosen on real demo images, blurred ones (Gaussian radius 1–2, 8x8 bilinear
# down-and-up) and the demo image tokenizer's reconstructions (PSNR 24.4 dB): colours, layout and
# shapes were right on all 300 of each (tests/data_tools/test_synth_judge.py checks the first two).
MIN_ALPHA = 0.5  # a pixel is foreground when at least half of it is a named colour
MIN_FOREGROUND = 0.02  # fraction of the image that must be coloured to say anything
SPREAD_RATIO = 2.0  # var_x / var_y above this: side by side; below 1/this: stacked
MIN_SHARE = 0.5  # a region's named colour must hold at least this share of its votes

# Audio thresholds. Count and pitch were right on all of 200 real clips, 60 through log-mel +
# Griffin-Lim (also with the mel smeared over 120 ms or 5 mel bins) and 100 through the demo
# audio tokenizer + Griffin-Lim.
ENVELOPE_HOP_S = 0.01
ENVELOPE_WIN_S = 0.02
BURST_THRESHOLD = 0.3  # of the loudest envelope frame (amplitude, about -10 dB)
MERGE_GAP_S = 0.04  # bursts closer than this are one beep (beeps are 0.10 s apart)
MIN_BURST_S = 0.02
PITCH_BAND_HZ = (80.0, 4000.0)


# ------------------------------------------------------------------------------------ captions

def _clean(text: str) -> str:
    return " ".join(text.strip().lower().rstrip(".").split())


def parse_image_caption(text: str) -> dict | None:
    """"a red circle left of a blue square." → {"colours": ["red", "blue"], "shapes": ["circle",
    "square"], "relation": "left of"}; one shape: relation None. None for any other text."""
    s = _clean(text)
    m = _TWO_SHAPES.fullmatch(s)
    if m:
        return {"colours": [m[1], m[4]], "shapes": [m[2], m[5]], "relation": m[3]}
    m = _ONE_SHAPE.fullmatch(s)
    if m:
        return {"colours": [m[1]], "shapes": [m[2]], "relation": None}
    return None


def parse_audio_caption(text: str) -> dict | None:
    """"three high beeps." → {"count": 3, "pitch": "high"}. None for any other text."""
    m = _BEEPS.fullmatch(_clean(text))
    if not m:
        return None
    word, pitch = (m[1], m[2]) if m[1] else (m[3], m[4])
    return {"count": COUNT_WORDS.index(word) + 1, "pitch": pitch}


def _require(parsed: dict | None, caption: str, kind: str) -> dict:
    if parsed is None:
        raise ValueError(f"{caption!r} is not a demo {kind} caption (see data_tools/synth.py)")
    return parsed


# -------------------------------------------------------------------------------------- images

def image_array(image: bytes | np.ndarray) -> np.ndarray:
    """PNG/JPEG bytes or an RGB array [H, W, 3] (0–255) → float64 [H, W, 3]."""
    if isinstance(image, (bytes, bytearray)):
        from PIL import Image

        with Image.open(io.BytesIO(image)) as img:
            image = np.asarray(img.convert("RGB"))
    rgb = np.asarray(image, dtype=np.float64)
    if rgb.ndim != 3 or rgb.shape[2] != 3:
        raise ValueError(f"judge_image wants an RGB image [H, W, 3]; got shape {rgb.shape}")
    return rgb


def colour_map(rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per pixel: (index into synth.COLOURS [H, W], alpha [H, W] in [0, 1]).

    A pixel p is modelled as alpha * colour + (1 - alpha) * background; for every named colour
    alpha is fitted by least squares, and the colour with the smallest residual wins. A blurred
    edge (half red, half grey) is thus still red, not orange or pink."""
    d = rgb - BACKGROUND  # [H, W, 3]
    c = _COLOURS - BACKGROUND  # [K, 3]
    alpha = np.clip(d @ c.T / np.sum(c * c, axis=1), 0.0, 1.0)  # [H, W, K]
    residual = np.sum((d[..., None, :] - alpha[..., None] * c) ** 2, axis=-1)  # [H, W, K]
    best = np.argmin(residual, axis=-1)
    return best, np.take_along_axis(alpha, best[..., None], axis=-1)[..., 0]


def _votes(best: np.ndarray, weight: np.ndarray) -> dict[str, float]:
    """Colour → share of the weighted votes in a region ({} when the region has none)."""
    total = float(weight.sum())
    if total <= 0:
        return {}
    return {name: float(weight[best == k].sum()) / total for k, name in enumerate(_NAMES)
            if weight[best == k].sum() > 0}


def _majority(votes: dict[str, float]) -> tuple[str | None, float]:
    if not votes:
        return None, 0.0
    name = max(votes, key=votes.get)
    return name, votes[name]


def _shape_of(mask: np.ndarray) -> tuple[str | None, float]:
    """A coloured blob → (shape, fill ratio of its bounding box).

    A triangle (apex up) is narrow at the top: its top quarter of rows is less than 60 % as
    wide as its bottom quarter. Otherwise the fill ratio parts squares (~1) from circles
    (~0.785). Blur rounds a triangle towards a circle's fill ratio, hence the width test."""
    ys, xs = np.nonzero(mask)
    if len(xs) < 4:
        return None, 0.0
    y0, y1 = ys.min(), ys.max()
    fill = len(xs) / float((xs.max() - xs.min() + 1) * (y1 - y0 + 1))
    widths = mask[y0:y1 + 1].sum(axis=1)
    quarter = max(1, len(widths) // 4)
    if widths[:quarter].mean() < 0.6 * widths[-quarter:].mean():
        return "triangle", fill
    return ("square" if fill > 0.88 else "circle"), fill


def judge_image(image: bytes | np.ndarray, caption: str) -> dict:
    """Judge a picture against a demo image caption.

    Returns {"match": colours and layout both right, "colours": the named colour(s) hold the
    majority in their place (the whole picture for one shape; the left/right or top/bottom
    half for two), "layout": the coloured pixels spread as the caption says (one shape, side by
    side, stacked), "shapes": each named shape recognised in the pixels of its named colour and
    place (NOT part of match), "found": what was seen (layout "one" | "left of" | "above" |
    None, and per region the majority colour with its share, the shape with its fill ratio)}.
    ValueError if the caption is not a demo image caption."""
    want = _require(parse_image_caption(caption), caption, "image")
    best, alpha = colour_map(image_array(image))
    h, w = alpha.shape
    fg = alpha >= MIN_ALPHA
    weight = np.where(fg, alpha, 0.0)
    found: dict = {"foreground": float(fg.mean())}
    if fg.mean() < MIN_FOREGROUND:
        found["layout"] = None
        return {"match": False, "colours": False, "layout": False, "shapes": False, "found": found}

    ys, xs = np.nonzero(fg)
    ww = weight[ys, xs]
    var_x = float(np.average((xs - np.average(xs, weights=ww)) ** 2, weights=ww)) + 1e-9
    var_y = float(np.average((ys - np.average(ys, weights=ww)) ** 2, weights=ww)) + 1e-9
    ratio = var_x / var_y
    layout = "left of" if ratio > SPREAD_RATIO else "above" if ratio < 1 / SPREAD_RATIO else None
    found["layout"], found["spread_ratio"] = layout or "one", ratio

    if want["relation"] is None:
        regions = [np.ones_like(fg)]
    elif want["relation"] == "left of":
        left = np.zeros_like(fg)
        left[:, : w // 2] = True
        regions = [left, ~left]
    else:
        top = np.zeros_like(fg)
        top[: h // 2] = True
        regions = [top, ~top]

    colours_ok, shapes_ok, seen = True, True, []
    for region, colour, shape in zip(regions, want["colours"], want["shapes"]):
        name, share = _majority(_votes(best[region], weight[region]))
        got_shape, fill = _shape_of(fg & region & (best == _NAMES.index(colour)))
        seen.append({"colour": name, "share": share, "shape": got_shape, "fill": fill})
        colours_ok &= name == colour and share >= MIN_SHARE
        shapes_ok &= got_shape == shape
    found["regions"] = seen
    layout_ok = layout == want["relation"]
    return {"match": bool(colours_ok and layout_ok), "colours": bool(colours_ok),
            "layout": bool(layout_ok), "shapes": bool(shapes_ok), "found": found}


# --------------------------------------------------------------------------------------- audio

def audio_array(audio: bytes | np.ndarray, sample_rate: int) -> tuple[np.ndarray, int]:
    """WAV/FLAC bytes (their own rate) or a waveform array (at `sample_rate`) → mono float64."""
    if isinstance(audio, (bytes, bytearray)):
        import soundfile

        wave, sample_rate = soundfile.read(io.BytesIO(audio), dtype="float64", always_2d=True)
        wave = wave.mean(axis=1)
    else:
        wave = np.asarray(audio, dtype=np.float64)
        if wave.ndim != 1:
            raise ValueError(f"judge_audio wants a mono waveform [samples]; got shape {wave.shape}")
    return wave, int(sample_rate)


def count_beeps(wave: np.ndarray, sample_rate: int) -> int:
    """Bursts of the RMS envelope (20 ms windows, 10 ms hop) above 30 % of its loudest frame;
    bursts less than 40 ms apart are merged, bursts shorter than 20 ms dropped."""
    hop, win = round(ENVELOPE_HOP_S * sample_rate), round(ENVELOPE_WIN_S * sample_rate)
    if len(wave) < win:
        return 0
    frames = np.lib.stride_tricks.sliding_window_view(wave, win)[::hop]
    env = np.sqrt(np.mean(frames ** 2, axis=1))
    if env.max() <= 1e-4:  # silence (-80 dBFS)
        return 0
    on = env >= BURST_THRESHOLD * env.max()
    edges = np.diff(np.concatenate([[0], on.astype(np.int8), [0]]))
    starts, stops = np.nonzero(edges == 1)[0], np.nonzero(edges == -1)[0]
    bursts: list[list[int]] = []
    for a, b in zip(starts, stops):
        if bursts and (a - bursts[-1][1]) * ENVELOPE_HOP_S < MERGE_GAP_S:
            bursts[-1][1] = b
        else:
            bursts.append([a, b])
    return sum(1 for a, b in bursts if (b - a) * ENVELOPE_HOP_S >= MIN_BURST_S)


def dominant_frequency(wave: np.ndarray, sample_rate: int) -> float:
    """The strongest frequency in PITCH_BAND_HZ of the clip's power spectrum (Hann window)."""
    power = np.abs(np.fft.rfft(wave * np.hanning(len(wave)))) ** 2
    freqs = np.fft.rfftfreq(len(wave), 1.0 / sample_rate)
    band = (freqs >= PITCH_BAND_HZ[0]) & (freqs <= PITCH_BAND_HZ[1])
    return float(freqs[band][np.argmax(power[band])])


def nearest_pitch(freq: float) -> str:
    """The name in synth.PITCHES nearest to `freq` in log frequency."""
    return min(PITCHES, key=lambda p: abs(np.log(freq / PITCHES[p])))


def judge_audio(audio: bytes | np.ndarray, caption: str, sample_rate: int = 16000) -> dict:
    """Judge a sound against a demo audio caption ("three high beeps.").

    Returns {"match": count and pitch both right, "count": bool, "pitch": bool, "found":
    {"count": beeps counted, "frequency": dominant Hz, "pitch": its nearest name}}.
    `sample_rate` applies to arrays; bytes carry their own. ValueError for other captions."""
    want = _require(parse_audio_caption(caption), caption, "audio")
    wave, rate = audio_array(audio, sample_rate)
    count = count_beeps(wave, rate)
    freq = dominant_frequency(wave, rate) if count else 0.0
    pitch = nearest_pitch(freq) if count else None
    count_ok, pitch_ok = count == want["count"], pitch == want["pitch"]
    return {"match": bool(count_ok and pitch_ok), "count": bool(count_ok), "pitch": bool(pitch_ok),
            "found": {"count": count, "frequency": freq, "pitch": pitch}}


# -------------------------------------------------------------------------------------- chance

def judge(item: bytes | np.ndarray, caption: str) -> dict:
    """judge_image or judge_audio, by the caption's kind (arrays of audio at 16 kHz)."""
    if parse_image_caption(caption) is not None:
        return judge_image(item, caption)
    if parse_audio_caption(caption) is not None:
        return judge_audio(item, caption)
    raise ValueError(f"{caption!r} is neither a demo image nor a demo audio caption")


def _check_one_kind(items: Sequence, captions: Sequence[str], need: int) -> None:
    if len(items) != len(captions) or len(items) < need:
        raise ValueError(f"need as many captions as items (at least {need}); got "
                         f"{len(items)} items and {len(captions)} captions")
    kinds = {"image" if parse_image_caption(c) else "audio" if parse_audio_caption(c) else c
             for c in captions}
    if len(kinds) != 1 or not kinds <= {"image", "audio"}:
        raise ValueError(f"captions must all be demo image captions or all demo audio "
                         f"captions; got {sorted(kinds)[:3]}")


def match_rate(items: Sequence, captions: Sequence[str]) -> float:
    """Fraction of items that `judge` matches with their own caption (items of one kind)."""
    _check_one_kind(items, captions, 1)
    return sum(judge(x, c)["match"] for x, c in zip(items, captions)) / len(items)


def mismatch_baseline(items: Sequence, captions: Sequence[str]) -> float:
    """The chance level: each item judged against the caption of the next item (rolled by one).

    A rolled caption that happens to equal the item's own counts as a match, as it would for
    a random caption: this is about the rate a generator that ignores its caption reaches when
    it draws from the corpus's own distribution of media (demo corpus: ~0.05 for images, ~0.08
    for audio). Items of one kind, at least 2."""
    _check_one_kind(items, captions, 2)
    return match_rate(items, list(captions[1:]) + [captions[0]])
