"""SDXL on the DDIM path: loading, the prompt encoder, the UNet's added conditioning in both guidance branches,
on-policy ratio 1, and diffusers' own SDXL sampler, on a tiny StableDiffusionXLPipeline saved and loaded back."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from loopdiff.config import ModelConfig
from loopdiff.models import denoiser, is_flow_matching, is_sdxl, load_pipeline
from loopdiff.sampling.ddim import ddim_step_with_logprob
from loopdiff.sampling.embeds import PromptEmbeds
from loopdiff.sampling.policy import DiffusionPolicy, PolicyConfig
from loopdiff.sampling.sdxl import SDXLPromptEncoder, sdxl_time_ids
from loopdiff.sampling.trajectories import Trajectories, sample_trajectories
from tiny_pipelines import SDXL_PROJECTION as PROJECTION
from tiny_pipelines import SDXL_SCHEDULER, build_tiny_sdxl_pipeline
from tiny_pipelines import SDXL_TEXT_WIDTH as TEXT_WIDTH

PROMPTS = ["a red circle", "a blue square", "a green star"]
NATIVE_TIME_IDS = [32.0, 32.0, 0.0, 0.0, 32.0, 32.0]  # 8x8 latents x VAE factor 4: uncropped 32x32 images


@pytest.fixture(scope="module")
def sdxl(tiny_sdxl_dir: Path):
    return load_pipeline(ModelConfig(pretrained=str(tiny_sdxl_dir)))


def _policy(pipe, **overrides) -> DiffusionPolicy:
    config = PolicyConfig(**{"guidance_scale": 5.0, "eta": 1.0, "num_steps": 4, **overrides})
    return DiffusionPolicy(pipe.unet, pipe.scheduler, config)


def _batch(pipe, n: int = 3, seed: int = 0) -> tuple[PromptEmbeds, PromptEmbeds, torch.Tensor]:
    encoder = SDXLPromptEncoder(pipe, "cpu")
    x = torch.randn(n, 4, 8, 8, generator=torch.Generator().manual_seed(seed))
    return encoder(PROMPTS[:n]), encoder.unconditional(), x


def _unet(pipe, x: torch.Tensor, t: torch.Tensor, embeds: PromptEmbeds) -> torch.Tensor:
    """The UNet called as StableDiffusionXLPipeline calls it, written out here."""
    added = {"text_embeds": embeds.pooled, "time_ids": embeds.time_ids}
    return pipe.unet(x, t, encoder_hidden_states=embeds.sequence, added_cond_kwargs=added).sample


# ------------------------------------------------------------------ loading and prompt encoding


def test_load_pipeline_routes_an_sdxl_folder_to_ddim(sdxl, tiny_sdxl_dir: Path) -> None:
    from diffusers import DDIMScheduler, EulerDiscreteScheduler

    assert type(sdxl).__name__ == "StableDiffusionXLPipeline" and is_sdxl(sdxl) and not is_flow_matching(sdxl)
    assert denoiser(sdxl) is sdxl.unet
    saved = EulerDiscreteScheduler.from_pretrained(tiny_sdxl_dir, subfolder="scheduler")
    assert isinstance(sdxl.scheduler, DDIMScheduler) and not sdxl.scheduler.config.set_alpha_to_one
    assert sdxl.scheduler.config.steps_offset == SDXL_SCHEDULER["steps_offset"]
    torch.testing.assert_close(sdxl.scheduler.alphas_cumprod, saved.alphas_cumprod, rtol=0, atol=0)
    for module in (sdxl.vae, sdxl.text_encoder, sdxl.text_encoder_2):
        assert not any(p.requires_grad for p in module.parameters())


def test_prompt_encoder_is_the_penultimate_states_the_pooled_projection_and_the_native_size(sdxl) -> None:
    embeds, uncond, _ = _batch(sdxl)
    states, pooled = [], None
    with torch.no_grad():
        for tokenizer, encoder in ((sdxl.tokenizer, sdxl.text_encoder), (sdxl.tokenizer_2, sdxl.text_encoder_2)):
            ids = tokenizer(PROMPTS, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                            return_tensors="pt").input_ids
            out = encoder(ids, output_hidden_states=True)
            states.append(out.hidden_states[-2])
            pooled = getattr(out, "text_embeds", None)
    assert embeds.sequence.shape == (3, 12, 2 * TEXT_WIDTH) and embeds.pooled.shape == (3, PROJECTION)
    torch.testing.assert_close(embeds.sequence, torch.cat(states, dim=-1), atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(embeds.pooled, pooled, atol=1e-6, rtol=1e-6)
    assert embeds.time_ids.tolist() == [NATIVE_TIME_IDS] * 3
    theirs = sdxl._get_add_time_ids((32, 32), (0, 0), (32, 32), torch.float32, text_encoder_projection_dim=PROJECTION)
    assert torch.equal(sdxl_time_ids(sdxl), theirs)
    # force_zeros_for_empty_prompt (SDXL base's setting): the negative branch is zeros, at the same size
    assert sdxl.config.force_zeros_for_empty_prompt
    assert uncond.sequence.shape == (1, 12, 2 * TEXT_WIDTH) and not uncond.sequence.any() and not uncond.pooled.any()
    assert uncond.time_ids.tolist() == [NATIVE_TIME_IDS]
    picked = embeds[torch.tensor([2, 0])]
    assert len(picked) == 2 and torch.equal(picked.pooled[0], embeds.pooled[2])
    assert torch.equal(picked.time_ids, embeds.time_ids[:2])


def test_without_forced_zeros_the_negative_is_the_encoded_empty_prompt() -> None:
    pipe = build_tiny_sdxl_pipeline(force_zeros_for_empty_prompt=False)
    uncond = SDXLPromptEncoder(pipe, "cpu").unconditional()
    _, negative, _, negative_pooled = pipe.encode_prompt(["a red circle"], device="cpu",
                                                         do_classifier_free_guidance=True)
    torch.testing.assert_close(uncond.sequence, negative, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(uncond.pooled, negative_pooled, atol=1e-6, rtol=1e-6)
    assert uncond.pooled.abs().max() > 1e-3  # not zeros
    pipe.text_encoder_2.config.projection_dim = PROJECTION + 1  # the UNet's added embedding no longer fits
    with pytest.raises(ValueError, match="added embedding takes 64 inputs"):
        sdxl_time_ids(pipe)


def test_prompt_embeds_keep_time_ids_through_the_batch_operations() -> None:
    a = PromptEmbeds(torch.randn(1, 3, 4), torch.randn(1, 2), torch.tensor([NATIVE_TIME_IDS]))
    b = PromptEmbeds(torch.randn(2, 3, 4), torch.randn(2, 2), torch.randn(2, 6))
    both = PromptEmbeds.cat([a.expand(2), b])
    assert len(both) == 4 and torch.equal(both.time_ids[:2], a.time_ids.expand(2, 6))
    assert torch.equal(both.time_ids[2:], b.time_ids)
    assert both[1:3].time_ids.shape == (2, 6) and both.to(torch.float64).time_ids.dtype == torch.float64
    with pytest.raises(ValueError, match="with and without time ids"):
        PromptEmbeds.cat([a, PromptEmbeds(a.sequence, a.pooled)])
    with pytest.raises(ValueError, match="rows of time ids"):
        PromptEmbeds(b.sequence, b.pooled, torch.zeros(1, 6))


# ------------------------------------------------------------------ the policy


def test_unet_gets_the_same_added_conditioning_in_sampling_and_training(sdxl) -> None:
    """One batched UNet call per step, unconditional rows first: token states, pooled embeddings and time ids
    row by row; the sampling call and the training recomputation pass the same tensors."""
    policy = _policy(sdxl, guidance_scale=3.0)
    embeds, uncond, x = _batch(sdxl)
    t = policy.timesteps[1]
    calls = []
    hook = sdxl.unet.register_forward_pre_hook(lambda m, args, kwargs: calls.append(kwargs), with_kwargs=True)
    try:
        with torch.no_grad():
            sampled = policy.step(x, t, embeds, uncond, generator=torch.Generator().manual_seed(0))
        trained = policy.step(x, t, embeds, uncond, next_latents=sampled.prev_sample)  # with gradients
    finally:
        hook.remove()
    assert len(calls) == 2
    for call in calls:
        added = call["added_cond_kwargs"]
        states = torch.cat([uncond.sequence.expand(3, -1, -1), embeds.sequence])
        torch.testing.assert_close(call["encoder_hidden_states"], states, rtol=0, atol=0)
        pooled = torch.cat([torch.zeros(3, PROJECTION), embeds.pooled])
        torch.testing.assert_close(added["text_embeds"], pooled, rtol=0, atol=0)
        assert added["time_ids"].tolist() == [NATIVE_TIME_IDS] * 6
    assert trained.log_prob.requires_grad and torch.equal(trained.mean, sampled.mean)
    assert torch.equal(trained.log_prob.detach(), sampled.log_prob)
    # the mean is the guided DDIM mean: eps_u + w (eps_c - eps_u) from two separate UNet calls
    with torch.no_grad():
        tt = t.expand(3)
        eps_c, eps_u = _unet(sdxl, x, tt, embeds), _unet(sdxl, x, tt, uncond.expand(3))
    hand = ddim_step_with_logprob(policy.scheduler, eps_u + 3.0 * (eps_c - eps_u), t, x, eta=1.0,
                                  prev_sample=sampled.prev_sample)
    torch.testing.assert_close(trained.mean, hand.mean, atol=1e-5, rtol=1e-5)
    assert (eps_c - eps_u).abs().max() > 1e-3  # the prompt matters, so the check above sees the guidance


def test_training_recomputation_of_mixed_steps_gives_ratio_one(sdxl) -> None:
    """The trainer's batch: shuffled (sample, step) pairs of different steps, selected rows of the stored
    embeddings; before an update every importance ratio is 1."""
    policy = _policy(sdxl)
    embeds, uncond, _ = _batch(sdxl)
    latents, log_probs = sample_trajectories(policy, embeds, uncond, torch.Generator().manual_seed(4), batch_size=2)
    assert latents.shape == (3, 5, 4, 8, 8) and log_probs.shape == (3, 4)
    traj = Trajectories(latents, log_probs, policy.timesteps, torch.arange(3), torch.arange(3), embeds).select(
        torch.tensor([2, 0, 1]))
    pairs = torch.randperm(12, generator=torch.Generator().manual_seed(1))
    i, j = pairs // 4, pairs % 4
    args = (traj.latents[i, j], traj.latents[i, j + 1], traj.timesteps[j])
    recomputed = policy.log_prob(*args, traj.prompt_embeds[i], uncond)
    assert recomputed.requires_grad
    ratio = torch.exp(recomputed.detach() - traj.log_probs[i, j])
    torch.testing.assert_close(ratio, torch.ones_like(ratio), atol=1e-5, rtol=0)
    # the added conditioning enters the recomputation: other time ids or pooled embeddings move it
    e = traj.prompt_embeds[i]
    other_size = PromptEmbeds(e.sequence, e.pooled, 2 * e.time_ids)
    no_pooled = PromptEmbeds(e.sequence, 0 * e.pooled, e.time_ids)
    for changed in (other_size, no_pooled):
        with torch.no_grad():
            moved = policy.log_prob(*args, changed, uncond)
        assert (moved - traj.log_probs[i, j]).abs().max() > 1e-4


@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_trajectories_equal_diffusers_sdxl_sampler_with_ddim(sdxl, eta: float) -> None:
    """Our sampler and StableDiffusionXLPipeline with the same DDIM scheduler, x_T and noise generator."""
    policy = _policy(sdxl, eta=eta, guidance_scale=5.0)
    embeds, uncond, _ = _batch(sdxl, n=2)
    latents, _ = sample_trajectories(policy, embeds, uncond, torch.Generator().manual_seed(7))
    gen = torch.Generator().manual_seed(7)
    x_T = torch.randn(2, 4, 8, 8, generator=gen)  # as initial_latents draws it; gen then drives the step noise
    assert torch.equal(x_T, latents[:, 0])
    with torch.no_grad():
        theirs = sdxl(prompt=PROMPTS[:2], latents=x_T, num_inference_steps=4, guidance_scale=5.0, eta=eta,
                      generator=gen, output_type="latent").images
    torch.testing.assert_close(latents[:, -1], theirs, atol=1e-5, rtol=1e-5)
    assert (theirs - x_T).abs().max() > 0.1
    # the same sampler with other size conditioning ends elsewhere: the comparison sees the time ids
    other = PromptEmbeds(embeds.sequence, embeds.pooled, embeds.time_ids * 2)
    moved, _ = sample_trajectories(policy, other, uncond, torch.Generator().manual_seed(7))
    assert (moved[:, -1] - theirs).abs().max() > 1e-3
