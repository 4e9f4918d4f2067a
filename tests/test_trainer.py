"""Training end to end on a tiny pipeline: weights move, reward rises, resume is exact, exports load."""

from __future__ import annotations

import numpy as np
import torch

from trainer_helpers import make_trainer


def _weights(unet: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in unet.parameters()])


def test_one_epoch_changes_the_weights_and_logs(tmp_path) -> None:
    trainer = make_trainer(tmp_path, "loop")
    before = _weights(trainer.unet).clone()
    history = trainer.train()
    assert len(history) == 1
    assert (_weights(trainer.unet) - before).abs().max() > 0
    record = history[0]
    assert record["optimizer_steps"] == 4  # LOOP preset: 4 minibatches per batch of samples
    lines = (trainer.run_dir / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 1 and '"reward/mean"' in lines[0]


def test_rloo_raises_a_simple_reward(tmp_path) -> None:
    trainer = make_trainer(
        tmp_path, "rloo", training={"epochs": 16, "samples_per_epoch": 32, "learning_rate": 5e-4}
    )
    rewards = [h["reward/mean"] for h in trainer.train()]
    first, last = np.mean(rewards[:3]), np.mean(rewards[-3:])
    assert last > first + 1.0, rewards


def test_resume_continues_exactly(tmp_path) -> None:
    straight = make_trainer(tmp_path / "a", "ppo", training={"epochs": 3}, output={"checkpoint_every": 1})
    straight.train()
    first = make_trainer(tmp_path / "b", "ppo", training={"epochs": 2}, output={"checkpoint_every": 1})
    first.train()
    resumed = make_trainer(tmp_path / "b", "ppo", training={"epochs": 3}, output={"checkpoint_every": 1})
    assert resumed.resume() and resumed.epoch == 2
    assert resumed.tracker is not None and resumed.tracker.buffers == first.tracker.buffers
    resumed.config.output.resume = False  # already resumed above
    resumed.train()
    torch.testing.assert_close(_weights(resumed.unet), _weights(straight.unet), rtol=0, atol=0)
    a = [h["reward/mean"] for h in straight.history]
    b = [h["reward/mean"] for h in resumed.history]
    assert a == b
