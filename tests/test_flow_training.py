"""LOOP on an SD3-format pipeline: the trainer routes a StableDiffusion3Pipeline folder to FlowMatchPolicy, every
estimator trains on it, exports load in plain diffusers, and the sample / eval / gradient-noise commands run on it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from loopdiff.cli import main
from loopdiff.config import ModelConfig
from loopdiff.estimators import PRESETS
from loopdiff.sampling.flow_policy import FlowMatchPolicy, PromptEmbeds, SD3PromptEncoder
from loopdiff.models import is_flow_matching, load_pipeline
from loopdiff.training.trainer import Trainer
from trainer_helpers import check_one_epoch_of_preset, folder_trainer, gains_over_noise_control, red_minus_blue


def blue_minus_red(images: torch.Tensor, prompts, metadata) -> torch.Tensor:
    return -red_minus_blue(images, prompts, metadata)


@pytest.fixture(scope="module")
def sd3_dir(tiny_sd3_dir: Path) -> Path:
    return tiny_sd3_dir  # conftest's session folder (tiny_pipelines.build_tiny_sd3_pipeline, saved)


def _trainer(tmp_path: Path, sd3_dir: Path, reward=blue_minus_red, **sections: Any) -> Trainer:
    return folder_trainer(tmp_path, sd3_dir, reward, {"sampling": {"eta": 0.7}}, **sections)


def test_load_pipeline_routes_an_sd3_folder(sd3_dir: Path) -> None:
    pipe = load_pipeline(ModelConfig(pretrained=str(sd3_dir)))
    assert type(pipe).__name__ == "StableDiffusion3Pipeline" and is_flow_matching(pipe)
    assert pipe.text_encoder_3 is None
    for module in (pipe.vae, pipe.text_encoder, pipe.text_encoder_2):
        assert not any(p.requires_grad for p in module.parameters())


@pytest.mark.parametrize("sde_type", ["sde", "cps"])
def test_two_epochs_of_loop_train_the_sd3_transformer(tmp_path: Path, sd3_dir: Path, sde_type: str) -> None:
    trainer = _trainer(tmp_path, sd3_dir, sampling={"sde_type": sde_type})
    assert isinstance(trainer.rollout_policy, FlowMatchPolicy) and isinstance(trainer.train_policy, FlowMatchPolicy)
    assert trainer.rollout_policy.config.sde_type == sde_type and trainer.rollout_policy.config.noise_level == 0.7
    assert isinstance(trainer.encoder, SD3PromptEncoder) and isinstance(trainer.uncond, PromptEmbeds)
    before = {k: v.clone() for k, v in trainer.unet.state_dict().items()}
    history = trainer.train()
    assert len(history) == 2 and all(np.isfinite(h["loss"]) for h in history)
    assert history[0]["optimizer_steps"] == 4 and history[0]["skipped_steps"] == 0
    changed = [k for k, v in trainer.unet.state_dict().items() if not torch.equal(v, before[k])]
    assert changed, "no transformer weight moved"
    exported = trainer.export()
    from diffusers import StableDiffusion3Pipeline

    loaded = StableDiffusion3Pipeline.from_pretrained(exported, text_encoder_3=None, tokenizer_3=None)
    for name, value in loaded.transformer.state_dict().items():
        torch.testing.assert_close(value, trainer.unet.state_dict()[name])


def test_sampling_log_probs_are_recovered_by_the_train_policy(tmp_path: Path, sd3_dir: Path) -> None:
    """Before any update, the trainer's recomputed log-probs give ratio 1 (no clipping, zero approx-KL)."""
    trainer = _trainer(tmp_path, sd3_dir, training={"learning_rate": 1e-12, "epochs": 1})
    history = trainer.train()
    assert history[0]["clip_fraction"] == 0.0 and history[0]["approx_kl"] < 1e-10


def test_loop_raises_a_simple_reward_on_sd3(tmp_path: Path, sd3_dir: Path) -> None:
    """LOOP's gain in blue minus red over 10 epochs beats, by 0.5, the drift of a run trained on noise from the
    same seed (`random_control`'s hashed uniform reward), read from the same sampled images."""
    def build(name: str, reward) -> Trainer:
        return _trainer(tmp_path / name, sd3_dir, reward=reward, training={"epochs": 10})

    gain, drift, loop, per_epoch = gains_over_noise_control(build, blue_minus_red, epochs=10)
    assert gain > drift + 0.5, (loop, per_epoch)
    # Red minus blue, the mirrored reward, does not learn at this budget: paired with such a control over 4
    # seeds it gained -0.01 +- 0.11 in 10 epochs against +0.76 +- 0.29 for blue minus red, though exact
    # gradients (backpropagated through the sampler, 40 Adam steps) raise either by 13-14. The 32-sample
    # LOOP gradient here is nearly pure noise (SNR 0.09 at 512 samples at the base); on one seed, 5 epochs of
    # blue minus red lead to weights where its SNR is 0.27, and 5 epochs of red minus blue to 0.06.


def test_lora_on_sd3_exports_adapters_that_load(tmp_path: Path, sd3_dir: Path) -> None:
    trainer = _trainer(tmp_path, sd3_dir, model={"lora": True}, training={"epochs": 1})
    trainer.train()
    path = trainer.export()
    from diffusers import StableDiffusion3Pipeline

    pipe = StableDiffusion3Pipeline.from_pretrained(sd3_dir, text_encoder_3=None, tokenizer_3=None)
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    embeds = trainer.encoder(["a red circle"])
    kwargs = dict(hidden_states=x, timestep=trainer.rollout_policy.timesteps[:1],
                  encoder_hidden_states=embeds.sequence, pooled_projections=embeds.pooled)
    with torch.no_grad():
        base = pipe.transformer(**kwargs).sample
        pipe.load_lora_weights(path)
        ours, theirs = trainer.unet(**kwargs).sample, pipe.transformer(**kwargs).sample
    torch.testing.assert_close(theirs, ours, atol=1e-5, rtol=1e-5)
    assert (theirs - base).abs().max() > 1e-4  # the adapters trained and were applied


@pytest.mark.parametrize("preset", list(PRESETS))
def test_every_estimator_preset_trains_an_epoch_on_sd3(preset: str, tmp_path: Path, sd3_dir: Path) -> None:
    trainer = _trainer(tmp_path, sd3_dir, estimator={"preset": preset}, sampling={"num_steps": 2},
                       training={"epochs": 1, "samples_per_epoch": 8})
    check_one_epoch_of_preset(trainer, preset)


def test_model_cards_of_sd3_exports_name_the_sd3_pipeline_and_its_sampler(tmp_path: Path, sd3_dir: Path) -> None:
    for lora in (False, True):
        size = {"resolution": 48} if lora else {}
        trainer = _trainer(tmp_path / f"lora-{lora}", sd3_dir, model={"lora": lora}, sampling={"num_steps": 2, **size},
                           training={"epochs": 1, "samples_per_epoch": 4})
        trainer.train()
        card = (trainer.export() / "README.md").read_text()
        assert "from diffusers import StableDiffusion3Pipeline\n" in card
        assert "StableDiffusion3Pipeline.from_pretrained" in card and ("load_lora_weights" in card) == lora
        assert "DDIM" not in card and "eta=" not in card and "StableDiffusionPipeline" not in card
        assert "2 flow-matching steps of Flow-GRPO's SDE (`sde_type: sde`), noise level 0.7" in card
        assert ("A full transformer fine-tune" in card) != lora
        assert ('pipe("a prompt", height=48, width=48, num_inference_steps=2, guidance_scale=5.0)' in card) == lora


def _diffusers_sd3_images(sd3_dir: Path, prompts: list[str], x_T: torch.Tensor, steps: int, guidance: float):
    """Images of diffusers' own StableDiffusion3Pipeline (its Euler ODE) from the initial latents ``x_T``, at the
    size of ``x_T``."""
    from diffusers import StableDiffusion3Pipeline

    pipe = StableDiffusion3Pipeline.from_pretrained(sd3_dir, text_encoder_3=None, tokenizer_3=None)
    pipe.set_progress_bar_config(disable=True)
    pixels = x_T.shape[-1] * pipe.vae_scale_factor
    with torch.no_grad():
        return pipe(prompts, latents=x_T, num_inference_steps=steps, guidance_scale=guidance, height=pixels,
                    width=pixels, output_type="pt").images


@pytest.mark.parametrize("resolution", [None, 48])
def test_eval_command_on_sd3_scores_diffusers_own_samples(tmp_path: Path, sd3_dir: Path, resolution) -> None:
    """`loopdiff eval` with noise level 0 on an SD3 folder scores the images StableDiffusion3Pipeline makes from
    the same x_T (its Euler scheduler, the same guidance), at the native 32 px or at --resolution 48."""
    prompts = tmp_path / "val.txt"
    prompts.write_text("a red circle\na blue square\n")
    out = tmp_path / "scores.json"
    size = [] if resolution is None else ["--resolution", str(resolution)]
    code = main(["eval", "--model", str(sd3_dir), "--prompts", str(prompts), "--reward",
                 "trainer_helpers:red_minus_blue", "--images-per-prompt", "2", "--steps", "3", "--eta", "0",
                 "--guidance-scale", "4.5", "--seed", "7", "--batch-size", "4", "--out", str(out), *size])
    assert code == 0
    score = json.loads(out.read_text())["per_prompt"]["trainer_helpers:red_minus_blue"]
    latent = 8 if resolution is None else resolution // 4  # the tiny VAE downscales 4x
    x_T = torch.randn(4, 4, latent, latent, generator=torch.Generator().manual_seed(7))  # both prompts in one call
    images = _diffusers_sd3_images(sd3_dir, ["a red circle"] * 2 + ["a blue square"] * 2, x_T, 3, 4.5)
    assert images.shape[-1] == (32 if resolution is None else resolution)
    expected = red_minus_blue(images, [], []).view(2, 2).mean(dim=1)
    np.testing.assert_allclose(score, expected.numpy(), rtol=1e-4, atol=1e-4)
    assert abs(score[0] - score[1]) > 1e-3  # the two prompts' images differ


def test_sample_command_on_sd3_draws_diffusers_own_images(tmp_path: Path, sd3_dir: Path) -> None:
    """`loopdiff sample` with noise level 0 writes the grid of StableDiffusion3Pipeline's images from the same x_T."""
    from PIL import Image

    out = tmp_path / "grid.png"
    code = main(["sample", "--model", str(sd3_dir), "--prompt", "a red circle", "--prompt", "a blue square",
                 "--num", "2", "--steps", "3", "--eta", "0", "--guidance-scale", "4.5", "--seed", "3",
                 "--out", str(out)])
    assert code == 0
    grid = np.asarray(Image.open(out).convert("RGB")).astype(np.int16)
    assert grid.shape == (2 * 132, 220 + 2 * 132, 3)  # label column + 2 cells of 128 px (+4 px gaps), 2 rows
    x_T = torch.randn(4, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    images = _diffusers_sd3_images(sd3_dir, ["a red circle"] * 2 + ["a blue square"] * 2, x_T, 3, 4.5)
    theirs = (images.clamp(0, 1) * 255).round().permute(0, 2, 3, 1).numpy().astype(np.int16)
    for index in range(4):
        row, column = divmod(index, 2)
        cell = grid[row * 132 : row * 132 + 128, 220 + column * 132 : 220 + column * 132 + 128]
        assert np.abs(cell[::4, ::4] - theirs[index]).max() <= 1  # 32 px images enlarged 4x (nearest)


def test_gradient_noise_command_on_sd3_prints_the_library_measurement(tmp_path: Path, sd3_dir: Path,
                                                                      capsys) -> None:
    """`loopdiff gradient-noise` trains nothing but needs the denoiser's gradients: on an SD3 folder, those of
    its transformer (a pipeline without a UNet)."""
    from loopdiff.diagnostics.gradient_noise import measure_gradient_noise
    from loopdiff.prompts import PromptSet
    from loopdiff.rewards.base import build_reward
    from loopdiff.sampling.flow_policy import FlowPolicyConfig

    listed = ["a red circle", "a blue square"]
    prompt_file = tmp_path / "train.txt"
    prompt_file.write_text("".join(p + "\n" for p in listed))
    code = main(["gradient-noise", "--model", str(sd3_dir), "--prompts", str(prompt_file), "--groups", "2",
                 "--samples-per-prompt", "2", "--reward", "jpeg_incompressibility", "--steps", "2", "--eta", "0.7",
                 "--guidance-scale", "4.5", "--seed", "5"])
    assert code == 0
    lines = capsys.readouterr().out.splitlines()
    printed = {line.rsplit(None, 1)[0].strip(): float(line.split()[-1]) for line in lines[1:5]}
    rows = {line[:26].strip(): line[26:].split() for line in lines[6:]}

    pipe = load_pipeline(ModelConfig(pretrained=str(sd3_dir)))
    pipe.transformer.requires_grad_(True)
    policy = FlowMatchPolicy(pipe.transformer, pipe.scheduler,
                             FlowPolicyConfig(guidance_scale=4.5, noise_level=0.7, num_steps=2))
    order = torch.randperm(2, generator=torch.Generator().manual_seed(5)).tolist()
    chosen = PromptSet(tuple(listed[i] for i in order), ({},) * 2)
    direct = measure_gradient_noise(policy, SD3PromptEncoder(pipe, "cpu"), pipe.vae, chosen,
                                    build_reward("jpeg_incompressibility"), samples_per_prompt=2, seed=5)
    assert direct.mean_sq > 0
    assert printed["|mean g|^2"] == pytest.approx(direct.mean_sq, rel=1e-3)
    assert printed["noise tr(Cov g)/G"] == pytest.approx(direct.noise, rel=1e-3)
    assert {"joint attention, image", "joint attention, text", "feed-forward"} <= set(rows) == set(direct.by_module)
    image = direct.by_module["joint attention, image"]
    assert [float(v) for v in rows["joint attention, image"][:2]] == pytest.approx([image.mean_sq, image.noise],
                                                                                    rel=1e-3)


def test_sd3_trains_at_another_resolution_and_refuses_sizes_it_cannot_sample(tmp_path: Path, sd3_dir: Path) -> None:
    trainer = _trainer(tmp_path, sd3_dir, sampling={"num_steps": 2, "resolution": 48},
                       training={"epochs": 1, "samples_per_epoch": 4})
    assert trainer.rollout_policy.latent_shape == trainer.train_policy.latent_shape == (4, 12, 12)
    trajectories, rewards = trainer.loop.collect(0)[:2]
    assert trajectories.latents.shape == (4, 3, 4, 12, 12) and bool(torch.isfinite(trajectories.log_probs).all())
    assert np.isfinite(trainer.train()[0]["loss"])
    from loopdiff.config import ConfigError

    with pytest.raises(ConfigError, match=r"sampling.resolution=44 is invalid; allowed: a multiple of 8"):
        _trainer(tmp_path / "a", sd3_dir, sampling={"resolution": 44})
    with pytest.raises(ConfigError, match=r"sampling.resolution=80 is invalid; allowed: at most 64 px"):
        _trainer(tmp_path / "b", sd3_dir, sampling={"resolution": 80})  # pos_embed_max_size 8 patches of 2 x 4 px


def test_dynamic_shift_follows_the_sampled_resolution_as_in_the_sd3_pipeline() -> None:
    """Under ``use_dynamic_shifting`` the schedule depends on the number of image tokens: set_flow_timesteps at
    latent size 12 gives the timesteps StableDiffusion3Pipeline sets for a 48 px image, not the native 32 px ones."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    from loopdiff.sampling.flow_policy import set_flow_timesteps
    from tiny_pipelines import build_tiny_sd3_pipeline

    def shifting() -> FlowMatchEulerDiscreteScheduler:
        return FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, base_image_seq_len=4, max_image_seq_len=64)

    pipe = build_tiny_sd3_pipeline()
    pipe.scheduler = shifting()
    pipe.set_progress_bar_config(disable=True)
    ours = {}
    for size in (None, 12):
        scheduler = shifting()
        set_flow_timesteps(scheduler, 3, pipe.transformer, size)
        ours[size] = scheduler.timesteps.clone()
    for pixels, size in ((32, None), (48, 12)):
        with torch.no_grad():
            pipe("a red circle", num_inference_steps=3, height=pixels, width=pixels, output_type="latent")
        torch.testing.assert_close(ours[size], pipe.scheduler.timesteps)
    assert (ours[12] - ours[None]).abs().max() > 1.0


def test_branch_command_on_sd3_prints_the_library_measurement(tmp_path: Path, sd3_dir: Path, capsys) -> None:
    from loopdiff.diagnostics.branching import reward_variance_by_step
    from loopdiff.prompts import PromptSet
    from loopdiff.rewards.base import build_reward
    from loopdiff.sampling.flow_policy import FlowPolicyConfig

    prompt_file = tmp_path / "train.txt"
    prompt_file.write_text("a red circle\na blue square\n")
    code = main(["branch", "--model", str(sd3_dir), "--prompts", str(prompt_file), "--reward",
                 "jpeg_incompressibility", "--branches", "3", "--steps", "3", "--at", "0,1,3", "--eta", "0.7",
                 "--seed", "2"])
    assert code == 0
    rows = [line.split() for line in capsys.readouterr().out.splitlines()[2:]]
    printed = {int(r[0]): float(r[1]) for r in rows}
    pipe = load_pipeline(ModelConfig(pretrained=str(sd3_dir)))
    policy = FlowMatchPolicy(pipe.transformer, pipe.scheduler, FlowPolicyConfig(noise_level=0.7, num_steps=3,
                                                                                 guidance_scale=5.0))
    direct = reward_variance_by_step(policy, SD3PromptEncoder(pipe, "cpu"), pipe.vae,
                                     PromptSet(("a red circle", "a blue square"), ({}, {})),
                                     build_reward("jpeg_incompressibility"), [0, 1, 3], branches=3, seed=2)
    np.testing.assert_allclose([printed[s] for s in (0, 1, 3)], direct.variance, rtol=1e-3, atol=1e-5)
    assert printed[0] > 0 and printed[3] == 0
