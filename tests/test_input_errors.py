"""Bad inputs to ``loopdiff train``: one line naming the input, exit code 2, before any model loads."""

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
