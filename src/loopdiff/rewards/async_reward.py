"""Rewards computed in a worker thread, so the trainer can sample the next batch meanwhile.

>>> with AsyncReward(reward_fn) as rewards:
...     future = rewards.submit(images, prompts, metadata)
...     next_images = sample()            # runs while the reward model scores ``images``
...     scores = future.result()          # float32 CPU tensor (N,); re-raises the reward's error

Torch releases the GIL inside its kernels, so a reward model on another device (or on spare CPU
cores) overlaps with sampling. Results come back through their own futures, in submission order
when ``max_workers=1``.
"""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Mapping, Sequence

import torch

from loopdiff.rewards.base import RewardError, RewardFn, score_batch


class AsyncReward:
    """Run ``reward_fn`` on submitted batches in ``max_workers`` background threads."""

    def __init__(self, reward_fn: RewardFn, max_workers: int = 1, name: str = "reward"):
        if max_workers < 1:
            raise RewardError(f"AsyncReward: max_workers must be >= 1, got {max_workers}")
        self.reward_fn = reward_fn
        self.name = name
        self._pool = ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="reward")

    def submit(
        self, images: torch.Tensor, prompts: Sequence[str], metadata: Sequence[Mapping[str, Any]]
    ) -> Future:
        """Score a batch in the background; the future's result is a float32 CPU tensor ``(N,)``.

        The images are copied first, so the caller may reuse its buffer at once.
        """
        snapshot = images.detach().clone()
        prompts, metadata = list(prompts), [dict(m) for m in metadata]
        return self._pool.submit(self._score, snapshot, prompts, metadata)

    def _score(self, images: torch.Tensor, prompts: list[str], metadata: list[dict[str, Any]]) -> torch.Tensor:
        return score_batch(self.reward_fn, images, prompts, metadata, self.name)

    def close(self, wait: bool = True) -> None:
        """Stop accepting batches; with ``wait`` let the submitted ones finish."""
        self._pool.shutdown(wait=wait)

    def __enter__(self) -> "AsyncReward":
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()
