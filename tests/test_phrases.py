"""Noun-phrase splitting of T2I-CompBench prompts (rule-based, offline)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from loopdiff.rewards.phrases import split_noun_phrases

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "t2i-compbench"
ATTRIBUTE_FILES = ("color", "shape", "texture")
# "a X Y and a Z W" with single words, and its generalisation to several modifier words per object.
TWO_BY_TWO = re.compile(r"^(an?) ([\w-]+) ([\w-]+) and (an?) ([\w-]+) ([\w-]+)$")
ARTICLE_AND_ARTICLE = re.compile(r"^(an? [a-z' -]+?) and (an? [a-z' -]+)$")
FUNCTION_WORDS = {"of", "with", "in", "on", "and", "the", "to", "for", "behind", "next", "has", "is"}


def attribute_prompts() -> list[str]:
    if not DATA.is_dir():
        pytest.skip(f"T2I-CompBench prompt files not found at {DATA}")
    files = sorted(p for p in DATA.glob("*.txt") if p.name.split("_")[0].split(".")[0] in ATTRIBUTE_FILES)
    if not files:
        pytest.skip(f"no color/shape/texture prompt files in {DATA}")
    prompts = {line.strip() for path in files for line in path.read_text().splitlines() if line.strip()}
    return sorted(prompts)


def test_every_attribute_prompt_gives_ordered_disjoint_substrings():
    prompts = attribute_prompts()
    assert len(prompts) > 2000  # color, shape, texture: train + val files
    for prompt in prompts:
        phrases = split_noun_phrases(prompt)
        assert phrases, prompt
        position = 0
        for phrase in phrases:
            found = prompt.find(phrase, position)
            assert found >= 0, (prompt, phrases)  # a substring, after the previous phrase
            position = found + len(phrase)
            assert phrase == phrase.strip() and phrase.lower() not in {"a", "an", "the"}


def test_two_object_prompts_split_into_their_two_halves():
    prompts = attribute_prompts()
    two_by_two = [p for p in prompts if TWO_BY_TWO.match(p)]
    assert len(two_by_two) > 500
    for prompt in two_by_two:
        first, second = prompt.split(" and ")
        assert split_noun_phrases(prompt) == [first, second], prompt
    # Multi-word objects ("a spherical bean bag chair") with no other function word split the same way.
    plain = [
        p
        for p in prompts
        if ARTICLE_AND_ARTICLE.match(p)
        and p.count(" and ") == 1
        and not (FUNCTION_WORDS | {"a", "an"}) & set(p.lower().split()[1:]) - {"and", "a", "an"}
        and p.lower().split().count("a") + p.lower().split().count("an") == 2
    ]
    assert len(plain) > len(two_by_two)
    for prompt in plain:
        assert split_noun_phrases(prompt) == prompt.split(" and "), prompt


@pytest.mark.parametrize(
    "prompt, expected",
    [
        ("a red circle and a blue square", ["a red circle", "a blue square"]),
        ("a striped triangle and a dotted star", ["a striped triangle", "a dotted star"]),
        ("a green bench and a red car", ["a green bench", "a red car"]),
        ("rubber gloves and a fluffy teddy bear", ["rubber gloves", "a fluffy teddy bear"]),
        ("A black and white cat sits in a black sink.", ["A black and white cat", "a black sink"]),
        ("A man wearing a black hat and a red scarf", ["A man", "a black hat", "a red scarf"]),
        ("A grey motorcycle is parked on black cobblestones.", ["A grey motorcycle", "black cobblestones"]),
        ("a balloon on the top of a giraffe", ["a balloon", "a giraffe"]),
        ("a horse on the right of a man", ["a horse", "a man"]),
        (
            "The wooden salad bowl and plastic tongs mix the metallic greens.",
            ["The wooden salad bowl", "plastic tongs", "the metallic greens"],
        ),
        ("two cups and three bowls", ["two cups", "three bowls"]),
        ("a cubic box of chocolates", ["a cubic box", "chocolates"]),
    ],
)
def test_world_and_sentence_prompts(prompt, expected):
    assert split_noun_phrases(prompt) == expected


def test_prompt_without_phrase_falls_back_to_whole_prompt():
    assert split_noun_phrases("  on and with  ") == ["on and with"]
    assert split_noun_phrases("") == []


def test_unknown_backend_is_named():
    with pytest.raises(ValueError, match="'nltk'"):
        split_noun_phrases("a cat", backend="nltk")


def test_counted_plural_nouns_are_not_verbs() -> None:
    assert split_noun_phrases("three green circles and one blue hexagon") == [
        "three green circles",
        "one blue hexagon",
    ]
    assert split_noun_phrases("four dotted circles") == ["four dotted circles"]
    assert split_noun_phrases("two red stars and a blue square") == ["two red stars", "a blue square"]
