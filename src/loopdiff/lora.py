"""LoRA adapters on the denoiser: new ones (``model.lora_rank``, ``lora_alpha``, ``lora_dropout``,
``lora_target_modules``), or an existing adapter to start from (``model.lora_init``).

An existing adapter is a folder saved by diffusers (``save_lora_weights``: ``pytorch_lora_weights.safetensors``,
as loopdiff's own ``final_lora/``) or by peft (``save_pretrained``: ``adapter_config.json`` and
``adapter_model.safetensors``). It keeps its own rank, alpha, dropout and target modules; training continues
from its weights.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from loopdiff.config import ConfigError, ModelConfig

LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]  # the attention projections: the default of every family
PEFT_CONFIG, PEFT_WEIGHTS = "adapter_config.json", "adapter_model.safetensors"


def add_lora(denoiser: torch.nn.Module, config: ModelConfig) -> None:
    """Freeze ``denoiser`` and give it the trainable adapter ``default``: ``model.lora_init``'s, or a new one."""
    denoiser.requires_grad_(False)
    if config.lora_init:
        load_lora_init(denoiser, config.lora_init)
        return
    from peft import LoraConfig

    targets = config.lora_target_modules or LORA_TARGETS
    lora = LoraConfig(r=config.lora_rank, lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout,
                      init_lora_weights="gaussian", target_modules=targets)
    try:
        denoiser.add_adapter(lora)
    except ValueError as error:  # peft: no module matches the targets
        raise ConfigError(f"model.lora_target_modules={targets!r} is invalid for {type(denoiser).__name__}: "
                          f"{' '.join(str(error).split())[:300]}") from None


def _diffusers_loader(denoiser: torch.nn.Module) -> tuple[Any, str]:
    """The pipeline class whose ``lora_state_dict`` reads an adapter saved for ``denoiser``, and its prefix."""
    from diffusers import FluxPipeline, StableDiffusion3Pipeline, StableDiffusionPipeline

    name = type(denoiser).__name__
    if name.startswith("Flux"):
        return FluxPipeline, "transformer"
    if name.startswith("SD3"):
        return StableDiffusion3Pipeline, "transformer"
    return StableDiffusionPipeline, "unet"


def load_lora_init(denoiser: torch.nn.Module, folder: str) -> None:
    """Load the adapter saved in ``folder`` (diffusers or peft format) into ``denoiser`` as the trainable
    adapter ``default``; raises ConfigError when the folder holds none that fits."""
    path = Path(folder).expanduser()
    if not path.is_dir():
        raise ConfigError(f"model.lora_init='{folder}' is not a folder; give a LoRA folder saved by diffusers "
                          "(save_lora_weights, e.g. a run's final_lora/) or peft (save_pretrained)")
    try:
        if (path / PEFT_CONFIG).is_file():
            _load_peft_folder(denoiser, path)
        else:
            _load_diffusers_folder(denoiser, path)
    except (OSError, ValueError, KeyError) as error:
        raise ConfigError(f"model.lora_init='{folder}' could not be loaded into the {type(denoiser).__name__}: "
                          f"{' '.join(str(error).split())[:300]}") from None
    for name, parameter in denoiser.named_parameters():
        if "lora_" in name:
            parameter.requires_grad_(True)


def _load_diffusers_folder(denoiser: torch.nn.Module, path: Path) -> None:
    loader, prefix = _diffusers_loader(denoiser)
    state, alphas, metadata = loader.lora_state_dict(str(path), return_lora_metadata=True)
    if not any(key.startswith(f"{prefix}.") for key in state):
        raise ValueError(f"its LoRA weights hold no '{prefix}.' layers")
    denoiser.load_lora_adapter(state, prefix=prefix, network_alphas=alphas, metadata=metadata,
                               adapter_name="default")


def _load_peft_folder(denoiser: torch.nn.Module, path: Path) -> None:
    from peft import LoraConfig
    from peft.utils import set_peft_model_state_dict
    from safetensors.torch import load_file

    denoiser.add_adapter(LoraConfig.from_pretrained(str(path)))
    saved = load_file(str(path / PEFT_WEIGHTS))
    state = {key.removeprefix("base_model.model."): value for key, value in saved.items()}
    result = set_peft_model_state_dict(denoiser, state)
    unexpected = getattr(result, "unexpected_keys", None)
    if unexpected:
        raise ValueError(f"{PEFT_WEIGHTS} has keys the model lacks: {unexpected[:3]}")
