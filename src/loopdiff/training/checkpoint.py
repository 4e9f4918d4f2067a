"""Save and resume the whole training state.

A checkpoint folder ``<run>/checkpoints/epoch_<N>/`` holds the trainable weights (safetensors: the whole UNet,
or the LoRA adapter), the optimiser and LR-schedule state, the per-prompt stat tracker, the RNG states and the
epoch. Sampling and shuffling draw from generators seeded by (seed, epoch), so a resumed run on the CPU
continues exactly as the uninterrupted one.
"""

from __future__ import annotations

import json
import random
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from loopdiff.training.guards import check_finite_weights
from loopdiff.training.models import load_trainable_state_dict, trainable_state_dict

WEIGHTS = "trainable.safetensors"
STATE = "training_state.pt"
INFO = "checkpoint.json"


@dataclass
class Resumable:
    """The objects a checkpoint restores."""

    unet: torch.nn.Module
    lora: bool
    optimizer: torch.optim.Optimizer
    lr_scheduler: torch.optim.lr_scheduler.LRScheduler
    tracker: Any  # PerPromptStatTracker or None


def checkpoint_dir(run_dir: Path, epoch: int) -> Path:
    return Path(run_dir) / "checkpoints" / f"epoch_{epoch:05d}"


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The newest complete checkpoint (its info file is written last)."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return None
    done = sorted(p for p in root.iterdir() if (p / INFO).is_file())
    return done[-1] if done else None


def save_checkpoint(run_dir: Path, epoch: int, parts: Resumable, extra: dict[str, Any], keep: int = 2) -> Path:
    """Write the checkpoint for ``epoch`` (the number of finished epochs) and prune older ones.

    Raises NonFiniteError, writing nothing, when a weight is non-finite: the older checkpoints stay as they are.
    """
    weights = trainable_state_dict(parts.unet, parts.lora)
    check_finite_weights(weights.items(), f"the checkpoint of epoch {epoch}")
    path = checkpoint_dir(run_dir, epoch)
    tmp = path.with_name(path.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file(weights, str(tmp / WEIGHTS))
    torch.save(
        {
            "optimizer": parts.optimizer.state_dict(),
            "lr_scheduler": parts.lr_scheduler.state_dict(),
            "tracker": parts.tracker.state_dict() if parts.tracker is not None else None,
            "rng": {
                "torch": torch.get_rng_state(),
                "numpy": np.random.get_state(),
                "python": random.getstate(),
            },
        },
        tmp / STATE,
    )
    (tmp / INFO).write_text(json.dumps({"epoch": epoch, **extra}, indent=2))
    shutil.rmtree(path, ignore_errors=True)
    tmp.rename(path)
    for old in sorted((Path(run_dir) / "checkpoints").glob("epoch_*"))[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return path


def load_checkpoint(path: Path, parts: Resumable) -> dict[str, Any]:
    """Restore ``parts`` from ``path``; returns the checkpoint info (with ``epoch``)."""
    load_trainable_state_dict(parts.unet, load_file(str(path / WEIGHTS)), parts.lora)
    state = torch.load(path / STATE, weights_only=False)
    parts.optimizer.load_state_dict(state["optimizer"])
    parts.lr_scheduler.load_state_dict(state["lr_scheduler"])
    if parts.tracker is not None and state["tracker"] is not None:
        parts.tracker.load_state_dict(state["tracker"])
    torch.set_rng_state(state["rng"]["torch"])
    np.random.set_state(state["rng"]["numpy"])
    random.setstate(state["rng"]["python"])
    return json.loads((path / INFO).read_text())
