"""Which (sample, step) pairs each optimiser step trains on.

Per inner epoch, every sample contributes ``round(T' * timestep_fraction)`` of its steps (a random subset,
as DDPO's ``timestep_fraction``), where ``T'`` is the number of trained steps: all ``T`` sampling steps, or
only the first (noisiest) ``train_denoising_steps`` of them. The pairs are shuffled and split into ``minibatches``
optimiser steps, each
processed as micro-batches of at most ``micro_batch_size`` pairs (one UNet call each, gradients accumulated).
"""

from __future__ import annotations

import torch


def trained_steps(num_steps: int, train_denoising_steps: int | None = None) -> int:
    """How many of the ``num_steps`` sampling steps enter the objective: the first ``train_denoising_steps``,
    or all."""
    return num_steps if train_denoising_steps is None else min(num_steps, train_denoising_steps)


def steps_per_sample(num_steps: int, timestep_fraction: float, train_denoising_steps: int | None = None) -> int:
    return max(1, int(round(trained_steps(num_steps, train_denoising_steps) * timestep_fraction)))


def shuffled_pairs(
    n_samples: int,
    n_steps: int,
    timestep_fraction: float,
    generator: torch.Generator,
    train_denoising_steps: int | None = None,
) -> torch.Tensor:
    """(P, 2) tensor of (sample index, step index) pairs in random order; steps index from the noisiest."""
    candidates = trained_steps(n_steps, train_denoising_steps)
    keep = steps_per_sample(n_steps, timestep_fraction, train_denoising_steps)
    steps = torch.stack([torch.randperm(candidates, generator=generator)[:keep] for _ in range(n_samples)])
    samples = torch.arange(n_samples)[:, None].expand(-1, keep)
    pairs = torch.stack([samples.reshape(-1), steps.reshape(-1)], dim=1)
    return pairs[torch.randperm(len(pairs), generator=generator)]


def split_minibatches(pairs: torch.Tensor, minibatches: int, micro_batch_size: int) -> list[list[torch.Tensor]]:
    """Split pairs into ``minibatches`` near-equal optimiser steps, each a list of micro-batches."""
    result = []
    for chunk in torch.tensor_split(pairs, minibatches):
        result.append(list(torch.split(chunk, micro_batch_size)))
    return result
