"""A tiny Flux-format pipeline (FluxPipeline) built from configs with the real classes."""

from __future__ import annotations

import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from conftest import tiny_clip_text_model, tiny_clip_tokenizer, tiny_t5_tokenizer, tiny_vae

MAX_SEQUENCE_LENGTH = 8  # T5 tokens per prompt in the tests (FluxPipeline's default is 512)
RESOLUTION = 32  # pixels: 8x8 latents of 16 channels (the VAE downscales 4x), 16 packed tokens of 64 features


def tiny_flux_scheduler() -> FlowMatchEulerDiscreteScheduler:
    """FLUX.1-dev's scheduler config with the dynamic shift's token range scaled down to the tiny sizes (4 to 64
    image tokens: 16 to 64 px), so that the shift changes with the resolution here too."""
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
