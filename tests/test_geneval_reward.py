"""The GenEval-style reward: its position rule against GenEval's formula written out in NumPy, and the reward
through the registry over tiny OWLv2 and CLIP models (saved, loaded back) against the detector's boxes."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pytest
import torch

pytest.importorskip("transformers")

from loopdiff.rewards.base import RewardError, build_reward
from loopdiff.rewards.detection import OwlDetector
from loopdiff.rewards.geneval import COLORS, relative_position
from test_rewards_real import clip_folder, clip_normalise, eight_bit, owl_folder  # noqa: F401 (fixtures)


def geneval_relation(box_a, box_b) -> set[str]:
    """GenEval's ``relative_position`` (evaluate_images.py), in NumPy."""
    boxes = np.array([box_a, box_b], dtype=float).reshape(2, 2, 2)
    center_a, center_b = boxes.mean(axis=-2)
    dim_a, dim_b = np.abs(np.diff(boxes, axis=-2))[..., 0, :]
    offset = center_a - center_b
    revised = np.maximum(np.abs(offset) - 0.1 * (dim_a + dim_b), 0) * np.sign(offset)
    if np.all(np.abs(revised) < 1e-3):
        return set()
    dx, dy = revised / np.linalg.norm(offset)
    return {r for r, ok in (("left of", dx < -0.5), ("right of", dx > 0.5), ("above", dy < -0.5),
                            ("below", dy > 0.5)) if ok}


def test_relative_position_is_genevals() -> None:
    rng = np.random.default_rng(0)
    for _ in range(500):
        a, b = rng.uniform(0, 100, (2, 2, 2))
        box_a, box_b = [*a.min(0), *a.max(0)], [*b.min(0), *b.max(0)]
        assert relative_position(box_a, box_b) == geneval_relation(box_a, box_b)
    assert relative_position([0, 0, 10, 10], [50, 0, 60, 10]) == {"left of"}


def _colour_by_hand(folder, image, box, name) -> str:
    from transformers import AutoTokenizer, CLIPModel

    clip, tokenizer = CLIPModel.from_pretrained(folder).eval(), AutoTokenizer.from_pretrained(folder)
    x0, y0, x1, y1 = int(box[0]), int(box[1]), int(np.ceil(box[2])), int(np.ceil(box[3]))
    crop = eight_bit(image[:, max(0, y0):min(32, y1), max(0, x0):min(32, x1)])[None]
    crop = torch.nn.functional.interpolate(crop, size=(32, 32), mode="bicubic", antialias=True).clamp(0, 1)
    with torch.no_grad():
        i = clip.get_image_features(pixel_values=clip_normalise(eight_bit(crop)))
        t = clip.get_text_features(**tokenizer([f"a photo of a {c} {name}" for c in COLORS], padding=True,
                                               return_tensors="pt"))
        i, t = (x if torch.is_tensor(x) else x.pooler_output for x in (i, t))
    return COLORS[int(torch.nn.functional.cosine_similarity(i, t).argmax())]


def test_geneval_through_the_registry_checks_counts_colours_positions_and_excludes(owl_folder, clip_folder):
    options = {"model": str(owl_folder), "clip_model": str(clip_folder), "score_threshold": 0.3}
    reward = build_reward("geneval", {"geneval": options})
    partial = build_reward("geneval", {"geneval": {**options, "partial": True}})
    images = eight_bit(torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(3)))
    (found,) = OwlDetector(str(owl_folder), score_threshold=0.3, nms_iou=0.5)(images, [["cat", "dog"]])
    cats = sorted((d for d in found if d.label == "cat"), key=lambda d: -d.score)
    dogs = sorted((d for d in found if d.label == "dog"), key=lambda d: -d.score)
    assert cats and dogs, "the tiny detector must find both classes for this test"
    colour = _colour_by_hand(clip_folder, images[0], cats[0].box, "cat")
    other = next(c for c in COLORS if c != colour)
    relation = sorted(geneval_relation(cats[0].box, dogs[0].box) or {"left of"})[0]
    holds = relation in geneval_relation(cats[0].box, dogs[0].box)

    no_dogs_limit = {"class": "dog", "count": 1000}  # always met: every case queries both classes, as above
    cases = [  # (metadata, requirements met, requirements)
        ({"include": [{"class": "cat", "count": len(cats)}], "exclude": [no_dogs_limit]}, 2, 2),
        ({"include": [{"class": "cat", "count": len(cats) + 1}], "exclude": [no_dogs_limit]}, 1, 2),
        ({"include": [{"class": "cat", "count": 1, "color": colour}], "exclude": [no_dogs_limit]}, 3, 3),
        ({"include": [{"class": "cat", "count": 1, "color": other}], "exclude": [no_dogs_limit]}, 2, 3),
        ({"include": [{"class": "dog", "count": 1}], "exclude": [{"class": "cat", "count": len(cats)}]}, 1, 2),
        ({"include": [{"class": "dog", "count": 1}, {"class": "cat", "count": 1, "position": [relation, 0]}]},
         2 + holds, 3),
    ]
    for metadata, met, total in cases:
        assert float(reward(images, ["p"], [metadata])) == float(met == total), metadata
        assert float(partial(images, ["p"], [metadata])) == pytest.approx(met / total), metadata


def test_geneval_refuses_prompts_without_its_metadata_and_missing_weights(owl_folder, clip_folder, tmp_path):
    reward = build_reward("geneval", {"geneval": {"model": str(owl_folder), "clip_model": str(clip_folder)}})
    with pytest.raises(RewardError, match=r"reward 'geneval' needs GenEval metadata with an 'include' list.*'a cat'"):
        reward(torch.rand(1, 3, 32, 32), ["a cat"], [{"category": "prompts"}])
    with pytest.raises(RewardError, match=r"reward 'geneval'.*no-owl"):
        build_reward("geneval", {"geneval": {"model": str(tmp_path / "no-owl"), "clip_model": str(clip_folder)}})
    with pytest.raises(RewardError, match=r"reward 'geneval'.*no-clip"):
        build_reward("geneval", {"geneval": {"model": str(owl_folder), "clip_model": str(tmp_path / "no-clip")}})
