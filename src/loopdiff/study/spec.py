"""The study config: which tasks, methods and seeds to run, and which tables, curves, grids and claims to report.

A study file (YAML) looks like::

    name: paper
    seeds: [0, 1, 2]
    evaluator: embedded_eval          # held-out reward beside each task's training reward (or task -> reward)
    base: {...}                       # any run-config sections, shared by every run
    tasks:                            # name -> label + run-config overrides
      color: {label: Color, prompts: {train: embedded:color, val: embedded:color:val},
              reward: {name: embedded_vqa}}
    methods:                          # name -> label + run-config overrides (usually the estimator)
      ppo: {label: PPO, estimator: {preset: ppo}}
      loop_k4: {label: LOOP k=4, estimator: {preset: loop, samples_per_prompt: 4}}
    tables:                           # name -> methods x tasks; "base" is the model before fine-tuning
      table2: {title: ..., methods: [base, ppo, loop_k4], tasks: [color]}
    grids: {methods: [base, ppo, loop_k4], seed: 0, images_per_model: 3, prompts: 4}
    claims:                           # "holds" when the methods' means increase strictly in this order
      - {text: LOOP k=4 beats PPO, increasing: [ppo, loop_k4], metric: training}

Every (task, method) pair that appears in a table is trained once per seed. Every error names the field
and the bad value.
"""

from __future__ import annotations

import copy
import math
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Mapping, Sequence

import yaml

from loopdiff.config import ConfigError, RunConfig, check_fields, config_from_dict, load_yaml

BASE = "base"  # the table row of the model before fine-tuning (evaluated once per task)
METRICS = ("training", "evaluator", "training_curve")
METRIC_LABELS = {
    "training": "training reward on the validation prompts",
    "evaluator": "held-out evaluator on the validation prompts",
    "training_curve": "training reward over the last epochs",
}
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
_TOP_LEVEL = ("name", "seeds", "evaluator", "base", "tasks", "methods", "tables", "grids", "claims", "curve_tail",
              "variance", "efficiency")


class StudyError(ValueError):
    """A study config is invalid; the message names the field, the value and what is allowed."""


@dataclass(frozen=True)
class Entry:
    """A task or a method: a display label and the run-config overrides it applies."""

    name: str
    label: str
    overrides: Mapping[str, Any]


@dataclass(frozen=True)
class TableSpec:
    name: str
    title: str
    methods: tuple[str, ...]
    tasks: tuple[str, ...]


@dataclass(frozen=True)
class GridSpec:
    """Side-by-side image grids per task: the same validation prompts and seeds for each method."""

    methods: tuple[str, ...]
    seed: int
    images_per_model: int = 3
    prompts: int = 4


@dataclass(frozen=True)
class VarianceSpec:
    """Per-estimator gradient noise and signal at the base model (``loopdiff.diagnostics.estimator_variance``):
    ``groups`` training prompts x the largest K of the estimators, one shared set of score gradients."""

    tasks: tuple[str, ...]
    estimators: dict[str, Entry]  # name -> label + estimator fields (preset, samples_per_prompt, ...)
    groups: int = 64
    batch: int = 24  # the SNR is reported for a gradient from this many samples
    seed: int = 0


@dataclass(frozen=True)
class EfficiencySpec:
    """Samples and wall time each method needs to reach the ``reference`` method's final scores on ``tasks``."""

    tasks: tuple[str, ...]
    methods: tuple[str, ...]
    reference: str


@dataclass(frozen=True)
class ClaimSpec:
    """The methods' means increase in the order given (``loopdiff.study.claims`` decides it per task);
    ``paper_effect``: per task, the paper's relative gap of each step (a fraction of the lower mean)."""

    text: str
    increasing: tuple[str, ...]
    metric: str
    tasks: tuple[str, ...]
    paper_effect: Mapping[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class StudySpec:
    name: str
    seeds: tuple[int, ...]
    base: Mapping[str, Any]
    tasks: dict[str, Entry]
    methods: dict[str, Entry]
    tables: dict[str, TableSpec]
    grids: GridSpec | None
    claims: tuple[ClaimSpec, ...]
    evaluator: Mapping[str, str] | None = None  # task -> held-out evaluator (a study-wide name is set per task)
    variance: VarianceSpec | None = None
    efficiency: EfficiencySpec | None = None
    curve_tail: float = 0.25  # the "training_curve" metric averages this final fraction of the epochs
    source: str = ""

    def pairs(self) -> list[tuple[str, str]]:
        """The (task, method) pairs to train: every table cell except the base model, in table order."""
        seen: dict[tuple[str, str], None] = {}
        for table in self.tables.values():
            for task in table.tasks:
                for method in table.methods:
                    if method != BASE:
                        seen[(task, method)] = None
        return list(seen)

    def run_config(self, task: str, method: str, seed: int, run_dir: Path) -> RunConfig:
        """base <- task <- method overrides, then the study's fixed fields (folder, seed, no base eval)."""
        values = merge(self.base, self.tasks[task].overrides, self.methods[method].overrides)
        values = merge(values, {
            "training": {"seed": seed},
            "eval": {"before_training": False},
            "output": {"dir": str(run_dir), "resume": True, "progress": False},
        })
        return self._validated(values, task, f"run {task}/{method}/seed{seed}")

    def base_config(self, task: str, run_dir: Path) -> RunConfig:
        """The config that evaluates the model before fine-tuning on ``task`` (no training)."""
        values = merge(self.base, self.tasks[task].overrides, {
            "training": {"epochs": 0},
            "output": {"dir": str(run_dir), "resume": False, "progress": False},
        })
        return self._validated(values, task, f"base evaluation of task '{task}'")

    def metric_key(self, task: str, metric: str) -> str | None:
        """The reward name under which ``metric`` is stored in a run's ``eval/*.json`` means."""
        if metric == "evaluator":
            return self.evaluator_for(task)
        return self.base_config(task, Path(".")).reward.name

    def evaluator_for(self, task: str) -> str | None:
        """The held-out evaluator reported on ``task`` (None: the study has none for it)."""
        return (self.evaluator or {}).get(task)

    def label(self, method: str) -> str:
        return "Base model" if method == BASE else self.methods[method].label

    def _validated(self, values: dict[str, Any], task: str, what: str) -> RunConfig:
        evaluator = self.evaluator_for(task)
        if evaluator:
            rewards = list(values.get("eval", {}).get("rewards", []) or [])
            values = merge(values, {"eval": {"rewards": rewards + [evaluator] * (evaluator not in rewards)}})
        try:
            config = config_from_dict(values)
        except ConfigError as error:
            raise StudyError(f"study '{self.name}', {what}: {error}") from None
        if config.eval.max_prompts == 0:
            raise StudyError(f"study '{self.name}', {what}: eval.max_prompts=0 turns off the final evaluation "
                             "the study reads; use null (all prompts) or a positive number")
        return config


def merge(*layers: Mapping[str, Any]) -> dict[str, Any]:
    """Deep-merge mappings left to right (later layers win; nested mappings merge, other values replace)."""
    result: dict[str, Any] = {}
    for layer in layers:
        for key, value in layer.items():
            if isinstance(value, Mapping) and isinstance(result.get(key), Mapping):
                result[key] = merge(result[key], value)
            else:
                result[key] = copy.deepcopy(dict(value) if isinstance(value, Mapping) else value)
    return result


# ---------------------------------------------------------------- parsing


def load_study_spec(path: str | Path) -> StudySpec:
    """Read and validate a study YAML file."""
    path = Path(path)
    if not path.is_file():
        raise StudyError(f"study config '{path}' does not exist")
    try:
        data = load_yaml(path.read_text(), sections_at=[("base",), ("tasks", "*"), ("methods", "*")])
    except yaml.YAMLError as error:
        raise StudyError(f"study config '{path}' is not valid YAML: {error}") from None
    if not isinstance(data, Mapping):
        raise StudyError(f"study config '{path}' must hold a mapping with {', '.join(_TOP_LEVEL)}")
    return study_spec_from_dict(data, default_name=path.stem, source=str(path))


def study_spec_from_dict(data: Mapping[str, Any], default_name: str = "study", source: str = "") -> StudySpec:
    """Validate a study mapping (see the module docstring) into a StudySpec."""
    unknown = [key for key in data if key not in _TOP_LEVEL]
    if unknown:
        raise StudyError(f"unknown study field '{unknown[0]}'; allowed: {', '.join(_TOP_LEVEL)}")
    name = _name("name", data.get("name", default_name))
    base = _mapping("base", data.get("base", {}))
    tasks = _entries("tasks", data.get("tasks"))
    methods = _entries("methods", data.get("methods"))
    if BASE in methods:
        raise StudyError(f"methods.{BASE}: the name '{BASE}' is reserved for the model before fine-tuning")
    tables = _tables(data.get("tables"), tasks, methods)
    evaluator = _evaluators(data.get("evaluator"), tasks)
    spec = StudySpec(
        name=name,
        seeds=_seeds(data.get("seeds", [0])),
        base=base,
        tasks=tasks,
        methods=methods,
        tables=tables,
        grids=None,
        claims=(),
        evaluator=evaluator,
        curve_tail=_fraction("curve_tail", data.get("curve_tail", 0.25)),
        source=source,
    )
    pairs = set(spec.pairs())
    spec = replace(spec, grids=_grids(data.get("grids"), spec), claims=_claims(data.get("claims", []), spec, pairs),
                   variance=_variance(data.get("variance"), tasks), efficiency=_efficiency(data.get("efficiency"), spec, pairs))
    _check_runs(spec)
    return spec


def _name(path: str, value: Any) -> str:
    if not isinstance(value, str) or not _NAME.match(value):
        raise StudyError(f"{path}={value!r} must be a name of letters, digits, '_', '.' or '-' (it names folders)")
    return value


def _mapping(path: str, value: Any) -> dict[str, Any]:
    if not isinstance(value, Mapping):
        raise StudyError(f"{path}={value!r} must be a mapping")
    return dict(value)


def _names(path: str, value: Any, allowed: Sequence[str]) -> tuple[str, ...]:
    if not isinstance(value, (list, tuple)) or not value:
        raise StudyError(f"{path}={value!r} must be a non-empty list; allowed entries: {', '.join(allowed)}")
    for item in value:
        if item not in allowed:
            raise StudyError(f"{path} names '{item}', which is not defined; allowed: {', '.join(allowed)}")
    if len(set(value)) != len(value):
        raise StudyError(f"{path}={list(value)!r} repeats an entry")
    return tuple(value)


def _seeds(value: Any) -> tuple[int, ...]:
    if (not isinstance(value, (list, tuple)) or not value
            or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in value)):
        raise StudyError(f"seeds={value!r} must be a non-empty list of integers >= 0")
    if len(set(value)) != len(value):
        raise StudyError(f"seeds={list(value)!r} repeats a seed")
    return tuple(value)


def _fraction(path: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= 1:
        raise StudyError(f"{path}={value!r} must be a number in (0, 1]")
    return float(value)


def _efficiency(value: Any, spec: StudySpec, pairs: set[tuple[str, str]]) -> EfficiencySpec | None:
    if value is None:
        return None
    body = _mapping("efficiency", value)
    extra = [k for k in body if k not in ("tasks", "methods", "reference")]
    if extra:
        raise StudyError(f"unknown field 'efficiency.{extra[0]}'; allowed: tasks, methods, reference")
    tasks = _names("efficiency.tasks", body.get("tasks"), list(spec.tasks))
    methods = _names("efficiency.methods", body.get("methods"), list(spec.methods))
    reference = _names("efficiency.reference", [body.get("reference")], list(spec.methods))[0]
    for task in tasks:
        for method in (*methods, reference):
            if (task, method) not in pairs:
                raise StudyError(f"efficiency compares '{method}' on task '{task}', which no table trains")
    return EfficiencySpec(tasks, methods, reference)


def _variance(value: Any, tasks: Mapping[str, Entry]) -> VarianceSpec | None:
    if value is None:
        return None
    body = _mapping("variance", value)
    extra = [k for k in body if k not in ("tasks", "estimators", "groups", "batch", "seed")]
    if extra:
        raise StudyError(f"unknown field 'variance.{extra[0]}'; allowed: tasks, estimators, groups, batch, seed")
    counts = {}
    for key, default, least in (("groups", 64, 2), ("batch", 24, 1), ("seed", 0, 0)):
        counts[key] = body.get(key, default)
        if isinstance(counts[key], bool) or not isinstance(counts[key], int) or counts[key] < least:
            raise StudyError(f"variance.{key}={counts[key]!r} must be an integer >= {least}")
    value = body.get("estimators")
    if not isinstance(value, Mapping) or not value:
        raise StudyError(f"variance.estimators={value!r} must be a non-empty mapping of name -> estimator fields")
    estimators = {}
    for name, fields in value.items():
        fields = _mapping(f"variance.estimators.{_name(f'variance.estimators.{name}', name)}", fields or {})
        label = fields.pop("label", name)
        try:
            check_fields({"estimator": fields})
        except ConfigError as error:
            raise StudyError(f"variance.estimators.{name}: {error}") from None
        estimators[name] = Entry(name, str(label), fields)
    return VarianceSpec(_names("variance.tasks", body.get("tasks"), list(tasks)), estimators, **counts)


def _evaluators(value: Any, tasks: Mapping[str, Entry]) -> dict[str, str] | None:
    """``evaluator``: one reward name for every task, a mapping task -> reward name, or null."""
    if value is None:
        return None
    if isinstance(value, str) and value:
        return {task: value for task in tasks}
    if isinstance(value, Mapping):
        for task, name in value.items():
            if task not in tasks:
                raise StudyError(f"evaluator.{task}: no such task; tasks: {', '.join(tasks)}")
            if not isinstance(name, str) or not name:
                raise StudyError(f"evaluator.{task}={name!r} must be a reward name")
        return dict(value)
    raise StudyError(f"evaluator={value!r} must be a reward name, a mapping task -> reward name, or null")


def _entries(section: str, value: Any) -> dict[str, Entry]:
    if not isinstance(value, Mapping) or not value:
        raise StudyError(f"{section}={value!r} must be a non-empty mapping of name -> overrides")
    entries = {}
    for name, body in value.items():
        _name(f"{section}.{name}", name)
        body = _mapping(f"{section}.{name}", body if body is not None else {})
        label = body.pop("label", name)
        if not isinstance(label, str):
            raise StudyError(f"{section}.{name}.label={label!r} must be a string")
        try:  # unknown run-config fields and bad values, named by their place in the study file
            check_fields(body)
        except ConfigError as error:
            raise StudyError(f"{section}.{name}: {error}") from None
        entries[name] = Entry(name, label, body)
    return entries


def _tables(value: Any, tasks: Mapping[str, Entry], methods: Mapping[str, Entry]) -> dict[str, TableSpec]:
    if not isinstance(value, Mapping) or not value:
        raise StudyError(f"tables={value!r} must be a non-empty mapping of name -> {{methods, tasks}}")
    tables = {}
    for name, body in value.items():
        _name(f"tables.{name}", name)
        body = _mapping(f"tables.{name}", body)
        extra = [k for k in body if k not in ("title", "methods", "tasks")]
        if extra:
            raise StudyError(f"unknown field 'tables.{name}.{extra[0]}'; allowed: title, methods, tasks")
        tables[name] = TableSpec(
            name=name,
            title=str(body.get("title", name)),
            methods=_names(f"tables.{name}.methods", body.get("methods"), [BASE, *methods]),
            tasks=_names(f"tables.{name}.tasks", body.get("tasks"), list(tasks)),
        )
    return tables


def _grids(value: Any, spec: StudySpec) -> GridSpec | None:
    if value is None:
        return None
    body = _mapping("grids", value)
    extra = [k for k in body if k not in ("methods", "seed", "images_per_model", "prompts")]
    if extra:
        raise StudyError(f"unknown field 'grids.{extra[0]}'; allowed: methods, seed, images_per_model, prompts")
    seed = body.get("seed", spec.seeds[0])
    if seed not in spec.seeds:
        raise StudyError(f"grids.seed={seed!r} is not one of the study's seeds {list(spec.seeds)}")
    counts = {}
    for key, default in (("images_per_model", 3), ("prompts", 4)):
        counts[key] = body.get(key, default)
        if isinstance(counts[key], bool) or not isinstance(counts[key], int) or counts[key] < 1:
            raise StudyError(f"grids.{key}={counts[key]!r} must be an integer >= 1")
    methods = _names("grids.methods", body.get("methods"), [BASE, *spec.methods])
    return GridSpec(methods=methods, seed=seed, **counts)


def _claims(value: Any, spec: StudySpec, pairs: set[tuple[str, str]]) -> tuple[ClaimSpec, ...]:
    if not isinstance(value, (list, tuple)):
        raise StudyError(f"claims={value!r} must be a list of {{text, increasing, metric, tasks}}")
    claims = []
    for k, body in enumerate(value):
        where = f"claims[{k}]"
        body = _mapping(where, body)
        extra = [key for key in body if key not in ("text", "increasing", "metric", "tasks", "paper_effect")]
        if extra:
            raise StudyError(f"unknown field '{where}.{extra[0]}'; allowed: text, increasing, metric, tasks, "
                             "paper_effect")
        metric = body.get("metric", "training")
        if metric not in METRICS:
            raise StudyError(f"{where}.metric={metric!r} is invalid; allowed: {', '.join(METRICS)}")
        tasks = _names(f"{where}.tasks", body.get("tasks", list(spec.tasks)), list(spec.tasks))
        if metric == "evaluator" and not all(spec.evaluator_for(task) for task in tasks):
            missing = next(task for task in tasks if not spec.evaluator_for(task))
            raise StudyError(f"{where}.metric='evaluator' but the study sets no evaluator for task '{missing}'")
        allowed = list(spec.methods) if metric == "training_curve" else [BASE, *spec.methods]
        increasing = _names(f"{where}.increasing", body.get("increasing"), allowed)
        if len(increasing) < 2:
            raise StudyError(f"{where}.increasing={list(increasing)!r} must list at least two methods")
        for task in tasks:
            for method in increasing:
                if method != BASE and (task, method) not in pairs:
                    raise StudyError(f"{where} compares '{method}' on task '{task}', which no table trains")
        text = body.get("text") or " < ".join(spec.label(m) for m in increasing)
        effect = _paper_effect(where, body.get("paper_effect"), list(spec.tasks))
        claims.append(ClaimSpec(str(text), increasing, metric, tasks, {t: v for t, v in effect.items() if t in tasks}))
    return tuple(claims)


def _paper_effect(where: str, value: Any, tasks: Sequence[str]) -> dict[str, float]:
    if value is None:
        return {}
    body = _mapping(f"{where}.paper_effect", value)
    for task, effect in body.items():
        if task not in tasks:
            raise StudyError(f"{where}.paper_effect.{task}: no such task; tasks: {', '.join(tasks)}")
        if isinstance(effect, bool) or not isinstance(effect, (int, float)) or not math.isfinite(effect):
            raise StudyError(f"{where}.paper_effect.{task}={effect!r} must be a number (a fraction, 0.15 = 15%)")
    return {task: float(effect) for task, effect in body.items()}


def _check_runs(spec: StudySpec) -> None:
    """Every run config validates, and every method draws the task's number of samples per epoch."""
    expected = {task: spec.base_config(task, Path(".")).training.samples_per_epoch for task in spec.tasks}
    for task, method in spec.pairs():
        samples = spec.run_config(task, method, spec.seeds[0], Path(".")).training.samples_per_epoch
        if samples != expected[task]:
            raise StudyError(
                f"methods.{method}: training.samples_per_epoch={samples} on task '{task}' differs from the "
                f"task's {expected[task]}; every method must draw the same samples per epoch "
                "(K changes the prompts per epoch, not the samples)"
            )
