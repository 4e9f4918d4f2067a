"""The shipped accelerate config files: each loads with accelerate's own loader as the backend it names, its
sharding options are ones ``accelerate launch`` knows, and the environment the launcher derives from it is
what loopdiff's launch check reads."""

from __future__ import annotations

import fnmatch
import tomllib
from importlib import resources
from pathlib import Path

import pytest
from accelerate.commands.config.config_args import ClusterConfig, load_config_from_file
from accelerate.commands.launch import _validate_launch_command, launch_command_parser
from accelerate.utils import DistributedType
from accelerate.utils.launch import prepare_deepspeed_cmd_env, prepare_multi_gpu_env

from loopdiff.config import config_from_dict
from loopdiff.training.preflight import LaunchError, check_deepspeed_config, check_fsdp_version, check_sharding

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = {"ddp.yaml": DistributedType.MULTI_GPU, "fsdp.yaml": DistributedType.FSDP,
           "deepspeed-zero2.yaml": DistributedType.DEEPSPEED}


def shipped(name: str) -> Path:
    return Path(str(resources.files("loopdiff") / "accelerate_configs" / name))


def launch_env(path: Path) -> dict[str, str]:
    """The environment ``accelerate launch --config_file path`` gives each process."""
    args = launch_command_parser().parse_args(["--config_file", str(path), "-m", "loopdiff.cli", "train"])
    args, defaults, _ = _validate_launch_command(args)
    if args.use_deepspeed:
        args.deepspeed_fields_from_accelerate_config = list(defaults.deepspeed_config)  # as launch_command does
        return prepare_deepspeed_cmd_env(args)[1]
    return prepare_multi_gpu_env(args)


def test_the_package_ships_exactly_these_files_and_pyproject_includes_them() -> None:
    folder = resources.files("loopdiff") / "accelerate_configs"
    assert sorted(p.name for p in folder.iterdir() if p.name.endswith(".yaml")) == sorted(SHIPPED)
    patterns = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["loopdiff"]
    for name in SHIPPED:
        assert any(fnmatch.fnmatch(f"accelerate_configs/{name}", pattern) for pattern in patterns), name


@pytest.mark.parametrize("name", list(SHIPPED))
def test_each_file_loads_with_accelerates_loader_as_its_backend(name: str) -> None:
    config = load_config_from_file(str(shipped(name)))
    assert isinstance(config, ClusterConfig)
    assert config.distributed_type == SHIPPED[name]
    assert (config.num_machines, config.machine_rank, config.use_cpu, config.mixed_precision) == (1, 0, False, "no")
    options = {action.dest for action in launch_command_parser()._actions}
    for key in config.fsdp_config:  # accelerate launch reads fsdp_config.x as --fsdp_x, the rest as --x
        assert (key if key.startswith("fsdp_") else f"fsdp_{key}") in options, key
    for key in config.deepspeed_config:
        assert key in options, key


def test_the_sharded_files_set_what_docs_scaling_says() -> None:
    fsdp = load_config_from_file(str(shipped("fsdp.yaml"))).fsdp_config
    assert fsdp["fsdp_version"] == 2 and fsdp["fsdp_auto_wrap_policy"] == "TRANSFORMER_BASED_WRAP"
    assert "fsdp_transformer_layer_cls_to_wrap" not in fsdp  # the model's own _no_split_modules decide
    assert fsdp["fsdp_state_dict_type"] == "FULL_STATE_DICT"
    zero = load_config_from_file(str(shipped("deepspeed-zero2.yaml"))).deepspeed_config
    assert zero["zero_stage"] == 2 and zero["gradient_accumulation_steps"] == 1
    assert zero["gradient_clipping"] == "auto"  # training.max_grad_norm (check_deepspeed_config fills it)
    assert zero["offload_optimizer_device"] == zero["offload_param_device"] == "none"


@pytest.mark.parametrize("name, variable, backend", [("fsdp.yaml", "ACCELERATE_USE_FSDP", "FSDP"),
                                                     ("deepspeed-zero2.yaml", "ACCELERATE_USE_DEEPSPEED", "DEEPSPEED")])
def test_a_sharded_launch_that_accelerate_runs_unsharded_is_refused(name: str, variable: str, backend: str) -> None:
    env = launch_env(shipped(name))
    assert env[variable] == "true"
    if backend == "FSDP":
        assert env["FSDP_VERSION"] == "2"
    else:
        assert env["ACCELERATE_DEEPSPEED_ZERO_STAGE"] == "2"
    check_sharding(backend, env)  # accelerate took it: fine
    for fallback in ("MULTI_CPU", "MULTI_GPU", "NO"):  # on the CPU accelerate runs MULTI_CPU (DDP) instead
        with pytest.raises(LaunchError, match=f"asked for {backend} \\({variable}=true\\) but accelerate runs {fallback}"):
            check_sharding(fallback, env)


def test_the_shipped_fsdp_file_passes_the_version_check_and_fsdp1_is_refused(monkeypatch) -> None:
    from accelerate import FullyShardedDataParallelPlugin

    for key, value in launch_env(shipped("fsdp.yaml")).items():
        monkeypatch.setenv(key, value)
    plugin = FullyShardedDataParallelPlugin()  # what accelerate builds from the launch's environment
    assert plugin.fsdp_version == 2
    check_fsdp_version(plugin.fsdp_version)
    monkeypatch.setenv("FSDP_VERSION", "1")
    monkeypatch.setenv("FSDP_SYNC_MODULE_STATES", "false")  # FSDP1's default looks for a GPU
    with pytest.raises(LaunchError, match="asked for FSDP version 1; loopdiff trains under FSDP2 only"):
        check_fsdp_version(FullyShardedDataParallelPlugin().fsdp_version)


def test_the_ddp_file_asks_for_no_sharding() -> None:
    env = launch_env(shipped("ddp.yaml"))
    assert "ACCELERATE_USE_FSDP" not in env and "ACCELERATE_USE_DEEPSPEED" not in env
    for distributed_type in ("MULTI_GPU", "MULTI_CPU"):
        check_sharding(distributed_type, env)


def _deepspeed_config(monkeypatch, mixed_precision: str = "no", **changes: str) -> dict:
    """The DeepSpeed config accelerate builds (DeepSpeedPlugin, then AcceleratorState's mixed precision) from
    the environment ``accelerate launch`` derives from the shipped file, with ``changes`` to it."""
    from accelerate import DeepSpeedPlugin

    for key, value in {**launch_env(shipped("deepspeed-zero2.yaml")), **changes}.items():
        monkeypatch.setenv(key, value)
    plugin = DeepSpeedPlugin()
    plugin.set_mixed_precision(mixed_precision)
    return plugin.deepspeed_config


def test_the_deepspeed_config_takes_loopdiffs_clipping_accumulation_and_micro_batch(monkeypatch) -> None:
    ds_config = _deepspeed_config(monkeypatch)
    assert ds_config["gradient_clipping"] == "auto" and ds_config["train_micro_batch_size_per_gpu"] == "auto"
    check_deepspeed_config(ds_config, config_from_dict({"training": {"max_grad_norm": 0.25, "micro_batch_size": 6}}))
    assert (ds_config["gradient_clipping"], ds_config["gradient_accumulation_steps"]) == (0.25, 1)
    assert ds_config["train_micro_batch_size_per_gpu"] == 6 and ds_config["zero_optimization"]["stage"] == 2
    same = _deepspeed_config(monkeypatch, ACCELERATE_GRADIENT_CLIPPING="0.25")
    check_deepspeed_config(same, config_from_dict({"training": {"max_grad_norm": 0.25}}))  # a number that agrees


@pytest.mark.parametrize("changes, mixed_precision, message", [
    ({"ACCELERATE_DEEPSPEED_ZERO_STAGE": "3"}, "no", "DeepSpeed ZeRO stage 3; loopdiff trains under ZeRO stage 2"),
    ({"ACCELERATE_DEEPSPEED_OFFLOAD_OPTIMIZER_DEVICE": "cpu"}, "no", "offload_optimizer_device: cpu; loopdiff has not"),
    ({}, "bf16", "DeepSpeed would train in bf16 \\(model.mixed_precision=bf16"),
    ({"ACCELERATE_GRADIENT_ACCUMULATION_STEPS": "4"}, "no", "sets gradient_accumulation_steps: 4; loopdiff accumulate"),
    ({"ACCELERATE_GRADIENT_CLIPPING": "1.0"}, "no", "sets gradient_clipping: 1.0 but training.max_grad_norm=0.5"),
])
def test_deepspeed_settings_loopdiff_has_not_run_are_refused(monkeypatch, changes, mixed_precision, message) -> None:
    ds_config = _deepspeed_config(monkeypatch, mixed_precision, **changes)
    config = config_from_dict({"training": {"max_grad_norm": 0.5}, "model": {"mixed_precision": mixed_precision}})
    with pytest.raises(LaunchError, match=message):
        check_deepspeed_config(ds_config, config)
