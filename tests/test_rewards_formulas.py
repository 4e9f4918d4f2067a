"""The reward formulas and helpers that need no model: numbers worked out by hand."""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from loopdiff.rewards.alignment import greedy_recall, idf_weights
from loopdiff.rewards.base import RewardError
from loopdiff.rewards.blip_vqa import blip_question
from loopdiff.rewards.detection import (
    Detection,
    counted_objects,
    merge_duplicates,
    numeracy_score,
    relation_score,
    singular,
    spatial_objects,
    spatial_relation,
    spatial_score,
)
from loopdiff.rewards.hf_models import ImageSettings, load_pretrained, resize_normalize, weights_check

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "t2i-compbench"


def prompts(name: str) -> list[str]:
    path = DATA / name
    if not path.is_file():
        pytest.skip(f"T2I-CompBench prompt file not found at {path}")
    return [line.strip() for line in path.read_text().splitlines() if line.strip()]


# ----------------------------------------------------------------------------- spatial


@pytest.mark.parametrize(
    "relation, box2, expected",
    [
        ("on the left of", (20, 0, 30, 10), 1.0),  # box 2 to the right, no overlap
        ("on the left of", (2, 0, 12, 10), 0.1 / (80 / 120)),  # overlap: IoU 2/3 -> 0.1 / IoU
        ("on the right of", (20, 0, 30, 10), 0.0),  # wrong side
        ("on the right of", (-20, 0, -10, 10), 1.0),
        ("on the top of", (0, 30, 10, 40), 1.0),  # image y grows downwards: box 1 above box 2
        ("on the bottom of", (0, 30, 10, 40), 0.0),
        ("on the bottom of", (0, -30, 10, -20), 1.0),
        ("on the left of", (20, 25, 30, 35), 0.0),  # more below than beside
        ("next to", (300, 0, 310, 10), 1.0),  # |dy| = 0 < 150
        ("near", (300, 400, 310, 410), 150 / 400),  # both offsets >= 150: threshold / max
        ("on side of", (100, 400, 110, 410), 1.0),
        (None, (20, 0, 30, 10), 0.0),
    ],
)
def test_relation_score_cases(relation, box2, expected):
    assert relation_score(relation, (0, 0, 10, 10), box2) == pytest.approx(expected)


def test_spatial_score_weights_threshold_and_frame():
    cat = Detection("cat", 0.9, (0, 0, 10, 10))
    weak_cat = Detection("cat", 0.3, (100, 0, 110, 10))
    dog = Detection("dog", 0.8, (20, 0, 30, 10))
    found = [weak_cat, cat, dog]  # the best-scoring cat is the one used
    both = 0.25 * 0.9 + 0.25 * 0.8
    assert spatial_score(found, "cat", "dog", "on the left of", (512, 512)) == pytest.approx(both + 0.5)
    assert spatial_score(found, "cat", "dog", "on the right of", (512, 512)) == 0.0  # 0.425 < 0.5 -> 0
    assert spatial_score([cat], "cat", "dog", "on the left of", (512, 512)) == 0.0  # 0.225 -> 0
    assert spatial_score([], "cat", "dog", "near", (512, 512)) == 0.0
    # "near" is judged in the benchmark's 479 px frame: 400 px apart at 512 px are 374.2 px there.
    far = Detection("dog", 0.8, (400, 400, 410, 410))
    position = 150 / (400 * 479 / 512)
    got = spatial_score([cat, far], "cat", "dog", "near", (512, 512))
    assert got == pytest.approx(both + 0.5 * position)


def test_spatial_prompt_parsing_on_benchmark_prompts():
    assert spatial_relation("a balloon on the top of a giraffe") == "on the top of"
    assert spatial_objects("a balloon on the top of a giraffe") == ("balloon", "giraffe")
    assert spatial_objects("a sports ball on side of a man") == ("sports ball", "man")
    assert spatial_relation("a car nearby") == "near"  # the benchmark's substring match
    for prompt in prompts("spatial_val.txt"):
        relation, objects = spatial_relation(prompt), spatial_objects(prompt)
        assert relation is not None, prompt
        assert objects is not None and all(objects), prompt
        first, last = objects
        assert first.split()[-1] in prompt.split(relation)[0] and last.split()[-1] in prompt.split(relation)[-1]


# ----------------------------------------------------------------------------- numeracy


def test_numeracy_score_found_and_count():
    dogs = [Detection("dog", 0.9, (0, 0, 10, 10)), Detection("dog", 0.8, (50, 50, 60, 60))]
    cat = Detection("cat", 0.7, (20, 20, 30, 30))
    asked = [("dog", 2), ("cat", 1)]
    assert numeracy_score([*dogs, cat], asked) == 1.0
    assert numeracy_score(dogs, asked) == pytest.approx((0.5 + 0.5 + 0.0) / 2)
    assert numeracy_score([*dogs, Detection("dog", 0.5, (90, 0, 99, 9))], asked) == pytest.approx((0.5 + 0) / 2)
    assert numeracy_score([], asked) == 0.0
    assert numeracy_score([cat], []) == 0.0


def test_duplicate_boxes_count_once():
    big = Detection("dog", 0.9, (0, 0, 100, 100))
    same = Detection("dog", 0.8, (0, 0, 100, 103))  # IoU > 0.9
    inside = Detection("dog", 0.7, (10, 10, 60, 60))  # covered > 0.9 by the big box
    other_label = Detection("cat", 0.6, (0, 0, 100, 100))
    apart = Detection("dog", 0.5, (200, 200, 260, 260))
    assert merge_duplicates([big, same, inside, other_label, apart]) == [big, other_label, apart]
    assert numeracy_score([big, same, inside, apart], [("dog", 2)]) == 1.0


def test_counted_objects_and_singulars():
    assert counted_objects("two dogs and a cat") == [("dog", 2), ("cat", 1)]
    assert counted_objects("one guitar, three vases, two cows, two sheep and two microwaves") == [
        ("guitar", 1), ("vase", 3), ("cow", 2), ("sheep", 2), ("microwave", 2),
    ]  # fmt: skip
    assert counted_objects("a helicopter, two dogs, and two lemons were on the playground") == [
        ("helicopter", 1), ("dog", 2), ("lemon", 2),
    ]  # fmt: skip
    assert [singular(w) for w in ("knives", "benches", "butterflies", "men", "cups", "boxes", "bus")] == [
        "knife", "bench", "butterfly", "man", "cup", "box", "bus",
    ]  # fmt: skip
    for prompt in prompts("numeracy_val.txt"):
        objects = counted_objects(prompt)
        assert objects, prompt
        assert all(name and 1 <= count <= 12 for name, count in objects), (prompt, objects)


# ----------------------------------------------------------------------------- BERTScore recall


def test_greedy_recall_by_hand():
    # Candidate tokens c0..c2 (c2 is padding), reference tokens r0..r2 with r0 a special token (weight 0).
    candidate = torch.tensor([[[1.0, 0.0], [0.0, 2.0], [5.0, 5.0]]])
    mask = torch.tensor([[1, 1, 0]])
    reference = torch.tensor([[[0.0, 1.0], [1.0, 1.0], [-1.0, 0.0]]])
    weights = torch.tensor([[0.0, 1.0, 3.0]])
    # r1: best cos = 1/sqrt(2) (with c0 or c1); r2: cos with c0 = -1, with c1 = 0 -> 0 (padding not used).
    expected = (1 * (1 / math.sqrt(2)) + 3 * 0.0) / 4
    assert greedy_recall(candidate, mask, reference, weights).item() == pytest.approx(expected)


def test_idf_weights_by_hand():
    idf = idf_weights([[1, 2, 2], [2, 3]])
    assert idf == pytest.approx({1: math.log(3 / 2), 2: math.log(3 / 3), 3: math.log(3 / 2)})


# ----------------------------------------------------------------------------- questions, images, loading


def test_blip_question_follows_pre_question():
    assert blip_question("A Green bench") == "a green bench?"
    assert blip_question('a "red" car.') == "a red car?"
    assert blip_question("Rubik's cube") == "rubik's cube?"


def pil_pixels(array: np.ndarray, size: tuple[int, int]) -> torch.Tensor:
    resized = Image.fromarray(array).resize(size, Image.BICUBIC)
    return torch.from_numpy(np.array(resized)).permute(2, 0, 1).float() / 255


def test_square_resize_matches_pil_bicubic():
    rng = np.random.default_rng(0)
    smooth = np.kron(rng.integers(0, 256, (8, 10, 3)), np.ones((8, 8, 1))).astype(np.uint8)  # 64 x 80
    images = torch.from_numpy(smooth).permute(2, 0, 1)[None].float() / 255
    settings = ImageSettings(48, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))
    ours = resize_normalize(images, settings, mode="bicubic")[0]
    reference = pil_pixels(smooth, (48, 48))
    assert (ours - reference).abs().max() <= 2 / 255 + 1e-6
    assert (ours - reference).abs().mean() < 0.05 / 255


def test_short_side_resize_and_centre_crop_match_pil():
    rng = np.random.default_rng(1)
    smooth = np.kron(rng.integers(0, 256, (8, 10, 3)), np.ones((8, 8, 1))).astype(np.uint8)  # 64 x 80
    images = torch.from_numpy(smooth).permute(2, 0, 1)[None].float() / 255
    settings = ImageSettings(32, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
    ours = resize_normalize(images, settings, mode="bicubic", crop=True)[0] * 0.25 + 0.5
    reference = pil_pixels(smooth, (40, 32))[:, :, 4:36]  # short side 64 -> 32, long 80 -> 40, centre 32
    assert ours.shape == (3, 32, 32)
    assert (ours - reference).abs().max() <= 2 / 255 + 1e-6


def test_loading_errors_name_reward_and_path(tmp_path, monkeypatch):
    from transformers import AutoConfig

    missing = tmp_path / "absent"
    with pytest.raises(RewardError, match=f"'clipscore'.*'{missing}'"):
        load_pretrained(AutoConfig, missing, "clipscore")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(RewardError, match=f"'clipscore'.*local folder '{empty}'"):
        load_pretrained(AutoConfig, empty, "clipscore")

    check = weights_check("someone/some-model")
    assert check({"model": str(empty)}) is None
    assert "does not exist" in check({"model": str(missing)})
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "cache"))
    assert "not in the Hugging Face cache" in check({})
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    assert check({}) is None  # may still be downloaded
    assert os.environ["HF_HUB_OFFLINE"] == "0"
