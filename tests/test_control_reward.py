"""The random control reward: reproducible, uniform, and independent of what the image shows."""

from __future__ import annotations

import hashlib

import numpy as np
import torch

from loopdiff.rewards.base import build_reward, registered_rewards
from loopdiff.rewards.control import hashed_uniform


def test_value_is_the_keyed_hash_of_the_8bit_pixels() -> None:
    images = torch.rand(3, 3, 5, 5, generator=torch.Generator().manual_seed(0))
    pixels = (images * 255).round().to(torch.uint8).numpy()
    expected = [
        int.from_bytes(hashlib.blake2b(p.tobytes(), digest_size=8, key=b"7").digest(), "little") / 2**64
        for p in pixels
    ]
    torch.testing.assert_close(hashed_uniform(images, seed=7), torch.tensor(expected, dtype=torch.float32))


def test_values_that_would_round_to_one_stay_below_it(monkeypatch) -> None:
    import loopdiff.rewards.control as control

    class TopDigest:
        def __init__(self, *args, **kwargs):
            pass

        def digest(self) -> bytes:
            return b"\xff" * 8  # (2**64 - 1) / 2**64 rounds to 1.0 in float32

    monkeypatch.setattr(control.hashlib, "blake2b", TopDigest)
    value = float(hashed_uniform(torch.zeros(1, 3, 2, 2))[0])
    assert value < 1.0 and value == 1.0 - 2.0**-24


def test_reproducible_per_image_and_changed_by_the_seed() -> None:
    reward = build_reward("random_control")
    images = torch.rand(6, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    first = reward(images, ["a red circle"] * 6, [{}] * 6)
    again = reward(images.flip(0), ["something else"] * 6, [{}] * 6)  # order and prompts do not matter
    torch.testing.assert_close(again, first.flip(0), rtol=0, atol=0)
    other_seed = build_reward("random_control", {"random_control": {"seed": 1}})(images, [""] * 6, [{}] * 6)
    assert not torch.equal(other_seed, first)
    assert "random_control" in registered_rewards()


def test_uniform_and_uncorrelated_with_image_content() -> None:
    generator = torch.Generator().manual_seed(2)
    redness = torch.rand(4000, generator=generator)
    images = torch.rand(4000, 3, 4, 4, generator=generator) * 0.2
    images[:, 0] += redness[:, None, None] * 0.8  # content that a real reward could see
    values = hashed_uniform(images).numpy()
    assert values.min() >= 0 and values.max() < 1
    counts, _ = np.histogram(values, bins=10, range=(0, 1))
    chi2 = float(((counts - 400) ** 2 / 400).sum())
    assert chi2 < 27.9  # chi-square with 9 degrees of freedom, p = 0.001
    assert abs(np.corrcoef(values, redness.numpy())[0, 1]) < 0.06  # ~3.8 standard errors at n = 4000
