"""Checking the paper's claims against the study's numbers, with each difference in standard errors.

A claim orders methods (``increasing``). On one task, each step ``a -> b`` of the order is a per-seed paired
difference ``d_s = v_b(s) - v_a(s)`` (the same training seed and the same evaluation prompts and noise), with
mean ``d`` and standard error ``se = sd(d_s) / sqrt(n)`` over the ``n`` seeds both methods finished. The
claim's difference on the task is its smallest step, in standard errors. The verdict:

- ``holds``: every step is positive by at least 2 standard errors;
- ``fails``: some step is negative by at least 2 standard errors, or is too small to be the paper's: the
  paper's relative gap ``paper_effect`` (times the lower method's mean) lies above ``d + 2 se``;
- ``undecided``: anything else, including fewer than 2 paired seeds.

The study has power for a step when ``2 se`` is below the paper's gap: then a gap of the paper's size shows
at 2 standard errors or more.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np

from loopdiff.study.curves import tail_mean
from loopdiff.study.results import StudyResults
from loopdiff.study.spec import BASE, ClaimSpec, StudySpec
from loopdiff.study.stats import Summary, summarize

MARGIN = 2.0  # standard errors a difference needs to decide a claim
MEASURES = {"training": "training_reward", "training_curve": "training_reward", "evaluator": "held_out"}


@dataclass(frozen=True)
class Step:
    """One step ``lower -> higher`` of a claim on one task: the paired difference over seeds."""

    lower: str
    higher: str
    difference: float
    se: float
    seeds: int
    paper_difference: float | None  # the paper's relative gap times the lower method's mean here

    @property
    def z(self) -> float:
        if self.seeds < 2 or not self.se > 0:
            return math.copysign(math.inf, self.difference) if self.seeds >= 2 and self.difference else math.nan
        return self.difference / self.se

    @property
    def verdict(self) -> str:
        if self.seeds < 2 or math.isnan(self.z):
            return "undecided"
        if self.z >= MARGIN:
            return "holds"
        if self.z <= -MARGIN:
            return "fails"
        if self.paper_difference is not None and self.paper_difference > 0 \
                and self.difference + MARGIN * self.se < self.paper_difference:
            return "fails"
        return "undecided"

    @property
    def powered(self) -> bool | None:
        """Whether a gap of the paper's size would show at 2 standard errors (None: no paper size)."""
        if self.paper_difference is None or self.seeds < 2:
            return None
        return MARGIN * self.se < abs(self.paper_difference)


@dataclass(frozen=True)
class TaskVerdict:
    task: str
    summaries: tuple[Summary, ...]  # one per method of the claim, in its order
    steps: tuple[Step, ...]

    @property
    def verdict(self) -> str:
        """``holds`` when every step holds, ``fails`` when some step fails, else ``undecided``."""
        verdicts = [s.verdict for s in self.steps]
        if verdicts and all(v == "holds" for v in verdicts):
            return "holds"
        return "fails" if "fails" in verdicts else "undecided"

    @property
    def deciding_step(self) -> Step:
        """The step the verdict turns on: the smallest in standard errors (a failing one when it fails)."""
        failing = [s for s in self.steps if s.verdict == "fails"]
        pool = failing or [s for s in self.steps if not math.isnan(s.z)] or list(self.steps)
        return min(pool, key=lambda s: s.z if not math.isnan(s.z) else math.inf)


@dataclass(frozen=True)
class ClaimVerdict:
    claim: ClaimSpec
    tasks: tuple[TaskVerdict, ...]

    @property
    def summary(self) -> str:
        """``holds on 2 of 3 tasks, fails on 1`` and so on."""
        counts = {v: sum(t.verdict == v for t in self.tasks) for v in ("holds", "fails", "undecided")}
        parts = [f"{verb} on {n}" for verb, n in counts.items() if n]
        return f"{', '.join(parts)} of {len(self.tasks)} tasks"


def per_seed_values(spec: StudySpec, results: StudyResults, claim: ClaimSpec, task: str, method: str) -> dict[int, float]:
    """Seed -> the claim's metric for one method on one task (the base model: seed -1)."""
    if claim.metric == "training_curve":
        curves = results.curves.get((task, method), {})
        return dict(zip(sorted(curves), tail_mean(curves, spec.curve_tail)))
    key = spec.metric_key(task, claim.metric)
    if method == BASE:
        means = results.base.get(task, {})
        return {-1: means[key]} if key in means else {}
    return {seed: means[key] for seed, means in results.final.get((task, method), {}).items() if key in means}


def paired_step(lower: Mapping[int, float], higher: Mapping[int, float], paper_effect: float | None,
                names: tuple[str, str]) -> Step:
    """The paired difference ``higher - lower`` over the seeds both have (the base model pairs with all)."""
    if -1 in lower or -1 in higher:  # the base model: one evaluation, the same for every seed
        base = lower.get(-1, higher.get(-1))
        lower = {s: base for s in higher} if -1 in lower else lower
        higher = {s: base for s in lower} if -1 in higher else higher
    seeds = sorted(set(lower) & set(higher))
    diffs = np.array([higher[s] - lower[s] for s in seeds], dtype=np.float64)
    summary = summarize(diffs)
    low_mean = float(np.mean([lower[s] for s in seeds])) if seeds else math.nan
    paper = None if paper_effect is None or not seeds else paper_effect * abs(low_mean)
    return Step(names[0], names[1], summary.mean, summary.se, summary.n, paper)


def check_claim(spec: StudySpec, results: StudyResults, claim: ClaimSpec) -> ClaimVerdict:
    verdicts = []
    for task in claim.tasks:
        values = [per_seed_values(spec, results, claim, task, m) for m in claim.increasing]
        summaries = tuple(summarize([v for _, v in sorted(vals.items())]) for vals in values)
        effect = claim.paper_effect.get(task)
        steps = tuple(
            paired_step(values[i], values[i + 1], effect, (claim.increasing[i], claim.increasing[i + 1]))
            for i in range(len(values) - 1)
        )
        verdicts.append(TaskVerdict(task, summaries, steps))
    return ClaimVerdict(claim, tuple(verdicts))


def check_claims(spec: StudySpec, results: StudyResults) -> list[ClaimVerdict]:
    return [check_claim(spec, results, claim) for claim in spec.claims]


def _number(value: float | None) -> float | None:
    return None if value is None or not math.isfinite(value) else float(value)


def claims_records(spec: StudySpec, verdicts: list[ClaimVerdict]) -> list[dict[str, Any]]:
    """One record per claim and task: ``claim, task, measure, difference, se, seeds, verdict`` and the
    deciding step's methods, its size in standard errors and the paper's gap (``claims.json``)."""
    records = []
    for verdict in verdicts:
        for task in verdict.tasks:
            step = task.deciding_step
            records.append({
                "claim": verdict.claim.text, "task": task.task, "measure": MEASURES[verdict.claim.metric],
                "metric": verdict.claim.metric, "difference": _number(step.difference), "se": _number(step.se),
                "seeds": step.seeds, "verdict": task.verdict, "lower": step.lower, "higher": step.higher,
                "z": _number(step.z), "paper_difference": _number(step.paper_difference), "powered": step.powered,
            })
    return records


def claims_json(spec: StudySpec, verdicts: list[ClaimVerdict]) -> str:
    return json.dumps(claims_records(spec, verdicts), indent=1) + "\n"


def step_text(spec: StudySpec, step: Step) -> str:
    """``LOOP k=4 - PPO = +0.0312 +- 0.0101 (+3.1 SE, 3 seeds; paper's gap 0.05)``."""
    if step.seeds == 0:
        return f"{spec.label(step.higher)} - {spec.label(step.lower)}: no paired runs yet"
    se = "" if math.isnan(step.se) else f" \u00b1 {step.se:.4f}"
    z = "" if math.isnan(step.z) else f", {step.z:+.1f} SE"
    paper = "" if step.paper_difference is None else f"; the paper's gap here: {step.paper_difference:.4f}"
    return (f"{spec.label(step.higher)} \u2212 {spec.label(step.lower)} = {step.difference:+.4f}{se}"
            f" ({step.seeds} seeds{z}{paper})")


def claims_markdown(spec: StudySpec, verdicts: list[ClaimVerdict]) -> str:
    """One paragraph per claim: its verdicts, then per task the means in the claimed order and each step."""
    lines = []
    for verdict in verdicts:
        claim = verdict.claim
        lines.append(f"- **{claim.text}** ({MEASURES[claim.metric]}, {claim.metric}): {verdict.summary}")
        for task in verdict.tasks:
            chain = ", ".join(
                f"{spec.label(m)} {s.mean:.4f}" if s.n else f"{spec.label(m)} \u2013"
                for m, s in zip(claim.increasing, task.summaries)
            )
            steps = "; ".join(step_text(spec, s) for s in task.steps)
            lines.append(f"  - {spec.tasks[task.task].label}: **{task.verdict}** ({chain}). {steps}")
    return "\n".join(lines) + "\n"
