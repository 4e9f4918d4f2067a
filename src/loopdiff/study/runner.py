"""Planning and running a study: one ordinary training run per (task, method, seed), one base-model
evaluation per task, finished runs skipped, crashed runs resumed from their checkpoints, N runs at once
(in N worker processes that each import the libraries once and then take job after job).
"""

from __future__ import annotations

import contextlib
import fnmatch
import gc
import json
import os
import sys
import time
import traceback
import multiprocessing
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Sequence

from loopdiff.config import RunConfig, upgrade_renamed_fields
from loopdiff.study.results import (
    BASE_TAG, FINAL_TAG, RUN_RECORD, VARIANCE_FILE, base_dir, read_eval, run_dir, variance_dir,
)
from loopdiff.study.spec import StudyError, StudySpec, VarianceSpec

DEFAULT_STUDY = "study-paper.yaml"
LOG_FILE = "study_log.txt"
IGNORED_CHANGES = ("training.epochs", "output.")  # config fields a finished run may differ in


@dataclass(frozen=True)
class Job:
    """One unit of work: a training run (``kind="run"``), a base-model evaluation (``kind="base"``) or the
    estimators' gradient noise at the base model (``kind="variance"``)."""

    kind: str
    task: str
    method: str | None
    seed: int | None
    folder: Path
    config: RunConfig
    variance: VarianceSpec | None = None

    @property
    def id(self) -> str:
        if self.kind in ("base", "variance"):
            return f"{self.kind}/{self.task}"
        return f"{self.task}/{self.method}/seed{self.seed}"

    def is_done(self) -> bool:
        """Base: ``eval/base.json`` exists. Run: ``eval/final.json`` exists and was written at the last epoch.
        Variance: ``variance.json`` exists."""
        if self.kind == "base":
            return read_eval(self.folder, BASE_TAG) is not None
        if self.kind == "variance":
            return (self.folder / VARIANCE_FILE).is_file()
        record = read_eval(self.folder, FINAL_TAG)
        return record is not None and record.get("epoch") == self.config.training.epochs


@dataclass
class StudyOutcome:
    ran: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)  # job id -> its log file
    wall_time_s: float = 0.0
    report: Path | None = None


# ---------------------------------------------------------------- planning


def plan_study(spec: StudySpec, out: Path, only: Sequence[str] = ()) -> list[Job]:
    """Base evaluations first, then the runs, filtered by the fnmatch patterns ``only`` (all when empty).

    Run ids are ``<task>/<method>/seed<k>``, base ids ``base/<task>``; a task's base evaluation is kept
    whenever one of its runs is selected."""
    out = Path(out)
    runs = [
        Job("run", task, method, seed, run_dir(out, task, method, seed),
            spec.run_config(task, method, seed, run_dir(out, task, method, seed)))
        for task, method in spec.pairs()
        for seed in spec.seeds
    ]
    bases = [Job("base", task, None, None, base_dir(out, task), spec.base_config(task, base_dir(out, task)))
             for task in spec.tasks]
    variance = [Job("variance", task, None, None, variance_dir(out, task),
                    spec.base_config(task, variance_dir(out, task)), spec.variance)
                for task in (spec.variance.tasks if spec.variance else ())]
    if only:
        runs = [job for job in runs if _matches(job.id, only)]
        wanted = {job.task for job in runs}
        bases = [job for job in bases if job.task in wanted or _matches(job.id, only)]
        variance = [job for job in variance if _matches(job.id, only)]
        if not runs and not bases and not variance:
            raise StudyError(f"--only {' '.join(only)} matches no run; run ids look like "
                             f"'{spec.pairs()[0][0]}/{spec.pairs()[0][1]}/seed{spec.seeds[0]}' or 'base/<task>'")
    for job in runs:
        _check_unchanged(job)
    return bases + variance + runs


def _matches(job_id: str, patterns: Sequence[str]) -> bool:
    return any(fnmatch.fnmatchcase(job_id, p) for p in patterns)


def _flatten(values: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in values.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _check_unchanged(job: Job) -> None:
    """A run folder started with other settings must not be silently continued or reported."""
    saved_file = job.folder / "config.json"
    if not saved_file.is_file():
        return
    planned = _flatten(job.config.to_dict())
    # a field the saved config lacks (added to loopdiff since that run started) counts at its default
    saved_config = upgrade_renamed_fields(json.loads(saved_file.read_text()), warn=False)
    saved = {**_flatten(RunConfig().to_dict()), **_flatten(saved_config)}
    changed = [k for k in planned if saved.get(k) != planned[k] and not k.startswith(IGNORED_CHANGES)]
    if changed:
        k = changed[0]
        raise StudyError(
            f"run {job.id} in '{job.folder}' was started with {k}={saved.get(k)!r}, the study now asks for "
            f"{planned[k]!r} ({len(changed)} field(s) differ); use another --out or delete that run folder"
        )


def preflight(jobs: Sequence[Job]) -> None:
    """Fail before anything runs if a prompt source, a reward or a local model folder is missing."""
    from loopdiff.prompts import PromptError, load_prompt_set
    from loopdiff.rewards.base import RewardError, import_reward_target, parse_reward_spec, registered_rewards
    from loopdiff.models import resolve_pretrained
    from loopdiff.plugins import registered_models

    registry, checked, models = registered_rewards(), set(), registered_models()
    for job in jobs:
        c = job.config
        key = (c.prompts.train, c.prompts.val, c.reward.name, tuple(c.eval.rewards), c.model.pretrained)
        if key in checked:
            continue
        checked.add(key)
        for source in (c.prompts.train, c.prompts.val):
            try:
                load_prompt_set(source)
            except PromptError as error:
                raise StudyError(f"task '{job.task}': {error}") from None
        for spec in (c.reward.name, *c.eval.rewards):
            for name, _ in parse_reward_spec(spec):
                if ":" in name:  # the user's package.module:function
                    try:
                        import_reward_target(name, registry)
                    except RewardError as error:
                        raise StudyError(f"task '{job.task}': {error}") from None
                    continue
                info = registry.get(name)
                if info is None:
                    raise StudyError(f"task '{job.task}': unknown reward '{name}'; registered: {', '.join(registry)} "
                                     "(or package.module:function)")
                reason = info.unavailable_reason(c.reward.options.get(name, {}))
                if reason is not None:
                    raise StudyError(f"task '{job.task}': reward '{name}' cannot run here: {reason}")
        source = Path(resolve_pretrained(c.model.pretrained)).expanduser()
        if (source.exists() or c.model.pretrained in models) and not (source / "model_index.json").is_file():
            raise StudyError(f"model.pretrained='{c.model.pretrained}': no diffusers pipeline in '{source}'")


# ---------------------------------------------------------------- running one job


def execute_job(job: Job) -> None:
    """Run one job in this process: evaluate the base model, or train (resuming from a checkpoint)."""
    from loopdiff.training.trainer import Trainer

    if job.kind == "variance":
        from loopdiff.study.variance import measure_variance

        spec = job.variance
        assert spec is not None
        measure_variance(Trainer(job.config), spec, job.folder / VARIANCE_FILE)
        return
    if job.kind == "base":
        trainer = Trainer(job.config)
        trainer.evaluate(BASE_TAG)
        if job.config.eval.deterministic:
            trainer.evaluate(BASE_TAG, deterministic=True)
        return
    _drop_unsaved_metrics(job.folder)
    Trainer(job.config).train()
    _keep_last_checkpoint(job.folder)


def _drop_unsaved_metrics(folder: Path) -> None:
    """A run that crashed before its first checkpoint restarts from epoch 0: forget the epochs it logged."""
    from loopdiff.training.checkpoint import latest_checkpoint

    metrics = folder / "metrics.jsonl"
    if metrics.is_file() and latest_checkpoint(folder) is None:
        metrics.unlink()


def _keep_last_checkpoint(folder: Path) -> None:
    import shutil

    from loopdiff.training.checkpoint import latest_checkpoint

    newest = latest_checkpoint(folder)
    for old in (folder / "checkpoints").glob("epoch_*"):
        if newest is not None and old != newest:
            shutil.rmtree(old, ignore_errors=True)


def run_in_process(job: Job, threads: int | None) -> bool:
    """Run ``job`` here with its console output in the job's log file; False (and a traceback) on failure.

    Use one thread per job on a busy machine: spinning OpenMP threads on oversubscribed cores made the
    small models here 20-50x slower."""
    import torch

    if threads:
        torch.set_num_threads(threads)
    job.folder.mkdir(parents=True, exist_ok=True)
    with (job.folder / LOG_FILE).open("a") as log, contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
        try:
            execute_job(job)
            return True
        except Exception:  # one failed run must not stop the study; the log keeps the traceback
            traceback.print_exc(file=log)
            return False
        finally:
            gc.collect()  # the finished run's models and optimizer state


def _timed_job(job: Job, threads: int) -> tuple[bool, float]:
    t0 = time.perf_counter()
    ok = run_in_process(job, threads)
    return ok, time.perf_counter() - t0


# ---------------------------------------------------------------- running the study


def available_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def run_study(
    spec: StudySpec,
    out: Path,
    jobs: int = 1,
    threads: int | None = None,
    only: Sequence[str] = (),
    command: str = "",
    progress: bool = True,
    log: Callable[[str], None] | None = None,
) -> StudyOutcome:
    """Run every unfinished job of the study (``jobs`` at a time) and record ``study.json`` (the report is
    ``loopdiff.reports.study_command.run_and_report``'s).

    With ``jobs == 1`` the runs share this process; otherwise ``jobs`` worker processes run them, each with
    ``threads`` (default: cores // jobs) torch threads."""
    from tqdm.auto import tqdm

    if jobs < 1:
        raise StudyError(f"--jobs {jobs} must be >= 1")
    if threads is not None and threads < 1:
        raise StudyError(f"--threads {threads} must be >= 1")
    out = Path(out)
    plan = plan_study(spec, out, only)
    preflight(plan)
    threads = threads or max(1, available_cores() // jobs)
    write = log or tqdm.write
    outcome = StudyOutcome(skipped=[job.id for job in plan if job.is_done()])
    todo = [job for job in plan if not job.is_done()]
    started, start = _now(), time.perf_counter()
    bar = tqdm(total=len(plan), initial=len(outcome.skipped), desc="runs", unit="run", disable=not progress)

    def finished(job: Job, ok: bool, seconds: float) -> None:
        bar.update(1)
        if ok and job.is_done():
            outcome.ran.append(job.id)
            (job.folder / RUN_RECORD).write_text(json.dumps(
                {"id": job.id, "wall_time_s": seconds, "threads": threads, "finished": _now()}, indent=1))
            write(f"[{len(outcome.ran) + len(outcome.failed)}/{len(todo)}] {job.id} finished in {seconds:.1f} s")
        else:
            outcome.failed[job.id] = str(job.folder / LOG_FILE)
            write(f"[{len(outcome.ran) + len(outcome.failed)}/{len(todo)}] {job.id} FAILED after {seconds:.1f} s "
                  f"(log: {job.folder / LOG_FILE})")

    try:
        if jobs == 1:
            for job in todo:
                t0 = time.perf_counter()
                ok = run_in_process(job, threads)
                finished(job, ok, time.perf_counter() - t0)
        else:
            _run_parallel(todo, jobs, threads, finished)
    finally:
        bar.close()
        outcome.wall_time_s = time.perf_counter() - start
        _record_study(spec, out, plan, outcome, command, started, jobs, threads)
    return outcome


def exit_with_parent() -> None:
    """In a worker: ask Linux to end this process when its parent dies (a killed ``loopdiff study`` must not
    leave workers training into the study's folders); elsewhere nothing happens."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes
    import signal

    pr_set_pdeathsig = 1
    ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM)
    if os.getppid() == 1:  # the parent died before the call
        os._exit(1)


def _run_parallel(todo: list[Job], jobs: int, threads: int, finished: Callable[[Job, bool, float], None]) -> None:
    """``jobs`` worker processes (spawned, so no OpenMP state is forked) take the jobs in order; they end
    when this process ends, however it ends."""
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(jobs, mp_context=context, initializer=exit_with_parent) as pool:
        futures = {pool.submit(_timed_job, job, threads): job for job in todo}
        for future in as_completed(futures):
            try:
                ok, seconds = future.result()
            except Exception as error:  # a worker died (out of memory, killed): its job and the queued ones fail
                with (futures[future].folder / LOG_FILE).open("a") as log:
                    log.write(f"the worker process running this job died: {error!r}\n")
                ok, seconds = False, 0.0
            finished(futures[future], ok, seconds)


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _record_study(spec: StudySpec, out: Path, plan: list[Job], outcome: StudyOutcome, command: str,
                  started: str, jobs: int, threads: int) -> None:
    """Append this invocation to ``<out>/study.json`` and refresh the status of every planned run."""
    path = out / "study.json"
    record = json.loads(path.read_text()) if path.is_file() else {"name": spec.name, "invocations": [], "runs": {}}
    record["spec"] = spec.source
    record["invocations"].append({
        "command": command, "cwd": os.getcwd(), "started": started, "finished": _now(),
        "wall_time_s": outcome.wall_time_s, "jobs": jobs, "threads_per_job": threads,
        "ran": len(outcome.ran), "skipped": len(outcome.skipped), "failed": sorted(outcome.failed),
    })
    record["total_wall_time_s"] = sum(i["wall_time_s"] for i in record["invocations"])
    for job in plan:
        timing = job.folder / RUN_RECORD
        record["runs"][job.id] = {
            "status": "done" if job.is_done() else ("failed" if job.id in outcome.failed else "not run"),
            "folder": str(job.folder),
            "wall_time_s": json.loads(timing.read_text())["wall_time_s"] if timing.is_file() else None,
        }
    out.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=1))


# ---------------------------------------------------------------- study configs


def resolve_study_path(name: str | None) -> Path:
    """A study file path, or the name of a study config shipped in ``loopdiff/configs`` (default: the paper's)."""
    from importlib import resources

    shipped = Path(str(resources.files("loopdiff") / "configs"))
    if name is None:
        return shipped / DEFAULT_STUDY
    path = Path(name)
    if not path.is_file() and "/" not in name and (shipped / name).is_file():
        return shipped / name
    if not path.is_file():
        available = ", ".join(sorted(p.name for p in shipped.glob("study-*.yaml")))
        raise StudyError(f"study config '{name}' does not exist (shipped study configs: {available})")
    return path
