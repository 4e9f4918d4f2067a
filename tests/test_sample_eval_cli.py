"""`loopdiff sample` and `loopdiff eval` on a saved tiny pipeline, checked against direct computations."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from loopdiff.cli import main
from loopdiff.config import ModelConfig
from loopdiff.evaluation import evaluate, paired_change
from loopdiff.prompts import load_prompt_set
from loopdiff.rewards.jpeg import jpeg_size_kb
from loopdiff.sampling.policy import DiffusionPolicy, PolicyConfig
from loopdiff.sampling.trajectories import PromptEncoder
from loopdiff.models import load_pipeline


def test_sample_writes_a_grid_of_the_right_size(tiny_pipeline_dir, tmp_path) -> None:
    out = tmp_path / "grid.png"
    code = main(["sample", "--model", str(tiny_pipeline_dir), "--prompt", "a red circle", "--prompt",
                 "a blue square", "--num", "3", "--steps", "3", "--out", str(out)])
    assert code == 0
    grid = Image.open(out)
    assert grid.size == (220 + 3 * 132, 2 * 132)  # label column + 3 cells of 128 px (+4 px gaps), 2 rows


def test_eval_matches_the_protocol_by_hand(tiny_pipeline_dir, tmp_path) -> None:
    prompts = tmp_path / "val.txt"
    prompts.write_text("a red circle\na blue square\na green star\n")
    out = tmp_path / "scores.json"
    code = main(["eval", "--model", str(tiny_pipeline_dir), "--prompts", str(prompts), "--reward",
                 "jpeg_incompressibility", "--images-per-prompt", "4", "--steps", "3", "--seed", "7",
                 "--out", str(out)])
    assert code == 0
    record = json.loads(out.read_text())
    per_prompt = np.array(record["per_prompt"]["jpeg_incompressibility"])
    assert per_prompt.shape == (3,)
    assert record["means"]["jpeg_incompressibility"] == pytest_approx(per_prompt.mean())

    # Independently: the same seed gives the same images; score them one prompt at a time.
    pipe = load_pipeline(ModelConfig(pretrained=str(tiny_pipeline_dir)))
    policy = DiffusionPolicy(pipe.unet, pipe.scheduler, PolicyConfig(num_steps=3))
    encoder = PromptEncoder(pipe.tokenizer, pipe.text_encoder, "cpu")
    seen = []

    def recording_reward(images, prompt_list, metadata):
        seen.append((images.clone(), list(prompt_list)))
        return jpeg_size_kb(images)

    evaluate(policy, encoder, pipe.vae, load_prompt_set(str(prompts)), {"r": recording_reward},
             images_per_prompt=4, seed=7, progress=False)
    images = torch.cat([s[0] for s in seen])
    names = sum((s[1] for s in seen), [])
    assert names == ["a red circle"] * 4 + ["a blue square"] * 4 + ["a green star"] * 4
    by_hand = [jpeg_size_kb(images[4 * p : 4 * p + 4]).mean().item() for p in range(3)]
    np.testing.assert_allclose(per_prompt, by_hand, rtol=1e-6)


def pytest_approx(value: float):
    import pytest

    return pytest.approx(value, rel=1e-6)


def test_paired_change_is_the_mean_difference_and_its_standard_error() -> None:
    before = np.array([0.2, 0.5, 0.1, 0.0])
    after = np.array([0.4, 0.5, 0.4, 0.1])
    diffs = [0.2, 0.0, 0.3, 0.1]
    mean = sum(diffs) / 4
    se = (sum((d - mean) ** 2 for d in diffs) / 3) ** 0.5 / 2
    assert paired_change(before, after) == pytest.approx((mean, se))
    assert np.isnan(paired_change(np.array([0.3]), np.array([0.5]))[1])
    with pytest.raises(ValueError, match=r"\(3,\) and \(2,\)"):
        paired_change(np.zeros(3), np.zeros(2))


def test_train_summary_prints_base_final_and_the_paired_change(tmp_path, capsys) -> None:
    from loopdiff.cli import _print_eval_summary

    (tmp_path / "eval").mkdir()
    for tag, values in (("base", [0.2, 0.5, 0.1, 0.0]), ("final", [0.4, 0.5, 0.4, 0.1])):
        record = {"means": {"embedded_eval": float(np.mean(values))}, "per_prompt": {"embedded_eval": values}}
        (tmp_path / "eval" / f"{tag}.json").write_text(json.dumps(record))
    _print_eval_summary(tmp_path)
    row = [line for line in capsys.readouterr().out.splitlines() if line.strip().startswith("embedded_eval")]
    assert row[0].split() == ["embedded_eval", "0.2000", "0.3500", "+0.1500", "+-", "0.0645"]


def test_branch_prints_the_library_measurement(tiny_pipeline_dir, tmp_path, capsys) -> None:
    from loopdiff.prompts import PromptSet
    from loopdiff.rewards.base import build_reward
    from loopdiff.diagnostics.branching import reward_variance_by_step

    prompts = tmp_path / "train.txt"
    prompts.write_text("a red circle\na blue square\n")
    code = main(["branch", "--model", str(tiny_pipeline_dir), "--prompts", str(prompts), "--reward",
                 "jpeg_incompressibility", "--branches", "3", "--steps", "3", "--at", "0,1,3", "--seed", "2"])
    assert code == 0
    rows = [line.split() for line in capsys.readouterr().out.splitlines()[2:]]
    printed = {int(r[0]): float(r[1]) for r in rows}

    pipe = load_pipeline(ModelConfig(pretrained=str(tiny_pipeline_dir)))
    policy = DiffusionPolicy(pipe.unet, pipe.scheduler, PolicyConfig(num_steps=3))
    encoder = PromptEncoder(pipe.tokenizer, pipe.text_encoder, "cpu")
    direct = reward_variance_by_step(policy, encoder, pipe.vae, PromptSet(("a red circle", "a blue square"), ({}, {})),
                                     build_reward("jpeg_incompressibility"), [0, 1, 3], branches=3, seed=2)
    assert sorted(printed) == [0, 1, 3]
    np.testing.assert_allclose([printed[s] for s in (0, 1, 3)], direct.variance, rtol=1e-3, atol=1e-5)
    assert printed[0] > 0 and printed[3] == 0


@pytest.mark.parametrize(
    ("flags", "message"),
    [(["--branches", "1"], "--branches 1"), (["--at", "0,25"], "--at [25]"), (["--every", "0"], "--every 0")],
)
def test_branch_rejects_bad_flags_before_loading(flags, message, capsys) -> None:
    code = main(["branch", "--model", "/nonexistent/pipeline", "--prompts", "p.txt", "--reward", "r", *flags])
    assert code == 2 and message in capsys.readouterr().err


def test_eval_batch_size_fixes_the_noise_like_training(tiny_pipeline_dir, tmp_path) -> None:
    prompts = tmp_path / "val.txt"
    prompts.write_text("a red circle\na blue square\na green star\n")
    pipe = load_pipeline(ModelConfig(pretrained=str(tiny_pipeline_dir)))
    policy = DiffusionPolicy(pipe.unet, pipe.scheduler, PolicyConfig(num_steps=3))
    encoder = PromptEncoder(pipe.tokenizer, pipe.text_encoder, "cpu")
    results = {}
    for batch in (4, 32):
        out = tmp_path / f"b{batch}.json"
        assert main(["eval", "--model", str(tiny_pipeline_dir), "--prompts", str(prompts), "--reward",
                     "jpeg_incompressibility", "--images-per-prompt", "4", "--steps", "3", "--seed", "7",
                     "--batch-size", str(batch), "--out", str(out)]) == 0
        results[batch] = np.array(json.loads(out.read_text())["per_prompt"]["jpeg_incompressibility"])
        direct = evaluate(policy, encoder, pipe.vae, load_prompt_set(str(prompts)),
                          {"r": lambda images, p, m: jpeg_size_kb(images)}, images_per_prompt=4, seed=7,
                          batch_size=batch, progress=False)
        np.testing.assert_allclose(results[batch], direct.per_prompt["r"], rtol=1e-6)
    assert not np.allclose(results[4], results[32])  # one prompt per call draws other noise than all three


def _gradient_noise_both_ways(pipeline_dir, prompt_file, listed, order, groups, steps, seed, capsys):
    """``loopdiff gradient-noise`` output lines, and the library's measurement on the prompts it should pick."""
    from loopdiff.rewards.base import build_reward
    from loopdiff.prompts import PromptSet
    from loopdiff.diagnostics.gradient_noise import measure_gradient_noise

    prompt_file.write_text("".join(p + "\n" for p in listed))
    code = main(["gradient-noise", "--model", str(pipeline_dir), "--prompts", str(prompt_file), "--groups",
                 str(groups), "--samples-per-prompt", "2", "--reward", "jpeg_incompressibility", "--steps",
                 str(steps), "--seed", str(seed)])
    assert code == 0
    lines = capsys.readouterr().out.splitlines()
    pipe = load_pipeline(ModelConfig(pretrained=str(pipeline_dir)))
    pipe.unet.requires_grad_(True)
    policy = DiffusionPolicy(pipe.unet, pipe.scheduler, PolicyConfig(num_steps=steps))
    encoder = PromptEncoder(pipe.tokenizer, pipe.text_encoder, "cpu")
    chosen = PromptSet(tuple(listed[i] for i in order), ({},) * len(order))
    direct = measure_gradient_noise(policy, encoder, pipe.vae, chosen, build_reward("jpeg_incompressibility"),
                                    samples_per_prompt=2, seed=seed)
    return lines, direct


def test_gradient_noise_prints_the_library_measurement(tiny_pipeline_dir, tmp_path, capsys) -> None:
    listed = ["a red circle", "a blue square", "a green star"]
    order = torch.randperm(3, generator=torch.Generator().manual_seed(5)).tolist()
    lines, direct = _gradient_noise_both_ways(tiny_pipeline_dir, tmp_path / "train.txt", listed, order, 3, 3, 5,
                                              capsys)
    printed = {line.rsplit(None, 1)[0].strip(): line.split()[-1] for line in lines[1:]}
    assert float(printed["|mean g|^2"]) == pytest.approx(direct.mean_sq, rel=1e-3)
    assert float(printed["noise tr(Cov g)/G"]) == pytest.approx(direct.noise, rel=1e-3)
    row = next(line.split() for line in lines if line.strip().startswith("resnets"))
    assert float(row[1]) == pytest.approx(direct.by_module["resnets"].mean_sq, rel=1e-3)
    assert float(row[2]) == pytest.approx(direct.by_module["resnets"].noise, rel=1e-3)


def test_gradient_noise_repeats_prompts_when_there_are_fewer_than_groups(tiny_pipeline_dir, tmp_path, capsys) -> None:
    lines, direct = _gradient_noise_both_ways(tiny_pipeline_dir, tmp_path / "one.txt", ["a red circle"], [0, 0, 0],
                                              3, 2, 1, capsys)
    assert lines[0].startswith("3 groups of 2")
    assert float(lines[1].split()[-1]) == pytest.approx(direct.mean_sq, rel=1e-3)


def test_gradient_noise_rejects_one_group(capsys) -> None:
    assert main(["gradient-noise", "--model", "/nonexistent", "--prompts", "p.txt", "--reward", "r", "--groups", "1"]) == 2
    assert "--groups 1" in capsys.readouterr().err


def test_eval_at_another_resolution_scores_diffusers_own_samples(tiny_pipeline_dir, tmp_path) -> None:
    """`loopdiff eval --resolution 48` (native: 32 px) with eta 0 scores the images StableDiffusionPipeline makes
    at height = width = 48 from the same x_T (DDIM, eta 0, the same guidance); a size the UNet cannot take is
    refused with the multiple it needs."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    from trainer_helpers import red_minus_blue

    prompts = tmp_path / "val.txt"
    prompts.write_text("a red circle\n")
    out = tmp_path / "scores.json"
    common = ["eval", "--model", str(tiny_pipeline_dir), "--prompts", str(prompts), "--reward",
              "trainer_helpers:red_minus_blue", "--images-per-prompt", "2", "--steps", "3", "--eta", "0", "--seed", "7"]
    assert main([*common, "--resolution", "48", "--out", str(out)]) == 0
    score = json.loads(out.read_text())["per_prompt"]["trainer_helpers:red_minus_blue"]
    pipe = StableDiffusionPipeline.from_pretrained(tiny_pipeline_dir, safety_checker=None,
                                                   requires_safety_checker=False)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    x_T = torch.randn(2, 4, 12, 12, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        images = pipe(["a red circle"] * 2, latents=x_T, num_inference_steps=3, guidance_scale=5.0, eta=0.0,
                      height=48, width=48, output_type="pt").images
    assert images.shape == (2, 3, 48, 48)
    np.testing.assert_allclose(score, [float(red_minus_blue(images, [], []).mean())], rtol=1e-4, atol=1e-4)
    assert main([*common, "--resolution", "44"]) == 2  # the VAE's 4x times the UNet's 2 levels: multiples of 8
