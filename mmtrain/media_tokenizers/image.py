"""Image tokenizer: RGB image → a grid of discrete codes → RGB image.

Input pixels are decoded exactly as the loader decodes them (`mmtrain.data.decode.decode_image`:
aspect kept, letterboxed on grey, values in [-1, 1]), at `image_size` × `image_size`. A
convolutional encoder reduces each side by 2^len(channels); FSQ turns each latent vector
into one code in [0, prod(levels)).

Legend: B images, H = W = image_size, h = w = grid side, d = len(levels).
"""

from __future__ import annotations

import dataclasses
import io

import numpy as np
import torch

from mmtrain.data.config import MediaSpec
from mmtrain.data.decode import decode_image
from mmtrain.media_tokenizers.layers import FSQAutoencoder, check_architecture


@dataclasses.dataclass(frozen=True, kw_only=True)
class ImageTokenizerConfig:
    image_size: int = 32  # the demo's images (data_tools/synth.py, model.image_size of `tiny`)
    # Widths per stage: 32 px → 16 → 8 → 4 (grid 4×4: 16 codes of 8×8 pixels). On the demo
    # images this reconstructs at 24.1 dB PSNR against 24.4 dB for an 8×8 grid ((32, 64)), with a
    # quarter of the codes for the model to generate (docs/architecture.md).
    channels: tuple[int, ...] = (32, 64, 128)
    levels: tuple[int, ...] = (8, 5, 5, 5)  # FSQ levels: 1000 codes

    def __post_init__(self) -> None:
        check_architecture("image_tokenizer", self.channels, self.levels)
        if self.image_size < 1 or self.image_size % self.downsample:
            raise ValueError(f"image_tokenizer.image_size={self.image_size} must be a positive "
                             f"multiple of the downsampling factor {self.downsample} "
                             f"(2^len(channels))")

    @property
    def downsample(self) -> int:
        return 2 ** len(self.channels)

    @property
    def grid(self) -> tuple[int, int]:
        side = self.image_size // self.downsample
        return side, side


class ImageTokenizer(FSQAutoencoder):
    kind = "image"
    quality_name = "psnr_db"  # higher is better

    def __init__(self, config: ImageTokenizerConfig) -> None:
        super().__init__(2, 3, config.channels, config.levels)
        self.config = config

    # ---- shapes
    @property
    def codebook_size(self) -> int:
        return int(np.prod(self.config.levels))

    @property
    def code_shape(self) -> tuple[int, ...]:
        return self.config.grid  # (h, w), row-major: code [i, j] covers the image's block (i, j)

    @property
    def input_shape(self) -> tuple[int, ...]:
        return 3, self.config.image_size, self.config.image_size

    # ---- bytes ↔ model input
    def input_from_bytes(self, data: bytes) -> np.ndarray:
        """Image bytes → pixels [3, H, W] float32 in [-1, 1]; SampleError if it does not decode."""
        return self.features(self.raw_from_bytes(data)[None])[0]

    def features(self, raw: np.ndarray) -> np.ndarray:
        """Decoded items [N, ...] → model inputs [N, ...] (for images, the pixels themselves)."""
        return raw

    def raw_from_bytes(self, data: bytes, *, max_pixels: int = 50_000_000) -> np.ndarray:
        """Image bytes → pixels [3, H, W] (the loader's resize and letterbox)."""
        s = self.config.image_size
        spec = MediaSpec(image_size=s, patch_size=s, audio_seconds=1.0, n_mels=1,
                         audio_frames_per_token=1)  # one patch: the whole image
        hwc = decode_image(data, spec, max_pixels)[0].reshape(s, s, 3)
        return np.ascontiguousarray(hwc.transpose(2, 0, 1))

    @staticmethod
    def to_png(pixels: np.ndarray | torch.Tensor) -> bytes:
        """Pixels [3, H, W] in [-1, 1] → PNG bytes."""
        chw = torch.as_tensor(pixels).detach().float().clamp(-1, 1).cpu().numpy()
        hwc = np.round((chw.transpose(1, 2, 0) + 1.0) * 127.5).astype(np.uint8)
        from PIL import Image

        buf = io.BytesIO()
        Image.fromarray(hwc, "RGB").save(buf, format="PNG")
        return buf.getvalue()

    # ---- the model (forward, encode: FSQAutoencoder; pixels [B, 3, H, W] ↔ codes [B, h, w])
    @torch.no_grad()
    def decode(self, codes_Bhw: torch.Tensor) -> torch.Tensor:
        """Codes [B, h, w] → pixels [B, 3, H, W] in [-1, 1]."""
        self._check_codes(codes_Bhw)
        return self._decode(codes_Bhw, lambda x: x.clamp(-1, 1))

    def _check_codes(self, codes: torch.Tensor) -> None:
        if tuple(codes.shape[1:]) != self.code_shape:
            raise ValueError(f"image codes have shape {tuple(codes.shape)}; this tokenizer "
                             f"decodes [B, {self.code_shape[0]}, {self.code_shape[1]}]")
        if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) >= self.codebook_size):
            raise ValueError(f"image codes outside [0, {self.codebook_size})")

    # ---- training objective and quality
    @staticmethod
    def loss(x: torch.Tensor, recon: torch.Tensor) -> torch.Tensor:
        return torch.mean((recon - x) ** 2)

    @staticmethod
    def quality(x: torch.Tensor, recon: torch.Tensor) -> torch.Tensor:
        """PSNR per image in dB, on pixels in [0, 1] (the reconstruction clamped to the range)."""
        mse = torch.mean(((recon.clamp(-1, 1) - x) / 2) ** 2, dim=(1, 2, 3))
        return 10 * torch.log10(1.0 / mse.clamp_min(1e-10))
