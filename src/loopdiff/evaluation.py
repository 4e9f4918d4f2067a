"""Evaluation protocol (docs/method.md, "Evaluation protocol"): fixed seeds, N images per validation prompt,
per-prompt mean then mean over prompts, for every reward asked (the training reward and held-out evaluators)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping

import numpy as np
import torch
from tqdm.auto import tqdm

from loopdiff.prompts import PromptSet
from loopdiff.generation import generate, repeat_each
from loopdiff.rewards.base import RewardFn
from loopdiff.sampling.policy import DiffusionPolicy
from loopdiff.sampling.trajectories import PromptEncoder


@dataclass
class EvalResult:
    """Per-prompt mean scores for each reward, their means, and the images of the first prompts.

    A non-finite score (NaN or inf) is left out of its prompt's mean and counted in ``nonfinite``; a prompt
    with no finite score has a NaN mean, which :meth:`record` writes as ``null``."""

    per_prompt: dict[str, np.ndarray]
    prompts: list[str]
    grid_images: torch.Tensor = field(default_factory=lambda: torch.empty(0))  # (P_grid, n, 3, H, W)
    nonfinite: dict[str, int] = field(default_factory=dict)  # reward -> images whose score was not finite

    @property
    def means(self) -> dict[str, float]:
        """Mean over the prompts with a finite mean (NaN when there is none)."""
        return {name: float(values[np.isfinite(values)].mean()) if np.isfinite(values).any() else float("nan")
                for name, values in self.per_prompt.items()}

    def record(self) -> dict:
        """The JSON-ready evaluation: means, per-prompt means (``null`` where not finite), prompts and the
        counts of non-finite scores."""
        return {"means": {k: _finite_or_none(v) for k, v in self.means.items()},
                "per_prompt": {k: [_finite_or_none(x) for x in v.tolist()] for k, v in self.per_prompt.items()},
                "prompts": self.prompts, "nonfinite": {k: self.nonfinite.get(k, 0) for k in self.per_prompt}}

    def nonfinite_warning(self) -> str | None:
        """One line naming the rewards that gave non-finite scores, or None when every score was finite."""
        bad = {k: n for k, n in self.nonfinite.items() if n}
        if not bad:
            return None
        shown = ", ".join(f"{name}: {n}" for name, n in bad.items())
        return f"evaluation: non-finite scores left out of the means ({shown} images)"


def _finite_or_none(value: float) -> float | None:
    return float(value) if np.isfinite(value) else None


@torch.no_grad()
def evaluate(
    policy: DiffusionPolicy,
    encoder: PromptEncoder,
    vae: torch.nn.Module,
    prompt_set: PromptSet,
    rewards: Mapping[str, RewardFn],
    images_per_prompt: int = 10,
    seed: int = 1234,
    batch_size: int = 64,
    grid_prompts: int = 8,
    progress: bool = True,
) -> EvalResult:
    """Score ``images_per_prompt`` images for every prompt; the noise depends only on ``seed``."""
    generator = torch.Generator().manual_seed(seed)
    uncond = encoder.unconditional()
    prompts_per_chunk = max(1, batch_size // images_per_prompt)
    scores: dict[str, list[torch.Tensor]] = {name: [] for name in rewards}
    nonfinite = dict.fromkeys(rewards, 0)
    grid = []
    chunks = range(0, len(prompt_set), prompts_per_chunk)
    for start in tqdm(chunks, desc="evaluating", disable=not progress, leave=False):
        prompts = list(prompt_set.prompts[start : start + prompts_per_chunk])
        repeated = repeat_each(prompts, images_per_prompt)
        repeated_meta = repeat_each(prompt_set.metadata[start : start + prompts_per_chunk], images_per_prompt)
        made = generate(policy, vae, encoder(repeated), uncond, generator, repeated, repeated_meta, rewards,
                        batch_size=batch_size)
        images = made.images
        for name, values in made.scores.items():
            finite = torch.isfinite(values)
            nonfinite[name] += int((~finite).sum())
            values = torch.where(finite, values, torch.full_like(values, float("nan")))
            scores[name].append(values.view(len(prompts), images_per_prompt).nanmean(dim=1))
        keep = max(0, min(grid_prompts - start, len(prompts)))
        if keep:
            grid.append(images.view(len(prompts), images_per_prompt, *images.shape[1:])[:keep].cpu())
    return EvalResult(
        per_prompt={name: torch.cat(values).numpy() for name, values in scores.items()},
        prompts=list(prompt_set.prompts),
        grid_images=torch.cat(grid) if grid else torch.empty(0),
        nonfinite=nonfinite,
    )


def paired_change(before: np.ndarray, after: np.ndarray) -> tuple[float, float]:
    """Mean per-prompt change ``after - before`` and its standard error over prompts.

    Both evaluations use the same prompts and seeds, so the per-prompt differences are paired; their
    spread is what tells a gain from evaluation noise. Prompts without a finite mean in either (``None`` or NaN
    in an evaluation JSON) are left out; with one prompt left the standard error is ``nan``.
    """
    before, after = np.asarray(before, dtype=np.float64), np.asarray(after, dtype=np.float64)
    if before.shape != after.shape or before.ndim != 1 or before.size == 0:
        raise ValueError(f"need two equal-length 1-D per-prompt arrays, got {before.shape} and {after.shape}")
    diff = (after - before)[np.isfinite(after - before)]
    if diff.size == 0:
        return float("nan"), float("nan")
    se = float(diff.std(ddof=1) / np.sqrt(diff.size)) if diff.size > 1 else float("nan")
    return float(diff.mean()), se
