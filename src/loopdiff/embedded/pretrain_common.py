"""What both pretraining stages share (the UNet base, ``pretrain.py``, and the flow-matching base,
``pretrain_flow.py``): the seeded caption/render stream, tokenisation, the EMA, the optimiser step and
learning-rate schedule, the atomic training state, and the flags' checks."""

from __future__ import annotations

import argparse
import math
import os
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from transformers import CLIPTokenizer

from loopdiff.checks import failed_field
from loopdiff.embedded import prompts, world

STATE_DIR = "pretrain_state"  # the checkpointed training state, inside the output folder


def draw_batch(
    seed: int,
    stage: int,
    step: int,
    batch_size: int,
    single_object_prob: float,
    drop_attribute_prob: float,
    neglect_prob: float = 0.0,
    leak_color_prob: float = 0.0,
) -> tuple[list[str], torch.Tensor]:
    """``batch_size`` fresh (caption, image) pairs; images float (B, 3, 64, 64) in [-1, 1].

    ``neglect_prob`` / ``leak_color_prob`` > 0 corrupt the images (not the captions) with
    ``corrupt_scene``, from a generator of their own so the clean data stream is unchanged.
    """
    rng = np.random.default_rng([seed, stage, step])
    corrupt_rng = np.random.default_rng([seed, stage, step, 1])
    captions, images = [], []
    for _ in range(batch_size):
        caption, scene = prompts.random_caption_and_scene(
            rng, single_object_prob=single_object_prob, drop_attribute_prob=drop_attribute_prob
        )
        if neglect_prob > 0 or leak_color_prob > 0:
            scene = corrupt_scene(scene, corrupt_rng, neglect_prob, leak_color_prob)
        captions.append(caption)
        images.append(world.render(scene))
    return captions, to_model_pixels(np.stack(images))


def corrupt_scene(
    scene: world.Scene, rng: np.random.Generator, neglect_prob: float, leak_color_prob: float
) -> world.Scene:
    """Make a multi-object image disagree with its caption the way Stable Diffusion's outputs do.

    With probability ``neglect_prob`` the last object is left out (catastrophic neglect: "a red circle and
    a blue square" shows only the circle); otherwise, with probability ``leak_color_prob``, the last
    object takes the first object's colour (attribute leakage). Single-object scenes are kept.
    """
    objects = scene.objects
    if len(objects) < 2:
        return scene
    if rng.random() < neglect_prob:
        return replace(scene, objects=objects[:-1])
    if rng.random() < leak_color_prob:
        return replace(scene, objects=objects[:-1] + (replace(objects[-1], color=objects[0].color),))
    return scene


def to_model_pixels(images: np.ndarray) -> torch.Tensor:
    """uint8 (B, H, W, 3) renders -> float (B, 3, H, W) in [-1, 1], the VAE's input range."""
    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1.0


def tokenize(tokenizer: CLIPTokenizer, captions: Sequence[str], device: torch.device) -> torch.Tensor:
    """Token ids padded to the tokenizer's max length, as ``StableDiffusionPipeline`` pads prompts."""
    ids = tokenizer(
        list(captions), padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
        return_tensors="pt",
    ).input_ids
    return ids.to(device)


@torch.no_grad()
def update_ema(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    """``ema <- decay * ema + (1 - decay) * model`` for every floating-point parameter."""
    for e, p in zip(ema.parameters(), model.parameters()):
        e.lerp_(p, 1.0 - decay)


def ema_decay(step: int, decay: float) -> float:
    """The EMA decay at ``step``: ``decay``, lower during the first steps so the EMA leaves the initial weights."""
    return min(decay, (1 + step) / (10 + step))


def optimizer_step(optimizer: torch.optim.Optimizer, loss: torch.Tensor, grad_clip: float) -> None:
    """Backpropagate ``loss`` and take one step, the gradient norm over every parameter clipped to ``grad_clip``."""
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    params = [p for group in optimizer.param_groups for p in group["params"]]
    torch.nn.utils.clip_grad_norm_(params, grad_clip)
    optimizer.step()


def save_atomic(state: dict[str, Any], path: Path) -> None:
    """``torch.save`` to a temporary file beside ``path``, then rename: a crash never leaves half a state."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


class PretrainStateError(ValueError):
    """A resume state that is not a pretraining state (not loadable as tensors and plain values)."""


def load_state_file(path: Path, device: torch.device) -> dict[str, Any]:
    """A pretraining state written by :func:`save_atomic`, loaded as tensors and plain containers only
    (``weights_only=True``): a file that would need to run code to load is refused, not executed."""
    try:
        return torch.load(path, map_location=device, weights_only=True)
    except Exception as err:  # torch raises UnpicklingError or RuntimeError, depending on what is inside
        raise PretrainStateError(f"{path} is not a pretraining state that loads as tensors and plain values "
                                 f"({type(err).__name__}); delete it or pass --no-resume") from None


def warmup_cosine(step: int, warmup: int, total: int) -> float:
    """Learning-rate multiplier: linear warm-up, then cosine decay to 10%."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))


def check_flags(config: Any) -> None:
    """Raise ValueError naming the flag of the first field of ``config`` outside the range it declares, or
    ``--output-dir`` when it cannot be written (before any stage runs)."""
    from loopdiff.training.preflight import check_output_dir

    failed = failed_field(config)
    if failed is not None:
        name, value, check = failed
        raise ValueError(f"--{name.replace('_', '-')} {value!r} is invalid; allowed: {check.describe()}")
    check_output_dir(Path(config.output_dir), "--output-dir")


def parse_config(
    parser: argparse.ArgumentParser, argv: list[str] | None, to_config: Callable[[argparse.Namespace], Any]
) -> tuple[argparse.Namespace, Any]:
    """Parse ``argv`` and turn it into a config with ``to_config``; a ValueError exits with the parser's usage."""
    args = parser.parse_args(argv)
    try:
        return args, to_config(args)
    except ValueError as err:
        parser.error(str(err))
