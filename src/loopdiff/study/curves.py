"""Training-reward curves per task: the mean over seeds with an 80% prediction interval (like the paper's
Figures 2 and 3), as PNG (matplotlib, Agg) and CSV."""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

import numpy as np

from loopdiff.study.results import StudyResults
from loopdiff.study.spec import BASE, StudySpec, TableSpec
from loopdiff.study.stats import prediction_interval

COVERAGE = 0.8


@dataclass(frozen=True)
class Band:
    """A curve over the epochs every seed has reached: mean and prediction interval over ``seeds`` runs."""

    epochs: np.ndarray
    mean: np.ndarray
    low: np.ndarray
    high: np.ndarray
    seeds: int


def curve_band(per_seed: Mapping[int, np.ndarray], coverage: float = COVERAGE) -> Band | None:
    """Combine per-seed (epoch, reward) curves on their common epochs; None when there is nothing."""
    if not per_seed:
        return None
    common = set.intersection(*(set(curve[:, 0].tolist()) for curve in per_seed.values()))
    if not common:
        return None
    epochs = np.array(sorted(common))
    rows = np.stack([curve[np.isin(curve[:, 0], epochs), 1] for curve in per_seed.values()])
    mean, low, high = prediction_interval(rows, coverage)
    return Band(epochs, mean, low, high, len(per_seed))


def tail_mean(per_seed: Mapping[int, np.ndarray], fraction: float) -> list[float]:
    """Per seed, the mean training reward over the final ``fraction`` of its epochs (at least one epoch)."""
    values = []
    for _, curve in sorted(per_seed.items()):
        if len(curve):
            keep = max(1, math.ceil(fraction * len(curve)))
            values.append(float(curve[-keep:, 1].mean()))
    return values


def plot_table_curves(spec: StudySpec, results: StudyResults, table: TableSpec, path: Path) -> Path | None:
    """One panel per task of ``table``, one line + shaded 80% prediction interval per trained method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    methods = [m for m in table.methods if m != BASE]
    bands = {(t, m): curve_band(results.curves.get((t, m), {})) for t in table.tasks for m in methods}
    if not methods or all(b is None for b in bands.values()):
        return None
    columns = min(3, len(table.tasks))
    rows = math.ceil(len(table.tasks) / columns)
    figure, axes = plt.subplots(rows, columns, figsize=(4.2 * columns, 3.2 * rows), squeeze=False)
    colours = plt.get_cmap("tab10")
    for ax, task in zip(axes.flat, table.tasks):
        for k, method in enumerate(methods):
            band = bands[(task, method)]
            if band is None:
                continue
            label = f"{spec.label(method)} (n={band.seeds})"
            ax.plot(band.epochs, band.mean, color=colours(k), label=label, linewidth=1.6)
            ax.fill_between(band.epochs, band.low, band.high, color=colours(k), alpha=0.2, linewidth=0)
        ax.set_title(spec.tasks[task].label)
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel("training reward")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(table.tasks):]:
        ax.axis("off")
    figure.suptitle(f"{table.title}: training reward, mean over seeds, {int(COVERAGE * 100)}% prediction interval",
                    fontsize=9)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110, bbox_inches="tight")  # a single panel is narrower than the title
    plt.close(figure)
    return path


def write_curve_csv(spec: StudySpec, results: StudyResults, table: TableSpec, path: Path) -> Path:
    """The plotted numbers: task, method, epoch, mean, low, high, seeds."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle, lineterminator="\n")
        writer.writerow(["task", "method", "epoch", "mean", "low", "high", "seeds"])
        for task in table.tasks:
            for method in (m for m in table.methods if m != BASE):
                band = curve_band(results.curves.get((task, method), {}))
                if band is None:
                    continue
                for row in zip(band.epochs, band.mean, band.low, band.high):
                    writer.writerow([task, method, int(row[0]), *(repr(float(v)) for v in row[1:]), band.seeds])
    return path
