"""Rewards from the user's code: ``reward.name=package.module:function`` and ``loopdiff.train(..., reward_fn=...)``."""

from __future__ import annotations

import json
import sys
import textwrap
from pathlib import Path
from typing import Iterator

import pytest
import torch

from loopdiff.cli import main
from loopdiff.rewards.base import RewardError, WeightedSum, build_reward, parse_reward_spec
from loopdiff.rewards.jpeg import jpeg_size_kb

MODULE = "user_rewards_for_tests"
SOURCE = '''
import torch

THRESHOLD = 3


def redness(images, prompts, metadata):
    return images[:, 0].mean(dim=(1, 2))


def scaled(scale=1.0):
    return lambda images, prompts, metadata: scale * images[:, 0].mean(dim=(1, 2))


class Offset:
    def __init__(self, offset=10.0):
        self.offset = offset

    def __call__(self, images, prompts, metadata):
        return self.offset + images[:, 0].mean(dim=(1, 2))


def two_per_image(images, prompts, metadata):
    return torch.zeros(len(prompts), 2)


def one_short(images, prompts, metadata):
    return [0.0] * (len(prompts) - 1)
'''


@pytest.fixture()
def user_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """A reward module on sys.path, importable as MODULE (and forgotten afterwards)."""
    (tmp_path / f"{MODULE}.py").write_text(textwrap.dedent(SOURCE))
    (tmp_path / "broken_rewards_for_tests.py").write_text("raise RuntimeError('no GPU here')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    yield MODULE
    for name in (MODULE, "broken_rewards_for_tests"):
        sys.modules.pop(name, None)


@pytest.fixture()
def images() -> torch.Tensor:
    return torch.rand(4, 3, 8, 8, generator=torch.Generator().manual_seed(0))


def test_module_function_names_parse_unambiguously() -> None:
    assert parse_reward_spec("mymod:fn") == [("mymod:fn", 1.0)]
    assert parse_reward_spec("pkg.mod:Scorer.score:0.5, jpeg_compressibility:2") == [
        ("pkg.mod:Scorer.score", 0.5), ("jpeg_compressibility", 2.0)]
    assert parse_reward_spec("mymod:fn:1e-3,a") == [("mymod:fn", 1e-3), ("a", 1.0)]
    assert parse_reward_spec("jpeg_compressibility:-1") == [("jpeg_compressibility", -1.0)]


def test_a_function_a_factory_and_a_class_build_from_their_names(user_module: str, images: torch.Tensor) -> None:
    red = images[:, 0].mean(dim=(1, 2))
    torch.testing.assert_close(build_reward(f"{user_module}:redness")(images, ["p"] * 4, [{}] * 4), red)
    options = {f"{user_module}:scaled": {"scale": 3.0}}  # an options entry makes the attribute a factory
    torch.testing.assert_close(build_reward(f"{user_module}:scaled", options)(images, ["p"] * 4, [{}] * 4), 3 * red)
    torch.testing.assert_close(build_reward(f"{user_module}:Offset")(images, ["p"] * 4, [{}] * 4), 10 + red)


def test_user_rewards_take_part_in_weighted_sums(user_module: str, images: torch.Tensor) -> None:
    reward = build_reward(f"{user_module}:redness:2.0,jpeg_compressibility:0.1")
    assert isinstance(reward, WeightedSum)
    expected = 2 * images[:, 0].mean(dim=(1, 2)) - 0.1 * jpeg_size_kb(images)
    torch.testing.assert_close(reward(images, ["p"] * 4, [{}] * 4), expected)


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("no_such_module_anywhere:fn", "reward 'no_such_module_anywhere:fn': cannot import module 'no_such_module_anywhere'"),
        ("broken_rewards_for_tests:fn", "cannot import module 'broken_rewards_for_tests': RuntimeError: no GPU here"),
        (f"{MODULE}:missing", f"module '{MODULE}' has no attribute 'missing'"),
        (f"{MODULE}:THRESHOLD", f"reward '{MODULE}:THRESHOLD' is a int, not a callable"),
        ("jpeg_compressibility:x", "weight 'x' of 'jpeg_compressibility' is not a number"),
    ],
)
def test_bad_user_rewards_fail_with_one_line(user_module: str, name: str, message: str) -> None:
    with pytest.raises(RewardError) as info:
        build_reward(name)
    assert message in str(info.value) and "\n" not in str(info.value)


def test_wrong_shape_is_a_reward_error(user_module: str, images: torch.Tensor) -> None:
    reward = build_reward(f"{user_module}:two_per_image")
    with pytest.raises(RewardError, match=rf"'{MODULE}:two_per_image' returned 8 scores for 4 images \(shape \(4, 2\)\)"):
        reward(images, ["p"] * 4, [{}] * 4)
    with pytest.raises(RewardError, match=rf"'{MODULE}:one_short' returned 3 scores for 4 images \(shape \(3,\)\)"):
        build_reward(f"{MODULE}:one_short")(images, ["p"] * 4, [{}] * 4)


def run_overrides(tmp_path: Path, pipeline_dir: Path, reward: str) -> list[str]:
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\na blue square\n")
    return [f"model.pretrained={pipeline_dir}", "model.device=cpu", f"prompts.train={prompts}",
            f"prompts.val={prompts}", "eval.images_per_prompt=2", f"reward.name={reward}", "sampling.num_steps=2",
            "training.train_denoising_steps=2",
            "training.epochs=1", "training.samples_per_epoch=8", f"output.dir={tmp_path / 'run'}",
            "output.progress=false", "output.tensorboard=false"]


def test_cli_trains_on_a_module_function(user_module: str, tmp_path: Path, tiny_pipeline_dir: Path) -> None:
    assert main(["train", *run_overrides(tmp_path, tiny_pipeline_dir, f"{user_module}:redness")]) == 0
    final = json.loads((tmp_path / "run" / "eval" / "final.json").read_text())
    assert list(final["means"]) == [f"{user_module}:redness"]
    assert 0 <= json.loads((tmp_path / "run" / "metrics.jsonl").read_text())["reward/mean"] <= 1


def test_cli_reports_a_wrong_shape_in_one_line(user_module: str, tmp_path: Path, tiny_pipeline_dir: Path,
                                               capsys) -> None:
    code = main(["train", *run_overrides(tmp_path, tiny_pipeline_dir, f"{user_module}:two_per_image")])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    assert err.strip().splitlines()[-1].startswith(f"loopdiff train: error: reward '{user_module}:two_per_image' "
                                                  "returned 8 scores for 4 images (shape (4, 2))")


def test_python_api_trains_on_a_reward_fn_and_returns_the_history(tmp_path: Path, tiny_pipeline_dir: Path) -> None:
    import loopdiff
    from loopdiff import RunConfig, Trainer, train

    assert isinstance(loopdiff.run_config(["training.epochs=1"]), RunConfig) and Trainer is loopdiff.Trainer
    calls: list[int] = []

    def blueness(images, prompts, metadata):
        calls.append(len(prompts))
        return images[:, 2].mean(dim=(1, 2))

    overrides = [o for o in run_overrides(tmp_path, tiny_pipeline_dir, "unused") if not o.startswith("reward.")]
    history = train(overrides, reward_fn=blueness)
    assert [h["epoch"] for h in history] == [1] and sum(calls) >= 8
    assert list(json.loads((tmp_path / "run" / "eval" / "final.json").read_text())["means"]) == ["blueness"]
    assert (tmp_path / "run" / "final_pipeline" / "README.md").is_file()


def test_the_guides_reward_module_runs_from_the_cli_with_options(tmp_path: Path, tiny_pipeline_dir: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    guide = (Path(__file__).resolve().parents[1] / "docs" / "custom-rewards.md").read_text()
    code = guide.split("## A reward in ten lines")[1].split("```python\n")[1].split("```")[0]
    assert len(code.strip().splitlines()) <= 12
    (tmp_path / "my_rewards.py").write_text(code)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "my_rewards", raising=False)
    spec = "my_rewards:saturation:1.0,my_rewards:redness:0.5"
    options = 'reward.options={"my_rewards:redness": {"weight": 2.0}}'
    assert main(["train", *run_overrides(tmp_path, tiny_pipeline_dir, spec), options]) == 0
    means = json.loads((tmp_path / "run" / "eval" / "final.json").read_text())["means"]
    assert list(means) == [spec]
    sys.modules.pop("my_rewards", None)


def test_python_api_counts_a_passed_pipeline_as_its_own_model(tmp_path: Path, tiny_pipeline_dir: Path) -> None:
    import yaml
    from diffusers import StableDiffusionPipeline

    from loopdiff import Trainer, run_config, train
    from loopdiff.config import ConfigError

    def blueness(images, prompts, metadata):
        return images[:, 2].mean(dim=(1, 2))

    pipe = StableDiffusionPipeline.from_pretrained(tiny_pipeline_dir)
    overrides = [o for o in run_overrides(tmp_path, tiny_pipeline_dir, "unused")
                 if not o.startswith(("reward.", "model.pretrained", "prompts."))]
    with pytest.raises(ConfigError, match=f"prompts.train is required .*model.pretrained='{tiny_pipeline_dir}'"):
        train(overrides, reward_fn=blueness, pipeline=pipe)  # not the embedded prompts and evaluators
    with pytest.raises(ConfigError, match=f"loaded from '{tiny_pipeline_dir}': set model.pretrained="):
        Trainer(run_config(overrides), reward_fn=blueness, pipeline=pipe)  # the embedded defaults, refused

    prompts = tmp_path / "own.txt"
    prompts.write_text("a red circle\na blue square\n")
    train([*overrides, f"prompts.train={prompts}", f"prompts.val={prompts}"], reward_fn=blueness, pipeline=pipe)
    run = tmp_path / "run"
    assert json.loads((run / "config.json").read_text())["model"]["pretrained"] == str(tiny_pipeline_dir)
    final = json.loads((run / "eval" / "final.json").read_text())
    assert final["prompts"] == ["a red circle", "a blue square"] and list(final["means"]) == ["blueness"]
    card = (run / "final_pipeline" / "README.md").read_text()
    assert yaml.safe_load(card.split("---")[1])["base_model"] == str(tiny_pipeline_dir)
    assert "embedded" not in card
    assert f"<code>{tiny_pipeline_dir}</code>" in (run / "report.html").read_text()  # the run's report names it
