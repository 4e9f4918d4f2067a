"""Runs on a model other than the embedded one: no embedded defaults leak in, the packaged Stable Diffusion
configs load and run, and exports carry a model card."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterator

import pytest
import yaml

from loopdiff.api import run_config
from loopdiff.cli import main, packaged_config_names, resolve_config
from loopdiff.config import ConfigError, load_config
from loopdiff.embedded.plugin import DEFAULT_CONFIG
from loopdiff.training.trainer import Trainer

SD_CONFIGS = ["sd15-ddpo-aesthetic", "sd15-ddpo-compressibility", "sd2-compbench-attributes",
              "sd2-compbench-numeracy", "sd2-compbench-spatial"]
SDXL_CONFIGS = ["sdxl-compbench-attributes"]
SD3_CONFIGS = ["sd3-compbench-attributes"]
FLUX_CONFIGS = ["flux-compbench-attributes"]
PROMPTS = ["a red circle", "a blue square", "a green star", "a big cat"]


def strings(values: Any) -> Iterator[str]:
    """Every string anywhere in a nested structure of dicts and lists."""
    if isinstance(values, dict):
        for value in values.values():
            yield from strings(value)
    elif isinstance(values, list):
        for value in values:
            yield from strings(value)
    elif isinstance(values, str):
        yield values


@pytest.fixture()
def prompt_file(tmp_path: Path) -> Path:
    path = tmp_path / "prompts.txt"
    path.write_text("\n".join(PROMPTS) + "\n")
    return path


# ---------------------------------------------------------------- no embedded leakage


def test_bare_train_runs_the_embedded_main_job() -> None:
    config = run_config([])
    assert config == load_config(resolve_config(DEFAULT_CONFIG))
    assert config.reward.name == "embedded_aesthetic" and config.prompts.train == "embedded:color"


def test_embedded_model_without_a_config_file_keeps_the_embedded_defaults() -> None:
    config = load_config(None, [])
    assert (config.prompts.train, config.prompts.val, config.reward.name) == (
        "embedded:color", "embedded:color:val", "embedded_vqa")
    assert load_config(None, ["reward.name=jpeg_compressibility"]).reward.name == "jpeg_compressibility"


def test_another_model_starts_from_neutral_defaults(prompt_file: Path) -> None:
    config = run_config(["model.pretrained=stabilityai/stable-diffusion-2-base", f"prompts.train={prompt_file}",
                         "reward.name=jpeg_compressibility"])
    assert [s for s in strings(config.to_dict()) if s.startswith("embedded")] == []
    assert config.prompts.val is None and config.eval.rewards == [] and config.reward.monitor == []
    assert config.training.micro_batch_size == 64  # the dataclass default, not the embedded main job's 160


def test_another_model_keeps_embedded_names_given_explicitly(prompt_file: Path) -> None:
    config = run_config(["model.pretrained=/models/sd", "prompts.val=embedded:color:val",
                         f"prompts.train={prompt_file}", "eval.rewards=embedded_colorfulness"])
    assert config.prompts.val == "embedded:color:val" and config.eval.rewards == ["embedded_colorfulness"]


def test_another_model_needs_training_prompts_one_line(capsys) -> None:
    code = main(["train", "model.pretrained=stabilityai/stable-diffusion-2-base", "reward.name=blip_vqa"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1
    assert "prompts.train is required for a model other than 'embedded'" in err


def test_another_model_needs_a_reward_one_line(capsys, tiny_pipeline_dir: Path, prompt_file: Path) -> None:
    code = main(["train", f"model.pretrained={tiny_pipeline_dir}", f"prompts.train={prompt_file}"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1
    assert "reward.name is required for a model other than 'embedded'" in err


@pytest.mark.parametrize("command", ["eval", "branch", "gradient-noise"])
def test_measuring_commands_need_prompts_for_another_model(capsys, command: str) -> None:
    code = main([command, "--model", "stabilityai/stable-diffusion-2-base", "--reward", "jpeg_compressibility"])
    err = capsys.readouterr().err
    assert code == 2 and "--prompts is required for a model other than 'embedded'" in err


def test_a_run_without_validation_prompts_skips_evaluation(tmp_path: Path, tiny_pipeline_dir: Path,
                                                           prompt_file: Path, capsys) -> None:
    config = run_config([f"model.pretrained={tiny_pipeline_dir}", "model.device=cpu", f"prompts.train={prompt_file}",
                         "reward.name=jpeg_compressibility", "sampling.num_steps=2", "training.epochs=1",
                         "training.samples_per_epoch=4", f"output.dir={tmp_path / 'run'}", "output.progress=false",
                         "output.tensorboard=false"])
    Trainer(config).train()
    assert not (tmp_path / "run" / "eval").exists()
    assert "prompts.val is unset" in capsys.readouterr().err


# ---------------------------------------------------------------- packaged configs for Stable Diffusion


def test_packaged_stable_diffusion_configs_need_the_users_prompts() -> None:
    assert set(SD_CONFIGS + SDXL_CONFIGS + SD3_CONFIGS + FLUX_CONFIGS) <= set(packaged_config_names())
    for name in SD_CONFIGS + SDXL_CONFIGS + SD3_CONFIGS + FLUX_CONFIGS:
        with pytest.raises(ConfigError, match="prompts.train is required for a model other than 'embedded'"):
            load_config(resolve_config(name))
        assert resolve_config(name).read_text().startswith("# ")  # the header says what it is and its source


def test_sd2_configs_hold_the_loop_papers_settings(prompt_file: Path) -> None:
    rewards = {}
    for name in SD_CONFIGS[2:]:
        c = load_config(resolve_config(name), [f"prompts.train={prompt_file}"])
        assert c.model.pretrained == "stabilityai/stable-diffusion-2-base"
        assert (c.model.lora, c.model.train_modules) == (False, "all")
        assert (c.sampling.num_steps, c.sampling.guidance_scale, c.sampling.eta) == (50, 5.0, 1.0)
        assert (c.training.learning_rate, c.training.weight_decay, c.training.max_grad_norm) == (1e-5, 1e-4, 1.0)
        assert (c.estimator.preset, c.estimator.samples_per_prompt, c.estimator.clip_range) == ("loop", 4, 1e-4)
        assert c.eval.images_per_prompt == 10
        rewards[name] = c.reward.name
    assert rewards == {"sd2-compbench-attributes": "blip_vqa", "sd2-compbench-numeracy": "numeracy",
                       "sd2-compbench-spatial": "spatial"}


def test_ddpo_configs_hold_ddpo_pytorchs_settings(prompt_file: Path) -> None:
    from loopdiff.config import build_estimator

    expected = {"sd15-ddpo-aesthetic": ("aesthetic", 2, 32), "sd15-ddpo-compressibility": ("jpeg_compressibility", 4, 16)}
    for name, (reward, minibatches, buffer) in expected.items():
        c = load_config(resolve_config(name), [f"prompts.train={prompt_file}"])
        e = build_estimator(c)
        assert c.model.pretrained == "runwayml/stable-diffusion-v1-5" and c.model.lora is True
        assert (c.sampling.num_steps, c.sampling.guidance_scale, c.sampling.eta) == (50, 5.0, 1.0)
        assert (c.training.learning_rate, c.training.samples_per_epoch) == (3e-4, 256)
        assert (e.advantage, e.samples_per_prompt, e.inner_epochs, e.clip_range, e.advantage_clip) == (
            "stat_tracker", 1, 1, 1e-4, 5.0)
        assert (e.minibatches, e.tracker_buffer_size, e.tracker_min_count) == (minibatches, buffer, 16)
        assert c.reward.name == reward


def test_sdxl_config_holds_the_loop_settings_with_lora_on_sdxl_base(prompt_file: Path) -> None:
    c = load_config(resolve_config("sdxl-compbench-attributes"), [f"prompts.train={prompt_file}"])
    assert c.model.pretrained == "stabilityai/stable-diffusion-xl-base-1.0"
    assert (c.model.lora, c.model.lora_rank, c.model.mixed_precision) == (True, 16, "bf16")
    assert (c.sampling.num_steps, c.sampling.guidance_scale, c.sampling.eta) == (50, 5.0, 1.0)
    assert (c.estimator.preset, c.estimator.samples_per_prompt, c.estimator.clip_range) == ("loop", 4, 1e-4)
    assert (c.training.weight_decay, c.training.max_grad_norm, c.training.gradient_checkpointing) == (1e-4, 1.0, True)
    assert c.reward.name == "blip_vqa" and c.eval.images_per_prompt == 10


def test_sd3_config_holds_flow_grpos_sampling_and_lora_with_the_loop_estimator(prompt_file: Path) -> None:
    c = load_config(resolve_config("sd3-compbench-attributes"), [f"prompts.train={prompt_file}"])
    assert c.model.pretrained == "stabilityai/stable-diffusion-3-medium-diffusers"
    assert (c.model.lora, c.model.lora_rank, c.model.lora_alpha, c.model.mixed_precision) == (True, 32, 64.0, "bf16")
    s = c.sampling
    assert (s.num_steps, s.guidance_scale, s.eta, s.sde_type, s.resolution, s.logprob_reduction) == (
        10, 4.5, 0.7, "sde", 512, "mean")
    assert (c.training.learning_rate, c.training.weight_decay, c.training.max_grad_norm) == (3e-4, 1e-4, 1.0)
    assert (c.training.ema_decay, c.training.ema_every) == (0.9, 8)
    assert (c.estimator.preset, c.estimator.samples_per_prompt, c.estimator.clip_range) == ("loop", 4, 1e-4)
    assert c.reward.name == "blip_vqa" and c.eval.images_per_prompt == 10 and c.eval.deterministic


def test_flux_config_holds_flow_grpos_flux_sampling_and_lora_with_the_loop_estimator(prompt_file: Path) -> None:
    c = load_config(resolve_config("flux-compbench-attributes"), [f"prompts.train={prompt_file}"])
    assert c.model.pretrained == "black-forest-labs/FLUX.1-dev"
    m = c.model
    assert (m.lora, m.lora_rank, m.lora_alpha, m.mixed_precision) == (True, 64, 128.0, "bf16")
    s = c.sampling
    assert (s.num_steps, s.guidance_scale, s.eta, s.sde_type, s.resolution, s.logprob_reduction) == (
        6, 3.5, 0.9, "sde", 512, "mean")
    assert (s.max_sequence_length, s.batch_size, c.training.micro_batch_size) == (128, 3, 3)
    assert (c.training.learning_rate, c.training.weight_decay, c.training.max_grad_norm) == (3e-4, 1e-4, 1.0)
    assert (c.training.ema_decay, c.training.ema_every, c.training.gradient_checkpointing) == (0.9, 8, True)
    assert (c.estimator.preset, c.estimator.samples_per_prompt, c.estimator.clip_range) == ("loop", 4, 1e-4)
    assert c.reward.name == "blip_vqa" and c.eval.images_per_prompt == 10 and c.eval.deterministic


@pytest.mark.parametrize("name", SD_CONFIGS)
def test_packaged_config_runs_one_epoch_on_a_tiny_pipeline(name: str, tmp_path: Path, tiny_pipeline_dir: Path,
                                                          prompt_file: Path) -> None:
    _one_epoch(name, tmp_path, tiny_pipeline_dir, prompt_file)


@pytest.mark.parametrize("name", SDXL_CONFIGS)
def test_packaged_sdxl_config_runs_one_epoch_on_a_tiny_sdxl_pipeline(name: str, tmp_path: Path, tiny_sdxl_dir: Path,
                                                                    prompt_file: Path) -> None:
    export = _one_epoch(name, tmp_path, tiny_sdxl_dir, prompt_file)
    assert export.name == "final_lora"
    assert "StableDiffusionXLPipeline.from_pretrained" in (export / "README.md").read_text()


@pytest.mark.parametrize("name", SD3_CONFIGS)
def test_packaged_sd3_config_runs_one_epoch_on_a_tiny_sd3_pipeline(name: str, tmp_path: Path, tiny_sd3_dir: Path,
                                                                  prompt_file: Path) -> None:
    # the tiny transformer has position embeddings for 64 px at most: the config's 512 px is set back to native
    export = _one_epoch(name, tmp_path, tiny_sd3_dir, prompt_file, ["sampling.resolution=null"])
    assert export.name == "final_lora"
    card = (export / "README.md").read_text()
    assert "StableDiffusion3Pipeline.from_pretrained" in card and "DDIM" not in card
    assert (tmp_path / "run" / "eval" / "final_deterministic.json").is_file()


@pytest.mark.parametrize("name", FLUX_CONFIGS)
def test_packaged_flux_config_runs_one_epoch_on_a_tiny_flux_pipeline(name: str, tmp_path: Path, tiny_flux_dir: Path,
                                                                    prompt_file: Path) -> None:
    # 32 px and 8 T5 tokens on the tiny pipeline; the config's LoRA, EMA and gradient checkpointing as they are
    export = _one_epoch(name, tmp_path, tiny_flux_dir, prompt_file,
                        ["sampling.resolution=32", "sampling.max_sequence_length=8"])
    assert export.name == "final_lora"
    card = (export / "README.md").read_text()
    assert "FluxPipeline.from_pretrained" in card and "embedded guidance 3.5" in card and "DDIM" not in card
    assert (tmp_path / "run" / "eval" / "final_deterministic.json").is_file()


def _one_epoch(name: str, tmp_path: Path, pipeline_dir: Path, prompt_file: Path, extra: list[str] = ()) -> Path:
    """``loopdiff train --config name`` for one small epoch on ``pipeline_dir`` (with the ``extra`` overrides);
    checks the export's card and returns the export's folder."""
    run = tmp_path / "run"
    code = main(["train", "--config", name, f"model.pretrained={pipeline_dir}", "model.device=cpu",
                 "model.mixed_precision=no", "sampling.num_steps=2", "training.epochs=1",
                 "training.samples_per_epoch=8", f"prompts.train={prompt_file}", f"prompts.val={prompt_file}",
                 "eval.max_prompts=1", "eval.images_per_prompt=2", "reward.name=jpeg_compressibility",
                 f"output.dir={run}", "output.progress=false", "output.tensorboard=false", *extra])
    assert code == 0
    assert len((run / "metrics.jsonl").read_text().splitlines()) == 1
    config = json.loads((run / "config.json").read_text())
    export = run / ("final_lora" if config["model"]["lora"] else "final_pipeline")
    front = yaml.safe_load((export / "README.md").read_text().split("---")[1])
    assert front["base_model"] == str(pipeline_dir)
    assert {"loopdiff", config["estimator"]["preset"], "jpeg_compressibility"} <= set(front["tags"])
    return export


# ---------------------------------------------------------------- model card


def card_numbers(card: str) -> dict[str, list[float]]:
    """The evaluation table's numbers by reward name: base, fine-tuned, change."""
    rows = {}
    for line in card.splitlines():
        if line.startswith("| `"):
            cells = [c.strip() for c in line.strip("|").split("|")]
            rows[cells[0].strip("`")] = [float(c.split("+-")[0]) for c in cells[1:]]
    return rows


def test_export_writes_a_model_card_with_the_evaluation(tmp_path: Path) -> None:
    from trainer_helpers import make_trainer

    trainer = make_trainer(tmp_path, "loop", eval={"max_prompts": 2, "images_per_prompt": 2,
                                                  "rewards": ["jpeg_incompressibility"]})
    trainer.train()
    path = trainer.export()
    card = (path / "README.md").read_text()
    _, front_text, body = card.split("---", 2)
    front = yaml.safe_load(front_text)
    assert front["library_name"] == "diffusers" and front["base_model"] == "embedded"
    assert {"loopdiff", "loop", "red_minus_blue"} <= set(front["tags"])
    base, final = (json.loads((trainer.run_dir / "eval" / f"{t}.json").read_text())["means"] for t in ("base", "final"))
    numbers = card_numbers(body)
    assert set(numbers) == {"red_minus_blue", "jpeg_incompressibility"}
    for name, (before, after, change) in numbers.items():
        assert before == pytest.approx(base[name], abs=5e-5) and after == pytest.approx(final[name], abs=5e-5)
        assert change == pytest.approx(final[name] - base[name], abs=1e-4)
    config_text = body.split("## Training configuration")[1].split("```yaml\n")[1].split("```")[0]
    assert yaml.safe_load(config_text) == trainer.config.to_dict()


def test_model_card_without_evaluation_says_so(tmp_path: Path) -> None:
    from trainer_helpers import make_trainer

    trainer = make_trainer(tmp_path, "rloo", model={"lora": True, "lora_rank": 2})
    trainer.train()
    card = (trainer.export() / "README.md").read_text()
    assert "No evaluation was run" in card and "load_lora_weights" in card
    assert "lora" in yaml.safe_load(card.split("---")[1])["tags"]
