"""A Flux transformer (``FluxPipeline``: ``FluxTransformer2DModel`` + flow-matching Euler) as a policy.

The step is SD3's (:mod:`loopdiff.sampling.flow_sde`, forms "sde" and "cps"); what differs is the transformer
call, written as ``FluxPipeline.__call__`` makes it:

- Packing. Flux reads 2x2 patches of the latents as tokens: (B, C, h, w) -> (B, (h/2)(w/2), 4C), with the
  position ids ``img_ids`` (row and column of each patch) and ``txt_ids`` (zeros, one row per text token).
  The trajectories keep the latents unpacked, (B, C, h, w), as every other family does: they are packed just
  before the transformer call and its output unpacked. The SDE step is elementwise and the log-probability
  reduction ("mean" or "sum") runs over all C*h*w elements, so both equal the packed computation.
- Guidance. FLUX.1-dev is guidance-distilled (``transformer.config.guidance_embeds``): the guidance scale is
  an *input*, embedded like the timestep, and one conditional call makes the guided velocity; there is no
  unconditional branch and no doubled batch. ``guidance_scale`` (FluxPipeline's default 3.5) is that
  embedded value. A transformer without guidance embeddings (FLUX.1-schnell) ignores it, as the pipeline
  does. FluxPipeline's ``true_cfg_scale`` (real classifier-free guidance with a negative prompt) is not
  supported.
- Timesteps. ``sigmas = linspace(1, 1/T, T)`` (None under ``use_flow_sigmas``) shifted by
  ``mu = calculate_shift(image tokens, ...)`` from the scheduler's config, through ``retrieve_timesteps``; the
  transformer takes ``t / 1000``.
- Noise. x_T is drawn unpacked, (B, C, h, w) with h = 2 * (H // (2 * vae_scale_factor)), as FluxPipeline
  draws it before packing, so the same generator gives the same images.

Prompts: :class:`FluxPromptEncoder` (CLIP's pooled vector + T5's token states, the pipeline's own
``encode_prompt``). Decoding needs nothing special: ``latents / scaling_factor + shift_factor`` on the
unpacked latents (:func:`loopdiff.sampling.trajectories.decode_latents`).
"""

from __future__ import annotations

import functools
from typing import Any

import numpy as np
import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from loopdiff.sampling.embeds import PromptEmbeds
from loopdiff.sampling.flow_policy import CachedPromptEncoder, FlowMatchPolicy, FlowPolicyConfig

FLUX_MAX_SEQUENCE_LENGTH = 512  # FluxPipeline's default (and its maximum) number of T5 tokens


class FluxPromptEncoder(CachedPromptEncoder):
    """Prompt embeddings from a ``FluxPipeline``'s text encoders: T5 token states (N, L, D) as the sequence,
    CLIP's pooled output (N, P) as the pooled vector; L = ``max_sequence_length`` (at most 512)."""

    def __init__(self, pipeline: Any, device: torch.device | str,
                 max_sequence_length: int = FLUX_MAX_SEQUENCE_LENGTH):
        if not 1 <= max_sequence_length <= FLUX_MAX_SEQUENCE_LENGTH:
            raise ValueError(f"max_sequence_length={max_sequence_length}: FluxPipeline takes 1 to 512 T5 tokens")
        super().__init__(pipeline, device, max_sequence_length)

    def encode(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        sequence, pooled, _ = self.pipeline.encode_prompt(
            prompt=prompts, prompt_2=None, device=self.device, max_sequence_length=self.max_sequence_length
        )
        return sequence, pooled


def pack_latents(latents: torch.Tensor) -> torch.Tensor:
    """(B, C, h, w) -> (B, (h/2)(w/2), 4C): FluxPipeline's 2x2 patch tokens."""
    from diffusers import FluxPipeline

    b, c, h, w = latents.shape
    return FluxPipeline._pack_latents(latents.contiguous(), b, c, h, w)


def unpack_latents(tokens: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """The inverse of :func:`pack_latents` for latents of ``height`` x ``width``."""
    from diffusers import FluxPipeline

    # FluxPipeline unpacks from pixel sizes: at a scale factor of 1 those are the latent sizes
    return FluxPipeline._unpack_latents(tokens.contiguous(), height, width, 1)


@functools.lru_cache(maxsize=16)
def latent_image_ids(height: int, width: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """((h/2)(w/2), 3) position ids of the patch tokens of latents of ``height`` x ``width`` (FluxPipeline's),
    made once per size, device and dtype: FluxPipeline builds them on the host, a copy per step would make
    each step wait for the device. Outside inference mode, so that training may use them too."""
    from diffusers import FluxPipeline

    with torch.inference_mode(False), torch.no_grad():
        return FluxPipeline._prepare_latent_image_ids(1, height // 2, width // 2, torch.device(device), dtype)


def set_flux_timesteps(scheduler: FlowMatchEulerDiscreteScheduler, num_steps: int, height: int, width: int) -> None:
    """The schedule FluxPipeline sets for latents of ``height`` x ``width``: its sigmas, shifted by its ``mu``."""
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift, retrieve_timesteps

    sigmas = None if scheduler.config.get("use_flow_sigmas", False) else np.linspace(1.0, 1 / num_steps, num_steps)
    mu = calculate_shift(
        (height // 2) * (width // 2),
        scheduler.config.get("base_image_seq_len", 256),
        scheduler.config.get("max_image_seq_len", 4096),
        scheduler.config.get("base_shift", 0.5),
        scheduler.config.get("max_shift", 1.15),
    )
    retrieve_timesteps(scheduler, num_steps, sigmas=sigmas, mu=mu)


class FluxPolicy(FlowMatchPolicy):
    """A Flux transformer + flow-matching Euler scheduler as a Gaussian policy over unpacked latents.

    ``config.sample_size`` (the latents' height and width) must be set: a Flux transformer has no native size
    (the pipeline's is ``default_sample_size``, 128, i.e. 1024 px). ``config.guidance_scale`` is the embedded
    guidance of a guidance-distilled transformer (see the module docstring): each step is one conditional call,
    and the unconditional embeddings the sampler and the trainer pass are not used.
    """

    classifier_free = False

    def __init__(
        self, transformer: torch.nn.Module, scheduler: FlowMatchEulerDiscreteScheduler, config: FlowPolicyConfig
    ):
        sizes = [config.sample_size] if isinstance(config.sample_size, int) else list(config.sample_size or [])
        if not sizes or any(size % 2 for size in sizes):
            raise ValueError(f"a Flux policy needs an even config.sample_size (the latents' height and width), "
                             f"not {config.sample_size}: Flux packs 2x2 latent patches and has no native size")
        # the module's config, also when the trainer passes it wrapped (DDP keeps the module as .module)
        self.denoiser_config = getattr(transformer, "module", transformer).config
        super().__init__(transformer, scheduler, config)

    def set_timesteps(self) -> None:
        _, height, width = self.latent_shape
        set_flux_timesteps(self.scheduler, self.config.num_steps, height, width)

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        """(C, h, w) of the unpacked latents: C = the transformer's packed ``in_channels`` / 4."""
        size = self.config.sample_size
        height, width = (size, size) if isinstance(size, int) else tuple(size)
        return self.denoiser_config.in_channels // 4, height, width

    @property
    def guidance_embedded(self) -> bool:
        """Whether the transformer takes the guidance scale as an input (guidance-distilled, FLUX.1-dev)."""
        return bool(self.denoiser_config.guidance_embeds)

    def _velocity(self, latents: torch.Tensor, t: torch.Tensor, embeds: PromptEmbeds) -> torch.Tensor:
        batch, _, height, width = latents.shape
        guidance = None
        if self.guidance_embedded:
            guidance = torch.full([1], self.config.guidance_scale, device=latents.device, dtype=torch.float32)
            guidance = guidance.expand(batch)
        tokens = self.transformer(
            hidden_states=pack_latents(latents),
            timestep=t.to(latents.dtype) / 1000,
            guidance=guidance,
            pooled_projections=embeds.pooled,
            encoder_hidden_states=embeds.sequence,
            txt_ids=torch.zeros(embeds.sequence.shape[1], 3, device=latents.device, dtype=embeds.dtype),
            img_ids=latent_image_ids(height, width, latents.device, embeds.dtype),
            return_dict=False,
        )[0]
        return unpack_latents(tokens, height, width)
