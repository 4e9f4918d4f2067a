"""Gradient signal and noise over prompt groups, against gradients stacked and reduced by hand."""

from __future__ import annotations

import math

import pytest
import torch

from tiny_pipelines import build_tiny_pipeline
from loopdiff.prompts import PromptSet
from loopdiff.sampling.policy import DiffusionPolicy, PolicyConfig
from loopdiff.sampling.trajectories import PromptEncoder, decode_latents, sample_trajectories
from loopdiff.diagnostics.gradient_noise import GradientNoise, measure_gradient_noise, module_kind

PROMPTS = ["a red circle", "a blue square", "a green star", "a yellow heart"]
K = 3


def red_minus_blue(images, prompts, metadata):
    return 100 * (images[:, 0].mean(dim=(1, 2)) - images[:, 2].mean(dim=(1, 2)))


@pytest.fixture(scope="module")
def parts():
    pipe = build_tiny_pipeline()
    policy = DiffusionPolicy(pipe.unet, pipe.scheduler, PolicyConfig(num_steps=3, guidance_scale=3.0))
    return pipe, policy, PromptEncoder(pipe.tokenizer, pipe.text_encoder, "cpu")


def by_hand(pipe, policy, encoder, steps: list[int], seed: int, kind: str | None = None) -> tuple[float, float]:
    """Stack every group's gradient explicitly; brute-force leave-one-out baselines."""
    repeated = [p for p in PROMPTS for _ in range(K)]
    embeds, uncond = encoder(repeated), encoder.unconditional()
    latents, _ = sample_trajectories(policy, embeds, uncond, torch.Generator().manual_seed(seed))
    rewards = red_minus_blue(decode_latents(pipe.vae, latents[:, -1]), None, None)
    params = [p for n, p in pipe.unet.named_parameters() if kind is None or module_kind(n) == kind]
    grads = []
    for j in range(len(PROMPTS)):
        objective = 0.0
        for i in range(j * K, (j + 1) * K):
            others = [rewards[m] for m in range(j * K, (j + 1) * K) if m != i]
            advantage = rewards[i] - sum(others) / len(others)
            for s in steps:
                log_prob = policy.log_prob(latents[i : i + 1, s], latents[i : i + 1, s + 1], policy.timesteps[s],
                                           embeds[i : i + 1], uncond)
                objective = objective + advantage * log_prob.sum()
        grads.append(torch.cat([g.flatten() for g in torch.autograd.grad(objective, params)]).double())
    stacked = torch.stack(grads)
    noise = float(stacked.var(dim=0, unbiased=True).sum()) / len(PROMPTS)
    return float(stacked.mean(dim=0).pow(2).sum()), noise


@pytest.mark.parametrize("train_denoising_steps", [None, 1])
def test_matches_gradients_stacked_by_hand(parts, train_denoising_steps) -> None:
    pipe, policy, encoder = parts
    result = measure_gradient_noise(policy, encoder, pipe.vae, PromptSet(tuple(PROMPTS), ({},) * 4),
                                    red_minus_blue, samples_per_prompt=K, train_denoising_steps=train_denoising_steps, seed=3)
    mean_sq, noise = by_hand(pipe, policy, encoder, [0, 1, 2] if train_denoising_steps is None else [0], seed=3)
    assert result.groups == 4
    assert result.mean_sq == pytest.approx(mean_sq, rel=1e-4)
    assert result.noise == pytest.approx(noise, rel=1e-4)
    assert all(p.grad is None for p in pipe.unet.parameters())  # leaves no gradients behind
    kinds = {module_kind(n) for n, _ in pipe.unet.named_parameters()}
    assert set(result.by_module) == kinds and {"cross-attention K/V", "resnets"} <= kinds
    for kind in ("cross-attention K/V", "resnets"):
        part_mean_sq, part_noise = by_hand(pipe, policy, encoder, [0, 1, 2] if train_denoising_steps is None else [0], 3, kind)
        assert result.by_module[kind].mean_sq == pytest.approx(part_mean_sq, rel=1e-4)
        assert result.by_module[kind].noise == pytest.approx(part_noise, rel=1e-4)
    assert sum(part.mean_sq for part in result.by_module.values()) == pytest.approx(result.mean_sq, rel=1e-9)


def test_module_kinds_follow_the_diffusers_unet_names() -> None:
    assert module_kind("down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_v.weight") == "cross-attention K/V"
    assert module_kind("mid_block.attentions.0.transformer_blocks.0.attn2.to_q.weight") == "cross-attention Q/out"
    assert module_kind("up_blocks.0.attentions.1.transformer_blocks.0.attn1.to_k.weight") == "self-attention"
    assert module_kind("down_blocks.0.resnets.0.conv1.weight") == "resnets"
    assert module_kind("conv_in.weight") == "other"


def test_module_kinds_follow_the_diffusers_sd3_transformer_names() -> None:
    assert module_kind("transformer_blocks.3.attn.add_k_proj.weight") == "joint attention, text"
    assert module_kind("transformer_blocks.3.attn.to_add_out.bias") == "joint attention, text"
    assert module_kind("transformer_blocks.3.attn.to_q.weight") == "joint attention, image"
    assert module_kind("transformer_blocks.3.attn2.to_out.0.weight") == "joint attention, image"
    assert module_kind("transformer_blocks.3.ff_context.net.2.weight") == "feed-forward"
    assert module_kind("transformer_blocks.3.norm1_context.linear.weight") == "other"
    assert module_kind("pos_embed.proj.weight") == "other"


def test_signal_and_groups_needed() -> None:
    assert GradientNoise(groups=10, mean_sq=3.0, noise=1.0).signal_sq == 2.0
    assert GradientNoise(groups=10, mean_sq=3.0, noise=1.0).groups_for_snr_one == pytest.approx(5.0)  # 10 / 2
    assert math.isinf(GradientNoise(groups=10, mean_sq=0.5, noise=1.0).groups_for_snr_one)


def test_needs_two_samples_and_two_prompts(parts) -> None:
    pipe, policy, encoder = parts
    with pytest.raises(ValueError, match="got 1 and 4"):
        measure_gradient_noise(policy, encoder, pipe.vae, PromptSet(tuple(PROMPTS), ({},) * 4), red_minus_blue,
                               samples_per_prompt=1)
