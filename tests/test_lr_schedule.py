"""training.lr_scheduler: diffusers' schedules stepped once per epoch, continued exactly by a resumed run."""

from __future__ import annotations

import math

import pytest

from trainer_helpers import make_trainer

LR = 1e-3


def _cosine(n: int, warmup: int, total: int) -> float:
    """diffusers' cosine schedule with warm-up at step n of total, written out."""
    if n < warmup:
        return n / warmup
    return 0.5 * (1 + math.cos(math.pi * (n - warmup) / (total - warmup)))


def _train_recording_lrs(trainer, stop_after: int | None = None) -> list[float]:
    """The learning rate each epoch's optimiser steps used (the run stops after epoch ``stop_after``)."""
    used: list[float] = []
    optimise = trainer.loop.optimise

    def recording(batch, epoch):
        used.append(trainer.optimizer.param_groups[0]["lr"])
        return optimise(batch, epoch)

    trainer.loop.optimise = recording

    class Stop(Exception):
        pass

    def stop(epoch, metrics):
        if stop_after is not None and epoch > stop_after:
            raise Stop

    try:
        trainer.train(on_epoch_end=stop)
    except Stop:
        pass
    return used


def test_default_schedule_is_the_linear_warm_up_then_constant(tmp_path) -> None:
    trainer = make_trainer(tmp_path, "ppo", training={"epochs": 5, "warmup_epochs": 3, "learning_rate": LR})
    assert _train_recording_lrs(trainer) == pytest.approx([LR * min(1.0, n / 3) for n in range(1, 6)], rel=1e-12)


def test_cosine_schedule_follows_its_formula_and_a_resumed_run_continues_it(tmp_path) -> None:
    training = {"epochs": 5, "warmup_epochs": 2, "learning_rate": LR, "lr_scheduler": "cosine"}
    expected = [LR * _cosine(n, 2, 6) for n in range(1, 6)]
    straight = make_trainer(tmp_path / "a", "ppo", training=training)
    assert _train_recording_lrs(straight) == pytest.approx(expected, rel=1e-12)

    first = make_trainer(tmp_path / "b", "ppo", training=training, output={"checkpoint_every": 1})
    assert _train_recording_lrs(first, stop_after=2) == pytest.approx(expected[:3], rel=1e-12)
    resumed = make_trainer(tmp_path / "b", "ppo", training=training, output={"checkpoint_every": 1})
    assert resumed.resume() and resumed.epoch == 2
    assert _train_recording_lrs(resumed) == pytest.approx(expected[2:], rel=1e-12)


def test_linear_schedule_decays_without_reaching_zero_in_the_last_epoch(tmp_path) -> None:
    trainer = make_trainer(tmp_path, "ppo", training={"epochs": 4, "learning_rate": LR, "lr_scheduler": "linear"})
    assert _train_recording_lrs(trainer) == pytest.approx([LR * (5 - n) / 5 for n in range(1, 5)], rel=1e-12)
