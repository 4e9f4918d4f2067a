"""Two-process runs for tests/test_multiprocess.py, test_fsdp.py and test_deepspeed.py: launching two processes
(torchrun, or accelerate launch with a shipped config), the reward the workers make NaN on one process, and
reading and comparing what the runs wrote (the FSDP and DeepSpeed workers train the tiny pipeline with LOOP
into ``<out>/run-loop``)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from importlib import resources
from pathlib import Path
from typing import Any, Mapping, Sequence

import pytest
import torch
from safetensors.torch import load_file

import loopdiff as loopdiff_package
from tiny_pipelines import build_tiny_pipeline
from loopdiff.training import checkpoint as ckpt
from loopdiff.training.trainer import Trainer
from trainer_helpers import make_trainer, red_minus_blue

EPOCHS = ("epoch_00001", "epoch_00002")
PACKAGE_DIRS = tuple(dict.fromkeys(str(p) + os.sep for p in (
    Path(loopdiff_package.__file__).parent, Path(loopdiff_package.__file__).resolve().parent)))


def project_frames(stderr: str) -> list[str]:
    """The traceback lines of ``stderr`` in loopdiff's own source files, found by the package's absolute path:
    a checkout or a virtual environment under a folder named ``loopdiff`` is not the project's code."""
    return [line for line in stderr.splitlines()
            if line.lstrip().startswith("File ") and any(folder in line for folder in PACKAGE_DIRS)]


TORCHRUN = Path(sys.executable).with_name("torchrun")
ACCELERATE = Path(sys.executable).with_name("accelerate")
needs_torchrun = pytest.mark.skipif(not TORCHRUN.exists(), reason="torchrun not available")
needs_accelerate = pytest.mark.skipif(not ACCELERATE.exists(), reason="the accelerate command is not available")


def launch(launcher: str, *arguments: str, check: bool = True, cwd: Path | None = None,
           env: Mapping[str, str] | None = None, timeout: float = 900) -> subprocess.CompletedProcess:
    """Two processes running ``arguments`` (a worker script and its arguments, or ``-m loopdiff.cli ...``), one
    thread each: ``torchrun --standalone --nproc_per_node 2 arguments...`` for ``launcher="torchrun"``, else
    ``accelerate launch --config_file <the shipped config named launcher> --num_processes 2 arguments...``.

    The processes see this environment without accelerate's and FSDP's launch variables, offline, with this
    interpreter's import path, and with ``env`` on top; ``check`` asserts that the launch succeeded."""
    environment = {key: value for key, value in os.environ.items() if not key.startswith(("ACCELERATE_", "FSDP_"))}
    environment.update(OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", PYTHONPATH=os.pathsep.join(sys.path), **(env or {}))
    if launcher == "torchrun":
        command = [str(TORCHRUN), "--standalone", "--nproc_per_node", "2", *arguments]
    else:
        config = str(resources.files("loopdiff") / "accelerate_configs" / launcher)
        command = [str(ACCELERATE), "launch", "--config_file", config, "--num_processes", "2", *arguments]
    result = subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=environment, cwd=cwd)
    assert result.returncode == 0 or not check, result.stderr[-4000:]
    return result


class NaNOnRank1:
    """red_minus_blue, NaN for rank 1's first prompt group (K = 4 images) in the first epoch's samples."""

    __name__ = "red_minus_blue"
    trainer = None  # set once the trainer exists: its finished epochs say which epoch is sampled

    def __call__(self, images, prompts, metadata):
        scores = red_minus_blue(images, prompts, metadata)
        if self.trainer.epoch == 0 and os.environ.get("RANK") == "1":
            scores[:4] = float("nan")
        return scores


def worker_arguments(argv: Sequence[str]) -> tuple[str, Path, int, dict[str, str]]:
    """A worker's command line: the backend, the output folder, the number of epochs, then ``key=value`` settings."""
    return argv[1], Path(argv[2]), int(argv[3]), dict(arg.split("=", 1) for arg in argv[4:])


def worker_trainer(out: Path, epochs: int, settings: Mapping[str, str], **training: Any) -> Trainer:
    """The FSDP and DeepSpeed workers' trainer: LOOP on the tiny pipeline for ``epochs`` of 16 samples with an EMA,
    a checkpoint each epoch and an evaluation after epoch 1 (EMA swapped in) and at the end; ``settings``:
    ``lora=1``, ``micro=N`` (training.micro_batch_size), ``nan_rank1=1`` (:class:`NaNOnRank1`); ``training``
    updates the training section."""
    reward = NaNOnRank1() if settings.get("nan_rank1") == "1" else red_minus_blue
    trainer = make_trainer(
        out, "loop", reward=reward,
        model={"lora": settings.get("lora") == "1"},
        training={"epochs": epochs, "samples_per_epoch": 16, "ema_decay": 0.9,
                  "micro_batch_size": int(settings.get("micro", 64)), **training},
        output={"checkpoint_every": 1},
        eval={"max_prompts": 2, "every": 1, "before_training": False},
    )
    reward.trainer = trainer
    return trainer


def read_ranks(out: Path) -> list[dict]:
    """What each process of the run in ``out`` wrote into ``rank<i>.json``."""
    return [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]


def run_dir(out: Path) -> Path:
    return out / "run-loop"


def read_weights(out: Path, epoch: str) -> dict[str, torch.Tensor]:
    return load_file(str(ckpt.checkpoint_dir(run_dir(out), int(epoch[-5:])) / ckpt.WEIGHTS))


def read_state(out: Path, epoch: str) -> dict:
    return torch.load(ckpt.checkpoint_dir(run_dir(out), int(epoch[-5:])) / ckpt.STATE, weights_only=True)


def read_metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir(out) / "metrics.jsonl").read_text().splitlines()]


def untimed(record: dict) -> dict:
    return {key: value for key, value in record.items() if not key.startswith(("time/", "memory/"))}


def assert_close(ours: dict, theirs: dict, atol: float, what: str) -> None:
    assert ours.keys() == theirs.keys(), what
    for name in ours:
        torch.testing.assert_close(ours[name], theirs[name], rtol=0, atol=atol, msg=f"{what}: {name}")


def assert_equal(ours: dict, theirs: dict, what: str) -> None:
    assert ours.keys() == theirs.keys(), what
    for name in ours:
        assert torch.equal(ours[name], theirs[name]), f"{what}: {name}"


def optimizer_moments(saved: dict) -> dict[str, torch.Tensor]:
    """The AdamW state of a checkpoint's training state, by ``<parameter number>.<key>``."""
    return {f"{i}.{key}": value for i, entry in saved["optimizer"]["state"].items() for key, value in entry.items()}


def _groups(saved: dict) -> list[dict]:
    """A checkpoint's AdamW parameter groups, lists as tuples: a run resumed under FSDP saves ``betas`` as the
    list torch's ``set_optimizer_state_dict`` leaves (equal values, tuple elsewhere)."""
    return [{k: tuple(v) if isinstance(v, list) else v for k, v in group.items()}
            for group in saved["optimizer"]["param_groups"]]


def assert_checkpoints_close(ours: Path, theirs: Path, epoch: str, atol: float, moments_atol: float) -> None:
    """The checkpoints of ``epoch`` of two runs hold the same weights and EMA within ``atol``, the same AdamW
    moments within ``moments_atol`` and step counts, and the same parameter groups (the unsharded format)."""
    assert_close(read_weights(ours, epoch), read_weights(theirs, epoch), atol, f"weights {epoch}")
    mine, other = read_state(ours, epoch), read_state(theirs, epoch)
    assert mine["ema"]["steps"] == other["ema"]["steps"], f"EMA steps {epoch}"
    assert_close(mine["ema"]["average"], other["ema"]["average"], atol, f"EMA {epoch}")
    assert _groups(mine) == _groups(other), f"AdamW groups {epoch}"
    assert_close(optimizer_moments(mine), optimizer_moments(other), moments_atol, f"AdamW state {epoch}")


def assert_checkpoints_equal(ours: Path, theirs: Path, epoch: str) -> None:
    """The checkpoints of ``epoch`` of two runs hold bit for bit the same weights, EMA and AdamW state, and the
    first one matches its manifest."""
    assert_equal(read_weights(ours, epoch), read_weights(theirs, epoch), f"weights {epoch}")
    mine, other = read_state(ours, epoch), read_state(theirs, epoch)
    assert_equal(mine["ema"]["average"], other["ema"]["average"], f"EMA {epoch}")
    assert _groups(mine) == _groups(other), f"AdamW groups {epoch}"
    assert_equal(optimizer_moments(mine), optimizer_moments(other), f"AdamW state {epoch}")
    ckpt.verify(ckpt.checkpoint_dir(run_dir(ours), int(epoch[-5:])))


def assert_metrics_close(ours: Path, theirs: Path, keys: tuple[str, ...]) -> None:
    """Every epoch's ``keys`` in the two runs' metrics agree within 1e-4 (relative); so do their evaluations after
    epoch 1 (with the EMA swapped in, between epochs) and at the end."""
    for mine, other in zip(read_metrics(ours), read_metrics(theirs), strict=True):
        for key in keys:
            assert mine[key] == pytest.approx(other[key], rel=1e-4, abs=1e-6), key
    for tag in ("epoch_00001", "final"):
        mine, other = (json.loads((run_dir(out) / "eval" / f"{tag}.json").read_text()) for out in (ours, theirs))
        assert mine["means"] == pytest.approx(other["means"], rel=1e-4), tag


def check_full_export(out: Path, reference: Path, atol: float) -> None:
    """The run's full export loads with diffusers, holds its last EMA exactly, and holds and samples what the
    ``reference`` run's export does (within ``atol`` and 1e-3)."""
    from diffusers import StableDiffusionPipeline

    exported = StableDiffusionPipeline.from_pretrained(run_dir(out) / "final_pipeline", safety_checker=None)
    assert_equal(exported.unet.state_dict(), read_state(out, EPOCHS[1])["ema"]["average"], "exported UNet vs EMA")
    other = StableDiffusionPipeline.from_pretrained(run_dir(reference) / "final_pipeline", safety_checker=None)
    assert_close(exported.unet.state_dict(), other.unet.state_dict(), atol, "export vs the reference's")
    images = [pipe("a red circle", num_inference_steps=3, height=32, width=32, output_type="pt",
                   generator=torch.Generator().manual_seed(0)).images for pipe in (exported, other)]
    assert images[0].shape == (1, 3, 32, 32) and torch.isfinite(images[0]).all()
    torch.testing.assert_close(images[0], images[1], rtol=0, atol=1e-3)


def check_lora_export(out: Path) -> None:
    """The LoRA run trained its adapters (lora_B starts at zero), and its export loads with
    ``load_lora_weights`` into the tiny pipeline as its last EMA, exactly."""
    moved = {k: v for k, v in read_weights(out, EPOCHS[1]).items() if ".lora_B." in k}
    assert moved and all(float(v.abs().max()) > 1e-4 for v in moved.values())
    pipe = build_tiny_pipeline(seed=0)
    pipe.load_lora_weights(run_dir(out) / "final_lora")
    loaded = {k.replace(".default_0.", ".default."): v for k, v in pipe.unet.state_dict().items() if ".lora_" in k}
    assert_equal(loaded, read_state(out, EPOCHS[1])["ema"]["average"], "loaded LoRA vs the EMA")


def assert_weights_moved(out: Path) -> None:
    """After 2 epochs of full fine-tuning nearly every tensor of the UNet moved (AdamW moves it by ~lr a step)."""
    initial = build_tiny_pipeline(seed=0).unet.state_dict()
    final = read_weights(out, EPOCHS[1])
    assert final.keys() == initial.keys()
    moved = sum(float((final[k] - initial[k]).abs().max() > 1e-3) for k in final)
    assert moved > 0.9 * len(final)
