"""Bad inputs to ``loopdiff train``: one line naming the input, exit code 2, before any model loads. A new config
field or check gets its rows by adding lines to CASES."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

import pytest
import torch

from loopdiff.cli import main



def _our_lines(err: str) -> list[str]:
    """stderr without the warnings a library prints once on import."""
    return [line for line in err.strip().splitlines() if not line.startswith("[transformers]")]


def _config(text: str, suffix: str) -> Callable[[Path], list[str]]:
    def make(tmp: Path) -> list[str]:
        path = tmp / f"run{suffix}"
        path.write_text(text)
        return ["--config", str(path)]
    return make


def _prompt_file(name: str, data: bytes) -> Callable[[Path], list[str]]:
    def make(tmp: Path) -> list[str]:
        (tmp / name).write_bytes(data)
        return [f"prompts.train={tmp / name}"]
    return make


def _output_is_a_file(tmp: Path) -> list[str]:
    (tmp / "taken").write_text("not a folder")
    return [f"output.dir={tmp / 'taken'}"]


def _pipeline_without_unet(tmp: Path) -> list[str]:
    folder = tmp / "pipe"
    folder.mkdir()
    index = {"_class_name": "StableDiffusionPipeline", "unet": ["diffusers", "UNet2DConditionModel"],
             "vae": ["diffusers", "AutoencoderKL"], "safety_checker": [None, None]}
    (folder / "model_index.json").write_text(json.dumps(index))
    (folder / "vae").mkdir()
    (tmp / "prompts.txt").write_text("a red circle\n")  # a model other than the embedded one needs its own
    return [f"model.pretrained={folder}", f"prompts.train={tmp / 'prompts.txt'}", "reward.name=jpeg_compressibility"]


def _fixed(*overrides: str) -> Callable[[Path], list[str]]:
    return lambda tmp: list(overrides)


CASES = {
    "yaml syntax": (_config("training:\n  epochs: [1, 2\n", ".yaml"), ["run.yaml", "not valid YAML", "line"]),
    "toml syntax": (_config("[training]\nepochs = = 3\n", ".toml"), ["run.toml", "not valid TOML"]),
    "config not utf-8": (_config("", ".yaml"), []),  # replaced below by bytes
    "prompt file not utf-8": (_prompt_file("latin1_train.txt", "a r\xe9d circle\n".encode("latin-1")),
                              ["latin1_train.txt", "not UTF-8"]),
    "misspelled reward option": (_fixed("reward.name=jpeg_compressibility",
                                        'reward.options={"jpeg_compressibility": {"qualty": 80}}'),
                                 ["jpeg_compressibility", "'qualty'", "quality"]),
    "bad JSON in reward.options": (_fixed('reward.options={"embedded_vqa": {"device": "cpu"'),
                                   ["reward.options", "not valid YAML/JSON"]),
    "reward.options not a mapping per reward": (_fixed('reward.options={"embedded_vqa": 3}'),
                                                ["reward.options.embedded_vqa=3", "mapping"]),
    "remote url not a url": (_fixed("reward.name=remote", 'reward.options={"remote": {"url": "not-a-url"}}'),
                             ["remote", "'not-a-url'", "http://host:port"]),
    "output dir is a file": (_output_is_a_file, ["output.dir=", "taken", "is a file"]),
    "pipeline folder without unet": (_pipeline_without_unet, ["model.pretrained=", "'unet/'"]),
    "non-world prompts for the embedded reward": (
        lambda tmp: [*_prompt_file("my_train.txt", b"a photo of a bench\n")(tmp), "reward.name=embedded_compbench"],
        ["reward.name", "embedded_compbench", "my_train.txt", "bench"]
    ),
    "embedded evaluator on non-world validation prompts": (
        lambda tmp: [*_prompt_file("color_val.txt", b"a green bench\n")(tmp), "reward.name=jpeg_compressibility",
                     f"prompts.val={tmp / 'color_val.txt'}", f"prompts.train={tmp / 'color_val.txt'}"],
        ["eval.rewards", "embedded_eval", "color_val.txt"],
    ),
    "samples_per_epoch not a multiple of K": (_fixed("training.samples_per_epoch=6"),
                                              ["training.samples_per_epoch=6", "multiple"]),
    "device that is no device": (_fixed("model.device=banana"), ["model.device='banana'", "cuda:N"]),
    "CUDA device this machine lacks": (_fixed("model.device=cuda:7"), ["model.device='cuda:7'", "CUDA device"]),
    "empty output folder": (_fixed("output.dir="), ["output.dir=''", "not empty"]),
    "negative eval.max_prompts": (_fixed("eval.max_prompts=-1"), ["eval.max_prompts=-1", ">= 0"]),
    "options for a reward the run does not use": (
        _fixed("reward.name=jpeg_compressibility", 'reward.options={"jpeg_compresibility": {"quality": 80}}'),
        ["'jpeg_compresibility'", "no reward of this run uses", "jpeg_compressibility"]),
    "infinite learning rate": (_fixed("training.learning_rate=inf"), ["training.learning_rate=inf", "finite"]),
    "negative LoRA alpha": (_fixed("model.lora=true", "model.lora_alpha=-1"), ["model.lora_alpha=-1", "> 0"]),
    "more trained steps than sampling steps": (_fixed("sampling.num_steps=4", "training.train_denoising_steps=10"),
                                               ["training.train_denoising_steps=10", "sampling.num_steps=4"]),
    "duplicate YAML key": (_config("training:\n  epochs: 3\n  epochs: 4\n", ".yaml"),
                           ["run.yaml", "'epochs' appears twice", "line 3"]),
    "config that is a directory": (lambda tmp: ["--config", str(tmp)], ["is a directory"]),
    "config that does not exist": (lambda tmp: ["--config", str(tmp / "none.yaml")], ["none.yaml", "does not exist"]),
    "config that is a list": (_config("- 1\n- 2\n", ".yaml"), ["run.yaml", "mapping of sections"]),
    "config with a section that is a number": (_config("training: 3\n", ".yaml"), ["'training' is a section"]),
    "config of another format": (_config("{}", ".json"), ["run.json", "'.json'", ".toml"]),
    "override without a value": (_fixed("training.epochs"), ["'training.epochs'", "section.field=value"]),
    "unknown section": (_fixed("nosuch.field=1"), ["unknown config field 'nosuch'"]),
    "unknown field": (_fixed("training.nosuch=1"), ["unknown config field 'training.nosuch'", "epochs"]),
    "negative epochs": (_fixed("training.epochs=-1"), ["training.epochs=-1", ">= 0"]),
    "fractional epochs": (_fixed("training.epochs=1.5"), ["training.epochs=1.5", "not a valid int"]),
    "learning rate that is text": (_fixed("training.learning_rate=1e-5x"), ["'1e-5x'", "not a valid float"]),
    "NaN learning rate": (_fixed("training.learning_rate=nan"), ["training.learning_rate=nan", "finite"]),
    "infinite weight decay": (_fixed("training.weight_decay=inf"), ["training.weight_decay=inf", ">= 0"]),
    "AdamW beta1 of 1": (_fixed("training.adam_beta1=1"), ["training.adam_beta1=1.0", "[0, 1)"]),
    "negative AdamW beta2": (_fixed("training.adam_beta2=-0.1"), ["training.adam_beta2=-0.1", "[0, 1)"]),
    "AdamW epsilon 0": (_fixed("training.adam_eps=0"), ["training.adam_eps=0.0", "> 0"]),
    "timestep fraction 0": (_fixed("training.timestep_fraction=0"), ["training.timestep_fraction=0.0", "(0, 1]"]),
    "no trained steps": (_fixed("training.train_denoising_steps=0"), ["training.train_denoising_steps=0", ">= 1"]),
    "negative warm-up": (_fixed("training.warmup_epochs=-2"), ["training.warmup_epochs=-2", ">= 0"]),
    "negative seed": (_fixed("training.seed=-1"), ["training.seed=-1", "[0, 2**63)"]),
    "EMA decay 1": (_fixed("training.ema_decay=1"), ["training.ema_decay=1.0", "[0, 1)"]),
    "non-finite fraction above 1": (_fixed("training.max_nonfinite_fraction=2"), ["max_nonfinite_fraction=2.0"]),
    "no sampling steps": (_fixed("sampling.num_steps=0"), ["sampling.num_steps=0", ">= 1"]),
    "eta 0 in training": (_fixed("sampling.eta=0"), ["sampling.eta=0.0", "no log-probability"]),
    "guidance below 1": (_fixed("sampling.guidance_scale=0.5"), ["sampling.guidance_scale=0.5", ">= 1"]),
    "resolution that would not fit in memory": (_fixed("sampling.resolution=100000"),
                                                ["sampling.resolution=100000", "[1, 8192]"]),
    "T5 length out of range": (_fixed("sampling.max_sequence_length=1000"), ["max_sequence_length=1000", "[1, 512]"]),
    "unknown SDE form": (_fixed("sampling.sde_type=ode"), ["sampling.sde_type='ode'", "sde, cps"]),
    "LoRA rank 0": (_fixed("model.lora_rank=0"), ["model.lora_rank=0", ">= 1"]),
    "bool that is no bool": (_fixed("model.lora=maybe"), ["model.lora='maybe'", "not a valid bool"]),
    "unknown mixed precision": (_fixed("model.mixed_precision=fp8"), ["'fp8'", "no, fp16, bf16"]),
    "LoRA on the cross-attention only": (_fixed("model.lora=true", "model.train_modules=cross_attention"),
                                         ["model.train_modules='cross_attention'", "'all' with model.lora=true"]),
    "empty revision": (_fixed("model.revision="), ["model.revision=''", "not empty"]),
    "empty device": (_fixed("model.device="), ["model.device=''"]),
    "unknown estimator preset": (_fixed("estimator.preset=dpo"), ["estimator.preset='dpo'", "loop"]),
    "no samples per prompt": (_fixed("estimator.samples_per_prompt=0"), ["estimator.samples_per_prompt=0", ">= 1"]),
    "clip range 0": (_fixed("estimator.clip_range=0"), ["estimator.clip_range=0.0", "> 0"]),
    "negative KL weight": (_fixed("estimator.kl_coef=-1"), ["estimator.kl_coef=-1.0", ">= 0"]),
    "negative advantage clip": (_fixed("estimator.advantage_clip=-1"), ["estimator.advantage_clip=-1.0", "> 0"]),
    "more minibatches than pairs": (_fixed("estimator.minibatches=100000"), ["estimator.minibatches=100000", "pairs"]),
    "no tracked rewards": (_fixed("estimator.tracker_buffer_size=0"), ["estimator.tracker_buffer_size=0", ">= 1"]),
    "no images per prompt in evaluation": (_fixed("eval.images_per_prompt=0"), ["eval.images_per_prompt=0", ">= 1"]),
    "negative evaluation interval": (_fixed("eval.every=-1"), ["eval.every=-1", ">= 0"]),
    "negative evaluation seed": (_fixed("eval.seed=-5"), ["eval.seed=-5"]),
    "negative grid prompts": (_fixed("eval.grid_prompts=-1"), ["eval.grid_prompts=-1", ">= 0"]),
    "unknown evaluation reward": (_fixed("eval.rewards=nosuch"), ["eval.rewards", "unknown reward 'nosuch'"]),
    "unknown monitored reward": (_fixed("reward.monitor=nosuch"), ["unknown reward 'nosuch'"]),
    "unknown reward": (_fixed("reward.name=nosuch"), ["unknown reward 'nosuch'"]),
    "reward weight that is text": (_fixed("reward.name=jpeg_compressibility:abc"), ["weight 'abc'", "not a number"]),
    "reward module that does not exist": (_fixed("reward.name=nosuch_module:fn"), ["cannot import module 'nosuch_module'"]),
    "reward.options a list": (_fixed("reward.options=[1]"), ["reward.options=[1]", "not a valid dict"]),
    "no checkpoint interval": (_fixed("output.checkpoint_every=0"), ["output.checkpoint_every=0", ">= 1"]),
    "keep_best naming no metric": (_fixed("output.keep_best="), ["output.keep_best", "names no metric"]),
    "keep_best weight that is text": (_fixed("output.keep_best=reward/mean:x"), ["weight 'x'", "not a number"]),
    "keep_best window 0": (_fixed("output.keep_best_window=0"), ["output.keep_best_window=0", ">= 1"]),
    "empty W&B project": (_fixed("output.wandb=true", "output.wandb_project="), ["output.wandb_project=''"]),
    "no training prompts": (_fixed("prompts.max_train=0"), ["prompts.max_train=0", ">= 1"]),
    "unknown embedded category": (_fixed("prompts.train=embedded:nosuch"), ["'embedded:nosuch'", "color"]),
    "prompt file that does not exist": (lambda tmp: [f"prompts.train={tmp / 'none.txt'}"], ["none.txt", "does not exist"]),
    "prompt file without prompts": (_prompt_file("blank.txt", b"\n\n"), ["blank.txt", "holds no prompts"]),
    "validation prompt file that does not exist": (lambda tmp: [f"prompts.val={tmp / 'none.txt'}"], ["none.txt"]),
    "output folder under /proc": (_fixed("output.dir=/proc/loopdiff/run"), ["output.dir='/proc/loopdiff/run'",
                                                                          "cannot be written"]),
    "empty model name": (_fixed("model.pretrained="), ["model.pretrained=''", "model_index.json"]),
    "prompt file that is a directory": (lambda tmp: [f"prompts.train={tmp}"], ["is a directory"]),
}


def _config_not_utf8(tmp: Path) -> list[str]:
    (tmp / "run.yaml").write_bytes(b"training:\n  epochs: 3 # \xff\n")
    return ["--config", str(tmp / "run.yaml")]


CASES["config not utf-8"] = (_config_not_utf8, ["run.yaml", "not UTF-8"])


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_one_line_and_exit_code_2(case, tmp_path, capsys, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    make, expected = CASES[case]
    argv = make(tmp_path)
    loads = []
    monkeypatch.setattr("loopdiff.models.StableDiffusionPipeline.from_pretrained",
                        lambda *args, **kwargs: loads.append(args) or 1 / 0)
    code = main(["train", *argv, f"output.dir={tmp_path / 'run'}"] if not any("output.dir" in a for a in argv)
                else ["train", *argv])
    lines = _our_lines(capsys.readouterr().err)
    assert code == 2, lines
    assert len(lines) == 1 and lines[0].startswith("loopdiff train: error: "), lines
    err = lines[0]
    for text in expected:
        assert text in err, (text, err)
    assert not loads, "the model must not load before the input is checked"


@pytest.mark.skipif(not Path("/sys").is_dir(), reason="needs a folder nobody may create folders in")
def test_output_dir_that_cannot_be_written_fails_before_the_model_loads(tmp_path, capsys, monkeypatch) -> None:
    target = Path("/sys/loopdiff-cannot-write/run")
    try:
        target.mkdir(parents=True)
    except OSError:
        pass
    else:  # pragma: no cover - a system where /sys is writable
        target.rmdir()
        pytest.skip("/sys is writable here")
    monkeypatch.setattr("loopdiff.models.StableDiffusionPipeline.from_pretrained", lambda *a, **k: 1 / 0)
    code = main(["train", f"output.dir={target}"])
    lines = _our_lines(capsys.readouterr().err)
    assert code == 2 and len(lines) == 1, lines
    assert f"output.dir='{target}' cannot be written" in lines[0]


def test_file_categories_are_hints_the_embedded_evaluator_checks() -> None:
    """A file stem that names no world category ('my') or one the prompt cannot have is ignored."""
    from loopdiff.embedded.evaluator import HeldOutEvaluator
    from loopdiff.embedded.prompts import generate_prompt, scene_for_prompt
    from loopdiff.embedded.world import render
    import numpy as np

    rng = np.random.default_rng(0)
    prompts = [generate_prompt(rng, c) for c in ("color", "spatial", "numeracy", "shape")]
    images = torch.from_numpy(np.stack([render(scene_for_prompt(p, rng)) for p in prompts])).permute(0, 3, 1, 2)
    images = images.float() / 255
    texts = [p.text for p in prompts]
    evaluator = HeldOutEvaluator()
    own = evaluator(images, texts, [{}] * 4)
    assert own.tolist() == [1.0] * 4  # clean renders of their own prompts score full marks
    assert evaluator(images, texts, [{"category": "my"}] * 4).tolist() == own.tolist()
    assert evaluator(images[:1], texts[:1], [{"category": "spatial"}]).tolist() == own[:1].tolist()


def test_every_number_field_declares_its_range() -> None:
    """A numeric config field is declared with a check, so a new one cannot go without a range."""
    from loopdiff.config import _optional, schema_fields

    unchecked = [path for path, annotation, declared in schema_fields()
                 if _optional(annotation)[0] in (int, float) and declared.metadata.get("check") is None]
    assert unchecked == []


@pytest.mark.parametrize("path, good, bad", [
    ("training.adam_beta1", 0.0, 1.0), ("training.adam_eps", 1e-12, 0.0), ("sampling.resolution", 8192, 8193),
    ("training.seed", 2**63 - 1, 2**63), ("estimator.advantage_clip", float("inf"), float("nan")),
    ("eval.max_prompts", 0, -1), ("training.ema_decay", 0.0, 1.0),
])
def test_a_declared_range_includes_its_ends_as_it_says(path, good, bad) -> None:
    """The edge of each range, read from the declaration: ``good`` passes, ``bad`` is refused in words."""
    from loopdiff.config import ConfigError, config_from_dict

    section, name = path.split(".")
    assert getattr(getattr(config_from_dict({section: {name: good}}), section), name) == good
    with pytest.raises(ConfigError, match=rf"^{path}=.* is invalid; allowed: "):
        config_from_dict({section: {name: bad}})


def test_wandb_without_the_package_fails_at_start_up_writing_nothing(tmp_path, capsys, monkeypatch) -> None:
    import importlib.util

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "wandb" else real_find_spec(name, *a))
    monkeypatch.setitem(__import__("sys").modules, "wandb", None)  # import wandb fails, as when not installed
    monkeypatch.setattr("loopdiff.models.StableDiffusionPipeline.from_pretrained", lambda *a, **k: 1 / 0)
    run = tmp_path / "run"
    code = main(["train", "output.wandb=true", f"output.dir={run}", "model.device=cpu"])
    lines = _our_lines(capsys.readouterr().err)
    assert code == 2 and len(lines) == 1, lines
    assert "output.wandb=true needs the wandb package, which is not installed: pip install wandb" in lines[0]
    assert not run.exists()  # no config.json, no tensorboard/
