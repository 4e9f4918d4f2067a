"""What the benchmarks run on: a pipeline folder, the prompts, and the trainer's configuration.

The default pipeline is the shipped embedded model when its weights exist; otherwise a freshly initialised
pipeline with the embedded model's architecture (a ~1 M-parameter UNet on 8x8x4 latents, 64x64 images),
saved with ``save_pretrained`` so the trainer loads it through its real loading path. Random weights cost
exactly as much per call as trained ones, which is all a speed benchmark needs.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

# Eight prompts of the embedded world's vocabulary (every word is a single token of its tokenizer).
PROMPTS = (
    "a red circle",
    "a blue square",
    "a green triangle",
    "a yellow star",
    "a purple hexagon",
    "an orange diamond",
    "a pink heart",
    "a white cross",
)

def vae_downscale() -> int:
    """Pixels per latent along a side: each embedded VAE block after the first halves (64x64 -> 8x8)."""
    from loopdiff.embedded.pipeline import VAE_CONFIG

    return 2 ** (len(VAE_CONFIG["block_out_channels"]) - 1)


@dataclass(frozen=True)
class BenchSetup:
    """One benchmarked epoch: prompts x K trajectories of ``steps`` DDIM steps, LOOP preset, JPEG reward."""

    prompts: int = 8
    k: int = 4
    steps: int = 20
    guidance: float = 5.0
    timestep_fraction: float = 1.0
    clip_range: float = 1e-4
    sampling_batch: int = 32
    micro_batch: int = 64
    preset: str = "loop"
    reward: str = "jpeg_compressibility"
    learning_rate: float = 1e-5
    attention: str = "default"  # "default" (diffusers' SDPA processor) or "classic" (matmul + softmax)
    gradient_checkpointing: bool = False

    @property
    def samples(self) -> int:
        return self.prompts * self.k

    def with_changes(self, **changes: Any) -> "BenchSetup":
        return replace(self, **changes)


def embedded_weights_folder() -> Path | None:
    """The shipped embedded pipeline folder if its weights are present, else None."""
    from loopdiff.embedded.pipeline import embedded_pipeline_path

    folder = embedded_pipeline_path()
    return folder if (folder / "model_index.json").is_file() and (folder / "unet").is_dir() else None


def build_bench_pipeline(latent_size: int = 8, seed: int = 0):
    """A randomly initialised pipeline with the embedded architecture at ``latent_size`` latents."""
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel

    from loopdiff.embedded.pipeline import (
        MAX_PROMPT_TOKENS,
        UNET_CONFIG,
        VAE_CONFIG,
        assemble_pipeline,
        build_text_encoder_config,
        world_vocabulary,
    )
    from loopdiff.embedded.tokenizer import build_tokenizer

    if latent_size < 4 or latent_size % 4:
        raise ValueError(f"latent_size={latent_size}: must be a multiple of 4 (the UNet halves it twice)")
    tokenizer = build_tokenizer(world_vocabulary(), MAX_PROMPT_TOKENS)
    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(build_text_encoder_config(tokenizer))
    vae = AutoencoderKL(**{**VAE_CONFIG, "sample_size": latent_size * vae_downscale()})
    unet = UNet2DConditionModel(**{**UNET_CONFIG, "sample_size": latent_size})
    return assemble_pipeline(tokenizer, text_encoder, vae, unet)


def save_bench_pipeline(folder: Path, latent_size: int = 8, seed: int = 0) -> Path:
    """Build the benchmark pipeline and ``save_pretrained`` it to ``folder`` (reused when already there)."""
    folder = Path(folder)
    if not (folder / "model_index.json").is_file():
        build_bench_pipeline(latent_size, seed).save_pretrained(folder)
    return folder


def default_pipeline_folder(scratch: Path) -> tuple[Path, str]:
    """(folder, description): a private copy of the embedded weights if present, else a saved random-weight
    pipeline. The copy matters: the loaded weights stay memory-mapped, and a process re-shipping the
    embedded weights meanwhile would crash the benchmark (SIGBUS) by truncating the files under it."""
    embedded = embedded_weights_folder()
    if embedded is not None:
        copy = Path(scratch) / "embedded-pipeline"
        if not copy.is_dir():
            shutil.copytree(embedded, copy)
        return copy, "embedded pipeline (trained weights, private copy)"
    folder = save_bench_pipeline(Path(scratch) / "pipeline-l8", 8)
    return folder, "embedded architecture, random weights (embedded weights absent)"


def _prompt(index: int) -> str:
    """The eight world prompts, then pairs of them ("a red circle and a square"): distinct up to 64."""
    first = PROMPTS[index % len(PROMPTS)]
    if index < len(PROMPTS):
        return first
    second = PROMPTS[index // len(PROMPTS) % len(PROMPTS)].split()[-1]
    return f"{first} and a {second}"


def write_prompts(folder: Path, count: int) -> Path:
    """A file of ``count`` distinct prompts, so the trainer draws ``count`` different prompts per epoch."""
    if count < 1:
        raise ValueError(f"prompt count {count} must be >= 1")
    path = Path(folder) / f"prompts-{count}.txt"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(_prompt(i) + "\n" for i in range(count)))
    return path


def trainer_config(setup: BenchSetup, pipeline: Path, scratch: Path, device: str = "cpu") -> dict[str, Any]:
    """The run configuration (as a mapping for ``config_from_dict``) of one benchmarked epoch."""
    prompt_file = write_prompts(scratch, setup.prompts)
    return {
        "model": {"pretrained": str(pipeline), "device": device, "mixed_precision": "no"},
        "sampling": {"num_steps": setup.steps, "guidance_scale": setup.guidance, "batch_size": setup.sampling_batch},
        "estimator": {"preset": setup.preset, "samples_per_prompt": setup.k, "clip_range": setup.clip_range},
        "training": {
            "epochs": 1_000_000,
            "samples_per_epoch": setup.samples,
            "timestep_fraction": setup.timestep_fraction,
            "micro_batch_size": setup.micro_batch,
            "gradient_checkpointing": setup.gradient_checkpointing,
            "learning_rate": setup.learning_rate,
        },
        "prompts": {"train": str(prompt_file), "val": str(prompt_file)},
        "reward": {"name": setup.reward},
        "eval": {"max_prompts": 0},
        "output": {"dir": str(Path(scratch) / "run"), "progress": False, "tensorboard": False},
    }


def build_trainer(setup: BenchSetup, pipeline: Path, scratch: Path, device: str = "cpu"):
    """A ``Trainer`` for ``setup`` on the pipeline folder (loaded through the trainer's own loading path)."""
    from loopdiff.config import config_from_dict
    from loopdiff.training.trainer import Trainer

    trainer = Trainer(config_from_dict(trainer_config(setup, pipeline, scratch, device)))
    use_attention(trainer.unet, setup.attention)
    return trainer


def use_attention(unet, kind: str) -> None:
    """Switch the UNet's attention processors: ``"default"`` keeps diffusers' choice, ``"classic"`` sets
    ``AttnProcessor`` (plain batched matmul + softmax, no scaled_dot_product_attention)."""
    from diffusers.models.attention_processor import AttnProcessor

    if kind == "classic":
        unet.set_attn_processor(AttnProcessor())
    elif kind != "default":
        raise ValueError(f"attention={kind!r}; allowed: 'default', 'classic'")
