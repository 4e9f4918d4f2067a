"""Which (sample, step) pairs enter the objective: timestep_fraction and the first-steps window."""

from __future__ import annotations

import pytest
import torch

from loopdiff.minibatches import shuffled_pairs, split_minibatches, steps_per_sample
from trainer_helpers import make_trainer


def _steps_by_sample(pairs: torch.Tensor, n_samples: int) -> list[list[int]]:
    steps: list[list[int]] = [[] for _ in range(n_samples)]
    for sample, step in pairs.tolist():
        steps[sample].append(step)
    return steps


def test_every_step_of_every_sample_once_by_default() -> None:
    pairs = shuffled_pairs(5, 6, 1.0, torch.Generator().manual_seed(0))
    assert [sorted(s) for s in _steps_by_sample(pairs, 5)] == [list(range(6))] * 5


@pytest.mark.parametrize(("train_denoising_steps", "fraction", "expected_per_sample"), [(4, 1.0, 4), (4, 0.5, 2), (9, 1.0, 6)])
def test_train_denoising_steps_keeps_only_the_noisiest_steps(train_denoising_steps: int, fraction: float, expected_per_sample: int) -> None:
    pairs = shuffled_pairs(7, 6, fraction, torch.Generator().manual_seed(1), train_denoising_steps=train_denoising_steps)
    assert len(pairs) == 7 * expected_per_sample == 7 * steps_per_sample(6, fraction, train_denoising_steps)
    window = min(train_denoising_steps, 6)
    for steps in _steps_by_sample(pairs, 7):
        assert len(steps) == len(set(steps)) == expected_per_sample  # distinct steps, none repeated
        assert all(0 <= s < window for s in steps)


def test_fraction_within_the_window_draws_different_steps_per_sample() -> None:
    pairs = shuffled_pairs(40, 20, 0.5, torch.Generator().manual_seed(2), train_denoising_steps=10)
    subsets = {tuple(sorted(s)) for s in _steps_by_sample(pairs, 40)}
    assert len(subsets) > 30  # random subsets, not one fixed half
    counts = torch.bincount(pairs[:, 1], minlength=20)
    assert counts[10:].sum() == 0 and counts[:10].min() > 0


def test_minibatches_partition_the_pairs() -> None:
    pairs = shuffled_pairs(8, 5, 1.0, torch.Generator().manual_seed(3), train_denoising_steps=3)
    chunks = split_minibatches(pairs, 4, 5)
    flat = torch.cat([micro for minibatch in chunks for micro in minibatch])
    assert len(chunks) == 4 and all(len(m) <= 5 for minibatch in chunks for m in minibatch)
    assert torch.equal(flat, pairs)


def test_trainer_only_differentiates_the_train_denoising_steps(tmp_path) -> None:
    trainer = make_trainer(tmp_path, "loop", training={"train_denoising_steps": 2})
    seen: list[torch.Tensor] = []
    original = trainer.loop.minibatch_loss

    def recording(batch, micro):
        seen.append(micro.clone())
        return original(batch, micro)

    trainer.loop.minibatch_loss = recording
    trainer.run_epoch(1)
    pairs = torch.cat(seen)
    assert len(pairs) == 8 * 2  # 8 samples x the first 2 of the 3 sampling steps
    assert set(pairs[:, 1].tolist()) == {0, 1}
    assert sorted(pairs[:, 0].tolist()) == sorted(list(range(8)) * 2)
