"""One DDIM step as a Gaussian policy step, with its log-probability.

See docs/method.md, "The policy step and its log-probability".

For eta > 0 the DDIM update is ``x_{t-1} = mean_t + sigma_t * z`` with

    x0_hat  = (x_t - sqrt(1 - abar_t) * eps_hat) / sqrt(abar_t)
    sigma_t = eta * sqrt((1 - abar_prev) / (1 - abar_t)) * sqrt(1 - abar_t / abar_prev)
    mean_t  = sqrt(abar_prev) * x0_hat + sqrt(1 - abar_prev - sigma_t^2) * eps_hat

so ``log pi(x_{t-1} | x_t, c) = log N(x_{t-1}; mean_t, sigma_t^2 I)``, computed in float32.

Timesteps are per sample (a tensor of shape ``(B,)``), so one call can hold (sample, timestep) pairs from
different points of different trajectories: the trainer stacks them into one UNet call.

Log-probability reduction: ``"mean"`` (default, as DDPO) averages the per-dimension Gaussian log-density over
the C*H*W latent dimensions; ``"sum"`` gives the true log-density of the step. The importance ratio
``exp(logp_new - logp_old)`` is then the D-th root of the true ratio under ``"mean"`` (D = C*H*W), which is why
DDPO's clip range of 1e-4 is sensible there; with ``"sum"`` use a correspondingly larger clip range.
"""

from __future__ import annotations

import math
import weakref
from dataclasses import dataclass
from typing import Literal

import torch
from diffusers import DDIMScheduler

from loopdiff.transfer import to_device

LogProbReduction = Literal["mean", "sum"]
_LOG_SQRT_2PI = 0.5 * math.log(2 * math.pi)
_ALPHA_TABLES: "weakref.WeakKeyDictionary[DDIMScheduler, dict[str, torch.Tensor]]" = weakref.WeakKeyDictionary()
_CHECKED_SCHEDULES: "weakref.WeakKeyDictionary[DDIMScheduler, set[int]]" = weakref.WeakKeyDictionary()


@dataclass(frozen=True)
class DDIMStepOutput:
    """``prev_sample`` = x_{t-1}; ``log_prob`` = log pi(x_{t-1} | x_t, c) per sample, ``None`` when eta = 0."""

    prev_sample: torch.Tensor
    log_prob: torch.Tensor | None
    mean: torch.Tensor
    std: torch.Tensor


def previous_timestep(scheduler: DDIMScheduler, timestep: torch.Tensor) -> torch.Tensor:
    """The timestep a DDIM step lands on, as diffusers' DDIMScheduler computes it."""
    return timestep - scheduler.config.num_train_timesteps // scheduler.num_inference_steps


def _alpha_table(scheduler: DDIMScheduler, device: torch.device) -> torch.Tensor:
    """``[final_alpha_cumprod, alphas_cumprod[0], ...]`` in float32 on ``device``, made once per scheduler and
    device (a copy per step would make each step wait for the host)."""
    tables = _ALPHA_TABLES.setdefault(scheduler, {})
    if str(device) not in tables:
        with torch.inference_mode(False), torch.no_grad():  # usable by sampling and training alike
            final = torch.as_tensor(scheduler.final_alpha_cumprod, dtype=torch.float32).reshape(1)
            tables[str(device)] = torch.cat([final, scheduler.alphas_cumprod.float()]).to(device)
    return tables[str(device)]


def _alpha_bars(scheduler: DDIMScheduler, timestep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(abar_t, abar_prev) per timestep; a step landing before 0 takes ``final_alpha_cumprod`` (entry 0)."""
    table = _alpha_table(scheduler, timestep.device)
    prev = previous_timestep(scheduler, timestep)
    return table[timestep.long() + 1], table[prev.clamp(min=-1).long() + 1]


def check_positive_variance(scheduler: DDIMScheduler) -> None:
    """Refuse a schedule with a zero-variance step (no density for eta > 0); checked on the host, once per
    scheduler and number of steps, so the step itself never waits for the device."""
    checked = _CHECKED_SCHEDULES.setdefault(scheduler, set())
    if scheduler.num_inference_steps in checked:
        return
    timesteps = scheduler.timesteps.cpu()
    abar_t, abar_prev = _alpha_bars(scheduler, timesteps)
    if bool((((1 - abar_prev) / (1 - abar_t) * (1 - abar_t / abar_prev)) <= 0).any()):
        raise ValueError(
            "a DDIM step with eta > 0 has zero variance at the last step; use a scheduler config with "
            "set_alpha_to_one=False (as Stable Diffusion's) so every step is a proper Gaussian"
        )
    checked.add(scheduler.num_inference_steps)


def _broadcast(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return values.reshape(-1, *([1] * (like.ndim - 1)))


def predicted_x0_and_eps(
    scheduler: DDIMScheduler, model_output: torch.Tensor, sample: torch.Tensor, abar_t: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Convert the model output (epsilon, v or sample prediction) to (x0_hat, eps_hat)."""
    a = _broadcast(abar_t, sample)
    kind = scheduler.config.prediction_type
    if kind == "epsilon":
        eps = model_output
        x0 = (sample - (1 - a).sqrt() * eps) / a.sqrt()
    elif kind == "v_prediction":
        x0 = a.sqrt() * sample - (1 - a).sqrt() * model_output
        eps = a.sqrt() * model_output + (1 - a).sqrt() * sample
    elif kind == "sample":
        x0 = model_output
        eps = (sample - a.sqrt() * x0) / (1 - a).sqrt()
    else:
        raise ValueError(f"scheduler prediction_type {kind!r} is not one of 'epsilon', 'v_prediction', 'sample'")
    if scheduler.config.clip_sample:
        bound = scheduler.config.clip_sample_range
        x0 = x0.clamp(-bound, bound)
    return x0, eps


def gaussian_log_prob(
    x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor, reduction: LogProbReduction = "mean"
) -> torch.Tensor:
    """log N(x; mean, std^2 I) per sample, averaged or summed over all non-batch dimensions (float32)."""
    x, mean, std = x.float(), mean.float(), _broadcast(std.float(), x)
    per_dim = -((x - mean) ** 2) / (2 * std**2) - std.log() - _LOG_SQRT_2PI
    per_dim = per_dim.flatten(1)
    if reduction == "mean":
        return per_dim.mean(dim=1)
    if reduction == "sum":
        return per_dim.sum(dim=1)
    raise ValueError(f"log-prob reduction {reduction!r} is not one of 'mean', 'sum'")


def ddim_step_with_logprob(
    scheduler: DDIMScheduler,
    model_output: torch.Tensor,
    timestep: torch.Tensor,
    sample: torch.Tensor,
    eta: float = 1.0,
    prev_sample: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    reduction: LogProbReduction = "mean",
) -> DDIMStepOutput:
    """One DDIM step from ``sample`` = x_t; draws x_{t-1} (or scores the given ``prev_sample``).

    ``timestep`` is a tensor of shape ``(B,)`` (or a scalar, broadcast to the batch). The mean and the
    log-probability are computed in float32 whatever the model's dtype. Nothing in the step waits for the
    device: no value is read back to the host, and noise drawn by a CPU generator is copied non-blocking.
    """
    if scheduler.num_inference_steps is None:
        raise ValueError("call scheduler.set_timesteps(num_steps) before stepping")
    if eta > 0:
        check_positive_variance(scheduler)
    timestep = torch.as_tensor(timestep, device=sample.device).reshape(-1).expand(sample.shape[0])
    abar_t, abar_prev = _alpha_bars(scheduler, timestep)
    x0, eps = predicted_x0_and_eps(scheduler, model_output.float(), sample.float(), abar_t)

    variance = (1 - abar_prev) / (1 - abar_t) * (1 - abar_t / abar_prev)
    std = eta * variance.clamp(min=0).sqrt()
    b_prev, b_std = _broadcast(abar_prev, sample), _broadcast(std, sample)
    mean = b_prev.sqrt() * x0 + (1 - b_prev - b_std**2).clamp(min=0).sqrt() * eps

    if prev_sample is None:
        noise_device = generator.device if generator is not None else sample.device
        noise = torch.randn(sample.shape, generator=generator, device=noise_device, dtype=torch.float32)
        prev_sample = mean + b_std * to_device(noise, sample.device)
    if eta == 0:
        return DDIMStepOutput(prev_sample.to(sample.dtype), None, mean, std)
    log_prob = gaussian_log_prob(prev_sample, mean, std, reduction)
    return DDIMStepOutput(prev_sample.to(sample.dtype), log_prob, mean, std)
