"""T2I-CompBench's 2D-spatial and numeracy scores over an open-vocabulary detector (docs/rewards.md).

The formulas are T2I-CompBench's (``UniDet_eval/2D_spatial_eval.py`` and ``numeracy_eval.py``);
the detector is not: the benchmark uses UniDet (non-commercial licence, detectron2), this module uses
transformers' OWLv2 (``Owlv2ForObjectDetection``), queried with the objects named in the prompt.
Scores are therefore the same formula over a different detector, not the benchmark's numbers.

Spatial (first and last object of the prompt, relation from the benchmark's phrase list):
``0.25 s1 + 0.25 s2 + 0.5 pos`` when both objects are detected (``s`` the confidence of the
best-scoring box of each, ``pos`` in [0, 1] from the box centres and IoU, 1 when the relation
holds), ``0.25 s`` when one is detected, 0 when none; a total below 0.5 is set to 0. Positions are
measured in the benchmark's frame (short side 479 px, its distance threshold 150 px).

Numeracy: for each object with a number word (``a``/``an``/``one`` ... in the prompt), ``+0.5`` if it
is detected and ``+0.5`` more if the number of its boxes equals the asked number, averaged over the
objects. Boxes of one label that overlap by IoU > 0.9 or cover > 0.9 of each other count once, as in
the benchmark; UniDet's own per-class NMS is mirrored by NMS on OWLv2's boxes (``nms_iou``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Protocol, Sequence

import torch
import torch.nn.functional as F

from loopdiff.rewards.base import register_reward
from loopdiff.rewards.hf_models import HuggingFaceScorer, ImageSettings, check_images, quantize_8bit, weights_check
from loopdiff.rewards.phrases import DETERMINERS, split_noun_phrases

DEFAULT_MODEL = "google/owlv2-base-patch16-ensemble"
# T2I-CompBench's relation phrases, in its matching order (the first one found in the prompt wins).
RELATIONS = (
    "on side of",
    "next to",
    "near",
    "on the left of",
    "on the right of",
    "on the bottom of",
    "on the top of",
    "on top of",  # in the benchmark's list but unscored there (always 0); scored here as "on the top of"
)
REFERENCE_SHORT_SIDE = 479.0  # UniDet's input: Resize(size=479, max_size=480)
NUMBER_WORDS = {
    "a": 1, "an": 1, "one": 1, "two": 2, "three": 3, "four": 4, "five": 5, "six": 6, "seven": 7,
    "eight": 8, "nine": 9, "ten": 10, "eleven": 11, "twelve": 12,
}  # fmt: skip
IRREGULAR_PLURALS = {
    "men": "man", "women": "woman", "children": "child", "people": "person", "mice": "mouse",
    "geese": "goose", "feet": "foot", "teeth": "tooth", "knives": "knife", "leaves": "leaf",
    "wolves": "wolf", "shelves": "shelf", "loaves": "loaf", "halves": "half", "scarves": "scarf",
    "calves": "calf", "oxen": "ox", "dice": "die", "sheep": "sheep", "fish": "fish", "deer": "deer",
    "shrimp": "shrimp", "moose": "moose", "glasses": "glasses", "buses": "bus", "boxes": "box",
    "foxes": "fox", "dishes": "dish", "benches": "bench", "watches": "watch",
}  # fmt: skip


@dataclass(frozen=True)
class Detection:
    """One detected box: its label (the queried object name), confidence and pixel box (x0, y0, x1, y1)."""

    label: str
    score: float
    box: tuple[float, float, float, float]


class Detector(Protocol):
    """Anything that finds the named objects in images: one list of detections per image."""

    def __call__(self, images: torch.Tensor, names: Sequence[Sequence[str]]) -> list[list[Detection]]: ...


# ----------------------------------------------------------------------------- prompt parsing


def singular(noun: str) -> str:
    """``"knives"`` -> ``"knife"``, ``"cups"`` -> ``"cup"`` (rules plus a small irregular table)."""
    word = noun.lower()
    if word in IRREGULAR_PLURALS:
        return IRREGULAR_PLURALS[word]
    if word.endswith("ies") and len(word) > 4:
        return word[:-3] + "y"
    if word.endswith(("ches", "shes", "sses", "xes", "zes")):
        return word[:-2]
    if word.endswith("s") and not word.endswith(("ss", "us", "is")):
        return word[:-1]
    return word


def _object_name(phrase: str) -> str:
    """The detector query for a noun phrase: its words after a determiner or number word."""
    words = phrase.split()
    while len(words) > 1 and (words[0].lower() in DETERMINERS or words[0].lower() in NUMBER_WORDS):
        words = words[1:]
    return " ".join(words).lower()


def spatial_relation(prompt: str) -> str | None:
    """The first of T2I-CompBench's relation phrases found in ``prompt`` (``None`` if none)."""
    lowered = prompt.lower()
    return next((relation for relation in RELATIONS if relation in lowered), None)


def spatial_objects(prompt: str) -> tuple[str, str] | None:
    """The first and last object named in ``prompt`` (``None`` when it names fewer than two phrases)."""
    phrases = split_noun_phrases(prompt)
    if len(phrases) < 2:
        return None
    return _object_name(phrases[0]), _object_name(phrases[-1])


def counted_objects(prompt: str) -> list[tuple[str, int]]:
    """``"two dogs and a cat"`` -> ``[("dog", 2), ("cat", 1)]``: phrases opened by a number word."""
    objects: list[tuple[str, int]] = []
    for phrase in split_noun_phrases(prompt):
        first, *rest = phrase.split()
        count = NUMBER_WORDS.get(first.lower()) if not first.isdigit() else int(first)
        if count is None or not rest:
            continue
        *modifiers, head = rest
        objects.append((" ".join([*modifiers, singular(head)]).lower(), count))
    return objects


# ----------------------------------------------------------------------------- the formulas


def box_iou(a: Sequence[float], b: Sequence[float]) -> float:
    """Intersection over union of two (x0, y0, x1, y1) boxes (continuous coordinates)."""
    inter_w = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    inter_h = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = inter_w * inter_h
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def relation_score(
    relation: str | None,
    box1: Sequence[float],
    box2: Sequence[float],
    iou_threshold: float = 0.1,
    distance_threshold: float = 150.0,
) -> float:
    """T2I-CompBench's soft score that ``box1`` is ``relation`` ``box2`` (in [0, 1]).

    With ``dx, dy`` the centre offsets of box 2 from box 1: "next to"/"near"/"on side of" score 1 when
    ``|dx|`` or ``|dy|`` is below ``distance_threshold``, else ``threshold / max(|dx|, |dy|)``; "left of"
    needs ``dx > 0`` and ``|dx| > |dy|`` (right: ``dx < 0``; top: ``dy > 0`` and ``|dy| > |dx|``; bottom:
    ``dy < 0``), scoring 1 when IoU < ``iou_threshold`` and ``iou_threshold / IoU`` otherwise.
    """
    dx = (box2[0] + box2[2]) / 2 - (box1[0] + box1[2]) / 2
    dy = (box2[1] + box2[3]) / 2 - (box1[1] + box1[3]) / 2
    if relation in ("next to", "on side of", "near"):
        if abs(dx) < distance_threshold or abs(dy) < distance_threshold:
            return 1.0
        return distance_threshold / max(abs(dx), abs(dy))
    directions = {
        "on the left of": (dx > 0, abs(dx) > abs(dy)),
        "on the right of": (dx < 0, abs(dx) > abs(dy)),
        "on the top of": (dy > 0, abs(dy) > abs(dx)),
        "on top of": (dy > 0, abs(dy) > abs(dx)),
        "on the bottom of": (dy < 0, abs(dy) > abs(dx)),
    }
    if relation not in directions or not all(directions[relation]):
        return 0.0
    iou = box_iou(box1, box2)
    return 1.0 if iou < iou_threshold else iou_threshold / iou


def best_detection(detections: Sequence[Detection], label: str) -> Detection | None:
    """The highest-confidence detection of ``label`` (the benchmark takes the first of its sorted list)."""
    found = [d for d in detections if d.label == label]
    return max(found, key=lambda d: d.score) if found else None


def spatial_score(
    detections: Sequence[Detection],
    first: str,
    last: str,
    relation: str | None,
    image_size: tuple[int, int],
    iou_threshold: float = 0.1,
    distance_threshold: float = 150.0,
) -> float:
    """T2I-CompBench's 2D-spatial score of one image (boxes in pixels of an image of ``(H, W)``)."""
    one, two = best_detection(detections, first), best_detection(detections, last)
    if one is not None and two is not None:
        scale = REFERENCE_SHORT_SIDE / min(image_size)  # the benchmark's thresholds live in its 479 px frame
        box1 = [c * scale for c in one.box]
        box2 = [c * scale for c in two.box]
        position = relation_score(relation, box1, box2, iou_threshold, distance_threshold)
        score = 0.25 * one.score + 0.25 * two.score + 0.5 * position
    elif one is not None or two is not None:
        score = 0.25 * (one or two).score  # type: ignore[union-attr]
    else:
        score = 0.0
    return score if score >= 0.5 else 0.0


def same_object(a: Sequence[float], b: Sequence[float]) -> bool:
    """The benchmark's duplicate test: IoU > 0.9 or the overlap covers > 0.9 of either box (+1 px convention)."""
    inter_w = max(0.0, min(a[2], b[2]) - max(a[0], b[0]) + 1)
    inter_h = max(0.0, min(a[3], b[3]) - max(a[1], b[1]) + 1)
    inter = inter_w * inter_h
    area_a = (a[2] - a[0] + 1) * (a[3] - a[1] + 1)
    area_b = (b[2] - b[0] + 1) * (b[3] - b[1] + 1)
    return inter / (area_a + area_b - inter) > 0.9 or inter / area_a > 0.9 or inter / area_b > 0.9


def merge_duplicates(detections: Sequence[Detection]) -> list[Detection]:
    """Drop a detection when an earlier kept one has the same label and is :func:`same_object`."""
    kept: list[Detection] = []
    for detection in detections:
        if not any(k.label == detection.label and same_object(detection.box, k.box) for k in kept):
            kept.append(detection)
    return kept


def numeracy_score(detections: Sequence[Detection], objects: Sequence[tuple[str, int]]) -> float:
    """T2I-CompBench's numeracy score of one image: per object +0.5 found, +0.5 right count; mean."""
    if not objects:
        return 0.0
    distinct = merge_duplicates(detections)
    total = 0.0
    for name, count in objects:
        found = sum(d.label == name for d in distinct)
        total += (0.5 if found else 0.0) + (0.5 if found and found == count else 0.0)
    return total / len(objects)


# ----------------------------------------------------------------------------- the detector


def nms(detections: Sequence[Detection], iou_threshold: float) -> list[Detection]:
    """Per-label non-maximum suppression: keep boxes in score order unless they overlap a kept one."""
    kept: list[Detection] = []
    for detection in sorted(detections, key=lambda d: -d.score):
        overlaps = any(k.label == detection.label and box_iou(k.box, detection.box) > iou_threshold for k in kept)
        if not overlaps:
            kept.append(detection)
    return kept


def pad_to_square(images: torch.Tensor, value: float = 0.5) -> torch.Tensor:
    """Pad ``(N, 3, H, W)`` at the bottom and right to a square (OWLv2's preprocessing)."""
    height, width = images.shape[-2:]
    side = max(height, width)
    return F.pad(images, (0, side - width, 0, side - height), value=value)


class OwlDetector(HuggingFaceScorer):
    """OWLv2 zero-shot detection of named objects (query ``template.format(name)``), with per-label NMS."""

    def __init__(
        self,
        model: str = DEFAULT_MODEL,
        device: str | torch.device = "cpu",
        dtype: Any = torch.float32,
        batch_size: int = 8,
        score_threshold: float = 0.1,
        nms_iou: float | None = 0.5,
        template: str = "a photo of a {}",
        name: str = "detection",
    ):
        from transformers import Owlv2ForObjectDetection

        super().__init__(Owlv2ForObjectDetection, model, device, dtype, batch_size, name)
        self.settings: ImageSettings
        self.score_threshold = score_threshold
        self.nms_iou = nms_iou
        self.template = template

    def pixels(self, images: torch.Tensor) -> torch.Tensor:
        """8-bit, padded to a square with grey, resized (bilinear, antialiased), CLIP-normalised."""
        square = pad_to_square(quantize_8bit(images))
        side = self.settings.size
        if square.shape[-1] != side:
            square = F.interpolate(square, size=(side, side), mode="bilinear", antialias=True, align_corners=False)
        mean = torch.tensor(self.settings.mean, device=square.device).view(1, 3, 1, 1)
        std = torch.tensor(self.settings.std, device=square.device).view(1, 3, 1, 1)
        return (square - mean) / std

    def query_tokens(self, names: Sequence[Sequence[str]], device: torch.device) -> dict[str, torch.Tensor]:
        """Token ids ``(batch * max_queries, length)``; padded query slots start with id 0 (masked by OWLv2)."""
        width = max(len(n) for n in names)
        texts = [self.template.format(name) for image_names in names for name in image_names]
        length = self.model.config.text_config.max_position_embeddings
        tokens = self.tokenizer(texts, padding="max_length", max_length=length, truncation=True, return_tensors="pt")
        input_ids = torch.zeros(len(names), width, length, dtype=torch.long)
        attention = torch.zeros(len(names), width, length, dtype=torch.long)
        attention[..., 0] = 1
        row = 0
        for i, image_names in enumerate(names):
            input_ids[i, : len(image_names)] = tokens["input_ids"][row : row + len(image_names)]
            attention[i, : len(image_names)] = tokens["attention_mask"][row : row + len(image_names)]
            row += len(image_names)
        return {"input_ids": input_ids.flatten(0, 1).to(device), "attention_mask": attention.flatten(0, 1).to(device)}

    @torch.no_grad()
    def raw_outputs(self, images: torch.Tensor, names: Sequence[Sequence[str]]) -> tuple[torch.Tensor, torch.Tensor]:
        """Per image and box: class logits ``(N, boxes, max_queries)`` and boxes ``(N, boxes, 4)`` (cx, cy, w, h)."""
        pixels = self.pixels(images.to(self.device)).to(self.dtype)
        output = self.model(pixel_values=pixels, **self.query_tokens(names, self.device))
        return output.logits.float().cpu(), output.pred_boxes.float().cpu()

    def __call__(self, images: torch.Tensor, names: Sequence[Sequence[str]]) -> list[list[Detection]]:
        images = check_images(images, self.name)
        return [found for part in self.in_chunks(self._detect_chunk, images, names) for found in part]

    def _detect_chunk(self, images: torch.Tensor, names: Sequence[Sequence[str]]) -> list[list[Detection]]:
        """The detections of one chunk of images, each queried for its names (repeats dropped)."""
        chunk_names = [list(dict.fromkeys(n)) for n in names]
        if not any(chunk_names):
            return [[] for _ in chunk_names]
        logits, boxes = self.raw_outputs(images, [n or [""] for n in chunk_names])
        side = float(max(images.shape[-2:]))
        return [self._detections(*found, side) for found in zip(chunk_names, logits, boxes)]

    def _detections(self, names: list[str], logits: torch.Tensor, boxes: torch.Tensor, side: float) -> list[Detection]:
        if not names:
            return []
        scores, labels = torch.sigmoid(logits[:, : len(names)]).max(dim=-1)
        corners = torch.cat([boxes[:, :2] - boxes[:, 2:] / 2, boxes[:, :2] + boxes[:, 2:] / 2], dim=-1) * side
        found = [
            Detection(names[int(label)], float(score), tuple(float(c) for c in corner))  # type: ignore[arg-type]
            for score, label, corner in zip(scores, labels, corners)
            if score > self.score_threshold
        ]
        found.sort(key=lambda d: -d.score)
        return nms(found, self.nms_iou) if self.nms_iou is not None else found


# ----------------------------------------------------------------------------- the rewards


class DetectionScore:
    """Base of the rewards scored from ``detector``'s boxes of the objects each prompt asks for.

    A subclass says what a prompt (and its metadata) asks for (:meth:`target`), which object names that
    queries (:meth:`names`) and what one image scores given its detections (:meth:`image_score`).
    """

    def __init__(self, detector: Detector):
        self.detector = detector

    def target(self, prompt: str, metadata: Mapping[str, Any]) -> Any:
        raise NotImplementedError

    def names(self, target: Any) -> list[str]:
        raise NotImplementedError

    def image_score(self, image: torch.Tensor, detections: Sequence[Detection], target: Any, prompt: str) -> float:
        raise NotImplementedError

    def __call__(
        self, images: torch.Tensor, prompts: Sequence[str], metadata: Sequence[Mapping[str, Any]]
    ) -> torch.Tensor:
        targets = [self.target(prompt, meta) for prompt, meta in zip(prompts, metadata)]
        detections = self.detector(images, [self.names(target) for target in targets])
        scores = [self.image_score(*item) for item in zip(images, detections, targets, prompts)]
        return torch.tensor(scores, dtype=torch.float32)


class SpatialScore(DetectionScore):
    """Callable reward: T2I-CompBench's 2D-spatial formula over ``detector``'s boxes."""

    def __init__(self, detector: Detector, iou_threshold: float = 0.1, distance_threshold: float = 150.0):
        super().__init__(detector)
        self.iou_threshold = iou_threshold
        self.distance_threshold = distance_threshold

    def target(self, prompt: str, metadata: Mapping[str, Any]) -> tuple[str, str] | None:
        return spatial_objects(prompt)

    def names(self, target: tuple[str, str] | None) -> list[str]:
        return list(target) if target else []

    def image_score(
        self, image: torch.Tensor, detections: Sequence[Detection], target: tuple[str, str] | None, prompt: str
    ) -> float:
        if not target:
            return 0.0
        size = (int(image.shape[-2]), int(image.shape[-1]))
        relation = spatial_relation(prompt)
        return spatial_score(detections, *target, relation, size, self.iou_threshold, self.distance_threshold)


class NumeracyScore(DetectionScore):
    """Callable reward: T2I-CompBench's numeracy formula over ``detector``'s boxes."""

    def target(self, prompt: str, metadata: Mapping[str, Any]) -> list[tuple[str, int]]:
        return counted_objects(prompt)

    def names(self, target: list[tuple[str, int]]) -> list[str]:
        return [name for name, _ in target]

    def image_score(
        self, image: torch.Tensor, detections: Sequence[Detection], target: list[tuple[str, int]], prompt: str
    ) -> float:
        return numeracy_score(detections, target)


def _register_owl_reward(name: str, description: str) -> Any:
    """``register_reward`` for a reward over :class:`OwlDetector` (its weights, its check)."""
    needs = f"Owlv2ForObjectDetection weights (default '{DEFAULT_MODEL}'; option model=<folder or Hub id>)"
    return register_reward(
        name, description=description, needs=needs, extras=("transformers",), check=weights_check(DEFAULT_MODEL)
    )


@_register_owl_reward(
    "spatial",
    description="T2I-CompBench 2D-spatial formula (0.25 s1 + 0.25 s2 + 0.5 pos, < 0.5 -> 0) over OWLv2 boxes",
)
def spatial(
    model: str = DEFAULT_MODEL,
    device: str = "cpu",
    dtype: Any = "float32",
    batch_size: int = 8,
    score_threshold: float = 0.1,
    nms_iou: float | None = 0.5,
    template: str = "a photo of a {}",
    iou_threshold: float = 0.1,
    distance_threshold: float = 150.0,
) -> SpatialScore:
    detector = OwlDetector(model, device, dtype, batch_size, score_threshold, nms_iou, template, name="spatial")
    return SpatialScore(detector, iou_threshold, distance_threshold)


@_register_owl_reward(
    "numeracy",
    description="T2I-CompBench numeracy formula (+0.5 found, +0.5 right count, mean over objects) over OWLv2 boxes",
)
def numeracy(
    model: str = DEFAULT_MODEL,
    device: str = "cpu",
    dtype: Any = "float32",
    batch_size: int = 8,
    score_threshold: float = 0.1,
    nms_iou: float | None = 0.5,
    template: str = "a photo of a {}",
) -> NumeracyScore:
    return NumeracyScore(OwlDetector(model, device, dtype, batch_size, score_threshold, nms_iou, template, "numeracy"))

