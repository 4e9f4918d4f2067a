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

from loopdiff.advantages import AdvantageKind
from loopdiff.checks import SEED, Check, above, at_least, fraction
from loopdiff.estimators import Estimator, PresetName
from loopdiff.minibatches import steps_per_sample
from loopdiff.objectives import LossKind
from loopdiff.plugins import registered_default, registered_models



class ConfigError(ValueError):
    """A configuration value is invalid; the message names the field, the value and what is allowed."""


def default_model() -> str:
    """``model.pretrained``'s default: the model the installed plugin registers as the default ('' if none)."""
    default = registered_default()
    return default.model if default is not None else ""


def setting(default: Any = dataclasses.MISSING, help: str = "", factory: Callable[[], Any] | None = None,
            check: Check | None = None) -> Any:
    """A config field declared once: its default, ``help`` (``loopdiff config fields`` shows it) and the values it
    allows beyond its type (``check``; ``validate`` applies it, None passing in an optional field)."""
    metadata = {"help": help, "check": check}
    if factory is not None:
        return field(default_factory=factory, metadata=metadata)
    return field(default=default, metadata=metadata)


@dataclass
class ModelConfig:
    pretrained: str = setting(help="'embedded', a local pipeline folder, or a Hub id", factory=default_model)
    revision: str | None = setting(None, "the Hub revision (branch, tag or commit) of model.pretrained", check=Check(
        lambda v: v.strip() != "", "a branch, tag or commit (not empty)").or_none("for the default branch"))
    train_modules: Literal["all", "cross_attention"] = setting(
        "all", "full fine-tuning: all UNet weights, or cross_attention (its keys and values only)"
    )
    lora: bool = setting(False, "train LoRA adapters instead of the UNet's weights")
    lora_rank: int = setting(4, "LoRA rank", check=at_least(1))
    lora_alpha: float = setting(4.0, "LoRA alpha (the adapters are scaled by alpha / rank)", check=above(0))
    lora_dropout: float = setting(0.0, "LoRA dropout (peft's lora_dropout) on the adapters' inputs while training",
                                  check=fraction(high_open=True))
    lora_target_modules: list[str] | None = setting(
        None, "the module names (peft target_modules) that get adapters; None: the family's default, the "
        "attention projections to_q, to_k, to_v, to_out.0",
        check=Check(lambda v: len(v) > 0, "a non-empty list of module names, or none for the family's default"),
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
    device: str = setting("auto", "torch device; auto lets accelerate choose", check=Check(
        lambda v: v == "auto" or _is_device(v), "auto, cpu, cuda, cuda:N, mps or another torch device name"))
    attention: Literal["auto", "sdpa", "classic"] = setting(
        "auto", "auto: classic attention on the CPU (faster there), PyTorch SDPA elsewhere"
    )
    tf32: bool = setting(True, "on a CUDA device, float32 matmuls and convolutions on TF32 tensor cores (false: "
                         "exact float32)")
    compile: bool = setting(False, "torch.compile the denoiser (a slower first epoch, faster steps on a GPU)")


@dataclass
class SamplingConfig:
    num_steps: int = setting(20, "denoising steps per sample (DDIM, or the SD3 / Flux flow sampler)",
                             check=at_least(1))
    guidance_scale: float = setting(
        5.0, "classifier-free guidance scale; for a guidance-distilled Flux transformer (FLUX.1-dev) the guidance "
        "it embeds, in one conditional call (FluxPipeline's default 3.5); ignored by Flux without guidance embeds",
        check=at_least(1, "a number"),
    )
    negative_prompt: str = setting(
        "", "the prompt of classifier-free guidance's unconditional branch, in sampling, the log-probabilities "
        "and evaluation alike (empty: the pipeline's default negative); not for Flux"
    )
    eta: float = setting(1.0, "DDIM eta, the sampler's noise level (> 0: a deterministic step has no log-probability)",
                         check=Check(above(0).ok, "a finite number > 0 (eta = 0 has no log-probability)"))
    logprob_reduction: Literal["mean", "sum"] = setting(
        "mean", "a step's log-probability over latent elements: mean (DDPO) or sum"
    )
    batch_size: int = setting(32, "trajectories per sampling call", check=at_least(1))
    sde_type: Literal["sde", "cps"] = setting(
        "sde", "SD3 and Flux pipelines only: the SDE form; eta is then its noise level a"
    )
    resolution: int | None = setting(
        None, "image height and width in pixels; None: the denoiser's native size (its sample_size x the VAE's "
        "downscale, e.g. 512 for SD 2 base, 1024 for SDXL base and SD3 medium; FluxPipeline's 1024 for Flux)",
        check=Check(lambda v: 1 <= v <= 8192, "an integer in [1, 8192] (pixels)").or_none(
            "for the denoiser's native size"),
    )
    max_sequence_length: int | None = setting(
        None, "T5 tokens per prompt (SD3 and Flux pipelines); None: the pipeline's default, 256 for SD3, 512 for "
        "Flux", check=Check(lambda v: 1 <= v <= 512, "an integer in [1, 512] (T5 tokens)").or_none(
            "for the pipeline's default"),
    )


def override(name: str) -> Any:
    """An EstimatorConfig field overriding the Estimator field ``name``, with its help and allowed values;
    None (its default) keeps the preset's value."""
    declared = next(f for f in dataclasses.fields(Estimator) if f.name == name)
    return setting(None, f"{declared.metadata['help']}; null: the preset's", check=declared.metadata.get("check"))


@dataclass
class EstimatorConfig:
    """The estimator: a preset and, for every Estimator field but its name, an optional override."""

    preset: PresetName = setting("loop", "the estimator preset (a row of docs/method.md's table)")
    advantage: AdvantageKind | None = override("advantage")
    loss: LossKind | None = override("loss")
    samples_per_prompt: int | None = override("samples_per_prompt")
    inner_epochs: int | None = override("inner_epochs")
    minibatches: int | None = override("minibatches")
    clip_range: float | None = override("clip_range")
    advantage_clip: float | None = override("advantage_clip")
    kl_coef: float | None = override("kl_coef")
    tracker_buffer_size: int | None = override("tracker_buffer_size")
    tracker_min_count: int | None = override("tracker_min_count")


@dataclass
class TrainingConfig:
    epochs: int = setting(100, "epochs: each samples, scores and trains on one batch", check=at_least(0))
    samples_per_epoch: int = setting(32, "trajectories sampled per epoch (a multiple of K)", check=at_least(1))
    learning_rate: float = setting(1e-5, "AdamW learning rate", check=above(0))
    weight_decay: float = setting(1e-4, "AdamW weight decay", check=at_least(0, "a number"))
    adam_beta1: float = setting(0.9, "AdamW beta1", check=fraction(high_open=True))
    adam_beta2: float = setting(0.999, "AdamW beta2", check=fraction(high_open=True))
    adam_eps: float = setting(1e-8, "AdamW epsilon", check=above(0))
    max_grad_norm: float = setting(1.0, "gradients are clipped to this norm", check=above(0))
    timestep_fraction: float = setting(
        1.0, "fraction of each sample's (trained) denoising steps drawn into an epoch's objective",
        check=fraction(low_open=True),
    )
    train_denoising_steps: int | None = setting(
        None, "only the first (noisiest) N denoising steps of each sample enter the objective (at most "
        "sampling.num_steps); None: all of them", check=at_least(1).or_none("for every sampling step"),
    )
    micro_batch_size: int = setting(64, "(sample, step) pairs per UNet call while training", check=at_least(1))
    gradient_checkpointing: bool = setting(
        False, "recompute UNet activations in backward: less memory, more compute"
    )
    warmup_epochs: int = setting(0, "epochs of linear learning-rate warm-up (the schedule's num_warmup_steps)",
                                 check=at_least(0))
    lr_scheduler: Literal[
        "constant_with_warmup", "constant", "linear", "cosine", "cosine_with_restarts", "polynomial"
    ] = setting(
        "constant_with_warmup", "diffusers' get_scheduler schedule, stepped once per epoch over training.epochs "
        "(epoch n trains at its step n of epochs + 1); constant_with_warmup: the warm-up, then constant"
    )
    seed: int = setting(0, "the training run's random seed", check=SEED)
    max_nonfinite_fraction: float = setting(
        0.25, "a sample with a NaN/inf reward is dropped with its prompt group; more than this fraction of an "
        "epoch's rewards non-finite stops the run (README, 'Non-finite rewards and losses')", check=fraction(),
    )
    max_skipped_fraction: float = setting(
        0.5, "an optimiser step with a non-finite loss or gradient norm is skipped; more than this fraction of "
        "an epoch's steps skipped stops the run", check=fraction(),
    )
    ema_decay: float | None = setting(
        None, "keep an exponential moving average (EMA) of the trainable weights with this decay d in (0, 1) "
        "(at optimiser step n the decay is min(d, (1 + n) / (10 + n))); evaluations and the export use it; "
        "None or 0: no EMA", check=fraction(high_open=True).or_none("for no EMA (0 also turns it off)"),
    )
    ema_every: int = setting(1, "update the EMA every N optimiser steps", check=at_least(1))


def _options_per_reward(options: Mapping[str, Any]) -> bool:
    """True when each reward's options are a mapping; else a ConfigError naming the reward's entry."""
    for name, values in options.items():
        _check(isinstance(values, Mapping), f"reward.options.{name}", values,
               'a mapping of option names to values, e.g. {"%s": {"device": "cpu"}}' % name)
    return True


@dataclass
class RewardConfig:
    name: str | None = setting(
        None, "a registered name, 'package.module:function', or a weighted sum 'a:1.0,b:0.1'; None: the model's "
        "registered default (the embedded model's), required for any other model unless a reward_fn is passed"
    )
    options: dict[str, dict[str, Any]] = setting(
        help="options per reward, e.g. {\"jpeg_compressibility\": {\"quality\": 80}}", factory=dict,
        check=Check(lambda v: _options_per_reward(v), "a mapping of reward names to mappings of options"),
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
    max_train: int | None = setting(None, "train on the first N training prompts only (None: all of them)",
                                    check=at_least(1).or_none("for every training prompt"))


@dataclass
class EvalConfig:
    every: int = setting(0, "evaluate every N epochs (0: only before and after training)", check=at_least(0))
    before_training: bool = setting(True, "evaluate the base model first (eval/base.json)")
    images_per_prompt: int = setting(10, "images per validation prompt", check=at_least(1))
    max_prompts: int | None = setting(None, "evaluate on the first N validation prompts (None: all of them)", check=Check(
        at_least(0).ok, "an integer >= 0 (0: no evaluation)").or_none("for all"))
    seed: int = setting(1234, "seed of the evaluation's sampling noise", check=SEED)
    rewards: list[str] = setting(help="extra rewards to report (e.g. the held-out evaluator)", factory=list)
    grid_prompts: int = setting(8, "validation prompts shown in the image grids", check=at_least(0))
    deterministic: bool = setting(False, "also evaluate the base and final models with the deterministic sampler "
                                         "(DDIM eta = 0, or the flow ODE), as eval/<tag>_deterministic.json")


@dataclass
class OutputConfig:
    dir: str = setting("runs/loop", "the run folder: config, metrics, checkpoints, evaluations, the export",
                       check=Check(lambda v: v.strip() != "", "a folder path (not empty)"))
    checkpoint_every: int = setting(5, "save a checkpoint every N epochs", check=at_least(1))
    resume: bool = setting(True, "continue from the run folder's last checkpoint")
    tensorboard: bool = setting(True, "log to TensorBoard (in the run folder)")
    wandb: bool = setting(False, "log to Weights & Biases")
    wandb_project: str = setting("loopdiff", "the Weights & Biases project",
                                 check=Check(lambda v: v.strip() != "", "a project name (not empty)"))
    progress: bool = setting(True, "show progress bars")
    log_images_every: int = setting(
        5, "log the evaluation grids and, every N epochs, a grid of the first training samples with their prompts "
        "as images in TensorBoard and wandb (0: no images)", check=at_least(0)
    )
    push_to_hub: bool = setting(False, "upload the export (final_lora/ or final_pipeline/, with its model card) to a "
                                       "Hugging Face Hub model repository (huggingface_hub's login or HF_TOKEN)")
    hub_model_id: str | None = setting(None, "the Hub repository of output.push_to_hub, 'user/name' or 'name'; "
                                             "None: the run folder's name")
    hub_private: bool = setting(False, "create the Hub repository of output.push_to_hub as private")
    keep_best: str | None = setting(
        None, "keep the weights where this weighted sum of logged metrics peaks, e.g. "
              "'reward/mean:1,monitor/embedded_eval/mean:2' (with reward.monitor); exported as best_pipeline/ "
              "or best_lora/ beside the final model", check=Check(lambda v: bool(parse_trade_off(v)), "metric:weight,..."))
    keep_best_window: int = setting(10, "epochs over which output.keep_best's sum is averaged", check=at_least(1))


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


def check_field(path: str, value: Any, annotation: Any, check: Check | None) -> None:
    """Raise ConfigError unless ``value`` is one of the choices of a ``Literal`` ``annotation`` and passes
    ``check`` (None passes in an optional field); the error names ``path`` and the value."""
    if value is None and _optional(annotation)[1]:
        return
    allowed = field_choices(annotation)
    if allowed is not None:
        _choice(path, value, allowed)
    if check is not None:
        _check(check.ok(value), path, value, check.describe())


def field_check(path: str) -> Check | None:
    """The check the config field ``section.field`` declares (None: its type alone), e.g. for a flag mirroring it."""
    return next(f.metadata.get("check") for p, _, f in schema_fields() if p == path)


def validate(config: RunConfig) -> None:
    """Raise ConfigError for the first invalid value: each field against its declaration (type, choices,
    ``check``), then what fields require of each other."""
    m, s, t = config.model, config.sampling, config.training
    for path, annotation, declared in schema_fields():
        check_field(path, field_value(config, path), annotation, declared.metadata.get("check"))
    _check(not (m.lora and m.train_modules != "all"), "model.train_modules", m.train_modules,
           "'all' with model.lora=true (LoRA chooses its own target modules)")
    _check(m.lora or m.lora_init is None, "model.lora_init", m.lora_init, "none without model.lora=true")
    _check(t.train_denoising_steps is None or t.train_denoising_steps <= s.num_steps, "training.train_denoising_steps",
           t.train_denoising_steps, f"at most sampling.num_steps={s.num_steps}, or none for every sampling step")
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
