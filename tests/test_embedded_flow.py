"""The embedded flow-matching base (``embedded-flow``): its objective, its pretraining's resume, the shipped folder."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from loopdiff.embedded.pretrain import pretrain_cli
from loopdiff.embedded.pretrain_common import tokenize
from loopdiff.embedded.pretrain_flow import (
    FlowPretrainConfig,
    build_untrained_flow_pipeline,
    encode_captions,
    flow_matching_loss,
    pretrain_flow,
    sample_sigmas,
    transformer_config,
)

TINY = dict(num_layers=1, num_heads=2, head_dim=8)  # a one-block transformer of hidden 16
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _tiny_transformer(seed: int = 0):
    from diffusers import SD3Transformer2DModel

    torch.manual_seed(seed)
    return SD3Transformer2DModel(**transformer_config(**TINY)).eval()


# ----------------------------------------------------------------------------- the objective


def test_flow_matching_loss_is_the_rectified_flow_mse_by_hand():
    transformer = _tiny_transformer()
    g = torch.Generator().manual_seed(1)
    x0 = torch.randn(3, 4, 16, 16, generator=g)
    eps = torch.randn(3, 4, 16, 16, generator=g)
    sequence, pooled = torch.randn(3, 5, 128, generator=g), torch.randn(3, 128, generator=g)
    sigmas = torch.tensor([0.1, 0.5, 0.9])
    with torch.no_grad():
        loss = flow_matching_loss(transformer, x0, sequence, pooled, eps, sigmas)
        total = 0.0
        for i, s in enumerate(sigmas.tolist()):  # one sample at a time, the interpolation written out
            x_t = x0[i : i + 1] * (1.0 - s) + eps[i : i + 1] * s
            v = transformer(x_t, sequence[i : i + 1], pooled[i : i + 1], torch.tensor([1000.0 * s])).sample
            total += float(((v - (eps[i] - x0[i])) ** 2).sum())  # unit weight at every noise level
    assert float(loss) == pytest.approx(total / x0.numel(), rel=1e-5)
    # the velocity target really is eps - x0: a model predicting it exactly has zero loss
    assert float(((eps - x0) - (eps - x0)).pow(2).mean()) == 0.0


def test_sigma_density_is_logit_normal_shifted_as_the_scheduler_shifts_its_grid():
    from diffusers import FlowMatchEulerDiscreteScheduler

    for shift in (1.0, 3.0):
        sigmas = sample_sigmas(5, torch.Generator().manual_seed(7), shift, 0.5, 2.0)
        u = 1.0 / (1.0 + np.exp(-(0.5 + 2.0 * torch.randn(5, generator=torch.Generator().manual_seed(7)).numpy())))
        assert np.allclose(sigmas.numpy(), shift * u / (1 + (shift - 1) * u), atol=1e-6)
        # the same map applied to a uniform grid is the sampler's grid, and timesteps are 1000 * sigma
        scheduler = FlowMatchEulerDiscreteScheduler(shift=shift)
        scheduler.set_timesteps(10)
        # (diffusers' grid ends at the shifted 1/1000, shifted again: the same map, applied to its own minimum)
        lowest = shift * 1e-3 / (1 + (shift - 1) * 1e-3)
        grid = np.linspace(1.0, lowest, 10)
        assert np.allclose(scheduler.sigmas[:-1].numpy(), shift * grid / (1 + (shift - 1) * grid), atol=1e-5)
        assert np.allclose(scheduler.timesteps.numpy(), 1000 * scheduler.sigmas[:-1].numpy(), atol=1e-3)
    many = sample_sigmas(20000, torch.Generator().manual_seed(0), 1.0)
    assert abs(float(many.median()) - 0.5) < 0.01 and float(((many > 0.25) & (many < 0.75)).float().mean()) > 0.6


def test_training_embeddings_are_the_ones_the_sd3_pipeline_makes():
    pipe = build_untrained_flow_pipeline(FlowPretrainConfig(output_dir="", **TINY))
    captions = ["a red circle and a blue square", "", "two striped stars"]
    with torch.no_grad():
        sequence, _, pooled, _ = pipe.encode_prompt(
            captions, captions, None, device="cpu", do_classifier_free_guidance=False, max_sequence_length=8
        )
        ours = encode_captions([pipe.text_encoder, pipe.text_encoder_2], tokenize(pipe.tokenizer, captions, "cpu"), 8)
    assert sequence.shape == (3, pipe.tokenizer.model_max_length + 8, 128)
    assert torch.equal(sequence, ours[0]) and torch.equal(pooled, ours[1])
    assert float(sequence[:, -8:].abs().max()) == 0.0  # no T5: zero tokens


# ----------------------------------------------------------------------------- pretraining


def _state(path: Path) -> dict:
    return torch.load(path / "pretrain_state" / "flow_state.pt", weights_only=False)


def _assert_same(a, b, where: str = "") -> None:
    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for key in a:
            _assert_same(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_same(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


def test_resumed_pretraining_equals_an_uninterrupted_run_bit_for_bit(tmp_path):
    common = ["--batch-size", "4", "--steps", "4", "--warmup-steps", "2", "--checkpoint-every", "2", "--threads", "1",
              "--num-layers", "1", "--num-heads", "2", "--head-dim", "8"]
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    assert pretrain_cli(["--family", "flow", "--output-dir", str(whole)] + common) == 0
    config = FlowPretrainConfig(output_dir=str(parts), batch_size=4, steps=4, warmup_steps=2, checkpoint_every=2,
                                threads=1, **TINY)
    pretrain_flow(config, stop_at=3)  # stopped between checkpoints (at 2 and 4): it saves where it stopped
    assert _state(parts)["step"] == 3
    pretrain_flow(config)
    a, b = _state(whole), _state(parts)
    assert a["step"] == b["step"] == 4 and [s for s, _ in a["history"]] == [0, 1, 2, 3]
    for key in ("transformer", "text_encoder", "text_encoder_2", "ema_transformer", "ema_text_encoder", "opt"):
        _assert_same(a[key], b[key], key)
    assert a["history"] == b["history"]
    untrained = build_untrained_flow_pipeline(config).transformer.state_dict()
    assert any(not torch.equal(untrained[k], v) for k, v in a["transformer"].items())  # it did train
    exported = json.loads((whole / "transformer" / "config.json").read_text())
    assert exported["max_sequence_length"] == 8 and exported["num_layers"] == 1


# ----------------------------------------------------------------------------- the shipped folder


def test_shipped_flow_folder_loads_through_loopdiff_and_plain_diffusers():
    from diffusers import StableDiffusion3Pipeline

    from loopdiff.config import ModelConfig
    from loopdiff.embedded.pipeline import embedded_flow_pipeline_path
    from loopdiff.models import is_flow_matching, load_pipeline

    folder = embedded_flow_pipeline_path()
    size = sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())
    assert size < 10e6, size
    pipe = load_pipeline(ModelConfig(pretrained="embedded-flow"))
    assert isinstance(pipe, StableDiffusion3Pipeline) and is_flow_matching(pipe)
    assert pipe.text_encoder_3 is None and pipe.vae.config.shift_factor == 0.0
    assert pipe.transformer.config.max_sequence_length == 8
    plain = StableDiffusion3Pipeline.from_pretrained(folder, text_encoder_3=None, tokenizer_3=None)
    for name in ("transformer", "text_encoder", "text_encoder_2", "vae"):
        _assert_same(getattr(pipe, name).state_dict(), getattr(plain, name).state_dict(), name)
    plain.set_progress_bar_config(disable=True)
    images = plain(
        ["a red circle"] * 8, num_inference_steps=10, guidance_scale=5.0, height=64, width=64, max_sequence_length=8,
        output_type="pt", generator=torch.Generator().manual_seed(0),
    ).images
    from test_embedded_pipeline import _nearest_palette_color

    labels = _nearest_palette_color(images)
    foreground = labels[labels != "background"]
    assert foreground.size > 0.02 * labels.size  # something was drawn
    assert np.mean(foreground == "red") > 0.5, dict(zip(*np.unique(foreground, return_counts=True)))


def test_short_loop_run_on_the_shipped_flow_base_trains(tmp_path):
    from loopdiff.cli import resolve_config
    from loopdiff.config import load_config
    from loopdiff.training.trainer import Trainer

    config = load_config(resolve_config("embedded-flow-aesthetic"), overrides=[
        "training.epochs=1", "training.samples_per_epoch=8", "sampling.batch_size=8", "sampling.num_steps=4",
        "training.train_denoising_steps=2", "eval.max_prompts=0", "model.device=cpu", "training.learning_rate=1e-3",
        f"output.dir={tmp_path / 'run'}", "output.progress=false", "output.tensorboard=false",
        "reward.asynchronous=false",
    ])
    assert config.model.pretrained == "embedded-flow" and config.sampling.eta == 0.7
    trainer = Trainer(config)
    before = {k: v.clone() for k, v in trainer.pipeline.transformer.state_dict().items()}
    trainer.train()
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert len(records) == 1 and np.isfinite(records[0]["reward/mean"])
    after = trainer.pipeline.transformer.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)
