"""The embedded world's aesthetic task: colourfulness, judged twice.

The LOOP paper's aesthetic task (its Table 3, after DDPO) rewards images with the LAION aesthetic
predictor, a small learned head. The miniature has the same pair of parts:

- ``embedded_colorfulness`` (held-out evaluator): Hasler and Suesstrunk's colourfulness metric
  ("Measuring colourfulness in natural images", 2003), a standard feature of image-aesthetics
  models, computed from the pixels. With ``rg = R - G`` and ``yb = (R + G) / 2 - B`` over the image,
  ``M = sqrt(std(rg)^2 + std(yb)^2) + 0.3 sqrt(mean(rg)^2 + mean(yb)^2)`` on the 0-255 scale; the
  score is ``M / 100``. Grey scores 0; Hasler and Suesstrunk call ``M`` of 59 "quite", 82 "highly"
  and 109 "extremely colourful".
- ``embedded_aesthetic`` (training reward): a learned preference scorer (:class:`AestheticScorer`)
  trained on noisy pairwise preferences (Bradley-Terry), as ImageReward and PickScore are, and
  calibrated to the evaluator's scale on the base model's images. It shares no code with the
  evaluator; it only saw that metric through sampled preferences.

On this world colourfulness grows with the area the objects cover and with plain, saturated
surfaces (a texture's dark tone halves the colour of the pixels it covers), so the base model's
random choice of size and texture for prompts that do not name them is what RL can improve on
every prompt at once.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch

from loopdiff.embedded.scorers import cached_scorer, missing_scorer_files, prepare_images
from loopdiff.rewards.base import register_reward

COLORFULNESS_SCALE = 100.0  # score = M / 100


def colorfulness(pixels: np.ndarray | torch.Tensor) -> np.ndarray:
    """Hasler-Suesstrunk colourfulness ``M`` of ``(N, H, W, 3)`` images on the 0-255 scale."""
    x = torch.as_tensor(pixels).double()
    if x.ndim != 4 or x.shape[-1] != 3:
        raise ValueError(f"colorfulness expects (N, H, W, 3) images, got shape {tuple(x.shape)}")
    r, g, b = x[..., 0], x[..., 1], x[..., 2]
    rg = (r - g).flatten(1)
    yb = (0.5 * (r + g) - b).flatten(1)
    spread = torch.sqrt(rg.var(dim=1, unbiased=False) + yb.var(dim=1, unbiased=False))
    offset = torch.sqrt(rg.mean(dim=1) ** 2 + yb.mean(dim=1) ** 2)
    return (spread + 0.3 * offset).numpy()


def images_to_pixels(images: torch.Tensor) -> torch.Tensor:
    """``(N, 3, H, W)`` in [0, 1] -> ``(N, H, W, 3)`` on the 0-255 scale, rounded as a PNG would be."""
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"expected images of shape (N, 3, H, W), got {tuple(images.shape)}")
    return (images.detach().float().cpu().clamp(0, 1) * 255).round().permute(0, 2, 3, 1)


def colorfulness_score(images: torch.Tensor) -> torch.Tensor:
    """The evaluator's score ``M / 100`` of ``(N, 3, H, W)`` images in [0, 1], float32 ``(N,)``."""
    return torch.from_numpy(colorfulness(images_to_pixels(images)) / COLORFULNESS_SCALE).float()


class ColorfulnessEvaluator:
    """Held-out aesthetic score: colourfulness ``M / 100`` of each image (prompts are not used)."""

    def __call__(
        self, images: torch.Tensor, prompts: Sequence[str], metadata: Sequence[Mapping[str, Any]]
    ) -> torch.Tensor:
        return colorfulness_score(images)


class LearnedAesthetic:
    """The learned preference scorer's calibrated score of each image (prompts are not used)."""

    def __init__(self, directory: str | Path | None = None, device: torch.device | str = "cpu", batch_size: int = 128):
        self.model, config = cached_scorer("aesthetic", directory, device)
        self.scale, self.shift = config["calibration"]["scale"], config["calibration"]["shift"]
        self.device = torch.device(device)
        self.batch_size = batch_size

    @torch.no_grad()
    def __call__(
        self, images: torch.Tensor, prompts: Sequence[str], metadata: Sequence[Mapping[str, Any]]
    ) -> torch.Tensor:
        images = prepare_images(images, self.device)
        logits = torch.cat([self.model(chunk) for chunk in images.split(self.batch_size)])
        return (logits.float().cpu() * self.scale + self.shift).float()


@register_reward(
    "embedded_colorfulness",
    description="held-out aesthetic evaluator of the embedded world: Hasler-Suesstrunk colourfulness / 100",
)
def embedded_colorfulness() -> ColorfulnessEvaluator:
    return ColorfulnessEvaluator()


@register_reward(
    "embedded_aesthetic",
    description="learned aesthetic preference scorer of the embedded world (Bradley-Terry, LAION-aesthetic-shaped)",
    needs="assets/scorers/aesthetic.safetensors (shipped)",
    check=missing_scorer_files("aesthetic"),
)
def embedded_aesthetic(directory: str | None = None, device: str = "cpu", batch_size: int = 128) -> LearnedAesthetic:
    return LearnedAesthetic(directory, device, batch_size)
