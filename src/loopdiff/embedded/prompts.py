"""T2I-CompBench-style prompts for the embedded world: generate, parse, and build matching scenes.

Categories and phrasings (as in T2I-CompBench, with the world's shapes as the nouns):

- ``color``: "a red circle and a blue square"
- ``shape``: "a hexagon and a star" (two or three shapes)
- ``texture``: "a striped triangle and a dotted star"
- ``spatial``: "a green star on the left of a yellow hexagon" (also "on the right of", "on the top of",
  "on the bottom of", "next to")
- ``numeracy``: "three purple triangles", "two stars and one circle" (one to four objects in all)
- ``complex``: attributes of two kinds bound to one object, with or without a relation:
  "a dotted red star on the left of a blue square"

:func:`parse_prompt` inverts :func:`generate_prompt`; :func:`scene_for_prompt` draws a random scene
that satisfies a prompt. Shipped prompt files (``assets/prompts/{category}_{train,val}.txt``) are
made by :func:`build_prompt_files`; validation prompts include attribute-object combinations that
no training prompt contains (T2I-CompBench's unseen split).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from importlib import resources
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

from loopdiff.embedded.world import COLORS, IMAGE_SIZE, SHAPES, TEXTURES, Scene, WorldObject

CATEGORIES = ("color", "shape", "texture", "spatial", "numeracy", "complex")
SPLITS = ("train", "val")
# Canonical relation name -> T2I-CompBench wording.
RELATIONS = {
    "left": "on the left of",
    "right": "on the right of",
    "above": "on the top of",
    "below": "on the bottom of",
    "next to": "next to",
}
NUMBER_WORDS = ("one", "two", "three", "four")
MAX_OBJECTS = 4
SIZE_RANGE = (20, 30)  # smaller objects lose their corners at 16x16 latents (hexagons read as circles)
MIN_GAP = 3  # pixels between object boxes, so objects stay apart after blurring
RELATION_MARGIN = 3  # pixels of slack with which generated scenes satisfy their relation
NEXT_TO_DISTANCE = 0.45  # "next to": centres within this fraction of the image (Chebyshev)
RELATION_IOU = 0.1  # boxes overlapping more than this satisfy no directional relation
_PLURALS = {shape: shape + ("es" if shape.endswith(("s", "x")) else "s") for shape in SHAPES}
_SINGULARS = {plural: shape for shape, plural in _PLURALS.items()}


@dataclass(frozen=True)
class ObjectSpec:
    """What a prompt asks of one kind of object; ``None`` attributes are unconstrained."""

    shape: str | None
    color: str | None = None
    texture: str | None = None
    count: int = 1

    def __post_init__(self) -> None:
        if self.shape is not None and self.shape not in SHAPES:
            raise ValueError(f"unknown shape {self.shape!r}; expected one of {SHAPES}")
        if self.color is not None and self.color not in COLORS:
            raise ValueError(f"unknown color {self.color!r}; expected one of {tuple(COLORS)}")
        if self.texture is not None and self.texture not in TEXTURES:
            raise ValueError(f"unknown texture {self.texture!r}; expected one of {TEXTURES}")
        if not 1 <= self.count <= MAX_OBJECTS:
            raise ValueError(f"object count {self.count} is outside [1, {MAX_OBJECTS}]")

    def phrase(self, numeral: bool = False) -> str:
        """The noun phrase: "a striped red circle", or with ``numeral`` "two red circles"."""
        noun = self.shape or "shape"
        if self.count > 1:
            noun = _PLURALS.get(noun, noun + "s")
        words = [w for w in (self.texture, self.color, noun) if w]
        if numeral or self.count > 1:
            return " ".join([NUMBER_WORDS[self.count - 1], *words])
        article = "an" if words[0][0] in "aeiou" else "a"
        return " ".join([article, *words])

    def matches(self, obj: WorldObject | Any) -> bool:
        """Whether ``obj`` (anything with ``shape``, ``color``, ``texture``) has every attribute named."""
        return (
            (self.shape is None or obj.shape == self.shape)
            and (self.color is None or obj.color == self.color)
            and (self.texture is None or obj.texture == self.texture)
        )


@dataclass(frozen=True)
class WorldPrompt:
    """A world prompt: its text, category, object requirements and (optional) relation.

    With a relation the prompt has two objects and asks ``objects[0] <relation> objects[1]``.
    """

    text: str
    category: str
    objects: tuple[ObjectSpec, ...]
    relation: str | None = None


# ----------------------------------------------------------------------------- geometry


def box_iou(a: tuple[float, float, float, float], b: tuple[float, float, float, float]) -> float:
    """Intersection over union of two ``(x0, y0, x1, y1)`` boxes."""
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def relation_holds(
    relation: str,
    box_a: tuple[float, float, float, float],
    box_b: tuple[float, float, float, float],
    image_size: int = IMAGE_SIZE,
    margin: float = 0.0,
) -> bool:
    """Whether box A is ``relation`` box B, by T2I-CompBench's rule on box centres and IoU.

    left/right/above/below: the centre offset along that axis has the right sign and is larger
    than the offset along the other axis, and IoU < 0.1. "next to": both centres within
    ``NEXT_TO_DISTANCE * image_size`` of each other (Chebyshev) and IoU < 0.1. A positive
    ``margin`` (pixels) demands that much slack, so that slightly different boxes agree.
    """
    if relation not in RELATIONS:
        raise ValueError(f"unknown relation {relation!r}; expected one of {tuple(RELATIONS)}")
    dx = (box_b[0] + box_b[2]) / 2 - (box_a[0] + box_a[2]) / 2
    dy = (box_b[1] + box_b[3]) / 2 - (box_a[1] + box_a[3]) / 2
    if box_iou(box_a, box_b) >= RELATION_IOU:
        return False
    if relation == "next to":
        return max(abs(dx), abs(dy)) < NEXT_TO_DISTANCE * image_size - margin
    if relation in ("left", "right"):
        return abs(dx) > abs(dy) + margin and (dx > 0 if relation == "left" else dx < 0)
    return abs(dy) > abs(dx) + margin and (dy > 0 if relation == "above" else dy < 0)


def numeracy_score(prompt: WorldPrompt, objects: Sequence[Any]) -> float:
    """T2I-CompBench's numeracy score of found ``objects`` (anything with shape, color, texture).

    Per object of the prompt: +0.5 if one matches, +0.5 more if exactly the asked number match; mean.
    """
    total = 0.0
    for spec in prompt.objects:
        found = sum(spec.matches(o) for o in objects)
        total += 0.5 * (found > 0) + 0.5 * (found == spec.count)
    return total / len(prompt.objects)


# ----------------------------------------------------------------------------- text


def prompt_text(objects: Iterable[ObjectSpec], relation: str | None = None, numeral: bool = False) -> str:
    """Join object phrases T2I-CompBench-style: "A and B", "A, B and C", or "A <relation> B"."""
    phrases = [spec.phrase(numeral) for spec in objects]
    if relation is not None:
        if len(phrases) != 2:
            raise ValueError(f"a relation joins exactly two objects, got {len(phrases)}")
        return f"{phrases[0]} {RELATIONS[relation]} {phrases[1]}"
    if len(phrases) == 1:
        return phrases[0]
    return ", ".join(phrases[:-1]) + " and " + phrases[-1]


def _parse_phrase(words: list[str], text: str) -> tuple[ObjectSpec, bool]:
    """One noun phrase -> (spec, written with a numeral)."""
    if len(words) < 2:
        raise ValueError(f"cannot parse world prompt {text!r}: phrase {' '.join(words)!r} is too short")
    head, *adjectives, noun = words
    if head in ("a", "an"):
        count, numeral = 1, False
    elif head in NUMBER_WORDS:
        count, numeral = NUMBER_WORDS.index(head) + 1, True
    else:
        raise ValueError(f"cannot parse world prompt {text!r}: phrase must start with a/an/one..four, got {head!r}")
    shape = _SINGULARS.get(noun, noun)
    if shape not in SHAPES:
        raise ValueError(f"cannot parse world prompt {text!r}: unknown shape {noun!r}")
    if (count > 1) != (noun in _SINGULARS):
        raise ValueError(f"cannot parse world prompt {text!r}: count {head!r} disagrees with {noun!r}")
    color = texture = None
    for word in adjectives:
        if word in COLORS and color is None:
            color = word
        elif word in TEXTURES and texture is None:
            texture = word
        else:
            raise ValueError(f"cannot parse world prompt {text!r}: unexpected word {word!r}")
    return ObjectSpec(shape, color, texture, count), numeral


def _split_phrases(text: str) -> tuple[list[str], str | None]:
    """The phrase texts and relation of a normalised prompt."""
    for relation, wording in RELATIONS.items():
        left, sep, right = text.partition(f" {wording} ")
        if sep:
            return [left, right], relation
    parts = [p.strip() for chunk in text.split(" and ") for p in chunk.split(",")]
    return [p for p in parts if p], None


def _infer_category(specs: tuple[ObjectSpec, ...], relation: str | None, numeral: bool) -> str:
    has_color = [s.color is not None for s in specs]
    has_texture = [s.texture is not None for s in specs]
    if numeral:
        return "numeracy"
    if any(c and t for c, t in zip(has_color, has_texture)) or (any(has_color) and any(has_texture)):
        return "complex"
    if relation is not None:
        return "spatial" if all(has_color) or not any(has_texture) else "complex"
    if all(has_color):
        return "color"
    if all(has_texture):
        return "texture"
    if not any(has_color) and not any(has_texture):
        return "shape"
    return "complex"


def parse_prompt(text: str) -> WorldPrompt:
    """Parse a world prompt (any category) into its requirements; raises ``ValueError`` otherwise."""
    normal = " ".join(text.lower().strip().rstrip(".").split())
    if not normal:
        raise ValueError("cannot parse an empty world prompt")
    phrase_texts, relation = _split_phrases(normal)
    parsed = [_parse_phrase(p.split(), text) for p in phrase_texts]
    specs = tuple(spec for spec, _ in parsed)
    if len(specs) > MAX_OBJECTS or sum(s.count for s in specs) > MAX_OBJECTS:
        raise ValueError(f"world prompt {text!r} asks for more than {MAX_OBJECTS} objects")
    numeral = any(n for _, n in parsed)
    return WorldPrompt(text, _infer_category(specs, relation, numeral), specs, relation)


def world_category(prompt: WorldPrompt, hint: Any = None) -> str:
    """``hint`` (e.g. a prompt file's category) when it is a world category that fits the prompt, else the
    prompt's own: a file named ``my_train.txt`` names no category, and ``spatial`` needs a relation."""
    if hint in CATEGORIES and (hint != "spatial" or prompt.relation is not None):
        return str(hint)
    return prompt.category


def is_world_prompt(text: str) -> bool:
    """Whether ``text`` parses as a world prompt."""
    try:
        parse_prompt(text)
    except ValueError:
        return False
    return True


# ----------------------------------------------------------------------------- generation


def _pick(rng: np.random.Generator, options: Iterable[str], k: int) -> list[str]:
    options = list(options)
    return [options[i] for i in rng.choice(len(options), size=k, replace=False)]


def _complex_specs(rng: np.random.Generator) -> tuple[ObjectSpec, ObjectSpec]:
    shapes = _pick(rng, SHAPES, 2)
    colors = _pick(rng, COLORS, 2)
    textures = _pick(rng, TEXTURES, 2)
    # The first object carries both a colour and a texture; the second one or both.
    kinds = [("color", "texture"), [("color", "texture"), ("color",), ("texture",)][rng.integers(3)]]
    specs = []
    for i, kind in enumerate(kinds):
        specs.append(
            ObjectSpec(
                shapes[i],
                colors[i] if "color" in kind else None,
                textures[i] if "texture" in kind else None,
            )
        )
    if rng.random() < 0.5:
        specs.reverse()
    return specs[0], specs[1]


def _numeracy_specs(rng: np.random.Generator) -> tuple[ObjectSpec, ...]:
    groups = 1 if rng.random() < 0.5 else 2
    total = int(rng.integers(groups, MAX_OBJECTS + 1))
    counts = [total] if groups == 1 else [int(rng.integers(1, total)), 0]
    if groups == 2:
        counts[1] = total - counts[0]
    shapes = _pick(rng, SHAPES, groups)
    colors = _pick(rng, COLORS, groups) if rng.random() < 0.5 else [None] * groups
    return tuple(ObjectSpec(s, c, None, n) for s, c, n in zip(shapes, colors, counts))


def _specs_for(rng: np.random.Generator, category: str) -> tuple[tuple[ObjectSpec, ...], str | None]:
    if category == "color":
        return tuple(ObjectSpec(s, c) for s, c in zip(_pick(rng, SHAPES, 2), _pick(rng, COLORS, 2))), None
    if category == "shape":
        return tuple(ObjectSpec(s) for s in _pick(rng, SHAPES, 2 if rng.random() < 0.6 else 3)), None
    if category == "texture":
        pairs = zip(_pick(rng, SHAPES, 2), _pick(rng, TEXTURES, 2))
        return tuple(ObjectSpec(s, None, t) for s, t in pairs), None
    if category == "spatial":
        specs = tuple(ObjectSpec(s, c) for s, c in zip(_pick(rng, SHAPES, 2), _pick(rng, COLORS, 2)))
        return specs, _pick(rng, RELATIONS, 1)[0]
    if category == "numeracy":
        return _numeracy_specs(rng), None
    if category == "complex":
        relation = _pick(rng, RELATIONS, 1)[0] if rng.random() < 0.6 else None
        return _complex_specs(rng), relation
    raise ValueError(f"unknown category {category!r}; expected one of {CATEGORIES}")


def generate_prompt(rng: np.random.Generator, category: str) -> WorldPrompt:
    """A random prompt of ``category`` in T2I-CompBench phrasing."""
    specs, relation = _specs_for(rng, category)
    text = prompt_text(specs, relation, numeral=category == "numeracy")
    return WorldPrompt(text, category, specs, relation)


# ----------------------------------------------------------------------------- scenes


def _sizes(rng: np.random.Generator, n: int) -> list[int]:
    upper = {1: 30, 2: 28, 3: 24, 4: 21}[n]
    return [int(rng.integers(SIZE_RANGE[0], upper + 1)) for _ in range(n)]


def _apart(a: WorldObject, b: WorldObject) -> bool:
    ax0, ay0, ax1, ay1 = a.box
    bx0, by0, bx1, by1 = b.box
    return ax1 + MIN_GAP <= bx0 or bx1 + MIN_GAP <= ax0 or ay1 + MIN_GAP <= by0 or by1 + MIN_GAP <= ay0


def place_objects(
    rng: np.random.Generator,
    attributes: list[tuple[str, str, str]],
    relation: str | None = None,
    image_size: int = IMAGE_SIZE,
    max_tries: int = 400,
) -> Scene:
    """Random sizes and non-overlapping positions for ``(shape, color, texture)`` objects.

    With a ``relation`` the first object is placed ``relation`` the last one, with
    ``RELATION_MARGIN`` pixels of slack (boxes measured from pixels still agree). Sizes shrink if the
    objects do not fit after ``max_tries`` attempts.
    """
    n = len(attributes)
    if not 1 <= n <= MAX_OBJECTS:
        raise ValueError(f"a scene holds 1 to {MAX_OBJECTS} objects, got {n}")
    sizes = _sizes(rng, n)
    while True:
        for _ in range(max_tries):
            objects: list[WorldObject] = []
            for (shape, color, texture), size in zip(attributes, sizes):
                half = size // 2
                x = int(rng.integers(half + 1, image_size - (size - half)))
                y = int(rng.integers(half + 1, image_size - (size - half)))
                obj = WorldObject(shape, color, texture, size, x, y)
                if not all(_apart(obj, other) for other in objects):
                    break
                objects.append(obj)
            else:
                if relation is None or relation_holds(
                    relation, objects[0].box, objects[-1].box, image_size, RELATION_MARGIN
                ):
                    return Scene(tuple(objects), image_size)
        if max(sizes) <= SIZE_RANGE[0] - 4:
            raise RuntimeError(f"cannot place {attributes} with relation {relation!r}")
        sizes = [max(SIZE_RANGE[0] - 4, s - 2) for s in sizes]


def scene_for_prompt(prompt: WorldPrompt, rng: np.random.Generator, image_size: int = IMAGE_SIZE) -> Scene:
    """A random scene satisfying ``prompt``: unnamed attributes, sizes and positions are random."""
    attributes = []
    for spec in prompt.objects:
        for _ in range(spec.count):
            attributes.append(
                (
                    spec.shape or _pick(rng, SHAPES, 1)[0],
                    spec.color or _pick(rng, COLORS, 1)[0],
                    spec.texture or _pick(rng, TEXTURES, 1)[0],
                )
            )
    return place_objects(rng, attributes, prompt.relation, image_size)


def describe_object(obj: WorldObject, rng: np.random.Generator, keep_prob: float = 1.0) -> ObjectSpec:
    """A spec naming ``obj``'s shape and each of its colour and texture with probability ``keep_prob``."""
    color = obj.color if rng.random() < keep_prob else None
    texture = obj.texture if rng.random() < keep_prob else None
    return ObjectSpec(obj.shape, color, texture)


def random_caption_and_scene(
    rng: np.random.Generator,
    *,
    single_object_prob: float = 0.2,
    drop_attribute_prob: float = 0.0,
    image_size: int = IMAGE_SIZE,
) -> tuple[str, Scene]:
    """A (caption, scene) pair for pretraining the base text-to-image model.

    With probability ``single_object_prob`` one object with a caption naming its shape and, each
    with probability 1/2, its colour and texture ("a red circle", "a dotted blue star"); otherwise a
    prompt of a random category with a scene satisfying it. ``drop_attribute_prob`` removes named
    colours/textures from the caption while the scene keeps them (incomplete captions).
    """
    if not 0 <= single_object_prob <= 1 or not 0 <= drop_attribute_prob <= 1:
        raise ValueError(
            f"probabilities must be in [0, 1], got single_object_prob={single_object_prob}, "
            f"drop_attribute_prob={drop_attribute_prob}"
        )
    if rng.random() < single_object_prob:
        scene = place_objects(
            rng, [(_pick(rng, SHAPES, 1)[0], _pick(rng, COLORS, 1)[0], _pick(rng, TEXTURES, 1)[0])],
            image_size=image_size,
        )
        spec = describe_object(scene.objects[0], rng, keep_prob=0.5)
        return prompt_text([spec]), scene
    prompt = generate_prompt(rng, _pick(rng, CATEGORIES, 1)[0])
    scene = scene_for_prompt(prompt, rng, image_size)
    if drop_attribute_prob > 0:
        specs = [
            replace(
                spec,
                color=None if rng.random() < drop_attribute_prob else spec.color,
                texture=None if rng.random() < drop_attribute_prob else spec.texture,
            )
            for spec in prompt.objects
        ]
        return prompt_text(specs, prompt.relation, numeral=prompt.category == "numeracy"), scene
    return prompt.text, scene


# ----------------------------------------------------------------------------- shipped files


def _combinations(prompt: WorldPrompt) -> set[tuple[str, str]]:
    """The attribute-object combinations a prompt names: ("red", "circle"), ("3", "star"), ..."""
    combos: set[tuple[str, str]] = set()
    for spec in prompt.objects:
        shape = spec.shape or "shape"
        for attribute in (spec.color, spec.texture):
            if attribute is not None:
                combos.add((attribute, shape))
        if prompt.category == "numeracy":
            combos.add((str(spec.count), shape))
    if prompt.category == "shape":
        shapes = sorted(spec.shape or "shape" for spec in prompt.objects)
        combos.update((a, b) for i, a in enumerate(shapes) for b in shapes[i + 1 :])
    return combos


def split_prompts(
    category: str, n_train: int = 200, n_val: int = 60, seed: int = 0, unseen_fraction: float | None = None
) -> tuple[list[str], list[str]]:
    """Train and validation prompts of ``category``; half of val uses combinations unseen in train.

    A fraction ``unseen_fraction`` (default 0.2; 0.1 for the 28 shape pairs) of all attribute-object
    combinations is held out: training
    prompts contain none of them; the first half of the validation prompts each contain at least
    one, the second half none (unseen training prompts made of seen combinations).
    """
    if category not in CATEGORIES:
        raise ValueError(f"unknown category {category!r}; expected one of {CATEGORIES}")
    if unseen_fraction is None:
        unseen_fraction = 0.1 if category == "shape" else 0.2
    rng = np.random.default_rng([seed, CATEGORIES.index(category)])
    pool: dict[str, WorldPrompt] = {}
    for _ in range(200 * (n_train + n_val)):
        prompt = generate_prompt(rng, category)
        pool.setdefault(prompt.text, prompt)
        if len(pool) >= 20 * (n_train + n_val):
            break
    all_combos = sorted(set().union(*(_combinations(p) for p in pool.values())))
    held = set(
        all_combos[i]
        for i in rng.choice(len(all_combos), size=max(1, math.ceil(unseen_fraction * len(all_combos))), replace=False)
    )
    texts = list(pool)  # in order of generation, so the split follows the generator's distribution
    unseen = [t for t in texts if _combinations(pool[t]) & held]
    seen = [t for t in texts if not _combinations(pool[t]) & held]
    n_unseen = n_val // 2
    if len(unseen) < n_unseen or len(seen) < n_train + n_val - n_unseen:
        raise RuntimeError(f"not enough distinct {category} prompts for {n_train} train / {n_val} val")
    train = seen[:n_train]
    val = unseen[:n_unseen] + seen[n_train : n_train + n_val - n_unseen]
    return train, val


def prompt_file(category: str, split: str) -> Path:
    """Path of the shipped prompt file of ``category`` and ``split``."""
    if category not in CATEGORIES:
        raise ValueError(f"unknown category {category!r}; expected one of {CATEGORIES}")
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
    root = resources.files("loopdiff.embedded") / "assets" / "prompts" / f"{category}_{split}.txt"
    return Path(str(root))


def load_prompts(category: str, split: str) -> list[str]:
    """The shipped prompts of ``category`` (one of :data:`CATEGORIES`) and ``split`` (train/val)."""
    path = prompt_file(category, split)
    return [line.strip() for line in path.read_text().splitlines() if line.strip()]


def build_prompt_files(out_dir: str | Path, n_train: int = 200, n_val: int = 60, seed: int = 0) -> None:
    """Write ``{category}_{train,val}.txt`` for every category into ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for category in CATEGORIES:
        train, val = split_prompts(category, n_train, n_val, seed)
        (out / f"{category}_train.txt").write_text("\n".join(train) + "\n")
        (out / f"{category}_val.txt").write_text("\n".join(val) + "\n")


if __name__ == "__main__":  # python -m loopdiff.embedded.prompts  (rewrites the shipped files)
    build_prompt_files(Path(__file__).parent / "assets" / "prompts")
