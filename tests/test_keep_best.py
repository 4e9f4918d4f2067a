"""output.keep_best: the windowed trade-off, the weights kept at its peak, their export and evaluation."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from loopdiff.config import ConfigError, config_from_dict, parse_trade_off
from loopdiff.training.best import BestKeeper
from trainer_helpers import make_trainer


def test_trade_off_spec_parses_weights_and_names_a_bad_term() -> None:
    assert parse_trade_off("reward/mean:1, monitor/x/mean:2.5") == {"reward/mean": 1.0, "monitor/x/mean": 2.5}
    assert parse_trade_off("reward/mean") == {"reward/mean": 1.0}
    with pytest.raises(ConfigError, match="'abc'"):
        parse_trade_off("reward/mean:abc")
    with pytest.raises(ConfigError, match="names no metric"):
        parse_trade_off(" , ")
    with pytest.raises(ConfigError, match="output.keep_best"):
        config_from_dict({"output": {"keep_best": "reward/mean:nan"}})


def test_best_epoch_is_the_argmax_of_the_windowed_weighted_sum() -> None:
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=40), rng.normal(size=40)
    keeper = BestKeeper({"a": 1.0, "b": -2.0}, window=5)
    news = [keeper.update(e + 1, {"a": a[e], "b": b[e]}) for e in range(40)]
    windowed = np.convolve(a - 2 * b, np.ones(5) / 5, mode="valid")  # epoch 5 onwards
    assert keeper.best_epoch == int(np.argmax(windowed)) + 5
    assert keeper.best_score == pytest.approx(windowed.max())
    running_max = np.maximum.accumulate(windowed)
    expected_news = [False] * 4 + [True] + list(windowed[1:] > running_max[:-1])
    assert news == expected_news
    replayed = BestKeeper({"a": 1.0, "b": -2.0}, window=5)
    replayed.replay([{"epoch": e + 1, "a": a[e], "b": b[e]} for e in range(40)])
    assert (replayed.best_epoch, replayed.best_score) == (keeper.best_epoch, keeper.best_score)
    with pytest.raises(ConfigError, match=r"\['b'\]"):
        BestKeeper({"a": 1.0, "b": 1.0}).update(1, {"a": 0.0, "reward/mean": 1.0})


def test_kept_weights_are_those_of_the_best_epoch_and_are_exported_and_evaluated(tmp_path) -> None:
    from diffusers import StableDiffusionPipeline

    trainer = make_trainer(
        tmp_path, "reinforce", training={"epochs": 5, "learning_rate": 3e-3},
        eval={"max_prompts": 2, "images_per_prompt": 1, "grid_prompts": 2},
        output={"keep_best": "reward/mean:-1", "keep_best_window": 2},
    )
    weights_after = {}  # epoch -> the UNet's weights at its end
    trainer.train(on_epoch_end=lambda epoch, _: weights_after.update(
        {epoch: {k: v.detach().clone() for k, v in trainer.unet.state_dict().items()}}))
    rewards = np.array([row["reward/mean"] for row in trainer.history])
    windowed = -(rewards[1:] + rewards[:-1]) / 2
    best_epoch = int(np.argmax(windowed)) + 2
    info = json.loads((trainer.run_dir / "best" / "best.json").read_text())
    assert info["epoch"] == best_epoch and info["score"] == pytest.approx(windowed.max())
    kept = load_file(str(trainer.run_dir / "best" / "weights.safetensors"))
    assert kept.keys() == weights_after[best_epoch].keys() and best_epoch < 5
    for name in kept:
        torch.testing.assert_close(kept[name], weights_after[best_epoch][name], rtol=0, atol=0, msg=name)
    final = weights_after[5]
    for name, value in trainer.unet.state_dict().items():  # evaluating the kept weights left the final ones
        torch.testing.assert_close(value, final[name], rtol=0, atol=0, msg=name)

    best_json = json.loads((trainer.run_dir / "eval" / "best.json").read_text())
    assert best_json["prompts"] == json.loads((trainer.run_dir / "eval" / "final.json").read_text())["prompts"]
    assert (trainer.run_dir / "grids" / "fidelity.png").stat().st_size > 1000

    trainer.export()
    for name, value in trainer.unet.state_dict().items():  # the policy holds its final weights again
        torch.testing.assert_close(value, final[name], rtol=0, atol=0, msg=name)
    loaded = StableDiffusionPipeline.from_pretrained(trainer.run_dir / "best_pipeline").unet.state_dict()
    for name in kept:
        torch.testing.assert_close(loaded[name], kept[name], rtol=0, atol=0, msg=name)
    card = (trainer.run_dir / "best_pipeline" / "README.md").read_text()
    assert f"weights of epoch {best_epoch}" in card


def test_resumed_run_keeps_the_same_best(tmp_path) -> None:
    settings = dict(training={"epochs": 4, "learning_rate": 3e-3},
                    output={"keep_best": "reward/mean:-1", "keep_best_window": 1, "checkpoint_every": 1})
    straight = make_trainer(tmp_path / "a", "reinforce", **settings)
    straight.train()
    half = make_trainer(tmp_path / "b", "reinforce", **{**settings, "training": {"epochs": 2, "learning_rate": 3e-3}})
    half.train()
    resumed = make_trainer(tmp_path / "b", "reinforce", **settings)
    resumed.train()
    assert (resumed.best.best_epoch, resumed.best.best_score) == (straight.best.best_epoch, straight.best.best_score)
    a = load_file(str(straight.run_dir / "best" / "weights.safetensors"))
    b = load_file(str(resumed.run_dir / "best" / "weights.safetensors"))
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=0, msg=name)
