"""CLIPScore: image-prompt agreement of a CLIP model, in two variants.

- ``variant="cosine"`` (default): the raw cosine similarity of the L2-normalised image and prompt
  embeddings, as T2I-CompBench's ``CLIPScore_eval`` (CLIP ViT-B/32, the whole prompt as text);
- ``variant="hessel"``: ``w * max(cos, 0)`` with ``w = 2.5`` (Hessel et al. 2021, CLIP-S).

Hessel et al. prefix the text with "A photo depicts"; ``prefix`` adds any such text (default none,
as T2I-CompBench). Images are 8-bit, short side resized (bicubic) and centre-cropped to the CLIP
input, CLIP-normalised; prompts are truncated to the text model's length.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import torch

from loopdiff.rewards.base import RewardError, register_reward
from loopdiff.rewards.hf_models import HuggingFaceScorer, pooled_features, weights_check

DEFAULT_MODEL = "openai/clip-vit-base-patch32"
VARIANTS = ("cosine", "hessel")


def clip_score(cosine: torch.Tensor, variant: str = "cosine", weight: float = 2.5) -> torch.Tensor:
    """Turn cosine similarities into the chosen CLIPScore variant."""
    if variant == "cosine":
        return cosine
    if variant == "hessel":
        return weight * cosine.clamp(min=0)
    raise RewardError(f"unknown CLIPScore variant {variant!r}; expected one of {VARIANTS}")


class ClipScore(HuggingFaceScorer):
    """Callable reward: CLIPScore of each image against its prompt."""

    def __init__(
        self,
        model: str = DEFAULT_MODEL,
        device: str | torch.device = "cpu",
        dtype: Any = torch.float32,
        batch_size: int = 32,
        variant: str = "cosine",
        weight: float = 2.5,
        prefix: str = "",
        name: str = "clipscore",
        processor: str | None = None,
    ):
        """``processor``: the folder or Hub id of the tokenizer and image-processor settings, when the model's
        own has none (PickScore's); default ``model``."""
        from transformers import CLIPModel

        if variant not in VARIANTS:
            raise RewardError(f"reward '{name}': unknown variant {variant!r}; expected one of {VARIANTS}")
        super().__init__(CLIPModel, model, device, dtype, batch_size, name, processor)
        self.clip = self.model
        self.variant = variant
        self.weight = weight
        self.prefix = prefix

    @torch.no_grad()
    def cosine(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        """Cosine similarity of each image's and its prompt's CLIP embeddings (CPU float32)."""
        pixels = self.model_pixels(images, mode="bicubic", crop=True)
        image = pooled_features(self.clip.get_image_features(pixel_values=pixels))
        texts = [f"{self.prefix} {p}".strip() if self.prefix else p for p in prompts]
        length = self.clip.config.text_config.max_position_embeddings
        tokens = self.tokenizer(texts, padding=True, truncation=True, max_length=length, return_tensors="pt")
        text = pooled_features(self.clip.get_text_features(**tokens.to(self.device)))
        image = image / image.norm(dim=-1, keepdim=True)
        text = text / text.norm(dim=-1, keepdim=True)
        return (image * text).sum(-1).float().cpu()

    def score_chunk(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        return self.cosine(images, prompts)

    def __call__(
        self, images: torch.Tensor, prompts: Sequence[str], metadata: Sequence[Mapping[str, Any]]
    ) -> torch.Tensor:
        return clip_score(self.score(images, prompts), self.variant, self.weight)


@register_reward(
    "clipscore",
    description="CLIP image-prompt cosine (T2I-CompBench CLIPScore; variant=hessel for 2.5*max(cos,0))",
    needs=f"CLIPModel weights (default '{DEFAULT_MODEL}'; option model=)",
    extras=("transformers",),
    check=weights_check(DEFAULT_MODEL),
)
def clipscore(
    model: str = DEFAULT_MODEL,
    device: str = "cpu",
    dtype: Any = "float32",
    batch_size: int = 32,
    variant: str = "cosine",
    weight: float = 2.5,
    prefix: str = "",
) -> ClipScore:
    return ClipScore(model, device, dtype, batch_size, variant, weight, prefix)
