"""Category dispatch and weighted sums of rewards."""

from __future__ import annotations

import pytest
import torch

from loopdiff.rewards.base import RewardError, WeightedSum, build_reward
from loopdiff.rewards.compbench_by_category import CategoryDispatch
from loopdiff.rewards.jpeg import jpeg_size_kb


def test_dispatch_routes_each_image_to_its_category_reward() -> None:
    built: list[str] = []

    def build(name: str):
        built.append(name)
        offset = {"a": 100.0, "b": 200.0}[name]
        return lambda images, prompts, metadata: offset + images.mean(dim=(1, 2, 3))

    reward = CategoryDispatch({"color": "a", "shape": "a", "spatial": "b"}, build, "test")
    images = torch.rand(4, 3, 8, 8)
    meta = [{"category": c} for c in ("spatial", "color", "shape", "spatial")]
    scores = reward(images, ["p"] * 4, meta)
    means = images.mean(dim=(1, 2, 3))
    torch.testing.assert_close(scores, torch.tensor([200.0, 100.0, 100.0, 200.0]) + means)
    assert built == ["b", "a"]  # each scorer built once, on first use
    with pytest.raises(RewardError, match="no scorer for category 'numeracy'"):
        reward(images[:1], ["p"], [{"category": "numeracy"}])


def test_weighted_sum_by_hand() -> None:
    reward = build_reward("jpeg_compressibility:0.5,jpeg_incompressibility:2")
    assert isinstance(reward, WeightedSum)
    images = torch.rand(3, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    sizes = jpeg_size_kb(images)
    torch.testing.assert_close(reward(images, ["a"] * 3, [{}] * 3), -0.5 * sizes + 2 * sizes)
    with pytest.raises(RewardError, match="weight 'x' of 'jpeg_compressibility' is not a number"):
        build_reward("jpeg_compressibility:x")
