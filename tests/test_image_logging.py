"""Evaluation grids and training samples logged as images: TensorBoard event files (read back with
tensorboard's EventAccumulator) and wandb (its module replaced at the boundary: init and Image)."""

from __future__ import annotations

import importlib.machinery
import io
import sys
import types

import numpy as np
from PIL import Image

from trainer_helpers import make_trainer

EVAL = {"images_per_prompt": 2, "max_prompts": 2, "grid_prompts": 2}


def _tensorboard_images(folder) -> dict[str, list]:
    from tensorboard.backend.event_processing.event_accumulator import IMAGES, EventAccumulator

    events = EventAccumulator(str(folder), size_guidance={IMAGES: 0})
    events.Reload()
    return {tag: events.Images(tag) for tag in events.Tags()[IMAGES]}


def _pixels(encoded: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(encoded)).convert("RGB"))


def test_tensorboard_holds_the_evaluation_grids_and_training_samples(tmp_path) -> None:
    trainer = make_trainer(tmp_path, "ppo", training={"epochs": 2}, eval=EVAL,
                           output={"tensorboard": True, "log_images_every": 2})
    trainer.train()
    run = tmp_path / "run-ppo"
    images = _tensorboard_images(run / "tensorboard")
    assert set(images) == {"eval/base", "eval/final", "eval/base_vs_final", "train/samples"}
    for tag, png in (("eval/base", "base.png"), ("eval/final", "final.png"), ("eval/base_vs_final", "base_vs_final.png")):
        (event,) = images[tag]
        saved = np.asarray(Image.open(run / "grids" / png).convert("RGB"))
        np.testing.assert_array_equal(_pixels(event.encoded_image_string), saved)
    assert [e.step for e in images["eval/base"]] == [0] and [e.step for e in images["eval/final"]] == [2]
    (samples,) = images["train/samples"]  # epoch 2 only: every 2 epochs
    assert samples.step == 2 and samples.height > 4 * 32  # 4 rows of 32-pixel samples, enlarged


def test_no_images_with_log_images_every_zero(tmp_path) -> None:
    trainer = make_trainer(tmp_path, "ppo", eval=EVAL, output={"tensorboard": True, "log_images_every": 0})
    trainer.train()
    assert _tensorboard_images(tmp_path / "run-ppo" / "tensorboard") == {}


def test_wandb_receives_the_same_grids_as_wandb_images(tmp_path, monkeypatch) -> None:
    logged: list[tuple[dict, int]] = []

    class Run:
        def log(self, values, step=None):
            logged.append((values, step))

        def finish(self):
            pass

    class WandbImage:
        def __init__(self, image):
            self.image = image

    fake = types.ModuleType("wandb")  # a module with a spec: found by import and by importlib.util.find_spec
    fake.__spec__ = importlib.machinery.ModuleSpec("wandb", None)
    fake.init, fake.Image = lambda **kwargs: Run(), WandbImage
    monkeypatch.setitem(sys.modules, "wandb", fake)
    trainer = make_trainer(tmp_path, "ppo", eval=EVAL, output={"wandb": True, "log_images_every": 1})
    trainer.train()
    images = {key: (value, step) for values, step in logged for key, value in values.items()
              if isinstance(value, WandbImage)}
    assert set(images) == {"eval/base", "eval/final", "eval/base_vs_final", "train/samples"}
    final, step = images["eval/final"]
    assert step == 1
    saved = np.asarray(Image.open(tmp_path / "run-ppo" / "grids" / "final.png").convert("RGB"))
    np.testing.assert_array_equal(np.asarray(final.image), saved)
