"""The model card of an exported fine-tune: ``README.md`` beside the weights, as diffusers' training scripts
write one. YAML front matter (``base_model``, ``library_name: diffusers``, tags naming loopdiff, the estimator
and the reward), then what the model is, how to load it, its evaluation (``eval/base.json``,
``eval/final.json``) and the resolved config.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from loopdiff.config import RunConfig
from loopdiff.estimators import Estimator
from loopdiff.evaluation import paired_change
from loopdiff.rewards.base import RewardError, parse_reward_spec


def card_tags(estimator: Estimator, reward_name: str, lora: bool) -> list[str]:
    """``loopdiff``, the usual diffusers tags, the estimator's name and each reward term's name."""
    try:
        rewards = [name for name, _ in parse_reward_spec(reward_name)]
    except RewardError:
        rewards = [reward_name]
    tags = ["loopdiff", "diffusers", "text-to-image", "reinforcement-learning", estimator.name, *rewards]
    return list(dict.fromkeys([*tags, "lora"] if lora else tags))


def read_evaluations(run_dir: Path, final_tag: str = "final") -> dict[str, dict[str, Any]]:
    """The records of ``eval/base.json`` and of the fine-tuned model's ``eval/<final_tag>.json`` that exist,
    as ``base`` and ``final``."""
    files = {"base": run_dir / "eval" / "base.json", "final": run_dir / "eval" / f"{final_tag}.json"}
    return {tag: json.loads(path.read_text()) for tag, path in files.items() if path.is_file()}


def evaluation_table(evaluations: dict[str, dict[str, Any]], images_per_prompt: int) -> str:
    """Markdown table of the mean validation reward per reward, base and fine-tuned (with the paired change)."""
    if not evaluations:
        return "No evaluation was run (prompts.val unset or eval.max_prompts=0)."
    first = next(iter(evaluations.values()))
    lines = [f"Mean over {len(first['prompts'])} validation prompts of the per-prompt mean over "
             f"{images_per_prompt} images (fixed seeds):", ""]
    base, final = evaluations.get("base"), evaluations.get("final")
    columns = [tag for tag in ("base", "final") if tag in evaluations]
    header = ["reward", *("base model" if c == "base" else "fine-tuned" for c in columns)]
    if base and final:
        header.append("change (+- standard error over prompts)")
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name in first["means"]:
        row = [f"`{name}`", *(_mean_cell(evaluations[c], name) for c in columns)]
        if base and final:
            change, se = paired_change(base["per_prompt"][name], final["per_prompt"][name])
            row.append(f"{change:+.4f} +- {se:.4f}" if np.isfinite(change) else "n/a")
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def _mean_cell(evaluation: dict, name: str) -> str:
    """A table cell for one reward's mean: the number, with how many images scored non-finite when any did."""
    mean, bad = evaluation["means"][name], evaluation.get("nonfinite", {}).get(name, 0)
    text = "n/a" if mean is None or not np.isfinite(mean) else f"{mean:.4f}"
    return f"{text} ({bad} non-finite)" if bad else text


FLOW_PIPELINES = ("StableDiffusion3Pipeline", "FluxPipeline")  # their own Euler scheduler, no eta


def usage_snippet(config: RunConfig, path: Path, pipeline_class: str = "StableDiffusionPipeline") -> str:
    """Python that loads the exported model with diffusers' ``pipeline_class`` and samples as it was trained:
    with DDIM at the trained eta for a UNet pipeline; with the pipeline's own flow-matching Euler scheduler (the
    ODE the trained SDE shares its marginals with) for an SD3 or Flux pipeline, with the trained number of T5
    tokens when it is not the pipeline's default."""
    s = config.sampling
    size = "" if s.resolution is None else f"height={s.resolution}, width={s.resolution}, "
    tokens = "" if s.max_sequence_length is None else f", max_sequence_length={s.max_sequence_length}"
    load = (f'pipe = {pipeline_class}.from_pretrained("{config.model.pretrained}")\n'
            f'pipe.load_lora_weights("{path}")' if config.model.lora
            else f'pipe = {pipeline_class}.from_pretrained("{path}")')
    if pipeline_class in FLOW_PIPELINES:
        return (
            f"```python\nfrom diffusers import {pipeline_class}\n\n{load}\n"
            f'image = pipe("a prompt", {size}num_inference_steps={s.num_steps}, '
            f"guidance_scale={s.guidance_scale}{tokens}).images[0]\n```"
        )
    return (
        f"```python\nfrom diffusers import DDIMScheduler, {pipeline_class}\n\n"
        f"{load}\npipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)\n"
        f'image = pipe("a prompt", {size}num_inference_steps={s.num_steps}, guidance_scale={s.guidance_scale}, '
        f"eta={s.eta}).images[0]\n```"
    )


def sampler_phrase(config: RunConfig, pipeline_class: str) -> str:
    """How the training samples were drawn: DDIM steps and eta, or the flow sampler's SDE and noise level (and,
    for Flux, that the guidance is the embedded one)."""
    s = config.sampling
    if pipeline_class in FLOW_PIPELINES:
        form = "Flow-GRPO's SDE" if s.sde_type == "sde" else "the coefficients-preserving SDE"
        guidance = "embedded guidance" if pipeline_class == "FluxPipeline" else "guidance"
        return (f"{s.num_steps} flow-matching steps of {form} (`sde_type: {s.sde_type}`), noise level {s.eta}, "
                f"{guidance} {s.guidance_scale}")
    return f"{s.num_steps} DDIM steps, eta {s.eta}, guidance {s.guidance_scale}"


def ema_note(config: RunConfig, ema_updates: int | None = None) -> str:
    """A sentence saying which weights these are with an EMA (``training.ema_decay``): its average after
    ``ema_updates`` updates, or, when it had none, the trained weights themselves; nothing without an EMA."""
    t = config.training
    if not t.ema_decay:
        return ""
    every = "optimiser step" if t.ema_every == 1 else f"{t.ema_every} optimiser steps"
    if ema_updates == 0:
        return (f" The weights are the trained weights themselves, not their exponential moving average: the "
                f"average (decay {t.ema_decay}, updated every {every}) had no update in this run, so it still "
                "held the starting weights.")
    count = "" if ema_updates is None else f"; {ema_updates} update{'s' * (ema_updates != 1)}"
    return (f" The weights are the exponential moving average of the trained weights (decay {t.ema_decay}, "
            f"updated every {every}{count}), which the evaluation below used too.")


def model_card(
    config: RunConfig, estimator: Estimator, reward_name: str, run_dir: Path, epochs: int, path: Path,
    pipeline_class: str = "StableDiffusionPipeline", final_tag: str = "final", note: str = "",
    ema_updates: int | None = None,
) -> str:
    """The text of ``README.md`` for the model exported to ``path`` after ``epochs`` epochs (a fine-tune of a
    diffusers ``pipeline_class`` pipeline), evaluated as ``eval/<final_tag>.json``; ``note`` ends the summary;
    ``ema_updates``: how many updates the EMA had (see :func:`ema_note`)."""
    front = {
        "base_model": config.model.pretrained,
        "library_name": "diffusers",
        "pipeline_tag": "text-to-image",
        "tags": card_tags(estimator, reward_name, config.model.lora),
    }
    network = "transformer" if pipeline_class in FLOW_PIPELINES else "UNet"
    kind = "LoRA weights" if config.model.lora else f"A full {network} fine-tune"
    prompts = config.prompts.train if config.prompts.max_train is None else \
        f"{config.prompts.train} (first {config.prompts.max_train})"
    sections = [
        f"---\n{yaml.safe_dump(front, sort_keys=False)}---",
        f"# {estimator.name} fine-tune of {config.model.pretrained}",
        f"{kind} of `{config.model.pretrained}`, trained with loopdiff's `{estimator.name}` estimator "
        f"against the reward `{reward_name}` for {epochs} epoch{'s' * (epochs != 1)} of "
        f"{config.training.samples_per_epoch} samples "
        f"on the prompts `{prompts}` ({sampler_phrase(config, pipeline_class)}).{ema_note(config, ema_updates)}{note}",
        "## Use\n\n" + usage_snippet(config, path, pipeline_class),
        "## Evaluation\n\n" + evaluation_table(read_evaluations(run_dir, final_tag), config.eval.images_per_prompt),
        "## Estimator\n\n```yaml\n" + yaml.safe_dump(dataclasses.asdict(estimator), sort_keys=False) + "```",
        "## Training configuration\n\nThe resolved config (`loopdiff train --config` accepts it as a file):\n\n"
        "```yaml\n" + yaml.safe_dump(config.to_dict(), sort_keys=False) + "```",
    ]
    return "\n\n".join(sections) + "\n"

