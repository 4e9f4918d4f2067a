"""The study report's sections beyond the paper's tables: the claims with their power, the estimators'
gradient noise, sample and compute efficiency, and the deterministic sampler's scores."""

from __future__ import annotations

import html
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from loopdiff.study.claims import ClaimVerdict, claims_records
from loopdiff.study.efficiency import mean_curve, epoch_seconds, method_cost, samples_to_reach, smoothed, targets
from loopdiff.study.results import StudyResults, read_variance
from loopdiff.study.spec import BASE, StudySpec
from loopdiff.study.stats import prediction_interval, summarize
from loopdiff.study.tables import format_cell


@dataclass(frozen=True)
class TextTable:
    """A table of plain-text cells, rendered as HTML for the report and as Markdown for the results README.

    ``verdict_column``: the column whose text is also its style (holds / fails / undecided)."""

    header: Sequence[str]
    rows: Sequence[Sequence[Any]]
    caption: str = ""
    table_id: str = ""
    verdict_column: int | None = None

    def html(self) -> str:
        ident = f' id="{html.escape(self.table_id)}"' if self.table_id else ""
        head = "".join(f"<th>{html.escape(str(h))}</th>" for h in self.header)
        body = "".join("<tr>" + "".join(f"<td>{self._html_cell(i, c)}</td>" for i, c in enumerate(row)) + "</tr>"
                       for row in self.rows)
        cap = f"<caption>{html.escape(self.caption)}</caption>" if self.caption else ""
        return f"<table{ident}>{cap}<thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"

    def _html_cell(self, column: int, value: Any) -> str:
        text = html.escape(str(value))
        return f'<span class="{text}">{text}</span>' if column == self.verdict_column else text

    def markdown(self) -> str:
        lines = [f"**{self.caption}**\n"] if self.caption else []
        lines += ["| " + " | ".join(map(str, self.header)) + " |", "|" + "---|" * len(self.header)]
        lines += ["| " + " | ".join(f"**{c}**" if i == self.verdict_column else str(c) for i, c in enumerate(row))
                  + " |" for row in self.rows]
        return "\n".join(lines) + "\n"


def _num(value: float | None, digits: int = 4, signed: bool = False) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "\u2013"
    if isinstance(value, float) and math.isinf(value):
        return "never" if value > 0 else "\u2212\u221e"
    return f"{value:+.{digits}f}" if signed else f"{value:.{digits}f}"


def claims_table(spec: StudySpec, verdicts: list[ClaimVerdict]) -> TextTable:
    """Every claim and task: the deciding difference +- SE, in SE, the paper's gap, power and the verdict."""
    rows = [[r["claim"], spec.tasks[r["task"]].label, r["measure"],
             f"{_num(r['difference'], signed=True)} \u00b1 {_num(r['se'])}", _num(r["z"], 1, signed=True),
             r["seeds"], _num(r["paper_difference"]), {True: "yes", False: "no", None: "\u2013"}[r["powered"]],
             r["verdict"]] for r in claims_records(spec, verdicts)]
    header = ["claim", "task", "measure", "difference \u00b1 SE", "in SE", "seeds", "paper's gap", "power", "verdict"]
    return TextTable(header, rows, table_id="claims", verdict_column=8)


# ---------------------------------------------------------------- variance


def variance_tables(spec: StudySpec, task: str, record: dict[str, Any]) -> list[TextTable]:
    """One task's gradient noise per estimator, and the leave-one-out baseline's noise against K/(K-1)."""
    label = spec.tasks[task].label
    rows = [[r["label"], r["k"], f"{r['noise_per_sample']:.3e}", f"{r['noise_in_reward_units']:.3e}",
             f"{r['signal_sq']:.3e}", _num(r["snr"], 3, signed=True),
             "unresolved" if r["samples_for_snr_one"] is None else f"{r['samples_for_snr_one']:.0f}"]
            for r in record["estimators"]]
    tables = [TextTable(
        ["estimator", "K", "tr(Cov) per sample", "in reward units", "|signal|\u00b2",
         f"SNR at {record['batch']} samples", "samples for SNR 1"], rows,
        f"{label}: reward {record['reward']}, {record['groups']} prompts x {record['samples_per_prompt']} samples, "
        f"{record['parameters']:,} parameters")]
    if record["loo_check"]:
        reference = record["loo_check"][0]["reference_k"]
        tables.append(TextTable(
            ["K", f"measured noise / noise at K={reference}", "K/(K-1) prediction"],
            [[c["k"], f"{c['measured_ratio']:.3f}", f"{c['predicted_ratio']:.3f}"] for c in record["loo_check"]],
            f"{label}: the leave-one-out baseline against K/(K-1)"))
    return tables


def variance_section(spec: StudySpec, out: Path, folder: Path) -> str:
    if spec.variance is None:
        return "<p>The study measures no gradient noise.</p>"
    parts, records = [], {}
    for task in spec.variance.tasks:
        record = read_variance(out, task)
        if record is None:
            parts.append(f"<p>{html.escape(spec.tasks[task].label)}: not measured yet.</p>")
            continue
        records[task] = record
        parts += [table.html() for table in variance_tables(spec, task, record)]
    if records:
        png = plot_variance(spec, records, folder / "variance.png")
        parts.append(f'<figure><img src="{png.name}" alt="gradient signal-to-noise per estimator">'
                     "<figcaption>Signal-to-noise of one epoch's gradient per estimator, at the base model."
                     "</figcaption></figure>")
    return "\n".join(parts)


def plot_variance(spec: StudySpec, records: dict[str, dict[str, Any]], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(records), figsize=(5.5 * len(records), 3.6), squeeze=False)
    for ax, (task, record) in zip(axes[0], records.items()):
        labels = [r["label"] for r in record["estimators"]]
        snr = [r["snr"] for r in record["estimators"]]
        ax.bar(range(len(snr)), snr, color=["#888" if r["advantage"] == "raw" else "#3b6ea8" for r in record["estimators"]])
        ax.axhline(0, color="k", lw=0.6)
        ax.set_xticks(range(len(snr)), labels, rotation=40, ha="right", fontsize=8)
        ax.set_title(f"{spec.tasks[task].label}: SNR of a {record['batch']}-sample gradient", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# ---------------------------------------------------------------- efficiency


def cost_table(spec: StudySpec, out: Path, results: StudyResults, task: str) -> TextTable:
    """Per trained method: seconds per epoch, peak memory, denoisers held, reward queries, optimiser steps."""
    rows = []
    for method in (m for m in spec.methods if (task, m) in results.curves):
        cost = method_cost(spec, out, task, method)
        if cost is not None:
            rows.append([spec.label(method), f"{cost.seconds_per_epoch:.2f}", f"{cost.peak_memory_mb:.0f}",
                         cost.denoisers_held, cost.reward_queries, cost.optimiser_steps])
    return TextTable(["method", "seconds per epoch", "peak memory (MiB)", "denoisers held",
                      "reward queries per epoch", "optimiser steps per epoch"], rows,
                     f"{spec.tasks[task].label}: cost per epoch (median over epochs and seeds; peak resident memory)")


def reach_table(spec: StudySpec, out: Path, results: StudyResults, task: str) -> TextTable:
    """Per method: samples and seconds until it reaches the reference method's final scores."""
    eff = spec.efficiency
    assert eff is not None
    train_target, held_target = targets(spec, results, task, eff.reference)
    rows = []
    for method in eff.methods:
        s1, t1 = samples_to_reach(spec, out, results, task, method, train_target, held_out=False)
        s2, t2 = samples_to_reach(spec, out, results, task, method, held_target, held_out=True)
        rows.append([spec.label(method), _num(s1, 0), _num(t1, 0), _num(s2, 0), _num(t2, 0)])
    reference = spec.label(eff.reference)
    return TextTable(
        ["method", f"samples to {reference}'s training reward", "seconds", f"samples to {reference}'s held-out score",
         "seconds"], rows,
        f"{spec.tasks[task].label}: to reach {reference}'s final training reward ({_num(train_target)}) and "
        f"held-out score ({_num(held_target)})")


def efficiency_section(spec: StudySpec, out: Path, results: StudyResults, folder: Path) -> str:
    if spec.efficiency is None:
        return "<p>The study sets no efficiency comparison.</p>"
    parts = []
    for task in spec.efficiency.tasks:
        parts += [cost_table(spec, out, results, task).html(), reach_table(spec, out, results, task).html()]
        png = plot_efficiency(spec, out, results, task, folder / f"efficiency_{task}.png")
        if png is not None:
            parts.append(f'<figure><img src="{png.name}" alt="curves over samples and wall time"><figcaption>'
                         f"{html.escape(spec.tasks[task].label)}: training reward over samples and over training "
                         "seconds, and the held-out score over samples (mean over seeds, 80% prediction intervals)."
                         "</figcaption></figure>")
    return "\n".join(parts)


def plot_efficiency(spec: StudySpec, out: Path, results: StudyResults, task: str, path: Path) -> Path | None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    eff = spec.efficiency
    assert eff is not None
    methods = [m for m in dict.fromkeys((*eff.methods, eff.reference)) if results.curves.get((task, m))]
    if not methods:
        return None
    key = spec.metric_key(task, "evaluator")
    fig, axes = plt.subplots(1, 3, figsize=(15, 3.8))
    for method in methods:
        per_seed = [c for _, c in sorted(results.curves[(task, method)].items())]
        n = min(len(c) for c in per_seed)
        values = np.stack([smoothed(c[:n, 1], 5) for c in per_seed])
        mean, low, high = prediction_interval(values)
        samples = spec.run_config(task, method, spec.seeds[0], Path(".")).training.samples_per_epoch
        x = per_seed[0][:n, 0] * samples
        line = axes[0].plot(x, mean, label=spec.label(method))[0]
        axes[0].fill_between(x, low, high, color=line.get_color(), alpha=0.15)
        seconds = epoch_seconds(spec, out, task, method)[:n]
        if len(seconds) == n:
            axes[1].plot(seconds, mean, color=line.get_color())
            axes[1].fill_between(seconds, low, high, color=line.get_color(), alpha=0.15)
        evals = {s: c[key] for s, c in results.eval_curves.get((task, method), {}).items() if key in c}
        if evals:
            curves = [c for _, c in sorted(evals.items())]
            m = min(len(c) for c in curves)
            e_mean, e_low, e_high = prediction_interval(np.stack([c[:m, 1] for c in curves]))
            axes[2].plot(curves[0][:m, 0] * samples, e_mean, marker="o", ms=3, color=line.get_color())
            axes[2].fill_between(curves[0][:m, 0] * samples, e_low, e_high, color=line.get_color(), alpha=0.15)
    for ax, xlabel, ylabel in zip(axes, ("samples", "training seconds", "samples"),
                                  ("training reward (5-epoch mean)", "training reward (5-epoch mean)", f"held out: {key}")):
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(spec.tasks[task].label, fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# ---------------------------------------------------------------- the sampler users run


def sampler_rows(spec: StudySpec, results: StudyResults, task: str) -> list[dict[str, Any]]:
    """Per method: the held-out score sampled with noise (as trained) and deterministically (DDIM eta = 0),
    and their paired difference over seeds."""
    key = spec.metric_key(task, "evaluator")
    rows = []
    if key in results.base.get(task, {}) and key in results.base_deterministic.get(task, {}):
        rows.append({"method": BASE, "stochastic": summarize([results.base[task][key]]),
                     "deterministic": summarize([results.base_deterministic[task][key]]),
                     "difference": summarize([results.base_deterministic[task][key] - results.base[task][key]])})
    for method in spec.methods:
        noisy, plain = results.final.get((task, method), {}), results.deterministic.get((task, method), {})
        seeds = sorted(s for s in set(noisy) & set(plain) if key in noisy[s] and key in plain[s])
        if seeds:
            rows.append({"method": method,
                         "stochastic": summarize([noisy[s][key] for s in seeds]),
                         "deterministic": summarize([plain[s][key] for s in seeds]),
                         "difference": summarize([plain[s][key] - noisy[s][key] for s in seeds])})
    return rows


def sampler_table(spec: StudySpec, results: StudyResults, task: str) -> TextTable | None:
    """Held-out scores under the trained stochastic sampler and the deterministic one (None: none measured)."""
    rows = sampler_rows(spec, results, task)
    if not rows:
        return None
    return TextTable(
        ["method", "eta = 1 (as trained)", "eta = 0 (deterministic)", "eta 0 \u2212 eta 1", "seeds"],
        [[spec.label(r["method"]), *(format_cell(r[k]) for k in ("stochastic", "deterministic", "difference")),
          r["difference"].n] for r in rows],
        f"{spec.tasks[task].label}: held-out {spec.metric_key(task, 'evaluator')}, the same prompts and seeds")


def sampler_section(spec: StudySpec, results: StudyResults) -> str:
    tables = [t for t in (sampler_table(spec, results, task) for task in spec.tasks) if t is not None]
    return "\n".join(t.html() for t in tables) or "<p>No deterministic evaluations (eval.deterministic) yet.</p>"


def sections_markdown(spec: StudySpec, out: Path, results: StudyResults, verdicts: list[ClaimVerdict]) -> str:
    """The claims, variance, cost, sample-efficiency and sampler tables in Markdown (the results README's)."""
    tables = [claims_table(spec, verdicts)] if verdicts else []
    for task in spec.variance.tasks if spec.variance else ():
        record = read_variance(out, task)
        tables += variance_tables(spec, task, record) if record is not None else []
    for task in spec.efficiency.tasks if spec.efficiency else ():
        tables += [cost_table(spec, out, results, task), reach_table(spec, out, results, task)]
    tables += [t for t in (sampler_table(spec, results, task) for task in spec.tasks) if t is not None]
    return "\n".join(t.markdown() for t in tables)


def sampler_json(spec: StudySpec, results: StudyResults) -> str:
    rows = {task: [{"method": r["method"], **{k: {"mean": r[k].mean, "se": None if math.isnan(r[k].se) else r[k].se,
                                                   "n": r[k].n} for k in ("stochastic", "deterministic", "difference")}}
                   for r in sampler_rows(spec, results, task)] for task in spec.tasks}
    return json.dumps(rows, indent=1) + "\n"
