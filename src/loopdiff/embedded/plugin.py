"""The embedded world as a plugin: the models ``embedded`` (Stable Diffusion format) and ``embedded-flow``
(SD3 format, flow matching), the prompt source ``embedded:<category>[:val]``, the ``embedded_*`` rewards, the
packaged ``embedded-*`` configs, the default model and config (``loopdiff train`` with neither runs the
aesthetic main job on the embedded model) and the ``loopdiff pretrain`` command, registered through the
core's registries as any third party's would be."""

from __future__ import annotations

from pathlib import Path

from loopdiff.plugins import (
    register_command, register_configs, register_default, register_model, register_prompt_source,
)
from loopdiff.prompts import PromptError, PromptSet, prompt_set_from_lines
from loopdiff.rewards.base import register_reward_modules

NAME = "embedded"
FLOW_NAME = "embedded-flow"
# What a run on the embedded model uses for the fields left unset; any other model must name its own.
DEFAULTS = {
    "prompts.train": "embedded:color",
    "prompts.val": "embedded:color:val",
    "reward.name": "embedded_vqa",
}
PROMPT_USAGE = "embedded:<category>[:val]"
DEFAULT_CONFIG = "embedded-aesthetic.yaml"  # what ``loopdiff train`` runs without --config (``make run``)


def register() -> None:
    """Register the embedded model, its prompt files and its rewards (each module loads when first needed)."""
    register_model(NAME, pipeline_folder, DEFAULTS)
    register_model(FLOW_NAME, flow_pipeline_folder, DEFAULTS)
    register_prompt_source(NAME, embedded_prompts, PROMPT_USAGE)
    register_reward_modules("loopdiff.embedded.rewards", "loopdiff.embedded.aesthetic")
    register_configs(configs_folder)
    register_default(NAME, DEFAULT_CONFIG)
    register_command("pretrain", pretrain_command, help="pretrain the embedded base pipeline from scratch",
                     description="Pretrain the embedded base pipeline; run 'loopdiff pretrain --help' for its options.")


def configs_folder() -> Path:
    """The folder of the packaged ``embedded-*.yaml`` configs."""
    return Path(__file__).parent / "configs"


def pretrain_command(argv: list[str]) -> int:
    """``loopdiff pretrain ARGS...``: see ``loopdiff.embedded.pretrain.pretrain_cli``."""
    from loopdiff.embedded.pretrain import pretrain_cli

    return pretrain_cli(argv)


def pipeline_folder() -> Path:
    """The shipped pretrained pipeline's folder."""
    from loopdiff.embedded.pipeline import embedded_pipeline_path

    return embedded_pipeline_path()


def flow_pipeline_folder() -> Path:
    """The shipped pretrained flow-matching (SD3-format) pipeline's folder."""
    from loopdiff.embedded.pipeline import embedded_flow_pipeline_path

    return embedded_flow_pipeline_path()


def embedded_prompts(argument: str, spec: str) -> PromptSet:
    """``<category>[:train|val]`` -> the shipped prompt file of that category and split."""
    from loopdiff.embedded.prompts import CATEGORIES, load_prompts

    parts = argument.split(":")
    category, split = parts[0], parts[1] if len(parts) > 1 else "train"
    if category not in CATEGORIES or split not in ("train", "val"):
        raise PromptError(
            f"prompt source '{spec}': use embedded:<category>[:train|val] with category one of {', '.join(CATEGORIES)}"
        )
    return prompt_set_from_lines(load_prompts(category, split), category, spec)
