"""The embedded aesthetic task: the colourfulness evaluator, the preference data and the shipped scorer."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from loopdiff.embedded import train_scorers as T
from loopdiff.embedded.aesthetic import ColorfulnessEvaluator, colorfulness, images_to_pixels
from loopdiff.embedded.scorers import AestheticScorer, load_scorer, save_scorer
from loopdiff.embedded.world import Scene, WorldObject, render
from loopdiff.rewards.base import build_reward, registered_rewards


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _colorfulness_by_hand(image: np.ndarray) -> float:
    """Hasler and Suesstrunk (2003), Eq. for M, written pixel by pixel."""
    rg, yb = [], []
    for r, g, b in image.reshape(-1, 3).astype(float).tolist():
        rg.append(r - g)
        yb.append(0.5 * (r + g) - b)
    mean_rg, mean_yb = sum(rg) / len(rg), sum(yb) / len(yb)
    var_rg = sum((v - mean_rg) ** 2 for v in rg) / len(rg)
    var_yb = sum((v - mean_yb) ** 2 for v in yb) / len(yb)
    return math.sqrt(var_rg + var_yb) + 0.3 * math.sqrt(mean_rg**2 + mean_yb**2)


def _scene(texture: str, size: int) -> Scene:
    return Scene((WorldObject("circle", "red", texture, size, 18, 32), WorldObject("square", "blue", texture, size, 46, 32)))


def test_colorfulness_matches_the_formula_by_hand():
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(3, 9, 7, 3)).astype(np.uint8)
    expected = [_colorfulness_by_hand(image) for image in images]
    np.testing.assert_allclose(colorfulness(images), expected, rtol=1e-10)


def test_colorfulness_of_grey_is_zero_and_of_a_flat_colour_is_its_offset():
    grey = np.full((1, 8, 8, 3), 128, dtype=np.uint8)
    assert colorfulness(grey)[0] == 0.0
    red = np.zeros((1, 8, 8, 3), dtype=np.uint8)
    red[..., 0] = 200  # rg = 200, yb = 100, no spread
    assert colorfulness(red)[0] == pytest.approx(0.3 * math.hypot(200, 100))


def test_plain_and_larger_objects_are_more_colourful():
    score = {(t, s): colorfulness(render(_scene(t, s))[None])[0] for t in ("plain", "striped") for s in (20, 30)}
    assert score["plain", 20] > score["striped", 20]
    assert score["plain", 30] > score["plain", 20]


def test_evaluator_reads_tensors_as_png_pixels():
    image = render(_scene("dotted", 25))
    tensor = torch.from_numpy(image).permute(2, 0, 1)[None].float() / 255.0
    np.testing.assert_array_equal(images_to_pixels(tensor)[0].numpy(), image)
    score = ColorfulnessEvaluator()(tensor, ["a red circle and a blue square"], [{}])
    assert score.dtype == torch.float32
    assert score.item() == pytest.approx(_colorfulness_by_hand(image) / 100, rel=1e-6)


def test_bad_image_shapes_are_named():
    with pytest.raises(ValueError, match=r"\(N, H, W, 3\)"):
        colorfulness(np.zeros((8, 8, 3)))
    with pytest.raises(ValueError, match=r"\(N, 3, H, W\)"):
        images_to_pixels(torch.zeros(2, 8, 8, 3))


def test_pairwise_agreement_against_brute_force():
    rng = np.random.default_rng(1)
    target = torch.from_numpy(rng.random(25)).float()
    predicted = target + 0.2 * torch.from_numpy(rng.standard_normal(25)).float()
    agree = total = 0
    for i in range(25):
        for j in range(i + 1, 25):
            if abs(target[i] - target[j]) >= 0.1:
                total += 1
                agree += (predicted[i] > predicted[j]) == (target[i] > target[j])
    assert T.pairwise_agreement(predicted, target, margin=0.1) == pytest.approx(agree / total)
    assert T.pairwise_agreement(target, target, margin=0.1) == 1.0
    assert T.pairwise_agreement(-target, target, margin=0.1) == 0.0


def test_preference_labels_follow_bradley_terry():
    scores = torch.tensor([[0.6, 0.5]] * 40_000)
    labels = T.preference_labels(scores, np.random.default_rng(2), temperature=0.05)
    expected = 1 / (1 + math.exp(-0.1 / 0.05))
    assert labels.mean().item() == pytest.approx(expected, abs=0.01)


def test_aesthetic_scenes_cover_sizes_beyond_the_prompts():
    rng = np.random.default_rng(3)
    sizes = [obj.size for _ in range(300) for obj in T.aesthetic_scene(rng).objects]
    assert min(sizes) < 20 and max(sizes) > 30


def test_scorer_round_trip_and_calibration(tmp_path):
    torch.manual_seed(0)
    model = AestheticScorer(width=16, hidden=8).eval()
    images = torch.rand(6, 3, 64, 64)
    with torch.no_grad():
        logits = model(images)
    target = 2.0 * logits + 0.5
    calibration = T._calibrate(T._logits(model, images), target)
    assert calibration["scale"] == pytest.approx(2.0, rel=1e-4)
    assert calibration["shift"] == pytest.approx(0.5, abs=1e-4)
    config = {"kind": "aesthetic", "arguments": {"width": 16, "hidden": 8}, "calibration": calibration}
    save_scorer(model, config, tmp_path, "aesthetic")
    reward = build_reward("embedded_aesthetic", {"embedded_aesthetic": {"directory": str(tmp_path)}})
    torch.testing.assert_close(reward(images, [""] * 6, [{}] * 6), target, rtol=1e-4, atol=1e-5)


def test_shipped_scorer_agrees_with_the_evaluator_on_renders():
    """The shipped scorer orders fresh degraded renders as colourfulness does (>= 90% of decided pairs)."""
    assert "embedded_aesthetic" in registered_rewards()
    _, config = load_scorer("aesthetic")
    assert config["metrics"]["pairwise_agreement_base_images"] >= 0.9
    rng = np.random.default_rng(12345)
    images = T.augment(T.to_tensor([T.aesthetic_scene(rng) for _ in range(120)]), torch.Generator().manual_seed(5))
    target = ColorfulnessEvaluator()(images, [""] * 120, [{}] * 120)
    predicted = build_reward("embedded_aesthetic")(images, [""] * 120, [{}] * 120)
    assert T.pairwise_agreement(predicted, target) >= 0.9
    assert (predicted - target).abs().mean() < 0.1  # calibrated onto the evaluator's scale


def test_scorer_training_resumes_from_its_checkpoint_as_if_uninterrupted(tmp_path):
    """A run that stops after its step-2 checkpoint and is started again ends with the uninterrupted run's
    weights (the checkpoint loads with weights_only=True; the initial weights are seeded by the config, each
    step's data by the step)."""
    config = {"kind": "aesthetic", "arguments": {"width": 16, "hidden": 8}, "training": {"seed": 0}}
    images = torch.rand(6, 3, 16, 16, generator=torch.Generator().manual_seed(0))

    def step_loss(model, rng):
        picked = torch.from_numpy(rng.integers(len(images), size=4))
        return model(images[picked]).pow(2).mean()

    def crashing(model, rng):
        if len(calls) == 3:
            raise KeyboardInterrupt
        calls.append(1)
        return step_loss(model, rng)

    (tmp_path / "a").mkdir(), (tmp_path / "b").mkdir()
    torch.manual_seed(1)  # the global generator's state must not matter: the config's seed sets the weights
    whole = T._train("s", dict(config), 4, 1e-2, tmp_path / "a", step_loss, checkpoint_every=2)
    calls: list[int] = []
    torch.manual_seed(2)
    with pytest.raises(KeyboardInterrupt):
        T._train("s", dict(config), 4, 1e-2, tmp_path / "b", crashing, checkpoint_every=2)
    resumed = T._train("s", dict(config), 4, 1e-2, tmp_path / "b", step_loss, checkpoint_every=2)
    assert (tmp_path / "b" / "s.ckpt.pt").is_file()
    for name, value in whole.state_dict().items():
        torch.testing.assert_close(resumed.state_dict()[name], value, rtol=0, atol=0)
    fresh = T.build_scorer(config).state_dict()
    assert any(not torch.equal(fresh[k], v) for k, v in whole.state_dict().items())


def test_aesthetic_scorer_and_calibration_are_fit_on_training_prompts_only(tmp_path, monkeypatch):
    """Every image the scorer is trained or calibrated on comes from the training split; validation images
    are only judged."""
    drawn: list[tuple[str, torch.Tensor]] = []

    def fake_base_images(n, seed, split, **_):
        images = torch.rand(n, 3, 64, 64, generator=torch.Generator().manual_seed(seed))
        drawn.append((split, images))
        return images

    monkeypatch.setattr(T, "base_model_images", fake_base_images)
    config = T.train_aesthetic(tmp_path, steps=2, batch=8, generated=8, held_out=16)
    splits = [split for split, _ in drawn]
    assert splits == ["train", "train", "val"]  # the pool, the calibration, the judged images
    model, _ = load_scorer("aesthetic", tmp_path)
    fit = drawn[1][1]
    expected = T._calibrate(T._logits(model, fit), T.colorfulness_score(fit))
    assert config["calibration"] == pytest.approx(expected)
