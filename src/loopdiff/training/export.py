"""Writing a fine-tuned model the way diffusers loads it: a pipeline folder (``from_pretrained``) after a full
fine-tune, LoRA weights (``load_lora_weights``) after a LoRA one, each with its model card (``README.md``).

The main process writes into a temporary folder that is renamed into place when complete, so a folder that
exists is whole. Under FSDP every process first takes part in gathering the weights (:func:`gather_export`).
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any, Callable

import torch

from loopdiff.models import is_flow_matching, is_sdxl, trainable_state_dict
from loopdiff.sharding import full_model_state_dict, unsharded_copy
from loopdiff.training.text_encoder_lora import text_encoder_lora_layers


def export_folder(run_dir: Path, lora: bool, kind: str = "final") -> Path:
    """Where an export of ``kind`` (``final`` or ``best``) goes: ``<kind>_lora`` or ``<kind>_pipeline``."""
    return Path(run_dir) / (f"{kind}_lora" if lora else f"{kind}_pipeline")


def gather_export(unet: torch.nn.Module, lora: bool) -> dict[str, torch.Tensor]:
    """Under FSDP, what the export writes, gathered in full onto the main process (every process calls this):
    the LoRA adapter (peft format), or the whole denoiser's state dict."""
    return trainable_state_dict(unet, lora=True) if lora else full_model_state_dict(unet)


def write_export(path: Path, pipeline: Any, unet: torch.nn.Module, lora: bool,
                 text_encoder: torch.nn.Module | None = None, gathered: dict[str, torch.Tensor] | None = None) -> None:
    """Write ``pipeline`` with the trained ``unet`` (the denoiser, unwrapped) into ``path``: its LoRA layers in
    diffusers' format, or the whole pipeline; ``gathered`` is :func:`gather_export`'s output under FSDP."""
    if lora:
        _write_lora(path, pipeline, unet, text_encoder, gathered)
        return
    name = "transformer" if is_flow_matching(pipeline) else "unet"
    if gathered is None:
        setattr(pipeline, name, unet)
        pipeline.save_pretrained(path)
        return
    setattr(pipeline, name, unsharded_copy(unet, gathered))  # diffusers saves a plain module
    try:
        pipeline.save_pretrained(path)
    finally:
        setattr(pipeline, name, unet)


def _write_lora(path: Path, pipeline: Any, unet: torch.nn.Module, text_encoder: torch.nn.Module | None,
                gathered: dict[str, torch.Tensor] | None) -> None:
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    layers = convert_state_dict_to_diffusers(gathered if gathered is not None else get_peft_model_state_dict(unet))
    metadata = unet.peft_config["default"].to_dict()  # keeps lora_alpha, so the scale survives loading
    if is_flow_matching(pipeline):
        type(pipeline).save_lora_weights(path, transformer_lora_layers=layers,
                                         transformer_lora_adapter_metadata=metadata, safe_serialization=True)
        return
    saver = StableDiffusionXLPipeline if is_sdxl(pipeline) else StableDiffusionPipeline
    text = {} if text_encoder is None else {
        "text_encoder_lora_layers": text_encoder_lora_layers(text_encoder),
        "text_encoder_lora_adapter_metadata": text_encoder.peft_config["default"].to_dict()}
    saver.save_lora_weights(path, unet_lora_layers=layers, unet_lora_adapter_metadata=metadata,
                            safe_serialization=True, **text)


def export_model(path: Path, write: Callable[[Path], None], card: Callable[[], str]) -> Path:
    """On the main process: ``write`` the model into a temporary folder, add the model card ``card()`` as its
    README.md, and rename it to ``path`` (replacing an earlier export)."""
    tmp = path.with_name(path.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    write(tmp)
    (tmp / "README.md").write_text(card())
    shutil.rmtree(path, ignore_errors=True)
    tmp.rename(path)
    return path
