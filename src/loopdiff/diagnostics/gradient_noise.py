"""How much of a policy gradient is signal? Per-prompt-group gradients, their mean and their spread.

For G prompt groups of K samples, group j's on-policy LOOP/RLOO gradient is
``g_j = grad sum_{i in j} sum_t A_i log pi(x_{t-1} | x_t, c)`` (leave-one-out advantages, Eq. 14). With
``N = tr(Cov g_j) / G``, ``|mean g|^2 - N`` estimates the squared norm of the true gradient: the signal.
``tr(Cov g_j) / signal^2`` is how many groups one optimiser step needs before its signal matches its noise.
Groups are processed one at a time and only running sums are kept, so memory stays at two copies of the
gradient.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Sequence

import torch

from loopdiff.advantages import leave_one_out
from loopdiff.prompts import PromptSet
from loopdiff.generation import generate, repeat_each
from loopdiff.rewards.base import RewardFn
from loopdiff.sampling.policy import DiffusionPolicy
from loopdiff.sampling.trajectories import PromptEncoder
from loopdiff.minibatches import trained_steps


@dataclass
class GradientNoise:
    """``mean_sq = |mean g|^2`` and ``noise = tr(Cov g_j) / groups`` over ``groups`` prompt groups."""

    groups: int
    mean_sq: float
    noise: float
    by_module: dict[str, "GradientNoise"] = field(default_factory=dict)  # the same split by ``module_kind``

    @property
    def signal_sq(self) -> float:
        """Unbiased estimate of the true gradient's squared norm (negative when noise hides it)."""
        return self.mean_sq - self.noise

    @property
    def groups_for_snr_one(self) -> float:
        """Groups per step for signal^2 = noise; ``inf`` when no signal is measurable."""
        return self.noise * self.groups / self.signal_sq if self.signal_sq > 0 else math.inf


def drawn_prompts(prompts: PromptSet, groups: int, seed: int) -> PromptSet:
    """``groups`` prompts in a seeded random order, without repetition (cycling when there are fewer)."""
    order = torch.randperm(len(prompts), generator=torch.Generator().manual_seed(seed)).tolist()
    rows = [order[i % len(order)] for i in range(groups)]
    return PromptSet(tuple(prompts.prompts[i] for i in rows), tuple(prompts.metadata[i] for i in rows))


def module_kind(name: str) -> str:
    """Coarse kind of a UNet, SD3 or Flux transformer parameter, from its name: where in the network the
    gradient lands. An SD3 or Flux transformer's joint blocks (``transformer_blocks.N``) have one attention over
    image and text tokens, whose text-side projections are ``add_*_proj`` and ``to_add_out``; Flux's
    single-stream blocks (``single_transformer_blocks.N``) run one attention and an MLP over the concatenated
    tokens, side by side (``proj_mlp``; ``proj_out`` reads both)."""
    if name.startswith("single_transformer_blocks."):
        if ".attn." in name:
            return "single-stream attention"
        return "single-stream MLP" if ".proj_mlp." in name or ".proj_out." in name else "other"
    if name.startswith("transformer_blocks."):
        if ".attn.add_" in name or ".attn.to_add_out" in name:
            return "joint attention, text"
        if ".attn." in name or ".attn2." in name:  # attn2: SD3.5's extra image self-attention
            return "joint attention, image"
        return "feed-forward" if ".ff." in name or ".ff_context." in name else "other"
    if ".attn2.to_k" in name or ".attn2.to_v" in name:
        return "cross-attention K/V"
    if ".attn2." in name:
        return "cross-attention Q/out"
    if ".attn1." in name:
        return "self-attention"
    if ".resnets." in name:
        return "resnets"
    return "other"


def _summary(groups: int, total: torch.Tensor, sum_sq: float) -> GradientNoise:
    mean_sq = float((total / groups).pow(2).sum())
    trace_cov = (sum_sq - groups * mean_sq) / (groups - 1)
    return GradientNoise(groups, mean_sq, trace_cov / groups)


def group_gradient(
    policy: DiffusionPolicy,
    params: Sequence[torch.nn.Parameter],
    latents: torch.Tensor,
    prompt_embeds: torch.Tensor,
    uncond_embeds: torch.Tensor,
    advantages: torch.Tensor,
    steps: Sequence[int],
) -> torch.Tensor:
    """Flat gradient of ``sum_i sum_{t in steps} A_i log pi_t`` for one group's trajectories ``(K, T+1, ...)``."""
    for p in params:
        p.grad = None
    timesteps = policy.timesteps.to(latents.device)
    for s in steps:
        log_prob = policy.log_prob(latents[:, s], latents[:, s + 1], timesteps[s], prompt_embeds, uncond_embeds)
        (advantages.to(log_prob.dtype) * log_prob).sum().backward()
    flat = [p.grad.flatten() if p.grad is not None else torch.zeros_like(p).flatten() for p in params]
    return torch.cat(flat).detach().double()


def measure_gradient_noise(
    policy: DiffusionPolicy,
    encoder: PromptEncoder,
    vae: torch.nn.Module,
    prompt_set: PromptSet,
    reward: RewardFn,
    samples_per_prompt: int = 4,
    train_denoising_steps: int | None = None,
    seed: int = 0,
) -> GradientNoise:
    """One group of ``samples_per_prompt`` trajectories per prompt of ``prompt_set``; see the module doc."""
    prompts, metadata = prompt_set.prompts, prompt_set.metadata
    k, groups = samples_per_prompt, len(prompts)
    if k < 2 or groups < 2:
        raise ValueError(f"need samples_per_prompt >= 2 and >= 2 prompts, got {k} and {groups}")
    repeated, repeated_meta = repeat_each(prompts, k), repeat_each(metadata, k)
    embeds, uncond = encoder(repeated), encoder.unconditional()
    made = generate(policy, vae, embeds, uncond, torch.Generator().manual_seed(seed), repeated, repeated_meta,
                    {"reward": reward})
    latents, rewards = made.latents, made.scores["reward"]
    advantages = leave_one_out(rewards, torch.arange(groups).repeat_interleave(k))
    steps = range(trained_steps(latents.shape[1] - 1, train_denoising_steps))
    named = [(n, p) for n, p in policy.unet.named_parameters() if p.requires_grad]
    params = [p for _, p in named]
    kinds = sorted({module_kind(n) for n, _ in named})
    coordinate_kind = torch.cat([torch.full((p.numel(),), kinds.index(module_kind(n))) for n, p in named])
    total, sum_sq = None, torch.zeros(len(kinds), dtype=torch.float64)
    for j in range(groups):
        rows = slice(j * k, (j + 1) * k)
        g = group_gradient(policy, params, latents[rows], embeds[rows], uncond, advantages[rows], steps)
        total = g if total is None else total + g
        sum_sq.index_add_(0, coordinate_kind, g.pow(2))
    for p in params:
        p.grad = None
    parts = {kind: _summary(groups, total[coordinate_kind == i], float(sum_sq[i])) for i, kind in enumerate(kinds)}
    return replace(_summary(groups, total, float(sum_sq.sum())), by_module=parts)
