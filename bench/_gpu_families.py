"""One family's epoch on a device, for bench/gpu.py: the pipeline built in memory on the device, the trainer's
figures from bench/epoch.py's ``measure_trainer``, and the device's peak memory.

The pipeline is built directly on the device (random weights, no ``save_pretrained``: a published-size
pipeline would take minutes to write and read back) with its text encoders cut to two layers
(``_families.shrink_text_encoders``; their states keep the real shapes and are computed once per prompt),
then given what ``loopdiff.models.load_pipeline`` gives a loaded one: a DDIM scheduler for the UNet families,
frozen VAE and text encoders.
"""

from __future__ import annotations

import gc
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from _families import EpochSetting, build_family_pipeline, trainer_values
from _memory import peak_rss_mb
from _setup import write_prompts
from epoch import measure_trainer

TEXT_LAYERS = 2


def in_memory_pipeline(family: str, scale: int, resolution: int, device: str):
    """The family's random-weight pipeline built on ``device``, prepared as the trainer's loader prepares one."""
    from diffusers import DDIMScheduler

    from loopdiff.models import is_flow_matching, text_encoders

    with torch.device(device):
        pipe = build_family_pipeline(family, scale, resolution, text_layers=TEXT_LAYERS)
    if not is_flow_matching(pipe):
        pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)  # SDXL's Euler scheduler, as loaded
    pipe.vae.requires_grad_(False)
    for encoder in text_encoders(pipe):
        encoder.requires_grad_(False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def fresh_accelerator_state() -> None:
    """Forget accelerate's process-wide state, so the next trainer may pick another device or precision."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(True)


def reset_peak_memory(device: str) -> None:
    """Free what the previous family left (its trainer's reference cycles too) and restart the peak count."""
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def peak_memory_mb(device: str) -> float:
    """The device's peak allocated memory since the last reset (CUDA), else the process's peak RSS."""
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated() / 2**20
    return peak_rss_mb()


def measure_on_device(family: str, scale: int, setting: EpochSetting, scratch: Path, device: str,
                      mixed_precision: str, warmup: int = 1, epochs: int = 1, compile: bool = False) -> dict[str, Any]:
    """One family's measured epochs on ``device`` and the figures bench/gpu.py reports (``compile``: with
    ``model.compile``)."""
    from loopdiff.config import config_from_dict
    from loopdiff.training.trainer import Trainer

    reset_peak_memory(device)
    start = time.perf_counter()
    pipe = in_memory_pipeline(family, scale, setting.resolution, device)
    prompts = write_prompts(scratch, setting.prompts)
    values = trainer_values(family, setting, Path(f"in-memory-{family}"), prompts, scratch / f"run-{family}",
                            device, mixed_precision)
    values["model"]["compile"] = compile
    fresh_accelerator_state()
    trainer = Trainer(config_from_dict(values), pipeline=pipe)
    built = time.perf_counter() - start
    result = measure_trainer(trainer, warmup, epochs)
    precision = {"tf32": trainer.config.model.tf32, "float32_matmul_precision": torch.get_float32_matmul_precision()}
    del trainer, pipe
    sec, samples = result["seconds"], setting.samples
    return {
        "family": family, "scale": scale, "setting": {**asdict(setting), "samples": samples},
        "mixed_precision": mixed_precision, "device": device, "compile": compile, **precision, "build_seconds": built,
        **result,
        "sampling_images_per_second": samples / sec["sampling"],
        "images_per_second": samples / sec["epoch"],
        "seconds_per_trained_sample": sec["training"] / samples,
        "peak_memory_mb": peak_memory_mb(device),
        "peak_memory_kind": "cuda max_memory_allocated" if device.startswith("cuda") else "process peak RSS",
    }
