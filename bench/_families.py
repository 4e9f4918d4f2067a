"""The four families the trainer fine-tunes, with their published architectures and random weights.

``ARCHITECTURES`` writes out, for SD 2 base (stabilityai/stable-diffusion-2-base), SDXL base 1.0
(stabilityai/stable-diffusion-xl-base-1.0), SD3 medium (stabilityai/stable-diffusion-3-medium-diffusers) and
FLUX.1-dev (black-forest-labs/FLUX.1-dev), the configs of the denoiser, the VAE, the text encoders and the
scheduler as their ``config.json`` files give them (nothing is downloaded). SD3 is built without its T5-XXL
encoder: diffusers then conditions on zeros of T5's width and length (4096 x 256), so the transformer sees the
same shapes. Flux cannot do without T5 (its only token states), so its T5-XXL encoder is built too. The text
encoders run once per distinct prompt (their states are cached), so they hardly count in an epoch.

``family_configs(family, scale, resolution)`` divides every width by ``scale`` (channels, attention widths,
text-encoder widths and projections, the time embedding; attention head counts are kept, so heads narrow;
Flux's rotary axes split the narrower head in the same proportions, in even parts) and the deep stacks'
layer counts by it, rounded up (SDXL's 10 transformer layers, SD3's 24 blocks, Flux's 19 double- and 38
single-stream blocks, the text encoders' layers, at least 2 where the pipeline reads the penultimate layer);
the UNets' 2 resnets per level and the VAE's blocks keep their number. ``resolution`` is the image size in
pixels (the VAEs downscale 8x). ``scale`` 1 is the published architecture; it must divide 64 (every width
stays an integer with 32 / scale norm groups, or one).

``SETTINGS`` are the epochs measured per family at full scale: TRL's DDPOTrainer / the LOOP paper for SD 2
(512 px, 50 DDIM steps), the packaged sdxl-compbench-attributes config for SDXL (1024 px, LoRA) and
Flow-GRPO's for SD3 (512 px, 10 SDE steps, LoRA 32 / 64, as sd3-compbench-attributes) and Flux (512 px,
6 SDE steps, embedded guidance, LoRA 64 / 128, 128 T5 tokens, as flux-compbench-attributes).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

FAMILIES = ("sd2", "sdxl", "sd3", "flux")
MAX_TOKENS = 77  # CLIP's context length
FLUX_RESOLUTION = 1024  # FluxPipeline's default size (its transformer has no sample_size)
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
_T5_XXL = {  # google/t5-v1_1-xxl's encoder (FLUX.1-dev's text_encoder_2), with T5's 32128-token vocabulary
    "d_model": 4096, "d_ff": 10240, "d_kv": 64, "num_heads": 64, "num_layers": 24, "feed_forward_proj": "gated-gelu",
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
    "flux": {
        "transformer": {
            "attention_head_dim": 128, "axes_dims_rope": [16, 56, 56], "guidance_embeds": True, "in_channels": 64,
            "joint_attention_dim": 4096, "num_attention_heads": 24, "num_layers": 19, "num_single_layers": 38,
            "patch_size": 1, "pooled_projection_dim": 768,
        },
        "vae": {**_SD_VAE, "latent_channels": 16, "sample_size": 1024, "scaling_factor": 0.3611,
                "shift_factor": 0.1159, "use_quant_conv": False, "use_post_quant_conv": False},
        "text_encoders": [_CLIP_L],  # FluxPipeline reads its pooled output
        "t5": _T5_XXL,
        "scheduler": {"base_image_seq_len": 256, "base_shift": 0.5, "max_image_seq_len": 4096, "max_shift": 1.15,
                      "num_train_timesteps": 1000, "shift": 3.0, "use_dynamic_shifting": True},
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


def _rope_axes(axes: list[int], head_width: int) -> list[int]:
    """Flux's rotary axes (id column, row, column) for a head of ``head_width``: the first in proportion, the
    rest split between rows and columns, each even (rotary pairs); they sum to the head width."""
    first = 2 * (axes[0] * head_width // sum(axes) // 2)
    rows = 2 * ((head_width - first) // 4)
    return [first, rows, head_width - first - rows]


def _scaled_flux_transformer(d: dict[str, Any], scale: int) -> dict[str, Any]:
    head = _width(d["attention_head_dim"], scale)
    return {**d, "attention_head_dim": head, "axes_dims_rope": _rope_axes(d["axes_dims_rope"], head),
            "joint_attention_dim": _width(d["joint_attention_dim"], scale),
            "pooled_projection_dim": _width(d["pooled_projection_dim"], scale),
            "num_layers": _layers(d["num_layers"], scale), "num_single_layers": _layers(d["num_single_layers"], scale)}


def _scaled_t5(config: dict[str, Any], scale: int) -> dict[str, Any]:
    return {**config, **{key: _width(config[key], scale) for key in ("d_model", "d_ff", "d_kv")},
            "num_layers": _layers(config["num_layers"], scale)}


def family_configs(family: str, scale: int = 1, resolution: int | None = None) -> dict[str, Any]:
    """The family's component configs with widths (and deep layer counts) divided by ``scale``, at
    ``resolution`` pixels (default: the published native size); Flux's also hold its T5 encoder's (``"t5"``)."""
    if family not in ARCHITECTURES:
        raise ValueError(f"family={family!r}; allowed: {', '.join(FAMILIES)}")
    _check_scale(scale)
    arch = ARCHITECTURES[family]
    denoiser_key = "unet" if family in ("sd2", "sdxl") else "transformer"
    native = FLUX_RESOLUTION if family == "flux" else arch[denoiser_key]["sample_size"] * VAE_DOWNSCALE
    resolution = native if resolution is None else resolution
    if resolution % VAE_DOWNSCALE:
        raise ValueError(f"resolution={resolution}: must be a multiple of the VAEs' downscale {VAE_DOWNSCALE}")
    latent = resolution // VAE_DOWNSCALE
    d = dict(arch[denoiser_key])
    if family == "flux":
        d = _scaled_flux_transformer(d, scale)
    elif family == "sd3":
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
    least = 2 if family in ("sdxl", "sd3") else 1  # SDXL and SD3 read the penultimate hidden state
    configs = {
        denoiser_key: d,
        "vae": _scaled_vae(arch["vae"], scale, resolution),
        "text_encoders": [_scaled_text(t, scale, least) for t in arch["text_encoders"]],
        "scheduler": dict(arch["scheduler"]),
    }
    if family == "flux":
        configs["t5"] = _scaled_t5(arch["t5"], scale)
    return configs


def t5_tokenizer(words: list[str]):
    """A T5Tokenizer (Unigram, as T5's) with one token per word (``<unk>`` for anything else), built offline."""
    from transformers import T5Tokenizer

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    return T5Tokenizer(vocab=pieces + [("\u2581" + word, -1.0) for word in sorted(set(words))], extra_ids=0)


def shrink_text_encoders(configs: dict[str, Any], layers: int) -> dict[str, Any]:
    """The configs with every text encoder cut to ``layers`` layers (at least 2 for CLIP, whose penultimate
    state SDXL and SD3 read) and its widths kept: the states it outputs keep their real shapes."""
    texts = [{**t, "num_hidden_layers": max(2, layers)} for t in configs["text_encoders"]]
    shrunk = {**configs, "text_encoders": texts}
    if "t5" in configs:
        shrunk["t5"] = {**configs["t5"], "num_layers": max(1, layers)}
    return shrunk


def build_family_pipeline(family: str, scale: int = 1, resolution: int | None = None, seed: int = 0,
                          text_layers: int | None = None):
    """A randomly initialised pipeline of the family (StableDiffusionPipeline, StableDiffusionXLPipeline,
    StableDiffusion3Pipeline or FluxPipeline) built with the real classes from :func:`family_configs`, its text
    encoders cut to ``text_layers`` layers when given (:func:`shrink_text_encoders`)."""
    import torch
    from diffusers import AutoencoderKL
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from loopdiff.embedded.pipeline import world_vocabulary
    from loopdiff.embedded.tokenizer import build_tokenizer

    configs = family_configs(family, scale, resolution)
    if text_layers is not None:
        configs = shrink_text_encoders(configs, text_layers)
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
    if family == "flux":
        from diffusers import FluxPipeline, FluxTransformer2DModel, FlowMatchEulerDiscreteScheduler
        from transformers import T5Config, T5EncoderModel

        t5_words = t5_tokenizer(world_vocabulary())
        return FluxPipeline(
            transformer=FluxTransformer2DModel(**configs["transformer"]),
            scheduler=FlowMatchEulerDiscreteScheduler(**configs["scheduler"]), vae=vae,
            text_encoder=CLIPTextModel(text_config(configs["text_encoders"][0])), tokenizer=tokenizer,
            text_encoder_2=T5EncoderModel(T5Config(vocab_size=len(t5_words), **configs["t5"])), tokenizer_2=t5_words,
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


def save_family_pipeline(folder: Path, family: str, scale: int, resolution: int | None, seed: int = 0,
                         text_layers: int | None = None) -> Path:
    """Build the family's pipeline and ``save_pretrained`` it to ``folder`` (reused when already there)."""
    folder = Path(folder)
    if not (folder / "model_index.json").is_file():
        build_family_pipeline(family, scale, resolution, seed, text_layers).save_pretrained(folder)
    return folder


@dataclass(frozen=True)
class EpochSetting:
    """What one measured epoch of a family runs (the trainer's config fields it sets)."""

    resolution: int
    steps: int
    guidance: float
    eta: float  # DDIM eta, or the SD3 / Flux SDE's noise level
    max_sequence_length: int | None = None  # T5 tokens (SD3, Flux); None: the pipeline's default
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
    # Flow-GRPO's Flux settings, as the packaged flux-compbench-attributes config (guidance 3.5 embedded)
    "flux": EpochSetting(resolution=512, steps=6, guidance=3.5, eta=0.9, max_sequence_length=128, sampling_batch=3,
                         micro_batch=3, lora=True, lora_rank=64, lora_alpha=128.0, gradient_checkpointing=True),
}


def trainer_values(family: str, setting: EpochSetting, pipeline: Path, prompt_file: Path, run_dir: Path,
                   device: str = "cpu", mixed_precision: str = "no") -> dict[str, Any]:
    """The run configuration (a mapping for ``config_from_dict``) of one measured epoch of the family; the
    pipeline folder is built at the setting's resolution, so ``sampling.resolution`` stays unset (native),
    except for Flux, whose transformer has no native size of its own."""
    return {
        "model": {"pretrained": str(pipeline), "device": device, "mixed_precision": mixed_precision,
                  "lora": setting.lora, "lora_rank": setting.lora_rank, "lora_alpha": setting.lora_alpha},
        "sampling": {"num_steps": setting.steps, "guidance_scale": setting.guidance, "eta": setting.eta,
                     "batch_size": setting.sampling_batch, "max_sequence_length": setting.max_sequence_length,
                     "resolution": setting.resolution if family == "flux" else None},
        "estimator": {"preset": "loop", "samples_per_prompt": setting.k, "clip_range": setting.clip_range},
        "training": {"epochs": 1_000_000, "samples_per_epoch": setting.samples, "micro_batch_size": setting.micro_batch,
                     "gradient_checkpointing": setting.gradient_checkpointing,
                     "learning_rate": 3e-4 if setting.lora else 1e-5},
        "prompts": {"train": str(prompt_file), "val": str(prompt_file)},
        "reward": {"name": "jpeg_compressibility"},
        "eval": {"max_prompts": 0},
        "output": {"dir": str(run_dir), "progress": False, "tensorboard": False},
    }
