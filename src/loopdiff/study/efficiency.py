"""The efficiency half of the comparison: what each method costs per epoch, and how many samples and how
much wall time it needs to reach a target (PPO's final training reward, PPO's final held-out score)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

import numpy as np

from loopdiff.config import build_estimator
from loopdiff.study.curves import tail_mean
from loopdiff.study.results import StudyResults, run_dir
from loopdiff.study.spec import StudySpec
from loopdiff.training.metrics import read_metrics


@dataclass(frozen=True)
class Cost:
    """Per-epoch cost of one method on one task, over its finished runs."""

    seconds_per_epoch: float
    peak_memory_mb: float
    denoisers_held: int  # the policy, plus a frozen reference copy when the KL term is on
    reward_queries: int  # reward calls (images scored) per epoch
    optimiser_steps: int  # per epoch: inner epochs x minibatches


def method_cost(spec: StudySpec, out: Path, task: str, method: str) -> Cost | None:
    """Seconds per epoch (the median over epochs and seeds, first epoch left out), the peak memory of
    the runs, and what the method's config says it holds and queries."""
    seconds, memory = [], []
    for seed in spec.seeds:
        records = read_metrics(run_dir(out, task, method, seed))
        seconds += [r["time/epoch"] for r in records[1:] if "time/epoch" in r]
        memory += [r["memory/peak_mb"] for r in records if "memory/peak_mb" in r]
    if not seconds:
        return None
    config = spec.run_config(task, method, spec.seeds[0], Path("."))
    estimator = build_estimator(config)
    return Cost(
        seconds_per_epoch=float(np.median(seconds)),
        peak_memory_mb=float(max(memory)) if memory else math.nan,
        denoisers_held=1 + (estimator.kl_coef > 0),
        reward_queries=config.training.samples_per_epoch,
        optimiser_steps=estimator.inner_epochs * estimator.minibatches,
    )


def first_crossing(xs: np.ndarray, ys: np.ndarray, target: float) -> float:
    """The first ``x`` at which ``ys`` reaches ``target``, linearly interpolated between points (``inf``
    if it never does; ``xs[0]`` if it starts there)."""
    xs, ys = np.asarray(xs, dtype=np.float64), np.asarray(ys, dtype=np.float64)
    above = np.nonzero(ys >= target)[0]
    if not len(above):
        return math.inf
    i = int(above[0])
    if i == 0:
        return float(xs[0])
    x0, x1, y0, y1 = xs[i - 1], xs[i], ys[i - 1], ys[i]
    return float(x0 + (target - y0) / (y1 - y0) * (x1 - x0))


def smoothed(values: np.ndarray, window: int) -> np.ndarray:
    """Trailing moving average over ``window`` points (shorter at the start)."""
    values = np.asarray(values, dtype=np.float64)
    sums = np.cumsum(np.insert(values, 0, 0.0))
    idx = np.arange(1, len(values) + 1)
    start = np.maximum(0, idx - window)
    return (sums[idx] - sums[start]) / (idx - start)


def mean_curve(per_seed: Mapping[int, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Epochs and the mean over seeds of (epoch, value) curves, on the epochs every seed has."""
    curves = [c for _, c in sorted(per_seed.items()) if len(c)]
    if not curves:
        return np.empty(0), np.empty(0)
    n = min(len(c) for c in curves)
    return curves[0][:n, 0], np.mean([c[:n, 1] for c in curves], axis=0)


def epoch_seconds(spec: StudySpec, out: Path, task: str, method: str) -> np.ndarray:
    """Mean over seeds of the cumulative training seconds at the end of each epoch."""
    per_seed = []
    for seed in spec.seeds:
        records = read_metrics(run_dir(out, task, method, seed))
        by_epoch = {int(r["epoch"]): float(r["time/epoch"]) for r in records if "time/epoch" in r}
        if by_epoch:
            per_seed.append(np.cumsum([by_epoch[e] for e in sorted(by_epoch)]))
    if not per_seed:
        return np.empty(0)
    n = min(len(s) for s in per_seed)
    return np.mean([s[:n] for s in per_seed], axis=0)


def samples_to_reach(spec: StudySpec, out: Path, results: StudyResults, task: str, method: str,
                     target: float, held_out: bool, window: int = 5) -> tuple[float, float]:
    """Samples and training seconds until ``method``'s mean curve over seeds reaches ``target``.

    Training reward: the per-epoch curve, smoothed over ``window`` epochs. Held out: the evaluations along
    training (``eval.every``), unsmoothed, with the final one. ``inf`` when it never gets there."""
    samples = spec.run_config(task, method, spec.seeds[0], Path(".")).training.samples_per_epoch
    if held_out:
        key = spec.metric_key(task, "evaluator")
        per_seed = {seed: curves[key] for seed, curves in results.eval_curves.get((task, method), {}).items()
                    if key in curves}
        epochs, values = mean_curve(per_seed)
    else:
        epochs, values = mean_curve(results.curves.get((task, method), {}))
        values = smoothed(values, window)
    if not len(epochs):
        return math.nan, math.nan
    epoch = first_crossing(epochs, values, target)
    if not math.isfinite(epoch):
        return math.inf, math.inf
    seconds = epoch_seconds(spec, out, task, method)
    at = np.interp(epoch, np.arange(1, len(seconds) + 1), seconds) if len(seconds) else math.nan
    return epoch * samples, float(at)


def targets(spec: StudySpec, results: StudyResults, task: str, reference: str) -> tuple[float, float]:
    """The reference method's final training reward (the mean of its curves' tails over seeds) and its
    final held-out score (the mean over seeds)."""
    tails = tail_mean(results.curves.get((task, reference), {}), spec.curve_tail)
    key = spec.metric_key(task, "evaluator")
    finals = [m[key] for m in results.final.get((task, reference), {}).values() if key in m]
    return (float(np.mean(tails)) if tails else math.nan, float(np.mean(finals)) if finals else math.nan)
