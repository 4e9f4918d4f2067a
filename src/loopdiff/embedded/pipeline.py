"""The embedded base model: a tiny Stable-Diffusion-format pipeline for the miniature world.

The layout is exactly Stable Diffusion's (``model_index.json``, ``tokenizer/``, ``text_encoder/``,
``unet/``, ``vae/``, ``scheduler/``), so ``diffusers.StableDiffusionPipeline.from_pretrained(folder)``
loads it through the same code path as the real model. Only the sizes are miniature:
64x64 RGB images, 16x16x4 latents, a ~1.7 M-parameter UNet and a 3-layer, 64-wide CLIP text encoder.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable

import torch
from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from loopdiff.embedded.tokenizer import build_tokenizer

IMAGE_SIZE = 64
LATENT_SIZE = 16
LATENT_CHANNELS = 4
MAX_PROMPT_TOKENS = 24  # BOS + up to 22 words + EOS; world prompts use at most ~15
TEXT_HIDDEN = 64

VAE_CONFIG = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D",) * 3,
    up_block_types=("UpDecoderBlock2D",) * 3,
    block_out_channels=(16, 32, 32),
    layers_per_block=1,
    latent_channels=LATENT_CHANNELS,
    norm_num_groups=8,
    sample_size=IMAGE_SIZE,
    scaling_factor=1.0,  # replaced by 1 / std of the latents after VAE training, as SD does
)

# Cross-attention at 8x8 and 4x4 only: attention over 16x16 tokens triples the cost for little gain here.
UNET_CONFIG = dict(
    sample_size=LATENT_SIZE,
    in_channels=LATENT_CHANNELS,
    out_channels=LATENT_CHANNELS,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    mid_block_type="UNetMidBlock2DCrossAttn",
    block_out_channels=(32, 64, 64),
    layers_per_block=1,
    cross_attention_dim=TEXT_HIDDEN,
    attention_head_dim=8,  # diffusers' name for the number of heads in this class
    norm_num_groups=16,
)

TEXT_ENCODER_CONFIG = dict(
    hidden_size=TEXT_HIDDEN,
    intermediate_size=4 * TEXT_HIDDEN,
    num_hidden_layers=3,
    num_attention_heads=4,
    max_position_embeddings=MAX_PROMPT_TOKENS,
    hidden_act="quick_gelu",
    projection_dim=TEXT_HIDDEN,
)

# The noise schedule of Stable Diffusion; sampling uses DDIM (the RL samplers read these betas).
NOISE_SCHEDULE = dict(
    num_train_timesteps=1000,
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    prediction_type="epsilon",
    clip_sample=False,
)
SCHEDULER_CONFIG = dict(**NOISE_SCHEDULE, set_alpha_to_one=False, steps_offset=1)


def world_vocabulary() -> list[str]:
    """Every word the miniature world's captions and prompts use (shapes, plurals, colours, textures)."""
    from loopdiff.embedded import world

    words: list[str] = []
    for shape in world.SHAPES:
        words += [shape, plural(shape)]
    words += list(world.COLORS)
    words += list(world.TEXTURES)
    return words


def plural(noun: str) -> str:
    """English plural of a world noun ("circle" -> "circles", "cross" -> "crosses")."""
    return noun + "es" if noun.endswith(("s", "x", "sh", "ch")) else noun + "s"


def build_untrained_pipeline(
    words: Iterable[str] | None = None, seed: int = 0, vae_scaling_factor: float = 1.0
) -> StableDiffusionPipeline:
    """A freshly initialised pipeline with the embedded configs (random weights, seeded).

    ``words`` are the tokenizer's single-token words (default: the world's vocabulary).
    """
    tokenizer = build_tokenizer(world_vocabulary() if words is None else words, MAX_PROMPT_TOKENS)
    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(build_text_encoder_config(tokenizer))
    vae = AutoencoderKL(**{**VAE_CONFIG, "scaling_factor": vae_scaling_factor})
    unet = UNet2DConditionModel(**UNET_CONFIG)
    return assemble_pipeline(tokenizer, text_encoder, vae, unet)


def build_text_encoder_config(tokenizer: CLIPTokenizer) -> CLIPTextConfig:
    """The text-encoder config for ``tokenizer`` (vocabulary size and special-token ids)."""
    return CLIPTextConfig(
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **TEXT_ENCODER_CONFIG,
    )


def assemble_pipeline(
    tokenizer: CLIPTokenizer, text_encoder: CLIPTextModel, vae: AutoencoderKL, unet: UNet2DConditionModel
) -> StableDiffusionPipeline:
    """Put the four parts and a DDIM scheduler into a ``StableDiffusionPipeline`` with no safety checker."""
    return StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=DDIMScheduler(**SCHEDULER_CONFIG),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def embedded_pipeline_path() -> Path:
    """The folder of the shipped pretrained pipeline (``StableDiffusionPipeline.from_pretrained`` loads it)."""
    return Path(__file__).resolve().parent / "assets" / "pipeline"


def embedded_flow_pipeline_path() -> Path:
    """The folder of the shipped flow-matching base (``StableDiffusion3Pipeline``; ``pretrain_flow.py``)."""
    return Path(__file__).resolve().parent / "assets" / "flow_pipeline"


def load_embedded_pipeline(
    device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32, path: str | Path | None = None
) -> StableDiffusionPipeline:
    """Load the shipped pretrained pipeline (or the one saved at ``path``) onto ``device``, progress bar off."""
    folder = Path(path) if path is not None else embedded_pipeline_path()
    if not (folder / "model_index.json").is_file():
        raise FileNotFoundError(f"no pipeline at {folder}: model_index.json is missing")
    pipe = StableDiffusionPipeline.from_pretrained(
        folder, torch_dtype=dtype, safety_checker=None, requires_safety_checker=False, local_files_only=True
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)
