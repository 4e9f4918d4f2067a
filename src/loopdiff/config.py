"""Run configuration: nested dataclasses, loaded from YAML/TOML, overridden by ``section.field=value``.

The dataclasses are the schema: each field is declared once with its type, default and help (``setting``;
``loopdiff config fields`` lists them), a field with choices is typed ``Literal[...]``, and values are read by
their field's type (a text field keeps its text). Every value is validated with an error that names the
field, the bad value and what is allowed.
"""

from __future__ import annotations

import dataclasses
import json
import math
import tomllib
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal, Mapping, Sequence, get_args, get_origin, get_type_hints

import yaml

from loopdiff.minibatches import steps_per_sample
from loopdiff.plugins import registered_models



class ConfigError(ValueError):
    """A configuration value is invalid; the message names the field, the value and what is allowed."""


EMBEDDED = "embedded"  # the default model, registered by the embedded plugin with its default prompts and reward


def setting(default: Any = dataclasses.MISSING, help: str = "", factory: Callable[[], Any] | None = None) -> Any:
    """A config field documented where it is declared (``loopdiff config fields`` shows ``help``)."""
    if factory is not None:
        return field(default_factory=factory, metadata={"help": help})
    return field(default=default, metadata={"help": help})


@dataclass
class ModelConfig:
    pretrained: str = setting(EMBEDDED, "'embedded', a local pipeline folder, or a Hub id")
    revision: str | None = setting(None, "the Hub revision (branch, tag or commit) of model.pretrained")
    train_modules: Literal["all", "cross_attention"] = setting(
        "all", "full fine-tuning: all UNet weights, or cross_attention (its keys and values only)"
    )
    lora: bool = setting(False, "train LoRA adapters instead of the UNet's weights")
    lora_rank: int = setting(4, "LoRA rank")
    lora_alpha: float = setting(4.0, "LoRA alpha (the adapters are scaled by alpha / rank)")
    lora_dropout: float = setting(0.0, "LoRA dropout (peft's lora_dropout) on the adapters' inputs while training")
    lora_target_modules: list[str] | None = setting(
        None, "the module names (peft target_modules) that get adapters; None: the family's default, the "
        "attention projections to_q, to_k, to_v, to_out.0"
    )
    train_text_encoder: bool = setting(
        False, "also train LoRA adapters on the text encoder (Stable Diffusion 1/2, one process; exported with the "
        "denoiser's as text_encoder LoRA layers)"
    )
    lora_init: str | None = setting(
        None, "start from the LoRA adapter in this folder (saved by diffusers' save_lora_weights, e.g. a run's "
        "final_lora/, or by peft's save_pretrained); it keeps its own rank, alpha, dropout and target modules"
    )
    mixed_precision: Literal["no", "fp16", "bf16"] = setting("no", "accelerate's mixed precision")
    device: str = setting("auto", "torch device; auto lets accelerate choose")
    attention: Literal["auto", "sdpa", "classic"] = setting(
        "auto", "auto: classic attention on the CPU (faster there), PyTorch SDPA elsewhere"
    )
    tf32: bool = setting(True, "on a CUDA device, float32 matmuls and convolutions on TF32 tensor cores (false: "
                         "exact float32)")
    compile: bool = setting(False, "torch.compile the denoiser (a slower first epoch, faster steps on a GPU)")


@dataclass
class SamplingConfig:
    num_steps: int = setting(20, "denoising steps per sample (DDIM, or the SD3 / Flux flow sampler)")
    guidance_scale: float = setting(
        5.0, "classifier-free guidance scale; for a guidance-distilled Flux transformer (FLUX.1-dev) the guidance "
        "it embeds, in one conditional call (FluxPipeline's default 3.5); ignored by Flux without guidance embeds"
    )
    negative_prompt: str = setting(
        "", "the prompt of classifier-free guidance's unconditional branch, in sampling, the log-probabilities "
        "and evaluation alike (empty: the pipeline's default negative); not for Flux"
    )
    eta: float = setting(1.0, "DDIM eta, the sampler's noise level (> 0: a deterministic step has no log-probability)")
    logprob_reduction: Literal["mean", "sum"] = setting(
        "mean", "a step's log-probability over latent elements: mean (DDPO) or sum"
    )
    batch_size: int = setting(32, "trajectories per sampling call")
    sde_type: Literal["sde", "cps"] = setting(
        "sde", "SD3 and Flux pipelines only: the SDE form; eta is then its noise level a"
    )
    resolution: int | None = setting(
        None, "image height and width in pixels; None: the denoiser's native size (its sample_size x the VAE's "
        "downscale, e.g. 512 for SD 2 base, 1024 for SDXL base and SD3 medium; FluxPipeline's 1024 for Flux)"
    )
    max_sequence_length: int | None = setting(
        None, "T5 tokens per prompt (SD3 and Flux pipelines); None: the pipeline's default, 256 for SD3, 512 for "
        "Flux"
    )


def _estimator_config() -> type:
    """EstimatorConfig: ``preset`` and, for every Estimator field but its name, an optional override."""
    from loopdiff.estimators import Estimator, PresetName

    hints = get_type_hints(Estimator)
    overrides = [
        (f.name, hints[f.name] | None, setting(None, f"{f.metadata['help']}; null: the preset's"))
        for f in dataclasses.fields(Estimator) if f.name != "name"
    ]
    preset = ("preset", PresetName, setting("loop", "the estimator preset (a row of docs/method.md's table)"))
    cls = dataclasses.make_dataclass("EstimatorConfig", [preset, *overrides])
    cls.__module__, cls.__doc__ = __name__, _estimator_config.__doc__
    return cls


EstimatorConfig = _estimator_config()


@dataclass
class TrainingConfig:
    epochs: int = setting(100, "epochs: each samples, scores and trains on one batch")
    samples_per_epoch: int = setting(32, "trajectories sampled per epoch (a multiple of K)")
    learning_rate: float = setting(1e-5, "AdamW learning rate")
    weight_decay: float = setting(1e-4, "AdamW weight decay")
    adam_beta1: float = setting(0.9, "AdamW beta1")
    adam_beta2: float = setting(0.999, "AdamW beta2")
    adam_eps: float = setting(1e-8, "AdamW epsilon")
    max_grad_norm: float = setting(1.0, "gradients are clipped to this norm")
    timestep_fraction: float = setting(
        1.0, "fraction of each sample's (trained) denoising steps drawn into an epoch's objective"
    )
    train_denoising_steps: int | None = setting(
        None, "only the first (noisiest) N denoising steps of each sample enter the objective; None: all of them"
    )
    micro_batch_size: int = setting(64, "(sample, step) pairs per UNet call while training")
    gradient_checkpointing: bool = setting(
        False, "recompute UNet activations in backward: less memory, more compute"
    )
    warmup_epochs: int = setting(0, "epochs of linear learning-rate warm-up (the schedule's num_warmup_steps)")
    lr_scheduler: Literal[
        "constant_with_warmup", "constant", "linear", "cosine", "cosine_with_restarts", "polynomial"
    ] = setting(
        "constant_with_warmup", "diffusers' get_scheduler schedule, stepped once per epoch over training.epochs "
        "(epoch n trains at its step n of epochs + 1); constant_with_warmup: the warm-up, then constant"
    )
    seed: int = setting(0, "the training run's random seed")
    max_nonfinite_fraction: float = setting(
        0.25, "a sample with a NaN/inf reward is dropped with its prompt group; more than this fraction of an "
        "epoch's rewards non-finite stops the run (README, 'Non-finite rewards and losses')"
    )
    max_skipped_fraction: float = setting(
        0.5, "an optimiser step with a non-finite loss or gradient norm is skipped; more than this fraction of "
        "an epoch's steps skipped stops the run"
    )
    ema_decay: float | None = setting(
        None, "keep an exponential moving average (EMA) of the trainable weights with this decay d in (0, 1) "
        "(at optimiser step n the decay is min(d, (1 + n) / (10 + n))); evaluations and the export use it; "
        "None or 0: no EMA"
    )
    ema_every: int = setting(1, "update the EMA every N optimiser steps")


@dataclass
class RewardConfig:
    name: str | None = setting(
        None, "a registered name, 'package.module:function', or a weighted sum 'a:1.0,b:0.1'; None: the model's "
        "registered default (the embedded model's), required for any other model unless a reward_fn is passed"
    )
    options: dict[str, dict[str, Any]] = setting(
        help="options per reward, e.g. {\"jpeg_compressibility\": {\"quality\": 80}}", factory=dict
    )
    asynchronous: bool = setting(True, "score in a worker thread while the next batch samples")
    monitor: list[str] = setting(help="rewards logged on each epoch's samples, never trained on", factory=list)


@dataclass
class PromptConfig:
    train: str | None = setting(
        None, "'embedded:<category>', a prompt file, or 'file:<path>'; None: the model's registered default "
        "(the embedded model's), required for any other model"
    )
    val: str | None = setting(None, "validation prompts, as prompts.train; None: the model's default (without one: "
                              "no evaluation)")
    max_train: int | None = setting(None, "train on the first N training prompts only (None: all of them)")


@dataclass
class EvalConfig:
    every: int = setting(0, "evaluate every N epochs (0: only before and after training)")
    before_training: bool = setting(True, "evaluate the base model first (eval/base.json)")
    images_per_prompt: int = setting(10, "images per validation prompt")
    max_prompts: int | None = setting(None, "evaluate on the first N validation prompts (None: all of them)")
    seed: int = setting(1234, "seed of the evaluation's sampling noise")
    rewards: list[str] = setting(help="extra rewards to report (e.g. the held-out evaluator)", factory=list)
    grid_prompts: int = setting(8, "validation prompts shown in the image grids")
    deterministic: bool = setting(False, "also evaluate the base and final models with the deterministic sampler "
                                         "(DDIM eta = 0, or the flow ODE), as eval/<tag>_deterministic.json")


@dataclass
class OutputConfig:
    dir: str = setting("runs/loop", "the run folder: config, metrics, checkpoints, evaluations, the export")
    checkpoint_every: int = setting(5, "save a checkpoint every N epochs")
    resume: bool = setting(True, "continue from the run folder's last checkpoint")
    tensorboard: bool = setting(True, "log to TensorBoard (in the run folder)")
    wandb: bool = setting(False, "log to Weights & Biases")
    wandb_project: str = setting("loopdiff", "the Weights & Biases project")
    progress: bool = setting(True, "show progress bars")
    log_images_every: int = setting(
        5, "log the evaluation grids and, every N epochs, a grid of the first training samples with their prompts "
        "as images in TensorBoard and wandb (0: no images)"
    )
    push_to_hub: bool = setting(False, "upload the export (final_lora/ or final_pipeline/, with its model card) to a "
                                       "Hugging Face Hub model repository (huggingface_hub's login or HF_TOKEN)")
    hub_model_id: str | None = setting(None, "the Hub repository of output.push_to_hub, 'user/name' or 'name'; "
                                             "None: the run folder's name")
    hub_private: bool = setting(False, "create the Hub repository of output.push_to_hub as private")
    keep_best: str | None = setting(
        None, "keep the weights where this weighted sum of logged metrics peaks, e.g. "
              "'reward/mean:1,monitor/embedded_eval/mean:2' (with reward.monitor); exported as best_pipeline/ "
              "or best_lora/ beside the final model")
    keep_best_window: int = setting(10, "epochs over which output.keep_best's sum is averaged")


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


# ---------------------------------------------------------------- the schema: fields, types, defaults, help


def _optional(annotation: Any) -> tuple[Any, bool]:
    """``(X, True)`` for ``X | None``, else ``(annotation, False)``."""
    args = get_args(annotation)
    if get_origin(annotation) is not Literal and type(None) in args:
        return next(a for a in args if a is not type(None)), True
    return annotation, False


def field_choices(annotation: Any) -> tuple[Any, ...] | None:
    """The values a ``Literal[...]`` (or ``Literal[...] | None``) field allows; None for any other type."""
    inner = _optional(annotation)[0]
    return get_args(inner) if get_origin(inner) is Literal else None


def is_text(annotation: Any) -> bool:
    """Whether a field of this type holds text (str, a Literal of strings, or either or None)."""
    inner, allowed = _optional(annotation)[0], field_choices(annotation)
    return inner is str or (allowed is not None and all(isinstance(c, str) for c in allowed))


def type_name(annotation: Any) -> str:
    """``int``, ``str | None``, ``no | fp16 | bf16``, ``list[str]``: a field's type as ``config fields`` shows it."""
    inner, optional = _optional(annotation)
    allowed = field_choices(inner)
    if allowed:
        name = " | ".join(map(str, allowed))
    else:  # list[str], dict[str, ...]: as written; int, str: the class's name
        name = str(inner).replace("typing.", "") if get_args(inner) else inner.__name__
    return f"{name} | None" if optional else name


def schema_fields(schema: type | None = None, prefix: str = "") -> list[tuple[str, Any, dataclasses.Field]]:
    """``(section.field, type, dataclass field)`` for every field of the run config, in declaration order."""
    schema = schema or RunConfig
    hints, rows = get_type_hints(schema), []
    for f in dataclasses.fields(schema):
        if dataclasses.is_dataclass(hints[f.name]):
            rows += schema_fields(hints[f.name], f"{prefix}{f.name}.")
        else:
            rows.append((f"{prefix}{f.name}", hints[f.name], f))
    return rows


def field_value(config: RunConfig, path: str) -> Any:
    """The value of the field ``section.field`` in ``config``."""
    section, name = path.split(".")
    return getattr(getattr(config, section), name)


def field_default(path: str) -> Any:
    """The default value of the config field ``section.field`` (e.g. ``sampling.num_steps`` -> 20)."""
    return field_value(RunConfig(), path)


def format_fields() -> str:
    """Every config field with its type (choices), default and help, for ``loopdiff config fields``."""
    defaults = RunConfig()
    return "\n".join(f"{path}: {type_name(annotation)} = {field_value(defaults, path)!r}\n    {f.metadata['help']}"
                     for path, annotation, f in schema_fields())


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
    annotation, optional = _optional(annotation)
    if optional and (value is None or (isinstance(value, str) and value.lower() in ("none", "null", "~"))):
        return None
    allowed = field_choices(annotation)
    if allowed is not None:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            value = str(value)  # e.g. a TOML number for a text choice
        _choice(path, value, allowed)
        return value
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
            if isinstance(value, bool) or not isinstance(value, (str, int, float)):
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
    """``["training.epochs=3", "reward.name=jpeg_compressibility"]`` -> a nested mapping.

    A value is read as YAML, except that a text field keeps the text as typed (``output.dir=yes`` is 'yes',
    ``model.revision=0777`` is '0777'); quote it (``'x="..."'``) to have YAML read it.
    """
    types = {path: annotation for path, annotation, _ in schema_fields()}
    nested: dict[str, Any] = {}
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r} is not of the form section.field=value")
        node, path, text = nested, key.strip(), value.strip()
        parts = path.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        if path in types and is_text(types[path]) and text[:1] not in ("'", '"'):
            node[parts[-1]] = text  # as typed, not as YAML 1.1 reads it
            continue
        try:
            node[parts[-1]] = yaml.safe_load(value) if text else value
        except yaml.YAMLError as error:
            raise ConfigError(f"override {item!r}: the value is not valid YAML/JSON: {_yaml_error(error)}") from None
    return nested


def load_yaml(text: str, sections_at: Sequence[tuple[str, ...]] = ((),)) -> Any:
    """``yaml.safe_load(text)``, except that a text field keeps the text it was written with (YAML 1.1 reads
    an unquoted ``yes``/``off`` as a bool and ``0777`` as the int 511).

    ``sections_at``: the key paths (``"*"``: any key) of the mappings that hold run-config sections.
    """
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        _refuse_duplicate_keys(node)
        data = loader.construct_document(node) if node is not None else None
    finally:
        loader.dispose()
    for path in sections_at:
        for section_node, sections in _mappings_at(node, data, path):
            _keep_text(section_node, sections, RunConfig)
    return data


def _refuse_duplicate_keys(node: Any) -> None:
    """Raise a YAML error at the second occurrence of a key in any mapping (YAML would keep the last silently)."""
    if isinstance(node, yaml.MappingNode):
        seen: dict[str, Any] = {}
        for key, child in node.value:
            if isinstance(key, yaml.ScalarNode):
                if key.value in seen:
                    raise yaml.constructor.ConstructorError(
                        problem=f"key '{key.value}' appears twice in one mapping (first at line "
                                f"{seen[key.value].start_mark.line + 1})", problem_mark=key.start_mark)
                seen[key.value] = key
            _refuse_duplicate_keys(child)
    elif isinstance(node, yaml.SequenceNode):
        for child in node.value:
            _refuse_duplicate_keys(child)


def _mappings_at(node: Any, data: Any, path: tuple[str, ...]) -> list[tuple[yaml.MappingNode, dict]]:
    """The (node, value) pairs of the mappings at ``path`` below ``node`` (constructed as ``data``)."""
    if not isinstance(node, yaml.MappingNode) or not isinstance(data, dict):
        return []
    if not path:
        return [(node, data)]
    return [pair for key, child in node.value if isinstance(key, yaml.ScalarNode) and key.value in data
            and path[0] in ("*", key.value) for pair in _mappings_at(child, data[key.value], path[1:])]


def _keep_text(node: yaml.MappingNode, values: dict, schema: type) -> None:
    hints = get_type_hints(schema)
    for key, child in node.value:
        name = key.value if isinstance(key, yaml.ScalarNode) else None
        if name not in hints or name not in values:
            continue
        if dataclasses.is_dataclass(hints[name]) and isinstance(child, yaml.MappingNode):
            _keep_text(child, values[name], hints[name])
        elif (is_text(hints[name]) and isinstance(child, yaml.ScalarNode) and child.style is None
              and child.tag not in ("tag:yaml.org,2002:str", "tag:yaml.org,2002:null")):
            values[name] = child.value  # a plain scalar YAML read as a bool, number or date


def _yaml_error(error: yaml.YAMLError) -> str:
    """A YAML error in one line: the problem and where."""
    mark = getattr(error, "problem_mark", None)
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
    return f"{getattr(error, 'problem', None) or error}{where}".replace("\n", " ")


def read_config_file(path: str | Path) -> dict[str, Any]:
    """Read a YAML (.yaml/.yml) or TOML (.toml) config file into a mapping."""
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"config file '{path}' is a directory; give a .yaml, .yml or .toml file")
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
            data = load_yaml(text) or {}
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
    require_prompts: bool = True,
) -> RunConfig:
    """Defaults <- ``base`` mapping <- config file <- ``values`` mapping <- command-line overrides,
    completed and validated (``require_prompts``: see :func:`complete`)."""
    config = RunConfig()
    for layer in (base, read_config_file(path) if path is not None else None, values, parse_overrides(overrides)):
        if layer:
            _apply(config, upgrade_renamed_fields(layer), "")
    complete(config, require_prompts)
    validate(config)
    return config


def config_from_dict(values: Mapping[str, Any]) -> RunConfig:
    """A validated config from a mapping of sections (unset fields keep their defaults)."""
    config = RunConfig()
    _apply(config, upgrade_renamed_fields(values), "")
    complete(config)
    validate(config)
    return config


def check_fields(values: Mapping[str, Any]) -> None:
    """Raise ConfigError unless every field in ``values`` (a mapping of sections) exists and holds a value of
    its type, choices included; what needs the whole config (``complete``, ``validate``) is not checked."""
    _apply(RunConfig(), upgrade_renamed_fields(values, warn=False), "")


def complete(config: RunConfig, require_prompts: bool = True) -> RunConfig:
    """Fill the unset fields a registered model has defaults for (the embedded model's prompts and reward);
    no other model gets them.

    Raises ConfigError when ``prompts.train`` is unset and the model has no default for it, unless
    ``require_prompts`` is false (a config shown, not run).
    """
    models = registered_models()
    entry = models.get(config.model.pretrained)
    for key, value in (entry.defaults if entry is not None else {}).items():
        section, name = key.split(".")
        if getattr(getattr(config, section), name) is None:
            setattr(getattr(config, section), name, value)
    if config.prompts.train is None and require_prompts:
        with_defaults = " or ".join(f"'{m.name}'" for m in models.values() if "prompts.train" in m.defaults)
        raise ConfigError(
            f"prompts.train is required for a model other than {with_defaults} "
            f"(model.pretrained={config.model.pretrained!r}); give a prompt file, one prompt per line"
        )
    return config


# ---------------------------------------------------------------- validation


def _is_device(name: str) -> bool:
    import torch

    try:
        torch.device(name)
    except (RuntimeError, ValueError):
        return False
    return True


def _check(ok: bool, path: str, value: Any, allowed: str) -> None:
    if not ok:
        raise ConfigError(f"{path}={value!r} is invalid; allowed: {allowed}")


def _choice(path: str, value: Any, choices: Sequence[Any]) -> None:
    _check(value in choices, path, value, ", ".join(map(str, choices)))


def parse_trade_off(spec: str) -> dict[str, float]:
    """``"metric:weight,metric:weight"`` -> ``{metric: weight}``; a bare metric has weight 1."""
    weights: dict[str, float] = {}
    for part in (p.strip() for p in spec.split(",")):
        if not part:
            continue
        name, _, weight = part.rpartition(":") if ":" in part else (part, "", "1")
        try:
            value = float(weight)
        except ValueError:
            raise ConfigError(f"output.keep_best: weight {weight!r} of {name!r} is not a number") from None
        if not name or not math.isfinite(value):
            raise ConfigError(f"output.keep_best: bad term {part!r} (expected metric:weight)")
        weights[name] = weights.get(name, 0.0) + value
    if not weights:
        raise ConfigError(f"output.keep_best: {spec!r} names no metric")
    return weights


def validate(config: RunConfig) -> None:
    """Raise ConfigError for the first invalid value."""
    m, s, t, o = config.model, config.sampling, config.training, config.output
    for path, annotation, _ in schema_fields():  # the Literal[...] fields
        allowed, value = field_choices(annotation), field_value(config, path)
        if allowed is not None and not (value is None and _optional(annotation)[1]):
            _choice(path, value, allowed)
    _check(not (m.lora and m.train_modules != "all"), "model.train_modules", m.train_modules,
           "'all' with model.lora=true (LoRA chooses its own target modules)")
    _check(m.lora_rank >= 1, "model.lora_rank", m.lora_rank, "an integer >= 1")
    _check(0 <= m.lora_dropout < 1, "model.lora_dropout", m.lora_dropout, "a number in [0, 1)")
    _check(m.lora or m.lora_init is None, "model.lora_init", m.lora_init, "none without model.lora=true")
    _check(m.lora_target_modules is None or len(m.lora_target_modules) > 0, "model.lora_target_modules",
           m.lora_target_modules, "a non-empty list of module names, or none for the family's default")
    _check(math.isfinite(m.lora_alpha) and m.lora_alpha > 0, "model.lora_alpha", m.lora_alpha, "a number > 0")
    _check(m.device == "auto" or _is_device(m.device), "model.device", m.device,
           "auto, cpu, cuda, cuda:N, mps or another torch device name")
    _check(s.num_steps >= 1, "sampling.num_steps", s.num_steps, "an integer >= 1")
    _check(s.eta > 0, "sampling.eta", s.eta, "a number > 0 (eta = 0 has no log-probability)")
    _check(s.guidance_scale >= 1.0, "sampling.guidance_scale", s.guidance_scale, "a number >= 1")
    _check(s.batch_size >= 1, "sampling.batch_size", s.batch_size, "an integer >= 1")
    _check(s.resolution is None or s.resolution >= 1, "sampling.resolution", s.resolution,
           "an integer >= 1 (pixels), or none for the denoiser's native size")
    _check(s.max_sequence_length is None or 1 <= s.max_sequence_length <= 512, "sampling.max_sequence_length",
           s.max_sequence_length, "an integer in [1, 512] (T5 tokens), or none for the pipeline's default")
    _check(t.epochs >= 0, "training.epochs", t.epochs, "an integer >= 0")
    _check(t.samples_per_epoch >= 1, "training.samples_per_epoch", t.samples_per_epoch, "an integer >= 1")
    _check(math.isfinite(t.learning_rate) and t.learning_rate > 0, "training.learning_rate", t.learning_rate,
           "a finite number > 0")
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
    _check(t.ema_decay is None or 0 <= t.ema_decay < 1, "training.ema_decay", t.ema_decay,
           "a number in [0, 1), or none for no EMA (0 also turns it off)")
    _check(t.ema_every >= 1, "training.ema_every", t.ema_every, "an integer >= 1")
    _check(t.micro_batch_size >= 1, "training.micro_batch_size", t.micro_batch_size, "an integer >= 1")
    for name, options in config.reward.options.items():
        _check(isinstance(options, Mapping), f"reward.options.{name}", options,
               'a mapping of option names to values, e.g. {"%s": {"device": "cpu"}}' % name)
    n = config.prompts.max_train
    _check(n is None or n >= 1, "prompts.max_train", n, "an integer >= 1, or none for every training prompt")
    _check(config.eval.images_per_prompt >= 1, "eval.images_per_prompt", config.eval.images_per_prompt, ">= 1")
    mp = config.eval.max_prompts
    _check(mp is None or mp >= 0, "eval.max_prompts", mp, "an integer >= 0 (0: no evaluation), or none for all")
    _check(o.dir.strip() != "", "output.dir", o.dir, "a folder path (not empty)")
    _check(config.eval.every >= 0, "eval.every", config.eval.every, "an integer >= 0")
    _check(o.checkpoint_every >= 1, "output.checkpoint_every", o.checkpoint_every, "an integer >= 1")
    _check(o.log_images_every >= 0, "output.log_images_every", o.log_images_every, "an integer >= 0 (0: no images)")
    _check(o.keep_best_window >= 1, "output.keep_best_window", o.keep_best_window, "an integer >= 1")
    if o.keep_best is not None:
        parse_trade_off(o.keep_best)
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
