"""One flow-matching Euler step as a Gaussian policy step, with its log-probability.

diffusers' ``FlowMatchEulerDiscreteScheduler`` (SD3, SD3.5, Flux) integrates the probability-flow ODE
``x' = x + (sigma' - sigma) v`` where ``x = (1 - sigma) x0 + sigma x1`` (x1 the noise), ``v`` the model's
velocity, sigma the current and sigma' the next noise level. A policy needs a stochastic step; two
reverse-time SDE discretisations with the same marginals are offered, both with a noise level ``a``
(``a = 0`` gives back the scheduler's Euler step). With ``dt = sigma' - sigma < 0``:

``"sde"`` (Flow-GRPO's SDE)::

    std_t = a * sqrt(sigma / (1 - sigma))
    mean  = x + (v + std_t^2 / (2 sigma) * (x + (1 - sigma) v)) * dt
    x'    = mean + std_t * sqrt(-dt) * z                    (the step's Gaussian std is std_t * sqrt(-dt))

``"cps"`` (coefficients-preserving sampling)::

    std_t = sigma' * sin(a * pi / 2)
    x0    = x - sigma v,   x1 = x + (1 - sigma) v
    mean  = (1 - sigma') x0 + sqrt(sigma'^2 - std_t^2) x1
    x'    = mean + std_t * z                                (a in [0, 1])

so ``log pi(x' | x, c) = log N(x'; mean, std^2 I)``, computed in float32 and reduced over the C*H*W latent
dimensions exactly as the DDIM path (``"mean"`` by default, or ``"sum"``; see :mod:`loopdiff.sampling.ddim`).
The std depends only on the schedule and ``a``, never on the model, so the constant terms cancel in ratios.

The first step (sigma = 1). The SD3 schedule starts at sigma = 1, where sigma / (1 - sigma) is infinite.
Flow-GRPO replaces the denominator by ``1 - sigmas[1]`` (its variable ``sigma_max`` is the *second* entry of
the schedule). Here the denominator at sigma = 1 is ``1 - sigma'``, the step's own next level: on the
standard schedule that is the same value (sigma = 1 only occurs at the first step, where sigma' = sigmas[1]),
and it needs no global state, so per-sample timesteps from different steps can share one call. The drift
term is finite there: ``x + (1 - sigma) v = x`` and ``std_t^2 / (2 sigma)`` is finite.

The last step (sigma' = 0). In ``"sde"`` the last step is a proper Gaussian, std ``a * sigma / sqrt(1 - sigma)``
(small: sigma is the schedule's smallest level), so the final latents keep that little noise, as in Flow-GRPO.
In ``"cps"`` std_t = sigma' sin(a pi / 2) = 0: the last step is the deterministic map ``x' = x0_hat``, not a
random action. It is *excluded from the policy gradient* rather than given a floor (a floor would make its
density a near-delta whose log-ratio explodes for any change of the mean): its ``log_prob`` is exactly 0
(kept in the autograd graph with a zero gradient, so a minibatch made only of last steps still backpropagates),
its reported ``std`` is 0, so its importance ratio is 1 and it adds nothing to the gradient; it only counts in
the averages over (sample, step) pairs. To leave it out of the sampled pairs altogether, train on the first
``T - 1`` steps (``training.train_denoising_steps = num_steps - 1``). A KL penalty divided by that zero std is
undefined: use ``"sde"`` for a KL-regularised run, or exclude the last step as just said.

What the ``"cps"`` density means for the clip range. The true Gaussian density is used for both forms (the
DDIM path's convention), so ``log ratio = (|x' - mean_old|^2 - |x' - mean_new|^2) / (2 std_t^2)`` (per
dimension under ``"mean"``). Because cps's std_t = sigma' sin(a pi / 2) shrinks with sigma', the same change
of the mean moves the ratio by ~1/sigma'^2 more at the late, low-noise steps than at the early ones: a clip
range bites mostly there. Flow-GRPO's cps log-prob drops every constant *and the 1/(2 std_t^2) factor*
(``-(x' - mean)^2``), i.e. its log-ratio is ``2 std_t^2`` times this one, a per-step rescaling that is not a
log-density ratio: clip ranges tuned for that code are not interchangeable with the ones here.
"""

from __future__ import annotations

import math
import weakref
from typing import Literal

import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from loopdiff.sampling.ddim import DDIMStepOutput, LogProbReduction, gaussian_log_prob
from loopdiff.transfer import to_device

_SCHEDULES: "weakref.WeakKeyDictionary[FlowMatchEulerDiscreteScheduler, dict[str, tuple]]" = weakref.WeakKeyDictionary()

SDEType = Literal["sde", "cps"]
SDE_TYPES = ("sde", "cps")

#: The step output is the DDIM path's (prev_sample, log_prob, mean, std): the trainer reads both alike.
FlowStepOutput = DDIMStepOutput


def _broadcast(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return values.reshape(-1, *([1] * (like.ndim - 1)))


def _schedule(scheduler: FlowMatchEulerDiscreteScheduler, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The scheduler's timesteps and sigmas in float32 on ``device``, copied once per schedule and device (a copy
    per step would make each step wait for the host)."""
    cached = _SCHEDULES.setdefault(scheduler, {}).get(str(device))
    if cached is None or cached[0] is not scheduler.timesteps or cached[1] is not scheduler.sigmas:
        with torch.inference_mode(False), torch.no_grad():  # usable by sampling and training alike
            on_device = (scheduler.timesteps.to(device, torch.float32), scheduler.sigmas.to(device, torch.float32))
        cached = (scheduler.timesteps, scheduler.sigmas, *on_device)
        _SCHEDULES[scheduler][str(device)] = cached
    return cached[2], cached[3]


def step_sigmas(
    scheduler: FlowMatchEulerDiscreteScheduler, timestep: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(sigma, sigma') of each per-sample timestep: its own and the next entry of ``scheduler.sigmas``.

    ``timestep`` must hold values of ``scheduler.timesteps`` (as sampling and the stored trajectories do); that
    is checked when they are on the host: on an accelerator the check would wait for the device at every step.
    """
    if scheduler.num_inference_steps is None:
        raise ValueError("call scheduler.set_timesteps(num_steps) before stepping")
    schedule, sigmas = _schedule(scheduler, timestep.device)
    distance = (timestep.float()[:, None] - schedule[None, :]).abs()
    gap, index = distance.min(dim=1)
    tolerance = 1e-3 * max(1.0, float(scheduler.config.num_train_timesteps) / 1000)
    if timestep.device.type == "cpu" and bool((gap > tolerance).any()):
        bad = timestep[gap > tolerance][0].item()
        raise ValueError(f"timestep {bad} is not one of the scheduler's timesteps {schedule.tolist()}")
    return sigmas[index], sigmas[index + 1]


def flow_step_with_logprob(
    scheduler: FlowMatchEulerDiscreteScheduler,
    model_output: torch.Tensor,
    timestep: torch.Tensor,
    sample: torch.Tensor,
    noise_level: float = 0.7,
    sde_type: SDEType = "sde",
    prev_sample: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    reduction: LogProbReduction = "mean",
) -> DDIMStepOutput:
    """One stochastic flow-matching step from ``sample`` = x at ``timestep``; draws x' (or scores ``prev_sample``).

    ``model_output`` is the (guided) velocity v. ``timestep`` is a tensor of shape ``(B,)`` (or a scalar,
    broadcast to the batch) of values from ``scheduler.timesteps``. Returns ``prev_sample`` (in the sample's
    dtype), ``log_prob`` (float32, ``None`` when ``noise_level == 0``), ``mean`` (float32) and the step's
    Gaussian ``std`` per sample, shape ``(B,)`` (``std_t * sqrt(-dt)`` for "sde", ``std_t`` for "cps").
    """
    if sde_type not in SDE_TYPES:
        raise ValueError(f"sde_type {sde_type!r} is not one of {', '.join(SDE_TYPES)}")
    if noise_level < 0 or (sde_type == "cps" and noise_level > 1):
        raise ValueError(f"noise_level={noise_level} must be >= 0 (and <= 1 for 'cps')")
    timestep = torch.as_tensor(timestep, device=sample.device).reshape(-1).expand(sample.shape[0])
    sigma, sigma_next = step_sigmas(scheduler, timestep)
    x, v = sample.float(), model_output.float()
    s, s_next = _broadcast(sigma, x), _broadcast(sigma_next, x)
    dt = s_next - s

    if sde_type == "sde":
        denominator = 1 - torch.where(sigma >= 1, sigma_next, sigma)
        std_t = noise_level * (sigma / denominator).sqrt()
        b_std_t = _broadcast(std_t, x)
        mean = x + (v + b_std_t**2 / (2 * s) * (x + (1 - s) * v)) * dt
        std = std_t * (sigma - sigma_next).sqrt()
    else:
        std = sigma_next * math.sin(noise_level * math.pi / 2)
        x0, x1 = x - s * v, x + (1 - s) * v
        mean = (1 - s_next) * x0 + (s_next**2 - _broadcast(std, x) ** 2).clamp(min=0).sqrt() * x1

    if prev_sample is None:
        noise_device = generator.device if generator is not None else sample.device
        noise = torch.randn(sample.shape, generator=generator, device=noise_device, dtype=torch.float32)
        prev_sample = mean + _broadcast(std, x) * to_device(noise, sample.device)
    if noise_level == 0:
        return DDIMStepOutput(prev_sample.to(sample.dtype), None, mean, std)
    stochastic = std > 0  # False only for cps's last step (sigma' = 0): deterministic, log_prob 0 (see above)
    log_prob = gaussian_log_prob(prev_sample, mean, torch.where(stochastic, std, torch.ones_like(std)), reduction)
    log_prob = torch.where(stochastic, log_prob, torch.zeros_like(log_prob))
    return DDIMStepOutput(prev_sample.to(sample.dtype), log_prob, mean, std)
