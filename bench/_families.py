"""The three families the trainer fine-tunes, with their published architectures and random weights.

``ARCHITECTURES`` writes out, for SD 2 base (stabilityai/stable-diffusion-2-base), SDXL base 1.0
(stabilityai/stable-diffusion-xl-base-1.0) and SD3 medium (stabilityai/stable-diffusion-3-medium-diffusers),
the configs of the denoiser, the VAE, the CLIP text encoders and the scheduler as their ``config.json`` files
give them (nothing is downloaded). SD3 is built without its T5-XXL encoder: diffusers then conditions on
zeros of T5's width and length (4096 x 256), so the transformer sees the same shapes; the text encoders run
once per distinct prompt (their states are cached), so they hardly count in an epoch.

``family_configs(family, scale, resolution)`` divides every width by ``scale`` (channels, attention widths,
text-encoder widths and projections, the time embedding; attention head counts are kept, so heads narrow)
and the deep stacks' layer counts by it, rounded up (SDXL's 10 transformer layers, SD3's 24 blocks, the text
encoders' layers, at least 2 where the pipeline reads the penultimate layer); the UNets' 2 resnets per level
and the VAE's blocks keep their number. ``resolution`` is the image size in pixels (the VAEs downscale 8x).
``scale`` 1 is the published architecture; it must divide 64 (every width stays an integer with 32 / scale
norm groups, or one).

``SETTINGS`` are the epochs measured per family at full scale: TRL's DDPOTrainer / the LOOP paper for SD 2
(512 px, 50 DDIM steps), the packaged sdxl-compbench-attributes config for SDXL (1024 px, LoRA) and
Flow-GRPO's for SD3 (512 px, 10 SDE steps, LoRA 32 / 64, as sd3-compbench-attributes).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

FAMILIES = ("sd2", "sdxl", "sd3")
MAX_TOKENS = 77  # CLIP's context length
VAE_DOWNSCALE = 8  # four VAE levels

_SD_BETAS = {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear", "num_train_timesteps": 1000}
_SD_VAE = {
    "act_fn": "silu", "block_out_channels": [128, 256, 512, 512], "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4, "in_channels": 3, "out_channels": 3, "latent_channels": 4,
    "layers_per_block": 2, "norm_num_groups": 32, "sample_size": 512, "scaling_factor": 0.18215,
}
_CLIP_L = {  # openai/clip-vit-large-patch14's text tower (SDXL's and SD3's first encoder)
    "hidden_size": 768, "intermediate_size": 3072, "num_attention_heads": 12, "num_hidden_layers": 12,
    "projection_dim": 768, "hidden_act": "quick_gelu",
}
_CLIP_BIG_G = {  # OpenCLIP ViT-bigG/14's text tower (SDXL's and SD3's second encoder)
    "hidden_size": 1280, "intermediate_size": 5120, "num_attention_heads": 20, "num_hidden_layers": 32,
    "projection_dim": 1280, "hidden_act": "gelu",
}

ARCHITECTURES: dict[str, dict[str, Any]] = {
    "sd2": {
        "unet": {
            "act_fn": "silu", "attention_head_dim": [5, 10, 20, 20], "block_out_channels": [320, 640, 1280, 1280],
            "center_input_sample": False, "cross_attention_dim": 1024,
            "down_block_types": ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
            "up_block_types": ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3,
            "downsample_padding": 1, "dual_cross_attention": False, "flip_sin_to_cos": True, "freq_shift": 0,
            "in_channels": 4, "out_channels": 4, "layers_per_block": 2, "mid_block_scale_factor": 1,
            "norm_eps": 1e-5, "norm_num_groups": 32, "sample_size": 64, "use_linear_projection": True,
        },
        "vae": _SD_VAE,
        # OpenCLIP ViT-H/14's text tower without its last layer (SD 2 reads the last hidden state)
        "text_encoders": [{"hidden_size": 1024, "intermediate_size": 4096, "num_attention_heads": 16,
                           "num_hidden_layers": 23, "projection_dim": 512, "hidden_act": "gelu"}],
        "scheduler": {**_SD_BETAS, "clip_sample": False, "set_alpha_to_one": False, "steps_offset": 1,
                      "prediction_type": "epsilon"},
    },
    "sdxl": {
        "unet": {
            "act_fn": "silu", "addition_embed_type": "text_time", "addition_embed_type_num_heads": 64,
            "addition_time_embed_dim": 256, "attention_head_dim": [5, 10, 20],
            "block_out_channels": [320, 640, 1280], "center_input_sample": False, "cross_attention_dim": 2048,
            "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
            "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
            "downsample_padding": 1, "flip_sin_to_cos": True, "freq_shift": 0, "in_channels": 4, "out_channels": 4,
            "layers_per_block": 2, "mid_block_scale_factor": 1, "norm_eps": 1e-5, "norm_num_groups": 32,
            "projection_class_embeddings_input_dim": 2816, "sample_size": 128,
            "transformer_layers_per_block": [1, 2, 10], "use_linear_projection": True,
        },
        "vae": {**_SD_VAE, "sample_size": 1024, "scaling_factor": 0.13025, "force_upcast": True},
        "text_encoders": [_CLIP_L, _CLIP_BIG_G],
        # its Euler scheduler's config, with the DDIM fields it carries (loopdiff converts it to DDIM)
        "scheduler": {**_SD_BETAS, "clip_sample": False, "interpolation_type": "linear", "prediction_type": "epsilon",
                      "sample_max_value": 1.0, "set_alpha_to_one": False, "skip_prk_steps": True, "steps_offset": 1,
                      "timestep_spacing": "leading", "trained_betas": None, "use_karras_sigmas": False},
    },
    "sd3": {
        "transformer": {
            "attention_head_dim": 64, "caption_projection_dim": 1536, "in_channels": 16, "joint_attention_dim": 4096,
            "num_attention_heads": 24, "num_layers": 24, "out_channels": 16, "patch_size": 2,
            "pooled_projection_dim": 2048, "pos_embed_max_size": 192, "sample_size": 128,
        },
        "vae": {**_SD_VAE, "latent_channels": 16, "sample_size": 1024, "scaling_factor": 1.5305,
                "shift_factor": 0.0609, "use_quant_conv": False, "use_post_quant_conv": False},
        "text_encoders": [_CLIP_L, _CLIP_BIG_G],
        "scheduler": {"num_train_timesteps": 1000, "shift": 3.0},
    },
}


def _check_scale(scale: int) -> None:
    if scale < 1 or 64 % scale:
        raise ValueError(f"scale={scale}: allowed 1, 2, 4, 8, 16, 32, 64 (a divisor of 64)")


def _width(value: int, scale: int) -> int:
    if value % scale:
        raise ValueError(f"width {value} is not divisible by scale {scale}")
    return value // scale


def _layers(value: int, scale: int, least: int = 1) -> int:
    return max(least, math.ceil(value / scale))


def _groups(scale: int) -> int:
    return max(1, 32 // scale)


def _scaled_vae(config: dict[str, Any], scale: int, resolution: int) -> dict[str, Any]:
    return {**config, "block_out_channels": [_width(c, scale) for c in config["block_out_channels"]],
            "norm_num_groups": _groups(scale), "sample_size": resolution}


def _scaled_text(config: dict[str, Any], scale: int, least_layers: int) -> dict[str, Any]:
    return {**config, **{key: _width(config[key], scale) for key in ("hidden_size", "intermediate_size",
                                                                     "projection_dim")},
            "num_hidden_layers": _layers(config["num_hidden_layers"], scale, least_layers),
            "max_position_embeddings": MAX_TOKENS}


def family_configs(family: str, scale: int = 1, resolution: int | None = None) -> dict[str, Any]:
    """The family's component configs with widths (and deep layer counts) divided by ``scale``, at
    ``resolution`` pixels (default: the published native size)."""
    if family not in ARCHITECTURES:
        raise ValueError(f"family={family!r}; allowed: {', '.join(FAMILIES)}")
    _check_scale(scale)
    arch = ARCHITECTURES[family]
    denoiser_key = "transformer" if family == "sd3" else "unet"
    native = arch[denoiser_key]["sample_size"] * VAE_DOWNSCALE
    resolution = native if resolution is None else resolution
    if resolution % VAE_DOWNSCALE:
        raise ValueError(f"resolution={resolution}: must be a multiple of the VAEs' downscale {VAE_DOWNSCALE}")
    latent = resolution // VAE_DOWNSCALE
    d = dict(arch[denoiser_key])
    if family == "sd3":
        d.update(
            attention_head_dim=_width(d["attention_head_dim"], scale),
            caption_projection_dim=_width(d["caption_projection_dim"], scale),
            joint_attention_dim=_width(d["joint_attention_dim"], scale),
            pooled_projection_dim=_width(d["pooled_projection_dim"], scale),
            num_layers=_layers(d["num_layers"], scale),
            sample_size=latent,
        )
    else:
        d.update(
            block_out_channels=[_width(c, scale) for c in d["block_out_channels"]],
            cross_attention_dim=_width(d["cross_attention_dim"], scale),
            norm_num_groups=_groups(scale),
            sample_size=latent,
        )
        if family == "sdxl":
            d.update(
                addition_time_embed_dim=_width(d["addition_time_embed_dim"], scale),
                projection_class_embeddings_input_dim=_width(d["projection_class_embeddings_input_dim"], scale),
                transformer_layers_per_block=[_layers(n, scale) for n in d["transformer_layers_per_block"]],
            )
    least = 1 if family == "sd2" else 2  # SDXL and SD3 read the penultimate hidden state
    return {
        denoiser_key: d,
        "vae": _scaled_vae(arch["vae"], scale, resolution),
        "text_encoders": [_scaled_text(t, scale, least) for t in arch["text_encoders"]],
        "scheduler": dict(arch["scheduler"]),
    }


def build_family_pipeline(family: str, scale: int = 1, resolution: int | None = None, seed: int = 0):
    """A randomly initialised pipeline of the family (StableDiffusionPipeline, StableDiffusionXLPipeline or
    StableDiffusion3Pipeline) built with the real classes from :func:`family_configs`."""
    import torch
    from diffusers import AutoencoderKL
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from loopdiff.embedded.pipeline import world_vocabulary
    from loopdiff.embedded.tokenizer import build_tokenizer

    configs = family_configs(family, scale, resolution)
    tokenizer = build_tokenizer(world_vocabulary(), MAX_TOKENS)
    torch.manual_seed(seed)

    def text_config(config: dict[str, Any]) -> CLIPTextConfig:
        return CLIPTextConfig(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                              eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, **config)

    vae = AutoencoderKL(**configs["vae"])
    if family == "sd2":
        from diffusers import DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel

        return StableDiffusionPipeline(
            vae=vae, text_encoder=CLIPTextModel(text_config(configs["text_encoders"][0])), tokenizer=tokenizer,
            unet=UNet2DConditionModel(**configs["unet"]), scheduler=DDIMScheduler(**configs["scheduler"]),
            safety_checker=None, feature_extractor=None, requires_safety_checker=False,
        )
    first, second = configs["text_encoders"]
    if family == "sdxl":
        from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel

        return StableDiffusionXLPipeline(
            vae=vae, text_encoder=CLIPTextModel(text_config(first)),
            text_encoder_2=CLIPTextModelWithProjection(text_config(second)), tokenizer=tokenizer,
            tokenizer_2=tokenizer, unet=UNet2DConditionModel(**configs["unet"]),
            scheduler=EulerDiscreteScheduler.from_config(configs["scheduler"]), add_watermarker=False,
        )
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline

    return StableDiffusion3Pipeline(
        transformer=SD3Transformer2DModel(**configs["transformer"]),
        scheduler=FlowMatchEulerDiscreteScheduler(**configs["scheduler"]), vae=vae,
        text_encoder=CLIPTextModelWithProjection(text_config(first)), tokenizer=tokenizer,
        text_encoder_2=CLIPTextModelWithProjection(text_config(second)), tokenizer_2=tokenizer,
        text_encoder_3=None, tokenizer_3=None,
    )


def save_family_pipeline(folder: Path, family: str, scale: int, resolution: int | None, seed: int = 0) -> Path:
    """Build the family's pipeline and ``save_pretrained`` it to ``folder`` (reused when already there)."""
    folder = Path(folder)
    if not (folder / "model_index.json").is_file():
        build_family_pipeline(family, scale, resolution, seed).save_pretrained(folder)
    return folder


@dataclass(frozen=True)
class EpochSetting:
    """What one measured epoch of a family runs (the trainer's config fields it sets)."""

    resolution: int
    steps: int
    guidance: float
    eta: float  # DDIM eta, or the SD3 SDE's noise level
    prompts: int = 2
    k: int = 4
    sampling_batch: int = 8
    micro_batch: int = 4
    lora: bool = False
    lora_rank: int = 4
    lora_alpha: float = 4.0
    gradient_checkpointing: bool = False
    clip_range: float = 1e-4

    @property
    def samples(self) -> int:
        return self.prompts * self.k

    def with_changes(self, **changes: Any) -> "EpochSetting":
        return replace(self, **{key: value for key, value in changes.items() if value is not None})


SETTINGS: dict[str, EpochSetting] = {
    # TRL's DDPOConfig defaults (50 steps, eta 1, guidance 5) and the LOOP paper's sd2 run: full fine-tuning
    "sd2": EpochSetting(resolution=512, steps=50, guidance=5.0, eta=1.0, sampling_batch=8, micro_batch=4),
    # the packaged sdxl-compbench-attributes config: 1024 px, LoRA 16, gradient checkpointing, 2 pairs per call
    "sdxl": EpochSetting(resolution=1024, steps=50, guidance=5.0, eta=1.0, sampling_batch=4, micro_batch=2,
                         lora=True, lora_rank=16, lora_alpha=16.0, gradient_checkpointing=True),
    # Flow-GRPO's SD3 settings, as the packaged sd3-compbench-attributes config
    "sd3": EpochSetting(resolution=512, steps=10, guidance=4.5, eta=0.7, sampling_batch=8, micro_batch=4,
                        lora=True, lora_rank=32, lora_alpha=64.0),
}


def trainer_values(family: str, setting: EpochSetting, pipeline: Path, prompt_file: Path, run_dir: Path,
                   device: str = "cpu", mixed_precision: str = "no") -> dict[str, Any]:
    """The run configuration (a mapping for ``config_from_dict``) of one measured epoch of the family; the
    pipeline folder is built at the setting's resolution, so ``sampling.resolution`` stays unset (native)."""
    return {
        "model": {"pretrained": str(pipeline), "device": device, "mixed_precision": mixed_precision,
                  "lora": setting.lora, "lora_rank": setting.lora_rank, "lora_alpha": setting.lora_alpha},
        "sampling": {"num_steps": setting.steps, "guidance_scale": setting.guidance, "eta": setting.eta,
                     "batch_size": setting.sampling_batch},
        "estimator": {"preset": "loop", "samples_per_prompt": setting.k, "clip_range": setting.clip_range},
        "training": {"epochs": 1_000_000, "samples_per_epoch": setting.samples, "micro_batch_size": setting.micro_batch,
                     "gradient_checkpointing": setting.gradient_checkpointing,
                     "learning_rate": 3e-4 if setting.lora else 1e-5},
        "prompts": {"train": str(prompt_file), "val": str(prompt_file)},
        "reward": {"name": "jpeg_compressibility"},
        "eval": {"max_prompts": 0},
        "output": {"dir": str(run_dir), "progress": False, "tensorboard": False},
    }
