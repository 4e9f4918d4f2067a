"""LAION improved aesthetic predictor (DDPO's aesthetic reward; docs/rewards.md).

Score = MLP(e / |e|) on the AVA 1..10 scale, where ``e`` is the CLIP ViT-L/14 image embedding
(``CLIPModel.get_image_features``, 768-d) and the MLP is the predictor's head: Linear layers
768 -> 1024 -> 128 -> 64 -> 16 -> 1 with dropout between the first ones and no activations
(so in eval mode it is one affine map). The head's weights are the released
``sac+logos+ava1-l14-linearMSE.pth`` (loaded with ``torch.load(weights_only=True)``).

Images are 8-bit (as DDPO's ``(images * 255).round()``), resized on the short side to the CLIP
input size with bicubic resampling, centre-cropped and CLIP-normalised (``CLIPProcessor``'s steps).
"""

from __future__ import annotations

import os
from typing import Any, Mapping, Sequence

import torch
from torch import nn

from loopdiff.rewards.base import RewardError, register_reward
from loopdiff.rewards.hf_models import (
    HuggingFaceScorer,
    check_images,
    concat,
    for_inference,
    pooled_features,
    weights_check,
)

DEFAULT_CLIP = "openai/clip-vit-large-patch14"
HEAD_FILE = "sac+logos+ava1-l14-linearMSE.pth"


class AestheticHead(nn.Module):
    """The improved-aesthetic-predictor MLP (state-dict keys ``layers.{0,2,4,6,7}``)."""

    def __init__(self, input_size: int = 768):
        super().__init__()
        self.input_size = input_size
        self.layers = nn.Sequential(
            nn.Linear(input_size, 1024),
            nn.Dropout(0.2),
            nn.Linear(1024, 128),
            nn.Dropout(0.2),
            nn.Linear(128, 64),
            nn.Dropout(0.1),
            nn.Linear(64, 16),
            nn.Linear(16, 1),
        )

    def forward(self, embeddings: torch.Tensor) -> torch.Tensor:
        return self.layers(embeddings).squeeze(-1)


def load_head(path: str | os.PathLike, reward: str = "aesthetic") -> AestheticHead:
    """The head with the released weights from ``path`` (a ``.pth`` state dict), in eval mode."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise RewardError(f"reward '{reward}': aesthetic head weights '{path}' not found (option head=<file>)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        head = AestheticHead(state["layers.0.weight"].shape[1])
        head.load_state_dict(state)
    except (RuntimeError, KeyError, OSError) as error:
        raise RewardError(f"reward '{reward}': '{path}' is not an aesthetic-predictor state dict: {error}") from error
    return head.eval().requires_grad_(False)


class AestheticScore(HuggingFaceScorer):
    """Callable reward: LAION aesthetic score of each image (AVA 1..10 scale)."""

    needs_tokenizer = False

    def __init__(
        self,
        head: str | os.PathLike,
        model: str = DEFAULT_CLIP,
        device: str | torch.device = "cpu",
        dtype: Any = torch.float32,
        batch_size: int = 32,
        name: str = "aesthetic",
    ):
        from transformers import CLIPModel

        super().__init__(CLIPModel, model, device, dtype, batch_size, name)
        self.clip = self.model
        self.head = for_inference(load_head(head, name), device, dtype)
        if self.clip.config.projection_dim != self.head.input_size:
            raise RewardError(
                f"reward '{name}': CLIP '{model}' embeds in {self.clip.config.projection_dim} dims but the head "
                f"expects {self.head.input_size} (ViT-L/14)"
            )

    @torch.no_grad()
    def embeddings(self, images: torch.Tensor) -> torch.Tensor:
        """L2-normalised CLIP image embeddings ``(N, projection_dim)``."""
        pixels = self.model_pixels(images, mode="bicubic", crop=True)
        features = pooled_features(self.clip.get_image_features(pixel_values=pixels))
        return features / features.norm(dim=-1, keepdim=True)

    def __call__(
        self, images: torch.Tensor, prompts: Sequence[str], metadata: Sequence[Mapping[str, Any]]
    ) -> torch.Tensor:
        return concat(self.in_chunks(self.scores, check_images(images, self.name)))

    def scores(self, images: torch.Tensor) -> torch.Tensor:
        """The aesthetic scores of one chunk of images (CPU float32)."""
        return self.head(self.embeddings(images)).float().cpu()


def _head_check(options: Mapping[str, Any]) -> str | None:
    head = options.get("head")
    if head is None:
        return f"needs option head=<path to {HEAD_FILE}>"
    if not os.path.isfile(os.fspath(head)):
        return f"aesthetic head weights '{head}' not found"
    return weights_check(DEFAULT_CLIP)(options)


@register_reward(
    "aesthetic",
    description="LAION improved aesthetic predictor on L2-normalised CLIP ViT-L/14 image embeddings (1..10)",
    needs=f"head={HEAD_FILE} and CLIPModel weights (default '{DEFAULT_CLIP}'; option model=)",
    extras=("transformers",),
    check=_head_check,
)
def aesthetic(
    head: str | None = None,
    model: str = DEFAULT_CLIP,
    device: str = "cpu",
    dtype: Any = "float32",
    batch_size: int = 32,
) -> AestheticScore:
    if head is None:
        raise RewardError(f"reward 'aesthetic' needs option head=<path to {HEAD_FILE}>")
    return AestheticScore(head, model, device, dtype, batch_size)
