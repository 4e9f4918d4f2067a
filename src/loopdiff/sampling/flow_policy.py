"""A flow-matching transformer (SD3 style) as a policy: guided velocity and per-step log-probabilities.

The counterpart of :class:`loopdiff.sampling.policy.DiffusionPolicy` for ``SD3Transformer2DModel`` +
``FlowMatchEulerDiscreteScheduler``, with the same public interface (``timesteps``, ``step``, ``log_prob``),
so the trajectory sampler and the trainer drive either one. The step itself is in
:mod:`loopdiff.sampling.flow_sde` (forms "sde" and "cps", noise level ``a``).

Prompt embeddings. SD3 conditions on a token sequence *and* a pooled vector, so where the Stable Diffusion 1/2
path passes a tensor (N, L, D) this one passes a :class:`~loopdiff.sampling.embeds.PromptEmbeds` pair
``(sequence (N, L, D), pooled (N, P))``. :class:`SD3PromptEncoder` makes them with the pipeline's own
``encode_prompt`` (two CLIP encoders, plus T5 when the pipeline has one; without T5 diffusers pads with zeros
of ``max_sequence_length`` tokens).

Classifier-free guidance runs the unconditional and the conditional branch in one batched transformer call
``v_hat = v_uncond + w * (v_cond - v_uncond)``, in the pipeline's order (unconditional first). The same
function serves sampling and the training-time recomputation, so guidance is applied identically in both.

Flux pipelines use :class:`~loopdiff.sampling.flux.FluxPolicy`, a subclass with its own transformer call
(packed latents, embedded guidance, no unconditional branch) and schedule.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar, Sequence

import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from loopdiff.sampling.ddim import DDIMStepOutput, LogProbReduction
from loopdiff.sampling.embeds import PromptEmbeds
from loopdiff.sampling.flow_sde import SDEType, flow_step_with_logprob
from loopdiff.sampling.policy import GaussianStepPolicy, apply_guidance


class CachedPromptEncoder:
    """:class:`PromptEmbeds` of a pipeline's text encoders, computed once per distinct prompt and cached;
    subclasses say how a list of prompts is encoded (:meth:`encode`). ``negative_prompt`` is the prompt of
    classifier-free guidance's unconditional branch (empty by default)."""

    negative_prompt: str = ""

    def __init__(self, pipeline: Any, device: torch.device | str, max_sequence_length: int):
        self.pipeline = pipeline
        self.device = torch.device(device)
        self.max_sequence_length = max_sequence_length
        self._cache: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def encode(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """(sequence (N, L, D), pooled (N, P)) of ``prompts`` from the pipeline's own ``encode_prompt``."""
        raise NotImplementedError

    @torch.no_grad()
    def __call__(self, prompts: Sequence[str]) -> PromptEmbeds:
        missing = sorted({p for p in prompts if p not in self._cache})
        if missing:
            sequence, pooled = self.encode(missing)
            for prompt, seq, pool in zip(missing, sequence, pooled):
                self._cache[prompt] = (seq, pool)
        return PromptEmbeds(
            torch.stack([self._cache[p][0] for p in prompts]), torch.stack([self._cache[p][1] for p in prompts])
        )

    def unconditional(self) -> PromptEmbeds:
        """The negative prompt's embeddings classifier-free guidance uses (the empty prompt by default, as the
        pipeline's)."""
        return self([self.negative_prompt])


class SD3PromptEncoder(CachedPromptEncoder):
    """Prompt embeddings from a ``StableDiffusion3Pipeline``'s text encoders (T5 tokens: 256, its default)."""

    def __init__(self, pipeline: Any, device: torch.device | str, max_sequence_length: int = 256):
        super().__init__(pipeline, device, max_sequence_length)

    def encode(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        sequence, _, pooled, _ = self.pipeline.encode_prompt(
            prompt=prompts,
            prompt_2=None,
            prompt_3=None,
            device=self.device,
            do_classifier_free_guidance=False,
            max_sequence_length=self.max_sequence_length,
        )
        return sequence, pooled


@dataclass
class FlowPolicyConfig:
    """How the policy samples: guidance weight w, SDE noise level a, number of steps, reduction, SDE form, and
    the latents' height and width (``sample_size``; None: the transformer's ``config.sample_size``)."""

    guidance_scale: float = 5.0
    noise_level: float = 0.7
    num_steps: int = 10
    reduction: LogProbReduction = "mean"
    sde_type: SDEType = "sde"
    sample_size: int | None = None


def set_flow_timesteps(
    scheduler: FlowMatchEulerDiscreteScheduler, num_steps: int, transformer: Any, sample_size: int | None = None
) -> None:
    """``scheduler.set_timesteps`` as StableDiffusion3Pipeline calls it (with its ``mu`` under dynamic shifting,
    from the number of image tokens at latent size ``sample_size``, by default the transformer's)."""
    if not scheduler.config.get("use_dynamic_shifting", False):
        scheduler.set_timesteps(num_steps)
        return
    from diffusers.pipelines.stable_diffusion_3.pipeline_stable_diffusion_3 import calculate_shift

    size = sample_size or transformer.config.sample_size
    height, width = (size, size) if isinstance(size, int) else size
    patch = transformer.config.patch_size
    mu = calculate_shift(
        (height // patch) * (width // patch),
        scheduler.config.get("base_image_seq_len", 256),
        scheduler.config.get("max_image_seq_len", 4096),
        scheduler.config.get("base_shift", 0.5),
        scheduler.config.get("max_shift", 1.16),
    )
    scheduler.set_timesteps(num_steps, mu=mu)


class FlowMatchPolicy(GaussianStepPolicy):
    """An SD3 transformer + flow-matching Euler scheduler seen as a Gaussian policy over x' given (x, t, c)."""

    #: Whether ``guidance_scale`` weighs an unconditional and a conditional branch (classifier-free guidance);
    #: a subclass whose transformer takes the guidance as an input (Flux) makes one conditional call instead.
    classifier_free: ClassVar[bool] = True

    def __init__(
        self, transformer: torch.nn.Module, scheduler: FlowMatchEulerDiscreteScheduler, config: FlowPolicyConfig
    ):
        self.transformer = transformer
        self.scheduler = scheduler
        self.config = config
        self.set_timesteps()

    def set_timesteps(self) -> None:
        """Set the scheduler's sampling schedule as the pipeline does (:func:`set_flow_timesteps`)."""
        set_flow_timesteps(self.scheduler, self.config.num_steps, self.transformer, self.config.sample_size)

    @property
    def unet(self) -> torch.nn.Module:
        """The denoiser, under the name the shared sampling helpers read its latent shape from."""
        return self.transformer

    @property
    def timesteps(self) -> torch.Tensor:
        """The T sampling timesteps (sigma * num_train_timesteps), from noisiest to cleanest."""
        return self.scheduler.timesteps

    def deterministic(self) -> "FlowMatchPolicy":
        """The Euler ODE (noise level 0), sharing this policy's transformer and scheduler."""
        return type(self)(self.transformer, self.scheduler, dataclasses.replace(self.config, noise_level=0.0))

    def guided_velocity(
        self,
        latents: torch.Tensor,
        timesteps: torch.Tensor,
        cond_embeds: PromptEmbeds,
        uncond_embeds: PromptEmbeds,
    ) -> torch.Tensor:
        """v_hat for a batch; per-sample timesteps; one transformer call holding both guidance branches (only the
        conditional one at w = 1, or when the guidance is not classifier-free)."""
        w = self.config.guidance_scale
        t = torch.as_tensor(timesteps, device=latents.device).reshape(-1).expand(latents.shape[0])
        if w == 1.0 or not self.classifier_free:
            return self._velocity(latents, t, cond_embeds)
        uncond = uncond_embeds.expand(latents.shape[0]).to(cond_embeds.dtype)
        both = self._velocity(torch.cat([latents, latents]), torch.cat([t, t]), PromptEmbeds.cat([uncond, cond_embeds]))
        v_uncond, v_cond = both.chunk(2)
        return apply_guidance(v_uncond, v_cond, w)

    def _velocity(self, latents: torch.Tensor, t: torch.Tensor, embeds: PromptEmbeds) -> torch.Tensor:
        return self.transformer(
            hidden_states=latents,
            timestep=t,
            encoder_hidden_states=embeds.sequence,
            pooled_projections=embeds.pooled,
            return_dict=False,
        )[0]

    def step(
        self,
        latents: torch.Tensor,
        timesteps: torch.Tensor,
        cond_embeds: PromptEmbeds,
        uncond_embeds: PromptEmbeds,
        next_latents: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> DDIMStepOutput:
        """Sample x' (or score the given ``next_latents``) and return its log-probability."""
        velocity = self.guided_velocity(latents, timesteps, cond_embeds, uncond_embeds)
        return flow_step_with_logprob(
            self.scheduler,
            velocity,
            torch.as_tensor(timesteps, device=latents.device),
            latents,
            noise_level=self.config.noise_level,
            sde_type=self.config.sde_type,
            prev_sample=next_latents,
            generator=generator,
            reduction=self.config.reduction,
        )
