"""Building small trainers on the tiny pipeline for the training tests."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from conftest import build_tiny_pipeline
from loopdiff.config import config_from_dict
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
