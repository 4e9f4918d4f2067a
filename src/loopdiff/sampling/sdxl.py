"""SDXL's prompt conditioning for the DDIM policy: token states, pooled text embeddings and size time ids.

``StableDiffusionXLPipeline`` conditions its UNet on

- the penultimate hidden states of its two CLIP text encoders, concatenated along the feature axis (N, L, D1 + D2);
- the pooled, projected text embedding of the second encoder (``CLIPTextModelWithProjection``), (N, P);
- ``time_ids`` (N, 6): original size (h, w), crop top-left (top, left) and target size (h, w), in pixels.

:class:`SDXLPromptEncoder` makes the first two with the pipeline's own ``encode_prompt`` and adds the time
ids of uncropped images at the sampled resolution (the UNet's native one unless ``sampling.resolution`` sets
another), as the pipeline does by default for the height and width it is given. The unconditional
embeddings follow the pipeline's ``force_zeros_for_empty_prompt``: zeros (SDXL base's setting), else the
encoded empty prompt. The time ids are the same in both guidance branches, as in the pipeline.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch

from loopdiff.sampling.embeds import PromptEmbeds

TIME_IDS = 6  # original (h, w), crop top-left (top, left), target (h, w)


def sdxl_time_ids(pipeline: Any, sample_size: int | None = None) -> torch.Tensor:
    """(1, 6) float32 time ids of an uncropped image of latent size ``sample_size`` (by default the UNet's native
    size): (h, w, 0, 0, h, w) in pixels.

    Raises ValueError when the UNet's added-embedding input does not fit the time ids and the second text
    encoder's projection (as ``StableDiffusionXLPipeline`` checks).
    """
    unet = pipeline.unet
    size = sample_size or unet.config.sample_size
    height, width = ((size, size) if isinstance(size, int) else tuple(size))
    height, width = height * pipeline.vae_scale_factor, width * pipeline.vae_scale_factor
    expected = unet.add_embedding.linear_1.in_features
    passed = unet.config.addition_time_embed_dim * TIME_IDS + pipeline.text_encoder_2.config.projection_dim
    if passed != expected:
        raise ValueError(
            f"the SDXL UNet's added embedding takes {expected} inputs, but addition_time_embed_dim "
            f"{unet.config.addition_time_embed_dim} x {TIME_IDS} time ids + the text projection "
            f"{pipeline.text_encoder_2.config.projection_dim} = {passed}"
        )
    return torch.tensor([[height, width, 0, 0, height, width]], dtype=torch.float32)


class SDXLPromptEncoder:
    """Prompt embeddings from a ``StableDiffusionXLPipeline``'s two text encoders, cached per distinct prompt;
    ``negative_prompt`` is the prompt of classifier-free guidance's unconditional branch (empty by default)."""

    negative_prompt: str = ""

    def __init__(self, pipeline: Any, device: torch.device | str, sample_size: int | None = None):
        self.pipeline = pipeline
        self.device = torch.device(device)
        self.time_ids = sdxl_time_ids(pipeline, sample_size).to(self.device)
        self._cache: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    @torch.no_grad()
    def __call__(self, prompts: Sequence[str]) -> PromptEmbeds:
        missing = sorted({p for p in prompts if p not in self._cache})
        if missing:
            sequence, _, pooled, _ = self.pipeline.encode_prompt(
                prompt=missing, prompt_2=None, device=self.device, do_classifier_free_guidance=False
            )
            for prompt, seq, pool in zip(missing, sequence, pooled):
                self._cache[prompt] = (seq, pool)
        sequence = torch.stack([self._cache[p][0] for p in prompts])
        pooled = torch.stack([self._cache[p][1] for p in prompts])
        return PromptEmbeds(sequence, pooled, self.time_ids.to(sequence.dtype).repeat(len(prompts), 1))

    def unconditional(self) -> PromptEmbeds:
        """The negative embeddings classifier-free guidance uses: the encoded negative prompt, or without one
        zeros under the pipeline's ``force_zeros_for_empty_prompt`` (as diffusers does), else the encoded empty
        prompt; shape (1, ...)."""
        empty = self([self.negative_prompt])
        if self.negative_prompt:
            return empty
        if not self.pipeline.config.get("force_zeros_for_empty_prompt", True):
            return empty
        return PromptEmbeds(torch.zeros_like(empty.sequence), torch.zeros_like(empty.pooled), empty.time_ids)
