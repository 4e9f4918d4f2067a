"""The DDIM policy step: limits, log-density, and on-policy importance ratio 1.

See docs/method.md, "The policy step and its log-probability".
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler

from tiny_pipelines import build_tiny_pipeline
from loopdiff.sampling.ddim import ddim_step_with_logprob
from loopdiff.sampling.policy import DiffusionPolicy, PolicyConfig
from loopdiff.sampling.trajectories import PromptEncoder, sample_trajectories


def _scheduler(prediction_type: str = "epsilon", steps: int = 10) -> DDIMScheduler:
    scheduler = DDIMScheduler(
        beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, clip_sample=False,
        set_alpha_to_one=False, prediction_type=prediction_type, steps_offset=1,
    )
    scheduler.set_timesteps(steps)
    return scheduler


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_eta_zero_reproduces_diffusers_ddim(prediction_type: str) -> None:
    scheduler = _scheduler(prediction_type)
    gen = torch.Generator().manual_seed(0)
    x_ours = x_ref = torch.randn(3, 4, 8, 8, generator=gen)
    for t in scheduler.timesteps:
        model_output = torch.sin(x_ours * 3 + t / 100.0)  # any deterministic "network"
        ours = ddim_step_with_logprob(scheduler, model_output, t, x_ours, eta=0.0)
        assert ours.log_prob is None
        ref = scheduler.step(torch.sin(x_ref * 3 + t / 100.0), t, x_ref, eta=0.0).prev_sample
        torch.testing.assert_close(ours.prev_sample, ref, atol=1e-5, rtol=1e-5)
        x_ours, x_ref = ours.prev_sample, ref


def test_eta_one_matches_diffusers_given_same_noise() -> None:
    scheduler = _scheduler()
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    t = scheduler.timesteps[3]
    eps = torch.randn_like(x)
    ref = scheduler.step(eps, t, x, eta=1.0, generator=torch.Generator().manual_seed(5)).prev_sample
    ours = ddim_step_with_logprob(scheduler, eps, t, x, eta=1.0, generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(ours.prev_sample, ref, atol=1e-5, rtol=1e-5)


def _independent_log_density(x_prev, x_t, eps, abar_t, abar_prev, eta):
    """Hand-written Gaussian log-density in float64 numpy, following docs/method.md literally."""
    x_prev, x_t, eps = (a.double().numpy() for a in (x_prev, x_t, eps))
    x0 = (x_t - math.sqrt(1 - abar_t) * eps) / math.sqrt(abar_t)
    sigma = eta * math.sqrt((1 - abar_prev) / (1 - abar_t)) * math.sqrt(1 - abar_t / abar_prev)
    mean = math.sqrt(abar_prev) * x0 + math.sqrt(1 - abar_prev - sigma**2) * eps
    per_dim = -((x_prev - mean) ** 2) / (2 * sigma**2) - math.log(sigma) - 0.5 * math.log(2 * math.pi)
    return per_dim.reshape(len(x_t), -1)


@pytest.mark.parametrize("step_index", [0, 4, 9])
def test_log_prob_equals_hand_written_gaussian(step_index: int) -> None:
    scheduler = _scheduler()
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(3, 4, 8, 8, generator=gen)
    eps = torch.randn(3, 4, 8, 8, generator=gen)
    t = scheduler.timesteps[step_index]
    out = ddim_step_with_logprob(scheduler, eps, t, x, eta=0.7, generator=gen)
    prev_t = int(t) - 1000 // 10
    abar = scheduler.alphas_cumprod.double()
    abar_prev = float(abar[prev_t]) if prev_t >= 0 else float(scheduler.final_alpha_cumprod)
    expected = _independent_log_density(out.prev_sample, x, eps, float(abar[int(t)]), abar_prev, 0.7)
    np.testing.assert_allclose(out.log_prob.numpy(), expected.mean(axis=1), rtol=1e-4, atol=1e-4)
    summed = ddim_step_with_logprob(scheduler, eps, t, x, eta=0.7, prev_sample=out.prev_sample, reduction="sum")
    np.testing.assert_allclose(summed.log_prob.numpy(), expected.sum(axis=1), rtol=1e-4)


def test_zero_variance_step_is_refused() -> None:
    scheduler = DDIMScheduler(set_alpha_to_one=True)
    scheduler.set_timesteps(5)
    x = torch.randn(1, 4, 8, 8)
    with pytest.raises(ValueError, match="set_alpha_to_one"):
        ddim_step_with_logprob(scheduler, x, scheduler.timesteps[-1], x, eta=1.0)


def test_recomputed_log_probs_give_ratio_one_with_guidance() -> None:
    pipe = build_tiny_pipeline()
    scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    policy = DiffusionPolicy(pipe.unet, scheduler, PolicyConfig(guidance_scale=5.0, eta=1.0, num_steps=6))
    encoder = PromptEncoder(pipe.tokenizer, pipe.text_encoder, "cpu")
    embeds = encoder(["a red circle", "a blue square", "a red circle"])
    uncond = encoder.unconditional()
    latents, log_probs = sample_trajectories(policy, embeds, uncond, torch.Generator().manual_seed(0), batch_size=2)
    assert latents.shape == (3, 7, 4, 8, 8) and log_probs.shape == (3, 6)
    # Recompute every (sample, step) pair in one shuffled batch with gradients enabled.
    n, steps = log_probs.shape
    pairs = torch.randperm(n * steps, generator=torch.Generator().manual_seed(1))
    i, j = pairs // steps, pairs % steps
    recomputed = policy.log_prob(latents[i, j], latents[i, j + 1], policy.timesteps[j], embeds[i], uncond)
    assert recomputed.requires_grad
    ratio = torch.exp(recomputed.detach() - log_probs[i, j])
    torch.testing.assert_close(ratio, torch.ones_like(ratio), atol=1e-5, rtol=0)
    # A changed network must change the ratio: the test can fail.
    with torch.no_grad():
        for p in pipe.unet.parameters():
            p.add_(0.01 * torch.randn_like(p))
    moved = policy.log_prob(latents[i, j], latents[i, j + 1], policy.timesteps[j], embeds[i], uncond).detach()
    assert (moved - log_probs[i, j]).abs().max() > 1e-4
