"""Sampling trajectories x_T -> x_0 with per-step log-probabilities, prompt encoding and decoding.

Trajectories are stored as tensors (every step's latents, the timesteps, the log-probs, the prompt index and
the group index of the K samples of each prompt); prompts are never recovered by decoding token ids.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Mapping, Sequence

import torch
from tqdm.auto import tqdm

from loopdiff.sampling.embeds import Conditioning
from loopdiff.sampling.policy import DiffusionPolicy
from loopdiff.sharding import no_autograd
from loopdiff.transfer import to_device


@dataclass
class Trajectories:
    """A batch of N sampled trajectories of T steps.

    - ``latents``: (N, T + 1, C, H, W), x_T first and x_0 last;
    - ``log_probs``: (N, T), log pi(x_{t-1} | x_t, c) under the sampling policy;
    - ``timesteps``: (T,), the scheduler timestep of each step;
    - ``prompt_ids``: (N,), index of each sample's prompt in ``prompts``;
    - ``group_ids``: (N,), equal for the K samples drawn for the same prompt in this batch;
    - ``prompt_embeds``: each sample's prompt conditioning: text-encoder states (N, L, D), or
      :class:`~loopdiff.sampling.embeds.PromptEmbeds` (SD3, SDXL).
    """

    latents: torch.Tensor
    log_probs: torch.Tensor
    timesteps: torch.Tensor
    prompt_ids: torch.Tensor
    group_ids: torch.Tensor
    prompt_embeds: Conditioning
    prompts: list[str] = field(default_factory=list)
    metadata: list[Mapping[str, Any]] = field(default_factory=list)

    def __len__(self) -> int:
        return self.latents.shape[0]

    @property
    def final_latents(self) -> torch.Tensor:
        return self.latents[:, -1]

    def select(self, keep: torch.Tensor) -> "Trajectories":
        """The trajectories at the indices or boolean mask ``keep`` (timesteps and prompt lists are shared)."""
        per_sample = ("latents", "log_probs", "prompt_ids", "group_ids", "prompt_embeds")
        picked = {name: getattr(self, name)[keep.to(getattr(self, name).device)] for name in per_sample}
        return replace(self, **picked)

    def sample_prompts(self) -> list[str]:
        return [self.prompts[i] for i in self.prompt_ids.tolist()]

    def sample_metadata(self) -> list[Mapping[str, Any]]:
        return [self.metadata[i] for i in self.prompt_ids.tolist()]


class PromptEncoder:
    """Text-encoder states for prompts, computed once per distinct prompt and cached.

    ``negative_prompt`` is the prompt of classifier-free guidance's unconditional branch (empty by default)."""

    negative_prompt: str = ""

    def __init__(self, tokenizer: Any, text_encoder: torch.nn.Module, device: torch.device | str):
        self.tokenizer = tokenizer
        self.text_encoder = text_encoder
        self.device = torch.device(device)
        self._cache: dict[str, torch.Tensor] = {}

    @torch.no_grad()
    def __call__(self, prompts: Sequence[str]) -> torch.Tensor:
        missing = sorted({p for p in prompts if p not in self._cache})
        if missing:
            for prompt, state in zip(missing, self.encode_with_grad(missing)):
                self._cache[prompt] = state
        return torch.stack([self._cache[p] for p in prompts])

    def encode_with_grad(self, prompts: Sequence[str]) -> torch.Tensor:
        """The text encoder's states of ``prompts`` (N, L, D), uncached: with gradients when the encoder trains."""
        tokens = self.tokenizer(
            list(prompts),
            padding="max_length",
            max_length=self.tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        )
        return self.text_encoder(tokens.input_ids.to(self.device))[0]

    def clear(self) -> None:
        """Forget the cached states (the text encoder's weights changed)."""
        self._cache.clear()

    def unconditional(self) -> torch.Tensor:
        """The negative prompt's states used by classifier-free guidance, shape (1, L, D)."""
        return self([self.negative_prompt])


def initial_latents(
    unet: torch.nn.Module, n: int, generator: torch.Generator, device: torch.device | str,
    shape: tuple[int, int, int] | None = None,
) -> torch.Tensor:
    """x_T ~ N(0, I) of ``shape`` (C, H, W), by default the UNet's latent shape, drawn on the generator's device."""
    if shape is None:
        size = unet.config.sample_size
        height, width = (size, size) if isinstance(size, int) else size
        shape = (unet.config.in_channels, height, width)
    return to_device(torch.randn((n, *shape), generator=generator, device=generator.device), device)


def sample_trajectories(
    policy: DiffusionPolicy,
    prompt_embeds: Conditioning,
    uncond_embeds: Conditioning,
    generator: torch.Generator,
    batch_size: int = 64,
    progress: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Run the DDIM (eta > 0) sampler for every row of ``prompt_embeds``.

    Returns ``latents`` (N, T + 1, C, H, W) in float32 and ``log_probs`` (N, T); a deterministic step
    (eta = 0) has no density, and its log-probabilities are NaN. The loop never reads a value back from the
    device: the host only queues work, and the device runs the steps back to back. Runs in inference mode, or under
    ``torch.no_grad`` when the denoiser is sharded by FSDP (see :func:`loopdiff.sharding.no_autograd`).
    """
    with no_autograd(policy.unet):
        return _sample(policy, prompt_embeds, uncond_embeds, generator, batch_size, progress)


def _sample(
    policy: DiffusionPolicy,
    prompt_embeds: Conditioning,
    uncond_embeds: Conditioning,
    generator: torch.Generator,
    batch_size: int,
    progress: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    device = prompt_embeds.device
    timesteps = policy.timesteps.to(device)
    all_latents, all_log_probs = [], []
    for start in tqdm(range(0, len(prompt_embeds), batch_size), desc="sampling", disable=not progress, leave=False):
        embeds = prompt_embeds[start : start + batch_size]
        x = initial_latents(policy.unet, len(embeds), generator, device, policy.latent_shape)
        steps, log_probs = [x.float()], []
        for t in timesteps:
            out = policy.step(x, t, embeds, uncond_embeds, generator=generator)
            x = out.prev_sample
            steps.append(x.float())
            log_probs.append(out.log_prob if out.log_prob is not None else x.new_full((len(x),), float("nan")))
        all_latents.append(torch.stack(steps, dim=1))
        all_log_probs.append(torch.stack(log_probs, dim=1))
    return torch.cat(all_latents), torch.cat(all_log_probs)


@torch.inference_mode()
def decode_latents(vae: torch.nn.Module, latents: torch.Tensor, batch_size: int = 64) -> torch.Tensor:
    """VAE-decode latents to images (N, 3, H, W) in [0, 1], float32."""
    images = []
    scale = vae.config.scaling_factor
    shift = getattr(vae.config, "shift_factor", None) or 0.0
    for start in range(0, len(latents), batch_size):
        z = latents[start : start + batch_size].to(vae.dtype) / scale + shift
        images.append((vae.decode(z).sample.float() / 2 + 0.5).clamp(0, 1))
    return torch.cat(images)
