"""Checks run before a training run loads its model: how it was launched, where it writes, what it scores.

A launcher that starts several processes without a distributed backend taking effect leaves each process
training alone into the same run folder; :func:`check_launch` stops that at once with how to launch instead.
A launch asking for FSDP or DeepSpeed that accelerate runs as plain data parallel (on the CPU it always does)
is stopped by :func:`check_sharding`, FSDP version 1 by :func:`check_fsdp_version`, and DeepSpeed settings
loopdiff has not run by :func:`check_deepspeed_config` (which also fills the ones loopdiff decides).
"""

from __future__ import annotations

import importlib.util
import os
import tempfile
from pathlib import Path
from typing import Any, Mapping

from loopdiff.config import ConfigError, RunConfig, check_processes
from loopdiff.prompts import PromptSet
from loopdiff.rewards.base import PromptRequirement, parse_reward_spec, registered_rewards

LAUNCH_HELP = (
    "on the CPU launch with 'torchrun --nproc_per_node N -m loopdiff.cli train model.device=cpu' "
    "(OMP_NUM_THREADS=1), on GPUs with 'accelerate launch --multi_gpu --num_processes N -m loopdiff.cli train'"
)


class LaunchError(RuntimeError):
    """The processes of a run were launched in a way that cannot train together."""


def check_reward_options(config: RunConfig) -> None:
    """Raise ConfigError when ``reward.options`` holds options for a reward this run does not use (a misspelt
    name would otherwise leave the options silently unapplied)."""
    if not config.reward.options:
        return
    spec = config.reward.name
    used = {*config.reward.monitor, *config.eval.rewards}
    if spec:
        used |= {spec, *(name for name, _ in parse_reward_spec(spec))}
    for name in config.reward.options:
        if name not in used:
            raise ConfigError(f"reward.options has options for {name!r}, which no reward of this run uses "
                              f"(reward.name, reward.monitor and eval.rewards name: {', '.join(sorted(used))})")


def check_reward_names(config: RunConfig) -> None:
    """Raise ConfigError when ``reward.monitor`` or ``eval.rewards`` names a reward nobody registered (an
    evaluation reward is built at the first evaluation, which may come only after training)."""
    registry = registered_rewards()
    for field, specs in (("reward.monitor", config.reward.monitor), ("eval.rewards", config.eval.rewards)):
        for name in (name for spec in specs for name, _ in parse_reward_spec(spec)):
            if ":" not in name and name not in registry:  # package.module:function is imported when built
                raise ConfigError(f"{field}: unknown reward {name!r}; registered rewards: {', '.join(registry)} "
                                  "(or package.module:function)")


def check_device(requested: str, running: Any) -> None:
    """Raise ConfigError unless ``model.device`` (``requested``) is where the run is placed (``running``, the
    accelerator's torch device): ``auto`` takes whatever that is; ``cuda:7`` needs eight CUDA devices."""
    if requested == "auto":
        return
    import torch

    wanted = torch.device(requested)  # validate() has checked that it parses
    count = torch.cuda.device_count()
    if wanted.type == "cuda" and (wanted.index or 0) >= count:
        raise ConfigError(f"model.device={requested!r} is not on this machine: it has {count} CUDA device(s)"
                          + (" (model.device=cpu or auto runs on the CPU)" if count == 0 else ""))
    if wanted.type != torch.device(running).type:
        raise ConfigError(f"model.device={requested!r} is not available here (the run would be placed on "
                          f"{running}); use auto, cpu or a device this machine has")


def check_launch(num_processes: int, env: Mapping[str, str] | None = None) -> None:
    """Raise LaunchError when the launcher's process count disagrees with accelerate's ``num_processes``."""
    env = os.environ if env is None else env
    world = env.get("WORLD_SIZE")
    if world is not None and world.isdigit() and int(world) != num_processes:
        why = ("accelerate runs DeepSpeed only on GPUs and other accelerators: on the CPU it counts one process "
               "on each" if env.get("ACCELERATE_USE_DEEPSPEED", "").lower() == "true" else
               "no distributed backend took effect")
        raise LaunchError(
            f"WORLD_SIZE={world} processes were launched but accelerate runs {num_processes} "
            f"({why}, so each would train alone into the same folder); {LAUNCH_HELP}"
        )
    if world is None and num_processes == 1 and "ACCELERATE_USE_CPU" in env and "MASTER_ADDR" in env:
        raise LaunchError(
            "'accelerate launch --num_processes N' without --multi_gpu starts one process, not N; " + LAUNCH_HELP
        )


# The launcher's environment variable asking for a sharded backend -> accelerate's distributed_type for it.
SHARDED_BACKENDS = {"ACCELERATE_USE_FSDP": "FSDP", "ACCELERATE_USE_DEEPSPEED": "DEEPSPEED"}


def check_sharding(distributed_type: str, env: Mapping[str, str] | None = None) -> None:
    """Raise LaunchError when the launcher asked for FSDP or DeepSpeed (``accelerate launch`` with such a
    config file) but accelerate runs ``distributed_type`` instead: on the CPU it falls back to data parallel."""
    env = os.environ if env is None else env
    for variable, backend in SHARDED_BACKENDS.items():
        if env.get(variable, "").lower() == "true" and distributed_type != backend:
            raise LaunchError(
                f"the launch asked for {backend} ({variable}=true) but accelerate runs {distributed_type} "
                f"(with model.device=cpu, or without GPUs, it never shards); launch without the {backend} config "
                "file (the ddp one, or torchrun on the CPU), see docs/scaling.md"
            )


def check_fsdp_version(version: int) -> None:
    """Raise LaunchError for FSDP1: the trainer samples with the module it trains, which FSDP1 wraps into
    flat parameters of a new module; FSDP2 (``fsdp_version: 2``, as in the shipped fsdp.yaml) shards it in place."""
    if version != 2:
        raise LaunchError(
            f"the launch asked for FSDP version {version}; loopdiff trains under FSDP2 only: set fsdp_version: 2 "
            "in the accelerate config (as the shipped fsdp.yaml does), see docs/scaling.md"
        )


def check_deepspeed_config(ds_config: dict[str, Any], config: RunConfig) -> None:
    """Raise LaunchError for DeepSpeed settings loopdiff has not run: a ZeRO stage other than 2, ZeRO-Offload,
    fp16 or bf16, DeepSpeed's own gradient accumulation, or clipping to another norm than
    ``training.max_grad_norm``. Fills in place what loopdiff decides when it is ``auto`` or unset:
    ``gradient_clipping`` (``training.max_grad_norm``), ``gradient_accumulation_steps`` (1: each loopdiff
    optimiser step, all its micro-batches, is one DeepSpeed step) and ``train_micro_batch_size_per_gpu``
    (``training.micro_batch_size``; DeepSpeed only checks and logs it)."""
    zero = ds_config.get("zero_optimization", {})
    if zero.get("stage") != 2:
        raise LaunchError(f"the launch asked for DeepSpeed ZeRO stage {zero.get('stage')}; loopdiff trains under ZeRO "
                          "stage 2 only (zero_stage: 2, as in the shipped deepspeed-zero2.yaml; FSDP shards the "
                          "weights too), see docs/scaling.md")
    for part in ("offload_optimizer", "offload_param"):
        device = (zero.get(part) or {}).get("device", "none")
        if device not in (None, "none"):
            raise LaunchError(f"the launch asked for DeepSpeed {part}_device: {device}; loopdiff has not run "
                              f"ZeRO-Offload: set {part}_device: none (as the shipped deepspeed-zero2.yaml does)")
    half = [kind for kind in ("fp16", "bf16")
            if str((ds_config.get(kind) or {}).get("enabled", False)).lower() != "false"]
    if half:
        raise LaunchError(f"DeepSpeed would train in {half[0]} (model.mixed_precision={config.model.mixed_precision}, "
                          "or the DeepSpeed config): it then keeps the module's weights in that type, which "
                          "loopdiff has not run; use model.mixed_precision=no under DeepSpeed, or DDP or FSDP, see "
                          "docs/scaling.md")
    steps = ds_config.get("gradient_accumulation_steps", "auto")
    if steps == "auto":
        ds_config["gradient_accumulation_steps"] = 1
    elif steps != 1:
        raise LaunchError(f"the DeepSpeed config sets gradient_accumulation_steps: {steps}; loopdiff accumulates the "
                          "micro-batches of each optimiser step itself (estimator.minibatches, training."
                          "micro_batch_size) and takes one DeepSpeed step per optimiser step: set it to 1 or auto")
    clip = ds_config.get("gradient_clipping", "auto")
    if clip == "auto":
        ds_config["gradient_clipping"] = config.training.max_grad_norm
    elif float(clip) != config.training.max_grad_norm:
        raise LaunchError(f"the DeepSpeed config sets gradient_clipping: {clip} but training.max_grad_norm="
                          f"{config.training.max_grad_norm:g}; DeepSpeed clips inside its step: set gradient_clipping: "
                          "auto (as the shipped deepspeed-zero2.yaml does) or the same norm")
    if ds_config.get("train_micro_batch_size_per_gpu", "auto") == "auto":
        ds_config["train_micro_batch_size_per_gpu"] = config.training.micro_batch_size


def check_logging(config: RunConfig) -> None:
    """Raise ConfigError when ``output.wandb`` is on but the wandb package is not installed (checked before
    the run writes anything)."""
    if config.output.wandb and importlib.util.find_spec("wandb") is None:
        raise ConfigError("output.wandb=true needs the wandb package, which is not installed: pip install wandb "
                          "(then wandb login), or set output.wandb=false")


def check_output_dir(path: Path, name: str = "output.dir") -> None:
    """Raise ConfigError unless ``path`` (the setting ``name``) is, or can be made, a folder this process can
    write."""
    if path.exists() and not path.is_dir():
        raise ConfigError(f"{name}='{path}' is a file; allowed: a folder (new or existing) that can be written")
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".write-test-"):
            pass
    except OSError as error:
        raise ConfigError(f"{name}='{path}' cannot be written ({error.strerror or error}); "
                          "allowed: a folder (new or existing) that can be written") from None


def _prompt_requirements(uses: list[tuple[str, str]]) -> list[tuple[str, str, PromptRequirement]]:
    """The (config field, reward name, requirement) of the registered rewards in ``uses`` that score only
    prompts of some form."""
    registry = registered_rewards()
    found = [(field, name, registry[name].prompts if name in registry else None) for field, name in uses]
    return [(field, name, requirement) for field, name, requirement in found if requirement is not None]


def check_reward_prompts(config: RunConfig, prompt_sets: Mapping[str, PromptSet], training_reward: bool) -> None:
    """Raise ConfigError when a reward that scores prompts of one form only (the embedded world's) would
    score other prompts.

    ``prompt_sets`` maps ``"train"``/``"val"`` to the loaded prompt sets (a missing one is not checked);
    ``training_reward``: whether ``reward.name`` is built from the config (not a reward passed in).
    """
    training = [("reward.name", n) for n, _ in parse_reward_spec(config.reward.name)] if training_reward else []
    evaluation = [("eval.rewards", n) for n in config.eval.rewards]
    scored = {"train": _prompt_requirements(training), "val": _prompt_requirements(training + evaluation)}
    for split, users in scored.items():
        prompt_set = prompt_sets.get(split)
        if prompt_set is None:
            continue
        for field, name, requirement in users:
            for prompt in prompt_set.prompts:
                try:
                    requirement.parse(prompt)
                except ValueError as error:
                    raise ConfigError(
                        f"{field}: '{name}' scores {requirement.kind} only, but prompts.{split}="
                        f"'{getattr(config.prompts, split)}' holds {prompt!r} ({error}); use {requirement.hint}, "
                        f"or leave '{name}' out of {field}"
                    ) from None


def check_before_loading(config: RunConfig, accelerator: Any) -> None:
    """Fail fast, before the model loads: the launch, device, rewards, sharding backend, process count,
    logging and output folder."""
    kind = accelerator.distributed_type.value
    check_launch(accelerator.num_processes)
    check_device(config.model.device, accelerator.device)
    check_reward_options(config)
    check_reward_names(config)
    check_sharding(kind)
    if kind == "FSDP":
        check_fsdp_version(accelerator.state.fsdp_plugin.fsdp_version)
    if kind == "DEEPSPEED":
        check_deepspeed_config(accelerator.state.deepspeed_plugin.deepspeed_config, config)
    check_processes(config, accelerator.num_processes)
    check_logging(config)
    check_output_dir(Path(config.output.dir))
