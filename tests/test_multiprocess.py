"""Two processes through accelerate (gloo on CPU): ranks sample different data yet keep identical weights;
the documented CPU launches (torchrun, and accelerate launch with the shipped DDP config) write one run; a
launch without a distributed backend, or asking for FSDP on the CPU, fails at once."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest


from loopdiff.config import ConfigError, check_processes, config_from_dict
from loopdiff.training import checkpoint as ckpt
from loopdiff.training.preflight import LaunchError, check_launch
from multiprocess_helpers import launch, needs_accelerate, needs_torchrun, project_frames, read_ranks

TINY_CLI_RUN = ["sampling.num_steps=2", "training.train_denoising_steps=2", "sampling.batch_size=4",
                "training.epochs=2", "training.samples_per_epoch=8", "training.micro_batch_size=16",
                "estimator.samples_per_prompt=4", "eval.max_prompts=0", "reward.name=jpeg_compressibility",
                "output.checkpoint_every=1", "output.progress=false", "output.tensorboard=false"]


def _torchrun_train(run: Path, *overrides: str, use_cpu_env: bool = False) -> subprocess.CompletedProcess:
    """The README's CPU launch: ``torchrun --nproc_per_node 2 -m loopdiff.cli train ...``, 1 thread each."""
    return launch("torchrun", "-m", "loopdiff.cli", "train", *TINY_CLI_RUN, f"output.dir={run}", *overrides,
                  check=False, cwd=run.parent, timeout=600)


def _accelerate_train(run: Path, config_file: str, *overrides: str) -> subprocess.CompletedProcess:
    """docs/scaling.md's CPU launch: ``accelerate launch --config_file <shipped> --num_processes 2 -m
    loopdiff.cli train model.device=cpu ...``, 1 thread each."""
    return launch(config_file, "-m", "loopdiff.cli", "train", "model.device=cpu", *TINY_CLI_RUN, f"output.dir={run}",
                  *overrides, check=False, cwd=run.parent, timeout=600)


@needs_torchrun
def test_the_documented_cpu_launch_trains_one_run_with_two_processes(tmp_path) -> None:
    run = tmp_path / "run"
    result = _torchrun_train(run, "model.device=cpu")
    _check_one_run(run, result)


@needs_accelerate
def test_the_shipped_ddp_config_trains_one_run_with_two_processes_on_the_cpu(tmp_path) -> None:
    run = tmp_path / "run"
    _check_one_run(run, _accelerate_train(run, "ddp.yaml"))


@needs_accelerate
def test_the_shipped_fsdp_config_on_the_cpu_fails_at_once(tmp_path) -> None:
    """On the CPU accelerate runs an FSDP launch as plain data parallel; the run stops before loading."""
    run = tmp_path / "run"
    result = _accelerate_train(run, "fsdp.yaml")
    assert result.returncode != 0
    errors = [line for line in result.stderr.splitlines() if line.startswith("loopdiff train: error:")]
    assert errors and "asked for FSDP (ACCELERATE_USE_FSDP=true) but accelerate runs MULTI_CPU" in errors[0], \
        result.stderr[-3000:]
    assert not run.exists()


def _check_one_run(run: Path, result: subprocess.CompletedProcess) -> None:
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("exported the fine-tuned model") == 1  # only the main process reports
    logged = [json.loads(line)["epoch"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert logged == [1, 2]  # two independent main processes would each have logged both epochs
    assert [p.name for p in ckpt.complete_checkpoints(run)] == ["epoch_00002", "epoch_00001"]
    for path in ckpt.complete_checkpoints(run):
        ckpt.verify(path)
    assert (run / "final_pipeline" / "unet" / "diffusion_pytorch_model.safetensors").is_file()
    assert any((run / "final_pipeline" / "text_encoder").iterdir())


@needs_torchrun
def test_a_launch_without_a_distributed_backend_fails_at_once(tmp_path) -> None:
    if __import__("torch").cuda.is_available():
        pytest.skip("with GPUs accelerate takes the processes as distributed")
    run = tmp_path / "run"
    result = _torchrun_train(run)  # no model.device=cpu: each process would train alone
    assert result.returncode != 0
    errors = [line for line in result.stderr.splitlines() if line.startswith("loopdiff train: error:")]
    assert errors and len(set(errors)) == 1, result.stderr[-3000:]  # torchrun may stop the other rank first
    assert "WORLD_SIZE=2" in errors[0] and "model.device=cpu" in errors[0], result.stderr[-3000:]
    assert project_frames(result.stderr) == [], result.stderr[-3000:]  # torchrun's own frames may show
    assert not (run / "checkpoints").exists() and not (run / "metrics.jsonl").exists()


def test_project_frames_are_found_by_the_package_path_not_by_a_folder_name() -> None:
    import loopdiff

    own = Path(loopdiff.__file__).parent / "cli.py"
    stderr = "\n".join([
        "Traceback (most recent call last):",
        '  File "/home/me/loopdiff/.venv/lib/python3.12/site-packages/torch/distributed/run.py", line 9, in main',
        f'  File "{own}", line 1, in main',
        "loopdiff train: error: WORLD_SIZE=2",
    ])
    assert project_frames(stderr) == [f'  File "{own}", line 1, in main']
    assert project_frames(stderr.replace(str(own), "/elsewhere/cli.py")) == []


@pytest.mark.parametrize(
    "env, processes, message",
    [
        ({"WORLD_SIZE": "2"}, 1, "WORLD_SIZE=2 processes were launched but accelerate runs 1"),
        ({"WORLD_SIZE": "4"}, 2, "WORLD_SIZE=4"),
        ({"WORLD_SIZE": "2", "ACCELERATE_USE_DEEPSPEED": "true"}, 1, "runs 1 \\(accelerate runs DeepSpeed only on"),
        ({"ACCELERATE_USE_CPU": "False", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500"}, 1, "without --multi_gpu"),
    ],
)
def test_launcher_and_accelerate_must_agree_on_the_processes(env, processes, message) -> None:
    with pytest.raises(LaunchError, match=message):
        check_launch(processes, env)


@pytest.mark.parametrize("env, processes", [({}, 1), ({"WORLD_SIZE": "2"}, 2), ({"ACCELERATE_USE_CPU": "False"}, 1)])
def test_consistent_launches_pass(env, processes) -> None:
    check_launch(processes, env)


@pytest.mark.parametrize("samples, processes, ok", [(12, 2, False), (4, 2, False), (16, 2, True), (12, 1, True)])
def test_samples_per_epoch_must_fill_k_times_processes(samples, processes, ok) -> None:
    config = config_from_dict({"estimator": {"preset": "loop", "samples_per_prompt": 4},
                               "training": {"samples_per_epoch": samples}})
    if ok:
        check_processes(config, processes)
        return
    with pytest.raises(ConfigError, match=f"training.samples_per_epoch={samples} .*K x processes = 4 x 2 = 8"):
        check_processes(config, processes)


@needs_torchrun
def test_two_processes_keep_gradients_in_sync(tmp_path) -> None:
    worker = Path(__file__).with_name("ddp_worker.py")
    launch("torchrun", str(worker), str(tmp_path), env={"ACCELERATE_USE_CPU": "true"}, timeout=600)
    ranks = read_ranks(tmp_path)
    assert all(r["processes"] == 2 for r in ranks)
    assert ranks[0]["sample_sum"] != ranks[1]["sample_sum"]  # each rank draws its own samples
    assert ranks[0]["checksum"] == ranks[1]["checksum"]  # gradients were all-reduced: same weights
    assert ranks[0]["ema_checksum"] == ranks[1]["ema_checksum"] != ranks[0]["checksum"]  # and the same EMA
    assert ranks[0]["reward_means"] == ranks[1]["reward_means"]  # metrics are over the gathered batch
