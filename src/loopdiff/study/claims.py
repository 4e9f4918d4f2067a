"""Checking the paper's claims against the study's numbers: does the order of the methods' means hold per task?"""

from __future__ import annotations

import math
from dataclasses import dataclass

from loopdiff.study.curves import tail_mean
from loopdiff.study.results import StudyResults
from loopdiff.study.spec import ClaimSpec, StudySpec
from loopdiff.study.stats import Summary, summarize


@dataclass(frozen=True)
class TaskVerdict:
    task: str
    summaries: tuple[Summary, ...]  # one per method of the claim, in its order
    holds: bool | None  # None: some method has no finished run on this task

    @property
    def smallest_margin(self) -> float:
        """The smallest step up between neighbours in units of the combined standard error (nan if unknown)."""
        margins = []
        for a, b in zip(self.summaries, self.summaries[1:]):
            se = math.sqrt(sum(0.0 if math.isnan(s.se) else s.se**2 for s in (a, b)))
            gap = b.mean - a.mean
            margins.append(math.copysign(math.inf, gap) if se == 0 else gap / se)
        return min(margins) if margins else math.nan


@dataclass(frozen=True)
class ClaimVerdict:
    claim: ClaimSpec
    tasks: tuple[TaskVerdict, ...]

    @property
    def decided(self) -> list[TaskVerdict]:
        return [t for t in self.tasks if t.holds is not None]

    @property
    def summary(self) -> str:
        """``holds on all 3 tasks``, ``holds on 2 of 3 tasks`` or ``no finished runs yet``."""
        decided = self.decided
        if not decided:
            return "no finished runs yet"
        held = sum(t.holds for t in decided)
        pending = len(self.tasks) - len(decided)
        text = f"holds on all {held} tasks" if held == len(decided) else f"holds on {held} of {len(decided)} tasks"
        return text + (f" ({pending} still missing runs)" if pending else "")


def claim_values(spec: StudySpec, results: StudyResults, claim: ClaimSpec, task: str, method: str) -> list[float]:
    """Per-seed values of the claim's metric for one method on one task."""
    if claim.metric == "training_curve":
        return tail_mean(results.curves.get((task, method), {}), spec.curve_tail)
    return results.values(task, method, spec.metric_key(task, claim.metric))


def check_claim(spec: StudySpec, results: StudyResults, claim: ClaimSpec) -> ClaimVerdict:
    verdicts = []
    for task in claim.tasks:
        summaries = tuple(summarize(claim_values(spec, results, claim, task, m)) for m in claim.increasing)
        if any(s.n == 0 for s in summaries):
            holds = None
        else:
            holds = all(a.mean < b.mean for a, b in zip(summaries, summaries[1:]))
        verdicts.append(TaskVerdict(task, summaries, holds))
    return ClaimVerdict(claim, tuple(verdicts))


def check_claims(spec: StudySpec, results: StudyResults) -> list[ClaimVerdict]:
    return [check_claim(spec, results, claim) for claim in spec.claims]


def claims_markdown(spec: StudySpec, verdicts: list[ClaimVerdict]) -> str:
    """One paragraph per claim: the verdict, then per task the means in the claimed order."""
    lines = []
    for verdict in verdicts:
        claim = verdict.claim
        lines.append(f"- **{claim.text}** ({claim.metric}): {verdict.summary}")
        for task in verdict.tasks:
            chain = ", ".join(
                f"{spec.label(m)} {s.mean:.4f}" if s.n else f"{spec.label(m)} \u2013"
                for m, s in zip(claim.increasing, task.summaries)
            )
            mark = {True: "yes", False: "no", None: "pending"}[task.holds]
            margin = "" if task.holds is None else f"; smallest step {task.smallest_margin:+.1f} SE"
            lines.append(f"  - {spec.tasks[task.task].label}: {mark} ({chain}{margin})")
    return "\n".join(lines) + "\n"
