"""The embedded world's learned training rewards: shipped weights, accuracy, T2I-CompBench formulas."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch

from loopdiff.embedded import rewards as R
from loopdiff.embedded import train_scorers as T
from loopdiff.embedded.prompts import generate_prompt, numeracy_score, parse_prompt, prompt_text, scene_for_prompt
from loopdiff.embedded.scorers import (
    DEFAULT_VOCAB,
    GridDetection,
    PhraseVQA,
    attribute_table,
    encode_texts,
    load_scorer,
    save_scorer,
    scorer_dir,
)
from loopdiff.embedded.world import COLORS, SHAPES, TEXTURES, Scene, WorldObject
from loopdiff.rewards.base import RewardError, build_reward, registered_rewards
from loopdiff.rewards.phrases import split_noun_phrases

NAMES = ("vqa", "detector", "aligner")


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _prompt_batch(category: str, n: int, seed: int) -> tuple[list[str], torch.Tensor, list]:
    rng = np.random.default_rng(seed)
    prompts = [generate_prompt(rng, category) for _ in range(n)]
    scenes = [scene_for_prompt(p, rng) for p in prompts]
    return [p.text for p in prompts], T.to_tensor(scenes), prompts


# ----------------------------------------------------------------------------- files


def test_shipped_scorers_load_and_are_small():
    total = 0
    for name in NAMES:
        model, config = load_scorer(name)
        assert config["kind"] == name and not model.training
        assert "metrics" in config and "training" in config
        total += (scorer_dir() / f"{name}.safetensors").stat().st_size
    assert total < 5_000_000


def test_save_and_load_round_trip(tmp_path):
    vocab = list(DEFAULT_VOCAB)
    config = {"kind": "vqa", "arguments": {"vocab_size": len(vocab), "width": 16, "vocab": vocab}}
    torch.manual_seed(0)
    model = PhraseVQA(**config["arguments"]).eval()
    save_scorer(model, config, tmp_path, "vqa")
    loaded, _ = load_scorer("vqa", tmp_path)
    images, tokens = torch.rand(2, 3, 64, 64), encode_texts(["a red circle", "two stars"], vocab)
    assert torch.equal(model(images, tokens), loaded(images, tokens))
    with pytest.raises(FileNotFoundError, match="detector.safetensors"):
        load_scorer("detector", tmp_path)


def test_attribute_table_maps_singular_and_plural_words():
    vocab = ["<pad>", "a", "red", "circles", "crosses", "dotted", "cross", "car"]
    table = attribute_table(vocab).tolist()
    assert table[2] == [1, list(COLORS).index("red")]
    assert table[3] == [2, SHAPES.index("circle")] and table[4] == table[6] == [2, SHAPES.index("cross")]
    assert table[5] == [3, TEXTURES.index("dotted")]
    assert table[1] == table[7] == [0, 0]


# ----------------------------------------------------------------------------- VQA


def test_vqa_answers_held_out_phrases():
    model, config = load_scorer("vqa")
    assert T.evaluate_vqa(model, config["vocab"], n_images=100, seed=777) >= 0.9
    assert T.evaluate_vqa(model, config["vocab"], n_images=100, seed=778, degrade=True) >= 0.85


def test_vqa_reads_the_shipped_vaes_round_trips():
    """The scorer trains on what the world's VAE makes of renders, so it reads generated-looking images."""
    from loopdiff.embedded.pipeline import embedded_pipeline_path

    model, config = load_scorer("vqa")
    round_trip = T.VaeRoundTrip(embedded_pipeline_path() / "vae")
    assert T.evaluate_vqa(model, config["vocab"], n_images=100, seed=779, round_trip=round_trip) >= 0.85


def test_round_trip_degradation_by_parts(tmp_path):
    from tiny_pipelines import tiny_vae

    torch.manual_seed(0)
    tiny_vae(sample_size=64).save_pretrained(tmp_path / "vae")
    images = torch.rand(6, 3, 64, 64)
    exact = T.VaeRoundTrip(tmp_path / "vae", max_latent_noise=0.0)
    with torch.no_grad():
        by_hand = (exact.vae.decode(exact.vae.encode(images * 2 - 1).latent_dist.mean).sample + 1) / 2
    torch.testing.assert_close(exact(images, torch.Generator().manual_seed(1)), by_hand.clamp(0, 1))
    noisy = T.VaeRoundTrip(tmp_path / "vae", max_latent_noise=0.3)
    assert (noisy(images, torch.Generator().manual_seed(1)) - by_hand.clamp(0, 1)).abs().max() > 1e-3
    plain = T.degrade_like_generations(images, torch.Generator().manual_seed(2), exact, fraction=0.0)
    torch.testing.assert_close(plain, T.augment(images, torch.Generator().manual_seed(2)))
    all_round = T.degrade_like_generations(images, torch.Generator().manual_seed(3), exact, fraction=1.0)
    generator = torch.Generator().manual_seed(3)
    torch.rand(6, generator=generator)  # the draw that chose the images to round-trip
    torch.testing.assert_close(all_round, T.augment(exact(images, generator), generator))


def test_vqa_reward_is_the_product_of_per_phrase_yes_ratios():
    texts, images, _ = _prompt_batch("color", 4, seed=5)
    texts[1] = "a dotted red star on the left of a blue square"
    reward = R.EmbeddedVQA()
    scores = reward(images, texts, [{}] * 4)
    model, config = load_scorer("vqa")
    for i, text in enumerate(texts):
        expected = 1.0
        for phrase in split_noun_phrases(text):
            with torch.no_grad():
                yes, no = model(images[i : i + 1], encode_texts([phrase], config["vocab"]))[0].tolist()
            expected *= np.exp(yes) / (np.exp(yes) + np.exp(no))
        assert scores[i].item() == pytest.approx(expected, rel=1e-4, abs=1e-6)


def test_vqa_reward_prefers_the_true_colour_binding():
    texts, images, prompts = _prompt_batch("color", 24, seed=6)
    swapped = [prompt_text([replace(a, color=b.color), replace(b, color=a.color)]) for a, b in (p.objects for p in prompts)]
    reward = R.EmbeddedVQA()
    right, wrong = reward(images, texts, [{}] * 24), reward(images, swapped, [{}] * 24)
    assert right.mean() > 0.6 and wrong.mean() < 0.2, (right.mean(), wrong.mean())
    assert (right > wrong).float().mean() >= 0.9


# ----------------------------------------------------------------------------- detector formulas


def _det(shape, color, box, score=0.9, texture="plain", p=1.0) -> GridDetection:
    return GridDetection(score, box, color, shape, texture, {"color": p, "shape": p, "texture": p})


def test_spatial_formula_by_hand():
    prompt = parse_prompt("a red circle on the left of a blue square")
    left, right = (0, 20, 10, 30), (40, 20, 50, 30)
    both = [_det("circle", "red", left, 0.8, p=0.9), _det("square", "blue", right, 0.6, p=0.5)]
    assert R.spatial_formula(prompt, both) == pytest.approx(0.25 * 0.8 * 0.81 + 0.25 * 0.6 * 0.25 + 0.5)
    reversed_ = [_det("circle", "red", right), _det("square", "blue", left)]
    assert R.spatial_formula(prompt, reversed_) == 0.0  # 0.25 s1 + 0.25 s2 < 0.5
    assert R.spatial_formula(prompt, [_det("circle", "red", left)]) == 0.0  # 0.25 s
    assert R.spatial_formula(prompt, [_det("circle", "green", left), _det("square", "blue", right)]) == 0.0
    with pytest.raises(ValueError, match="no spatial relation"):
        R.spatial_formula(parse_prompt("a red circle and a blue square"), both)


def test_numeracy_formula_by_hand():
    prompt = parse_prompt("two red circles and one blue star")
    box = (0, 0, 10, 10)
    exact = [_det("circle", "red", box), _det("circle", "red", box), _det("star", "blue", box)]
    assert numeracy_score(prompt, exact) == 1.0
    assert numeracy_score(prompt, exact[1:]) == pytest.approx((0.5 + 1.0) / 2)
    assert numeracy_score(prompt, exact[:2]) == pytest.approx((1.0 + 0.0) / 2)
    assert numeracy_score(prompt, []) == 0.0


def test_detector_counts_and_attributes_on_held_out_renders():
    model, _ = load_scorer("detector")
    metrics = T.evaluate_detector(model, n_images=120, seed=4321)
    assert metrics["count"] >= 0.95 and metrics["found"] >= 0.95 and metrics["color"] >= 0.95
    assert metrics["shape"] >= 0.85 and metrics["texture"] >= 0.85, metrics


def test_spatial_and_numeracy_rewards_on_renders():
    texts, images, prompts = _prompt_batch("spatial", 24, seed=8)
    spatial = R.EmbeddedSpatial()
    right = spatial(images, texts, [{}] * 24)
    flipped = {"left": "right", "right": "left", "above": "below", "below": "above"}
    directional = [i for i, p in enumerate(prompts) if p.relation in flipped]
    wrong_texts = [prompt_text(prompts[i].objects, flipped[prompts[i].relation]) for i in directional]
    wrong = spatial(images[directional], wrong_texts, [{}] * len(directional))
    assert right.mean() >= 0.75 and wrong.mean() <= 0.1
    texts, images, _ = _prompt_batch("numeracy", 24, seed=9)
    assert R.EmbeddedNumeracy()(images, texts, [{}] * 24).mean() >= 0.85


# ----------------------------------------------------------------------------- alignment and dispatch


def test_alignment_prefers_true_captions():
    model, config = load_scorer("aligner")
    metrics = T.evaluate_aligner(model, config["vocab"], n_images=128, seed=99)
    assert metrics["true_beats_perturbed"] >= 0.7 and metrics["top1_of_32"] >= 0.5, metrics
    texts, images, _ = _prompt_batch("color", 4, seed=10)
    scores = R.EmbeddedAlignment()(images, texts, [{}] * 4)
    assert scores.shape == (4,) and (scores.abs() <= 1 + 1e-5).all()


def test_compbench_dispatches_by_category_and_complex_is_the_three_in_one_mean():
    parts = {c: _prompt_batch(c, 2, seed=20 + i) for i, c in enumerate(("color", "spatial", "numeracy", "complex"))}
    texts = [t for c in parts for t in parts[c][0]]
    images = torch.cat([parts[c][1] for c in parts])
    metadata = [{"category": c} for c in parts for _ in range(2)]
    scores = build_reward("embedded_compbench")(images, texts, metadata)
    vqa, spatial, numeracy, align = R.EmbeddedVQA(), R.EmbeddedSpatial(), R.EmbeddedNumeracy(), R.EmbeddedAlignment()
    assert torch.allclose(scores[0:2], vqa(images[0:2], texts[0:2], metadata[0:2]))
    assert torch.allclose(scores[2:4], spatial(images[2:4], texts[2:4], metadata[2:4]))
    assert torch.allclose(scores[4:6], numeracy(images[4:6], texts[4:6], metadata[4:6]))
    for i in (6, 7):
        one = (images[i : i + 1], texts[i : i + 1], metadata[i : i + 1])
        terms = [vqa(*one), align(*one).clamp(0, 1)]
        if parse_prompt(texts[i]).relation is not None:
            terms.append(spatial(*one))
        assert scores[i].item() == pytest.approx(float(sum(terms) / len(terms)), abs=1e-5)
    # without metadata the parsed category is used
    assert torch.allclose(build_reward("embedded_compbench")(images, texts, [{}] * len(texts)), scores)


def test_rewards_accept_any_image_size_and_are_registered():
    texts, images, _ = _prompt_batch("texture", 3, seed=30)
    big = torch.nn.functional.interpolate(images, scale_factor=2, mode="nearest")
    registry = registered_rewards()
    for name in ("embedded_vqa", "embedded_spatial", "embedded_numeracy", "embedded_alignment",
                 "embedded_compbench", "embedded_eval"):
        assert name in registry
    for name in ("embedded_vqa", "embedded_alignment", "embedded_compbench"):
        reward = build_reward(name)
        small_scores, big_scores = reward(images, texts, [{}] * 3), reward(big, texts, [{}] * 3)
        assert small_scores.dtype == torch.float32 and small_scores.shape == (3,)
        assert torch.allclose(small_scores, big_scores, atol=1e-5)


def test_missing_weights_are_reported(tmp_path):
    with pytest.raises(RewardError, match="vqa.safetensors"):
        build_reward("embedded_vqa", {"embedded_vqa": {"directory": str(tmp_path)}})


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_rewards_run_on_cuda():
    texts, images, _ = _prompt_batch("color", 2, seed=40)
    cpu = R.EmbeddedVQA()(images, texts, [{}] * 2)
    cuda = R.EmbeddedVQA(device="cuda")(images.cuda(), texts, [{}] * 2)
    assert cuda.device.type == "cpu" and torch.allclose(cpu, cuda, atol=1e-3)


def test_detector_targets_sit_at_the_box_centre():
    obj = WorldObject("circle", "red", "plain", 20, 30, 30)  # box 20..40: centre 30 px = cell 7.5
    targets = T.detector_targets([Scene((obj,))])
    assert (targets["x"].item(), targets["y"].item()) == (7, 7)
    assert targets["offset"].tolist() == [[0.5, 0.5]] and targets["size"].item() == pytest.approx(20 / 32)
    assert targets["heat"][0, 7, 7] == 1.0 and targets["heat"][0].sum() < 10
