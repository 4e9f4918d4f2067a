"""The benchmark's bookkeeping: its call plan is the calls a trainer epoch really makes, and its bare replay
makes exactly those calls and nothing else (no timing is asserted anywhere); the published architectures it
writes out have the published parameter counts, and scaled down they train a step in each family."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from trainer_helpers import make_trainer

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

from _calls import (  # noqa: E402
    CallShape, EpochShape, bare_epoch_seconds, epoch_plan, observe_calls, text_context_shape,
)
from _families import ARCHITECTURES, FAMILIES, family_configs  # noqa: E402
from epoch import plan_mismatches  # noqa: E402
from families import build_family_trainer, family_setting  # noqa: E402

# 12 samples (3 prompts x K=4), 3 steps, sampling chunks of 8, 2 of 3 steps trained (round(3 x 0.67) = 2),
# 2 inner epochs of 3 optimiser steps, micro-batches of at most 5 pairs.
UNEVEN = {
    "sampling": {"num_steps": 3, "batch_size": 8},
    "training": {"samples_per_epoch": 12, "timestep_fraction": 0.67, "micro_batch_size": 5},
    "estimator": {"minibatches": 3, "inner_epochs": 2},
}
UNGUIDED = {
    "sampling": {"num_steps": 2, "batch_size": 16, "guidance_scale": 1.0},
    "training": {"samples_per_epoch": 8, "micro_batch_size": 64},
}


def test_plan_of_uneven_epoch_matches_hand_count():
    shape = EpochShape(samples=12, num_steps=3, sampling_chunk=8, timestep_fraction=0.67, inner_epochs=2,
                       minibatches=3, micro_batch_size=5)
    plan = epoch_plan(shape)
    # chunk of 8 then 4 trajectories, 3 steps each, both guidance branches per call
    assert plan.sampling == [16, 16, 16, 8, 8, 8]
    assert plan.decoding == [8, 4]
    # 12 x 2 = 24 pairs per inner epoch -> 3 steps of 8 pairs -> micro-batches of 5 and 3 pairs (x2 rows)
    assert plan.training == [[10, 6]] * 6
    assert plan.summary() == {"sampling_calls": 6, "sampling_rows": 72, "decode_calls": 2, "decode_rows": 12,
                              "training_calls": 12, "training_rows": 96, "optimizer_steps": 6}


@pytest.mark.parametrize(
    "samples, steps, chunk, fraction, inner, minibatches, micro, guided",
    [(32, 20, 32, 1.0, 1, 4, 64, True), (40, 7, 12, 0.5, 3, 5, 9, True), (96, 5, 100, 0.3, 1, 7, 13, False)],
)
def test_plan_totals_match_closed_forms(samples, steps, chunk, fraction, inner, minibatches, micro, guided):
    plan = epoch_plan(EpochShape(samples, steps, chunk, guided, fraction, inner, minibatches, micro))
    branches = 2 if guided else 1
    kept = max(1, round(steps * fraction))
    assert sum(plan.sampling) == branches * samples * steps
    assert sum(plan.decoding) == samples
    assert sum(plan.training_calls) == branches * samples * kept * inner
    assert len(plan.training) == minibatches * inner
    assert max(plan.training_calls) <= branches * micro
    assert max(plan.sampling) <= branches * min(chunk, 64)  # sample_trajectories caps a call at 64 trajectories
    step_rows = [sum(step) for step in plan.training]
    assert max(step_rows) - min(step_rows) <= branches  # optimiser steps differ by at most one pair


@pytest.mark.parametrize("sections", [UNEVEN, UNGUIDED], ids=["uneven-guided", "unguided"])
def test_trainer_epoch_makes_exactly_the_planned_calls(tmp_path: Path, sections):
    torch.manual_seed(0)
    trainer = make_trainer(tmp_path, "loop", **sections)
    shape = EpochShape.from_trainer(trainer)
    vae = trainer.pipeline.vae
    with observe_calls(trainer.unet, vae, trainer.accelerator) as seen:
        metrics = trainer.run_epoch(0)
    plan = epoch_plan(shape)
    assert 0 < seen.wall <= metrics["time/epoch"]  # time inside the calls is part of the epoch
    assert "decode" not in vars(vae) and "backward" not in vars(trainer.accelerator)  # wrappers removed
    assert seen.unet_no_grad == plan.sampling
    assert seen.unet_grad == plan.training_calls
    assert seen.decoder == plan.decoding
    assert metrics["optimizer_steps"] == len(plan.training)
    assert plan_mismatches(seen, shape) == []
    wrong = EpochShape(**{**shape.__dict__, "minibatches": shape.minibatches + 1})
    assert any("training" in problem for problem in plan_mismatches(seen, wrong))


def test_bare_replay_makes_the_planned_calls_and_leaves_the_model_alone(tmp_path: Path):
    trainer = make_trainer(tmp_path, "loop", **UNEVEN)
    plan = epoch_plan(EpochShape.from_trainer(trainer))
    before = {k: v.clone() for k, v in trainer.unet.state_dict().items()}
    trainer.unet.eval()
    with observe_calls(trainer.unet, trainer.pipeline.vae) as seen:
        times = bare_epoch_seconds(trainer.unet, trainer.pipeline.vae, plan, text_context_shape(trainer))
    assert seen.unet_no_grad == plan.sampling
    assert seen.unet_grad == plan.training_calls
    assert seen.decoder == plan.decoding
    assert times.total == pytest.approx(times.sampling + times.decoding + times.training)
    assert not trainer.unet.training  # mode restored
    assert all(p.grad is None for p in trainer.unet.parameters())
    after = trainer.unet.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_peak_memory_of_a_subprocess_is_its_own():
    """A benchmark subprocess must not report its driver's memory (ru_maxrss survives exec on Linux)."""
    import subprocess

    from _memory import peak_rss_mb

    if not Path("/proc/self/status").is_file():
        pytest.skip("needs Linux /proc to read a process's own peak memory")
    ballast = bytearray(256 * 1024 * 1024)  # touched: bytearray zero-fills
    parent = peak_rss_mb()
    child = subprocess.run(
        [sys.executable, "-c", "import sys; sys.path.insert(0, sys.argv[1]); from _memory import peak_rss_mb; "
         "print(peak_rss_mb())", str(Path(__file__).resolve().parents[1] / "bench")],
        capture_output=True, text=True, check=True,
    )
    assert parent >= 256
    assert float(child.stdout) < parent - 200
    del ballast


# ---------------------------------------------------------------- the families' published architectures

# Parameter counts of the published checkpoints (SD 2 base, SDXL base 1.0, SD3 medium, FLUX.1-dev): denoiser, VAE,
# and each text encoder: CLIP's with its 49408-token vocabulary, Flux's T5-XXL encoder with T5's 32128 tokens.
PUBLISHED_PARAMETERS = {
    "sd2": (865_910_724, 83_653_863, [340_387_840]),
    "sdxl": (2_567_463_684, 83_653_863, [123_060_480, 694_659_840]),
    "sd3": (2_028_328_000, 83_819_683, [123_650_304, 694_659_840]),
    "flux": (11_901_408_320, 83_819_683, [123_060_480, 4_762_310_656]),
}


@pytest.mark.parametrize("family", FAMILIES)
def test_written_out_architectures_have_the_published_parameter_counts(family: str) -> None:
    """Built on the meta device (no memory, no weights) from the configs the benchmark writes out."""
    from diffusers import AutoencoderKL, FluxTransformer2DModel, SD3Transformer2DModel, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, T5Config, T5EncoderModel

    configs = family_configs(family, scale=1)
    encoders = {"sd2": [CLIPTextModel], "sdxl": [CLIPTextModel, CLIPTextModelWithProjection],
                "sd3": [CLIPTextModelWithProjection] * 2, "flux": [CLIPTextModel]}[family]
    denoisers = {"sd3": SD3Transformer2DModel, "flux": FluxTransformer2DModel}
    with torch.device("meta"):
        denoiser = (denoisers[family](**configs["transformer"]) if family in denoisers
                    else UNet2DConditionModel(**configs["unet"]))
        vae = AutoencoderKL(**configs["vae"])
        texts = [cls(CLIPTextConfig(vocab_size=49408, **c)) for cls, c in zip(encoders, configs["text_encoders"])]
        if family == "flux":
            texts.append(T5EncoderModel(T5Config(vocab_size=32128, **configs["t5"])))
    count = lambda module: sum(p.numel() for p in module.parameters())  # noqa: E731
    assert (count(denoiser), count(vae), [count(t) for t in texts]) == PUBLISHED_PARAMETERS[family]


@pytest.mark.parametrize("scale", [1, 8, 64])
def test_scaled_configs_keep_the_widths_the_components_exchange_consistent(scale: int) -> None:
    sd2, sdxl, sd3, flux = (family_configs(f, scale) for f in FAMILIES)
    assert sd2["unet"]["cross_attention_dim"] == sd2["text_encoders"][0]["hidden_size"]
    first, second = sdxl["text_encoders"]
    unet = sdxl["unet"]
    assert unet["cross_attention_dim"] == first["hidden_size"] + second["hidden_size"]  # the two states concatenated
    time_ids = 6 * unet["addition_time_embed_dim"]  # six size numbers, each embedded in that many features
    assert unet["projection_class_embeddings_input_dim"] == time_ids + second["projection_dim"]
    first, second = sd3["text_encoders"]
    transformer = sd3["transformer"]
    assert transformer["pooled_projection_dim"] == first["projection_dim"] + second["projection_dim"]
    assert transformer["joint_attention_dim"] >= first["hidden_size"] + second["hidden_size"]  # CLIP states padded
    heads, head_width = transformer["num_attention_heads"], transformer["attention_head_dim"]
    assert transformer["caption_projection_dim"] == heads * head_width
    transformer, (clip,), t5 = flux["transformer"], flux["text_encoders"], flux["t5"]
    assert transformer["joint_attention_dim"] == t5["d_model"]  # T5's token states
    assert transformer["pooled_projection_dim"] == clip["hidden_size"]  # CLIPTextModel's pooled output
    axes = transformer["axes_dims_rope"]  # rotary pairs over (id, row, column), filling the head
    assert sum(axes) == transformer["attention_head_dim"] and all(a % 2 == 0 for a in axes)
    assert t5["d_kv"] * t5["num_heads"] == t5["d_model"]
    assert transformer["in_channels"] == 4 * flux["vae"]["latent_channels"]  # 2x2 patches of the latents
    for configs in (sd2, sdxl, sd3, flux):
        assert all(t["num_hidden_layers"] >= (2 if configs in (sdxl, sd3) else 1) for t in configs["text_encoders"])
        widths = configs["vae"]["block_out_channels"] + configs.get("unet", {}).get("block_out_channels", [])
        assert all(w % configs["vae"]["norm_num_groups"] == 0 for w in widths)
    for family, configs in zip(FAMILIES, (sd2, sdxl, sd3, flux)):
        key = "unet" if family in ("sd2", "sdxl") else "transformer"
        widths = "block_out_channels" if key == "unet" else "attention_head_dim"
        published = ARCHITECTURES[family][key][widths]
        assert configs[key][widths] == ([w // scale for w in published] if isinstance(published, list)
                                        else published // scale)
    with pytest.raises(ValueError, match="scale=3"):
        family_configs("sd2", 3)


@pytest.mark.parametrize("family", FAMILIES)
def test_scaled_down_real_architecture_takes_training_steps_on_the_cpu(family: str, tmp_path: Path) -> None:
    """Widths / 64 at 64 px: the denoiser maps latents to latents of the same shape, one trainer epoch makes the
    planned calls with finite losses, gradients reach the trained parameters and the step moves them; the bare
    replay's random inputs fit the family's call."""
    torch.manual_seed(0)
    setting = family_setting(family, 64, steps=2, prompts=1, k=2)
    trainer = build_family_trainer(family, 64, setting, tmp_path)
    shape = CallShape.from_trainer(trainer)
    latent_channels = 16 if family in ("sd3", "flux") else 4
    assert shape.latent == (latent_channels, 8, 8) and shape.kind == {"sd2": "sd"}.get(family, family)
    # CLIP's 77 tokens (SD3: and T5's 256, zeros without T5; Flux: T5's 128 alone) at the cross-attention width / 64
    texts = {"sd2": (77, 1024 // 64), "sdxl": (77, 2048 // 64), "sd3": (77 + 256, 4096 // 64),
             "flux": (128, 4096 // 64)}
    assert shape.text == texts[family] and shape.guidance == (3.5 if family == "flux" else None)
    inputs = shape.inputs(3, torch.Generator().manual_seed(0), torch.device("cpu"))
    trainer.unet.train()
    out = trainer.unet(**inputs).sample
    latents = inputs["sample" if family in ("sd2", "sdxl") else "hidden_states"]  # Flux's packed: (3, 16, 64)
    assert out.shape == latents.shape and bool(torch.isfinite(out).all())
    out.square().mean().backward()
    grads = [p.grad for p in trainer.params]
    assert all(g is not None and bool(torch.isfinite(g).all()) for g in grads)
    assert sum(float(g.abs().sum() > 0) for g in grads) >= len(grads) / 2  # LoRA: the zero-initialised B matrices
    trainer.optimizer.zero_grad(set_to_none=True)

    before = [p.detach().clone() for p in trainer.params]
    plan_shape = EpochShape.from_trainer(trainer)
    with observe_calls(trainer.unet, trainer.pipeline.vae) as seen:
        metrics = trainer.run_epoch(0)
    assert plan_mismatches(seen, plan_shape) == []
    assert metrics["optimizer_steps"] == trainer.estimator.minibatches and metrics["skipped_steps"] == 0
    assert np.isfinite(metrics["loss"]) and metrics["grad_norm"] > 0
    assert any(not torch.equal(p, b) for p, b in zip(trainer.params, before))
    plan = epoch_plan(plan_shape)
    with observe_calls(trainer.unet, trainer.pipeline.vae) as seen:
        bare_epoch_seconds(trainer.unet, trainer.pipeline.vae, plan, shape)
    assert (seen.unet_no_grad, seen.unet_grad, seen.decoder) == (plan.sampling, plan.training_calls, plan.decoding)
