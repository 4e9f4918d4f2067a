"""A tiny SD3-format pipeline (StableDiffusion3Pipeline) built from configs with the real classes."""

from __future__ import annotations

import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from conftest import tiny_clip_tokenizer

MAX_SEQUENCE_LENGTH = 6  # the zero T5 tokens diffusers appends when the pipeline has no T5 encoder


def build_tiny_sd3_pipeline(seed: int = 0):
    """A StableDiffusion3Pipeline with a one-layer SD3 transformer on 8x8x4 latents, two tiny CLIP encoders, no T5."""
    from diffusers import AutoencoderKL, SD3Transformer2DModel, StableDiffusion3Pipeline
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    tokenizers = [tiny_clip_tokenizer(), tiny_clip_tokenizer()]

    def clip(tokenizer):
        return CLIPTextModelWithProjection(
            CLIPTextConfig(
                vocab_size=len(tokenizer),
                hidden_size=16,
                intermediate_size=32,
                projection_dim=16,
                num_hidden_layers=2,  # SD3 reads the penultimate hidden state
                num_attention_heads=2,
                max_position_embeddings=tokenizer.model_max_length,
                bos_token_id=tokenizer.bos_token_id,
                eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id,
            )
        )

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
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=(8, 8, 8),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=4,
        sample_size=32,
        scaling_factor=1.5,
        shift_factor=0.06,
    )
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
