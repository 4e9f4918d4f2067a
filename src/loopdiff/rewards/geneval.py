"""A GenEval-style reward: are the objects, counts, colours and positions that a prompt's metadata asks
for in the image (flow_grpo's GenEval task; Ghosh et al. 2023; docs/rewards.md).

The prompt's metadata is GenEval's (a JSON Lines prompt file, e.g. its ``evaluation_metadata.jsonl``):
``include``, a list of ``{"class": name, "count": n}`` with optional ``"color": colour`` and
``"position": [relation, index]`` (``relation`` one of "left of", "right of", "above", "below", relative
to the ``index``-th include entry), and optional ``exclude``, a list of ``{"class": name, "count": n}``
(fewer than n boxes of that class).

As GenEval's ``evaluate_images.py``: an include is met when at least ``count`` boxes of its class are
found; its colour when each of its ``count`` best boxes is classified as that colour by CLIP zero-shot
among GenEval's ten colours ("a photo of a {colour} {class}"); its position when each of its boxes stands
in the relation to each box of the other entry (centre offsets shrunk by 0.1 x the boxes' sizes, the
relation's component of the unit offset beyond 0.5). The differences: boxes come from OWLv2
(:class:`~loopdiff.rewards.detection.OwlDetector`, as ``spatial`` and ``numeracy``), not Mask2Former, and
colours are judged on the box crop without the instance mask. The score is 1 when every requirement is
met, else 0 (GenEval's "correct"), or with ``partial=true`` the fraction of requirements met.
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import torch

from loopdiff.rewards.base import RewardError, register_reward
from loopdiff.rewards.detection import DEFAULT_MODEL, Detection, DetectionScore, Detector, OwlDetector
from loopdiff.rewards.hf_models import HuggingFaceScorer, check_images, pooled_features, weights_check

COLORS = ("red", "orange", "yellow", "green", "blue", "purple", "pink", "brown", "black", "white")
DEFAULT_CLIP = "openai/clip-vit-large-patch14"
POSITION_THRESHOLD = 0.1


def relative_position(box: Sequence[float], other: Sequence[float]) -> set[str]:
    """The relations ("left of", "right of", "above", "below") of ``box`` to ``other`` (x0, y0, x1, y1)."""
    offset = [(box[0] + box[2] - other[0] - other[2]) / 2, (box[1] + box[3] - other[1] - other[3]) / 2]
    sizes = [box[2] - box[0] + other[2] - other[0], box[3] - box[1] + other[3] - other[1]]
    revised = [max(abs(o) - POSITION_THRESHOLD * s, 0.0) * math.copysign(1.0, o) for o, s in zip(offset, sizes)]
    norm = math.hypot(*offset)
    if all(abs(r) < 1e-3 for r in revised) or norm == 0:
        return set()
    dx, dy = revised[0] / norm, revised[1] / norm
    return {name for name, holds in (("left of", dx < -0.5), ("right of", dx > 0.5), ("above", dy < -0.5),
                                     ("below", dy > 0.5)) if holds}


class ColourClassifier(HuggingFaceScorer):
    """CLIP zero-shot colour of a box crop among :data:`COLORS`."""

    def __init__(self, model: str, device: str | torch.device, dtype: Any, name: str):
        from transformers import CLIPModel

        super().__init__(CLIPModel, model, device, dtype, batch_size=1, name=name)
        self.clip = self.model

    @torch.no_grad()
    def __call__(self, image: torch.Tensor, box: Sequence[float], name: str) -> str:
        height, width = image.shape[-2:]
        x0, y0 = max(0, int(box[0])), max(0, int(box[1]))
        x1, y1 = min(width, max(x0 + 1, math.ceil(box[2]))), min(height, max(y0 + 1, math.ceil(box[3])))
        pixels = self.model_pixels(image[None, :, y0:y1, x0:x1], mode="bicubic", crop=True)
        features = pooled_features(self.clip.get_image_features(pixel_values=pixels))
        texts = [f"a photo of a {colour} {name}" for colour in COLORS]
        tokens = self.tokenizer(texts, padding=True, return_tensors="pt").to(self.device)
        text = pooled_features(self.clip.get_text_features(**tokens))
        similarity = torch.nn.functional.cosine_similarity(features, text)
        return COLORS[int(similarity.argmax())]


def requirements_met(
    image: torch.Tensor, detections: Sequence[Detection], metadata: Mapping[str, Any],
    colour_of: ColourClassifier | None,
) -> list[bool]:
    """Whether each requirement of ``metadata`` (each include's presence and count, its colour and position,
    each exclude) holds for ``detections`` of ``image``."""
    by_class: dict[str, list[Detection]] = {}
    for detection in sorted(detections, key=lambda d: -d.score):
        by_class.setdefault(detection.label, []).append(detection)
    include = list(metadata["include"])
    met: list[bool] = []
    for entry in include:
        found = by_class.get(entry["class"], [])[: int(entry["count"])]
        met.append(len(found) >= int(entry["count"]))
        if "color" in entry:
            if colour_of is None:
                raise RewardError("reward 'geneval': a colour requirement needs the CLIP colour classifier")
            met.append(bool(found) and all(colour_of(image, d.box, entry["class"]) == entry["color"] for d in found))
        if entry.get("position"):
            relation, index = entry["position"]
            target = include[int(index)]
            others = by_class.get(target["class"], [])[: int(target["count"])]
            met.append(bool(found) and bool(others) and all(
                relation in relative_position(d.box, o.box) for d in found for o in others))
    for entry in metadata.get("exclude", []):
        met.append(len(by_class.get(entry["class"], [])) < int(entry["count"]))
    return met


def _classes(metadata: Mapping[str, Any]) -> list[str]:
    return list(dict.fromkeys(e["class"] for e in [*metadata["include"], *metadata.get("exclude", [])]))


class GenevalScore(DetectionScore):
    """Callable reward: GenEval's correctness (or the fraction of requirements met) over ``detector``'s boxes."""

    def __init__(self, detector: Detector, colour_of: ColourClassifier | None = None, partial: bool = False):
        super().__init__(detector)
        self.colour_of = colour_of
        self.partial = partial

    def target(self, prompt: str, metadata: Mapping[str, Any]) -> Mapping[str, Any]:
        if not isinstance(metadata.get("include"), list) or not metadata["include"]:
            raise RewardError(f"reward 'geneval' needs GenEval metadata with an 'include' list for each prompt "
                              f"(a .jsonl prompt file); prompt {prompt!r} has {dict(metadata)}")
        return metadata

    def names(self, target: Mapping[str, Any]) -> list[str]:
        return _classes(target)

    def image_score(
        self, image: torch.Tensor, detections: Sequence[Detection], target: Mapping[str, Any], prompt: str
    ) -> float:
        met = requirements_met(image, detections, target, self.colour_of)
        return sum(met) / len(met) if self.partial else float(all(met))

    def __call__(
        self, images: torch.Tensor, prompts: Sequence[str], metadata: Sequence[Mapping[str, Any]]
    ) -> torch.Tensor:
        return super().__call__(check_images(images, "geneval"), prompts, metadata)


@register_reward(
    "geneval",
    description="GenEval-style check of the metadata's objects, counts, colours and positions over OWLv2 boxes "
                "(1 if all hold; partial=true: the fraction)",
    needs=f"Owlv2ForObjectDetection weights (default '{DEFAULT_MODEL}'; option model=), CLIPModel weights for "
          f"colours (default '{DEFAULT_CLIP}'; option clip_model=), GenEval metadata (a .jsonl prompt file)",
    extras=("transformers",),
    check=lambda options: weights_check(DEFAULT_MODEL)(options) or weights_check(DEFAULT_CLIP, "clip_model")(options),
)
def geneval(
    model: str = DEFAULT_MODEL,
    clip_model: str = DEFAULT_CLIP,
    device: str = "cpu",
    dtype: Any = "float32",
    batch_size: int = 8,
    score_threshold: float = 0.3,
    nms_iou: float | None = 0.5,
    template: str = "a photo of a {}",
    partial: bool = False,
) -> GenevalScore:
    detector = OwlDetector(model, device, dtype, batch_size, score_threshold, nms_iou, template, name="geneval")
    return GenevalScore(detector, ColourClassifier(clip_model, device, dtype, "geneval"), partial)
