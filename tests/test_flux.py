"""Flux (FluxPipeline): loading, the policy against diffusers' own sampler and a hand-computed density, the
transformer's inputs in sampling and training, LOOP training, every estimator, exports and the commands, on a
tiny FluxPipeline saved and loaded back through diffusers (tiny_pipelines.build_tiny_flux_pipeline)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from tiny_pipelines import FLUX_MAX_SEQUENCE_LENGTH as MAX_SEQUENCE_LENGTH
from tiny_pipelines import FLUX_RESOLUTION as RESOLUTION
from tiny_pipelines import build_tiny_flux_pipeline
from loopdiff.cli import main
from loopdiff.config import ConfigError, ModelConfig, SamplingConfig, config_from_dict
from loopdiff.estimators import PRESETS
from loopdiff.models import build_policies, denoiser, is_flow_matching, is_flux, latent_size, load_pipeline
from loopdiff.sampling.embeds import PromptEmbeds
from loopdiff.sampling.flow_policy import FlowPolicyConfig
from loopdiff.sampling.flow_sde import step_sigmas
from loopdiff.sampling.flux import FluxPolicy, FluxPromptEncoder
from loopdiff.sampling.trajectories import Trajectories, decode_latents, sample_trajectories
from loopdiff.training.trainer import Trainer
from test_flow_sde import _hand_log_density
from trainer_helpers import check_one_epoch_of_preset, folder_trainer, gains_over_noise_control, red_minus_blue

LATENT = RESOLUTION // 4  # the tiny VAE downscales 4x


@pytest.fixture(scope="module", autouse=True)
def one_thread(one_torch_thread):
    yield


@pytest.fixture(scope="module")
def flux_dir(tiny_flux_dir: Path) -> Path:
    return tiny_flux_dir  # conftest's session folder (tiny_pipelines.build_tiny_flux_pipeline, saved)


@pytest.fixture(scope="module")
def flux(flux_dir: Path):
    return load_pipeline(ModelConfig(pretrained=str(flux_dir)))


def _policy(pipe, **overrides: Any) -> FluxPolicy:
    config = FlowPolicyConfig(**{"guidance_scale": 3.5, "num_steps": 4, "sample_size": LATENT, **overrides})
    return FluxPolicy(pipe.transformer, pipe.scheduler, config)


def _embeds(pipe, prompts=("a red circle", "a blue square", "a green star")) -> tuple[PromptEmbeds, PromptEmbeds]:
    encoder = FluxPromptEncoder(pipe, "cpu", MAX_SEQUENCE_LENGTH)
    return encoder(list(prompts)), encoder.unconditional()


def _hand_pack(x: torch.Tensor) -> torch.Tensor:
    """(B, C, h, w) -> (B, h/2 * w/2, 4C): token (i, j) holds channel c's 2x2 patch at feature 4c + 2 di + dj."""
    b, c, h, w = x.shape
    return torch.stack([x[:, :, di::2, dj::2] for di in (0, 1) for dj in (0, 1)], dim=2).reshape(b, 4 * c, -1).mT


def _hand_unpack(tokens: torch.Tensor, h: int, w: int) -> torch.Tensor:
    b, _, features = tokens.shape
    patches = tokens.mT.reshape(b, features // 4, 2, 2, h // 2, w // 2)
    out = tokens.new_empty(b, features // 4, h, w)
    for di in (0, 1):
        for dj in (0, 1):
            out[:, :, di::2, dj::2] = patches[:, :, di, dj]
    return out


def _capture(module: torch.nn.Module, calls: list[dict[str, Any]]):
    """A forward pre-hook recording (a detached copy of) every call's keyword inputs."""
    def hook(_, args, kwargs):
        calls.append({k: v.detach().clone() if torch.is_tensor(v) else v for k, v in kwargs.items()})
    return module.register_forward_pre_hook(hook, with_kwargs=True)


# ------------------------------------------------------------------ loading and sizes


def test_load_pipeline_routes_a_flux_folder_and_checks_its_sizes(flux) -> None:
    assert type(flux).__name__ == "FluxPipeline" and is_flux(flux) and is_flow_matching(flux)
    assert type(denoiser(flux)).__name__ == "FluxTransformer2DModel"
    for module in (flux.vae, flux.text_encoder, flux.text_encoder_2):
        assert not any(p.requires_grad for p in module.parameters())
    assert flux._progress_bar_config == {"disable": True}
    assert latent_size(flux, 48) == 12 and latent_size(flux, None) is None
    with pytest.raises(ConfigError, match=r"resolution=36 is invalid; allowed: a multiple of 8 .*2x2 latent patches"):
        latent_size(flux, 36)
    # no native size of its own: FluxPipeline's default_sample_size (128 latents, 512 px with this 4x VAE)
    policy, _, encoder = build_policies(flux, flux.transformer, flux.transformer, SamplingConfig(), torch.device("cpu"))
    assert isinstance(policy, FluxPolicy) and policy.latent_shape == (16, 128, 128)
    assert isinstance(encoder, FluxPromptEncoder) and encoder.max_sequence_length == 512  # FluxPipeline's default
    with pytest.raises(ValueError, match="even config.sample_size"):
        _policy(flux, sample_size=None)


def test_prompt_encoder_gives_the_pipelines_embeddings(flux) -> None:
    embeds, uncond = _embeds(flux)
    sequence, pooled, text_ids = flux.encode_prompt(["a blue square"], device="cpu",
                                                    max_sequence_length=MAX_SEQUENCE_LENGTH)
    torch.testing.assert_close(embeds.sequence[1:2], sequence, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(embeds.pooled[1:2], pooled, atol=1e-6, rtol=1e-6)
    assert embeds.sequence.shape == (3, MAX_SEQUENCE_LENGTH, 16) and embeds.pooled.shape == (3, 16)
    assert uncond.sequence.shape == (1, MAX_SEQUENCE_LENGTH, 16) and torch.equal(text_ids, torch.zeros(8, 3))
    assert (embeds.sequence[0] - embeds.sequence[1]).abs().max() > 1e-3  # the T5 states tell prompts apart
    with pytest.raises(ValueError, match="1 to 512 T5 tokens"):
        FluxPromptEncoder(flux, "cpu", 513)
    with pytest.raises(ConfigError, match=r"max_sequence_length=513 is invalid; allowed: an integer in \[1, 512\]"):
        config_from_dict({"sampling": {"max_sequence_length": 513}})


def test_schedule_is_the_flux_pipelines_at_each_resolution(flux) -> None:
    """sigmas linspace(1, 1/T, T) shifted by mu of the number of image tokens, as FluxPipeline sets them."""
    pipe = build_tiny_flux_pipeline()
    pipe.set_progress_bar_config(disable=True)
    embeds, _ = _embeds(flux, ["a red circle"])
    ours = {}
    for pixels in (RESOLUTION, 64):
        ours[pixels] = _policy(flux, num_steps=3, sample_size=pixels // 4).timesteps.clone()
        with torch.no_grad():
            pipe(prompt_embeds=embeds.sequence, pooled_prompt_embeds=embeds.pooled, num_inference_steps=3,
                 height=pixels, width=pixels, output_type="latent")
        torch.testing.assert_close(ours[pixels], pipe.scheduler.timesteps, atol=0, rtol=0)
    assert (ours[64] - ours[RESOLUTION]).abs().max() > 1.0  # 64 image tokens shift more than 16


# ------------------------------------------------------------------ the policy against diffusers and by hand


def test_zero_noise_reproduces_the_flux_pipelines_images_from_the_same_generator(flux) -> None:
    policy = _policy(flux, noise_level=0.0)
    embeds, uncond = _embeds(flux, ["a red circle", "a blue square"])
    latents, log_probs = sample_trajectories(policy, embeds, uncond, torch.Generator().manual_seed(3))
    assert latents.shape == (2, 5, 16, LATENT, LATENT) and bool(torch.isnan(log_probs).all())
    ours = decode_latents(flux.vae, latents[:, -1])
    common = dict(height=RESOLUTION, width=RESOLUTION, num_inference_steps=4, guidance_scale=3.5, output_type="pt")
    with torch.no_grad():
        given = flux(prompt_embeds=embeds.sequence, pooled_prompt_embeds=embeds.pooled,
                     generator=torch.Generator().manual_seed(3), **common).images
        theirs = flux(["a red circle", "a blue square"], max_sequence_length=MAX_SEQUENCE_LENGTH,
                      generator=torch.Generator().manual_seed(3), **common).images
    assert torch.equal(ours, given)  # the same noise, transformer calls, Euler steps and decoding, bit for bit
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)  # its own prompt encoding batches differently
    assert (ours[0] - ours[1]).abs().max() > 1e-3


@pytest.mark.parametrize("sde_type", ["sde", "cps"])
def test_log_prob_is_the_float64_gaussian_density_of_the_packed_step(flux, sde_type: str) -> None:
    """The velocity from a transformer call packed and unpacked by hand (ids as rows and columns, guidance 3.5 as
    an input, one call), then the step's Gaussian density in float64 over the packed elements."""
    policy = _policy(flux, sde_type=sde_type, noise_level=0.7, reduction="sum")
    embeds, uncond = _embeds(flux)
    indices = [0, 1, 2]  # per-sample timesteps, sigma = 1 included (cps's deterministic last step is apart)
    t = policy.timesteps[indices]
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(3, 16, LATENT, LATENT, generator=gen)
    given = x + 0.3 * torch.randn(x.shape, generator=gen)
    with torch.no_grad():
        out = policy.step(x, t, embeds, uncond, next_latents=given)
        rows, cols = torch.meshgrid(torch.arange(LATENT // 2), torch.arange(LATENT // 2), indexing="ij")
        img_ids = torch.stack([torch.zeros_like(rows), rows, cols], dim=-1).reshape(-1, 3).float()
        tokens = flux.transformer(hidden_states=_hand_pack(x), timestep=t / 1000, guidance=torch.full((3,), 3.5),
                                  pooled_projections=embeds.pooled, encoder_hidden_states=embeds.sequence,
                                  txt_ids=torch.zeros(MAX_SEQUENCE_LENGTH, 3), img_ids=img_ids).sample
    velocity = _hand_unpack(tokens, LATENT, LATENT)
    sigmas, next_sigmas = step_sigmas(policy.scheduler, t)
    for row in range(3):
        mean, std, expected = _hand_log_density(
            _hand_pack(given[row : row + 1]), _hand_pack(x[row : row + 1]), _hand_pack(velocity[row : row + 1]),
            float(sigmas[row]), float(next_sigmas[row]), 0.7, sde_type, "sum",
        )
        np.testing.assert_allclose(_hand_pack(out.mean[row : row + 1]).double().numpy(), mean, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(float(out.std[row]), std, rtol=1e-5)
        np.testing.assert_allclose(float(out.log_prob[row]), expected, rtol=2e-5, atol=1e-3)
    with torch.no_grad():  # "mean" reduces over the same C*h*w elements, however they are laid out
        mean_reduced = _policy(flux, sde_type=sde_type, noise_level=0.7).step(x, t, embeds, uncond, given).log_prob
    torch.testing.assert_close(mean_reduced * x[0].numel(), out.log_prob, rtol=1e-5, atol=1e-3)


@pytest.mark.parametrize("sde_type", ["sde", "cps"])
def test_on_policy_ratio_is_exactly_one(flux, sde_type: str) -> None:
    policy = _policy(flux, sde_type=sde_type, noise_level=0.8)
    embeds, uncond = _embeds(flux)
    x = torch.randn(3, 16, LATENT, LATENT, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        for t in policy.timesteps:
            out = policy.step(x, t, embeds, uncond, generator=torch.Generator().manual_seed(int(t)))
            assert torch.equal(policy.log_prob(x, out.prev_sample, t, embeds, uncond), out.log_prob)
            x = out.prev_sample


def test_transformer_gets_the_pipelines_inputs_in_sampling_and_the_same_in_training(flux) -> None:
    """A forward hook on the transformer: at noise level 0 our sampler calls it with exactly FluxPipeline's inputs
    (packed latents, timestep / 1000, guidance 3.5 as a (B,) input, zero txt_ids, the patch img_ids), one call of
    B rows per step (no unconditional branch); a noisy sampler's calls are repeated exactly when training
    recomputes the log-probabilities of a batch mixing steps, with gradients."""
    embeds, uncond = _embeds(flux, ["a red circle", "a blue square"])
    ours: list[dict[str, Any]] = []
    theirs: list[dict[str, Any]] = []
    handle = _capture(flux.transformer, ours)
    try:
        sample_trajectories(_policy(flux, noise_level=0.0), embeds, uncond, torch.Generator().manual_seed(1))
    finally:
        handle.remove()
    handle = _capture(flux.transformer, theirs)
    try:
        with torch.no_grad():
            flux(prompt_embeds=embeds.sequence, pooled_prompt_embeds=embeds.pooled, num_inference_steps=4,
                 height=RESOLUTION, width=RESOLUTION, guidance_scale=3.5, generator=torch.Generator().manual_seed(1),
                 output_type="latent")
    finally:
        handle.remove()
    assert len(ours) == len(theirs) == 4
    for mine, pipeline_call in zip(ours, theirs):
        assert mine["hidden_states"].shape == (2, (LATENT // 2) ** 2, 64)  # 2 rows: one branch
        assert torch.equal(mine["guidance"], torch.full((2,), 3.5))
        for name in ("hidden_states", "timestep", "guidance", "pooled_projections", "encoder_hidden_states",
                     "txt_ids", "img_ids"):
            assert torch.equal(mine[name], pipeline_call[name]), name

    policy = _policy(flux, noise_level=0.7)
    sampled: list[dict[str, Any]] = []
    handle = _capture(flux.transformer, sampled)
    try:
        latents, log_probs = sample_trajectories(policy, embeds, uncond, torch.Generator().manual_seed(2))
    finally:
        handle.remove()
    traj = Trajectories(latents, log_probs, policy.timesteps, torch.arange(2), torch.arange(2), embeds)
    i, j = torch.tensor([1, 0, 1, 0]), torch.tensor([3, 0, 1, 2])  # (sample, step) pairs, as a training micro-batch
    trained: list[dict[str, Any]] = []
    handle = _capture(flux.transformer, trained)
    try:
        again = policy.log_prob(traj.latents[i, j], traj.latents[i, j + 1], traj.timesteps[j], embeds[i], uncond)
    finally:
        handle.remove()
    assert again.requires_grad and len(trained) == 1
    torch.testing.assert_close(again, log_probs[i, j], atol=1e-5, rtol=1e-5)
    for row, (sample, step) in enumerate(zip(i.tolist(), j.tolist())):
        for name in ("hidden_states", "timestep", "guidance", "pooled_projections", "encoder_hidden_states"):
            assert torch.equal(trained[0][name][row], sampled[step][name][sample]), name
        for name in ("txt_ids", "img_ids"):
            assert torch.equal(trained[0][name], sampled[step][name]), name


def test_a_transformer_without_guidance_embeds_ignores_the_guidance_scale_as_the_pipeline_does() -> None:
    pipe = build_tiny_flux_pipeline(guidance_embeds=False)  # FLUX.1-schnell style
    embeds, uncond = _embeds(pipe, ["a red circle"])
    x = torch.randn(1, 16, LATENT, LATENT, generator=torch.Generator().manual_seed(0))
    policies = [_policy(pipe, guidance_scale=w) for w in (1.0, 3.5)]
    t = policies[0].timesteps[1]
    calls: list[dict[str, Any]] = []
    handle = _capture(pipe.transformer, calls)
    try:
        with torch.no_grad():
            means = [policy.step(x, t, embeds, uncond).mean for policy in policies]
    finally:
        handle.remove()
    assert len(calls) == 2 and all(call["guidance"] is None and len(call["hidden_states"]) == 1 for call in calls)
    assert torch.equal(means[0], means[1])


# ------------------------------------------------------------------ training


def blue_minus_red(images: torch.Tensor, prompts, metadata) -> torch.Tensor:
    return -red_minus_blue(images, prompts, metadata)


def _trainer(tmp_path: Path, flux_dir: Path, reward=red_minus_blue, **sections: Any) -> Trainer:
    flux_sampling = {"eta": 0.7, "guidance_scale": 3.5, "resolution": RESOLUTION,
                     "max_sequence_length": MAX_SEQUENCE_LENGTH}
    return folder_trainer(tmp_path, flux_dir, reward, {"sampling": flux_sampling}, **sections)


def test_sampling_log_probs_are_recovered_by_the_trainer(tmp_path: Path, flux_dir: Path) -> None:
    """Before any update the recomputed log-probs give ratio 1: no clipping, zero approx-KL."""
    trainer = _trainer(tmp_path, flux_dir, training={"learning_rate": 1e-12, "epochs": 1, "samples_per_epoch": 16})
    assert isinstance(trainer.rollout_policy, FluxPolicy) and isinstance(trainer.train_policy, FluxPolicy)
    assert isinstance(trainer.encoder, FluxPromptEncoder) and trainer.rollout_policy.latent_shape == (16, 8, 8)
    record = trainer.train()[0]
    assert record["clip_fraction"] == 0.0 and record["approx_kl"] < 1e-10


def test_loop_raises_a_simple_reward_on_flux_and_the_full_export_loads_in_diffusers(tmp_path: Path,
                                                                                   flux_dir: Path) -> None:
    """LOOP's gain in red minus blue over 6 epochs beats, by 0.5, the drift of a run trained on noise from the same
    seed (read from its images); the export of the trained transformer loads with FluxPipeline.from_pretrained."""
    # over the seeds 0-3 the gain beat the control's drift by 1.3 to 2.3 (blue minus red: by 0.5 to 2.2)
    runs: dict[str, Trainer] = {}

    def build(name: str, reward) -> Trainer:
        runs[name] = _trainer(tmp_path / name, flux_dir, reward=reward, training={"epochs": 6})
        return runs[name]

    gain, drift, loop, control = gains_over_noise_control(build, red_minus_blue, epochs=6, window=2)
    assert gain > drift + 0.5, (loop, control)
    trainer = runs["loop"]
    assert all(np.isfinite(h["loss"]) and h["skipped_steps"] == 0 for h in trainer.history)
    from diffusers import FluxPipeline

    exported = trainer.export()
    loaded = FluxPipeline.from_pretrained(exported)
    for name, value in loaded.transformer.state_dict().items():
        assert torch.equal(value, trainer.unet.state_dict()[name]), name
    card = (exported / "README.md").read_text()
    assert "from diffusers import FluxPipeline\n" in card and "A full transformer fine-tune" in card
    assert 'height=32, width=32, num_inference_steps=4, guidance_scale=3.5, max_sequence_length=8)' in card
    assert "noise level 0.7, embedded guidance 3.5" in card and "DDIM" not in card


def test_lora_export_loads_with_load_lora_weights_and_reproduces_the_trainer(tmp_path: Path, flux_dir: Path) -> None:
    trainer = _trainer(tmp_path, flux_dir, model={"lora": True}, sampling={"num_steps": 2},
                       training={"epochs": 1, "samples_per_epoch": 8})
    trainer.train()
    path = trainer.export()
    from diffusers import FluxPipeline

    pipe = FluxPipeline.from_pretrained(flux_dir)
    pipe.set_progress_bar_config(disable=True)
    embeds = trainer.encoder(["a red circle", "a blue square"])
    x = torch.randn(2, 16, LATENT, LATENT, generator=torch.Generator().manual_seed(0))
    t = trainer.rollout_policy.timesteps[:1]
    config = trainer.rollout_policy.config
    with torch.no_grad():
        base = FluxPolicy(pipe.transformer, pipe.scheduler, config).guided_velocity(x, t, embeds, embeds)
        pipe.load_lora_weights(path)
        theirs = FluxPolicy(pipe.transformer, pipe.scheduler, config).guided_velocity(x, t, embeds, embeds)
        ours = trainer.rollout_policy.guided_velocity(x, t, embeds, embeds)
    torch.testing.assert_close(theirs, ours, atol=1e-5, rtol=1e-5)
    assert (theirs - base).abs().max() > 1e-4  # the adapters trained and were applied
    card = (path / "README.md").read_text()
    assert f'FluxPipeline.from_pretrained("{flux_dir}")\npipe.load_lora_weights(' in card


@pytest.mark.parametrize("preset", list(PRESETS))
def test_every_estimator_preset_trains_an_epoch_on_flux(preset: str, tmp_path: Path, flux_dir: Path) -> None:
    trainer = _trainer(tmp_path, flux_dir, reward=blue_minus_red, estimator={"preset": preset},
                       sampling={"num_steps": 2}, training={"epochs": 1, "samples_per_epoch": 8})
    check_one_epoch_of_preset(trainer, preset)


# ------------------------------------------------------------------ the commands


def test_eval_command_on_flux_scores_the_flux_pipelines_own_images(tmp_path: Path, flux_dir: Path) -> None:
    """`loopdiff eval` at noise level 0 scores the images FluxPipeline makes from the same generator."""
    prompts = tmp_path / "val.txt"
    prompts.write_text("a red circle\na blue square\n")
    out = tmp_path / "scores.json"
    code = main(["eval", "--model", str(flux_dir), "--prompts", str(prompts), "--reward",
                 "trainer_helpers:red_minus_blue", "--images-per-prompt", "2", "--steps", "3", "--eta", "0",
                 "--guidance-scale", "4.0", "--seed", "7", "--batch-size", "4", "--resolution", "48",
                 "--max-sequence-length", str(MAX_SEQUENCE_LENGTH), "--out", str(out)])
    assert code == 0
    score = json.loads(out.read_text())["per_prompt"]["trainer_helpers:red_minus_blue"]
    from diffusers import FluxPipeline

    pipe = FluxPipeline.from_pretrained(flux_dir)
    pipe.set_progress_bar_config(disable=True)
    with torch.no_grad():  # both prompts in one call, as the evaluation samples them
        images = pipe(["a red circle"] * 2 + ["a blue square"] * 2, height=48, width=48, num_inference_steps=3,
                      guidance_scale=4.0, max_sequence_length=MAX_SEQUENCE_LENGTH,
                      generator=torch.Generator().manual_seed(7), output_type="pt").images
    expected = red_minus_blue(images, [], []).view(2, 2).mean(dim=1)
    np.testing.assert_allclose(score, expected.numpy(), rtol=1e-4, atol=1e-4)
    assert abs(score[0] - score[1]) > 1e-3


def test_sample_branch_and_gradient_noise_commands_run_on_flux(tmp_path: Path, flux_dir: Path, capsys) -> None:
    from loopdiff.diagnostics.branching import reward_variance_by_step
    from loopdiff.prompts import PromptSet
    from loopdiff.rewards.base import build_reward

    prompt_file = tmp_path / "train.txt"
    prompt_file.write_text("a red circle\na blue square\n")
    common = ["--model", str(flux_dir), "--resolution", "32", "--max-sequence-length", str(MAX_SEQUENCE_LENGTH)]
    assert main(["sample", *common, "--prompt", "a red circle", "--num", "2", "--steps", "2", "--eta", "0",
                 "--out", str(tmp_path / "grid.png")]) == 0
    assert (tmp_path / "grid.png").is_file()
    capsys.readouterr()
    assert main(["branch", *common, "--prompts", str(prompt_file), "--reward", "jpeg_incompressibility",
                 "--branches", "3", "--steps", "3", "--at", "0,1,3", "--eta", "0.7", "--seed", "2"]) == 0
    rows = [line.split() for line in capsys.readouterr().out.splitlines()[2:]]
    printed = {int(r[0]): float(r[1]) for r in rows}
    pipe = load_pipeline(ModelConfig(pretrained=str(flux_dir)))
    policy = FluxPolicy(pipe.transformer, pipe.scheduler, FlowPolicyConfig(noise_level=0.7, num_steps=3,
                                                                           guidance_scale=5.0, sample_size=LATENT))
    direct = reward_variance_by_step(policy, FluxPromptEncoder(pipe, "cpu", MAX_SEQUENCE_LENGTH), pipe.vae,
                                     PromptSet(("a red circle", "a blue square"), ({}, {})),
                                     build_reward("jpeg_incompressibility"), [0, 1, 3], branches=3, seed=2)
    np.testing.assert_allclose([printed[s] for s in (0, 1, 3)], direct.variance, rtol=1e-3, atol=1e-5)
    assert printed[0] > 0 and printed[3] == 0
    assert main(["gradient-noise", *common, "--prompts", str(prompt_file), "--groups", "2",
                 "--samples-per-prompt", "2", "--reward", "jpeg_incompressibility", "--steps", "2", "--eta", "0.7",
                 "--seed", "5"]) == 0
    lines = capsys.readouterr().out.splitlines()
    rows = {line[:26].strip(): line[26:].split() for line in lines[6:]}
    assert {"joint attention, image", "joint attention, text", "single-stream attention",
            "single-stream MLP"} <= set(rows)
    assert float(lines[1].split()[-1]) > 0 and math.isfinite(float(lines[2].split()[-1]))
