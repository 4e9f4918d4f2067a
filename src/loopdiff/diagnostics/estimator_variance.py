"""Each estimator's policy-gradient noise and signal at one model, from one shared set of samples.

Every estimator's on-policy gradient is a weighted sum of the same per-sample score gradients
``s_i = grad sum_t log pi(x^i_{t-1} | x^i_t, c)``: ``g = 1/N sum_i A_i s_i``, where only the advantages
``A_i`` differ (raw reward, a baseline, leave-one-out, PPO's normalised advantages). At the model the samples
came from, PPO's and LOOP's clipped objectives have the gradient of their advantages' score function (the
ratio is 1 and no clip is active), so LOOP's gradient there is RLOO's.

So the score gradients are computed once, for G prompts x K_max samples, and every estimator is scored on
them. For an estimator with K samples per prompt, the unit is a group (K = 1: a single sample) with gradient
``u_j = 1/K sum_{i in j} A_i s_i``; over U units:

- ``noise_per_sample = K tr(Cov u_j)``: the mean gradient over N samples has noise ``noise_per_sample / N``;
- ``signal_sq = |mean u|^2 - tr(Cov u_j) / U``: an unbiased estimate of the squared norm of its expectation;
- ``snr(N) = signal_sq / (noise_per_sample / N)``: signal-to-noise of one step's gradient from N samples.

Scale-free comparisons use the SNR (normalised advantages rescale a gradient's signal and noise alike).
The leave-one-out advantage is ``K/(K-1) (r_i - mean_j r_j)``, so with rewards independent of the score
gradients its noise is ``K/(K-1)`` times the noise with an oracle baseline: :func:`loo_noise_prediction`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from loopdiff.advantages import PerPromptStatTracker, clip_advantages
from loopdiff.diagnostics.gradient_noise import group_gradient
from loopdiff.estimators import Estimator
from loopdiff.minibatches import trained_steps
from loopdiff.prompts import PromptSet
from loopdiff.generation import generate, repeat_each
from loopdiff.rewards.base import RewardFn
from loopdiff.sampling.policy import DiffusionPolicy
from loopdiff.sampling.trajectories import PromptEncoder


@dataclass
class ScoreSamples:
    """``scores`` (G * K, P) per-sample score gradients, in prompt-major order, with their rewards."""

    scores: torch.Tensor
    rewards: torch.Tensor
    prompts: list[str]
    samples_per_prompt: int

    def subset(self, k: int) -> "ScoreSamples":
        """The first ``k`` samples of every prompt (an independent draw of K = k groups)."""
        if not 1 <= k <= self.samples_per_prompt:
            raise ValueError(f"k={k} must be between 1 and the {self.samples_per_prompt} samples per prompt")
        rows = torch.arange(len(self.rewards)).view(-1, self.samples_per_prompt)[:, :k].flatten()
        return ScoreSamples(self.scores[rows], self.rewards[rows], [self.prompts[i] for i in rows.tolist()], k)


@dataclass(frozen=True)
class EstimatorNoise:
    """One estimator's gradient statistics over ``units`` groups (or single samples) of ``k``."""

    name: str
    k: int
    units: int
    mean_sq: float
    noise_per_sample: float

    @property
    def signal_sq(self) -> float:
        return self.mean_sq - self.noise_per_sample / (self.k * self.units)

    def snr(self, samples: int) -> float:
        """Signal-to-noise of a gradient from ``samples`` samples (negative: the signal is not resolved)."""
        return self.signal_sq * samples / self.noise_per_sample


def score_gradients(
    policy: DiffusionPolicy,
    encoder: PromptEncoder,
    vae: torch.nn.Module,
    prompt_set: PromptSet,
    reward: RewardFn,
    samples_per_prompt: int,
    train_denoising_steps: int | None = None,
    seed: int = 0,
    progress: Callable[[int], None] | None = None,
) -> ScoreSamples:
    """Sample K trajectories per prompt and compute each one's score gradient over the trained steps."""
    k = samples_per_prompt
    repeated, repeated_meta = repeat_each(prompt_set.prompts, k), repeat_each(prompt_set.metadata, k)
    embeds, uncond = encoder(repeated), encoder.unconditional()
    made = generate(policy, vae, embeds, uncond, torch.Generator().manual_seed(seed), repeated, repeated_meta,
                    {"reward": reward})
    latents, rewards = made.latents, made.scores["reward"]
    steps = range(trained_steps(latents.shape[1] - 1, train_denoising_steps))
    params = [p for p in policy.unet.parameters() if p.requires_grad]
    one = torch.ones(1)
    rows = []
    for i in range(len(repeated)):
        rows.append(group_gradient(policy, params, latents[i : i + 1], embeds[i : i + 1], uncond, one, steps).float())
        if progress is not None:
            progress(i + 1)
    for p in params:
        p.grad = None
    return ScoreSamples(torch.stack(rows), rewards.detach().double().cpu(), repeated, k)


def estimator_advantages(estimator: Estimator, samples: ScoreSamples) -> torch.Tensor:
    """The advantages ``estimator`` gives these rewards in its first epoch (a fresh per-prompt tracker)."""
    k = estimator.samples_per_prompt
    if k != samples.samples_per_prompt:
        raise ValueError(f"estimator {estimator.name!r} takes K={k}; subset the samples to it first")
    groups = torch.arange(len(samples.rewards)) // k
    values = estimator.advantage_function()(samples.rewards, groups, samples.prompts)
    return clip_advantages(values.double(), estimator.advantage_clip)


def estimator_noise(estimator: Estimator, samples: ScoreSamples) -> EstimatorNoise:
    """Mean gradient and per-sample noise of ``estimator`` on ``samples`` (see the module docstring)."""
    k = estimator.samples_per_prompt
    samples = samples.subset(k)
    advantages = estimator_advantages(estimator, samples).float()
    units = len(advantages) // k
    if units < 2:
        raise ValueError(f"need at least 2 groups of {k}, got {units}")
    weighted = (advantages[:, None] * samples.scores).view(units, k, -1).mean(dim=1).double()
    mean = weighted.mean(dim=0)
    mean_sq = float(mean.pow(2).sum())
    trace_cov = (float(weighted.pow(2).sum()) - units * mean_sq) / (units - 1)
    return EstimatorNoise(estimator.name, k, units, mean_sq, k * trace_cov)


def loo_noise_prediction(k: int, reference_k: int) -> float:
    """Predicted ratio of leave-one-out noise per sample at ``k`` to that at ``reference_k``: the
    ``K/(K-1)`` variance factor of a baseline estimated from the other K - 1 rewards."""
    if k < 2 or reference_k < 2:
        raise ValueError(f"leave-one-out needs K >= 2, got {k} and {reference_k}")
    return (k / (k - 1)) / (reference_k / (reference_k - 1))


def gradient_scale(estimator: Estimator, samples: ScoreSamples) -> float:
    """The factor between the estimator's expected gradient and ``grad E[r]``: 1 for raw rewards and
    baselines, ``1 / std`` for advantages divided by the batch's reward std (a fresh DDPO tracker)."""
    tracker = estimator.advantage_function()
    if isinstance(tracker, PerPromptStatTracker) and tracker.use_std:
        return 1.0 / (float(samples.rewards.std(unbiased=False)) + tracker.eps)
    return 1.0


def noise_table(estimators: Sequence[Estimator], samples: ScoreSamples, batch: int) -> list[dict[str, float | str]]:
    """One row per estimator: K, tr(Cov) per sample (as is, and in reward units: divided by the squared
    ``gradient_scale``, so normalised advantages compare), |signal|^2, SNR of a ``batch``-sample gradient
    and the samples one gradient needs for SNR 1 (None when the signal is not resolved)."""
    rows = []
    for est in estimators:
        stats = estimator_noise(est, samples)
        scale = gradient_scale(est, samples.subset(est.samples_per_prompt))
        rows.append({
            "estimator": est.name, "k": est.samples_per_prompt, "units": stats.units,
            "noise_per_sample": stats.noise_per_sample, "signal_sq": stats.signal_sq,
            "snr": stats.snr(batch), "batch": batch, "gradient_scale": scale,
            "noise_in_reward_units": stats.noise_per_sample / scale**2,
            "samples_for_snr_one": stats.noise_per_sample / stats.signal_sq if stats.signal_sq > 0 else None,
        })
    return rows
