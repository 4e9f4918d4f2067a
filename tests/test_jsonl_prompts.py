"""JSON Lines prompt files: each line's fields besides "prompt" are the metadata every reward receives."""

from __future__ import annotations

import json

import pytest
import torch

from loopdiff.prompts import PromptError, load_prompt_set
from trainer_helpers import make_trainer

RECORDS = [
    {"prompt": "a red circle", "tag": "colors", "include": [{"class": "circle", "count": 1, "color": "red"}]},
    {"prompt": "two blue squares", "tag": "counting", "include": [{"class": "square", "count": 2}]},
    {"prompt": "a cat left of a dog", "tag": "position", "category": "spatial",
     "include": [{"class": "cat", "count": 1}, {"class": "dog", "count": 1, "position": ["right of", 0]}]},
]


def _write(path, records) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in records) + "\n")
    return str(path)


def _expected(record: dict, category: str) -> dict:
    return {"category": category, **{k: v for k, v in record.items() if k != "prompt"}}


def test_jsonl_lines_become_prompts_with_their_metadata(tmp_path) -> None:
    prompt_set = load_prompt_set(_write(tmp_path / "geneval_train.jsonl", RECORDS))
    assert prompt_set.prompts == tuple(r["prompt"] for r in RECORDS)
    assert list(prompt_set.metadata) == [_expected(r, "geneval") if "category" not in r else _expected(r, "spatial")
                                         for r in RECORDS]


def test_rewards_receive_each_prompts_metadata_in_training_and_evaluation(tmp_path) -> None:
    path = _write(tmp_path / "meta_train.jsonl", RECORDS)
    expected = {r["prompt"]: _expected(r, r.get("category", "meta")) for r in RECORDS}
    received: list[tuple[str, dict]] = []

    def recording(images, prompts, metadata):
        received.extend(zip(prompts, metadata))
        return torch.zeros(len(prompts))

    trainer = make_trainer(tmp_path, "ppo", reward=recording, prompts={"train": path, "val": path},
                           eval={"images_per_prompt": 2, "max_prompts": 3})
    trainer.train()
    assert len(received) == 3 * 2 * 2 + 8  # base and final evaluations, one epoch of 8 samples
    for prompt, metadata in received:
        assert dict(metadata) == expected[prompt]


@pytest.mark.parametrize("line, problem", [
    ("{not json", "line 2 is not JSON"),
    ('["a list"]', 'line 2 is not an object with a non-empty "prompt" string'),
    ('{"text": "no prompt field"}', 'line 2 is not an object with a non-empty "prompt" string'),
])
def test_a_bad_line_is_named(tmp_path, line: str, problem: str) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(RECORDS[0]) + "\n" + line + "\n")
    with pytest.raises(PromptError, match=problem):
        load_prompt_set(str(path))
