"""Does the library compute on the GPU what it computes on the CPU? A tiny pipeline, two trainers, one epoch each.

``compare_devices`` runs one LOOP epoch (sampling with log-probabilities, then one optimiser step) of the same
random-weight tiny pipeline (the embedded architecture, bench/_setup.py) with the same seeds in float32 on the
CPU and on ``device``, TF32 off, and compares the sampled log-probabilities and the weight update (the loss is
reported, not compared: with ratios of 1 and advantages summing to zero it is zero up to rounding).
AdamW's epsilon is set to 1 for this check: the first update is then ``lr * g / (|g| + 1)``, close to
proportional to the gradient, so the update compares gradients (with the default 1e-8 it would be
``lr * sign(g)``, where rounding flips the sign of gradients near zero); the clip range never clips and the
reward (red minus blue intensity) is continuous in the pixels, so rounding cannot switch a term on or off.
Noise is drawn by a CPU generator on both sides, so both sample the same trajectories up to rounding.

``bf16_finite`` runs the same epoch under bf16 mixed precision on ``device`` and checks the loss, the rewards'
advantages and every weight stay finite.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from _gpu_families import fresh_accelerator_state
from _setup import BenchSetup, save_bench_pipeline, trainer_config

#: Tolerances of the fp32 CPU-vs-device check: absolute for the mean log-probabilities, which are O(1);
#: relative (L2) for the weight update. Two CPU attention kernels (classic and SDPA), which differ only in
#: rounding, give 1.2e-7 and 3e-3: the advantages are differences of close rewards, which magnifies rounding.
LOG_PROB_ATOL = 1e-4
UPDATE_RTOL = 1e-2

# A clip range that never clips: rounding cannot move a ratio across the boundary and switch its gradient off.
CHECK_SETUP = BenchSetup(prompts=2, k=2, steps=4, sampling_batch=4, micro_batch=4, clip_range=10.0)


def red_minus_blue(images: torch.Tensor, prompts, metadata) -> torch.Tensor:
    """A reward continuous in the pixels (JPEG sizes are not: a pixel rounding to the next uint8 changes them)."""
    return 100 * (images[:, 0].mean(dim=(1, 2)) - images[:, 2].mean(dim=(1, 2))).float().cpu()


def tiny_trainer(folder: Path, scratch: Path, device: str, mixed_precision: str = "no", setup: BenchSetup = CHECK_SETUP):
    """A trainer of the check's epoch on the saved tiny pipeline: one optimiser step, TF32 off, AdamW epsilon 1,
    a reward continuous in the pixels."""
    from loopdiff.config import config_from_dict
    from loopdiff.training.trainer import Trainer

    values = trainer_config(setup, folder, scratch, device)
    values["model"].update(mixed_precision=mixed_precision, tf32=False)
    values["training"]["adam_eps"] = 1.0
    values["estimator"]["minibatches"] = 1  # one optimiser step
    fresh_accelerator_state()
    return Trainer(config_from_dict(values), reward_fn=red_minus_blue)


def _epoch(trainer) -> dict[str, Any]:
    """One epoch; its metrics, sampled log-probabilities and the weights before and after (on the CPU)."""
    captured = {}
    collect = trainer.loop.collect

    def keep(epoch):
        captured["trajectories"], captured["rewards"], timings = collect(epoch)
        return captured["trajectories"], captured["rewards"], timings

    trainer.loop.collect = keep
    before = [p.detach().float().cpu().clone() for p in trainer.params]
    metrics = trainer.run_epoch(0)
    after = [p.detach().float().cpu() for p in trainer.params]
    return {"metrics": metrics, "log_probs": captured["trajectories"].log_probs.float().cpu(),
            "update": torch.cat([(a - b).flatten() for a, b in zip(after, before)]), "weights": after}


def compare_devices(scratch: Path, device: str) -> dict[str, Any]:
    """fp32 epoch on the CPU and on ``device``; the differences and whether each is within its tolerance."""
    folder = save_bench_pipeline(scratch / "check-pipeline", 8)
    sides = {}
    for side, where in (("cpu", "cpu"), ("device", device)):
        trainer = tiny_trainer(folder, scratch / f"check-{side}", where)
        sides[side] = _epoch(trainer)
        del trainer
    cpu, dev = sides["cpu"], sides["device"]
    log_prob_diff = float((cpu["log_probs"] - dev["log_probs"]).abs().max())
    update_norm = float(cpu["update"].norm())
    update_rel = float((cpu["update"] - dev["update"]).norm()) / max(update_norm, 1e-30)
    return {
        "device": device, "precision": "fp32, TF32 off", "log_probs": int(cpu["log_probs"].numel()),
        "log_prob_max_abs_diff": log_prob_diff, "log_prob_atol": LOG_PROB_ATOL,
        "loss_cpu": cpu["metrics"]["loss"], "loss_device": dev["metrics"]["loss"],  # ~0: advantages sum to 0
        "update_norm": update_norm, "update_rel_diff": update_rel, "update_rtol": UPDATE_RTOL,
        "passed": log_prob_diff <= LOG_PROB_ATOL and update_rel <= UPDATE_RTOL and update_norm > 0,
    }


def bf16_finite(scratch: Path, device: str) -> dict[str, Any]:
    """One bf16 mixed-precision epoch on ``device``: are its loss, log-probabilities and weights finite?"""
    folder = save_bench_pipeline(scratch / "check-pipeline", 8)
    result = _epoch(tiny_trainer(folder, scratch / "check-bf16", device, "bf16"))
    finite = {
        "loss": bool(torch.isfinite(torch.tensor(result["metrics"]["loss"]))),
        "log_probs": bool(torch.isfinite(result["log_probs"]).all()),
        "weights": all(bool(torch.isfinite(w).all()) for w in result["weights"]),
    }
    return {"device": device, "precision": "bf16 mixed", "loss": result["metrics"]["loss"],
            "update_norm": float(result["update"].norm()), "finite": finite, "passed": all(finite.values())}
