"""The benchmark's bookkeeping: its call plan is the calls a trainer epoch really makes, and its bare replay
makes exactly those calls and nothing else (no timing is asserted anywhere)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from trainer_helpers import make_trainer

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

from _calls import EpochShape, bare_epoch_seconds, epoch_plan, observe_calls, text_context_shape  # noqa: E402
from epoch import plan_mismatches  # noqa: E402

# 12 samples (3 prompts x K=4), 3 steps, sampling chunks of 8, 2 of 3 steps trained (round(3 x 0.67) = 2),
# 2 inner epochs of 3 optimiser steps, micro-batches of at most 5 pairs.
UNEVEN = {
    "sampling": {"num_steps": 3, "batch_size": 8},
    "training": {"samples_per_epoch": 12, "timestep_fraction": 0.67, "micro_batch_size": 5},
    "estimator": {"minibatches": 3, "inner_epochs": 2},
}
UNGUIDED = {
    "sampling": {"num_steps": 2, "batch_size": 16, "guidance_scale": 1.0},
    "training": {"samples_per_epoch": 8, "micro_batch_size": 64},
}


def test_plan_of_uneven_epoch_matches_hand_count():
    shape = EpochShape(samples=12, num_steps=3, sampling_chunk=8, timestep_fraction=0.67, inner_epochs=2,
                       minibatches=3, micro_batch_size=5)
    plan = epoch_plan(shape)
    # chunk of 8 then 4 trajectories, 3 steps each, both guidance branches per call
    assert plan.sampling == [16, 16, 16, 8, 8, 8]
    assert plan.decoding == [8, 4]
    # 12 x 2 = 24 pairs per inner epoch -> 3 steps of 8 pairs -> micro-batches of 5 and 3 pairs (x2 rows)
    assert plan.training == [[10, 6]] * 6
    assert plan.summary() == {"sampling_calls": 6, "sampling_rows": 72, "decode_calls": 2, "decode_rows": 12,
                              "training_calls": 12, "training_rows": 96, "optimizer_steps": 6}


@pytest.mark.parametrize(
    "samples, steps, chunk, fraction, inner, minibatches, micro, guided",
    [(32, 20, 32, 1.0, 1, 4, 64, True), (40, 7, 12, 0.5, 3, 5, 9, True), (96, 5, 100, 0.3, 1, 7, 13, False)],
)
def test_plan_totals_match_closed_forms(samples, steps, chunk, fraction, inner, minibatches, micro, guided):
    plan = epoch_plan(EpochShape(samples, steps, chunk, guided, fraction, inner, minibatches, micro))
    branches = 2 if guided else 1
    kept = max(1, round(steps * fraction))
    assert sum(plan.sampling) == branches * samples * steps
    assert sum(plan.decoding) == samples
    assert sum(plan.training_calls) == branches * samples * kept * inner
    assert len(plan.training) == minibatches * inner
    assert max(plan.training_calls) <= branches * micro
    assert max(plan.sampling) <= branches * min(chunk, 64)  # sample_trajectories caps a call at 64 trajectories
    step_rows = [sum(step) for step in plan.training]
    assert max(step_rows) - min(step_rows) <= branches  # optimiser steps differ by at most one pair


@pytest.mark.parametrize("sections", [UNEVEN, UNGUIDED], ids=["uneven-guided", "unguided"])
def test_trainer_epoch_makes_exactly_the_planned_calls(tmp_path: Path, sections):
    torch.manual_seed(0)
    trainer = make_trainer(tmp_path, "loop", **sections)
    shape = EpochShape.from_trainer(trainer)
    vae = trainer.pipeline.vae
    with observe_calls(trainer.unet, vae, trainer.accelerator) as seen:
        metrics = trainer.run_epoch(0)
    plan = epoch_plan(shape)
    assert 0 < seen.wall <= metrics["time/epoch"]  # time inside the calls is part of the epoch
    assert "decode" not in vars(vae) and "backward" not in vars(trainer.accelerator)  # wrappers removed
    assert seen.unet_no_grad == plan.sampling
    assert seen.unet_grad == plan.training_calls
    assert seen.decoder == plan.decoding
    assert metrics["optimizer_steps"] == len(plan.training)
    assert plan_mismatches(seen, shape) == []
    wrong = EpochShape(**{**shape.__dict__, "minibatches": shape.minibatches + 1})
    assert any("training" in problem for problem in plan_mismatches(seen, wrong))


def test_bare_replay_makes_the_planned_calls_and_leaves_the_model_alone(tmp_path: Path):
    trainer = make_trainer(tmp_path, "loop", **UNEVEN)
    plan = epoch_plan(EpochShape.from_trainer(trainer))
    before = {k: v.clone() for k, v in trainer.unet.state_dict().items()}
    trainer.unet.eval()
    with observe_calls(trainer.unet, trainer.pipeline.vae) as seen:
        times = bare_epoch_seconds(trainer.unet, trainer.pipeline.vae, plan, text_context_shape(trainer))
    assert seen.unet_no_grad == plan.sampling
    assert seen.unet_grad == plan.training_calls
    assert seen.decoder == plan.decoding
    assert times.total == pytest.approx(times.sampling + times.decoding + times.training)
    assert not trainer.unet.training  # mode restored
    assert all(p.grad is None for p in trainer.unet.parameters())
    after = trainer.unet.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_peak_memory_of_a_subprocess_is_its_own():
    """A benchmark subprocess must not report its driver's memory (ru_maxrss survives exec on Linux)."""
    import subprocess

    from _memory import peak_rss_mb

    if not Path("/proc/self/status").is_file():
        pytest.skip("needs Linux /proc to read a process's own peak memory")
    ballast = bytearray(256 * 1024 * 1024)  # touched: bytearray zero-fills
    parent = peak_rss_mb()
    child = subprocess.run(
        [sys.executable, "-c", "import sys; sys.path.insert(0, sys.argv[1]); from _memory import peak_rss_mb; "
         "print(peak_rss_mb())", str(Path(__file__).resolve().parents[1] / "bench")],
        capture_output=True, text=True, check=True,
    )
    assert parent >= 256
    assert float(child.stdout) < parent - 200
    del ballast
