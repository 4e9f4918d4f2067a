"""Checks run before a training run loads its model: how it was launched, where it writes, what it scores.

A launcher that starts several processes without a distributed backend taking effect leaves each process
training alone into the same run folder; :func:`check_launch` stops that at once with how to launch instead.
A launch asking for FSDP or DeepSpeed that accelerate runs as plain data parallel (on the CPU it always does)
is stopped by :func:`check_sharding`, and FSDP version 1 by :func:`check_fsdp_version`.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Mapping

from loopdiff.config import ConfigError, RunConfig
from loopdiff.prompts import PromptSet
from loopdiff.rewards.base import PromptRequirement, parse_reward_spec, registered_rewards

LAUNCH_HELP = (
    "on the CPU launch with 'torchrun --nproc_per_node N -m loopdiff.cli train model.device=cpu' "
    "(OMP_NUM_THREADS=1), on GPUs with 'accelerate launch --multi_gpu --num_processes N -m loopdiff.cli train'"
)


class LaunchError(RuntimeError):
    """The processes of a run were launched in a way that cannot train together."""


def check_launch(num_processes: int, env: Mapping[str, str] | None = None) -> None:
    """Raise LaunchError when the launcher's process count disagrees with accelerate's ``num_processes``."""
    env = os.environ if env is None else env
    world = env.get("WORLD_SIZE")
    if world is not None and world.isdigit() and int(world) != num_processes:
        raise LaunchError(
            f"WORLD_SIZE={world} processes were launched but accelerate runs {num_processes} "
            f"(no distributed backend took effect, so each would train alone into the same folder); {LAUNCH_HELP}"
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


def check_output_dir(path: Path) -> None:
    """Raise ConfigError unless ``output.dir`` is (or can be made) a folder this process can write."""
    if path.exists() and not path.is_dir():
        raise ConfigError(f"output.dir='{path}' is a file; allowed: a folder (new or existing) that can be written")
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".write-test-"):
            pass
    except OSError as error:
        raise ConfigError(f"output.dir='{path}' cannot be written ({error.strerror or error}); "
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
