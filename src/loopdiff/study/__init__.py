"""``loopdiff study``: reproduce the paper's comparisons with one command.

A study config names tasks, methods, seeds and tables; every (task, method, seed) becomes an ordinary
training run, the base model is evaluated once per task, and ``<out>/report/`` collects tables
(mean +/- standard error over seeds), training curves with 80% prediction intervals, image grids and a
check of the paper's claims. See ``docs/study.md``. The command, which runs a study and then writes its
report, is ``loopdiff.reports.study_command.study_cli``: the study package sits below the reports.
"""

from __future__ import annotations

from loopdiff.study.spec import StudyError, StudySpec, load_study_spec, study_spec_from_dict


__all__ = ["StudyError", "StudySpec", "load_study_spec", "study_spec_from_dict"]
