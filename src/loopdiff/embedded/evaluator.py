"""The held-out evaluator of the embedded world: analytic measurement from pixels, no learned weights.

It shares nothing with the training rewards (:mod:`loopdiff.embedded.rewards`, :mod:`.scorers`):

1. foreground = pixels far from the background colour (the median of the image border);
2. objects = 4-connected foreground components of at least ``MIN_AREA`` pixels;
3. colour = majority vote of the interior pixels, each assigned to the palette colour whose
   brightness ray (from the pattern tone to the full colour) passes nearest to it;
4. texture = statistics of each interior pixel's brightness relative to that colour: no contrast
   -> plain, variance explained by row means only -> striped, by row and column means -> dotted,
   by neither -> checkered;
5. shape = the world shape whose mask, scaled to the component's box, has the highest IoU with it.

Scores per category follow T2I-CompBench's formulas (docs/method.md, "Tasks and rewards") with detections
in place of BLIP-VQA / UniDet: color, shape, texture: product over the prompt's objects of "an object with all
named attributes exists"; spatial: 0.25 s1 + 0.25 s2 + 0.5 pos (s = 1 when found), below 0.5 -> 0;
numeracy: per object +0.5 found, +0.5 right count, mean; complex: the attribute score, averaged with
the spatial score when the prompt has a relation.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from loopdiff.embedded.prompts import (
    CATEGORIES,
    ObjectSpec,
    WorldPrompt,
    numeracy_score,
    parse_prompt,
    relation_holds,
    world_category,
)
from loopdiff.embedded.world import COLORS, IMAGE_SIZE, PATTERN_BRIGHTNESS, SHAPES, shape_mask
from loopdiff.rewards.base import PromptRequirement, RewardError, register_reward

# The prompts the world-prompt rewards can score (checked before a run loads its model).
WORLD_PROMPTS = PromptRequirement(parse_prompt, kind="embedded-world prompts", hint="embedded:<category> prompts")

FOREGROUND_DISTANCE = 45.0  # RGB distance (0-255) from the background that marks a foreground pixel
MIN_AREA = 20  # smaller components are noise
_PALETTE = np.array(list(COLORS.values()), dtype=np.float64)
_COLOR_NAMES = tuple(COLORS)


@dataclass(frozen=True)
class DetectedObject:
    """An object measured in an image: attributes, box ``(x0, y0, x1, y1)`` (exclusive) and area."""

    shape: str
    color: str
    texture: str
    box: tuple[int, int, int, int]
    area: int

    @property
    def center(self) -> tuple[float, float]:
        return (self.box[0] + self.box[2]) / 2, (self.box[1] + self.box[3]) / 2


# ----------------------------------------------------------------------------- segmentation


def _shifted_min(labels: np.ndarray, big: int) -> np.ndarray:
    """Elementwise min of ``labels`` and its 4 neighbours (``big`` outside the image)."""
    padded = np.pad(labels, ((0, 0), (1, 1), (1, 1)), constant_values=big)
    return np.minimum.reduce(
        [labels, padded[:, :-2, 1:-1], padded[:, 2:, 1:-1], padded[:, 1:-1, :-2], padded[:, 1:-1, 2:]]
    )


def connected_components(masks: np.ndarray) -> np.ndarray:
    """Labels of the 4-connected components of boolean ``(N, H, W)`` masks (0 = background).

    Labels are arbitrary positive integers, unique across the batch.
    """
    n, h, w = masks.shape
    big = n * h * w + 1
    labels = np.where(masks, np.arange(1, n * h * w + 1).reshape(n, h, w), big)
    while True:
        new = np.where(masks, _shifted_min(labels, big), big)
        flat = np.concatenate([[big], new.reshape(-1)])  # pointer jumping: a label is a flat index + 1
        new = np.where(masks, np.minimum(new, flat[np.minimum(new, big - 1)]), big)
        if np.array_equal(new, labels):
            return np.where(masks, labels, 0)
        labels = new


def erode(mask: np.ndarray) -> np.ndarray:
    """4-neighbour binary erosion of a 2-D mask (outside counts as background)."""
    padded = np.pad(mask, 1, constant_values=False)
    return mask & padded[:-2, 1:-1] & padded[2:, 1:-1] & padded[1:-1, :-2] & padded[1:-1, 2:]


def dilate(mask: np.ndarray) -> np.ndarray:
    """4-neighbour binary dilation of a 2-D mask."""
    padded = np.pad(mask, 1, constant_values=False)
    return mask | padded[:-2, 1:-1] | padded[2:, 1:-1] | padded[1:-1, :-2] | padded[1:-1, 2:]


def background_color(image: np.ndarray) -> np.ndarray:
    """Median colour of the 2-pixel image border: ``(3,)``."""
    border = np.concatenate(
        [image[:2].reshape(-1, 3), image[-2:].reshape(-1, 3), image[:, :2].reshape(-1, 3), image[:, -2:].reshape(-1, 3)]
    )
    return np.median(border, axis=0)


# ----------------------------------------------------------------------------- attributes


def _ray_fit(pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For ``(P, 3)`` pixels: distance to each colour's brightness ray ``(P, C)`` and relative brightness."""
    norms = (_PALETTE**2).sum(axis=1)
    alpha = pixels @ _PALETTE.T / norms  # (P, C)
    clipped = np.clip(alpha, PATTERN_BRIGHTNESS * 0.8, 1.1)
    residual = pixels[:, None, :] - clipped[..., None] * _PALETTE[None]
    return np.linalg.norm(residual, axis=2), alpha


def classify_color(pixels: np.ndarray) -> tuple[str, np.ndarray]:
    """Majority colour of ``(P, 3)`` pixels and each pixel's brightness relative to it."""
    distance, alpha = _ray_fit(pixels)
    votes = np.bincount(distance.argmin(axis=1), minlength=len(_COLOR_NAMES))
    best = int(votes.argmax())
    return _COLOR_NAMES[best], alpha[:, best]


def _explained_by(groups: np.ndarray, values: np.ndarray) -> float:
    """Fraction of the variance of ``values`` explained by their means within ``groups``."""
    _, inverse, counts = np.unique(groups, return_inverse=True, return_counts=True)
    means = np.bincount(inverse, weights=values) / counts
    return float(np.var(means[inverse]) / max(np.var(values), 1e-9))


def _neighbour_covariance(values: np.ndarray, rows: np.ndarray, cols: np.ndarray) -> float:
    """Mean product of deviations over horizontally and vertically adjacent pixels.

    Pixel noise is uncorrelated between neighbours and averages out; a pattern with a period of
    several pixels keeps most of its variance here.
    """
    grid = np.full((rows.max() + 2, cols.max() + 2), np.nan)
    grid[rows, cols] = values - values.mean()
    products = [grid[:-1, :] * grid[1:, :], grid[:, :-1] * grid[:, 1:]]
    both = np.concatenate([p[~np.isnan(p)] for p in products])
    return float(both.mean()) if both.size else 0.0


def texture_features(brightness: np.ndarray, rows: np.ndarray, cols: np.ndarray) -> tuple[float, float, float]:
    """(contrast, row-explained, column-explained) of interior pixels' relative brightness.

    Brightness is normalised by its 90th percentile (the object's own full tone). Contrast is the
    square root of its neighbour covariance (pattern, not noise); the other two are the fractions
    of its variance explained by the row means and by the column means: stripes vary by row only,
    dots by both, checks by neither.
    """
    relative = brightness / max(np.percentile(brightness, 90), 1e-6)
    contrast = np.sqrt(max(_neighbour_covariance(relative, rows, cols), 0.0))
    return float(contrast), _explained_by(rows, relative), _explained_by(cols, relative)


def classify_texture(brightness: np.ndarray, rows: np.ndarray, cols: np.ndarray) -> str:
    """Texture of an object from its interior pixels' relative brightness and positions."""
    if brightness.size < 4:
        return "plain"
    contrast, by_row, by_col = texture_features(brightness, rows, cols)
    if contrast < 0.034:
        return "plain"
    if by_row > 0.5 and by_row > 3 * by_col:
        return "striped"
    return "dotted" if by_row + by_col > 0.45 else "checkered"


def _mask_bbox(mask: np.ndarray) -> tuple[int, int, int, int]:
    ys, xs = np.nonzero(mask)
    return int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1


def _place(template: np.ndarray, center: tuple[float, float], image_size: int) -> np.ndarray:
    """``template`` with its own bounding-box centre at ``center``, in an empty image."""
    x0, y0, x1, y1 = _mask_bbox(template)
    left = int(round(center[0] - (x0 + x1) / 2))
    top = int(round(center[1] - (y0 + y1) / 2))
    side = template.shape[0]
    canvas = np.zeros((image_size + 2 * side, image_size + 2 * side), dtype=bool)
    canvas[top + side : top + 2 * side, left + side : left + 2 * side] = template
    return canvas[side:-side, side:-side]


def classify_shape(mask: np.ndarray) -> str:
    """The world shape whose template, scaled to the component's box, best overlaps (IoU) ``mask``."""
    x0, y0, x1, y1 = _mask_bbox(mask)
    extent = max(x1 - x0, y1 - y0)
    center = ((x0 + x1) / 2, (y0 + y1) / 2)
    best, best_iou = SHAPES[0], -1.0
    for shape in SHAPES:
        for size in range(max(extent - 1, 4), extent + 2):
            template = _place(shape_mask(shape, size), center, mask.shape[0])
            iou = (template & mask).sum() / max((template | mask).sum(), 1)
            if iou > best_iou:
                best, best_iou = shape, iou
    return best


# ----------------------------------------------------------------------------- detection


def _object_mask(image: np.ndarray, component: np.ndarray, background: np.ndarray) -> np.ndarray:
    """The component re-thresholded at half its own contrast (sharper edges under blur)."""
    distance = np.linalg.norm(image - background, axis=2)
    core = erode(component)
    contrast = np.percentile(distance[core if core.sum() >= 4 else component], 20)
    mask = dilate(component) & (distance > 0.5 * contrast)
    return mask if mask.sum() >= MIN_AREA else component


def detect_objects(image: np.ndarray) -> list[DetectedObject]:
    """Objects in one ``(H, W, 3)`` image with values in 0..255 (float or uint8)."""
    return detect_objects_batch(image[None])[0]


def detect_objects_batch(images: np.ndarray) -> list[list[DetectedObject]]:
    """Objects in each of ``(N, H, W, 3)`` images with values in 0..255."""
    images = images.astype(np.float64)
    backgrounds = np.stack([background_color(image) for image in images])
    foreground = np.linalg.norm(images - backgrounds[:, None, None, :], axis=3) > FOREGROUND_DISTANCE
    labels = connected_components(foreground)
    found: list[list[DetectedObject]] = []
    for index, image in enumerate(images):
        objects = []
        ids, areas = np.unique(labels[index][labels[index] > 0], return_counts=True)
        for label, area in zip(ids, areas):
            if area < MIN_AREA:
                continue
            component = labels[index] == label
            objects.append(_measure(image, component, backgrounds[index]))
        found.append(objects)
    return found


def _measure(image: np.ndarray, component: np.ndarray, background: np.ndarray) -> DetectedObject:
    mask = _object_mask(image, component, background)
    interior = erode(mask)
    if interior.sum() < 6:
        interior = mask
    color, brightness = classify_color(image[interior])
    rows, cols = np.nonzero(interior)
    return DetectedObject(
        shape=classify_shape(mask),
        color=color,
        texture=classify_texture(brightness, rows, cols),
        box=_mask_bbox(mask),
        area=int(mask.sum()),
    )


# ----------------------------------------------------------------------------- scores


def _attribute_fraction(spec: ObjectSpec, obj: DetectedObject) -> float:
    named = [(spec.shape, obj.shape), (spec.color, obj.color), (spec.texture, obj.texture)]
    asked = [(want, got) for want, got in named if want is not None]
    return sum(want == got for want, got in asked) / len(asked) if asked else 1.0


def attribute_score(prompt: WorldPrompt, objects: Sequence[DetectedObject], graded: bool = False) -> float:
    """Product over the prompt's objects of whether a matching object exists.

    ``graded``: each factor is instead the largest fraction of the named attributes one object has.
    """
    score = 1.0
    for spec in prompt.objects:
        if graded:
            score *= max((_attribute_fraction(spec, obj) for obj in objects), default=0.0)
        else:
            score *= float(any(spec.matches(obj) for obj in objects))
    return score


def spatial_score(prompt: WorldPrompt, objects: Sequence[DetectedObject], image_size: int = IMAGE_SIZE) -> float:
    """0.25 s1 + 0.25 s2 + 0.5 pos with s = 1 for a found object; 0.25 for one found; below 0.5 -> 0."""
    if prompt.relation is None:
        raise ValueError(f"prompt {prompt.text!r} has no spatial relation")
    first, last = prompt.objects[0], prompt.objects[-1]
    ones = [o for o in objects if first.matches(o)]
    twos = [o for o in objects if last.matches(o)]
    if ones and twos:
        pairs = [(a, b) for a in ones for b in twos if a is not b]
        pos = float(any(relation_holds(prompt.relation, a.box, b.box, image_size) for a, b in pairs))
        score = 0.25 + 0.25 + 0.5 * pos if pairs else 0.25
    else:
        score = 0.25 if ones or twos else 0.0
    return score if score >= 0.5 else 0.0


def score_objects(
    prompt: WorldPrompt,
    objects: Sequence[DetectedObject],
    category: str | None = None,
    graded: bool = False,
    image_size: int = IMAGE_SIZE,
) -> float:
    """The category's T2I-CompBench-shaped score of one image's detected objects."""
    category = category or prompt.category
    if category not in CATEGORIES:
        raise ValueError(f"unknown category {category!r}; expected one of {CATEGORIES}")
    if category == "numeracy":
        return numeracy_score(prompt, objects)
    if category == "spatial":
        return spatial_score(prompt, objects, image_size)
    attributes = attribute_score(prompt, objects, graded)
    if category == "complex" and prompt.relation is not None:
        return 0.5 * (attributes + spatial_score(prompt, objects, image_size))
    return attributes


def to_pixels(images: torch.Tensor, image_size: int = IMAGE_SIZE) -> np.ndarray:
    """``(N, 3, H, W)`` in [0, 1] (any device/size) -> ``(N, S, S, 3)`` float64 in 0..255."""
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"images must be (N, 3, H, W), got shape {tuple(images.shape)}")
    images = images.detach().float().cpu().clamp(0, 1)
    if images.shape[-2:] != (image_size, image_size):
        images = F.interpolate(images, size=(image_size, image_size), mode="area" if images.shape[-1] > image_size else "bilinear")
    return images.permute(0, 2, 3, 1).numpy().astype(np.float64) * 255.0


def _parse_world_prompt(text: str) -> WorldPrompt:
    """:func:`parse_prompt`, raising RewardError (a user error) for a prompt of another world."""
    try:
        return parse_prompt(text)
    except ValueError as error:
        raise RewardError(f"the embedded evaluator scores embedded-world prompts only: {error}") from None


class HeldOutEvaluator:
    """Held-out scores in [0, 1] of images for world prompts (see the module docstring)."""

    def __init__(self, graded: bool = False, image_size: int = IMAGE_SIZE):
        self.graded = graded
        self.image_size = image_size

    def detect(self, images: torch.Tensor) -> list[list[DetectedObject]]:
        """The objects measured in each image of ``(N, 3, H, W)`` in [0, 1]."""
        return detect_objects_batch(to_pixels(images, self.image_size))

    def score(
        self,
        images: torch.Tensor,
        prompts: Sequence[str],
        metadata: Sequence[Mapping[str, Any]] | None = None,
    ) -> torch.Tensor:
        """Scores ``(N,)`` float32; the category is ``metadata[i]["category"]`` or the parsed prompt's."""
        if len(prompts) != images.shape[0]:
            raise ValueError(f"got {images.shape[0]} images for {len(prompts)} prompts")
        parsed = [_parse_world_prompt(p) for p in prompts]
        detections = self.detect(images)
        scores = []
        for i, (prompt, objects) in enumerate(zip(parsed, detections)):
            category = world_category(prompt, metadata[i].get("category") if metadata else None)
            scores.append(score_objects(prompt, objects, category, self.graded, self.image_size))
        return torch.tensor(scores, dtype=torch.float32)

    def __call__(
        self, images: torch.Tensor, prompts: Sequence[str], metadata: Sequence[Mapping[str, Any]]
    ) -> torch.Tensor:
        return self.score(images, prompts, metadata)


@register_reward(
    "embedded_eval",
    description="held-out analytic evaluator of the embedded world (T2I-CompBench formulas over measured objects)",
    prompts=WORLD_PROMPTS,
)
def embedded_eval(graded: bool = False) -> HeldOutEvaluator:
    return HeldOutEvaluator(graded=graded)


@register_reward(
    "embedded_eval_graded",
    description="the held-out evaluator with partial credit: per object the fraction of named attributes matched",
    prompts=WORLD_PROMPTS,
)
def embedded_eval_graded() -> HeldOutEvaluator:
    return HeldOutEvaluator(graded=True)


# ----------------------------------------------------------------------------- accuracy report


def degrade(images: np.ndarray, rng: np.random.Generator, blur_sigma: float = 0.8, noise_std: float = 8.0) -> np.ndarray:
    """Gaussian blur (sigma in pixels) and Gaussian noise (std in 0..255 units) on ``(N, H, W, 3)``."""
    out = images.astype(np.float64)
    if blur_sigma > 0:
        radius = max(1, int(np.ceil(3 * blur_sigma)))
        taps = np.exp(-0.5 * (np.arange(-radius, radius + 1) / blur_sigma) ** 2)
        taps /= taps.sum()
        for axis in (1, 2):
            padded = np.pad(out, [(0, 0)] + [(radius, radius) if a == axis else (0, 0) for a in (1, 2)] + [(0, 0)], mode="edge")
            out = sum(w * np.take(padded, range(k, k + out.shape[axis]), axis=axis) for k, w in enumerate(taps))
    out = out + rng.normal(0.0, noise_std, out.shape)
    return np.clip(out, 0, 255)


def attribute_accuracy(
    n_scenes: int = 300, seed: int = 0, blur_sigma: float = 0.0, noise_std: float = 0.0
) -> dict[str, float]:
    """Per-attribute accuracy of the evaluator on fresh renders of random prompts (optionally degraded).

    An object counts as found when a detected box centre lies within 3 px of its centre; colour,
    shape and texture accuracies are over all rendered objects (a missed object counts as wrong);
    ``count`` is the fraction of images with the right number of objects.
    """
    from loopdiff.embedded.prompts import generate_prompt, scene_for_prompt
    from loopdiff.embedded.world import render

    rng = np.random.default_rng(seed)
    scenes = [scene_for_prompt(generate_prompt(rng, CATEGORIES[i % len(CATEGORIES)]), rng) for i in range(n_scenes)]
    images = np.stack([render(s) for s in scenes]).astype(np.float64)
    if blur_sigma > 0 or noise_std > 0:
        images = degrade(images, rng, blur_sigma, noise_std)
    detections = detect_objects_batch(images)
    hits = {"found": 0, "color": 0, "shape": 0, "texture": 0, "position": 0}
    total, right_counts = 0, 0
    for scene, found in zip(scenes, detections):
        right_counts += len(found) == len(scene.objects)
        for obj in scene.objects:
            total += 1
            near = [d for d in found if max(abs(d.center[0] - obj.x), abs(d.center[1] - obj.y)) <= 3]
            if not near:
                continue
            d = near[0]
            hits["found"] += 1
            hits["color"] += d.color == obj.color
            hits["shape"] += d.shape == obj.shape
            hits["texture"] += d.texture == obj.texture
            hits["position"] += max(abs(d.center[0] - obj.x), abs(d.center[1] - obj.y)) <= 1.5
    report = {name: value / total for name, value in hits.items()}
    report["count"] = right_counts / n_scenes
    return report


if __name__ == "__main__":  # python -m loopdiff.embedded.evaluator
    for label, blur, noise in (("clean", 0.0, 0.0), ("blur 0.8 + noise 8", 0.8, 8.0), ("blur 1.2 + noise 15", 1.2, 15.0)):
        print(label, {k: round(v, 4) for k, v in attribute_accuracy(600, 1, blur, noise).items()})
