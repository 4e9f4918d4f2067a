"""The diffusion model as a policy: guided noise prediction and per-step log-probabilities.

The MDP and the policy step are written out in docs/method.md ("Denoising as an MDP", "The policy step
and its log-probability").

Classifier-free guidance runs the unconditional and the conditional branch in one batched UNet call:
``eps_hat = eps_uncond + w * (eps_cond - eps_uncond)``. The same function serves sampling (no gradients) and
the training-time recomputation of log pi (gradients through both branches), so guidance is applied
identically in both.

The UNet's conditioning is a tensor of text-encoder states (Stable Diffusion 1/2) or a
:class:`~loopdiff.sampling.embeds.PromptEmbeds` (SDXL), whose pooled text embeddings and size ``time_ids``
go to the UNet as ``added_cond_kwargs``, row by row with the token states in both guidance branches.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import torch
from diffusers import DDIMScheduler

from loopdiff.sampling.ddim import DDIMStepOutput, LogProbReduction, ddim_step_with_logprob
from loopdiff.sampling.embeds import Conditioning, PromptEmbeds, cat_rows, expand_rows


@dataclass
class PolicyConfig:
    """How the policy samples: guidance weight w, DDIM eta, number of steps, log-prob reduction, and the
    latents' height and width (``sample_size``; None: the UNet's ``config.sample_size``)."""

    guidance_scale: float = 5.0
    eta: float = 1.0
    num_steps: int = 20
    reduction: LogProbReduction = "mean"
    sample_size: int | None = None


def apply_guidance(uncond: torch.Tensor, cond: torch.Tensor, guidance_scale: float) -> torch.Tensor:
    """Classifier-free guidance: ``uncond + w * (cond - uncond)`` (noise or velocity predictions)."""
    return uncond + guidance_scale * (cond - uncond)


class GaussianStepPolicy:
    """What the sampler and the trainer call on a policy; subclasses implement :meth:`step` and hold the
    denoiser as ``unet`` and their settings as ``config``."""

    unet: torch.nn.Module
    config: Any

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        """(channels, height, width) of the latents sampled: ``config.sample_size`` when set, else the
        denoiser's own ``sample_size``."""
        denoiser = self.unet.config
        size = self.config.sample_size or denoiser.sample_size
        height, width = (size, size) if isinstance(size, int) else tuple(size)
        return denoiser.in_channels, height, width

    def step(
        self,
        latents: torch.Tensor,
        timesteps: torch.Tensor,
        cond_embeds: Any,
        uncond_embeds: Any,
        next_latents: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> DDIMStepOutput:
        """Sample the next latents (or score ``next_latents``) with their log-probability, mean and std."""
        raise NotImplementedError

    def log_prob(
        self,
        latents: torch.Tensor,
        next_latents: torch.Tensor,
        timesteps: torch.Tensor,
        cond_embeds: Any,
        uncond_embeds: Any,
    ) -> torch.Tensor:
        """log pi(next_latents | latents, t, c) per sample (differentiable w.r.t. the denoiser)."""
        out = self.step(latents, timesteps, cond_embeds, uncond_embeds, next_latents=next_latents)
        assert out.log_prob is not None, "log-probabilities need a noisy step (eta or noise_level > 0)"
        return out.log_prob

    def deterministic(self) -> "GaussianStepPolicy":
        """The same denoiser with its noise switched off: the sampler users run after fine-tuning."""
        raise NotImplementedError


class DiffusionPolicy(GaussianStepPolicy):
    """A UNet + DDIM scheduler seen as a Gaussian policy over x_{t-1} given (x_t, t, c)."""

    def __init__(self, unet: torch.nn.Module, scheduler: DDIMScheduler, config: PolicyConfig):
        self.unet = unet
        self.scheduler = scheduler
        self.config = config
        scheduler.set_timesteps(config.num_steps)

    @property
    def timesteps(self) -> torch.Tensor:
        """The T sampling timesteps, from noisiest to cleanest."""
        return self.scheduler.timesteps

    def deterministic(self) -> "DiffusionPolicy":
        """DDIM with eta = 0, sharing this policy's UNet and scheduler."""
        return DiffusionPolicy(self.unet, self.scheduler, replace(self.config, eta=0.0))

    def guided_noise(
        self,
        latents: torch.Tensor,
        timesteps: torch.Tensor,
        cond_embeds: Conditioning,
        uncond_embeds: Conditioning,
    ) -> torch.Tensor:
        """eps_hat for a batch; per-sample timesteps; one UNet call holding both guidance branches."""
        w = self.config.guidance_scale
        t = torch.as_tensor(timesteps, device=latents.device).reshape(-1).expand(latents.shape[0])
        if w == 1.0:
            return self._noise(latents, t, cond_embeds)
        uncond = expand_rows(uncond_embeds, latents.shape[0]).to(cond_embeds.dtype)
        both = self._noise(torch.cat([latents, latents]), torch.cat([t, t]), cat_rows([uncond, cond_embeds]))
        eps_uncond, eps_cond = both.chunk(2)
        return apply_guidance(eps_uncond, eps_cond, w)

    def _noise(self, latents: torch.Tensor, t: torch.Tensor, embeds: Conditioning) -> torch.Tensor:
        """The UNet's prediction, with SDXL's pooled text embeddings and time ids as ``added_cond_kwargs``."""
        if not isinstance(embeds, PromptEmbeds):
            return self.unet(latents, t, encoder_hidden_states=embeds).sample
        if embeds.time_ids is None:
            raise ValueError("a UNet conditioned on PromptEmbeds needs their time_ids (SDXL's size conditioning)")
        added = {"text_embeds": embeds.pooled, "time_ids": embeds.time_ids}
        return self.unet(latents, t, encoder_hidden_states=embeds.sequence, added_cond_kwargs=added).sample

    def step(
        self,
        latents: torch.Tensor,
        timesteps: torch.Tensor,
        cond_embeds: Conditioning,
        uncond_embeds: Conditioning,
        next_latents: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> DDIMStepOutput:
        """Sample x_{t-1} (or score the given ``next_latents``) and return its log-probability."""
        eps = self.guided_noise(latents, timesteps, cond_embeds, uncond_embeds)
        return ddim_step_with_logprob(
            self.scheduler,
            eps,
            torch.as_tensor(timesteps, device=latents.device),
            latents,
            eta=self.config.eta,
            prev_sample=next_latents,
            generator=generator,
            reduction=self.config.reduction,
        )
