"""``loopdiff study``: reproduce the paper's comparisons with one command.

A study config names tasks, methods, seeds and tables; every (task, method, seed) becomes an ordinary
training run, the base model is evaluated once per task, and ``<out>/report/`` collects tables
(mean +/- standard error over seeds), training curves with 80% prediction intervals, image grids and a
check of the paper's claims. See ``docs/study.md``.
"""

from __future__ import annotations

from loopdiff.study.spec import StudyError, StudySpec, load_study_spec, study_spec_from_dict


def study_cli(argv: list[str] | None = None) -> int:
    """The ``loopdiff study`` command (argument parsing inside); returns the exit code."""
    from loopdiff.study.runner import study_cli as run

    return run(argv)


__all__ = ["StudyError", "StudySpec", "load_study_spec", "study_cli", "study_spec_from_dict"]
