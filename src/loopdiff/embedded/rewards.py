"""Training rewards of the embedded world, shaped like T2I-CompBench's (docs/method.md, "Tasks and rewards").

- ``embedded_vqa``: split the prompt into noun phrases, ask the learned :class:`PhraseVQA` each one,
  take ``p(yes) / (p(yes) + p(no))`` and multiply over phrases (BLIP-VQA's use in T2I-CompBench).
- ``embedded_spatial``: ``0.25 s1 + 0.25 s2 + 0.5 pos`` over the learned :class:`GridDetector`
  (one found: ``0.25 s``; below 0.5 -> 0), ``s`` = objectness x probabilities of the named attributes.
- ``embedded_numeracy``: per object +0.5 if detected, +0.5 if detected as many times as asked; mean.
- ``embedded_alignment``: cosine of the :class:`ContrastiveAligner` embeddings (CLIPScore-like).
- ``embedded_compbench``: by ``metadata["category"]`` (or the parsed prompt's category): vqa for
  color/shape/texture, spatial, numeracy, and for complex T2I-CompBench's 3-in-1 mean of vqa,
  spatial (when the prompt has a relation) and alignment clipped to [0, 1].

Importing this module also registers the held-out ``embedded_eval`` (:mod:`.evaluator`), which shares
no code or weights with these rewards.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Sequence

import torch

from loopdiff.embedded.evaluator import WORLD_PROMPTS  # importing the evaluator registers embedded_eval
from loopdiff.embedded.prompts import (
    ObjectSpec,
    WorldPrompt,
    numeracy_score,
    parse_prompt,
    relation_holds,
    world_category,
)
from loopdiff.embedded.scorers import GridDetection, cached_scorer, encode_texts, missing_scorer_files, prepare_images
from loopdiff.rewards.base import RewardError, register_reward
from loopdiff.rewards.phrases import split_noun_phrases

class EmbeddedVQA:
    """Product over the prompt's noun phrases of the VQA scorer's ``p(yes) / (p(yes) + p(no))``."""

    def __init__(self, directory: str | Path | None = None, device: torch.device | str = "cpu", batch_size: int = 64):
        self.model, config = cached_scorer("vqa", directory, device)
        self.vocab = config["vocab"]
        self.device = torch.device(device)
        self.batch_size = batch_size

    @torch.no_grad()
    def phrase_logits(self, images: torch.Tensor, phrases: Sequence[Sequence[str]]) -> list[torch.Tensor]:
        """Per image, the ``(len(phrases[i]), 2)`` [yes, no] logits of its phrases (CPU float32)."""
        images = prepare_images(images, self.device)
        out: list[torch.Tensor] = []
        for start in range(0, images.shape[0], self.batch_size):
            chunk = phrases[start : start + self.batch_size]
            flat = [p for ps in chunk for p in ps]
            index = torch.tensor([i for i, ps in enumerate(chunk) for _ in ps], device=self.device)
            logits = self.model(images[start : start + len(chunk)], encode_texts(flat, self.vocab).to(self.device), index)
            out += list(logits.float().cpu().split([len(ps) for ps in chunk]))
        return out

    def __call__(self, images: torch.Tensor, prompts: Sequence[str], metadata: Sequence[Mapping[str, Any]]) -> torch.Tensor:
        phrases = [split_noun_phrases(p) for p in prompts]
        logits = self.phrase_logits(images, phrases)
        return torch.stack([l.softmax(dim=1)[:, 0].prod() for l in logits]).float()


def _confidence(spec: ObjectSpec, detection: GridDetection) -> float:
    """Objectness times the probabilities of the attributes the spec names."""
    score = detection.score
    for key in ("shape", "color", "texture"):
        if getattr(spec, key) is not None:
            score *= detection.probabilities[key]
    return score


class _DetectorReward:
    def __init__(self, directory: str | Path | None = None, device: torch.device | str = "cpu", threshold: float = 0.3):
        self.model, _ = cached_scorer("detector", directory, device)
        self.device = torch.device(device)
        self.threshold = threshold

    def detect(self, images: torch.Tensor) -> list[list[GridDetection]]:
        return self.model.detect(prepare_images(images, self.device), self.threshold)


def spatial_formula(prompt: WorldPrompt, detections: Sequence[GridDetection]) -> float:
    """T2I-CompBench's 2D-spatial score over detections of the first and last object of ``prompt``."""
    if prompt.relation is None:
        raise ValueError(f"prompt {prompt.text!r} has no spatial relation")
    best = []
    for spec in (prompt.objects[0], prompt.objects[-1]):
        found = [d for d in detections if spec.matches(d)]
        best.append(max(found, key=lambda d: _confidence(spec, d)) if found else None)
    one, two = best
    if one is not None and two is not None and one is not two:
        s1, s2 = _confidence(prompt.objects[0], one), _confidence(prompt.objects[-1], two)
        score = 0.25 * s1 + 0.25 * s2 + 0.5 * float(relation_holds(prompt.relation, one.box, two.box))
    elif one is not None:
        score = 0.25 * _confidence(prompt.objects[0], one)
    elif two is not None:
        score = 0.25 * _confidence(prompt.objects[-1], two)
    else:
        score = 0.0
    return score if score >= 0.5 else 0.0


class EmbeddedSpatial(_DetectorReward):
    """``0.25 s1 + 0.25 s2 + 0.5 pos`` (below 0.5 -> 0) over the grid detector."""

    def __call__(self, images: torch.Tensor, prompts: Sequence[str], metadata: Sequence[Mapping[str, Any]]) -> torch.Tensor:
        parsed = [parse_prompt(p) for p in prompts]
        return torch.tensor([spatial_formula(p, d) for p, d in zip(parsed, self.detect(images))], dtype=torch.float32)


class EmbeddedNumeracy(_DetectorReward):
    """Per asked object +0.5 found, +0.5 right count, averaged; over the grid detector."""

    def __call__(self, images: torch.Tensor, prompts: Sequence[str], metadata: Sequence[Mapping[str, Any]]) -> torch.Tensor:
        parsed = [parse_prompt(p) for p in prompts]
        return torch.tensor([numeracy_score(p, d) for p, d in zip(parsed, self.detect(images))], dtype=torch.float32)


class EmbeddedAlignment:
    """Cosine similarity of the contrastive image and caption embeddings (in [-1, 1])."""

    def __init__(self, directory: str | Path | None = None, device: torch.device | str = "cpu"):
        self.model, config = cached_scorer("aligner", directory, device)
        self.vocab = config["vocab"]
        self.device = torch.device(device)

    @torch.no_grad()
    def __call__(self, images: torch.Tensor, prompts: Sequence[str], metadata: Sequence[Mapping[str, Any]]) -> torch.Tensor:
        image_emb = self.model.encode_images(prepare_images(images, self.device))
        text_emb = self.model.encode_texts(encode_texts(prompts, self.vocab).to(self.device))
        return (image_emb * text_emb).sum(dim=1).float().cpu()


class EmbeddedCompBench:
    """Dispatch on the category (metadata, else the parsed prompt) to the matching embedded reward."""

    def __init__(self, directory: str | Path | None = None, device: torch.device | str = "cpu"):
        self.options = {"directory": directory, "device": device}
        self._rewards: dict[str, Any] = {}

    def _reward(self, name: str) -> Any:
        if name not in self._rewards:
            kind = {"vqa": EmbeddedVQA, "spatial": EmbeddedSpatial, "numeracy": EmbeddedNumeracy,
                    "alignment": EmbeddedAlignment}[name]
            self._rewards[name] = kind(**self.options)
        return self._rewards[name]

    @staticmethod
    def category(prompt: str, metadata: Mapping[str, Any]) -> str:
        try:
            return world_category(parse_prompt(prompt), metadata.get("category"))
        except ValueError as error:
            raise RewardError(f"reward 'embedded_compbench' scores embedded-world prompts only: {error}") from None

    def _complex(self, images: torch.Tensor, prompts: list[str], metadata: list[Mapping[str, Any]]) -> torch.Tensor:
        parts = [self._reward("vqa")(images, prompts, metadata),
                 self._reward("alignment")(images, prompts, metadata).clamp(0, 1)]
        spatial = torch.zeros(len(prompts))
        has_relation = torch.tensor([parse_prompt(p).relation is not None for p in prompts])
        if has_relation.any():
            index = has_relation.nonzero()[:, 0].tolist()
            spatial[index] = self._reward("spatial")(images[index], [prompts[i] for i in index], [metadata[i] for i in index])
        return (parts[0] + parts[1] + spatial) / (2 + has_relation.float())

    def __call__(self, images: torch.Tensor, prompts: Sequence[str], metadata: Sequence[Mapping[str, Any]]) -> torch.Tensor:
        metadata = list(metadata) if metadata else [{} for _ in prompts]
        categories = [self.category(p, m) for p, m in zip(prompts, metadata)]
        scores = torch.zeros(len(prompts), dtype=torch.float32)
        for category in dict.fromkeys(categories):
            index = [i for i, c in enumerate(categories) if c == category]
            sub_images, sub_prompts, sub_meta = images[index], [prompts[i] for i in index], [metadata[i] for i in index]
            if category == "complex":
                values = self._complex(sub_images, sub_prompts, sub_meta)
            else:
                name = {"spatial": "spatial", "numeracy": "numeracy"}.get(category, "vqa")
                values = self._reward(name)(sub_images, sub_prompts, sub_meta)
            scores[index] = values.float().cpu()
        return scores


@register_reward("embedded_vqa", description="embedded world: learned VQA, product over noun phrases of p(yes)",
                 check=missing_scorer_files("vqa"))
def embedded_vqa(directory: str | None = None, device: str = "cpu", batch_size: int = 64) -> EmbeddedVQA:
    return EmbeddedVQA(directory, device, batch_size)


@register_reward("embedded_spatial", description="embedded world: T2I-CompBench spatial formula over a learned grid detector",
                 check=missing_scorer_files("detector"), prompts=WORLD_PROMPTS)
def embedded_spatial(directory: str | None = None, device: str = "cpu", threshold: float = 0.3) -> EmbeddedSpatial:
    return EmbeddedSpatial(directory, device, threshold)


@register_reward("embedded_numeracy", description="embedded world: T2I-CompBench numeracy formula over a learned grid detector",
                 check=missing_scorer_files("detector"), prompts=WORLD_PROMPTS)
def embedded_numeracy(directory: str | None = None, device: str = "cpu", threshold: float = 0.3) -> EmbeddedNumeracy:
    return EmbeddedNumeracy(directory, device, threshold)


@register_reward("embedded_alignment", description="embedded world: cosine of a small contrastive image-text model",
                 check=missing_scorer_files("aligner"))
def embedded_alignment(directory: str | None = None, device: str = "cpu") -> EmbeddedAlignment:
    return EmbeddedAlignment(directory, device)


def _all_weights(options: Mapping[str, Any]) -> str | None:
    reasons = [r for r in (missing_scorer_files(n)(options) for n in ("vqa", "detector", "aligner")) if r]
    return "; ".join(reasons) or None


@register_reward("embedded_compbench",
                 description="embedded world by category: vqa (color/shape/texture), spatial, numeracy, complex 3-in-1",
                 check=_all_weights, prompts=WORLD_PROMPTS)
def embedded_compbench(directory: str | None = None, device: str = "cpu") -> EmbeddedCompBench:
    return EmbeddedCompBench(directory, device)
