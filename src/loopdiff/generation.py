"""Sample -> decode -> score: the one way images are made from prompts, for training, evaluation,
``loopdiff sample`` and the diagnostics.

The sampler records each step's log-probability (the policy's Gaussian density, Eq. 4-5 of the LOOP paper),
the VAE decodes the last latents, and each reward scores the images (:func:`loopdiff.rewards.base.score_batch`
checks what a reward returns and names it when it fails).
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field
from typing import Any, Callable, ContextManager, Mapping, MutableMapping, Sequence

import torch

from loopdiff.rewards.base import RewardFn, score_batch
from loopdiff.sampling.policy import DiffusionPolicy
from loopdiff.sampling.embeds import Conditioning
from loopdiff.sampling.trajectories import decode_latents, sample_trajectories


@dataclass
class Generation:
    """What one call of :func:`generate` made: the trajectories, the decoded images and their scores."""

    latents: torch.Tensor  # (N, T + 1, C, H, W): x_T, ..., x_0
    log_probs: torch.Tensor  # (N, T): log pi(x_{t-1} | x_t, c) of each sampled step
    images: torch.Tensor  # (N, 3, H, W) in [0, 1]
    scores: dict[str, torch.Tensor] = field(default_factory=dict)  # reward name -> (N,) float32 on the CPU


def generate(
    policy: DiffusionPolicy,
    vae: torch.nn.Module,
    embeds: Conditioning,
    uncond: Conditioning,
    generator: torch.Generator,
    prompts: Sequence[str] = (),
    metadata: Sequence[Mapping[str, Any]] | None = None,
    rewards: Mapping[str, RewardFn] | None = None,
    batch_size: int = 64,
    autocast: Callable[[], ContextManager] = contextlib.nullcontext,
    timings: MutableMapping[str, float] | None = None,
    progress: bool = False,
) -> Generation:
    """Sample one trajectory per row of ``embeds``, decode its last latents and score the images with each of
    ``rewards`` (given the row's prompt and metadata).

    ``autocast`` wraps the sampling (a mixed-precision context, e.g. ``accelerator.autocast``); ``timings``, when
    given, accumulates the seconds spent in ``time/sampling`` and ``time/decoding``.
    """
    t0 = time.perf_counter()
    with autocast():
        latents, log_probs = sample_trajectories(policy, embeds, uncond, generator, batch_size=batch_size,
                                                 progress=progress)
    t1 = time.perf_counter()
    images = decode_latents(vae, latents[:, -1])
    if timings is not None:
        timings["time/sampling"] = timings.get("time/sampling", 0.0) + t1 - t0
        timings["time/decoding"] = timings.get("time/decoding", 0.0) + time.perf_counter() - t1
    metadata = list(metadata) if metadata is not None else [{} for _ in prompts]
    scores = {name: score_batch(reward, images, prompts, metadata, name) for name, reward in (rewards or {}).items()}
    return Generation(latents, log_probs, images, scores)


def repeat_each(items: Sequence[Any], times: int) -> list[Any]:
    """Each item ``times`` times in a row: the prompts of ``times`` samples per prompt."""
    return [item for item in items for _ in range(times)]
