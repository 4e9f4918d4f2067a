"""Which (sample, step) pairs each optimiser step trains on.

Per inner epoch, every sample contributes ``round(T * timestep_fraction)`` of its steps (a random subset,
as DDPO's ``timestep_fraction``); the pairs are shuffled and split into ``minibatches`` optimiser steps, each
processed as micro-batches of at most ``micro_batch_size`` pairs (one UNet call each, gradients accumulated).
"""

from __future__ import annotations

import torch


def steps_per_sample(num_steps: int, timestep_fraction: float) -> int:
    return max(1, int(round(num_steps * timestep_fraction)))


def shuffled_pairs(
    n_samples: int, n_steps: int, timestep_fraction: float, generator: torch.Generator
) -> torch.Tensor:
    """(P, 2) tensor of (sample index, step index) pairs in random order."""
    keep = steps_per_sample(n_steps, timestep_fraction)
    steps = torch.stack([torch.randperm(n_steps, generator=generator)[:keep] for _ in range(n_samples)])
    samples = torch.arange(n_samples)[:, None].expand(-1, keep)
    pairs = torch.stack([samples.reshape(-1), steps.reshape(-1)], dim=1)
    return pairs[torch.randperm(len(pairs), generator=generator)]


def split_minibatches(pairs: torch.Tensor, minibatches: int, micro_batch_size: int) -> list[list[torch.Tensor]]:
    """Split pairs into ``minibatches`` near-equal optimiser steps, each a list of micro-batches."""
    result = []
    for chunk in torch.tensor_split(pairs, minibatches):
        result.append(list(torch.split(chunk, micro_batch_size)))
    return result
