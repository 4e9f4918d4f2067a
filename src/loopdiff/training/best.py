"""Keep the weights at the best trade-off between the optimised reward and a non-optimised monitor.

Reward over-optimisation (the reward keeps rising while the prompt is lost) shows in the logged
``monitor/<reward>/mean`` of the rewards listed in ``reward.monitor``. ``output.keep_best`` names a
weighted sum of logged metrics, e.g. ``"reward/mean:1,monitor/embedded_eval/mean:2"``; its mean over the
last ``output.keep_best_window`` epochs is the trade-off score, and the trainable weights at the epoch
where that score peaks are kept (``best/``) and exported beside the final model.
"""

from __future__ import annotations

import json
import math
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from loopdiff.config import ConfigError


@dataclass
class BestKeeper:
    """Tracks the windowed trade-off score over epochs and says when a new best is reached."""

    weights: dict[str, float]
    window: int = 10
    scores: list[float] = field(default_factory=list)
    best_epoch: int | None = None
    best_score: float = -math.inf

    def __post_init__(self) -> None:
        if self.window < 1:
            raise ConfigError(f"output.keep_best_window must be >= 1, got {self.window}")

    def trade_off(self, metrics: Mapping[str, float]) -> float:
        """The weighted sum of this epoch's metrics; a metric missing from ``metrics`` is an error."""
        missing = sorted(set(self.weights) - set(metrics))
        if missing:
            known = ", ".join(sorted(k for k in metrics if k.endswith("/mean")))
            raise ConfigError(f"output.keep_best names {missing}, which training does not log (logged: {known})")
        return sum(w * float(metrics[name]) for name, w in self.weights.items())

    def update(self, epoch: int, metrics: Mapping[str, float]) -> bool:
        """Record epoch ``epoch``'s metrics; True when the windowed score is a new best.

        A new best needs a full window (the first ``window - 1`` epochs never count) and a finite score.
        """
        self.scores.append(self.trade_off(metrics))
        if len(self.scores) < self.window:
            return False
        score = sum(self.scores[-self.window:]) / self.window
        if not math.isfinite(score) or score <= self.best_score:
            return False
        self.best_epoch, self.best_score = epoch, score
        return True

    def replay(self, history: Sequence[Mapping[str, float]]) -> None:
        """Rebuild the state from a resumed run's logged history (``{"epoch": ..., **metrics}`` rows)."""
        for row in history:
            self.update(int(row["epoch"]), row)


# ----------------------------------------------------------------------------- the kept weights on disk

BEST_DIR = "best"
BEST_WEIGHTS = "weights.safetensors"
BEST_INFO = "best.json"


def save_kept_weights(folder: Path, state: Mapping[str, torch.Tensor], keeper: BestKeeper) -> None:
    """Write ``state`` and the keeper's epoch, score and terms into ``folder``, replacing it atomically."""
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp / BEST_WEIGHTS))
    info = {"epoch": keeper.best_epoch, "score": keeper.best_score, "terms": keeper.weights, "window": keeper.window}
    (tmp / BEST_INFO).write_text(json.dumps(info, indent=1))
    shutil.rmtree(folder, ignore_errors=True)
    tmp.rename(folder)


def load_kept_weights(folder: Path) -> dict[str, torch.Tensor]:
    """The weights :func:`save_kept_weights` wrote (tensors only, no code is unpickled)."""
    return load_file(str(folder / BEST_WEIGHTS))


def kept_info(folder: Path) -> dict:
    """The epoch, score, terms and window of the kept weights."""
    return json.loads((folder / BEST_INFO).read_text())


# ----------------------------------------------------------------------------- the trade-off curve


def plot_trade_off(path: Path, history: Sequence[Mapping[str, float]], keeper: BestKeeper) -> Path:
    """Each term of the trade-off over epochs (its windowed mean as a line), the kept epoch marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(keeper.weights)
    fig, axes = plt.subplots(1, len(names) + 1, figsize=(3.6 * (len(names) + 1), 3.2), squeeze=False)
    epochs = np.array([row["epoch"] for row in history], dtype=float)
    columns = {name: np.array([row.get(name, np.nan) for row in history], dtype=float) for name in names}
    columns["trade-off"] = sum(w * columns[name] for name, w in keeper.weights.items())
    kernel = np.ones(keeper.window) / keeper.window
    for ax, (name, values) in zip(axes[0], columns.items()):
        ax.plot(epochs, values, ".", ms=3, alpha=0.4, color="tab:gray")
        if len(values) >= keeper.window:
            ax.plot(epochs[keeper.window - 1:], np.convolve(values, kernel, mode="valid"), color="tab:blue")
        if keeper.best_epoch is not None:
            ax.axvline(keeper.best_epoch, color="tab:red", ls="--", lw=1, label=f"kept: epoch {keeper.best_epoch}")
            ax.legend(fontsize=7)
        ax.set_title(name, fontsize=9, wrap=True)
        ax.set_xlabel("epoch", fontsize=8)
        ax.tick_params(labelsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
