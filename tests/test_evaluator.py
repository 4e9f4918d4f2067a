"""The held-out analytic evaluator: measurement accuracy, T2I-CompBench-shaped scores, independence."""

from __future__ import annotations

import ast
import subprocess
import sys
from collections import deque
from pathlib import Path

import numpy as np
import pytest
import torch

from loopdiff.embedded import evaluator as ev
from loopdiff.embedded.prompts import CATEGORIES, generate_prompt, parse_prompt, scene_for_prompt
from loopdiff.embedded.world import Scene, WorldObject, render
from loopdiff.rewards.base import build_reward, registered_rewards


def _images(*scenes: Scene) -> torch.Tensor:
    return torch.from_numpy(np.stack([render(s) for s in scenes])).permute(0, 3, 1, 2).float() / 255.0


def _obj(shape, color, x, y, texture="plain", size=18) -> WorldObject:
    return WorldObject(shape, color, texture, size, x, y)


# ----------------------------------------------------------------------------- measurement


def test_attribute_accuracy_on_fresh_renders_is_at_least_95_percent():
    report = ev.attribute_accuracy(n_scenes=150, seed=11)
    for attribute in ("found", "color", "shape", "texture", "position", "count"):
        assert report[attribute] >= 0.95, (attribute, report)


def test_attribute_accuracy_on_blurred_noisy_renders():
    report = ev.attribute_accuracy(n_scenes=120, seed=12, blur_sigma=0.8, noise_std=8.0)
    for attribute in ("found", "color", "texture", "count"):
        assert report[attribute] >= 0.95, (attribute, report)
    assert report["shape"] >= 0.9, report


def _bfs_component_count(mask: np.ndarray) -> int:
    seen = np.zeros_like(mask)
    count = 0
    for start in zip(*np.nonzero(mask)):
        if seen[start]:
            continue
        count += 1
        queue = deque([start])
        seen[start] = True
        while queue:
            y, x = queue.popleft()
            for ny, nx in ((y + 1, x), (y - 1, x), (y, x + 1), (y, x - 1)):
                if 0 <= ny < mask.shape[0] and 0 <= nx < mask.shape[1] and mask[ny, nx] and not seen[ny, nx]:
                    seen[ny, nx] = True
                    queue.append((ny, nx))
    return count


def test_connected_components_agree_with_breadth_first_search():
    rng = np.random.default_rng(0)
    masks = rng.random((6, 20, 20)) < np.array([0.2, 0.4, 0.5, 0.55, 0.6, 0.8])[:, None, None]
    labels = ev.connected_components(masks)
    assert ((labels > 0) == masks).all()
    for mask, label in zip(masks, labels):
        assert len(np.unique(label[label > 0])) == _bfs_component_count(mask)
        # 4-neighbours inside the mask share a label
        same = mask[:, 1:] & mask[:, :-1]
        assert (label[:, 1:][same] == label[:, :-1][same]).all()


def test_detection_reads_attributes_and_boxes_of_a_known_scene():
    scene = Scene((_obj("star", "green", 16, 16, "striped", 24), _obj("cross", "pink", 46, 44, "dotted", 22)))
    found = sorted(ev.detect_objects(render(scene)), key=lambda d: d.center[0])
    assert [(d.shape, d.color, d.texture) for d in found] == [("star", "green", "striped"), ("cross", "pink", "dotted")]
    for d, obj in zip(found, scene.objects):
        x0, y0, x1, y1 = obj.box
        assert abs(d.box[0] - x0) <= 1 and abs(d.box[3] - y1) <= 1


# ----------------------------------------------------------------------------- scores


def test_scores_of_renders_of_each_prompts_own_scene_are_one():
    rng = np.random.default_rng(3)
    evaluator = ev.HeldOutEvaluator()
    for category in CATEGORIES:
        prompts = [generate_prompt(rng, category) for _ in range(12)]
        images = _images(*(scene_for_prompt(p, rng) for p in prompts))
        scores = evaluator.score(images, [p.text for p in prompts])
        assert scores.shape == (12,) and scores.dtype == torch.float32
        assert scores.mean() >= 0.95, (category, scores)


def test_color_binding_swap_scores_zero_and_graded_gives_partial_credit():
    prompt = "a red circle and a blue square"
    right = Scene((_obj("circle", "red", 15, 15), _obj("square", "blue", 45, 45)))
    swapped = Scene((_obj("circle", "blue", 15, 15), _obj("square", "red", 45, 45)))
    square_red = Scene((_obj("circle", "red", 15, 15), _obj("square", "red", 45, 45)))
    only_circle = Scene((_obj("circle", "red", 15, 15),))
    images = _images(right, swapped, square_red, only_circle)
    assert ev.HeldOutEvaluator().score(images, [prompt] * 4).tolist() == [1.0, 0.0, 0.0, 0.0]
    graded = ev.HeldOutEvaluator(graded=True).score(images, [prompt] * 4)
    # per phrase: the largest fraction of its named attributes one object has
    assert graded.tolist() == pytest.approx([1.0, 0.5 * 0.5, 1.0 * 0.5, 1.0 * 0.0])


def test_spatial_formula():
    prompt = "a red circle on the left of a blue square"
    holds = Scene((_obj("circle", "red", 12, 30), _obj("square", "blue", 50, 32)))
    reversed_ = Scene((_obj("circle", "red", 50, 30), _obj("square", "blue", 12, 32)))
    one_found = Scene((_obj("circle", "red", 12, 30), _obj("square", "green", 50, 32)))
    none_found = Scene((_obj("star", "yellow", 12, 30),))
    scores = ev.HeldOutEvaluator().score(_images(holds, reversed_, one_found, none_found), [prompt] * 4)
    # both found: 0.25 + 0.25 + 0.5 pos; one found: 0.25 -> below 0.5 -> 0
    assert scores.tolist() == [1.0, 0.5, 0.0, 0.0]


def test_numeracy_formula():
    prompt = "two red circles and one blue star"
    exact = Scene((_obj("circle", "red", 12, 12), _obj("circle", "red", 50, 12), _obj("star", "blue", 30, 48)))
    three = Scene(exact.objects + (_obj("circle", "red", 12, 48),))
    no_circles = Scene((_obj("star", "blue", 30, 48),))
    scores = ev.HeldOutEvaluator().score(_images(exact, three, no_circles), [prompt] * 3)
    assert scores.tolist() == pytest.approx([1.0, (0.5 + 1.0) / 2, (0.0 + 1.0) / 2])


def test_complex_with_relation_averages_attribute_and_spatial_scores():
    prompt = "a dotted red circle on the left of a blue square"
    reversed_ = Scene((_obj("circle", "red", 50, 30, "dotted"), _obj("square", "blue", 12, 32)))
    wrong_texture = Scene((_obj("circle", "red", 12, 30, "striped"), _obj("square", "blue", 50, 32)))
    scores = ev.HeldOutEvaluator().score(_images(reversed_, wrong_texture), [prompt] * 2)
    assert scores.tolist() == pytest.approx([0.5 * (1.0 + 0.5), 0.0])


def test_metadata_category_selects_the_formula():
    prompt = "a red circle on the left of a blue square"
    reversed_ = Scene((_obj("circle", "red", 50, 30), _obj("square", "blue", 12, 32)))
    images = _images(reversed_, reversed_)
    scores = ev.HeldOutEvaluator().score(images, [prompt] * 2, [{"category": "spatial"}, {"category": "color"}])
    assert scores.tolist() == [0.5, 1.0]  # the color formula ignores the relation


def test_any_image_size_and_the_registry():
    rng = np.random.default_rng(4)
    prompts = [generate_prompt(rng, c) for c in CATEGORIES]
    images = _images(*(scene_for_prompt(p, rng) for p in prompts))
    reward = build_reward("embedded_eval")
    assert "embedded_eval" in registered_rewards()
    texts = [p.text for p in prompts]
    at_64 = reward(images, texts, [{}] * len(texts))
    at_128 = reward(torch.nn.functional.interpolate(images, scale_factor=2, mode="nearest"), texts, [{}] * len(texts))
    assert torch.equal(at_64, at_128)


def test_graded_registry_entry_gives_partial_credit():
    prompt = "a red circle and a blue square"
    half = Scene((_obj("circle", "red", 16, 32), _obj("square", "green", 46, 32)))  # the square's colour is wrong
    images = _images(half)
    strict = build_reward("embedded_eval")(images, [prompt], [{}])
    graded = build_reward("embedded_eval_graded")(images, [prompt], [{}])
    assert strict.tolist() == [0.0]
    assert graded.tolist() == pytest.approx([1.0 * 0.5])  # the square matches 1 of its 2 named attributes


def test_bad_inputs_raise_naming_the_problem():
    evaluator = ev.HeldOutEvaluator()
    with pytest.raises(ValueError, match="'a red car'"):
        evaluator.score(torch.zeros(1, 3, 64, 64), ["a red car"])
    with pytest.raises(ValueError, match=r"\(1, 4, 64, 64\)"):
        evaluator.score(torch.zeros(1, 4, 64, 64), ["a red circle"])
    with pytest.raises(ValueError, match="2 images for 1 prompts"):
        evaluator.score(torch.zeros(2, 3, 64, 64), ["a red circle"])
    with pytest.raises(ValueError, match="'colour'"):
        ev.score_objects(parse_prompt("a red circle"), [], category="colour")


# ----------------------------------------------------------------------------- independence


def test_evaluator_imports_no_training_reward_module():
    source = Path(ev.__file__).read_text()
    imported = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom) and node.module:
            imported.add(node.module)
        elif isinstance(node, ast.Import):
            imported.update(alias.name for alias in node.names)
    loopdiff_modules = {m for m in imported if m.startswith("loopdiff")}
    assert loopdiff_modules <= {
        "loopdiff.embedded.prompts",
        "loopdiff.embedded.world",
        "loopdiff.rewards.base",
    }, loopdiff_modules
    assert "safetensors" not in source and "load_state_dict" not in source and "nn.Module" not in source

    code = (
        "import sys, loopdiff.embedded.evaluator as e; "
        "print(sorted(m for m in sys.modules if m.startswith('loopdiff')))"
    )
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    for forbidden in ("loopdiff.embedded.rewards", "loopdiff.embedded.scorers", "loopdiff.embedded.train_scorers"):
        assert f"'{forbidden}'" not in loaded
