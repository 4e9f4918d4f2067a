"""At which sampling step is the reward decided? Branch trajectories and measure what is left to chance.

From a trajectory's latent after step ``b``, run the remaining steps ``B`` times with fresh noise and score
the final images: the variance of the reward across these branches is the part still open after step ``b``.
Where it reaches zero, the later steps' noise does not change the reward, so their log-probability terms
add noise but no signal to the policy gradient (``training.train_denoising_steps`` leaves them out).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from loopdiff.prompts import PromptSet
from loopdiff.generation import repeat_each
from loopdiff.rewards.base import RewardFn, as_scores
from loopdiff.sampling.policy import DiffusionPolicy
from loopdiff.sampling.trajectories import PromptEncoder, decode_latents, sample_trajectories


@torch.inference_mode()
def continue_from_step(
    policy: DiffusionPolicy,
    latents: torch.Tensor,
    step: int,
    prompt_embeds: torch.Tensor,
    uncond_embeds: torch.Tensor,
    generator: torch.Generator,
) -> torch.Tensor:
    """Run sampling steps ``step, ..., T - 1`` from ``latents`` (the latent before step ``step``); returns x_0."""
    x = latents
    for t in policy.timesteps[step:].to(latents.device):
        x = policy.step(x, t, prompt_embeds, uncond_embeds, generator=generator).prev_sample
    return x


@dataclass
class BranchVariance:
    """Mean over prompts of the reward variance across branches started after each step, and the mean reward."""

    steps: list[int]
    variance: list[float]
    mean: list[float]

    def remaining_fraction(self) -> list[float]:
        """Variance left after each step relative to the first one listed (step 0: the whole variance)."""
        total = self.variance[0]
        return [v / total if total > 0 else float("nan") for v in self.variance]


def reward_variance_by_step(
    policy: DiffusionPolicy,
    encoder: PromptEncoder,
    vae: torch.nn.Module,
    prompt_set: PromptSet,
    reward: RewardFn,
    steps: Sequence[int],
    branches: int = 4,
    seed: int = 0,
) -> BranchVariance:
    """One trajectory per prompt, then ``branches`` continuations from each of ``steps``; see the module doc."""
    prompts, metadata = list(prompt_set.prompts), list(prompt_set.metadata)
    if branches < 2:
        raise ValueError(f"branches={branches}: need at least 2 branches to measure a variance")
    num_steps = len(policy.timesteps)
    bad = [s for s in steps if not 0 <= s <= num_steps]
    if bad:
        raise ValueError(f"steps {bad} are outside 0..{num_steps} (the sampler has {num_steps} steps)")
    generator = torch.Generator().manual_seed(seed)
    embeds, uncond = encoder(prompts), encoder.unconditional()
    latents, _ = sample_trajectories(policy, embeds, uncond, generator)
    rows = torch.arange(len(prompts)).repeat_interleave(branches)
    repeated_embeds = embeds[rows.to(embeds.device)]  # text states, or SDXL's / SD3's PromptEmbeds
    repeated_prompts, repeated_meta = repeat_each(prompts, branches), repeat_each(metadata, branches)
    variance, mean = [], []
    for step in steps:
        start = latents[:, step].repeat_interleave(branches, dim=0)
        final = continue_from_step(policy, start, step, repeated_embeds, uncond, generator)
        images = decode_latents(vae, final)
        scores = as_scores(reward(images, repeated_prompts, repeated_meta), len(images), "reward")
        scores = scores.double().view(len(prompts), branches)
        variance.append(float(scores.var(dim=1, unbiased=True).mean()))
        mean.append(float(scores.mean()))
    return BranchVariance(list(steps), variance, mean)
