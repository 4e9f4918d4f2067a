"""The report of one training run: ``report.html`` in the run folder, from what the run wrote (``metrics.jsonl``,
``eval/base.json`` and ``eval/final.json``, ``grids/*.png``, ``config.json``, ``run.json``), linked relatively,
styled as the study report."""

from __future__ import annotations

import html
import json
import math
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np

from loopdiff.evaluation import paired_change
from loopdiff.training.launches import read_launches
from loopdiff.training.metrics import read_metrics

REPORT_FILE = "report.html"
CURVE_FILE = "training_reward.png"  # in grids/
GRID_CAPTIONS = {
    "base_vs_final.png": "The base and the fine-tuned model on the same validation prompts and seeds.",
    "base.png": "The base model on the validation prompts.",
    "final.png": "The fine-tuned model on the validation prompts.",
    "fidelity.png": "The metrics output.keep_best weighs, per epoch.",
    CURVE_FILE: "Training reward per epoch: the mean over the epoch's samples, with its minimum and maximum.",
}


def build_run_report(run_dir: Path) -> Path:
    """Write ``run_dir/report.html`` (and ``grids/training_reward.png``) from what the run wrote; returns it."""
    run_dir = Path(run_dir)
    metrics = read_metrics(run_dir)
    if metrics:
        plot_training_reward(metrics, run_dir / "grids" / CURVE_FILE)
    title = f"loopdiff run: {run_dir.name}"
    sections = [
        f"<h1>{html.escape(title)}</h1>",
        f'<div class="meta">{summary_html(run_dir, metrics)}</div>',
        "<h2>Evaluation</h2>",
        evaluation_html(run_dir),
        "<h2>Training</h2>",
        training_html(metrics),
        "<h2>Images and curves</h2>",
        "\n".join(f'<figure><img src="grids/{html.escape(name)}" alt="{html.escape(Path(name).stem)}">'
                  f"<figcaption>{caption}</figcaption></figure>" for name, caption in grids(run_dir))
        or "<p>No grids were written.</p>",
    ]
    page = (f'<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n<title>{html.escape(title)}</title>\n'
            f"<style>{study_style()}</style>\n</head>\n<body>\n" + "\n".join(sections) + "\n</body>\n</html>\n")
    path = run_dir / REPORT_FILE
    path.write_text(page)
    return path


def study_style() -> str:
    """The study report's style sheet."""
    template = (resources.files("loopdiff") / "reports" / "study_report.html").read_text()
    return template.split("<style>", 1)[1].split("</style>", 1)[0]


def summary_html(run_dir: Path, metrics: list[dict[str, float]]) -> str:
    """Model, estimator, reward and prompts from ``config.json``; processes and precision from ``run.json``."""
    config_file = run_dir / "config.json"
    config: dict[str, Any] = json.loads(config_file.read_text()) if config_file.is_file() else {}
    model, prompts = config.get("model", {}), config.get("prompts", {})
    items = [("model", model.get("pretrained")), ("LoRA", model.get("lora")),
             ("estimator", config.get("estimator", {}).get("preset")), ("reward", config.get("reward", {}).get("name")),
             ("training prompts", prompts.get("train")), ("validation prompts", prompts.get("val")),
             ("epochs trained", len(metrics))]
    for k, launch in enumerate(read_launches(run_dir)):
        items.append((f"launch {k + 1}", f"from epoch {launch['start_epoch']}: {launch['processes']} process(es), "
                                         f"{launch['device']}, mixed precision {launch['mixed_precision_used']}"))
    return "<br>\n".join(f"{html.escape(name)}: <code>{html.escape(str(value))}</code>" for name, value in items)


def evaluation_html(run_dir: Path) -> str:
    """Per reward: the base and fine-tuned means and the paired change with its standard error over prompts."""
    files = {tag: run_dir / "eval" / f"{tag}.json" for tag in ("base", "final")}
    evaluations = {tag: json.loads(path.read_text()) for tag, path in files.items() if path.is_file()}
    if not evaluations:
        return "<p>No evaluation was run (prompts.val unset or eval.max_prompts=0).</p>"
    first = next(iter(evaluations.values()))
    tags = list(evaluations)
    head = "".join(f"<th>{'base model' if tag == 'base' else 'fine-tuned'}</th>" for tag in tags)
    paired = len(tags) == 2
    rows = []
    for name in first["means"]:
        cells = [f"<td>{_number(evaluations[tag]['means'][name])}</td>" for tag in tags]
        if paired:
            change, se = paired_change(evaluations["base"]["per_prompt"][name], evaluations["final"]["per_prompt"][name])
            cells.append(f"<td>{_number(change, signed=True)} \u00b1 {_number(se)}</td>")
        rows.append(f'<tr data-reward="{html.escape(name)}"><td>{html.escape(name)}</td>{"".join(cells)}</tr>')
    change_head = "<th>change \u00b1 standard error over prompts</th>" if paired else ""
    return (f"<table><caption>Mean over {len(first['prompts'])} validation prompts of the per-prompt mean "
            f"(fixed seeds)</caption><thead><tr><th>reward</th>{head}{change_head}</tr></thead>"
            f"<tbody>{''.join(rows)}</tbody></table>")


def training_html(metrics: list[dict[str, float]]) -> str:
    """The first and last epochs' training reward and loss."""
    if not metrics:
        return "<p>No epoch was logged.</p>"
    keys = [k for k in ("reward/mean", "reward/std", "loss", "approx_kl", "grad_norm", "time/epoch") if k in metrics[0]]
    shown = metrics if len(metrics) <= 2 else [metrics[0], metrics[-1]]
    head = "".join(f"<th>{html.escape(k)}</th>" for k in keys)
    rows = "".join(f"<tr><td>{int(m['epoch'])}</td>" + "".join(f"<td>{_number(m[k])}</td>" for k in keys) + "</tr>"
                   for m in shown)
    return (f"<table><caption>The first and the last epoch of {len(metrics)} (metrics.jsonl)</caption>"
            f"<thead><tr><th>epoch</th>{head}</tr></thead><tbody>{rows}</tbody></table>")


def grids(run_dir: Path) -> list[tuple[str, str]]:
    """The run's PNG grids and curves, the known ones first, as (file name, caption)."""
    present = sorted(p.name for p in (run_dir / "grids").glob("*.png"))
    ordered = [n for n in GRID_CAPTIONS if n in present] + [n for n in present if n not in GRID_CAPTIONS]
    return [(name, html.escape(GRID_CAPTIONS.get(name, name))) for name in ordered]


def plot_training_reward(metrics: list[dict[str, float]], path: Path) -> Path:
    """The training reward's mean per epoch, shaded between its minimum and maximum."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = np.array([m["epoch"] for m in metrics])
    figure, ax = plt.subplots(figsize=(5, 3.2))
    ax.plot(epochs, [m["reward/mean"] for m in metrics], linewidth=1.6)
    if "reward/min" in metrics[0]:
        ax.fill_between(epochs, [m["reward/min"] for m in metrics], [m["reward/max"] for m in metrics],
                        alpha=0.2, linewidth=0)
    ax.set_title("training reward (mean, min to max)")
    ax.set_xlabel("epoch")
    ax.grid(alpha=0.3)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(figure)
    return path


def _number(value: float | None, signed: bool = False) -> str:
    if value is None or not math.isfinite(value):
        return "n/a"
    return f"{value:+.4f}" if signed else f"{value:.4f}"
