"""Advantages A from rewards r (docs/method.md, "Gradient estimators"). Each kind is one small function
over a batch.

- ``raw``            A = r                                       (REINFORCE, Eq. 7)
- ``prompt_mean``    A = r - mean of the prompt's recent rewards (REINFORCE w/ baseline, Eq. 8)
- ``leave_one_out``  A^i = r^i - 1/(K-1) sum_{j!=i} r^j           (RLOO Eq. 9, LOOP Eq. 14)
- ``group_zscore``   A^i = (r^i - mean_g) / (std_g + eps)          (GRPO)
- ``stat_tracker``   A = (r - mean_p) / (std_p + eps) over the prompt's recent rewards (DDPO)

The batch kinds are functions ``(rewards, group_ids) -> advantages`` (``BATCH_ADVANTAGES``): samples sharing
a group id are the K samples drawn for one prompt. The tracked kinds keep each prompt's recent rewards in a
:class:`PerPromptStatTracker` (``TRACKED_ADVANTAGES``). The training loop calls either through one signature,
an :class:`AdvantageFunction` ``(rewards, group_ids, prompts) -> advantages`` that may keep state across
epochs (``state_dict`` / ``load_state_dict``, saved with the checkpoints).
"""

from __future__ import annotations

from collections import deque
from typing import Any, Callable, Literal, Protocol, Sequence, get_args

import numpy as np
import torch

AdvantageKind = Literal["raw", "prompt_mean", "leave_one_out", "group_zscore", "stat_tracker"]
ADVANTAGE_KINDS: tuple[str, ...] = get_args(AdvantageKind)


def _group_sizes(group_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
    groups, inverse, counts = torch.unique(group_ids, return_inverse=True, return_counts=True)
    return inverse, counts, len(groups)


def group_sums(values: torch.Tensor, group_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample sum of its group's values and its group's size."""
    inverse, counts, n_groups = _group_sizes(group_ids)
    sums = torch.zeros(n_groups, dtype=values.dtype).index_add_(0, inverse, values)
    return sums[inverse], counts[inverse].to(values.dtype)


def finite_groups(rewards: torch.Tensor, group_ids: torch.Tensor) -> torch.Tensor:
    """Boolean mask of the samples whose whole group has finite rewards (a NaN or inf drops its group)."""
    bad_groups = group_ids[~torch.isfinite(rewards)].unique()
    return ~torch.isin(group_ids, bad_groups)


def raw(rewards: torch.Tensor, group_ids: torch.Tensor) -> torch.Tensor:
    """A = r (Eq. 7); ``group_ids`` is unused."""
    return rewards.clone()


def leave_one_out(rewards: torch.Tensor, group_ids: torch.Tensor) -> torch.Tensor:
    """A^i = r^i - b^i, b^i = (1 / (K - 1)) * sum_{j != i} r^j within each group (Eq. 14)."""
    sums, counts = group_sums(rewards, group_ids)
    if bool((counts < 2).any()):
        raise ValueError("leave-one-out baselines need K >= 2 samples per prompt (samples_per_prompt >= 2)")
    baseline = (sums - rewards) / (counts - 1)
    return rewards - baseline


def group_zscore(rewards: torch.Tensor, group_ids: torch.Tensor, eps: float = 1e-4) -> torch.Tensor:
    """A^i = (r^i - mean) / (std + eps) within each group; std is the unbiased sample std (GRPO)."""
    sums, counts = group_sums(rewards, group_ids)
    if bool((counts < 2).any()):
        raise ValueError("group z-scores need K >= 2 samples per prompt (samples_per_prompt >= 2)")
    mean = sums / counts
    sq, _ = group_sums((rewards - mean) ** 2, group_ids)
    std = (sq / (counts - 1)).sqrt()
    return (rewards - mean) / (std + eps)


class PerPromptStatTracker:
    """DDPO's per-prompt reward statistics: a buffer of each prompt's last ``buffer_size`` rewards.

    ``update`` appends the batch's rewards to each prompt's buffer, then normalises each reward by its
    prompt's buffer mean (and std when ``use_std``). A prompt with fewer than ``min_count`` buffered rewards
    is normalised by the whole batch's statistics instead.
    """

    def __init__(self, buffer_size: int = 32, min_count: int = 16, use_std: bool = True, eps: float = 1e-6):
        if buffer_size < 1 or min_count < 1:
            raise ValueError(f"buffer_size ({buffer_size}) and min_count ({min_count}) must be >= 1")
        self.buffer_size, self.min_count, self.use_std, self.eps = buffer_size, min_count, use_std, eps
        self.buffers: dict[str, deque[float]] = {}

    def __call__(self, rewards: torch.Tensor, group_ids: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        """The advantages of one epoch's rewards (an :class:`AdvantageFunction`; ``group_ids`` is unused)."""
        return self.update(prompts, rewards)

    def update(self, prompts: Sequence[str], rewards: torch.Tensor) -> torch.Tensor:
        """Append ``rewards`` to their prompts' buffers, then normalise each by its prompt's statistics."""
        values = rewards.double().numpy()
        advantages = np.empty_like(values)
        batch_mean, batch_std = values.mean(), values.std()
        for prompt in dict.fromkeys(prompts):
            mask = np.array([p == prompt for p in prompts])
            buffer = self.buffers.setdefault(prompt, deque(maxlen=self.buffer_size))
            buffer.extend(values[mask].tolist())
            if len(buffer) < self.min_count:
                mean, std = batch_mean, batch_std
            else:
                mean, std = float(np.mean(buffer)), float(np.std(buffer))
            advantages[mask] = values[mask] - mean
            if self.use_std:
                advantages[mask] /= std + self.eps
        return torch.from_numpy(advantages).to(rewards.dtype)

    def state_dict(self) -> dict[str, Any]:
        return {"buffers": {p: list(b) for p, b in self.buffers.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.buffers = {p: deque(v, maxlen=self.buffer_size) for p, v in state["buffers"].items()}


AdvantageFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (rewards, group_ids) -> advantages
BATCH_ADVANTAGES: dict[str, AdvantageFn] = {"raw": raw, "leave_one_out": leave_one_out, "group_zscore": group_zscore}
TRACKED_ADVANTAGES: dict[str, bool] = {"prompt_mean": False, "stat_tracker": True}  # kind -> divide by the std


class AdvantageFunction(Protocol):
    """``(rewards, group_ids, prompts) -> advantages`` over one epoch's samples, with its state (if any)."""

    def __call__(self, rewards: torch.Tensor, group_ids: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor: ...

    def state_dict(self) -> dict[str, Any] | None: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


class GroupAdvantage:
    """A batch kind as an :class:`AdvantageFunction`: the advantages depend on this epoch's groups only, so it
    keeps no state (``prompts`` is unused)."""

    def __init__(self, fn: AdvantageFn):
        self.fn = fn

    def __call__(self, rewards: torch.Tensor, group_ids: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        return self.fn(rewards, group_ids)

    def state_dict(self) -> None:
        return None

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


def clip_advantages(advantages: torch.Tensor, clip: float | None) -> torch.Tensor:
    """Advantages clipped to [-clip, clip] (DDPO clips at 5); unchanged when ``clip`` is None."""
    return advantages if clip is None else advantages.clamp(-clip, clip)
