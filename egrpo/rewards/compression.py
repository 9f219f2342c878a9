"""DDPO's JPEG compressibility reward (also in Flow-GRPO): minus the JPEG file size in kB at quality 95.

It needs no model and scores any image, so it serves tests of the FLUX / SD3 pipelines and users who
want a reward that is real but free. Images are quantised to 8 bits as DDPO does before encoding.
"""

from __future__ import annotations

import io
from typing import Sequence

import torch
from PIL import Image

QUALITY = 95


def jpeg_kilobytes(images: torch.Tensor, quality: int = QUALITY) -> torch.Tensor:
    """JPEG size in kB (1000 bytes) of each image (B, C, H, W) in [0, 1], C = 1 (grey) or 3 (RGB)."""
    if images.dim() != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"expected images (B, 1 or 3, H, W), got shape {tuple(images.shape)}")
    pixels = (images.detach().float() * 255).round().clamp(0, 255).to(torch.uint8).cpu()
    pixels = pixels.permute(0, 2, 3, 1).numpy()
    sizes = []
    for image in pixels:
        buffer = io.BytesIO()
        Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image).save(buffer, format="JPEG", quality=quality)
        sizes.append(buffer.tell() / 1000.0)
    return torch.tensor(sizes)


class JpegCompressibility:
    """``-jpeg_kilobytes``: smaller files (simpler images) score higher."""

    def __call__(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        return -jpeg_kilobytes(images).to(images.device)
