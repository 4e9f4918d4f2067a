"""Prompt sources: where the training and validation prompts come from.

A source spec is one of
- ``<scheme>:<argument>`` for a scheme a plugin registered (``loopdiff.plugins.register_prompt_source``),
  such as ``embedded:<category>`` / ``embedded:<category>:val``, the embedded world's shipped prompt files;
- a path to a text file with one prompt per line (T2I-CompBench's ``color_train.txt``, DDPO's
  ``simple_animals.txt``, ...); the file's stem (up to the first ``_``) becomes the ``category`` metadata;
- a JSON Lines file (suffix ``.jsonl``): one object per line, ``{"prompt": ..., <metadata fields>}`` (GenEval's
  ``{"prompt": ..., "tag": "counting", "include": [{"class": "dog", "count": 2}]}``, T2I-CompBench's
  ``category``, ...); the other fields are the prompt's metadata, which every reward receives, with
  ``category`` the file's stem unless the line gives one;
- ``<path>`` may also be given as ``file:<path>``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from loopdiff.plugins import registered_prompt_sources


class PromptError(ValueError):
    """A prompt source cannot be read."""


@dataclass(frozen=True)
class PromptSet:
    """A fixed list of prompts with one metadata dict each."""

    prompts: tuple[str, ...]
    metadata: tuple[Mapping[str, Any], ...]
    name: str = ""

    def __len__(self) -> int:
        return len(self.prompts)

    def sample(self, n: int, rng: np.random.Generator) -> list[int]:
        """``n`` prompt indices: distinct while the set is large enough, with replacement beyond."""
        if n <= len(self.prompts):
            return rng.choice(len(self.prompts), size=n, replace=False).tolist()
        return rng.choice(len(self.prompts), size=n, replace=True).tolist()

    def head(self, n: int | None) -> "PromptSet":
        if n is None:
            return self
        return PromptSet(self.prompts[:n], self.metadata[:n], self.name)


def prompt_set_from_lines(lines: list[str], category: str, name: str) -> PromptSet:
    """The non-blank ``lines`` as prompts of metadata ``{"category": category}``; a PromptError if none."""
    prompts = tuple(line.strip() for line in lines if line.strip())
    if not prompts:
        raise PromptError(f"prompt source '{name}' holds no prompts")
    return PromptSet(prompts, tuple({"category": category} for _ in prompts), name)


def load_prompt_set(spec: str) -> PromptSet:
    """Read the prompts named by ``spec`` (see the module docstring)."""
    sources = registered_prompt_sources()
    scheme, sep, argument = spec.partition(":")
    if sep and scheme in sources:
        return sources[scheme].resolve(argument, spec)
    path = Path(spec.removeprefix("file:")).expanduser()
    if not path.is_file():
        usages = "".join(f", or {source.usage}" for source in sources.values())
        problem = "is a directory" if path.is_dir() else "does not exist"
        raise PromptError(f"prompt file '{path}' {problem} (give a text file with one prompt per line{usages})")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise PromptError(f"prompt file '{path}' is not UTF-8 text ({error.reason} at byte {error.start})") from None
    category = path.stem.split("_")[0]
    if path.suffix == ".jsonl":
        return prompt_set_from_json_lines(text.splitlines(), category, spec)
    return prompt_set_from_lines(text.splitlines(), category, spec)


def prompt_set_from_json_lines(lines: list[str], category: str, name: str) -> PromptSet:
    """The prompts of JSON Lines ``{"prompt": ..., <metadata>}`` (blank lines skipped), each with its other
    fields as metadata (``category`` defaulting to ``category``); a PromptError naming the first bad line."""
    prompts, metadata = [], []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise PromptError(f"prompt file '{name}' line {number} is not JSON ({error.msg})") from None
        prompt = record.get("prompt") if isinstance(record, dict) else None
        if not isinstance(prompt, str) or not prompt.strip():
            raise PromptError(f"prompt file '{name}' line {number} is not an object with a non-empty \"prompt\" "
                              f"string: {line.strip()[:120]}")
        prompts.append(prompt.strip())
        metadata.append({"category": category, **{k: v for k, v in record.items() if k != "prompt"}})
    if not prompts:
        raise PromptError(f"prompt source '{name}' holds no prompts")
    return PromptSet(tuple(prompts), tuple(metadata), name)
