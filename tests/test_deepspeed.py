"""Training under DeepSpeed ZeRO stage 2 (accelerate's path, with the shipped deepspeed-zero2.yaml) on two CPU
processes with gloo, checked against the same training under DDP (the shipped ddp.yaml).

A CPU stand-in for GPUs: under a DeepSpeed launch on the CPU, accelerate 1.15 lets DeepSpeed start a
two-process gloo group but counts one process on each rank (it takes no backend of its own without a GPU).
tests/deepspeed_worker.py sets accelerate's process count, index and backend from the process group before
the Accelerator is built; DeepSpeed's engine and ZeRO-2 optimiser then run from the shipped file's settings
as on GPUs. Every run checks that it really ran under ZeRO-2 (the engine, the ZeRO optimiser, stage 2, each
process holding half of the fp32 master weights and of the AdamW moments).

Runs (each ``accelerate launch --num_processes 2``, LOOP on the tiny pipeline, 3 micro-batches per optimiser
step, gradients clipped to training.max_grad_norm=0.5 (their norm is above it), an EMA, an evaluation after
epoch 1 with the EMA swapped in, rank 1's gradient infinite in the first step): DeepSpeed and DDP for 2
epochs; from each one's epoch-1 checkpoint (the epoch-2 one removed) a DeepSpeed and a DDP resume; and LoRA
with rank 1 losing a prompt group to NaN rewards (fewer micro-batches than rank 0) and its loss infinite in
the first step, under DeepSpeed and DDP.
"""

from __future__ import annotations

import importlib.util
import shutil
import sys
from pathlib import Path

import pytest

from loopdiff.training import checkpoint as ckpt
from multiprocess_helpers import (
    EPOCHS,
    assert_checkpoints_close,
    assert_checkpoints_equal,
    assert_metrics_close,
    assert_weights_moved,
    check_full_export,
    check_lora_export,
    launch,
    needs_accelerate,
    read_metrics,
    read_ranks,
    read_state,
    read_weights,
    run_dir,
    untimed,
)

pytestmark = [
    needs_accelerate,
    pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None,
                       reason="deepspeed is not installed (pip install deepspeed, or the test extra)"),
]
WORKER = Path(__file__).with_name("deepspeed_worker.py")
CONFIGS = {"deepspeed": "deepspeed-zero2.yaml", "ddp": "ddp.yaml"}
# ZeRO-2 reduce-scatters the gradients into partitions (after each micro-batch) where DDP all-reduces them once
# per step, and AdamW steps one flat fp32 partition instead of each tensor: the sums differ in the last bits,
# and AdamW, which divides by the gradients' running RMS, turns that into weight differences up to 2.2e-6 here
# (full UNet; 1.5e-6 under LoRA, and 1.6e-5 in a LoRA run without the skipped first step) after 7 steps of
# lr 1e-3. A missing, doubled or stale update moves weights by ~1e-3.
ATOL = 1e-4
MOMENTS_ATOL = 1e-5  # observed up to 5.1e-7


def _launch(backend: str, out: Path, epochs: int, *settings: str) -> str:
    result = launch(CONFIGS[backend], str(WORKER), backend, str(out), str(epochs), *settings)
    return result.stdout + result.stderr


def _assert_zero2(out: Path, steps: int = 8, skipped: int = 1) -> None:
    """The launch ran under DeepSpeed ZeRO-2 as the shipped file and the worker set it up, each process held
    half of the master weights and of the AdamW moments, and DeepSpeed took ``steps`` steps (one per loopdiff
    optimiser step), ``skipped`` of them skipped."""
    ranks = read_ranks(out)
    for rank in ranks:
        assert (rank["distributed_type"], rank["processes"], rank["epoch"]) == ("DEEPSPEED", 2, 2)
        assert (rank["engine"], rank["optimizer"]) == ("DeepSpeedEngine", "DeepSpeedZeroOptimizer")
        assert rank["zero_stage"] == 2
        # the shipped file says "auto": training.max_grad_norm (0.5 in the worker, 1.0 by default) and 1
        assert (rank["gradient_clipping"], rank["gradient_accumulation_steps"]) == (0.5, 1)
        assert rank["moment_numel"] == rank["partition_numel"] < rank["trained_numel"]
    numel, parts = ranks[0]["trained_numel"], [rank["partition_numel"] for rank in ranks]
    assert parts[0] == parts[1] and numel <= sum(parts) < numel + 64  # halves, up to DeepSpeed's alignment padding
    engine_steps = [(rank["engine_steps"], rank["engine_skipped"]) for rank in ranks]
    assert engine_steps[0] == engine_steps[1] == (steps, skipped)


def _resume(root: Path, source: Path, backend: str, *settings: str) -> tuple[Path, str]:
    """Resume ``source`` (a finished 2-epoch run) with ``backend`` from its epoch-1 checkpoint, in the folder
    the run was trained in (``root/work``: the prompt files' paths are part of the run's settings)."""
    work = root / "work"
    shutil.copytree(source, work)
    ckpt.remove_checkpoint(ckpt.checkpoint_dir(run_dir(work), 2))
    log = _launch(backend, work, 2, *settings)
    resumed = root / f"{source.name}_resumed_by_{backend}"
    work.rename(resumed)
    return resumed, log


def _train(root: Path, backend: str, *settings: str) -> tuple[Path, str]:
    work = root / "work"
    log = _launch(backend, work, 2, *settings)
    work.rename(root / backend)
    return root / backend, log


FULL = ("micro=2", "inject=gradient")


@pytest.fixture(scope="module")
def full(tmp_path_factory) -> dict[str, Path]:
    """Full fine-tuning: DeepSpeed and DDP for 2 epochs, each resumed from its epoch-1 checkpoint by both."""
    root = tmp_path_factory.mktemp("full")
    runs = {}
    runs["deepspeed"], _ = _train(root, "deepspeed", *FULL)
    runs["ddp"], _ = _train(root, "ddp", *FULL)
    runs["resumed"], log = _resume(root, runs["deepspeed"], "deepspeed", *FULL)
    runs["resumed_log"] = root / "resumed.log"
    runs["resumed_log"].write_text(log)
    runs["deepspeed_resumed_by_ddp"], _ = _resume(root, runs["deepspeed"], "ddp", *FULL)
    runs["ddp_resumed_by_deepspeed"], _ = _resume(root, runs["ddp"], "deepspeed", *FULL)
    return runs


def test_the_deepspeed_run_is_zero2_and_trains(full) -> None:
    _assert_zero2(full["deepspeed"])
    assert read_ranks(full["ddp"])[0]["engine"] == "DistributedDataParallel"
    metrics = read_metrics(full["deepspeed"])
    assert [m["epoch"] for m in metrics] == [1, 2]
    assert [(m["optimizer_steps"], m["skipped_steps"]) for m in metrics] == [(4, 1), (4, 0)]  # the injected step
    assert all(m["grad_norm"] > 0.5 for m in metrics)  # above training.max_grad_norm: the steps were clipped
    assert_weights_moved(full["deepspeed"])


def test_deepspeed_trains_the_weights_ema_and_optimiser_state_of_ddp(full) -> None:
    for epoch in EPOCHS:  # the partitions are gathered into torch.optim's format: same numbering and groups
        assert read_state(full["deepspeed"], epoch)["ema"]["steps"] == 4 * int(epoch[-1]) - 1  # one step skipped
        assert_checkpoints_close(full["deepspeed"], full["ddp"], epoch, ATOL, MOMENTS_ATOL)
    assert_metrics_close(full["deepspeed"], full["ddp"], ("reward/mean", "loss", "grad_norm", "approx_kl",
                                                           "skipped_steps"))


def test_a_deepspeed_checkpoint_resumes_exactly(full) -> None:
    _assert_zero2(full["resumed"], steps=4, skipped=0)  # the resumed launch trained epoch 2 only
    assert "resuming from epoch 1" in full["resumed_log"].read_text()
    assert_checkpoints_equal(full["resumed"], full["deepspeed"], EPOCHS[1])
    assert [untimed(m) for m in read_metrics(full["resumed"])] == [untimed(m) for m in read_metrics(full["deepspeed"])]


@pytest.mark.parametrize("resumed, reference",
                         [("deepspeed_resumed_by_ddp", "deepspeed"), ("ddp_resumed_by_deepspeed", "ddp")])
def test_ddp_and_deepspeed_resume_each_others_checkpoints(full, resumed, reference) -> None:
    assert_checkpoints_close(full[resumed], full[reference], EPOCHS[1], ATOL, MOMENTS_ATOL)


def test_the_deepspeed_export_is_a_diffusers_pipeline_holding_the_ema(full) -> None:
    check_full_export(full["deepspeed"], full["ddp"], ATOL)


LORA = ("lora=1", "micro=2", "nan_rank1=1", "inject=loss")


@pytest.fixture(scope="module")
def lora(tmp_path_factory) -> dict[str, Path]:
    """LoRA, rank 1 losing a prompt group to NaN rewards in epoch 1 and its loss infinite in the first step:
    DeepSpeed and DDP for 2 epochs."""
    root = tmp_path_factory.mktemp("lora")
    runs = {}
    for backend in ("deepspeed", "ddp"):
        runs[backend], log = _train(root, backend, *LORA)
        runs[f"{backend}_log"] = root / f"{backend}.log"
        runs[f"{backend}_log"].write_text(log)
    return runs


def test_lora_under_deepspeed_with_uneven_micro_batches_and_a_nonfinite_loss_trains_as_ddp(lora) -> None:
    """Rank 1 loses one prompt group (NaN rewards) in epoch 1, so per optimiser step it holds 3 pairs (2
    micro-batches of 2) to rank 0's 6 (3): under ZeRO-2 it pads with a weight-0 backward pass, else both
    hang. Its infinite loss in the first step (with finite gradients) skips that step on both processes."""
    zero, plain = lora["deepspeed"], lora["ddp"]
    _assert_zero2(zero)
    for log in ("deepspeed_log", "ddp_log"):
        assert "non-finite for 4 of 16 images in epoch 1" in lora[log].read_text(), log
    assert [(m["dropped_groups"], m["skipped_steps"]) for m in read_metrics(zero)] == [(1, 1), (0, 0)]
    for epoch in EPOCHS:
        assert all(".lora_" in name for name in read_weights(zero, epoch))  # peft keys, as DDP writes them
        assert_checkpoints_close(zero, plain, epoch, ATOL, MOMENTS_ATOL)
    assert_metrics_close(zero, plain, ("reward/mean", "loss", "grad_norm", "skipped_steps"))
    check_lora_export(zero)


def test_a_deepspeed_launch_on_the_cpu_stops_at_once_without_the_stand_in(tmp_path) -> None:
    """What the stand-in corrects: run as a user would, accelerate counts one process on each rank."""
    run = tmp_path / "run"
    result = launch(CONFIGS["deepspeed"], "-m", "loopdiff.cli", "train", "sampling.num_steps=2",
                    "training.train_denoising_steps=2", "training.samples_per_epoch=8",
                    "reward.name=jpeg_compressibility", f"output.dir={run}",
                    check=False, cwd=tmp_path)
    assert result.returncode != 0
    errors = [line for line in result.stderr.splitlines() if line.startswith("loopdiff train: error:")]
    assert errors, result.stderr[-3000:]
    assert "WORLD_SIZE=2 processes were launched but accelerate runs 1 (accelerate runs DeepSpeed only on GPUs" \
        in errors[0], errors[0]
    assert not (run / "checkpoints").exists()


QUIET_RUN = """
import sys
sys.path.insert(0, {tests!r})
from pathlib import Path
from trainer_helpers import make_trainer
trainer = make_trainer(Path({folder!r}), "loop")
imported = "deepspeed" in sys.modules  # accelerate imported it while the trainer was built
import deepspeed
print(imported, deepspeed.accelerator.get_accelerator()._name)
"""


def test_a_cpu_run_does_not_print_deepspeeds_cpu_notice(tmp_path) -> None:
    import subprocess

    import torch

    if torch.cuda.is_available():
        pytest.skip("DeepSpeed prints the notice only without a CUDA device")
    env = {"OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": ":".join(sys.path), "PATH": "/usr/bin:/bin"}
    plain = subprocess.run([sys.executable, "-c", "import deepspeed"], capture_output=True, text=True, env=env,
                           timeout=300)
    assert "Setting accelerator to CPU" in plain.stderr + plain.stdout  # what the trainer hides
    script = QUIET_RUN.format(tests=str(Path(__file__).parent), folder=str(tmp_path))
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.split()[-2:] == ["True", "cpu"]  # DeepSpeed was imported and chose the CPU all the same
    assert "Setting accelerator to CPU" not in run.stderr + run.stdout
