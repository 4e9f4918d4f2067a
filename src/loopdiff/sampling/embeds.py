"""Prompt conditioning that is more than one token sequence, and the batch operations the policies need.

Stable Diffusion 1/2 condition the UNet on a tensor of text-encoder states (N, L, D). SD3 and SDXL also take
a pooled text vector per sample, and SDXL the size micro-conditioning ``time_ids`` (original size, crop
top-left, target size: 6 numbers per sample). :class:`PromptEmbeds` holds them together and indexes, slices,
``len``-s, concatenates and moves (``.device``, ``.to``) like a tensor along the batch dimension, which is
all the sampler, the trajectories store and the trainer do with prompt embeddings.

:func:`expand_rows` and :func:`cat_rows` apply to either kind of conditioning, so one policy serves both.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence, Union

import torch


@dataclass(frozen=True)
class PromptEmbeds:
    """A prompt's conditioning: ``sequence`` (N, L, D) token states, ``pooled`` (N, P) vectors and, for SDXL,
    ``time_ids`` (N, 6)."""

    sequence: torch.Tensor
    pooled: torch.Tensor
    time_ids: torch.Tensor | None = None

    def __post_init__(self) -> None:
        n = self.sequence.shape[0]
        if self.pooled.shape[0] != n:
            raise ValueError(f"{n} sequences but {self.pooled.shape[0]} pooled embeddings")
        if self.time_ids is not None and self.time_ids.shape[0] != n:
            raise ValueError(f"{n} sequences but {self.time_ids.shape[0]} rows of time ids")

    def __len__(self) -> int:
        return self.sequence.shape[0]

    def _map(self, fn: Any) -> "PromptEmbeds":
        """The embeddings with ``fn`` applied to each of their tensors."""
        return PromptEmbeds(fn(self.sequence), fn(self.pooled), None if self.time_ids is None else fn(self.time_ids))

    def __getitem__(self, index: Any) -> "PromptEmbeds":
        if isinstance(index, int):
            index = slice(index, index + 1)  # keep the batch dimension
        return self._map(lambda t: t[index])

    @property
    def device(self) -> torch.device:
        return self.sequence.device

    @property
    def dtype(self) -> torch.dtype:
        return self.sequence.dtype

    def to(self, *args: Any, **kwargs: Any) -> "PromptEmbeds":
        return self._map(lambda t: t.to(*args, **kwargs))

    def expand(self, n: int) -> "PromptEmbeds":
        """A batch of ``n`` copies of a single embedding (shape (1, ...)); any other batch is returned as is."""
        if len(self) == n:
            return self
        return self._map(lambda t: t.expand(n, *t.shape[1:]))

    @staticmethod
    def cat(parts: Sequence["PromptEmbeds"]) -> "PromptEmbeds":
        with_ids = {p.time_ids is not None for p in parts}
        if len(with_ids) > 1:
            raise ValueError("cannot concatenate prompt embeddings with and without time ids")
        return PromptEmbeds(
            torch.cat([p.sequence for p in parts]),
            torch.cat([p.pooled for p in parts]),
            torch.cat([p.time_ids for p in parts]) if with_ids == {True} else None,  # type: ignore[misc]
        )


Conditioning = Union[torch.Tensor, PromptEmbeds]
"""What a policy conditions on: text-encoder states (N, L, D), or :class:`PromptEmbeds`."""


def expand_rows(embeds: Conditioning, n: int) -> Conditioning:
    """``n`` rows of ``embeds``: copies of a single row, or the batch itself when it has ``n`` rows."""
    if isinstance(embeds, PromptEmbeds):
        return embeds.expand(n)
    return embeds.expand(n, *embeds.shape[1:])


def cat_rows(parts: Sequence[Conditioning]) -> Conditioning:
    """The batches ``parts`` one after the other."""
    if all(isinstance(p, PromptEmbeds) for p in parts):
        return PromptEmbeds.cat(parts)  # type: ignore[arg-type]
    if any(isinstance(p, PromptEmbeds) for p in parts):
        raise TypeError("cannot concatenate PromptEmbeds with plain text-encoder states")
    return torch.cat(parts)  # type: ignore[arg-type]
