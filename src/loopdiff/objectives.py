"""Per-(sample, step) losses whose gradients are the estimators of docs/method.md ("Gradient estimators").

Every loss is a mean over the (sample, step) pairs of a minibatch, so the gradient is Eq. 7-13 divided by
the number of pairs (a constant the learning rate absorbs).

- ``score_function`` (REINFORCE Eq. 7, with baseline Eq. 8, RLOO Eq. 9):
      L = -mean( A * log pi_theta(x_{t-1} | x_t, c) )
- ``ppo_clip`` (PPO/DDPO Eq. 3, LOOP Eq. 13):
      rho = pi_theta / pi_old,   L = -mean( min( rho * A, clip(rho, 1 - eps, 1 + eps) * A ) )
- optional KL penalty to the reference policy (DPOK/GRPO; off in the paper):
      L += beta * mean( KL(pi_theta || pi_ref) ), with the exact Gaussian KL of a step
      ||mu_theta - mu_ref||^2 / (2 sigma^2) (same sigma for both), reduced like the log-probs.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from functools import cache
from typing import Callable, Literal, get_args

import torch

LossKind = Literal["score_function", "ppo_clip"]
LOSS_KINDS: tuple[str, ...] = get_args(LossKind)


@dataclass
class LossOutput:
    """The loss to minimise and detached diagnostics."""

    loss: torch.Tensor
    approx_kl: torch.Tensor  # 0.5 * mean((log rho)^2), DDPO's estimate of KL(pi_old || pi_theta)
    clip_fraction: torch.Tensor  # share of pairs where |rho - 1| > eps
    kl_penalty: torch.Tensor


def score_function_loss(log_probs: torch.Tensor, advantages: torch.Tensor) -> torch.Tensor:
    """-mean(A * log pi): REINFORCE's surrogate (Eq. 7-9); no importance sampling."""
    return -(advantages * log_probs).mean()


def ppo_clip_loss(
    log_probs: torch.Tensor, old_log_probs: torch.Tensor, advantages: torch.Tensor, clip_range: float
) -> torch.Tensor:
    """-mean(min(rho A, clip(rho, 1 - eps, 1 + eps) A)) with rho = pi_theta / pi_old (Eq. 3, Eq. 13)."""
    ratio = torch.exp(log_probs - old_log_probs)
    unclipped = ratio * advantages
    clipped = torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range) * advantages
    return -torch.minimum(unclipped, clipped).mean()


LossFn = Callable[..., torch.Tensor]
# the loss by kind; each takes the inputs it names, of log_probs, old_log_probs, advantages and clip_range
LOSSES: dict[str, LossFn] = {"score_function": score_function_loss, "ppo_clip": ppo_clip_loss}
LOSS_INPUTS = ("log_probs", "old_log_probs", "advantages", "clip_range")


@cache
def loss_inputs(loss_fn: LossFn) -> tuple[str, ...]:
    """The inputs ``loss_fn`` takes, by name (a subset of ``LOSS_INPUTS``)."""
    return tuple(inspect.signature(loss_fn).parameters)


def apply_loss(
    loss_fn: LossFn, log_probs: torch.Tensor, old_log_probs: torch.Tensor, advantages: torch.Tensor, clip_range: float
) -> torch.Tensor:
    """``loss_fn`` on the inputs it takes: score_function on ``(log_probs, advantages)``, ppo_clip on all four."""
    given = {"log_probs": log_probs, "old_log_probs": old_log_probs, "advantages": advantages, "clip_range": clip_range}
    return loss_fn(**{name: given[name] for name in loss_inputs(loss_fn)})


def gaussian_step_kl(
    mean: torch.Tensor, ref_mean: torch.Tensor, std: torch.Tensor, reduction: str = "mean"
) -> torch.Tensor:
    """KL(N(mean, std^2 I) || N(ref_mean, std^2 I)) per sample, averaged or summed over dimensions."""
    per_dim = (mean.float() - ref_mean.float()) ** 2 / (2 * std.float().reshape(-1, *[1] * (mean.ndim - 1)) ** 2)
    per_dim = per_dim.flatten(1)
    return per_dim.mean(1) if reduction == "mean" else per_dim.sum(1)


def policy_loss(
    loss_fn: LossFn,
    log_probs: torch.Tensor,
    old_log_probs: torch.Tensor,
    advantages: torch.Tensor,
    clip_range: float = 1e-4,
    step_kl: torch.Tensor | None = None,
    kl_coef: float = 0.0,
) -> LossOutput:
    """``loss_fn``'s minibatch loss plus ``kl_coef * mean(step_kl)`` when a KL term is given, with diagnostics."""
    loss = apply_loss(loss_fn, log_probs, old_log_probs, advantages, clip_range)
    kl_penalty = torch.zeros((), device=loss.device)
    if step_kl is not None and kl_coef > 0:
        kl_penalty = step_kl.mean()
        loss = loss + kl_coef * kl_penalty
    with torch.no_grad():
        log_ratio = log_probs - old_log_probs
        approx_kl = 0.5 * (log_ratio**2).mean()
        clip_fraction = ((torch.exp(log_ratio) - 1.0).abs() > clip_range).float().mean()
    return LossOutput(loss, approx_kl, clip_fraction, kl_penalty.detach())
