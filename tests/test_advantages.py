"""Advantages (docs/method.md, "Gradient estimators") against brute-force and hand computations."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from loopdiff.advantages import PerPromptStatTracker, clip_advantages, group_zscore, leave_one_out, raw
from loopdiff.estimators import PRESETS, estimator_from_preset


def _groups(k: int, n_prompts: int) -> torch.Tensor:
    return torch.arange(n_prompts).repeat_interleave(k)


@pytest.mark.parametrize("k", [2, 3, 4, 7])
def test_leave_one_out_matches_brute_force_and_identity(k: int) -> None:
    gen = torch.Generator().manual_seed(k)
    rewards = torch.rand(5 * k, generator=gen, dtype=torch.float64).float()
    groups = _groups(k, 5)[torch.randperm(5 * k, generator=gen)]  # groups need not be contiguous
    advantages = leave_one_out(rewards, groups)
    for i in range(len(rewards)):
        others = [rewards[j].item() for j in range(len(rewards)) if j != i and groups[j] == groups[i]]
        assert len(others) == k - 1
        assert advantages[i].item() == pytest.approx(rewards[i].item() - sum(others) / (k - 1), abs=1e-6)
        group_mean = rewards[groups == groups[i]].mean().item()
        assert advantages[i].item() == pytest.approx(k / (k - 1) * (rewards[i].item() - group_mean), abs=1e-6)


def test_leave_one_out_needs_two_samples() -> None:
    with pytest.raises(ValueError, match="K >= 2"):
        leave_one_out(torch.tensor([1.0, 2.0]), torch.tensor([0, 1]))


def test_group_zscore_by_hand() -> None:
    rewards = torch.tensor([1.0, 2.0, 4.0, 10.0, 10.0, 13.0])
    groups = torch.tensor([0, 0, 0, 1, 1, 1])
    a = group_zscore(rewards, groups, eps=0.0)
    mean0, std0 = 7 / 3, np.sqrt(((1 - 7 / 3) ** 2 + (2 - 7 / 3) ** 2 + (4 - 7 / 3) ** 2) / 2)
    assert a[0].item() == pytest.approx((1 - mean0) / std0, rel=1e-5)
    assert a[2].item() == pytest.approx((4 - mean0) / std0, rel=1e-5)
    assert a[5].item() == pytest.approx((13 - 11) / np.sqrt((1 + 1 + 4) / 2), rel=1e-5)


def test_stat_tracker_by_hand_with_eviction_and_min_count() -> None:
    tracker = PerPromptStatTracker(buffer_size=3, min_count=2, use_std=True, eps=0.0)
    # Batch 1: prompt "a" has one reward (< min_count) -> batch statistics; "b" has two -> own buffer.
    a1 = tracker.update(["a", "b", "b"], torch.tensor([1.0, 2.0, 4.0]))
    batch = np.array([1.0, 2.0, 4.0])
    assert a1[0].item() == pytest.approx((1 - batch.mean()) / batch.std(), rel=1e-6)
    assert a1[1].item() == pytest.approx((2 - 3) / 1.0, rel=1e-6)
    # Batch 2: "b" gets 6 and 8; buffer of 3 evicts the 2 -> [4, 6, 8].
    a2 = tracker.update(["b", "b", "a"], torch.tensor([6.0, 8.0, 3.0]))
    b_buffer = np.array([4.0, 6.0, 8.0])
    assert list(tracker.buffers["b"]) == [4.0, 6.0, 8.0]
    assert a2[0].item() == pytest.approx((6 - b_buffer.mean()) / b_buffer.std(), rel=1e-6)
    a_buffer = np.array([1.0, 3.0])  # now 2 rewards = min_count -> own statistics
    assert a2[2].item() == pytest.approx((3 - a_buffer.mean()) / a_buffer.std(), rel=1e-6)
    # State round trip.
    clone = PerPromptStatTracker(buffer_size=3, min_count=2, eps=0.0)
    clone.load_state_dict(tracker.state_dict())
    assert clone.update(["b"], torch.tensor([1.0])).item() == pytest.approx(
        tracker.update(["b"], torch.tensor([1.0])).item()
    )


def test_prompt_mean_baseline_without_std() -> None:
    tracker = estimator_from_preset("reinforce_bc", tracker_buffer_size=8, tracker_min_count=1).advantage_function()
    assert isinstance(tracker, PerPromptStatTracker) and not tracker.use_std
    advantages = tracker(torch.tensor([1.0, 3.0, 10.0]), torch.arange(3), ["x", "x", "y"])
    torch.testing.assert_close(advantages, torch.tensor([-1.0, 1.0, 0.0]))


def test_advantage_clip_and_unknown_kind() -> None:
    clipped = clip_advantages(raw(torch.tensor([-9.0, 0.5, 9.0]), torch.arange(3)), 5.0)
    torch.testing.assert_close(clipped, torch.tensor([-5.0, 0.5, 5.0]))
    with pytest.raises(ValueError, match="estimator.advantage='median'"):
        estimator_from_preset("loop", advantage="median")


def test_ppo_advantage_clip_is_switched_off_with_inf() -> None:
    from loopdiff.config import build_estimator, load_config

    estimator = build_estimator(load_config(None, ["estimator.preset=ppo", "estimator.advantage_clip=inf"]))
    assert PRESETS["ppo"].advantage_clip == 5.0 and estimator.advantage_clip == float("inf")
    values = torch.tensor([-40.0, 0.5, 40.0])
    torch.testing.assert_close(clip_advantages(values, estimator.advantage_clip), values)
