"""The OCR reward: quoted-text parsing, edit distance, and the real PP-OCRv4 models on rendered text."""

from __future__ import annotations

import itertools

import numpy as np
import PIL
import pytest
import torch
from PIL import Image, ImageDraw, ImageFont

from loopdiff.rewards.base import _REWARD_MODULES, RewardError, build_reward, registered_rewards
from loopdiff.rewards.ocr import levenshtein, normalize_text, quoted_text, text_score, to_bgr_uint8

# ----------------------------------------------------------------------------- pure functions


def reference_distance(a: str, b: str) -> int:
    """Edit distance by the textbook full-table recurrence (independent of the module's two-row version)."""
    table = [[0] * (len(b) + 1) for _ in range(len(a) + 1)]
    for i in range(len(a) + 1):
        table[i][0] = i
    for j in range(len(b) + 1):
        table[0][j] = j
    for i in range(1, len(a) + 1):
        for j in range(1, len(b) + 1):
            cost = 0 if a[i - 1] == b[j - 1] else 1
            table[i][j] = min(table[i - 1][j] + 1, table[i][j - 1] + 1, table[i - 1][j - 1] + cost)
    return table[len(a)][len(b)]


def brute_force_distance(a: str, b: str, limit: int = 4) -> int:
    """The fewest single edits turning ``a`` into ``b``, by breadth-first search (small alphabets only)."""
    alphabet = sorted(set(a + b))
    frontier, seen = {a}, {a}
    for steps in range(limit + 1):
        if b in frontier:
            return steps
        following = set()
        for word in frontier:
            for i in range(len(word) + 1):
                following.update(word[:i] + c + word[i:] for c in alphabet)  # insert
                if i < len(word):
                    following.add(word[:i] + word[i + 1 :])  # delete
                    following.update(word[:i] + c + word[i + 1 :] for c in alphabet)  # substitute
        frontier = following - seen
        seen |= frontier
    raise AssertionError(f"distance({a!r}, {b!r}) > {limit}")


HAND_COMPUTED = [
    ("", "", 0),
    ("", "abc", 3),
    ("abc", "", 3),
    ("abc", "abc", 0),
    ("kitten", "sitting", 3),
    ("flaw", "lawn", 2),
    ("saturday", "sunday", 3),
    ("hello", "helo", 1),
    ("helloworld", "helowrld", 2),
    ("abc", "cba", 2),
    ("intention", "execution", 5),
    ("a", "b", 1),
    ("ab", "ba", 2),
]


@pytest.mark.parametrize("a, b, expected", HAND_COMPUTED)
def test_levenshtein_matches_hand_computed_table(a, b, expected):
    assert levenshtein(a, b) == expected
    assert levenshtein(b, a) == expected
    assert reference_distance(a, b) == expected


def test_levenshtein_matches_brute_force_on_all_short_strings():
    words = ["".join(w) for n in range(4) for w in itertools.product("ab", repeat=n)] + ["abc", "cab", "bca"]
    for a, b in itertools.product(words, repeat=2):
        assert levenshtein(a, b) == brute_force_distance(a, b), (a, b)


@pytest.mark.parametrize(
    "prompt, expected",
    [
        ('a sign that says "hello world"', "hello world"),
        ('"OPEN" written on a door', "OPEN"),
        ("a sign that says 'hello world'", "hello world"),
        ("a dog's sign that says 'hi'", "hi"),  # the apostrophe is not a quote
        ("the kids' poster reads 'don't stop'", "don't stop"),
        ("a sign that says \u201chello world\u201d", "hello world"),  # curly double quotes
        ("a sign that says \u2018hello\u2019", "hello"),  # curly single quotes
        ("the baker\u2019s sign says \u2018fresh bread\u2019", "fresh bread"),
        ('a poster with "SALE" at the top and "50% off" below', "SALE 50% off"),
        ('a shirt that says "it\'s fine"', "it's fine"),  # single quote inside double quotes
        ('a sign that says ""', ""),
    ],
)
def test_quoted_text_forms(prompt, expected):
    assert quoted_text(prompt) == expected


@pytest.mark.parametrize("prompt", ["a red car", "a dog's bone", 'an unterminated "quote', ""])
def test_quoted_text_none_without_quotes(prompt):
    assert quoted_text(prompt) is None


def test_normalisation_and_score_formula():
    assert normalize_text(" Hello \t World\n") == "helloworld"
    assert text_score("HELLO WORLD", "hello world") == 1.0
    assert text_score("helloworld", "hello world") == 1.0  # OCR dropping a space costs nothing
    assert text_score("helo", "hello") == pytest.approx(1 - 1 / 5)
    assert text_score("", "hello") == 0.0
    assert text_score("completely different and long", "hi") == 0.0  # clipped at 0
    assert text_score("", "") == 1.0
    assert text_score("x", "") == 0.0  # max(len(target), 1)
    assert text_score("a big hello sign", "hello") == 0.0  # 8 deletions > len("hello")
    assert text_score("a big hello sign", "hello", substring_match=True) == 1.0
    assert text_score("helo", "hello", substring_match=True) == pytest.approx(1 - 1 / 5)


def test_images_become_8bit_bgr_arrays():
    images = torch.zeros(2, 3, 4, 5)
    images[0, 0] = 1.0  # red
    images[1, 2] = 0.5  # half blue, rounded to 128
    arrays = to_bgr_uint8(images)
    assert [a.shape for a in arrays] == [(4, 5, 3), (4, 5, 3)]
    assert arrays[0].dtype == np.uint8 and arrays[0].flags["C_CONTIGUOUS"]
    assert arrays[0][0, 0].tolist() == [0, 0, 255]
    assert arrays[1][0, 0].tolist() == [128, 0, 0]


# ----------------------------------------------------------------------------- the real OCR models

HAS_SIZED_DEFAULT_FONT = tuple(int(x) for x in PIL.__version__.split(".")[:2]) >= (10, 1)


def render(text: str, size: tuple[int, int] = (512, 128), font_size: int = 48) -> torch.Tensor:
    """Black ``text`` centred on a white ``size`` (width, height) image, as ``(3, H, W)`` in [0, 1]."""
    image = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(image)
    font = ImageFont.load_default(size=font_size)  # Pillow's bundled TrueType font (Pillow >= 10.1)
    left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
    assert right - left < size[0] - 8, f"{text!r} does not fit"
    draw.text(((size[0] - (right - left)) / 2 - left, (size[1] - (bottom - top)) / 2 - top), text, "black", font)
    return torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1).float() / 255


@pytest.fixture(scope="module")
def reward():
    pytest.importorskip("rapidocr_onnxruntime")
    if not HAS_SIZED_DEFAULT_FONT:
        pytest.skip("ImageFont.load_default(size=...) needs Pillow >= 10.1")
    return build_reward("ocr", {"ocr": {"threads": 1}})


def test_registered_and_ready():
    pytest.importorskip("rapidocr_onnxruntime")
    assert "loopdiff.rewards.ocr" in _REWARD_MODULES  # registered without importing the module first
    info = registered_rewards()["ocr"]
    assert info.extras == ("rapidocr_onnxruntime",)
    assert info.unavailable_reason() is None


READABLE = ["hello world", "LOOP", "open 24 hours", "quick brown fox", "Stable Diffusion"]


@pytest.mark.parametrize("size, font_size", [((512, 128), 48), ((256, 256), 32)])
def test_reads_rendered_strings(reward, size, font_size):
    images = torch.stack([render(text, size, font_size) for text in READABLE])
    readings = reward.read_images(images)
    assert [normalize_text(r) for r in readings] == [normalize_text(t) for t in READABLE]


def test_reward_correct_wrong_misspelt_and_blank(reward):
    target = "hello world"
    misspelt = "helo wrld"
    images = torch.stack(
        [
            render(target, (256, 256), 32),
            render("goodbye", (256, 256), 32),
            render(misspelt, (256, 256), 32),
            torch.ones(3, 256, 256),
        ]
    )
    prompts = [f'a sign that says "{target}"'] * 4
    scores = reward(images, prompts, [{}] * 4)
    assert scores.dtype == torch.float32 and scores.shape == (4,) and scores.device.type == "cpu"
    assert reward.last_targets == [target] * 4
    expected_misspelt = 1 - reference_distance("helowrld", "helloworld") / len("helloworld")  # 1 - 2/10
    assert scores[0].item() == 1.0
    assert scores[1].item() < 0.5
    assert scores[2].item() == pytest.approx(expected_misspelt)
    assert scores[3].item() == 0.0
    assert reward.last_texts[3] == ""


def test_prompt_without_quotes_is_a_one_line_error(reward):
    images = torch.stack([render("hi", (256, 256), 32)] * 2)
    with pytest.raises(RewardError, match=r"'a red car' has no quoted text") as caught:
        reward(images, ['a sign that says "hi"', "a red car"], [{}, {}])
    assert "\n" not in str(caught.value)


class StubEngine:
    """Stands in for RapidOCR: returns fixed ``[box, text, confidence]`` lines (or ``None``)."""

    def __init__(self, lines):
        self.lines = lines

    def __call__(self, image):
        return self.lines, None


def test_min_confidence_filters_lines_and_keeps_reading_order(reward):
    box = [[0, 0], [1, 0], [1, 1], [0, 1]]
    image = torch.ones(1, 3, 8, 8)
    high = build_reward("ocr", {"ocr": {"threads": 1}})  # fresh objects: the fixture's engine stays real
    low = build_reward("ocr", {"ocr": {"threads": 1, "min_confidence": 0.2}})
    for fn in (high, low):
        fn.engine = StubEngine([[box, "Hello", 0.9], [box, "big", 0.3], [box, "World", 0.6]])
    assert high.read_images(image) == ["Hello World"]
    assert low.read_images(image) == ["Hello big World"]
    assert high(image, ['"hello world"'], [{}]).item() == 1.0
    assert low(image, ['"hello world"'], [{}]).item() == pytest.approx(1 - 3 / 10)
    high.engine = StubEngine(None)  # RapidOCR's answer when it detects no text
    assert high.read_images(image) == [""]
    with pytest.raises(RewardError, match="min_confidence"):
        build_reward("ocr", {"ocr": {"min_confidence": 1.5}})
