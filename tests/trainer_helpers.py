"""Building small trainers on the tiny pipeline, or on a saved pipeline folder, for the training tests."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from tiny_pipelines import build_tiny_pipeline
from loopdiff.config import config_from_dict
from loopdiff.estimators import PRESETS
from loopdiff.training.trainer import Trainer

PROMPTS = ["a red circle", "a blue square", "a green star", "a big cat", "a small dog", "a yellow triangle"]


def red_minus_blue(images: torch.Tensor, prompts, metadata) -> torch.Tensor:
    """A simple reward with a clear direction: red minus blue intensity, in percent."""
    return 100 * (images[:, 0].mean(dim=(1, 2)) - images[:, 2].mean(dim=(1, 2)))


def make_trainer(
    tmp_path: Path, preset: str, seed: int = 0, reward=red_minus_blue, reward_section: dict | None = None, **sections: Any
) -> Trainer:
    """A trainer on the tiny pipeline; ``sections`` update config sections (``reward_section`` the reward's)."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    prompt_file = tmp_path / "prompts.txt"
    prompt_file.write_text("\n".join(PROMPTS) + "\n")
    values: dict[str, Any] = {
        "model": {"device": "cpu"},
        "sampling": {"num_steps": 3, "batch_size": 8},
        "estimator": {"preset": preset},
        "training": {"epochs": 1, "samples_per_epoch": 8, "learning_rate": 1e-3, "micro_batch_size": 64,
                     "seed": seed},
        "prompts": {"train": str(prompt_file), "val": str(prompt_file)},
        "eval": {"images_per_prompt": 2, "max_prompts": 0},
        "reward": {"name": "jpeg_compressibility", "asynchronous": False},
        "output": {"dir": str(tmp_path / f"run-{preset}"), "progress": False, "tensorboard": False},
    }
    values["reward"].update(reward_section or {})
    for section, changes in sections.items():
        values.setdefault(section, {}).update(changes)
    return Trainer(config_from_dict(values), reward_fn=reward, pipeline=build_tiny_pipeline(seed=0))


def folder_trainer(tmp_path: Path, folder: Path, reward, defaults: dict[str, dict] | None = None,
                   **sections: Any) -> Trainer:
    """A trainer on the pipeline folder ``folder`` (loaded through load_pipeline) and PROMPTS: LOOP with clip range
    1e-2, 2 epochs of 32 trajectories of 4 steps, learning rate 1e-2; ``defaults`` (a family's own settings) and
    then ``sections`` update the config's sections."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    prompt_file = tmp_path / "prompts.txt"
    prompt_file.write_text("\n".join(PROMPTS) + "\n")
    values: dict[str, Any] = {
        "model": {"device": "cpu", "pretrained": str(folder)},
        "sampling": {"num_steps": 4, "batch_size": 16},
        "estimator": {"preset": "loop", "clip_range": 1e-2},
        "training": {"epochs": 2, "samples_per_epoch": 32, "learning_rate": 1e-2, "micro_batch_size": 64, "seed": 0},
        "prompts": {"train": str(prompt_file), "val": str(prompt_file)},
        "eval": {"images_per_prompt": 2, "max_prompts": 0},
        "reward": {"name": "jpeg_compressibility", "asynchronous": False},
        "output": {"dir": str(tmp_path / "run"), "progress": False, "tensorboard": False},
    }
    for changes in (defaults or {}, sections):
        for section, fields in changes.items():
            values.setdefault(section, {}).update(fields)
    return Trainer(config_from_dict(values), reward_fn=reward)


def check_one_epoch_of_preset(trainer: Trainer, preset: str) -> None:
    """Train ``trainer`` (configured with ``preset``) for its one epoch: the preset's optimiser steps, none skipped,
    a finite loss and a gradient, weights that moved, and a KL penalty exactly when the preset has one."""
    estimator = PRESETS[preset]
    assert (trainer.reference is not None) == (estimator.kl_coef > 0)
    before = {k: v.clone() for k, v in trainer.unet.state_dict().items()}
    record = trainer.train()[0]
    assert record["optimizer_steps"] == estimator.inner_epochs * estimator.minibatches
    assert record["skipped_steps"] == 0 and np.isfinite(record["loss"]) and record["grad_norm"] > 0
    assert any(not torch.equal(v, before[k]) for k, v in trainer.unet.state_dict().items())
    if estimator.kl_coef > 0:
        assert record["kl_penalty"] > 0  # the reference (a frozen copy) is a different policy after the steps


def gains_over_noise_control(build: Callable[[str, Any], Trainer], reward, epochs: int,
                             window: int = 3) -> tuple[float, float, list[float], list[float]]:
    """(LOOP's gain in ``reward``, the drift of the same reward in a run from the same seed trained on noise, and
    the two per-epoch series): ``build(name, reward_fn)`` makes each run's trainer for ``epochs`` epochs; a gain is
    the mean of the last ``window`` epochs minus that of the first. The control trains on ``random_control``'s
    hashed uniform reward and ``reward`` is read from its sampled images (one reward call per sampling batch,
    the same number in every epoch)."""
    from loopdiff.rewards.control import RandomControl

    loop = [h["reward/mean"] for h in build("loop", reward).train()]
    control, drift = RandomControl(), []

    def noise(images: torch.Tensor, prompts, metadata) -> torch.Tensor:
        drift.append(float(reward(images, prompts, metadata).mean()))
        return control(images, prompts, metadata)

    build("control", noise).train()
    per_epoch = np.array(drift).reshape(epochs, -1).mean(axis=1).tolist()

    def gain(series: list[float]) -> float:
        return float(np.mean(series[-window:]) - np.mean(series[:window]))

    return gain(loop), gain(per_epoch), loop, per_epoch
