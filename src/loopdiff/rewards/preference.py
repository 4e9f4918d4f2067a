"""Human-preference rewards on CLIP: PickScore and HPSv2 (flow_grpo's preference tasks; docs/rewards.md).

- ``pickscore``: PickScore v1 (Kirstain et al. 2023), the CLIP ViT-H/14 ``yuvalkirstain/PickScore_v1`` with the
  tokenizer and image processor of ``laion/CLIP-ViT-H-14-laion2B-s32B-b79K``; the score is the model's
  ``logit_scale.exp()`` times the cosine of the normalised image and prompt embeddings, as its model card
  computes it (about 20-23 on real images; flow_grpo divides it by 26).
- ``hpsv2``: Human Preference Score v2.1 (Wu et al. 2023), OpenCLIP ViT-H/14 fine-tuned on HPD v2; the
  released ``HPS_v2.1_compressed.pt`` is an OpenCLIP state dict, converted here into the transformers
  ``CLIPModel`` of ``laion/CLIP-ViT-H-14-laion2B-s32B-b79K`` (the same architecture); the score is the
  cosine of the normalised embeddings, as ``hpsv2.score`` computes it (about 0.2-0.35).

Images are 8-bit, short side resized (bicubic) and centre-cropped to 224 px, CLIP-normalised (the
processors' steps; :class:`~loopdiff.rewards.clipscore.ClipScore`).
"""

from __future__ import annotations

import os
from typing import Any, Mapping, Sequence

import torch

from loopdiff.rewards.base import RewardError, register_reward
from loopdiff.rewards.clipscore import ClipScore
from loopdiff.rewards.hf_models import checkpoint_and_weights_check, weights_check

PICKSCORE_MODEL = "yuvalkirstain/PickScore_v1"
VIT_H_14 = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"
HPS_CHECKPOINT = "HPS_v2.1_compressed.pt"


class PickScore(ClipScore):
    """Callable reward: PickScore, ``logit_scale.exp() * cos(image, prompt)``."""

    def __call__(
        self, images: torch.Tensor, prompts: Sequence[str], metadata: Sequence[Mapping[str, Any]]
    ) -> torch.Tensor:
        return super().__call__(images, prompts, metadata) * float(self.clip.logit_scale.exp())


def _layer_keys(source: str, target: str) -> dict[str, str]:
    """OpenCLIP -> transformers names of one residual attention block's tensors (``in_proj`` aside)."""
    pairs = {"ln_1": "layer_norm1", "ln_2": "layer_norm2", "attn.out_proj": "self_attn.out_proj",
             "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2"}
    return {f"{source}.{a}.{kind}": f"{target}.{b}.{kind}" for a, b in pairs.items() for kind in ("weight", "bias")}


def open_clip_to_transformers(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """An OpenCLIP CLIP state dict (``visual.*``, ``transformer.*``, ...) as transformers ``CLIPModel`` keys.

    The attention blocks' fused ``in_proj`` weight and bias are split into the q, k and v projections; the
    image and text projections (``x @ proj``) become linear weights (transposed)."""
    renamed = {
        "visual.class_embedding": "vision_model.embeddings.class_embedding",
        "visual.positional_embedding": "vision_model.embeddings.position_embedding.weight",
        "visual.conv1.weight": "vision_model.embeddings.patch_embedding.weight",
        "token_embedding.weight": "text_model.embeddings.token_embedding.weight",
        "positional_embedding": "text_model.embeddings.position_embedding.weight",
        "logit_scale": "logit_scale",
    }
    for kind in ("weight", "bias"):
        renamed |= {f"visual.ln_pre.{kind}": f"vision_model.pre_layrnorm.{kind}",
                    f"visual.ln_post.{kind}": f"vision_model.post_layernorm.{kind}",
                    f"ln_final.{kind}": f"text_model.final_layer_norm.{kind}"}
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        for source, target in (("visual.transformer.resblocks", "vision_model.encoder.layers"),
                               ("transformer.resblocks", "text_model.encoder.layers")):
            if key.startswith(f"{source}."):
                index = key[len(source) + 1 :].split(".")[0]
                layer_source, layer_target = f"{source}.{index}", f"{target}.{index}"
                if key.endswith(("attn.in_proj_weight", "attn.in_proj_bias")):
                    kind = "weight" if key.endswith("weight") else "bias"
                    for name, part in zip(("q_proj", "k_proj", "v_proj"), value.chunk(3)):
                        out[f"{layer_target}.self_attn.{name}.{kind}"] = part
                else:
                    out[_layer_keys(layer_source, layer_target).get(key, key)] = value
                break
        else:
            if key == "visual.proj":
                out["visual_projection.weight"] = value.t()
            elif key == "text_projection":
                out["text_projection.weight"] = value.t()
            elif key in renamed:
                out[renamed[key]] = value
    return out


def load_open_clip_checkpoint(clip: torch.nn.Module, path: str | os.PathLike, reward: str) -> None:
    """Load the OpenCLIP checkpoint at ``path`` (a state dict, or ``{"state_dict": ...}``) into ``clip``."""
    path = os.fspath(path)
    if not os.path.isfile(os.path.expanduser(path)):
        raise RewardError(f"reward '{reward}': checkpoint '{path}' not found (option checkpoint=<{HPS_CHECKPOINT}>)")
    try:
        saved = torch.load(os.path.expanduser(path), map_location="cpu", weights_only=True)
    except (RuntimeError, OSError, ValueError) as error:
        raise RewardError(f"reward '{reward}': '{path}' is not a torch checkpoint: {error}") from error
    state = saved.get("state_dict", saved) if isinstance(saved, dict) else None
    if not isinstance(state, dict):
        raise RewardError(f"reward '{reward}': '{path}' holds no state dict")
    state = {key.removeprefix("module."): value for key, value in state.items()}
    converted = open_clip_to_transformers(state)
    expected = {k for k in clip.state_dict() if not k.endswith("position_ids")}
    missing = sorted(expected - set(converted))
    if missing:
        raise RewardError(f"reward '{reward}': '{path}' is not an OpenCLIP checkpoint of this CLIP model: "
                          f"{len(missing)} tensors missing, e.g. {missing[:3]}")
    reference = clip.state_dict()
    wrong = [k for k in expected if converted[k].shape != reference[k].shape]
    if wrong:
        raise RewardError(f"reward '{reward}': '{path}' does not fit the CLIP model '{wrong[0]}' "
                          f"({tuple(converted[wrong[0]].shape)} vs {tuple(reference[wrong[0]].shape)})")
    parameter = next(clip.parameters())
    clip.load_state_dict({k: converted[k].to(parameter.device, parameter.dtype) for k in expected}, strict=False)


class HPSv2Score(ClipScore):
    """Callable reward: HPS v2.1, the cosine of the image and prompt embeddings of the HPS-tuned CLIP."""

    def __init__(self, checkpoint: str | os.PathLike, model: str = VIT_H_14, device: str | torch.device = "cpu",
                 dtype: Any = torch.float32, batch_size: int = 32, name: str = "hpsv2"):
        super().__init__(model, device, dtype, batch_size, name=name)
        load_open_clip_checkpoint(self.clip, checkpoint, name)


@register_reward(
    "pickscore",
    description="PickScore v1: logit_scale * CLIP ViT-H/14 image-prompt cosine, a human-preference score",
    needs=f"CLIPModel weights (default '{PICKSCORE_MODEL}'; option model=) and the tokenizer/processor "
          f"(default '{VIT_H_14}'; option processor=)",
    extras=("transformers",),
    check=lambda options: weights_check(PICKSCORE_MODEL)(options) or weights_check(VIT_H_14, "processor")(options),
)
def pickscore(model: str = PICKSCORE_MODEL, processor: str = VIT_H_14, device: str = "cpu", dtype: Any = "float32",
              batch_size: int = 32) -> PickScore:
    return PickScore(model, device, dtype, batch_size, name="pickscore", processor=processor)


@register_reward(
    "hpsv2",
    description="HPS v2.1: image-prompt cosine of OpenCLIP ViT-H/14 tuned on human preferences (HPD v2)",
    needs=f"checkpoint={HPS_CHECKPOINT} (xswu/HPSv2) and the ViT-H/14 CLIPModel (default '{VIT_H_14}'; "
          "option model=)",
    extras=("transformers",),
    check=checkpoint_and_weights_check(HPS_CHECKPOINT, VIT_H_14),
)
def hpsv2(checkpoint: str | None = None, model: str = VIT_H_14, device: str = "cpu", dtype: Any = "float32",
          batch_size: int = 32) -> HPSv2Score:
    if checkpoint is None:
        raise RewardError(f"reward 'hpsv2' needs option checkpoint=<path to {HPS_CHECKPOINT}> (xswu/HPSv2)")
    return HPSv2Score(checkpoint, model, device, dtype, batch_size)
