"""Branching trajectories: continuations equal the sampler's own steps; late branches share their reward."""

from __future__ import annotations

import pytest
import torch

from tiny_pipelines import build_tiny_pipeline
from loopdiff.prompts import PromptSet
from loopdiff.diagnostics.branching import continue_from_step, reward_variance_by_step
from loopdiff.sampling.policy import DiffusionPolicy, PolicyConfig
from loopdiff.sampling.trajectories import PromptEncoder, initial_latents, sample_trajectories

PROMPTS = ["a red circle", "a blue square", "a green star"]
PROMPT_SET = PromptSet(tuple(PROMPTS), ({},) * 3)


@pytest.fixture(scope="module")
def parts():
    pipe = build_tiny_pipeline()
    policy = DiffusionPolicy(pipe.unet, pipe.scheduler, PolicyConfig(num_steps=5, guidance_scale=3.0))
    return pipe, policy, PromptEncoder(pipe.tokenizer, pipe.text_encoder, "cpu")


def test_continuing_from_step_zero_is_the_sampler(parts) -> None:
    pipe, policy, encoder = parts
    embeds, uncond = encoder(PROMPTS), encoder.unconditional()
    latents, _ = sample_trajectories(policy, embeds, uncond, torch.Generator().manual_seed(4))
    generator = torch.Generator().manual_seed(4)
    start = initial_latents(pipe.unet, len(PROMPTS), generator, "cpu")
    final = continue_from_step(policy, start, 0, embeds, uncond, generator)
    torch.testing.assert_close(final, latents[:, -1])


def test_continuing_from_a_middle_step_reuses_the_trajectory_prefix(parts) -> None:
    _, policy, encoder = parts
    embeds, uncond = encoder(PROMPTS), encoder.unconditional()
    latents, _ = sample_trajectories(policy, embeds, uncond, torch.Generator().manual_seed(5))
    done = continue_from_step(policy, latents[:, 5], 5, embeds, uncond, torch.Generator().manual_seed(9))
    torch.testing.assert_close(done, latents[:, 5])  # after the last step nothing is left to run
    late = continue_from_step(policy, latents[:, 4], 4, embeds, uncond, torch.Generator().manual_seed(9))
    assert not torch.equal(late, latents[:, -1])  # one fresh noisy step: a different x_0


def test_variance_shrinks_to_zero_when_no_step_is_left(parts) -> None:
    pipe, policy, encoder = parts

    def mean_red(images, prompts, metadata):
        return images[:, 0].mean(dim=(1, 2))

    result = reward_variance_by_step(
        policy, encoder, pipe.vae, PROMPT_SET, mean_red, steps=[0, 2, 5], branches=6, seed=1
    )
    assert result.steps == [0, 2, 5]
    assert result.variance[0] > 0 and result.variance[2] == 0.0
    assert result.remaining_fraction()[0] == 1.0 and result.remaining_fraction()[2] == 0.0


def test_bad_arguments_are_named(parts) -> None:
    pipe, policy, encoder = parts
    with pytest.raises(ValueError, match="branches=1"):
        reward_variance_by_step(policy, encoder, pipe.vae, PROMPT_SET, lambda *a: 0, [0], branches=1)
    with pytest.raises(ValueError, match=r"steps \[7\] are outside 0..5"):
        reward_variance_by_step(policy, encoder, pipe.vae, PROMPT_SET, lambda *a: 0, [0, 7])
