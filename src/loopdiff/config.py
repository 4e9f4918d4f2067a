"""Run configuration: nested dataclasses, loaded from YAML/TOML, overridden by ``section.field=value``.

Every value is validated with an error that names the field, the bad value and what is allowed.
"""

from __future__ import annotations

import dataclasses
import json
import tomllib
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence, get_args, get_origin, get_type_hints

import yaml

from loopdiff.advantages import ADVANTAGE_KINDS
from loopdiff.estimators import PRESETS
from loopdiff.objectives import LOSS_KINDS
from loopdiff.minibatches import steps_per_sample
from loopdiff.plugins import registered_models


TRAIN_MODULES = ("all", "cross_attention")


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the field, the value and what is allowed."""


EMBEDDED = "embedded"  # the default model, registered by the embedded plugin with its default prompts and reward


@dataclass
class ModelConfig:
    pretrained: str = EMBEDDED  # "embedded", a local pipeline folder, or a Hub id
    revision: str | None = None
    train_modules: str = "all"  # full fine-tuning: "all" UNet weights, or "cross_attention" (its keys and values)
    lora: bool = False
    lora_rank: int = 4
    lora_alpha: float = 4.0
    mixed_precision: str = "no"  # "no", "fp16", "bf16"
    device: str = "auto"  # "auto" lets accelerate choose
    attention: str = "auto"  # "auto": classic attention on the CPU (faster there), PyTorch SDPA elsewhere


@dataclass
class SamplingConfig:
    num_steps: int = 20
    guidance_scale: float = 5.0
    eta: float = 1.0
    logprob_reduction: str = "mean"  # "mean" (DDPO) or "sum"
    batch_size: int = 32  # trajectories per sampling call
    sde_type: str = "sde"  # SD3 pipelines only: the SDE form, "sde" or "cps"; eta is then its noise level a


@dataclass
class EstimatorConfig:
    preset: str = "loop"
    samples_per_prompt: int | None = None  # K; None keeps the preset's
    inner_epochs: int | None = None
    minibatches: int | None = None
    clip_range: float | None = None
    advantage_clip: float | None = None
    kl_coef: float | None = None
    advantage: str | None = None
    loss: str | None = None
    tracker_buffer_size: int | None = None
    tracker_min_count: int | None = None


@dataclass
class TrainingConfig:
    epochs: int = 100
    samples_per_epoch: int = 32
    learning_rate: float = 1e-5
    weight_decay: float = 1e-4
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_eps: float = 1e-8
    max_grad_norm: float = 1.0
    timestep_fraction: float = 1.0
    # Only the first (noisiest) N denoising steps of each sample enter the objective; None: all of them.
    train_denoising_steps: int | None = None
    micro_batch_size: int = 64  # (sample, step) pairs per UNet call while training
    gradient_checkpointing: bool = False  # recompute UNet activations in backward: less memory, more compute
    warmup_epochs: int = 0
    seed: int = 0
    # Non-finite numbers (README, "Non-finite rewards and losses"): a sample with a NaN/inf reward is dropped with
    # its prompt group; more than this fraction of an epoch's rewards non-finite stops the run.
    max_nonfinite_fraction: float = 0.25
    # An optimiser step with a non-finite loss or gradient norm is skipped; more than this fraction of an
    # epoch's steps skipped stops the run.
    max_skipped_fraction: float = 0.5


@dataclass
class RewardConfig:
    # A registered name, "package.module:function", or a weighted sum "a:1.0,b:0.1". None: the model's
    # registered default (the embedded model's); required for any other model unless a reward_fn is passed in Python.
    name: str | None = None
    options: dict[str, dict[str, Any]] = field(default_factory=dict)
    asynchronous: bool = True  # score in a worker thread while the next batch samples
    monitor: list[str] = field(default_factory=list)  # rewards logged on each epoch's samples, never trained on


@dataclass
class PromptConfig:
    # "embedded:<category>", a prompt file, or "file:<path>". None: the model's registered default (the
    # embedded model's); ``train`` is required for any other model, and without ``val`` it is not evaluated.
    train: str | None = None
    val: str | None = None
    max_train: int | None = None  # train on the first N training prompts only (None: all of them)


@dataclass
class EvalConfig:
    every: int = 0  # evaluate every N epochs (0: only before and after training)
    before_training: bool = True  # evaluate the base model first (eval/base.json)
    images_per_prompt: int = 10
    max_prompts: int | None = None
    seed: int = 1234
    rewards: list[str] = field(default_factory=list)  # extra rewards to report (e.g. the held-out evaluator)
    grid_prompts: int = 8


@dataclass
class OutputConfig:
    dir: str = "runs/loop"
    checkpoint_every: int = 5
    resume: bool = True
    tensorboard: bool = True
    wandb: bool = False
    wandb_project: str = "loopdiff"
    progress: bool = True


@dataclass
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    estimator: EstimatorConfig = field(default_factory=EstimatorConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    prompts: PromptConfig = field(default_factory=PromptConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    output: OutputConfig = field(default_factory=OutputConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# ---------------------------------------------------------------- loading and overriding

# Renamed fields, old name -> new name: old configs and run folders still load, the old name with a warning.
RENAMED_FIELDS = {"training.first_steps": "training.train_denoising_steps"}


def upgrade_renamed_fields(values: Mapping[str, Any], warn: bool = True) -> dict[str, Any]:
    """``values`` (a mapping of sections) with each renamed field moved to its new name.

    Warns (FutureWarning, one line) when ``warn``; raises ConfigError when both names are given.
    """
    upgraded = {key: dict(value) if isinstance(value, Mapping) else value for key, value in values.items()}
    for old, new in RENAMED_FIELDS.items():
        section, old_name = old.split(".")
        new_name = new.split(".")[1]
        fields = upgraded.get(section)
        if not isinstance(fields, dict) or old_name not in fields:
            continue
        if new_name in fields:
            raise ConfigError(f"config field '{old}' was renamed '{new}'; give only '{new}'")
        if warn:
            warnings.warn(f"config field '{old}' was renamed '{new}'; read as '{new}'", FutureWarning, stacklevel=3)
        fields[new_name] = fields.pop(old_name)
    return upgraded



def _coerce(path: str, value: Any, annotation: Any) -> Any:
    """Convert ``value`` to the annotated type or raise a ConfigError naming ``path``."""
    origin, args = get_origin(annotation), get_args(annotation)
    if args and type(None) in args:  # Optional[X]
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
            return None
        annotation = next(a for a in args if a is not type(None))
        origin, args = get_origin(annotation), get_args(annotation)
    try:
        if annotation is bool:
            if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
                return value.lower() in ("true", "1", "yes")
            if isinstance(value, bool):
                return value
            raise TypeError
        if annotation is int:
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise TypeError
            return int(value)
        if annotation is float:
            if isinstance(value, bool):
                raise TypeError
            return float(value)
        if annotation is str:
            if isinstance(value, bool):  # YAML reads an unquoted no/yes (model.mixed_precision=no) as a bool
                return "yes" if value else "no"
            if not isinstance(value, (str, int, float)):
                raise TypeError
            return str(value)
        if origin is list:
            if isinstance(value, str):
                value = [v for v in value.split(",") if v] if not value.startswith("[") else json.loads(value)
            return [_coerce(f"{path}[]", v, args[0]) for v in value]
        if origin is dict:
            if isinstance(value, str):
                value = json.loads(value)
            if not isinstance(value, Mapping):
                raise TypeError
            return dict(value)
    except (TypeError, ValueError, json.JSONDecodeError):
        raise ConfigError(f"{path}={value!r} is not a valid {getattr(annotation, '__name__', annotation)}") from None
    return value


def _apply(section: Any, values: Mapping[str, Any], prefix: str) -> None:
    hints = get_type_hints(type(section))
    for key, value in values.items():
        path = f"{prefix}{key}"
        if key not in hints:
            allowed = ", ".join(f.name for f in dataclasses.fields(section))
            raise ConfigError(f"unknown config field '{path}'; fields of '{prefix[:-1] or 'config'}': {allowed}")
        current = getattr(section, key)
        if dataclasses.is_dataclass(current):
            if not isinstance(value, Mapping):
                raise ConfigError(f"config field '{path}' is a section; give it a mapping, not {value!r}")
            _apply(current, value, f"{path}.")
        else:
            setattr(section, key, _coerce(path, value, hints[key]))


def parse_overrides(overrides: Sequence[str]) -> dict[str, Any]:
    """``["training.epochs=3", "reward.name=jpeg_compressibility"]`` -> a nested mapping."""
    nested: dict[str, Any] = {}
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r} is not of the form section.field=value")
        node = nested
        parts = key.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        try:
            node[parts[-1]] = yaml.safe_load(value) if value.strip() else value
        except yaml.YAMLError as error:
            raise ConfigError(f"override {item!r}: the value is not valid YAML/JSON: {_yaml_error(error)}") from None
    return nested


def _yaml_error(error: yaml.YAMLError) -> str:
    """A YAML error in one line: the problem and where."""
    mark = getattr(error, "problem_mark", None)
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
    return f"{getattr(error, 'problem', None) or error}{where}".replace("\n", " ")


def read_config_file(path: str | Path) -> dict[str, Any]:
    """Read a YAML (.yaml/.yml) or TOML (.toml) config file into a mapping."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file '{path}' does not exist")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise ConfigError(f"config file '{path}' is not UTF-8 text ({error.reason} at byte {error.start})") from None
    if path.suffix == ".toml":
        try:
            return tomllib.loads(text)
        except tomllib.TOMLDecodeError as error:
            raise ConfigError(f"config file '{path}' is not valid TOML: {error}") from None
    if path.suffix in (".yaml", ".yml"):
        try:
            data = yaml.safe_load(text) or {}
        except yaml.YAMLError as error:
            raise ConfigError(f"config file '{path}' is not valid YAML: {_yaml_error(error)}") from None
        if not isinstance(data, Mapping):
            raise ConfigError(f"config file '{path}' must hold a mapping of sections")
        return dict(data)
    raise ConfigError(f"config file '{path}' has suffix '{path.suffix}'; allowed: .yaml, .yml, .toml")


def load_config(
    path: str | Path | None = None,
    overrides: Sequence[str] = (),
    base: Mapping[str, Any] | None = None,
    values: Mapping[str, Any] | None = None,
) -> RunConfig:
    """Defaults <- ``base`` mapping <- config file <- ``values`` mapping <- command-line overrides,
    completed and validated."""
    config = RunConfig()
    for layer in (base, read_config_file(path) if path is not None else None, values, parse_overrides(overrides)):
        if layer:
            _apply(config, upgrade_renamed_fields(layer), "")
    complete(config)
    validate(config)
    return config


def config_from_dict(values: Mapping[str, Any]) -> RunConfig:
    """A validated config from a mapping of sections (unset fields keep their defaults)."""
    config = RunConfig()
    _apply(config, upgrade_renamed_fields(values), "")
    complete(config)
    validate(config)
    return config


def complete(config: RunConfig) -> RunConfig:
    """Fill the unset fields a registered model has defaults for (the embedded model's prompts and reward);
    no other model gets them.

    Raises ConfigError when ``prompts.train`` is unset and the model has no default for it.
    """
    models = registered_models()
    entry = models.get(config.model.pretrained)
    for key, value in (entry.defaults if entry is not None else {}).items():
        section, name = key.split(".")
        if getattr(getattr(config, section), name) is None:
            setattr(getattr(config, section), name, value)
    if config.prompts.train is None:
        with_defaults = " or ".join(f"'{m.name}'" for m in models.values() if "prompts.train" in m.defaults)
        raise ConfigError(
            f"prompts.train is required for a model other than {with_defaults} "
            f"(model.pretrained={config.model.pretrained!r}); give a prompt file, one prompt per line"
        )
    return config


# ---------------------------------------------------------------- validation


def _check(ok: bool, path: str, value: Any, allowed: str) -> None:
    if not ok:
        raise ConfigError(f"{path}={value!r} is invalid; allowed: {allowed}")


def _choice(path: str, value: Any, choices: Sequence[Any]) -> None:
    _check(value in choices, path, value, ", ".join(map(str, choices)))


def validate(config: RunConfig) -> None:
    """Raise ConfigError for the first invalid value."""
    m, s, e, t, o = config.model, config.sampling, config.estimator, config.training, config.output
    _choice("model.mixed_precision", m.mixed_precision, ("no", "fp16", "bf16"))
    _choice("model.attention", m.attention, ("auto", "sdpa", "classic"))
    _choice("model.train_modules", m.train_modules, TRAIN_MODULES)
    _check(not (m.lora and m.train_modules != "all"), "model.train_modules", m.train_modules,
           "'all' with model.lora=true (LoRA chooses its own target modules)")
    _check(m.lora_rank >= 1, "model.lora_rank", m.lora_rank, "an integer >= 1")
    _check(s.num_steps >= 1, "sampling.num_steps", s.num_steps, "an integer >= 1")
    _check(s.eta > 0, "sampling.eta", s.eta, "a number > 0 (eta = 0 has no log-probability)")
    _check(s.guidance_scale >= 1.0, "sampling.guidance_scale", s.guidance_scale, "a number >= 1")
    _choice("sampling.logprob_reduction", s.logprob_reduction, ("mean", "sum"))
    _choice("sampling.sde_type", s.sde_type, ("sde", "cps"))
    _check(s.batch_size >= 1, "sampling.batch_size", s.batch_size, "an integer >= 1")
    _choice("estimator.preset", e.preset, tuple(PRESETS))
    if e.advantage is not None:
        _choice("estimator.advantage", e.advantage, ADVANTAGE_KINDS)
    if e.loss is not None:
        _choice("estimator.loss", e.loss, LOSS_KINDS)
    _check(t.epochs >= 0, "training.epochs", t.epochs, "an integer >= 0")
    _check(t.samples_per_epoch >= 1, "training.samples_per_epoch", t.samples_per_epoch, "an integer >= 1")
    _check(t.learning_rate > 0, "training.learning_rate", t.learning_rate, "a number > 0")
    _check(t.weight_decay >= 0, "training.weight_decay", t.weight_decay, "a number >= 0")
    _check(t.max_grad_norm > 0, "training.max_grad_norm", t.max_grad_norm, "a number > 0")
    _check(0 < t.timestep_fraction <= 1, "training.timestep_fraction", t.timestep_fraction, "a number in (0, 1]")
    _check(
        t.train_denoising_steps is None or t.train_denoising_steps >= 1,
        "training.train_denoising_steps",
        t.train_denoising_steps,
        "an integer >= 1, or none for every sampling step",
    )
    for name in ("max_nonfinite_fraction", "max_skipped_fraction"):
        value = getattr(t, name)
        _check(0 <= value <= 1, f"training.{name}", value, "a number in [0, 1]")
    _check(t.micro_batch_size >= 1, "training.micro_batch_size", t.micro_batch_size, "an integer >= 1")
    for name, options in config.reward.options.items():
        _check(isinstance(options, Mapping), f"reward.options.{name}", options,
               'a mapping of option names to values, e.g. {"%s": {"device": "cpu"}}' % name)
    n = config.prompts.max_train
    _check(n is None or n >= 1, "prompts.max_train", n, "an integer >= 1, or none for every training prompt")
    _check(config.eval.images_per_prompt >= 1, "eval.images_per_prompt", config.eval.images_per_prompt, ">= 1")
    _check(config.eval.every >= 0, "eval.every", config.eval.every, "an integer >= 0")
    _check(o.checkpoint_every >= 1, "output.checkpoint_every", o.checkpoint_every, "an integer >= 1")
    estimator = build_estimator(config)
    k = estimator.samples_per_prompt
    _check(
        t.samples_per_epoch % k == 0,
        "training.samples_per_epoch",
        t.samples_per_epoch,
        f"a multiple of samples_per_prompt K={k}",
    )
    pairs = t.samples_per_epoch * steps_per_sample(s.num_steps, t.timestep_fraction, t.train_denoising_steps)
    _check(
        estimator.minibatches <= pairs,
        "estimator.minibatches",
        estimator.minibatches,
        f"at most the {pairs} (sample, step) pairs of an epoch",
    )


def check_processes(config: RunConfig, processes: int) -> None:
    """Raise ConfigError unless every one of ``processes`` gets whole prompt groups and enough pairs."""
    t, s = config.training, config.sampling
    estimator = build_estimator(config)
    k = estimator.samples_per_prompt
    _check(
        t.samples_per_epoch % (k * processes) == 0,
        "training.samples_per_epoch",
        t.samples_per_epoch,
        f"a multiple of K x processes = {k} x {processes} = {k * processes}",
    )
    per_sample = steps_per_sample(s.num_steps, t.timestep_fraction, t.train_denoising_steps)
    pairs = t.samples_per_epoch // processes * per_sample
    _check(
        estimator.minibatches <= pairs,
        "estimator.minibatches",
        estimator.minibatches,
        f"at most the {pairs} (sample, step) pairs of an epoch on each of {processes} processes",
    )


# Fields a resumed run may change: how long it runs, how it is evaluated, logged and checkpointed, and
# memory/speed knobs that do not change what is computed. Every other field is fixed for the run's life.
RESUMABLE_CHANGES = (
    "training.epochs", "training.micro_batch_size", "training.gradient_checkpointing",
    "training.max_nonfinite_fraction", "training.max_skipped_fraction", "reward.asynchronous", "eval.",
    "output.",
)


def _flatten(values: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in values.items():
        if isinstance(value, Mapping) and not key == "options":
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def fixed_changes(saved: Mapping[str, Any], config: RunConfig) -> list[str]:
    """The fields that differ between a saved run's config and ``config`` but may not change mid-run,
    as ``"field old -> new"`` (the saved mapping is read as a config first, so defaults compare equal)."""
    saved = upgrade_renamed_fields(saved, warn=False)  # a run saved before a field was renamed
    try:
        old = _flatten(config_from_dict(saved).to_dict())
    except ConfigError:
        old = _flatten(saved)
    new = _flatten(config.to_dict())
    changed = [k for k in sorted(old.keys() | new.keys()) if old.get(k) != new.get(k)]
    fixed = [k for k in changed if not any(k == f or (f.endswith(".") and k.startswith(f)) for f in RESUMABLE_CHANGES)]
    return [f"{k} {old.get(k)!r} -> {new.get(k)!r}" for k in fixed]


def build_estimator(config: RunConfig):
    """The Estimator of ``config.estimator``: the preset with the non-None fields overridden."""
    from loopdiff.estimators import estimator_from_preset

    e = config.estimator
    overrides = {f.name: getattr(e, f.name) for f in dataclasses.fields(e) if f.name != "preset"}
    try:
        return estimator_from_preset(e.preset, **overrides)
    except ValueError as error:
        raise ConfigError(str(error)) from None
