"""Media decoding to the model's geometry: images → normalised patches, audio → log-mel tokens.

Legend: P patches per image, Dp = 3·patch² values per patch; A audio tokens per clip,
Da = n_mels·frames_per_token values per audio token.
"""

from __future__ import annotations

import functools
import io
import math
import warnings
from typing import Callable

import numpy as np
from PIL import Image

from mmtrain.data.config import MediaSpec
from mmtrain.data.schema import SampleError


# ------------------------------------------------------------------------------------- images

def probe_image(data: bytes, max_pixels: int) -> tuple[int, int, str]:
    """Read only the header: (width, height, format). Rejects corrupt headers and bombs."""
    try:
        with Image.open(io.BytesIO(data)) as img:
            width, height, fmt = img.width, img.height, str(img.format)
    except Image.DecompressionBombError as e:
        raise SampleError(f"image rejected from its header (decompression bomb): {e}") from None
    except (Image.UnidentifiedImageError, OSError, ValueError, SyntaxError) as e:
        raise SampleError(f"image header unreadable: {e}") from None
    if width <= 0 or height <= 0 or width * height > max_pixels:
        raise SampleError(f"image declares {width}x{height} pixels, over the "
                          f"{max_pixels}-pixel limit (decompression bomb?)")
    return width, height, fmt


def decode_image(data: bytes, spec: MediaSpec, max_pixels: int) -> np.ndarray:
    """Image bytes → patches [P, Dp] float32 in [-1, 1], aspect ratio kept (letterboxed)."""
    probe_image(data, max_pixels)  # before any pixel is decoded
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as img:
                img.draft("RGB", (spec.image_size, spec.image_size))  # cheap JPEG downscale
                rgb = img.convert("RGB")
                scale = spec.image_size / max(rgb.width, rgb.height)
                size = (max(1, round(rgb.width * scale)), max(1, round(rgb.height * scale)))
                rgb = rgb.resize(size, Image.Resampling.BICUBIC)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombWarning) as e:
        raise SampleError(f"image does not decode: {e}") from None
    canvas = Image.new("RGB", (spec.image_size, spec.image_size), (127, 127, 127))
    canvas.paste(rgb, ((spec.image_size - size[0]) // 2, (spec.image_size - size[1]) // 2))
    pixels = np.asarray(canvas, dtype=np.float32) / 127.5 - 1.0  # [H, W, 3]
    g, p = spec.image_size // spec.patch_size, spec.patch_size
    patches = pixels.reshape(g, p, g, p, 3).transpose(0, 2, 1, 3, 4)  # [gy, gx, p, p, 3]
    return np.ascontiguousarray(patches.reshape(g * g, p * p * 3))


# -------------------------------------------------------------------------------------- audio

def decode_audio_bytes(data: bytes, frames_at: Callable[[int], int] | None = None
                       ) -> tuple[np.ndarray, int]:
    """Audio bytes (WAV/FLAC/MP3/Ogg/Opus) → (samples [channels, n] float32, sample_rate).

    `frames_at(rate)`: read only that many frames from the start (libsndfile decodes no further).
    """
    import soundfile  # libsndfile; imported here so the model side never needs it

    try:
        with soundfile.SoundFile(io.BytesIO(data)) as f:
            rate = f.samplerate
            wave = f.read(frames=frames_at(rate) if frames_at else -1, dtype="float32",
                          always_2d=True)
    except (soundfile.LibsndfileError, RuntimeError, ValueError, TypeError) as e:
        raise SampleError(f"audio does not decode: {e}") from None
    if wave.shape[0] == 0:
        raise SampleError("audio has no samples")
    return np.ascontiguousarray(wave.T), int(rate)


def _source_frames(need: int, rate: int, target: int) -> int:
    """Input frames at `rate` that decide the first `need` output samples at `target` after
    `resample_poly` (its filter reaches 10·max(up, down) upsampled samples ahead)."""
    if rate == target:
        return need
    g = math.gcd(rate, target)
    up, down = target // g, rate // g
    return math.ceil(need * down / up) + math.ceil(10 * max(up, down) / up) + 1


@functools.lru_cache(maxsize=8)
def mel_filterbank(n_mels: int, n_fft: int, sample_rate: int) -> np.ndarray:
    """HTK-style triangular mel filters [n_mels, n_fft // 2 + 1]."""
    def hz_to_mel(f: np.ndarray) -> np.ndarray:
        return 2595.0 * np.log10(1.0 + f / 700.0)

    def mel_to_hz(m: np.ndarray) -> np.ndarray:
        return 700.0 * (10 ** (m / 2595.0) - 1.0)

    freqs = np.linspace(0, sample_rate / 2, n_fft // 2 + 1)
    edges = mel_to_hz(np.linspace(hz_to_mel(np.array(0.0)), hz_to_mel(np.array(sample_rate / 2)),
                                  n_mels + 2))
    lower, centre, upper = edges[:-2, None], edges[1:-1, None], edges[2:, None]
    rising = (freqs[None] - lower) / (centre - lower)
    falling = (upper - freqs[None]) / (upper - centre)
    return np.maximum(0.0, np.minimum(rising, falling)).astype(np.float32)


def mono_clip(data: bytes, need: int, sample_rate: int, frames_at) -> np.ndarray:
    """Audio bytes → float32 mono waveform of exactly `need` samples at `sample_rate` (cropped or
    zero-padded). `frames_at(source_rate)` says how many source frames to decode: cropping before
    resampling, so a long clip is never decoded or resampled whole."""
    wave, rate = decode_audio_bytes(data, frames_at)
    mono = wave.mean(axis=0)
    if rate != sample_rate:
        from scipy.signal import resample_poly

        g = math.gcd(rate, sample_rate)
        mono = resample_poly(mono, sample_rate // g, rate // g).astype(np.float32)
    if not np.isfinite(mono).all():
        raise SampleError("audio holds non-finite samples")
    return np.pad(mono[:need], (0, max(0, need - len(mono)))).astype(np.float32)


def decode_audio(data: bytes, spec: MediaSpec) -> np.ndarray:
    """Audio bytes → log-mel tokens [A, Da]: mono, resampled, cropped/padded to the clip length."""
    frames = spec.audio_frames
    need = (frames - 1) * spec.hop_length + spec.n_fft  # samples at spec.sample_rate
    # Crop before resampling: only the frames the clip needs are decoded and resampled.
    mono = mono_clip(data, need, spec.sample_rate,
                     lambda rate: _source_frames(need, rate, spec.sample_rate))
    windows = np.lib.stride_tricks.sliding_window_view(mono, spec.n_fft)[::spec.hop_length][:frames]
    power = np.abs(np.fft.rfft(windows * np.hanning(spec.n_fft).astype(np.float32), axis=-1)) ** 2
    mel = power @ mel_filterbank(spec.n_mels, spec.n_fft, spec.sample_rate).T  # [frames, n_mels]
    log_mel = np.log10(np.maximum(mel, 1e-10))
    log_mel = (np.maximum(log_mel, log_mel.max() - 8.0) + 4.0) / 4.0  # Whisper's normalisation
    return np.ascontiguousarray(
        log_mel.reshape(spec.tokens_per_audio, spec.audio_token_dim).astype(np.float32))
