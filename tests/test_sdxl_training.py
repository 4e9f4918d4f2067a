"""Training an SDXL-format pipeline: the trainer loads a StableDiffusionXLPipeline folder, trains its UNet with
every estimator, full or LoRA, and exports models plain diffusers loads and samples from."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from loopdiff.cli import main
from loopdiff.estimators import PRESETS
from loopdiff.sampling.embeds import PromptEmbeds
from loopdiff.sampling.policy import DiffusionPolicy
from loopdiff.sampling.sdxl import SDXLPromptEncoder
from loopdiff.training.loop import Batch
from loopdiff.training.trainer import Trainer
from trainer_helpers import check_one_epoch_of_preset, folder_trainer, red_minus_blue


def _trainer(tmp_path: Path, sdxl_dir: Path, **sections: Any) -> Trainer:
    return folder_trainer(tmp_path, sdxl_dir, red_minus_blue, {"training": {"learning_rate": 1e-3}}, **sections)


def _all_pairs_log_probs(trainer: Trainer, traj) -> torch.Tensor:
    """log pi of every stored (sample, step) under the current weights, (N, T)."""
    n, steps = traj.log_probs.shape
    i, j = torch.arange(n).repeat_interleave(steps), torch.arange(steps).repeat(n)
    with torch.no_grad():
        values = trainer.rollout_policy.log_prob(
            traj.latents[i, j], traj.latents[i, j + 1], traj.timesteps[j], traj.prompt_embeds[i], trainer.uncond
        )
    return values.view(n, steps)


def test_two_epochs_of_loop_move_the_log_probs_towards_the_advantages(tmp_path: Path, tiny_sdxl_dir: Path) -> None:
    """Each epoch's update raises log pi of the samples with positive advantage and lowers it for the others:
    the surrogate sum_i A_i (log pi_new - log pi_old) is positive and A and the change correlate."""
    trainer = _trainer(tmp_path, tiny_sdxl_dir)
    assert isinstance(trainer.rollout_policy, DiffusionPolicy) and isinstance(trainer.encoder, SDXLPromptEncoder)
    assert isinstance(trainer.uncond, PromptEmbeds) and trainer.uncond.time_ids is not None
    before = {k: v.clone() for k, v in trainer.unet.state_dict().items()}
    for epoch in range(2):
        traj, rewards = trainer.loop.collect(epoch)[:2]
        advantages = trainer.loop.advantages(rewards, traj.group_ids, traj.prompt_ids)
        stats = trainer.loop.optimise(Batch(traj, rewards, advantages), epoch)
        assert stats["optimizer_steps"] == 4 and stats["skipped_steps"] == 0 and np.isfinite(stats["loss"])
        change = (_all_pairs_log_probs(trainer, traj) - traj.log_probs).mean(dim=1)
        assert float((advantages * change).mean()) > 0, (advantages, change)
        assert np.corrcoef(advantages.numpy(), change.numpy())[0, 1] > 0.3
    assert any(not torch.equal(v, before[k]) for k, v in trainer.unet.state_dict().items())


def test_sampling_log_probs_are_recovered_by_the_train_policy(tmp_path: Path, tiny_sdxl_dir: Path) -> None:
    """Before any update, the trainer's recomputed log-probs give ratio 1 (no clipping, zero approx-KL)."""
    trainer = _trainer(tmp_path, tiny_sdxl_dir, training={"learning_rate": 1e-12, "epochs": 1})
    history = trainer.train()
    assert history[0]["clip_fraction"] == 0.0 and history[0]["approx_kl"] < 1e-10


def test_loop_raises_a_simple_reward_on_sdxl(tmp_path: Path, tiny_sdxl_dir: Path) -> None:
    # red minus blue, 20 epochs: the mean of the last three epochs was 0.44 to 0.74 above the first three's
    # for training seeds 0 and 1 with this reward and its mirror, blue minus red
    trainer = _trainer(tmp_path, tiny_sdxl_dir, training={"epochs": 20, "learning_rate": 2e-3})
    rewards = [h["reward/mean"] for h in trainer.train()]
    first, last = np.mean(rewards[:3]), np.mean(rewards[-3:])
    assert last > first + 0.3, rewards


@pytest.mark.parametrize("preset", list(PRESETS))
def test_every_estimator_preset_trains_an_epoch_on_sdxl(preset: str, tmp_path: Path, tiny_sdxl_dir: Path) -> None:
    trainer = _trainer(tmp_path, tiny_sdxl_dir, estimator={"preset": preset}, sampling={"num_steps": 2},
                       training={"epochs": 1, "samples_per_epoch": 8})
    check_one_epoch_of_preset(trainer, preset)


def test_full_export_loads_as_a_diffusers_sdxl_pipeline_and_samples(tmp_path: Path, tiny_sdxl_dir: Path) -> None:
    from diffusers import DDIMScheduler, StableDiffusionXLPipeline

    trainer = _trainer(tmp_path, tiny_sdxl_dir, estimator={"preset": "reinforce"}, sampling={"num_steps": 2},
                       training={"epochs": 1, "samples_per_epoch": 4})
    trainer.train()
    path = trainer.export()
    assert "StableDiffusionXLPipeline.from_pretrained" in (path / "README.md").read_text()
    loaded = StableDiffusionXLPipeline.from_pretrained(path)
    assert isinstance(loaded.scheduler, DDIMScheduler)
    for name, value in loaded.unet.state_dict().items():
        torch.testing.assert_close(value, trainer.unet.state_dict()[name], rtol=0, atol=0, msg=name)
    loaded.set_progress_bar_config(disable=True)
    image = loaded("a red circle", num_inference_steps=2, output_type="pt").images
    assert image.shape == (1, 3, 32, 32) and bool(torch.isfinite(image).all())


def test_lora_export_loads_into_a_diffusers_sdxl_pipeline(tmp_path: Path, tiny_sdxl_dir: Path) -> None:
    from diffusers import StableDiffusionXLPipeline

    trainer = _trainer(tmp_path, tiny_sdxl_dir, model={"lora": True, "lora_rank": 2}, sampling={"num_steps": 2},
                       training={"epochs": 1, "samples_per_epoch": 8, "learning_rate": 1e-2})
    frozen = trainer.unet.conv_in.weight.detach().clone()
    trainer.train()
    assert torch.equal(trainer.unet.conv_in.weight, frozen)  # base weights untouched under LoRA
    path = trainer.export()
    card = (path / "README.md").read_text()
    assert "StableDiffusionXLPipeline.from_pretrained" in card and "load_lora_weights" in card
    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl_dir)
    pipe.set_progress_bar_config(disable=True)
    embeds = trainer.encoder(["a red circle"])
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    added = {"text_embeds": embeds.pooled, "time_ids": embeds.time_ids}
    kwargs = dict(encoder_hidden_states=embeds.sequence, added_cond_kwargs=added)
    generate = dict(prompt="a red circle", num_inference_steps=2, output_type="pt")
    with torch.no_grad():
        base = pipe.unet(x, 10, **kwargs).sample
        base_image = pipe(**generate, generator=torch.Generator().manual_seed(0)).images
        pipe.load_lora_weights(path)
        ours, theirs = trainer.unet(x, 10, **kwargs).sample, pipe.unet(x, 10, **kwargs).sample
        image = pipe(**generate, generator=torch.Generator().manual_seed(0)).images
    torch.testing.assert_close(theirs, ours, atol=1e-5, rtol=1e-5)
    assert (theirs - base).abs().max() > 1e-4  # the adapters trained and were applied
    assert image.shape == (1, 3, 32, 32) and bool(torch.isfinite(image).all())
    assert (image - base_image).abs().max() > 0


@pytest.mark.parametrize("resolution", [None, 48])
def test_eval_command_on_sdxl_scores_diffusers_own_samples(tmp_path: Path, tiny_sdxl_dir: Path, resolution) -> None:
    """`loopdiff eval` with eta 0 on an SDXL folder scores the images StableDiffusionXLPipeline makes from the
    same x_T (with DDIM, eta 0 and the same guidance), at the native 32 px or at --resolution 48 (then with the
    size conditioning of a 48 px image, as the pipeline given that height and width)."""
    from diffusers import DDIMScheduler, StableDiffusionXLPipeline

    prompts = tmp_path / "val.txt"
    prompts.write_text("a red circle\n")
    out = tmp_path / "scores.json"
    code = main(["eval", "--model", str(tiny_sdxl_dir), "--prompts", str(prompts), "--reward",
                 "trainer_helpers:red_minus_blue", "--images-per-prompt", "2", "--steps", "3", "--eta", "0",
                 "--guidance-scale", "5", "--seed", "7", "--out", str(out),
                 *([] if resolution is None else ["--resolution", str(resolution)])])
    assert code == 0
    score = json.loads(out.read_text())["per_prompt"]["trainer_helpers:red_minus_blue"]
    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl_dir)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    pixels = 32 if resolution is None else resolution
    x_T = torch.randn(2, 4, pixels // 4, pixels // 4, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        images = pipe(["a red circle"] * 2, latents=x_T, num_inference_steps=3, guidance_scale=5.0, eta=0.0,
                      height=pixels, width=pixels, output_type="pt").images
    assert images.shape[-1] == pixels
    np.testing.assert_allclose(score, [float(red_minus_blue(images, [], []).mean())], rtol=1e-4, atol=1e-4)


def test_branch_command_on_sdxl_prints_the_library_measurement(tmp_path: Path, tiny_sdxl_dir: Path, capsys) -> None:
    from loopdiff.config import ModelConfig
    from loopdiff.diagnostics.branching import reward_variance_by_step
    from loopdiff.models import load_pipeline
    from loopdiff.prompts import PromptSet
    from loopdiff.rewards.base import build_reward
    from loopdiff.sampling.policy import PolicyConfig

    prompt_file = tmp_path / "train.txt"
    prompt_file.write_text("a red circle\na blue square\n")
    code = main(["branch", "--model", str(tiny_sdxl_dir), "--prompts", str(prompt_file), "--reward",
                 "jpeg_incompressibility", "--branches", "3", "--steps", "3", "--at", "0,1,3", "--seed", "2"])
    assert code == 0
    rows = [line.split() for line in capsys.readouterr().out.splitlines()[2:]]
    printed = {int(r[0]): float(r[1]) for r in rows}
    pipe = load_pipeline(ModelConfig(pretrained=str(tiny_sdxl_dir)))
    policy = DiffusionPolicy(pipe.unet, pipe.scheduler, PolicyConfig(num_steps=3))
    direct = reward_variance_by_step(policy, SDXLPromptEncoder(pipe, "cpu"), pipe.vae,
                                     PromptSet(("a red circle", "a blue square"), ({}, {})),
                                     build_reward("jpeg_incompressibility"), [0, 1, 3], branches=3, seed=2)
    np.testing.assert_allclose([printed[s] for s in (0, 1, 3)], direct.variance, rtol=1e-3, atol=1e-5)
    assert printed[0] > 0 and printed[3] == 0
