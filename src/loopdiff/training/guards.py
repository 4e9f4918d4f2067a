"""Keeping non-finite numbers out of training: rewards, optimiser steps and saved weights.

- A sample whose reward is NaN or infinite is dropped with its whole prompt group before advantages;
  the run stops when more than ``training.max_nonfinite_fraction`` of an epoch's rewards are non-finite.
- An optimiser step whose loss or gradient norm is non-finite is skipped; the run stops when more than
  ``training.max_skipped_fraction`` of an epoch's steps are skipped. Under DeepSpeed the engine skips it (its
  overflow check), and the run stops if it did not.
- Weights with a non-finite value are never written (checkpoint or export).
"""

from __future__ import annotations

import math
from typing import Iterable

import torch

from loopdiff.advantages import finite_groups


class NonFiniteError(RuntimeError):
    """Training met more non-finite values than it tolerates; the message says what and where."""


def nonfinite_names(named: Iterable[tuple[str, torch.Tensor]]) -> list[str]:
    """The names of the tensors holding a NaN or an infinity."""
    return [name for name, value in named if not bool(torch.isfinite(value.detach()).all())]


def check_finite_weights(named: Iterable[tuple[str, torch.Tensor]], what: str) -> None:
    """Raise NonFiniteError naming the first bad tensors before ``what`` (a checkpoint, an export) is written."""
    refuse_nonfinite_weights(nonfinite_names(named), what)


def refuse_nonfinite_weights(bad: list[str], what: str) -> None:
    """Raise NonFiniteError naming the first of the non-finite tensors ``bad``, if any, before ``what`` is written."""
    if bad:
        shown = ", ".join(bad[:3]) + (f" and {len(bad) - 3} more" if len(bad) > 3 else "")
        raise NonFiniteError(f"refusing to write {what}: non-finite weights in {shown}")


def check_skipped_steps(skipped: int, steps: int, max_fraction: float, epoch: int) -> None:
    """Raise NonFiniteError when more than ``max_fraction`` of an epoch's optimiser steps were skipped."""
    if skipped > max_fraction * steps:
        raise NonFiniteError(
            f"{skipped} of {steps} optimiser steps in epoch {epoch} had a non-finite loss or gradient norm "
            f"(more than training.max_skipped_fraction={max_fraction:g}); stopping"
        )


def check_engine_step(applied: bool, grad_norm: float) -> None:
    """Raise NonFiniteError when DeepSpeed applied an optimiser step whose gradient norm was not finite (or its
    -1 for one): the DeepSpeed loopdiff was tested with (0.19.8) skips such a step."""
    if applied and not (math.isfinite(grad_norm) and grad_norm >= 0):
        raise NonFiniteError(f"DeepSpeed took an optimiser step with the gradient norm {grad_norm:g} instead of "
                             "skipping it, so the weights may no longer be finite; stopping (loopdiff was tested "
                             "with deepspeed 0.19.8, which skips such steps)")


def check_nonfinite_rewards(
    reward: str, nonfinite: int, total: int, max_fraction: float, epoch: int, too_few_left: str | None
) -> None:
    """Raise NonFiniteError when too many rewards are non-finite or too few samples remain (``too_few_left``)."""
    head = f"reward '{reward}' was non-finite for {nonfinite} of {total} images in epoch {epoch}"
    if nonfinite > max_fraction * total:
        raise NonFiniteError(f"{head} (more than training.max_nonfinite_fraction={max_fraction:g}); stopping")
    if too_few_left is not None:
        raise NonFiniteError(f"{head}: {too_few_left}; stopping")


def finite_sample_mask(
    rewards: torch.Tensor, group_ids: torch.Tensor, reward: str, epoch: int, max_fraction: float, processes: int,
    pairs_per_sample: int, minibatches: int,
) -> tuple[torch.Tensor, dict[str, float], str | None]:
    """The mask over all processes' samples of the groups with only finite rewards, the counts as metrics
    (``nonfinite_rewards``, ``dropped_groups``) and a warning line when a group was dropped (None otherwise).

    Raises NonFiniteError when more than ``max_fraction`` of the rewards are non-finite, or when a process is
    left with fewer (sample, step) pairs than the epoch's ``minibatches`` optimiser steps need."""
    keep = finite_groups(rewards, group_ids)
    nonfinite, dropped = int((~torch.isfinite(rewards)).sum()), int(group_ids[~keep].unique().numel())
    counts = {"nonfinite_rewards": float(nonfinite), "dropped_groups": float(dropped)}
    if nonfinite == 0:
        return keep, counts, None
    check_nonfinite_rewards(reward, nonfinite, len(rewards), max_fraction, epoch,
                            _too_few_left(keep, processes, pairs_per_sample, minibatches))
    warning = (f"warning: reward '{reward}' was non-finite for {nonfinite} of {len(rewards)} images in epoch {epoch}; "
               f"dropped their {dropped} prompt group(s) ({int((~keep).sum())} images)")
    return keep, counts, warning


def _too_few_left(keep: torch.Tensor, processes: int, pairs_per_sample: int, minibatches: int) -> str | None:
    """Why the kept samples cannot fill the epoch's optimiser steps on some process, or None."""
    if not bool(keep.any()):
        return "no prompt group with only finite rewards remains"
    pairs = keep.view(processes, -1).sum(1) * pairs_per_sample
    short = (pairs < minibatches).nonzero().flatten().tolist()
    if not short:
        return None
    return f"process {short[0]} keeps {int(pairs[short[0]])} (sample, step) pairs, fewer than estimator.minibatches={minibatches}"
