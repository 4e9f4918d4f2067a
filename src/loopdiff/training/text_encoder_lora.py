"""LoRA on the text encoder (``model.train_text_encoder``), as diffusers' ``train_text_to_image_lora.py`` does
with ``--train_text_encoder``: adapters on the CLIP text model's attention projections, trained with the
denoiser's, exported beside them (``text_encoder_lora_layers``, loaded by ``pipeline.load_lora_weights``).

Supported for Stable Diffusion 1/2 pipelines (one CLIP text encoder) in a single process, without an EMA,
a KL penalty or ``output.keep_best`` (those keep the denoiser's weights only); other settings are refused.
While it trains, the prompt embeddings are computed afresh: sampling and evaluation re-encode each epoch,
and the trained log-probabilities re-encode the micro-batch's prompts with gradients.
"""

from __future__ import annotations

from typing import Any

import torch

from loopdiff.config import ConfigError, RunConfig

TEXT_ENCODER_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj"]  # diffusers' text-encoder LoRA targets


def check_text_encoder_training(config: RunConfig, pipe: Any, processes: int, kl_coef: float) -> None:
    """Raise ConfigError (one line) unless ``model.train_text_encoder`` can run with these settings."""
    from loopdiff.models import is_flow_matching, is_sdxl

    refusals = [
        (not config.model.lora, "model.lora=true (the text encoder trains LoRA adapters)"),
        (is_sdxl(pipe) or is_flow_matching(pipe), "a Stable Diffusion 1/2 pipeline (one CLIP text encoder)"),
        (processes > 1, f"a single process (this launch has {processes})"),
        (bool(config.training.ema_decay), "no EMA (training.ema_decay unset)"),
        (kl_coef > 0, "an estimator without a KL penalty"),
        (config.output.keep_best is not None, "output.keep_best unset"),
    ]
    for refused, needed in refusals:
        if refused:
            raise ConfigError(f"model.train_text_encoder=true needs {needed}")


def add_text_encoder_lora(text_encoder: torch.nn.Module, config: Any) -> list[torch.nn.Parameter]:
    """Give ``text_encoder`` trainable LoRA adapters (``model.lora_rank``, ``lora_alpha``) on its attention
    projections; returns their parameters. The encoder stays in eval mode (the embeddings that sampling used are
    recomputed exactly), so it has no dropout."""
    from peft import LoraConfig

    text_encoder.requires_grad_(False)
    text_encoder.add_adapter(LoraConfig(r=config.lora_rank, lora_alpha=config.lora_alpha,
                                        init_lora_weights="gaussian", target_modules=TEXT_ENCODER_TARGETS))
    return [p for p in text_encoder.parameters() if p.requires_grad]


def text_encoder_lora_layers(text_encoder: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The text encoder's adapter in diffusers' format (what ``save_lora_weights`` takes)."""
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    return convert_state_dict_to_diffusers(get_peft_model_state_dict(text_encoder))
