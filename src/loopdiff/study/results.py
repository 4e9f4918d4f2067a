"""Where a study keeps its runs, and reading their evaluations and training curves back.

    <out>/study.json                          command, wall times, status of every run
    <out>/base/<task>/eval/base.json          the model before fine-tuning, once per task
    <out>/runs/<task>/<method>/seed<k>/       an ordinary training run (eval/final.json, metrics.jsonl, ...)
    <out>/variance/<task>/variance.json       the estimators' gradient noise at the base model
    <out>/report/                             index.html, tables (CSV, Markdown), curves and grids (PNG)
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from loopdiff.study.spec import BASE, StudySpec
from loopdiff.training.metrics import read_metrics

FINAL_TAG = "final"
BASE_TAG = "base"
VARIANCE_FILE = "variance.json"
RUN_RECORD = "study_run.json"  # written by the runner into each finished run folder: its id and wall time
DETERMINISTIC = "_deterministic"  # the suffix of evaluations sampled without noise (eval.deterministic)


def run_dir(out: Path, task: str, method: str, seed: int) -> Path:
    return Path(out) / "runs" / task / method / f"seed{seed}"


def base_dir(out: Path, task: str) -> Path:
    return Path(out) / "base" / task


def variance_dir(out: Path, task: str) -> Path:
    return Path(out) / "variance" / task


def read_variance(out: Path, task: str) -> dict[str, Any] | None:
    """The estimators' gradient noise at the base model on ``task`` (``variance/<task>/variance.json``)."""
    path = variance_dir(out, task) / VARIANCE_FILE
    return json.loads(path.read_text()) if path.is_file() else None


def report_dir(out: Path) -> Path:
    return Path(out) / "report"


def eval_file(folder: Path, tag: str) -> Path:
    return Path(folder) / "eval" / f"{tag}.json"


def read_eval(folder: Path, tag: str) -> dict[str, Any] | None:
    """The ``eval/<tag>.json`` record written by ``Trainer.evaluate``, or None if absent."""
    path = eval_file(folder, tag)
    return json.loads(path.read_text()) if path.is_file() else None


def training_curve(folder: Path, reward: str | None = None) -> np.ndarray:
    """(epochs, 2) array of (epoch, mean training reward) from ``metrics.jsonl``; a repeated epoch keeps
    its last record (a run restarted before its first checkpoint logs those epochs again).

    With ``reward`` given, a run that monitored that reward instead of training on it (a ``random_control``
    run) reports the monitored values, so its curve is on the task's scale."""
    key = "reward/mean"
    records = read_metrics(folder)
    if reward is not None and any(f"monitor/{reward}/mean" in r for r in records):
        key = f"monitor/{reward}/mean"
    by_epoch = {int(r["epoch"]): float(r[key]) for r in records if key in r}
    return np.array(sorted(by_epoch.items()), dtype=np.float64).reshape(-1, 2)


def eval_curve(folder: Path) -> dict[str, np.ndarray]:
    """Per reward, the (evaluations, 2) array of (epoch, mean score) from ``eval/epoch_*.json`` and
    ``eval/final.json`` (the evaluations along training that ``eval.every`` asks for)."""
    points: dict[str, dict[int, float]] = {}
    for path in sorted((Path(folder) / "eval").glob("*.json")):
        if not (path.stem.startswith("epoch_") or path.stem == FINAL_TAG):
            continue
        record = json.loads(path.read_text())
        for name, value in record["means"].items():
            points.setdefault(name, {})[int(record["epoch"])] = float("nan") if value is None else float(value)
    return {name: np.array(sorted(p.items()), dtype=np.float64).reshape(-1, 2) for name, p in points.items()}


@dataclass
class StudyResults:
    """Everything the report needs, read from the study folder; missing runs are simply absent."""

    final: dict[tuple[str, str], dict[int, dict[str, float]]] = field(default_factory=dict)  # (task, method) -> seed -> means
    base: dict[str, dict[str, float]] = field(default_factory=dict)  # task -> means
    curves: dict[tuple[str, str], dict[int, np.ndarray]] = field(default_factory=dict)  # (task, method) -> seed -> curve
    deterministic: dict[tuple[str, str], dict[int, dict[str, float]]] = field(default_factory=dict)  # eta = 0 finals
    base_deterministic: dict[str, dict[str, float]] = field(default_factory=dict)
    eval_curves: dict[tuple[str, str], dict[int, dict[str, np.ndarray]]] = field(default_factory=dict)

    def values(self, task: str, method: str, key: str | None) -> list[float]:
        """The per-seed values of eval metric ``key`` (one value for the base model)."""
        if key is None:
            return []
        if method == BASE:
            means = self.base.get(task, {})
            return [means[key]] if key in means else []
        seeds = self.final.get((task, method), {})
        return [means[key] for _, means in sorted(seeds.items()) if key in means]


def collect_results(spec: StudySpec, out: Path) -> StudyResults:
    """Read every finished evaluation and every training curve of the study in ``out``."""
    results = StudyResults()
    for task in spec.tasks:
        record = read_eval(base_dir(out, task), BASE_TAG)
        if record is not None:
            results.base[task] = record["means"]
        record = read_eval(base_dir(out, task), BASE_TAG + DETERMINISTIC)
        if record is not None:
            results.base_deterministic[task] = record["means"]
    for task, method in spec.pairs():
        reward = spec.metric_key(task, "training")
        for seed in spec.seeds:
            folder = run_dir(out, task, method, seed)
            record = read_eval(folder, FINAL_TAG)
            if record is not None:
                results.final.setdefault((task, method), {})[seed] = record["means"]
            record = read_eval(folder, FINAL_TAG + DETERMINISTIC)
            if record is not None:
                results.deterministic.setdefault((task, method), {})[seed] = record["means"]
            curve = training_curve(folder, reward)
            if len(curve):
                results.curves.setdefault((task, method), {})[seed] = curve
            evals = eval_curve(folder)
            if evals:
                results.eval_curves.setdefault((task, method), {})[seed] = evals
    return results
