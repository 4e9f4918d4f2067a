"""Expected GPU memory of a packaged config's training, from parameter and activation counts (nothing allocated).

The components are built on the meta device from the published configs (bench/_families.py): parameters are
counted, not stored, and one training call's forward pass runs on meta tensors, where every leaf module's
output shape is known without any memory behind it. The estimate of one process's peak, in bytes:

- weights: every parameter of the denoiser, the VAE and the text encoders in float32 (the trainer loads
  them so; mixed precision autocasts the computation, not the stored weights);
- gradients: 4 bytes per trainable parameter; AdamW's two moments: 8; an EMA copy (``training.ema_decay``): 4;
- trajectories: the epoch's stored latents, ``samples_per_epoch x (steps + 1)`` latents in float32;
- activations: what one training call keeps for its backward pass, taken as the sum of the outputs of every
  leaf module (2 bytes per element under bf16 / fp16, else 4) for ``2 x micro_batch_size`` rows (both guidance
  branches; Flux's embedded guidance: ``micro_batch_size`` rows). With gradient checkpointing, the outputs of
  the checkpointed blocks (the members of the denoiser's module lists) plus the largest single block's.

The activation term is an estimate (attention kernels' own buffers, allocator slack and CUDA's context, about
0.5 GB, are not counted); the parameter terms are exact.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Iterator

import torch

from _calls import CallShape
from _families import FAMILIES, VAE_DOWNSCALE, family_configs, shrink_text_encoders

CLIP_VOCAB = 49408  # CLIP's tokenizer
T5_VOCAB = 32128  # T5's
SD3_T5_TOKENS = 256  # SD3's default max_sequence_length (its transformer sees CLIP's 77 tokens + T5's)
FLUX_T5_TOKENS = 512  # FluxPipeline's default max_sequence_length
GIB = 2**30

#: The packaged configs of the four families (a config's family is its ``model.pretrained``).
PACKAGED = {
    "stabilityai/stable-diffusion-2-base": "sd2",
    "stabilityai/stable-diffusion-xl-base-1.0": "sdxl",
    "stabilityai/stable-diffusion-3-medium-diffusers": "sd3",
    "black-forest-labs/FLUX.1-dev": "flux",
}


@dataclass(frozen=True)
class TrainingShape:
    """What a config fixes about one process's training memory."""

    family: str
    resolution: int | None = None  # None: the family's native size
    lora: bool = False
    lora_rank: int = 4
    lora_alpha: float = 4.0
    mixed_precision: str = "no"
    micro_batch_size: int = 4
    gradient_checkpointing: bool = False
    samples_per_epoch: int = 32
    num_steps: int = 20
    max_sequence_length: int | None = None
    ema: bool = False
    guided: bool = True

    @classmethod
    def from_config(cls, config: Any, family: str) -> "TrainingShape":
        """The shape of a loaded RunConfig's training (one process)."""
        m, s, t = config.model, config.sampling, config.training
        return cls(family=family, resolution=s.resolution, lora=m.lora, lora_rank=m.lora_rank,
                   lora_alpha=m.lora_alpha, mixed_precision=m.mixed_precision, micro_batch_size=t.micro_batch_size,
                   gradient_checkpointing=t.gradient_checkpointing, samples_per_epoch=t.samples_per_epoch,
                   num_steps=s.num_steps, max_sequence_length=s.max_sequence_length, ema=bool(t.ema_decay),
                   guided=s.guidance_scale != 1.0 and family != "flux")


def count(module: torch.nn.Module) -> int:
    """Parameters of ``module``."""
    return sum(p.numel() for p in module.parameters())


def build_components(family: str, scale: int = 1, resolution: int | None = None, clip_vocab: int = CLIP_VOCAB,
                     t5_vocab: int = T5_VOCAB, text_layers: int | None = None) -> dict[str, Any]:
    """The family's denoiser, VAE and text encoders with their configs' shapes (the encoders cut to
    ``text_layers`` layers when given), on whatever device is the default (the meta device under
    ``with torch.device("meta")``)."""
    from diffusers import AutoencoderKL, FluxTransformer2DModel, SD3Transformer2DModel, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, T5Config, T5EncoderModel

    configs = family_configs(family, scale, resolution)
    if text_layers is not None:
        configs = shrink_text_encoders(configs, text_layers)
    encoders = {"sd2": [CLIPTextModel], "sdxl": [CLIPTextModel, CLIPTextModelWithProjection],
                "sd3": [CLIPTextModelWithProjection] * 2, "flux": [CLIPTextModel]}[family]
    denoisers = {"sd3": SD3Transformer2DModel, "flux": FluxTransformer2DModel}
    denoiser = (denoisers[family](**configs["transformer"]) if family in denoisers
                else UNet2DConditionModel(**configs["unet"]))
    texts = [cls(CLIPTextConfig(vocab_size=clip_vocab, **c)) for cls, c in zip(encoders, configs["text_encoders"])]
    if family == "flux":
        texts.append(T5EncoderModel(T5Config(vocab_size=t5_vocab, **configs["t5"])))
    return {"denoiser": denoiser, "vae": AutoencoderKL(**configs["vae"]), "text_encoders": texts,
            "configs": configs}


def call_shape(family: str, configs: dict[str, Any], shape: TrainingShape) -> CallShape:
    """The denoiser call's inputs besides its rows, at the shape's resolution and token count."""
    key = "unet" if family in ("sd2", "sdxl") else "transformer"
    d = configs[key]
    size = configs["vae"]["sample_size"] // VAE_DOWNSCALE
    latent = (d["in_channels"] // 4 if family == "flux" else d["in_channels"], size, size)  # Flux: 2x2 packed
    if family == "sd2":
        return CallShape(latent, (77, d["cross_attention_dim"]))
    if family == "sdxl":
        pooled = configs["text_encoders"][1]["projection_dim"]
        return CallShape(latent, (77, d["cross_attention_dim"]), pooled, "sdxl")
    if family == "sd3":
        tokens = 77 + (shape.max_sequence_length or SD3_T5_TOKENS)
        return CallShape(latent, (tokens, d["joint_attention_dim"]), d["pooled_projection_dim"], "sd3")
    tokens = shape.max_sequence_length or FLUX_T5_TOKENS
    return CallShape(latent, (tokens, d["joint_attention_dim"]), d["pooled_projection_dim"], "flux", 3.5)


def _elements(output: Any) -> int:
    if isinstance(output, torch.Tensor):
        return output.numel()
    if isinstance(output, (tuple, list)):
        return sum(_elements(o) for o in output)
    if isinstance(output, dict):
        return sum(_elements(o) for o in output.values())
    return 0


#: The modules diffusers' gradient checkpointing recomputes one at a time.
CHECKPOINTED = ("ResnetBlock2D", "BasicTransformerBlock", "JointTransformerBlock", "FluxTransformerBlock",
                "FluxSingleTransformerBlock")


def _blocks(denoiser: torch.nn.Module) -> list[torch.nn.Module]:
    """The denoiser's checkpointed blocks (UNet resnets and transformer blocks, SD3's and Flux's blocks)."""
    return [m for m in denoiser.modules() if type(m).__name__ in CHECKPOINTED]


@contextlib.contextmanager
def _counting(denoiser: torch.nn.Module) -> Iterator[dict[str, Any]]:
    """Per leaf module and per checkpointable block, the elements of its outputs while the context is open."""
    blocks = _blocks(denoiser)
    owner = {id(leaf): i for i, block in enumerate(blocks) for leaf in block.modules()}
    seen: dict[str, Any] = {"outside": 0, "inside": [0] * len(blocks), "block_outputs": [0] * len(blocks)}
    handles = []
    for module in denoiser.modules():
        if next(module.children(), None) is None:
            def leaf_hook(m, args, output, index=owner.get(id(module))):
                if index is None:
                    seen["outside"] += _elements(output)
                else:
                    seen["inside"][index] += _elements(output)
            handles.append(module.register_forward_hook(leaf_hook))
    for i, block in enumerate(blocks):
        def block_hook(m, args, output, index=i):
            seen["block_outputs"][index] += _elements(output)
        handles.append(block.register_forward_hook(block_hook))
    try:
        yield seen
    finally:
        for handle in handles:
            handle.remove()


def activation_elements(denoiser: torch.nn.Module, shape: CallShape, rows: int, checkpointing: bool) -> int:
    """Elements one training call of ``rows`` rows keeps for its backward pass (forward on the denoiser's
    device: the meta device for an estimate)."""
    device = next(denoiser.parameters()).device
    inputs = _on(shape.inputs(rows, torch.Generator().manual_seed(0), torch.device("cpu")), device)
    with _counting(denoiser) as seen:
        denoiser(**inputs)
    if not checkpointing:
        return seen["outside"] + sum(seen["inside"])
    return seen["outside"] + sum(seen["block_outputs"]) + max(seen["inside"], default=0)


def _on(value: Any, device: torch.device) -> Any:
    """A call's keyword inputs moved to ``device`` (the CPU draws them: the meta device cannot)."""
    if isinstance(value, dict):
        return {k: _on(v, device) for k, v in value.items()}
    return value.to(device) if isinstance(value, torch.Tensor) else value


def trainable_count(denoiser: torch.nn.Module, shape: TrainingShape) -> int:
    """Parameters the optimiser updates: the whole denoiser, or the LoRA adapters the trainer adds to it."""
    from loopdiff.config import ModelConfig
    from loopdiff.models import configure_trainable

    if not shape.lora:
        return count(denoiser)
    config = ModelConfig(lora=True, lora_rank=shape.lora_rank, lora_alpha=shape.lora_alpha)
    return sum(p.numel() for p in configure_trainable(denoiser, config))


def estimate_memory(shape: TrainingShape, scale: int = 1, clip_vocab: int = CLIP_VOCAB, t5_vocab: int = T5_VOCAB,
                    text_layers: int | None = None) -> dict[str, Any]:
    """Parameter counts and the expected bytes of one process's training peak (see the module docstring); with
    ``text_layers``, of text encoders cut to that many layers (as bench/gpu.py builds them)."""
    if shape.family not in FAMILIES:
        raise ValueError(f"family={shape.family!r}; allowed: {', '.join(FAMILIES)}")
    with torch.device("meta"):
        parts = build_components(shape.family, scale, shape.resolution, clip_vocab, t5_vocab, text_layers)
        denoiser = parts["denoiser"]
        params = {"denoiser": count(denoiser), "vae": count(parts["vae"]),
                  "text_encoders": sum(count(t) for t in parts["text_encoders"])}
        params["trainable"] = trainable_count(denoiser, shape)  # adds the adapters when LoRA
        params["denoiser_with_adapters"] = count(denoiser)
    calls = call_shape(shape.family, parts["configs"], shape)
    rows = (2 if shape.guided else 1) * shape.micro_batch_size
    denoiser.train()
    activations = activation_elements(denoiser, calls, rows, shape.gradient_checkpointing)
    c, h, w = calls.latent
    activation_bytes = 2 if shape.mixed_precision in ("bf16", "fp16") else 4
    frozen = params["vae"] + params["text_encoders"]
    sizes = {
        "weights": 4 * (params["denoiser_with_adapters"] + frozen),
        "gradients": 4 * params["trainable"],
        "optimizer": 8 * params["trainable"],
        "ema": 4 * params["trainable"] if shape.ema else 0,
        "trajectories": 4 * shape.samples_per_epoch * (shape.num_steps + 1) * c * h * w,
        "activations": activation_bytes * activations,
    }
    return {"family": shape.family, "scale": scale, "params": params, "activation_elements": activations,
            "activation_rows": rows, "latent": [c, h, w], "bytes": sizes, "total_bytes": sum(sizes.values()),
            "total_gib": sum(sizes.values()) / GIB}


def packaged_estimates() -> list[dict[str, Any]]:
    """``estimate_memory`` for every packaged config of the four families, at its own settings."""
    from loopdiff.cli import packaged_config_names, resolve_config
    from loopdiff.config import load_config

    rows = []
    for name in packaged_config_names():
        config = load_config(resolve_config(name), ["prompts.train=unused.txt"])  # no prompts are read
        family = PACKAGED.get(config.model.pretrained)
        if family is not None:
            rows.append({"config": name, **estimate_memory(TrainingShape.from_config(config, family))})
    return rows
