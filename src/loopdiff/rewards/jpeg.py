"""JPEG compressibility and incompressibility (DDPO): -/+ JPEG size in kB at quality 95.

See docs/method.md, "Tasks and rewards".
"""

from __future__ import annotations

import io
from typing import Any, Mapping, Sequence

import numpy as np
import torch
from PIL import Image

from loopdiff.rewards.base import RewardError, register_reward


def jpeg_size_kb(images: torch.Tensor, quality: int = 95) -> torch.Tensor:
    """Size in kB (1000 bytes) of each image of ``(N, 3, H, W)`` in [0, 1] saved as JPEG."""
    array = (images.detach().float().clamp(0, 1) * 255).round().to(torch.uint8)
    array = array.permute(0, 2, 3, 1).cpu().numpy()
    sizes = []
    for image in array:
        buffer = io.BytesIO()
        Image.fromarray(np.ascontiguousarray(image)).save(buffer, format="JPEG", quality=quality)
        sizes.append(buffer.tell() / 1000.0)
    return torch.tensor(sizes, dtype=torch.float32)


class JpegSize:
    """``sign * size_kB``: sign -1 rewards compressibility, +1 incompressibility."""

    def __init__(self, sign: float, quality: int = 95):
        if isinstance(quality, bool) or not isinstance(quality, int) or not 1 <= quality <= 100:
            name = "jpeg_compressibility" if sign < 0 else "jpeg_incompressibility"
            raise RewardError(f"reward '{name}': quality={quality!r} is invalid; allowed: an integer in [1, 100]")
        self.sign = sign
        self.quality = quality

    def __call__(
        self, images: torch.Tensor, prompts: Sequence[str], metadata: Sequence[Mapping[str, Any]]
    ) -> torch.Tensor:
        return self.sign * jpeg_size_kb(images, self.quality)


@register_reward("jpeg_compressibility", description="minus the JPEG size in kB at quality 95 (DDPO)")
def jpeg_compressibility(quality: int = 95) -> JpegSize:
    return JpegSize(-1.0, quality)


@register_reward("jpeg_incompressibility", description="the JPEG size in kB at quality 95 (DDPO)")
def jpeg_incompressibility(quality: int = 95) -> JpegSize:
    return JpegSize(1.0, quality)
