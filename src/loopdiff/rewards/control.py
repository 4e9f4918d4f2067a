"""A control reward: uniform noise that carries no information about the image or the prompt.

Training against it shows how far the optimiser's noise alone moves an evaluation score (reward-independent
drift). A change from a real reward is only evidence of learning if it stands out from this control's.
The value of each image is a hash of its 8-bit pixels and a seed, so it is reproducible, needs no state,
and a resumed run sees the same rewards.
"""

from __future__ import annotations

import hashlib
from typing import Any, Mapping, Sequence

import numpy as np
import torch

from loopdiff.rewards.base import register_reward


_BELOW_ONE = 1.0 - 2.0**-24  # the largest float32 below 1: rounding must not reach 1.0


def hashed_uniform(images: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """One number in [0, 1) per image of ``(N, 3, H, W)`` in [0, 1], from a hash of its 8-bit pixels."""
    pixels = (images.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).cpu().numpy()
    values = []
    for image in pixels:
        digest = hashlib.blake2b(np.ascontiguousarray(image).tobytes(), digest_size=8, key=str(seed).encode())
        values.append(min(int.from_bytes(digest.digest(), "little") / 2**64, _BELOW_ONE))
    return torch.tensor(values, dtype=torch.float32)


class RandomControl:
    """Uniform [0, 1) reward from :func:`hashed_uniform`; ignores prompts and metadata."""

    def __init__(self, seed: int = 0):
        self.seed = seed

    def __call__(
        self, images: torch.Tensor, prompts: Sequence[str], metadata: Sequence[Mapping[str, Any]]
    ) -> torch.Tensor:
        return hashed_uniform(images, self.seed)


@register_reward("random_control", description="control: uniform noise from a hash of the pixels (drift baseline)")
def random_control(seed: int = 0) -> RandomControl:
    return RandomControl(seed)
