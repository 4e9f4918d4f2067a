"""Loading the pipeline to fine-tune, choosing what trains (full UNet or LoRA), and the reference policy."""

from __future__ import annotations

import contextlib
import copy
import json
from pathlib import Path
from typing import Iterator

import torch
from diffusers import DDIMScheduler, StableDiffusionPipeline

from loopdiff.config import ConfigError, ModelConfig

LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]


def resolve_pretrained(name: str) -> str:
    """``"embedded"`` -> the shipped pipeline folder; a local folder or a Hub id otherwise."""
    if name == "embedded":
        from loopdiff.embedded.pipeline import embedded_pipeline_path

        return str(embedded_pipeline_path())
    return name


def load_pipeline(config: ModelConfig) -> StableDiffusionPipeline:
    """Load a Stable-Diffusion-format pipeline with a DDIM scheduler and frozen VAE and text encoder."""
    source = resolve_pretrained(config.pretrained)
    looks_local = source.startswith((".", "/", "~")) or Path(source).exists()
    if looks_local:
        check_pipeline_folder(config.pretrained, Path(source).expanduser())
    try:
        pipe = StableDiffusionPipeline.from_pretrained(
            str(Path(source).expanduser()) if looks_local else source,
            revision=config.revision,
            safety_checker=None,
            requires_safety_checker=False,
        )
    except (OSError, ValueError) as error:
        message = " ".join(str(error).split())
        raise ConfigError(f"model.pretrained='{config.pretrained}' could not be loaded: {message}") from None
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.vae.requires_grad_(False)
    pipe.text_encoder.requires_grad_(False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def check_pipeline_folder(name: str, folder: Path) -> None:
    """Raise ConfigError unless ``folder`` has a readable model_index.json and every component folder it lists."""
    index = folder / "model_index.json"
    if not index.is_file():
        raise ConfigError(f"model.pretrained='{name}': no diffusers pipeline (model_index.json) in '{folder}'")
    try:
        components = json.loads(index.read_text())
    except (UnicodeDecodeError, ValueError) as error:
        raise ConfigError(f"model.pretrained='{name}': '{index}' is not valid JSON ({error})") from None
    listed = [key for key, value in components.items()
              if not key.startswith("_") and isinstance(value, list) and None not in value]
    missing = [key for key in listed if not (folder / key).is_dir()]
    if missing:
        raise ConfigError(f"model.pretrained='{name}': the pipeline folder '{folder}' lacks its component folder "
                          f"'{missing[0]}/' (model_index.json lists {', '.join(listed)})")


def configure_attention(unet: torch.nn.Module, choice: str, device: torch.device) -> None:
    """Pick the attention processor: on the CPU the classic batched-matmul one is faster than SDPA
    for small heads (bench/RESULTS.md: 0.73x the forward+backward time), with the same outputs."""
    from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

    if choice == "classic" or (choice == "auto" and device.type == "cpu"):
        unet.set_attn_processor(AttnProcessor())
    elif choice == "sdpa":
        unet.set_attn_processor(AttnProcessor2_0())


def cross_attention_kv(unet: torch.nn.Module) -> list[torch.nn.Parameter]:
    """The key and value projections of every cross-attention layer: the only weights that read the prompt
    (the part Custom Diffusion fine-tunes, Kumari et al. 2023)."""
    params = [
        p
        for name, module in unet.named_modules()
        if name.endswith("attn2")
        for projection in (module.to_k, module.to_v)
        for p in projection.parameters()
    ]
    if not params:
        raise ValueError("model.train_modules='cross_attention': this UNet has no cross-attention (attn2) layers")
    return params


def configure_trainable(unet: torch.nn.Module, config: ModelConfig) -> list[torch.nn.Parameter]:
    """Full fine-tuning (every UNet weight), the cross-attention keys and values only, or LoRA adapters on
    the attention projections via peft."""
    if config.lora:
        from peft import LoraConfig

        unet.requires_grad_(False)
        unet.add_adapter(
            LoraConfig(
                r=config.lora_rank,
                lora_alpha=config.lora_alpha,
                init_lora_weights="gaussian",
                target_modules=LORA_TARGETS,
            )
        )
    elif config.train_modules == "cross_attention":
        unet.requires_grad_(False)
        for p in cross_attention_kv(unet):
            p.requires_grad_(True)
    else:
        unet.requires_grad_(True)
    return [p for p in unet.parameters() if p.requires_grad]


def trainable_state_dict(unet: torch.nn.Module, lora: bool) -> dict[str, torch.Tensor]:
    """The weights that training changes: the LoRA adapter (peft format) or the whole UNet."""
    if lora:
        from peft.utils import get_peft_model_state_dict

        return {k: v.detach().cpu().contiguous() for k, v in get_peft_model_state_dict(unet).items()}
    return {k: v.detach().cpu().contiguous() for k, v in unet.state_dict().items()}


def load_trainable_state_dict(unet: torch.nn.Module, state: dict[str, torch.Tensor], lora: bool) -> None:
    if lora:
        from peft.utils import set_peft_model_state_dict

        result = set_peft_model_state_dict(unet, state)
        if getattr(result, "unexpected_keys", None):
            raise ValueError(f"LoRA checkpoint has unexpected keys: {result.unexpected_keys[:5]}")
    else:
        unet.load_state_dict(state)


class ReferencePolicy:
    """The pre-trained policy for a KL penalty: the UNet with LoRA disabled, or a frozen copy."""

    def __init__(self, unet: torch.nn.Module, lora: bool):
        self.unet, self.lora = unet, lora
        self.frozen = None if lora else copy.deepcopy(unet).requires_grad_(False).eval()

    @contextlib.contextmanager
    def active(self) -> Iterator[torch.nn.Module]:
        """Yield a module computing the reference policy's noise prediction."""
        if self.frozen is not None:
            yield self.frozen
            return
        self.unet.disable_adapters()
        try:
            yield self.unet
        finally:
            self.unet.enable_adapters()
