"""Checking and normalising media at build time.

Every image and audio clip that goes into a shard is decoded once here, so a shard never holds a
member the loader cannot read. Images are checked against a pixel budget from the header alone,
before any pixel is decoded (decompression bombs). Optional normalisation: images resized to a
max side and re-encoded; audio down-mixed, resampled and clipped. Media is re-encoded only when
something changed or another format was asked for, so untouched bytes stay bit-identical.

Audio arrays are [channels, samples] float32, as in `mmtrain.data.decode`.
"""

from __future__ import annotations

import dataclasses
import io
import math
import re
import warnings
from typing import Any

import numpy as np
import soundfile
from PIL import Image, ImageOps

from data_tools.errors import Rejected
from mmtrain.data.schema import media_kind

# Formats the loader decodes, with the member extension each gets. GIF is re-encoded as PNG
# (its first frame), so the shards hold only the image formats open_clip's tools expect.
IMAGE_FORMATS = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp"}
CONVERTED_IMAGE_FORMATS = {"GIF": "PNG"}
# libsndfile's (format, subtype) → member extension; MP3 needs libsndfile >= 1.1.
AUDIO_FORMATS = {"WAV": "wav", "WAVEX": "wav", "FLAC": "flac", "MP3": "mp3", "OGG": "ogg"}
DEFAULT_MAX_IMAGE_PIXELS = 50_000_000  # the loader's default (DataConfig.max_image_pixels)
DEFAULT_MAX_TEXT_CHARS = 1_000_000  # ~250k tokens: longer than any real document of a corpus


@dataclasses.dataclass(frozen=True, kw_only=True)
class MediaOptions:
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS
    min_image_side: int = 0  # smaller images are filtered out (0: keep all)
    image_max_side: int = 0  # larger images are resized to fit (0: keep size)
    image_format: str = ""  # "jpeg" | "png" | "webp": re-encode into it ("": keep the format)
    image_quality: int = 90  # JPEG / WebP quality when re-encoding
    audio_mono: bool = False  # down-mix to one channel
    audio_sample_rate: int = 0  # resample to this rate (0: keep)
    audio_max_seconds: float = 0.0  # clip longer audio (0: keep)
    audio_format: str = ""  # "wav" | "flac": re-encode into it ("": keep the format)
    max_text_chars: int = DEFAULT_MAX_TEXT_CHARS  # longer samples are rejected (text_too_long)

    def __post_init__(self) -> None:
        def require(ok: bool, key: str, why: str) -> None:
            if not ok:
                raise ValueError(f"--{key.replace('_', '-')}={getattr(self, key)!r} {why}")

        require(self.max_image_pixels >= 1, "max_image_pixels", "must be >= 1")
        require(self.min_image_side >= 0, "min_image_side", "must be >= 0")
        require(self.image_max_side >= 0, "image_max_side", "must be >= 0")
        require(self.image_format in ("", "jpeg", "png", "webp"), "image_format",
                "must be jpeg, png or webp")
        require(1 <= self.image_quality <= 100, "image_quality", "must be in 1..100")
        require(self.audio_sample_rate >= 0, "audio_sample_rate", "must be >= 0")
        require(self.audio_max_seconds >= 0, "audio_max_seconds", "must be >= 0")
        require(self.audio_format in ("", "wav", "flac"), "audio_format", "must be wav or flac")
        require(self.max_text_chars >= 1, "max_text_chars", "must be >= 1")


# ------------------------------------------------------------------------------------- images

def probe_image(data: bytes, max_pixels: int) -> tuple[int, int, str]:
    """(width, height, PIL format) from the header only; refuses bombs before any decoding."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as e:
        raise Rejected("image_too_large", f"image header declares an absurd size: {e}") from None
    except Exception as e:  # PIL raises many types on malformed headers
        raise Rejected("corrupt_image", f"not a readable image: {_describe(e)}") from None
    width, height = img.size
    if width * height > max_pixels:
        raise Rejected("image_too_large", f"image header declares {width}x{height} = "
                       f"{width * height} pixels > --max-image-pixels={max_pixels}")
    if img.format not in IMAGE_FORMATS and img.format not in CONVERTED_IMAGE_FORMATS:
        raise Rejected("unsupported_format", f"image format {img.format} is not one of "
                       f"{'/'.join([*IMAGE_FORMATS, *CONVERTED_IMAGE_FORMATS])}")
    return width, height, img.format


def decode_image(data: bytes, max_pixels: int) -> Image.Image:
    """Fully decode an image (a truncated file fails here), after the header check."""
    probe_image(data, max_pixels)
    try:
        img = Image.open(io.BytesIO(data))
        img.load()
    except Exception as e:  # OSError "image file is truncated", SyntaxError, ValueError, ...
        raise Rejected("corrupt_image", f"image does not decode: {_describe(e)}") from None
    return img


def prepare_image(data: bytes, opts: MediaOptions) -> tuple[bytes, str]:
    """Check, filter and (optionally) normalise one image. Returns (bytes, member extension)."""
    img = decode_image(data, opts.max_image_pixels)
    fmt = img.format
    if min(img.size) < opts.min_image_side:
        raise Rejected("filtered", f"image {img.size[0]}x{img.size[1]} is smaller than "
                       f"--min-image-side={opts.min_image_side}")
    target = opts.image_format.upper() or CONVERTED_IMAGE_FORMATS.get(fmt, fmt)
    resize = opts.image_max_side > 0 and max(img.size) > opts.image_max_side
    if not resize and target == fmt:
        return data, IMAGE_FORMATS[fmt]
    img = ImageOps.exif_transpose(img)
    if resize:
        img.thumbnail((opts.image_max_side, opts.image_max_side), Image.Resampling.LANCZOS)
    has_alpha = "A" in img.getbands() or "transparency" in img.info
    img = img.convert("RGBA" if has_alpha and target != "JPEG" else "RGB")
    buf = io.BytesIO()
    img.save(buf, format=target, quality=opts.image_quality)
    return buf.getvalue(), IMAGE_FORMATS[target]


# -------------------------------------------------------------------------------------- audio

def audio_ext(info: Any) -> str:
    """The member extension for a soundfile.info(): Ogg Opus is `opus`, Ogg Vorbis `ogg`."""
    return "opus" if info.format == "OGG" and info.subtype == "OPUS" else AUDIO_FORMATS[info.format]


def decode_audio(data: bytes, max_seconds: float = 0.0) -> tuple[np.ndarray, Any]:
    """Decode audio bytes to ([channels, samples] float32, its soundfile.info()).

    With `max_seconds`, only the frames of the first `max_seconds` are read (and checked).
    """
    try:
        info = soundfile.info(io.BytesIO(data))
    except Exception as e:  # soundfile.LibsndfileError, struct errors on odd headers
        raise _audio_error(data, e) from None
    if info.format not in AUDIO_FORMATS:
        raise Rejected("unsupported_format", f"audio format {info.format} is not one of "
                       f"{'/'.join(sorted(set(AUDIO_FORMATS.values()) | {'opus'}))}")
    if info.format in ("WAV", "WAVEX") and _wav_truncated(data):
        raise Rejected("corrupt_audio", "WAV file is truncated (data chunk shorter than declared)")
    frames = max(1, math.floor(max_seconds * info.samplerate)) if max_seconds else -1
    try:
        with soundfile.SoundFile(io.BytesIO(data)) as f:
            wave = f.read(frames=frames, dtype="float32", always_2d=True)
    except Exception as e:
        raise Rejected("corrupt_audio", f"audio does not decode: {_describe(e)}") from None
    if wave.shape[0] == 0:
        raise Rejected("corrupt_audio", "audio has no samples")
    return np.ascontiguousarray(wave.T), info


def _audio_error(data: bytes, e: BaseException) -> Rejected:
    """Why libsndfile could not open `data`: a format it lacks, or a corrupt file."""
    mp3 = data[:3] == b"ID3" or (len(data) > 1 and data[0] == 0xFF and data[1] & 0xE0 == 0xE0)
    if mp3 and "MP3" not in soundfile.available_formats():
        return Rejected("unsupported_format", f"audio is MP3, which this libsndfile "
                        f"({soundfile.__libsndfile_version__}) cannot decode (needs >= 1.1)")
    if not (data[:4] in (b"RIFF", b"fLaC", b"OggS") or mp3):
        return Rejected("unsupported_format", "audio is not WAV, FLAC, MP3, Ogg Vorbis or Opus")
    return Rejected("corrupt_audio", f"audio does not decode: {_describe(e)}")


def _wav_truncated(data: bytes) -> bool:
    """libsndfile silently reads what is there; the RIFF data chunk says what should be."""
    pos = 12
    while pos + 8 <= len(data):
        chunk, size = data[pos:pos + 4], int.from_bytes(data[pos + 4:pos + 8], "little")
        if chunk == b"data":  # 0 / 0xFFFFFFFF: size unknown (streamed WAV)
            return size not in (0, 0xFFFFFFFF) and pos + 8 + size > len(data)
        pos += 8 + size + (size & 1)
    return True  # no data chunk at all


def prepare_audio(data: bytes, opts: MediaOptions) -> tuple[bytes, str]:
    """Check and (optionally) normalise one clip. Returns (bytes, member extension).

    --audio-max-seconds crops before anything else: only the needed frames are decoded.
    """
    wave, info = decode_audio(data, opts.audio_max_seconds)
    rate, ext = info.samplerate, audio_ext(info)
    changed = opts.audio_max_seconds > 0 and wave.shape[1] < info.frames  # cropped
    if opts.audio_mono and wave.shape[0] > 1:
        wave, changed = wave.mean(axis=0, keepdims=True), True
    if opts.audio_sample_rate and rate != opts.audio_sample_rate:
        wave, changed = resample(wave, rate, opts.audio_sample_rate), True
        rate = opts.audio_sample_rate
        if opts.audio_max_seconds:  # the resampled crop may overshoot by a sample
            wave = wave[:, :max(1, math.floor(opts.audio_max_seconds * rate))]
    out_ext = opts.audio_format or ext
    if not changed and out_ext == ext:
        return data, ext
    if out_ext not in ("wav", "flac"):  # changed audio is written as lossless PCM
        out_ext = "flac"
    buf = io.BytesIO()
    soundfile.write(buf, np.clip(wave, -1.0, 1.0).T, rate, format=out_ext.upper(),
                    subtype="PCM_16")
    return buf.getvalue(), out_ext


def resample(wave: np.ndarray, rate: int, target: int) -> np.ndarray:
    from scipy.signal import resample_poly  # local import: scipy is slow to import

    g = math.gcd(rate, target)
    return resample_poly(wave, target // g, rate // g, axis=1).astype(np.float32)


# ------------------------------------------------------------------------------------ members

def check_member(ext: str, data: bytes, max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS) -> None:
    """Decode one media member by its extension (for `verify`); raises Rejected if it fails."""
    kind = media_kind(ext)
    if kind == "image":
        decode_image(data, max_pixels)
    elif kind == "audio":
        decode_audio(data)


def _describe(e: BaseException) -> str:
    """The error, without object addresses: the same input gives the same rejected.jsonl."""
    return re.sub(r" ?<[^<>]* at 0x[0-9a-fA-F]+>", "", f"{type(e).__name__}: {e}")[:300]
