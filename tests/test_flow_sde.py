"""The flow-matching (SD3) policy step: the Euler limit, the log-density, on-policy ratio 1, guidance, and
the pipeline's own sampler, on a tiny StableDiffusion3Pipeline saved and loaded back through diffusers."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from tiny_pipelines import SD3_MAX_SEQUENCE_LENGTH as MAX_SEQUENCE_LENGTH
from loopdiff.sampling.flow_policy import FlowMatchPolicy, FlowPolicyConfig, PromptEmbeds, SD3PromptEncoder
from loopdiff.sampling.flow_sde import flow_step_with_logprob
from loopdiff.sampling.trajectories import Trajectories, sample_trajectories


def _scheduler(steps: int = 6, shift: float = 3.0) -> FlowMatchEulerDiscreteScheduler:
    scheduler = FlowMatchEulerDiscreteScheduler(shift=shift)
    scheduler.set_timesteps(steps)
    return scheduler


@pytest.fixture(scope="module")
def sd3(tiny_sd3_dir: Path):
    from diffusers import StableDiffusion3Pipeline

    # diffusers saves no entry for the absent T5 encoder; loading without T5 is asked for explicitly
    pipe = StableDiffusion3Pipeline.from_pretrained(tiny_sd3_dir, text_encoder_3=None, tokenizer_3=None)
    assert pipe.text_encoder_3 is None and type(pipe.transformer).__name__ == "SD3Transformer2DModel"
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _policy(pipe, **overrides) -> FlowMatchPolicy:
    config = FlowPolicyConfig(**{"guidance_scale": 4.0, "num_steps": 4, **overrides})
    return FlowMatchPolicy(pipe.transformer, pipe.scheduler, config)


def _encoder(pipe) -> SD3PromptEncoder:
    return SD3PromptEncoder(pipe, "cpu", max_sequence_length=MAX_SEQUENCE_LENGTH)


# ------------------------------------------------------------------ the step alone


@pytest.mark.parametrize("sde_type", ["sde", "cps"])
def test_zero_noise_reproduces_scheduler_euler_step(sde_type: str) -> None:
    scheduler = _scheduler()
    reference = _scheduler()
    gen = torch.Generator().manual_seed(0)
    x_ours = x_ref = torch.randn(3, 4, 8, 8, generator=gen)
    for t in scheduler.timesteps:
        ours = flow_step_with_logprob(
            scheduler, torch.sin(3 * x_ours + t / 100), t, x_ours, noise_level=0.0, sde_type=sde_type, generator=gen
        )
        ref = reference.step(torch.sin(3 * x_ref + t / 100), t, x_ref).prev_sample
        assert ours.log_prob is None
        assert bool((ours.std == 0).all())
        if sde_type == "sde":  # the same floating-point operations as diffusers' step: bit-identical
            assert torch.equal(ours.prev_sample, ref)
        else:  # the same map, written through (x0, x1): equal up to rounding
            torch.testing.assert_close(ours.prev_sample, ref, atol=2e-6, rtol=1e-6)
        x_ours, x_ref = ours.prev_sample, ref


def _hand_log_density(x_next, x, v, sigma, sigma_next, a, sde_type, reduction):
    """The step's Gaussian log-density in float64 numpy, written from the formulas (first-step rule included)."""
    x_next, x, v = (t.double().numpy() for t in (x_next, x, v))
    dt = sigma_next - sigma
    if sde_type == "sde":
        std_t = a * math.sqrt(sigma / (1 - (sigma_next if sigma == 1 else sigma)))
        mean = x + (v + std_t**2 / (2 * sigma) * (x + (1 - sigma) * v)) * dt
        std = std_t * math.sqrt(-dt)
    else:
        std = sigma_next * math.sin(a * math.pi / 2)
        mean = (1 - sigma_next) * (x - sigma * v) + math.sqrt(sigma_next**2 - std**2) * (x + (1 - sigma) * v)
    per_dim = -((x_next - mean) ** 2) / (2 * std**2) - math.log(std) - 0.5 * math.log(2 * math.pi)
    return mean, std, (per_dim.mean() if reduction == "mean" else per_dim.sum())


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("sde_type", ["sde", "cps"])
def test_log_density_matches_float64_hand_computation(sde_type: str, reduction: str) -> None:
    scheduler = _scheduler(steps=6)
    gen = torch.Generator().manual_seed(3)
    a = 0.7
    last = len(scheduler.timesteps) - 1
    # per-sample timesteps, the first (sigma = 1) included; cps's deterministic last step is tested apart
    indices = [0, 1, 3, 4, 5] if sde_type == "sde" else [0, 1, 2, 3, 4]
    assert float(scheduler.sigmas[0]) == 1.0 and last not in indices[:-1]
    t = scheduler.timesteps[indices]
    x = torch.randn(len(indices), 4, 8, 8, generator=gen)
    v = torch.randn(x.shape, generator=gen)
    for given in (None, x + 0.3 * torch.randn(x.shape, generator=gen)):  # sampled, and an arbitrary x'
        out = flow_step_with_logprob(
            scheduler, v, t, x, noise_level=a, sde_type=sde_type, prev_sample=given, generator=gen, reduction=reduction
        )
        assert out.log_prob.dtype == torch.float32 and out.log_prob.shape == (len(indices),)
        for row, i in enumerate(indices):
            sigma, sigma_next = float(scheduler.sigmas[i]), float(scheduler.sigmas[i + 1])
            mean, std, expected = _hand_log_density(
                out.prev_sample[row], x[row], v[row], sigma, sigma_next, a, sde_type, reduction
            )
            np.testing.assert_allclose(out.mean[row].double().numpy(), mean, rtol=1e-5, atol=1e-5)
            np.testing.assert_allclose(float(out.std[row]), std, rtol=1e-5)
            np.testing.assert_allclose(float(out.log_prob[row]), expected, rtol=2e-5, atol=1e-4)


def test_sampled_step_has_the_stated_std() -> None:
    """The drawn x' - mean has the std the density uses (std_t * sqrt(-dt) for "sde", std_t for "cps")."""
    scheduler = _scheduler(steps=6)
    x = torch.randn(1, 4, 64, 64, generator=torch.Generator().manual_seed(0))
    v = torch.randn_like(x)
    for sde_type in ("sde", "cps"):
        for t in scheduler.timesteps[:-1]:
            out = flow_step_with_logprob(
                scheduler, v, t, x, 0.8, sde_type, generator=torch.Generator().manual_seed(1)
            )
            empirical = (out.prev_sample - out.mean).std()
            torch.testing.assert_close(empirical, out.std[0], rtol=0.03, atol=0.0)


def test_cps_last_step_is_deterministic_with_zero_log_prob() -> None:
    scheduler = _scheduler(steps=4)
    t = scheduler.timesteps[-1]
    sigma = float(scheduler.sigmas[-2])
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    v = torch.randn_like(x).requires_grad_(True)
    out = flow_step_with_logprob(scheduler, v, t, x, 0.7, "cps", generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(out.prev_sample, x - sigma * v, atol=1e-6, rtol=1e-6)
    assert torch.equal(out.std, torch.zeros(2)) and torch.equal(out.log_prob, torch.zeros(2))
    out.log_prob.sum().backward()  # still in the graph, with a zero gradient
    assert v.grad is not None and bool((v.grad == 0).all())
    sde = flow_step_with_logprob(scheduler, v.detach(), t, x, 0.7, "sde")  # the "sde" last step stays Gaussian
    assert bool((sde.std > 0).all()) and bool(torch.isfinite(sde.log_prob).all())


def test_first_step_rule_and_bad_timesteps() -> None:
    scheduler = _scheduler(steps=5)
    x = torch.randn(1, 4, 8, 8)
    out = flow_step_with_logprob(scheduler, torch.zeros_like(x), scheduler.timesteps[0], x, 0.5, "sde")
    sigma_next = float(scheduler.sigmas[1])  # Flow-GRPO's "sigma_max": 1 - sigmas[1] replaces 1 - sigma at sigma = 1
    expected = 0.5 * math.sqrt(1 / (1 - sigma_next)) * math.sqrt(1 - sigma_next)
    assert math.isfinite(float(out.std)) and float(out.std) == pytest.approx(expected, rel=1e-6)
    with pytest.raises(ValueError, match="not one of the scheduler's timesteps"):
        flow_step_with_logprob(scheduler, x, torch.tensor(123.4), x, 0.5)
    with pytest.raises(ValueError, match="sde_type"):
        flow_step_with_logprob(scheduler, x, scheduler.timesteps[0], x, 0.5, "ode")  # type: ignore[arg-type]


# ------------------------------------------------------------------ the policy on the tiny SD3 pipeline


def _batch(pipe, n: int = 3, seed: int = 0):
    encoder = _encoder(pipe)
    prompts = ["a red circle", "a blue square", "a green star"][:n]
    gen = torch.Generator().manual_seed(seed)
    return encoder(prompts), encoder.unconditional(), torch.randn(n, 4, 8, 8, generator=gen)


def test_prompt_encoder_gives_the_pipeline_embeddings(sd3) -> None:
    embeds, uncond, _ = _batch(sd3)
    seq, neg, pooled, neg_pooled = sd3.encode_prompt(
        ["a blue square"], None, None, device="cpu", do_classifier_free_guidance=True,
        max_sequence_length=MAX_SEQUENCE_LENGTH,
    )
    torch.testing.assert_close(embeds.sequence[1:2], seq, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(embeds.pooled[1:2], pooled, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(uncond.sequence, neg, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(uncond.pooled, neg_pooled, atol=1e-6, rtol=1e-6)
    assert embeds.sequence.shape == (3, 12 + MAX_SEQUENCE_LENGTH, 32) and embeds.pooled.shape == (3, 32)
    picked = embeds[torch.tensor([2, 0])]
    assert len(picked) == 2 and torch.equal(picked.pooled[0], embeds.pooled[2])


@pytest.mark.parametrize("sde_type", ["sde", "cps"])
def test_on_policy_ratio_is_exactly_one(sd3, sde_type: str) -> None:
    policy = _policy(sd3, sde_type=sde_type, noise_level=0.8)
    embeds, uncond, x = _batch(sd3)
    with torch.no_grad():
        for t in policy.timesteps:
            out = policy.step(x, t, embeds, uncond, generator=torch.Generator().manual_seed(int(t)))
            again = policy.log_prob(x, out.prev_sample, t, embeds, uncond)
            assert torch.equal(again, out.log_prob)
            x = out.prev_sample


def test_guidance_is_the_same_in_sampling_and_training(sd3) -> None:
    policy = _policy(sd3, guidance_scale=3.0)
    embeds, uncond, x = _batch(sd3)
    t = policy.timesteps[1]
    with torch.no_grad():
        sampled = policy.step(x, t, embeds, uncond, generator=torch.Generator().manual_seed(0))
    trained = policy.step(x, t, embeds, uncond, next_latents=sampled.prev_sample)  # with gradients, as training
    assert torch.equal(trained.mean, sampled.mean) and torch.equal(trained.log_prob, sampled.log_prob)
    # and the mean is the guided one: v_u + w (v_c - v_u) from two separate calls
    with torch.no_grad():
        tt = t.expand(3)
        def velocity(e: PromptEmbeds) -> torch.Tensor:
            return sd3.transformer(
                hidden_states=x, timestep=tt, encoder_hidden_states=e.sequence, pooled_projections=e.pooled
            ).sample

        v_c, v_u = velocity(embeds), velocity(uncond.expand(3))
    hand = flow_step_with_logprob(policy.scheduler, v_u + 3.0 * (v_c - v_u), t, x, 0.7, prev_sample=sampled.prev_sample)
    torch.testing.assert_close(trained.mean, hand.mean, atol=1e-5, rtol=1e-5)
    assert (v_c - v_u).abs().max() > 1e-3  # the prompt matters, so the check above sees the guidance


def test_mixed_timestep_training_batch_recovers_the_sampling_log_probs(sd3) -> None:
    """The trainer stacks (sample, step) pairs of different steps into one call: ratio 1 up to rounding."""
    policy = _policy(sd3, noise_level=0.7)
    embeds, uncond, _ = _batch(sd3)
    latents, log_probs = sample_trajectories(policy, embeds, uncond, torch.Generator().manual_seed(4), batch_size=2)
    assert latents.shape == (3, 5, 4, 8, 8) and log_probs.shape == (3, 4)
    traj = Trajectories(latents, log_probs, policy.timesteps, torch.arange(3), torch.arange(3), embeds)
    i, j = torch.tensor([0, 1, 2, 0, 2]), torch.tensor([3, 0, 2, 1, 0])
    picked = traj.select(torch.tensor([True, True, True]))
    with torch.no_grad():
        again = policy.log_prob(
            picked.latents[i, j], picked.latents[i, j + 1], traj.timesteps[j], picked.prompt_embeds[i], uncond
        )
    torch.testing.assert_close(again, log_probs[i, j], atol=1e-5, rtol=1e-5)


def test_zero_noise_trajectory_equals_the_pipelines_own_sampler(sd3) -> None:
    policy = _policy(sd3, noise_level=0.0, guidance_scale=4.0, num_steps=4)
    embeds, uncond, x_T = _batch(sd3, n=2)
    with torch.no_grad():
        x = x_T
        for t in policy.timesteps:
            x = policy.step(x, t, embeds, uncond).prev_sample
        common = dict(latents=x_T.clone(), num_inference_steps=4, guidance_scale=4.0, output_type="latent")
        theirs = sd3(prompt=["a red circle", "a blue square"], max_sequence_length=MAX_SEQUENCE_LENGTH, **common)
        given = sd3(  # the same embeddings: the same transformer calls and Euler steps, bit for bit
            prompt_embeds=embeds.sequence,
            pooled_prompt_embeds=embeds.pooled,
            negative_prompt_embeds=uncond.sequence.expand(2, -1, -1),
            negative_pooled_prompt_embeds=uncond.pooled.expand(2, -1),
            **common,
        )
    assert torch.equal(x, given.images)
    # the pipeline's own prompt encoding batches the text encoders differently: equal up to rounding
    torch.testing.assert_close(x, theirs.images, atol=1e-5, rtol=1e-5)
    assert (x - x_T).abs().max() > 0.1
