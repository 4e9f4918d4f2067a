"""The embedded world: renderer ground truth, prompt generation and parsing, shipped prompt files."""

from __future__ import annotations

import math
import time

import numpy as np
import pytest

from loopdiff.embedded.prompts import (
    CATEGORIES,
    MIN_GAP,
    RELATION_MARGIN,
    RELATIONS,
    SIZE_RANGE,
    ObjectSpec,
    WorldPrompt,
    generate_prompt,
    load_prompts,
    parse_prompt,
    random_caption_and_scene,
    relation_holds,
    scene_for_prompt,
)
from loopdiff.embedded.world import (
    BACKGROUND,
    COLORS,
    IMAGE_SIZE,
    SHAPES,
    TEXTURES,
    Scene,
    WorldObject,
    object_mask,
    pattern_color,
    render,
    shape_mask,
)


def _random_scene(rng: np.random.Generator) -> Scene:
    category = CATEGORIES[rng.integers(len(CATEGORIES))]
    return scene_for_prompt(generate_prompt(rng, category), rng)


def _assert_scene_satisfies(scene: Scene, prompt: WorldPrompt) -> None:
    for spec in prompt.objects:
        found = sum(spec.matches(obj) for obj in scene.objects)
        assert found >= spec.count, (prompt.text, scene)
    assert len(scene.objects) == sum(spec.count for spec in prompt.objects)
    if prompt.relation is not None:
        first, last = scene.objects[0].box, scene.objects[-1].box
        assert relation_holds(prompt.relation, first, last, margin=RELATION_MARGIN), prompt.text


# ----------------------------------------------------------------------------- renderer


def test_pixels_inside_each_mask_have_its_colour_or_pattern_tone_and_outside_is_background():
    rng = np.random.default_rng(0)
    for _ in range(50):
        scene = _random_scene(rng)
        image = render(scene)
        assert image.shape == (IMAGE_SIZE, IMAGE_SIZE, 3) and image.dtype == np.uint8
        covered = np.zeros(image.shape[:2], dtype=bool)
        for obj in scene.objects:
            mask = object_mask(obj)
            assert mask.sum() > 0.2 * obj.size**2
            pixels = image[mask]
            is_colour = (pixels == COLORS[obj.color]).all(axis=1)
            is_pattern = (pixels == pattern_color(obj.color)).all(axis=1)
            assert (is_colour | is_pattern).all()
            assert is_colour.mean() > 0.4  # the colour dominates every texture
            if obj.texture == "plain":
                assert is_colour.all()
            covered |= mask
        assert (image[~covered] == BACKGROUND).all()


@pytest.mark.parametrize(
    "texture, expected_fraction", [("plain", 0.0), ("striped", 2 / 5), ("dotted", 9 / 36), ("checkered", 1 / 2)]
)
def test_texture_pattern_fraction_matches_its_period(texture, expected_fraction):
    obj = WorldObject("square", "green", texture, 30, 32, 32)
    pixels = render(Scene((obj,)))[object_mask(obj)]
    dark = (pixels == pattern_color("green")).all(axis=1).mean()
    assert dark == pytest.approx(expected_fraction, abs=0.04)


def test_stripes_run_horizontally_and_checks_alternate_both_ways():
    obj = WorldObject("square", "red", "striped", 30, 32, 32)
    dark = (render(Scene((obj,))) == pattern_color("red")).all(axis=2)
    x0, y0, x1, y1 = obj.box
    patch = dark[y0:y1, x0:x1]
    assert (patch == patch[:, :1]).all()  # constant along each row
    assert 0 < patch[:, 0].mean() < 1
    checks = WorldObject("square", "red", "checkered", 30, 32, 32)
    dark = (render(Scene((checks,))) == pattern_color("red")).all(axis=2)[y0:y1, x0:x1]
    assert (dark[:, :3] != dark[:, 3:6]).all() and (dark[:3, :] != dark[3:6, :]).all()


@pytest.mark.parametrize(
    "shape, area_fraction",
    [("square", 1.0), ("circle", math.pi / 4), ("triangle", 0.5), ("diamond", 0.5), ("hexagon", 3 * math.sqrt(3) / 8)],
)
def test_shape_mask_area_matches_geometry(shape, area_fraction):
    size = 30
    assert shape_mask(shape, size).mean() == pytest.approx(area_fraction, abs=0.04)


@pytest.mark.parametrize("shape", ["circle", "square", "diamond", "cross", "hexagon"])
def test_symmetric_shapes_are_centred_on_the_object_position(shape):
    obj = WorldObject(shape, "blue", "plain", 21, 30, 25)
    ys, xs = np.nonzero(object_mask(obj))
    assert xs.mean() == pytest.approx(obj.x, abs=0.6) and ys.mean() == pytest.approx(obj.y, abs=0.6)
    assert xs.max() - xs.min() + 1 == obj.size  # the box side is the size


def test_shapes_are_pairwise_distinct_at_the_smallest_size():
    masks = {shape: shape_mask(shape, 14) for shape in SHAPES}
    for a in SHAPES:
        for b in SHAPES:
            if a < b:
                assert (masks[a] != masks[b]).sum() >= 6, (a, b)


def test_render_is_deterministic_and_fast():
    rng = np.random.default_rng(1)
    scenes = [_random_scene(rng) for _ in range(64)]
    again = [scene_for_prompt(generate_prompt(np.random.default_rng(7), "color"), np.random.default_rng(8))
             for _ in range(2)]
    assert again[0] == again[1] and (render(again[0]) == render(again[1])).all()
    start = time.perf_counter()
    images = [render(scene) for scene in scenes]
    assert time.perf_counter() - start < 0.5
    assert all((render(s) == im).all() for s, im in zip(scenes, images))


def test_bad_attributes_raise_naming_the_value():
    with pytest.raises(ValueError, match="'octagon'"):
        WorldObject("octagon", "red", "plain", 20, 30, 30)
    with pytest.raises(ValueError, match="'teal'"):
        WorldObject("circle", "teal", "plain", 20, 30, 30)
    with pytest.raises(ValueError, match="'wavy'"):
        WorldObject("circle", "red", "wavy", 20, 30, 30)


def test_palette_is_well_separated_from_itself_the_pattern_tones_and_the_background():
    colours = {c: np.array(v, float) for c, v in COLORS.items()}
    others = {**{f"{c} pattern": np.array(pattern_color(c), float) for c in COLORS}, "background": np.array(BACKGROUND, float)}
    names = list(colours)
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            assert np.linalg.norm(colours[a] - colours[b]) > 80, (a, b)
        for b, tone in others.items():
            assert np.linalg.norm(colours[a] - tone) > 80, (a, b)
    for name, tone in others.items():
        if name != "background":
            assert np.linalg.norm(tone - others["background"]) > 60, name
    for name, colour in colours.items():  # a blurred texture blends colour and pattern tone
        blends = np.linspace(0, 1, 101)[:, None] * (colour - others[f"{name} pattern"]) + others[f"{name} pattern"]
        assert np.linalg.norm(blends - others["background"], axis=1).min() > 60, name


# ----------------------------------------------------------------------------- scenes from prompts


@pytest.mark.parametrize("category", CATEGORIES)
def test_scenes_satisfy_their_prompt_and_objects_do_not_overlap(category):
    rng = np.random.default_rng(CATEGORIES.index(category))
    for _ in range(60):
        prompt = generate_prompt(rng, category)
        scene = scene_for_prompt(prompt, rng)
        _assert_scene_satisfies(scene, prompt)
        for i, a in enumerate(scene.objects):
            x0, y0, x1, y1 = a.box
            assert 0 <= x0 and 0 <= y0 and x1 <= IMAGE_SIZE and y1 <= IMAGE_SIZE
            assert SIZE_RANGE[0] - 4 <= a.size <= SIZE_RANGE[1]
            for b in scene.objects[i + 1 :]:
                bx0, by0, bx1, by1 = b.box
                gap = max(bx0 - x1, x0 - bx1, by0 - y1, y0 - by1)
                assert gap >= MIN_GAP


def test_relation_rule_on_hand_made_boxes():
    a, b = (0, 20, 10, 30), (30, 22, 40, 32)  # a left of b, same height
    assert relation_holds("left", a, b) and relation_holds("right", b, a)
    assert not relation_holds("right", a, b) and not relation_holds("above", a, b)
    top, bottom = (20, 0, 30, 10), (22, 40, 32, 50)
    assert relation_holds("above", top, bottom) and relation_holds("below", bottom, top)
    assert relation_holds("next to", a, (20, 22, 30, 32))  # centres 20 px apart < 0.45 * 64
    assert not relation_holds("next to", a, b)  # 30 px > 0.45 * 64
    assert not relation_holds("next to", (0, 0, 10, 10), (50, 50, 60, 60))
    assert not relation_holds("left", (0, 0, 20, 20), (5, 0, 25, 20))  # IoU 0.6
    assert relation_holds("left", a, b, margin=27) and not relation_holds("left", a, b, margin=28)  # dx 30, dy 2
    with pytest.raises(ValueError, match="'behind'"):
        relation_holds("behind", a, b)


# ----------------------------------------------------------------------------- prompts


@pytest.mark.parametrize("category", CATEGORIES)
def test_generate_then_parse_round_trips(category):
    rng = np.random.default_rng(100 + CATEGORIES.index(category))
    for _ in range(300):
        prompt = generate_prompt(rng, category)
        assert parse_prompt(prompt.text) == prompt
        assert parse_prompt(prompt.text.capitalize() + ".").objects == prompt.objects


def test_parse_known_phrasings():
    p = parse_prompt("a green star on the left of a yellow hexagon")
    assert p.category == "spatial" and p.relation == "left"
    assert p.objects == (ObjectSpec("star", "green"), ObjectSpec("hexagon", "yellow"))
    p = parse_prompt("three purple triangles")
    assert p.category == "numeracy" and p.objects == (ObjectSpec("triangle", "purple", None, 3),)
    p = parse_prompt("two crosses and one circle")
    assert [(s.shape, s.count) for s in p.objects] == [("cross", 2), ("circle", 1)]
    assert parse_prompt("a striped triangle and a dotted star").category == "texture"
    assert parse_prompt("an orange circle and a blue square").category == "color"
    assert parse_prompt("a hexagon, a star and a heart").category == "shape"
    p = parse_prompt("a dotted red star on the bottom of a blue square")
    assert p.category == "complex" and p.relation == "below"
    assert {"on the top of", "on the bottom of", "next to"} <= set(RELATIONS.values())


@pytest.mark.parametrize(
    "text, word", [("a red car", "'car'"), ("a shiny red circle", "'shiny'"), ("two circle", "'two'"), ("", "empty")]
)
def test_parse_rejects_non_world_prompts(text, word):
    with pytest.raises(ValueError, match=word):
        parse_prompt(text)


@pytest.mark.parametrize("category", CATEGORIES)
def test_shipped_prompt_files(category):
    train, val = load_prompts(category, "train"), load_prompts(category, "val")
    assert len(train) == 200 and len(val) == 60 and len(set(train)) == 200
    assert not set(train) & set(val)
    parsed_train = [parse_prompt(t) for t in train]
    parsed_val = [parse_prompt(t) for t in val]
    assert all(p.category == category for p in parsed_train + parsed_val)

    def combos(p: WorldPrompt) -> set:
        out = set()
        for spec in p.objects:
            out |= {(attr, spec.shape) for attr in (spec.color, spec.texture) if attr}
            out |= {(spec.count, spec.shape)} if category == "numeracy" else set()
        if category == "shape":
            out |= {frozenset((a.shape, b.shape)) for a in p.objects for b in p.objects if a != b}
        return out

    seen = set().union(*(combos(p) for p in parsed_train))
    unseen = [p for p in parsed_val if combos(p) - seen]
    assert len(unseen) >= 20, f"only {len(unseen)} val prompts with unseen combinations"


def test_load_prompts_rejects_bad_names():
    with pytest.raises(ValueError, match="'colour'"):
        load_prompts("colour", "train")
    with pytest.raises(ValueError, match="'test'"):
        load_prompts("color", "test")


def test_random_captions_describe_their_scene_and_mix_categories():
    rng = np.random.default_rng(5)
    categories, singles = set(), 0
    for _ in range(300):
        caption, scene = random_caption_and_scene(rng, drop_attribute_prob=0.3)
        prompt = parse_prompt(caption)
        _assert_scene_satisfies(scene, prompt)
        categories.add(prompt.category)
        singles += len(prompt.objects) == 1 and prompt.objects[0].count == 1 and prompt.category != "numeracy"
    assert categories == set(CATEGORIES)
    assert 30 < singles < 150
