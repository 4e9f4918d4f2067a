"""``loopdiff study``: run a study's unfinished jobs (``loopdiff.study.runner``), then write its report
(``loopdiff.reports.study``); the study package itself never reads or writes a report."""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path
from typing import Any

from loopdiff.reports.study import build_report
from loopdiff.study.runner import DEFAULT_STUDY, StudyOutcome, plan_study, resolve_study_path, run_study
from loopdiff.study.spec import StudyError, StudySpec, load_study_spec


def run_and_report(spec: StudySpec, out: Path, **options: Any) -> StudyOutcome:
    """:func:`~loopdiff.study.runner.run_study` (``options`` are its keywords), then the report of every
    finished run; the outcome's ``report`` is the report's index."""
    outcome = run_study(spec, out, **options)
    outcome.report = build_report(spec, Path(out))
    return outcome


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="loopdiff study",
        description="Reproduce the paper's comparisons: train every (task, method, seed) of a study config, "
        "evaluate the base model once per task, and write tables, training curves, image grids and a claims "
        "check to <out>/report/index.html. Finished runs are skipped; interrupted runs resume.",
    )
    parser.add_argument("config", nargs="?", default=None,
                        help=f"study YAML, or the name of a shipped one (default: {DEFAULT_STUDY}: Tables 1 and 2 on the "
                        "embedded world; study-smoke.yaml: a few-minute check)")
    parser.add_argument("--out", default=None, help="study folder (default: studies/<study name>)")
    parser.add_argument("--jobs", type=int, default=1,
                        help="runs at once, in N worker processes with cores // N torch threads each (default 1)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads per job (default: cores // jobs); 1 on a machine shared with other work")
    parser.add_argument("--only", action="append", default=[], metavar="PATTERN",
                        help="run only jobs whose id matches this glob, e.g. 'color/*' or '*/ppo/seed0' "
                        "(repeatable); ids are <task>/<method>/seed<k> and base/<task>")
    parser.add_argument("--report-only", action="store_true", help="rebuild the report from the finished runs")
    parser.add_argument("--dry-run", action="store_true", help="list the jobs and whether each is finished")
    return parser


def study_cli(argv: list[str] | None = None) -> int:
    """``loopdiff study [CONFIG] [--out DIR] [--jobs N] [--only PATTERN] [--report-only] [--dry-run]``."""
    from loopdiff.config import ConfigError
    from loopdiff.prompts import PromptError
    from loopdiff.rewards.base import RewardError

    args = build_parser().parse_args(argv)
    command = shlex.join(["loopdiff", "study", *(sys.argv[1:] if argv is None else argv)])
    try:
        spec = load_study_spec(resolve_study_path(args.config))
        out = Path(args.out or Path("studies") / spec.name)
        if args.report_only:
            print(f"report: {build_report(spec, out)}")
            return 0
        if args.dry_run:
            for job in plan_study(spec, out, args.only):
                print(f"{'done' if job.is_done() else 'todo'}  {job.id}  {job.folder}")
            return 0
        outcome = run_and_report(spec, out, jobs=args.jobs, threads=args.threads, only=args.only, command=command)
    except (StudyError, ConfigError, PromptError, RewardError) as error:
        print(f"loopdiff study: error: {error}", file=sys.stderr)
        return 2
    print(f"{len(outcome.ran)} ran, {len(outcome.skipped)} already finished, {len(outcome.failed)} failed "
          f"in {outcome.wall_time_s:.0f} s; report: {outcome.report}")
    for job_id, log_file in outcome.failed.items():
        print(f"  failed: {job_id} (log: {log_file})", file=sys.stderr)
    return 1 if outcome.failed else 0
