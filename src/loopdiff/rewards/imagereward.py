"""ImageReward (Xu et al. 2023; THUDM/ImageReward), a BLIP-based human-preference reward (docs/rewards.md).

As the released ``ImageReward.score``: the prompt, BERT-tokenised (padding to 35 tokens, truncation; its
first token [CLS] kept), goes through BLIP's image-grounded text encoder cross-attending to the BLIP ViT-L
image states; the [CLS] state's MLP head (768 -> 1024 -> 128 -> 64 -> 16 -> 1, no activations, the layout of
the aesthetic head) gives the reward, standardised as ``(r - 0.16717362830052426) / 1.0333394966054072``.
Images are 8-bit, short side resized (bicubic) and centre-cropped to 224 px, CLIP-normalised.

The released ``ImageReward.pt`` holds the original BLIP weights (``blip.visual_encoder.*``,
``blip.text_encoder.*``) and the head (``mlp.layers.*``). They are renamed into transformers'
``BlipForImageTextRetrieval``, built from the config of a BLIP ViT-L retrieval model of the same
architecture (default ``Salesforce/blip-itm-large-coco``, whose tokenizer is BLIP's BERT tokenizer) at
ImageReward's 224 px.
"""

from __future__ import annotations

import os
from typing import Any, Mapping, Sequence

import torch

from loopdiff.rewards.aesthetic import AestheticHead
from loopdiff.rewards.base import RewardError, register_reward
from loopdiff.rewards.hf_models import (
    HuggingFaceScorer,
    ImageSettings,
    checkpoint_and_weights_check,
    for_inference,
    load_pretrained,
)

DEFAULT_BLIP = "Salesforce/blip-itm-large-coco"
CHECKPOINT = "ImageReward.pt"
MEAN, STD = 0.16717362830052426, 1.0333394966054072
MAX_TOKENS = 35

_VIT_NAMES = {  # original BLIP ViT -> transformers BlipVisionModel
    "cls_token": "embeddings.class_embedding", "pos_embed": "embeddings.position_embedding",
    "patch_embed.proj.weight": "embeddings.patch_embedding.weight",
    "patch_embed.proj.bias": "embeddings.patch_embedding.bias",
    "norm.weight": "post_layernorm.weight", "norm.bias": "post_layernorm.bias",
}
_BLOCK_NAMES = {"attn.qkv": "self_attn.qkv", "attn.proj": "self_attn.projection", "norm1": "layer_norm1",
                "norm2": "layer_norm2", "mlp.fc1": "mlp.fc1", "mlp.fc2": "mlp.fc2"}


def _vision_key(key: str) -> str:
    """``blocks.3.attn.qkv.weight`` -> ``encoder.layers.3.self_attn.qkv.weight`` (and the embeddings' names)."""
    if key in _VIT_NAMES:
        return _VIT_NAMES[key]
    if key.startswith("blocks."):
        _, index, rest = key.split(".", 2)
        module, kind = rest.rsplit(".", 1)
        return f"encoder.layers.{index}.{_BLOCK_NAMES.get(module, module)}.{kind}"
    return key


def split_checkpoint(state: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """ImageReward's state dict -> (``BlipForImageTextRetrieval`` weights of its vision model and text encoder,
    the head's ``layers.*``); the BLIP parts ImageReward does not use (projections) are left out."""
    blip, head = {}, {}
    for key, value in state.items():
        if key.startswith("blip.visual_encoder."):
            blip[f"vision_model.{_vision_key(key.removeprefix('blip.visual_encoder.'))}"] = value
        elif key.startswith("blip.text_encoder."):
            blip[f"text_encoder.{key.removeprefix('blip.text_encoder.')}"] = value
        elif key.startswith("mlp.layers."):
            head[key.removeprefix("mlp.")] = value
    return blip, head


def _misfit(blip: Mapping[str, torch.Tensor], head: Mapping[str, torch.Tensor],
            wanted: Mapping[str, torch.Tensor]) -> str | None:
    """Why the checkpoint's parts do not fit the model's ``wanted`` tensors, or None."""
    missing = sorted(set(wanted) - set(blip))
    if missing:
        return f"it lacks {missing[:2]}"
    wrong = [k for k in wanted if blip[k].shape != wanted[k].shape]
    if wrong:
        return f"its {wrong[0]} has shape {tuple(blip[wrong[0]].shape)}, not {tuple(wanted[wrong[0]].shape)}"
    return None if head else "it has no mlp head"


class ImageRewardScore(HuggingFaceScorer):
    """Callable reward: ImageReward's standardised preference score of each image for its prompt."""

    def __init__(self, checkpoint: str | os.PathLike, model: str = DEFAULT_BLIP, device: str | torch.device = "cpu",
                 dtype: Any = torch.float32, batch_size: int = 16, image_size: int = 224, name: str = "imagereward"):
        from transformers import BlipConfig, BlipForImageTextRetrieval

        self.name = name
        config = load_pretrained(BlipConfig, model, name)
        config.vision_config.image_size = image_size
        blip_state, head_state = split_checkpoint(self._read(checkpoint))
        blip = BlipForImageTextRetrieval(config)
        wanted = {k: v for k, v in blip.state_dict().items()
                  if k.startswith(("vision_model.", "text_encoder.")) and not k.endswith("position_ids")}
        problem = _misfit(blip_state, head_state, wanted)
        if problem is not None:
            raise RewardError(f"reward '{name}': '{checkpoint}' does not fit the BLIP of '{model}' at {image_size} px "
                              f"({problem})")
        blip.load_state_dict({k: blip_state[k] for k in wanted}, strict=False)
        head = AestheticHead(head_state["layers.0.weight"].shape[1])
        head.load_state_dict(head_state)
        super().__init__(blip, model, device, dtype, batch_size, name)
        self.blip = self.model
        self.head = for_inference(head, device, dtype)
        self.settings = ImageSettings(image_size)

    def _read(self, checkpoint: str | os.PathLike) -> Mapping[str, torch.Tensor]:
        path = os.path.expanduser(os.fspath(checkpoint))
        if not os.path.isfile(path):
            raise RewardError(f"reward '{self.name}': checkpoint '{checkpoint}' not found (option "
                              f"checkpoint=<{CHECKPOINT}>, from THUDM/ImageReward)")
        try:
            saved = torch.load(path, map_location="cpu", weights_only=True)
        except (RuntimeError, OSError, ValueError) as error:
            raise RewardError(f"reward '{self.name}': '{checkpoint}' is not a torch checkpoint: {error}") from error
        if not isinstance(saved, dict):
            raise RewardError(f"reward '{self.name}': '{checkpoint}' holds no state dict")
        return saved.get("state_dict", saved)

    @torch.no_grad()
    def scores(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        device = self.device
        pixels = self.model_pixels(images, mode="bicubic", crop=True)
        image_states = self.blip.vision_model(pixel_values=pixels)[0]
        tokens = self.tokenizer(list(prompts), padding="max_length", truncation=True, max_length=MAX_TOKENS,
                                return_tensors="pt").to(device)
        text = self.blip.text_encoder(
            input_ids=tokens.input_ids, attention_mask=tokens.attention_mask, encoder_hidden_states=image_states,
            encoder_attention_mask=torch.ones(image_states.shape[:-1], dtype=torch.long, device=device),
        ).last_hidden_state[:, 0]
        return ((self.head(text).float() - MEAN) / STD).cpu()

    def score_chunk(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        return self.scores(images, prompts)


@register_reward(
    "imagereward",
    description="ImageReward: BLIP image-grounded text encoder + MLP head, a standardised human-preference score",
    needs=f"checkpoint={CHECKPOINT} (THUDM/ImageReward) and a BLIP ViT-L retrieval model's config and tokenizer "
          f"(default '{DEFAULT_BLIP}'; option model=)",
    extras=("transformers",),
    check=checkpoint_and_weights_check(CHECKPOINT, DEFAULT_BLIP),
)
def imagereward(checkpoint: str | None = None, model: str = DEFAULT_BLIP, device: str = "cpu", dtype: Any = "float32",
                batch_size: int = 16, image_size: int = 224) -> ImageRewardScore:
    if checkpoint is None:
        raise RewardError(f"reward 'imagereward' needs option checkpoint=<path to {CHECKPOINT}> (THUDM/ImageReward)")
    return ImageRewardScore(checkpoint, model, device, dtype, batch_size, image_size)
