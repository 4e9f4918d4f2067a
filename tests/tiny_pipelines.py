"""Tiny pipelines of each model family (Stable Diffusion, SDXL, SD3, Flux), built from configs with the real
diffusers and transformers classes: one builder per family, with the tokenizers and modules they share."""

from __future__ import annotations

from typing import Any

import torch

WORDS = "a an and the red green blue yellow circle square triangle star big small cat dog of on".split()

SD3_MAX_SEQUENCE_LENGTH = 6  # the zero T5 tokens diffusers appends when the SD3 pipeline has no T5 encoder
FLUX_MAX_SEQUENCE_LENGTH = 8  # T5 tokens per prompt in the Flux tests (FluxPipeline's default is 512)
FLUX_RESOLUTION = 32  # pixels: 8x8 latents of 16 channels (the VAE downscales 4x), 16 packed tokens of 64 features

SDXL_TEXT_WIDTH = 16  # hidden size of each SDXL CLIP encoder; the UNet's cross-attention reads both, concatenated
SDXL_PROJECTION = 16  # the second SDXL encoder's pooled projection, SDXL's text_embeds
SDXL_TIME_EMBED = 8  # addition_time_embed_dim: each of the 6 time ids is embedded in 8 sinusoidal features

# stabilityai/stable-diffusion-xl-base-1.0's scheduler_config.json (its Euler scheduler; loopdiff converts it)
SDXL_SCHEDULER = {
    "beta_end": 0.012, "beta_schedule": "scaled_linear", "beta_start": 0.00085, "clip_sample": False,
    "interpolation_type": "linear", "num_train_timesteps": 1000, "prediction_type": "epsilon",
    "sample_max_value": 1.0, "set_alpha_to_one": False, "skip_prk_steps": True, "steps_offset": 1,
    "timestep_spacing": "leading", "trained_betas": None, "use_karras_sigmas": False,
}


# ----------------------------------------------------------------------------- shared parts


def tiny_clip_tokenizer(words: list[str] = WORDS, max_length: int = 12):
    """A CLIPTokenizer whose vocabulary has one token per word (characters for anything else)."""
    from transformers import CLIPTokenizer

    vocab: dict[str, int] = {}
    merges: list[tuple[str, str]] = []

    def add(token: str) -> None:
        vocab.setdefault(token, len(vocab))

    for char in "abcdefghijklmnopqrstuvwxyz0123456789,.'-":
        add(char)
        add(char + "</w>")
    for word in words:
        pieces = list(word[:-1]) + [word[-1] + "</w>"]
        while len(pieces) > 1:
            pair = (pieces[0], pieces[1])
            if pair not in merges:
                merges.append(pair)
            pieces = [pieces[0] + pieces[1]] + pieces[2:]
            add(pieces[0])
    add("<|startoftext|>")
    add("<|endoftext|>")
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=max_length)


def tiny_t5_tokenizer(words: list[str] = WORDS):
    """A T5Tokenizer (a Unigram model, as T5's) whose vocabulary has one token per word (``<unk>`` for anything else),
    built offline; it saves and loads back with save_pretrained / from_pretrained."""
    from transformers import T5Tokenizer

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)] + [("\u2581" + w, -1.0) for w in words]
    return T5Tokenizer(vocab=pieces, extra_ids=0)


def tiny_clip_text_config(tokenizer, **config: Any):
    """A CLIPTextConfig of one layer, 16 wide with 2 heads, for ``tokenizer`` (a tiny_clip_tokenizer), with any other
    of its settings in ``config``."""
    from transformers import CLIPTextConfig

    return CLIPTextConfig(**{
        "vocab_size": len(tokenizer),
        "hidden_size": 16,
        "intermediate_size": 32,
        "num_hidden_layers": 1,
        "num_attention_heads": 2,
        "max_position_embeddings": tokenizer.model_max_length,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
        **config,
    })


def tiny_clip_text_model(tokenizer):
    """A one-layer CLIPTextModel, 16 wide with 2 heads, for ``tokenizer`` (a tiny_clip_tokenizer)."""
    from transformers import CLIPTextModel

    return CLIPTextModel(tiny_clip_text_config(tokenizer))


def tiny_vae(**config: Any):
    """An AutoencoderKL of three 8-channel levels (32x32 pixels <-> 8x8 latents, 4 channels unless ``config`` says
    otherwise, with any other of its settings)."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(**{
        "in_channels": 3,
        "out_channels": 3,
        "down_block_types": ("DownEncoderBlock2D",) * 3,
        "up_block_types": ("UpDecoderBlock2D",) * 3,
        "block_out_channels": (8, 8, 8),
        "layers_per_block": 1,
        "latent_channels": 4,
        "norm_num_groups": 4,
        "sample_size": 32,
        **config,
    })


def tiny_unet(**config: Any):
    """A UNet2DConditionModel of two levels (16 and 32 channels, cross-attention in the second) on 8x8x4 latents,
    with any other of its settings in ``config``."""
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(**{
        "sample_size": 8,
        "in_channels": 4,
        "out_channels": 4,
        "block_out_channels": (16, 32),
        "layers_per_block": 1,
        "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D"),
        "up_block_types": ("CrossAttnUpBlock2D", "UpBlock2D"),
        "cross_attention_dim": 16,
        "attention_head_dim": 4,
        "norm_num_groups": 8,
        **config,
    })


# ----------------------------------------------------------------------------- one builder per family


def build_tiny_pipeline(prediction_type: str = "epsilon", seed: int = 0):
    """A StableDiffusionPipeline with a ~100k-parameter UNet on 8x8x4 latents (32x32 pixels)."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    torch.manual_seed(seed)
    tokenizer = tiny_clip_tokenizer()
    text_encoder = tiny_clip_text_model(tokenizer)
    unet = tiny_unet()
    vae = tiny_vae()
    scheduler = DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        prediction_type=prediction_type,
        steps_offset=1,
    )
    return StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def build_tiny_sdxl_pipeline(seed: int = 0, force_zeros_for_empty_prompt: bool = True):
    """A StableDiffusionXLPipeline with a small "text_time" UNet on 8x8x4 latents (32x32 pixels), a CLIPTextModel
    and a CLIPTextModelWithProjection of two layers each (SDXL reads the penultimate states), an Euler scheduler."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    tokenizers = [tiny_clip_tokenizer(), tiny_clip_tokenizer()]
    configs = [
        tiny_clip_text_config(t, hidden_size=SDXL_TEXT_WIDTH, projection_dim=SDXL_PROJECTION, num_hidden_layers=2)
        for t in tokenizers
    ]
    unet = tiny_unet(
        cross_attention_dim=2 * SDXL_TEXT_WIDTH,
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=SDXL_TIME_EMBED,
        projection_class_embeddings_input_dim=6 * SDXL_TIME_EMBED + SDXL_PROJECTION,
    )
    vae = tiny_vae(scaling_factor=0.13025)  # SDXL's VAE
    return StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=CLIPTextModel(configs[0]),
        text_encoder_2=CLIPTextModelWithProjection(configs[1]),
        tokenizer=tokenizers[0],
        tokenizer_2=tokenizers[1],
        unet=unet,
        scheduler=EulerDiscreteScheduler.from_config(SDXL_SCHEDULER),
        force_zeros_for_empty_prompt=force_zeros_for_empty_prompt,
        add_watermarker=False,
    )


def build_tiny_sd3_pipeline(seed: int = 0):
    """A StableDiffusion3Pipeline with a one-layer SD3 transformer on 8x8x4 latents, two tiny CLIP encoders, no T5."""
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
    from transformers import CLIPTextModelWithProjection

    torch.manual_seed(seed)
    tokenizers = [tiny_clip_tokenizer(), tiny_clip_tokenizer()]

    def clip(tokenizer):  # SD3 reads the penultimate hidden state
        return CLIPTextModelWithProjection(tiny_clip_text_config(tokenizer, projection_dim=16, num_hidden_layers=2))

    transformer = SD3Transformer2DModel(
        sample_size=8,
        patch_size=2,
        in_channels=4,
        out_channels=4,
        num_layers=1,
        attention_head_dim=8,
        num_attention_heads=2,
        joint_attention_dim=32,  # >= the two CLIP hidden sizes concatenated
        caption_projection_dim=16,  # = heads * head_dim
        pooled_projection_dim=32,  # the two CLIP projections concatenated
        pos_embed_max_size=8,
    )
    vae = tiny_vae(scaling_factor=1.5, shift_factor=0.06)
    return StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=vae,
        text_encoder=clip(tokenizers[0]),
        tokenizer=tokenizers[0],
        text_encoder_2=clip(tokenizers[1]),
        tokenizer_2=tokenizers[1],
        text_encoder_3=None,
        tokenizer_3=None,
    )


def tiny_flux_scheduler():
    """FLUX.1-dev's scheduler config with the dynamic shift's token range scaled down to the tiny sizes (4 to 64
    image tokens: 16 to 64 px), so that the shift changes with the resolution here too."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(
        shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15, base_image_seq_len=4,
        max_image_seq_len=64,
    )


def build_tiny_flux_pipeline(seed: int = 0, guidance_embeds: bool = True):
    """A FluxPipeline with a Flux transformer of 1 double-stream and 1 single-stream block (2 heads of 8), a tiny
    CLIP (pooled, 16 wide) and a tiny T5 encoder (16 wide), and a VAE with Flux's 16 latent channels, scaling and
    shift; guidance-distilled (``guidance_embeds``) like FLUX.1-dev unless told otherwise."""
    from diffusers import FluxPipeline, FluxTransformer2DModel
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(seed)
    clip_tokenizer, t5_tokenizer = tiny_clip_tokenizer(), tiny_t5_tokenizer()
    clip = tiny_clip_text_model(clip_tokenizer)
    t5 = T5EncoderModel(T5Config(vocab_size=len(t5_tokenizer), d_model=16, d_kv=8, d_ff=32, num_layers=1, num_heads=2))
    transformer = FluxTransformer2DModel(
        patch_size=1,
        in_channels=64,  # 16 latent channels x a 2x2 patch
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=8,
        num_attention_heads=2,
        joint_attention_dim=16,  # T5's width
        pooled_projection_dim=16,  # CLIP's pooled width
        guidance_embeds=guidance_embeds,
        axes_dims_rope=(2, 2, 4),  # sums to the head width
    )
    vae = tiny_vae(latent_channels=16, scaling_factor=0.3611, shift_factor=0.1159, use_quant_conv=False,
                   use_post_quant_conv=False)  # FLUX.1-dev's VAE settings
    return FluxPipeline(
        scheduler=tiny_flux_scheduler(),
        vae=vae,
        text_encoder=clip,
        tokenizer=clip_tokenizer,
        text_encoder_2=t5,
        tokenizer_2=t5_tokenizer,
        transformer=transformer,
    )
