"""Gradient estimators as data: an advantage kind + a loss kind + how samples are reused.

An estimator carries the functions its kinds name (``advantage_function()``, ``loss_fn``); the training loop
(:mod:`loopdiff.training.loop`) calls them, so for LOOP it runs ``leave_one_out`` (Eq. 14) and ``ppo_clip_loss``
(Eq. 13).

The formulas, and where the code departs from the LOOP paper, are in docs/method.md ("Gradient estimators").

| preset         | K | advantage      | loss           | optimiser steps per batch | reference          |
|----------------|---|----------------|----------------|---------------------------|--------------------|
| ``reinforce``    | 1 | raw            | score_function | 1 (no reuse)              | Eq. 7              |
| ``reinforce_bc`` | 1 | prompt_mean    | score_function | 1                         | Eq. 8              |
| ``rloo``         | 4 | leave_one_out  | score_function | 1                         | Eq. 9              |
| ``ppo`` (DDPO)   | 1 | stat_tracker   | ppo_clip       | 4 (importance sampling)   | Eq. 3, Eq. 10      |
| ``loop``         | 4 | leave_one_out  | ppo_clip       | 4                         | Eq. 13, Eq. 14     |
| ``grpo``         | 4 | group_zscore   | ppo_clip + KL  | 4                         | ablation           |

LOOP (Eq. 13-14), for K trajectories x^1..x^K of prompt c sampled from pi_old:

    A^i = r^i - 1/(K-1) sum_{j != i} r^j
    L   = -1/K sum_i 1/T sum_t min( rho_t^i A^i, clip(rho_t^i, 1 - eps, 1 + eps) A^i ),
    rho_t^i = pi_theta(x^i_{t-1} | x^i_t, c) / pi_old(x^i_{t-1} | x^i_t, c)

with no reward-std normalisation, no KL penalty and no length normalisation.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from typing import Any, Literal, get_args

from loopdiff.advantages import (
    ADVANTAGE_KINDS,
    BATCH_ADVANTAGES,
    TRACKED_ADVANTAGES,
    AdvantageFunction,
    AdvantageKind,
    GroupAdvantage,
    PerPromptStatTracker,
)
from loopdiff.checks import above, at_least, failed_field, up_to_inf
from loopdiff.objectives import LOSS_KINDS, LOSSES, LossFn, LossKind


@dataclass(frozen=True)
class Estimator:
    """Everything that distinguishes one estimator from another; the training loop is shared."""

    name: str = field(metadata={"help": "the preset's name, recorded with the run"})
    advantage: AdvantageKind = field(metadata={"help": "how rewards become advantages (docs/method.md)"})
    loss: LossKind = field(metadata={"help": "the per-(sample, step) loss: score_function (REINFORCE) or ppo_clip"})
    samples_per_prompt: int = field(default=1, metadata={"help": "K: trajectories sampled per prompt",
                                                         "check": at_least(1)})
    inner_epochs: int = field(default=1, metadata={"help": "passes over each batch of samples", "check": at_least(1)})
    minibatches: int = field(default=1, metadata={"help": "optimiser steps per pass over a batch", "check": at_least(1)})
    clip_range: float = field(default=1e-4, metadata={"help": "ppo_clip: the ratio is clipped to 1 +- this",
                                                         "check": above(0)})
    advantage_clip: float | None = field(
        default=None, metadata={"help": "advantages are clipped to +- this, if set (inf: not clipped)",
                                "check": up_to_inf(0)}
    )
    kl_coef: float = field(default=0.0, metadata={"help": "weight of the KL penalty to the reference (base) policy",
                                                   "check": at_least(0, "a number")})
    tracker_buffer_size: int = field(
        default=32, metadata={"help": "prompt_mean, stat_tracker: rewards buffered per prompt", "check": at_least(1)}
    )
    tracker_min_count: int = field(
        default=16, metadata={"help": "prompt_mean, stat_tracker: with fewer buffered, the batch's statistics",
                               "check": at_least(0)}
    )

    def __post_init__(self) -> None:
        if self.advantage not in ADVANTAGE_KINDS:
            raise ValueError(f"estimator.advantage={self.advantage!r}; allowed: {', '.join(ADVANTAGE_KINDS)}")
        if self.loss not in LOSS_KINDS:
            raise ValueError(f"estimator.loss={self.loss!r}; allowed: {', '.join(LOSS_KINDS)}")
        failed = failed_field(self)  # each field's range, declared with it
        if failed is not None:
            name, value, check = failed
            raise ValueError(f"estimator.{name}={value!r} is invalid; allowed: {check.describe()}")
        group_wise = self.advantage in ("leave_one_out", "group_zscore")
        if group_wise and self.samples_per_prompt < 2:
            raise ValueError(
                f"estimator.samples_per_prompt={self.samples_per_prompt} but advantage '{self.advantage}' "
                "needs K >= 2 samples per prompt"
            )

    @property
    def reuses_samples(self) -> bool:
        """More than one optimiser step per batch of samples, so the ratio pi_theta / pi_old matters."""
        return self.inner_epochs * self.minibatches > 1

    def advantage_function(self) -> AdvantageFunction:
        """A fresh ``(rewards, group_ids, prompts) -> advantages`` of the advantage kind: the batch kind's function
        (LOOP: ``leave_one_out``, Eq. 14), or a new per-prompt tracker for a tracked kind (its state is the
        prompts' reward history, checkpointed with the run)."""
        if self.advantage in TRACKED_ADVANTAGES:
            use_std = TRACKED_ADVANTAGES[self.advantage]
            return PerPromptStatTracker(self.tracker_buffer_size, self.tracker_min_count, use_std=use_std)
        return GroupAdvantage(BATCH_ADVANTAGES[self.advantage])

    @property
    def loss_fn(self) -> LossFn:
        """The loss kind's function (LOOP: ``ppo_clip_loss``, Eq. 13); ``objectives.apply_loss`` passes it the
        inputs it takes."""
        return LOSSES[self.loss]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


PRESETS: dict[str, Estimator] = {
    "reinforce": Estimator("reinforce", advantage="raw", loss="score_function"),
    "reinforce_bc": Estimator("reinforce_bc", advantage="prompt_mean", loss="score_function"),
    "rloo": Estimator("rloo", advantage="leave_one_out", loss="score_function", samples_per_prompt=4),
    "ppo": Estimator("ppo", advantage="stat_tracker", loss="ppo_clip", minibatches=4, advantage_clip=5.0),
    "loop": Estimator("loop", advantage="leave_one_out", loss="ppo_clip", samples_per_prompt=4, minibatches=4),
    "grpo": Estimator(
        "grpo", advantage="group_zscore", loss="ppo_clip", samples_per_prompt=4, minibatches=4, kl_coef=0.04
    ),
}
PRESETS["ddpo"] = replace(PRESETS["ppo"], name="ddpo")
PresetName = Literal["reinforce", "reinforce_bc", "rloo", "ppo", "loop", "grpo", "ddpo"]
assert get_args(PresetName) == tuple(PRESETS), "PresetName lists the presets in their order"


def estimator_from_preset(preset: str, **overrides: Any) -> Estimator:
    """The named preset with any fields overridden (``None`` values keep the preset's)."""
    if preset not in PRESETS:
        raise ValueError(f"unknown estimator preset {preset!r}; allowed: {', '.join(PRESETS)}")
    changes = {k: v for k, v in overrides.items() if v is not None}
    return replace(PRESETS[preset], **changes)

