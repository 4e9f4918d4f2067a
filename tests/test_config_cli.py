"""Configuration validation and the CLI's errors: clear messages naming the field and value, no traceback."""

from __future__ import annotations

import subprocess
import sys

import pytest

from loopdiff.cli import main, packaged_config
from loopdiff.config import ConfigError, RunConfig, config_from_dict, fixed_changes, load_config


def test_defaults_and_overrides_reach_the_right_fields(tmp_path) -> None:
    path = tmp_path / "run.toml"
    path.write_text('[training]\nepochs = 7\n[estimator]\npreset = "ppo"\n')
    config = load_config(path, ["training.learning_rate=3e-4", "eval.rewards=a,b", "model.lora=true"])
    assert config.training.epochs == 7 and config.estimator.preset == "ppo"
    assert config.training.learning_rate == pytest.approx(3e-4)
    assert config.eval.rewards == ["a", "b"] and config.model.lora is True


def test_unquoted_no_reaches_a_text_field_as_no(tmp_path) -> None:
    path = tmp_path / "run.yaml"
    path.write_text("model:\n  mixed_precision: fp16\n")
    assert load_config(path, ["model.mixed_precision=no"]).model.mixed_precision == "no"
    path.write_text("model:\n  mixed_precision: no\n")
    assert load_config(path).model.mixed_precision == "no"


def test_renamed_field_loads_under_its_new_name_with_a_warning(tmp_path) -> None:
    path = tmp_path / "old.yaml"
    path.write_text("training:\n  first_steps: 3\n")
    with pytest.warns(FutureWarning, match="'training.first_steps' was renamed 'training.train_denoising_steps'"):
        assert load_config(path).training.train_denoising_steps == 3
    with pytest.warns(FutureWarning):
        assert load_config(None, ["training.first_steps=2"]).training.train_denoising_steps == 2
    with pytest.raises(ConfigError, match="give only 'training.train_denoising_steps'"):
        config_from_dict({"training": {"first_steps": 2, "train_denoising_steps": 2}})


def test_resume_check_reads_a_run_saved_under_the_old_field_name() -> None:
    """A run folder saved before the rename continues with the same value under the new name."""
    saved = RunConfig().to_dict()
    saved["training"]["first_steps"] = saved["training"].pop("train_denoising_steps")
    saved["training"]["first_steps"] = 5
    assert fixed_changes(saved, config_from_dict({"training": {"train_denoising_steps": 5}})) == []
    changed = fixed_changes(saved, config_from_dict({"training": {"train_denoising_steps": 4}}))
    assert changed == ["training.train_denoising_steps 5 -> 4"]


def test_packaged_configs_are_valid_and_load_by_name(tmp_path) -> None:
    from loopdiff.cli import packaged_config_names, resolve_config
    from loopdiff.embedded.plugin import DEFAULT_CONFIG

    assert packaged_config_names() == [
        "embedded-aesthetic", "embedded-aesthetic-fidelity", "embedded-color", "embedded-flow-aesthetic",
        "flux-compbench-attributes",
        "sd15-ddpo-aesthetic", "sd15-ddpo-compressibility", "sd2-compbench-attributes", "sd2-compbench-numeracy",
        "sd2-compbench-spatial", "sd3-compbench-attributes", "sdxl-compbench-attributes",
    ]  # the Stable Diffusion and Flux ones are tested in test_real_runs.py
    for name in ("embedded-aesthetic", "embedded-color"):
        config = load_config(resolve_config(name))
        assert config.estimator.preset == "loop" and config.estimator.samples_per_prompt == 4
        assert resolve_config(name) == resolve_config(f"{name}.yaml") == packaged_config(f"{name}.yaml")
    default = load_config(resolve_config(DEFAULT_CONFIG))
    assert default.reward.name == "embedded_aesthetic" and "embedded_colorfulness" in default.eval.rewards
    local = tmp_path / "embedded-color"
    local.write_text("training:\n  epochs: 3\n")
    assert resolve_config(str(local)) == local  # a file of that name wins over the packaged config


def test_the_fidelity_job_is_the_aesthetic_job_with_a_weighted_vqa_term() -> None:
    """Its noise control is then the aesthetic job's (the control replaces the reward), as its results assume."""
    from loopdiff.cli import resolve_config

    plain = load_config(resolve_config("embedded-aesthetic")).to_dict()
    fidelity = load_config(resolve_config("embedded-aesthetic-fidelity")).to_dict()
    differ = {(section, key) for section in plain for key in plain[section]
              if plain[section][key] != fidelity[section][key]}
    assert differ == {("reward", "name"), ("reward", "monitor"), ("output", "dir")}
    assert fidelity["reward"]["name"] == "embedded_aesthetic:1,embedded_vqa:0.15"
    assert fidelity["reward"]["monitor"] == ["embedded_vqa"]


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("training.learning_rate=-1", "training.learning_rate=-1"),
        ("sampling.eta=0", "sampling.eta=0"),
        ("training.timestep_fraction=1.5", "training.timestep_fraction=1.5"),
        ("training.train_denoising_steps=0", "training.train_denoising_steps=0"),
        ("estimator.preset=ddpg", "estimator.preset='ddpg'"),
        ("estimator.advantage=median", "estimator.advantage='median'"),
        ("training.epochs=ten", "training.epochs='ten'"),
        ("training.samples_per_epoch=30", "multiple of samples_per_prompt K=4"),
        ("sampling.logprob_reduction=max", "sampling.logprob_reduction='max'"),
        ("training.nonsense=1", "unknown config field 'training.nonsense'"),
        ("model.mixed_precision=fp8", "model.mixed_precision='fp8'"),
        ("prompts.max_train=0", "prompts.max_train=0"),
        ("model.train_modules=kv", "model.train_modules='kv'"),
    ],
)
def test_bad_values_name_field_and_value(override: str, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(None, [override])
    assert message in str(info.value)
    assert "allowed" in str(info.value) or "fields of" in str(info.value) or "valid" in str(info.value)


def test_group_estimator_needs_k_of_two() -> None:
    with pytest.raises(ConfigError, match="samples_per_prompt=1"):
        load_config(None, ["estimator.preset=loop", "estimator.samples_per_prompt=1"])


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["prompts.train=/nonexistent/prompts.txt"], "prompt file '/nonexistent/prompts.txt' does not exist"),
        (["reward.name=no_such_reward"], "unknown reward 'no_such_reward'"),
        (["estimator.preset=bogus"], "estimator.preset='bogus' is invalid; allowed: reinforce"),
    ],
)
def test_cli_reports_user_errors_without_traceback(tmp_path, capsys, overrides, message) -> None:
    prompts = tmp_path / "p.txt"
    prompts.write_text("a red circle\n")
    base = [f"prompts.train={prompts}", f"prompts.val={prompts}", f"output.dir={tmp_path / 'run'}",
            "reward.name=jpeg_compressibility"]
    code = main(["train", *base, *overrides])
    err = capsys.readouterr().err
    assert code == 2
    assert message in err
    assert "Traceback" not in err


def test_cli_subprocess_error_is_one_clean_line(tmp_path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "loopdiff.cli", "train", "training.epochs=-3"],
        capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 2
    assert "training.epochs=-3" in result.stderr and "Traceback" not in result.stderr


def test_help_explains_itself(capsys) -> None:
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = capsys.readouterr().out
    assert "section.field=value" in text and "loop" in text and "reinforce_bc" in text


# ---------------------------------------------------------------- the schema


def test_every_field_is_documented_and_listed_with_type_default_and_choices(capsys) -> None:
    from loopdiff.config import field_default, schema_fields

    rows = schema_fields()
    assert len(rows) > 60 and [path for path, _, f in rows if not f.metadata.get("help")] == []
    assert main(["config", "fields"]) == 0
    text = capsys.readouterr().out
    for path, _, f in rows:
        assert f"{path}: " in text and f.metadata["help"] in text and repr(field_default(path)) in text, path
    assert "model.mixed_precision: no | fp16 | bf16 = 'no'\n    accelerate's mixed precision" in text
    assert "estimator.samples_per_prompt: int | None = None\n    K: trajectories sampled per prompt" in text


def test_config_show_prints_the_config_train_would_run(tmp_path, capsys) -> None:
    from loopdiff.api import run_config

    assert main(["config", "show", "--config", "embedded-color", "training.epochs=3", "output.dir=yes"]) == 0
    shown = capsys.readouterr().out
    expected = run_config(["training.epochs=3", "output.dir=yes"], config_file="embedded-color")
    assert yaml_load(shown) == expected.to_dict() and expected.training.epochs == 3
    path = tmp_path / "shown.yaml"
    path.write_text(shown)
    assert load_config(path) == expected  # the printed YAML reads back as the same config
    assert main(["config", "show", "model.pretrained=embedded", "reward.name=null"]) == 0
    default = yaml_load(capsys.readouterr().out)  # the default config, with the model's registered defaults
    assert default == run_config(["reward.name=null"]).to_dict()
    assert default["reward"]["name"] == "embedded_vqa" and default["prompts"]["train"] == "embedded:color"


def test_config_show_needs_no_prompt_file(capsys) -> None:
    assert main(["config", "show", "--config", "sd2-compbench-attributes"]) == 0
    captured = capsys.readouterr()
    shown = yaml_load(captured.out)
    assert shown["model"]["pretrained"] == "stabilityai/stable-diffusion-2-base" and shown["prompts"]["train"] is None
    assert shown["reward"]["name"] == "blip_vqa"  # the packaged config's own values
    assert "note: prompts.train is unset; loopdiff train needs it" in captured.err
    assert main(["train", "--config", "sd2-compbench-attributes"]) == 2  # running it still needs the prompts
    assert "prompts.train is required" in capsys.readouterr().err


def yaml_load(text: str):
    import yaml

    return yaml.safe_load(text)


def test_choices_are_checked_from_the_literal_types() -> None:
    from loopdiff.config import ModelConfig, field_choices, schema_fields, validate

    literal = [(path, field_choices(a)) for path, a, _ in schema_fields() if field_choices(a)]
    assert {p for p, _ in literal} >= {"model.mixed_precision", "model.attention", "model.train_modules",
                                       "sampling.logprob_reduction", "sampling.sde_type", "estimator.preset",
                                       "estimator.advantage", "estimator.loss"}
    for path, allowed in literal:
        with pytest.raises(ConfigError) as info:
            load_config(None, [f"{path}=bogus"])
        assert str(info.value) == f"{path}='bogus' is invalid; allowed: {', '.join(allowed)}"
    with pytest.raises(ConfigError, match="model.attention='flash' is invalid; allowed: auto, sdpa, classic"):
        validate(RunConfig(model=ModelConfig(attention="flash")))  # built in Python, checked by the same types


def test_every_estimator_field_is_an_override_and_every_override_an_estimator_field() -> None:
    import dataclasses

    from loopdiff.config import EstimatorConfig, build_estimator
    from loopdiff.estimators import PRESETS, Estimator

    fields = {f.name for f in dataclasses.fields(Estimator)} - {"name"}
    assert {f.name for f in dataclasses.fields(EstimatorConfig)} - {"preset"} == fields
    changed = {"advantage": "group_zscore", "loss": "score_function", "samples_per_prompt": 8, "inner_epochs": 2,
               "minibatches": 2, "clip_range": 0.2, "advantage_clip": 3.0, "kl_coef": 0.5,
               "tracker_buffer_size": 5, "tracker_min_count": 3}
    assert set(changed) == fields
    estimator = build_estimator(config_from_dict({"estimator": {"preset": "loop", **changed}}))
    assert {name: getattr(estimator, name) for name in fields} == changed
    assert all(getattr(PRESETS["loop"], name) != value for name, value in changed.items())
    assert build_estimator(RunConfig()) == PRESETS["loop"]  # unset overrides keep the preset's values


def test_estimator_config_mirrors_the_estimator_fields() -> None:
    """EstimatorConfig, written out field by field, declares for every Estimator field but its name an optional
    override of the same type, with the Estimator field's help and allowed values, in the same order."""
    import dataclasses
    from typing import get_args, get_type_hints

    from loopdiff.config import EstimatorConfig
    from loopdiff.estimators import PRESETS, Estimator, PresetName

    declared = [f for f in dataclasses.fields(Estimator) if f.name != "name"]
    config = dataclasses.fields(EstimatorConfig)
    assert [f.name for f in config] == ["preset", *(f.name for f in declared)]
    hints, estimator_hints = get_type_hints(EstimatorConfig), get_type_hints(Estimator)
    assert hints["preset"] == PresetName and set(get_args(PresetName)) == set(PRESETS)
    for want, got in zip(declared, config[1:]):
        assert hints[got.name] == estimator_hints[want.name] | None, got.name
        assert got.default is None and got.metadata["help"] == f"{want.metadata['help']}; null: the preset's"
        assert got.metadata["check"] is want.metadata.get("check"), got.name


TEXT_CASES = [("output", "dir", "yes"), ("model", "revision", "0777"), ("prompts", "train", "off")]


@pytest.mark.parametrize(("section", "name", "text"), TEXT_CASES)
def test_a_text_field_keeps_the_text_as_typed_in_overrides_and_yaml(tmp_path, section, name, text) -> None:
    assert getattr(getattr(load_config(None, [f"{section}.{name}={text}"]), section), name) == text
    path = tmp_path / "run.yaml"
    path.write_text(f"{section}:\n  {name}: {text}\n")
    assert getattr(getattr(load_config(path), section), name) == text
    assert load_config(None, [f"{section}.{name}='{text}'"]).to_dict()[section][name] == text  # quoted: the same


def test_other_fields_still_read_yaml_values(tmp_path) -> None:
    path = tmp_path / "run.yaml"
    path.write_text("output:\n  resume: off\nmodel:\n  revision: null\ntraining:\n  epochs: 0x10\n")
    config = load_config(path, ["output.wandb=yes", "reward.name=null", "eval.rewards=a,b"])
    assert (config.output.resume, config.model.revision, config.training.epochs) == (False, None, 16)
    assert config.output.wandb is True and config.reward.name == "embedded_vqa"
    assert config.eval.rewards == ["a", "b"]


def test_other_commands_take_their_defaults_from_the_config_schema() -> None:
    from loopdiff.cli import build_parser
    from loopdiff.config import EvalConfig, ModelConfig, SamplingConfig, TrainingConfig

    parser, s, e = build_parser(), SamplingConfig(), EvalConfig()
    evaluate = parser.parse_args(["eval"])
    assert (evaluate.steps, evaluate.guidance_scale, evaluate.eta) == (s.num_steps, s.guidance_scale, s.eta)
    assert (evaluate.batch_size, evaluate.images_per_prompt) == (s.batch_size, e.images_per_prompt)
    assert evaluate.seed == e.seed == 1234 and evaluate.max_prompts == e.max_prompts  # reproduces a run's eval
    assert evaluate.model == ModelConfig().pretrained
    noise = parser.parse_args(["gradient-noise"])
    assert noise.samples_per_prompt == 4 and noise.train_denoising_steps == TrainingConfig().train_denoising_steps
    for command in ("sample --prompt p", "branch", "gradient-noise"):
        args = parser.parse_args(command.split())
        assert (args.steps, args.guidance_scale, args.eta, args.seed) == (s.num_steps, s.guidance_scale, s.eta, 0)


def test_the_makefile_and_readme_name_the_task_make_run_trains() -> None:
    from pathlib import Path

    from loopdiff.embedded.plugin import DEFAULT_CONFIG

    root = Path(__file__).resolve().parents[1]
    comment = next(line for line in (root / "Makefile").read_text().splitlines() if line.startswith("# make run"))
    task = DEFAULT_CONFIG.removeprefix("embedded-").removesuffix(".yaml")  # aesthetic
    assert f"{task} task" in comment and DEFAULT_CONFIG in comment, comment
    assert f"on the embedded world's {task} task" in (root / "README.md").read_text()
