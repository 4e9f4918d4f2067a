"""The study's variance measurement: every listed estimator's gradient noise and signal at the base model,
from one shared set of score gradients (``loopdiff.diagnostics.estimator_variance``), and the check of the
leave-one-out baseline against its ``K/(K-1)`` prediction."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from loopdiff.diagnostics.gradient_noise import drawn_prompts
from loopdiff.diagnostics.estimator_variance import loo_noise_prediction, noise_table, score_gradients
from loopdiff.estimators import estimator_from_preset
from loopdiff.study.spec import VarianceSpec


def loo_check(rows: list[dict[str, Any]]) -> list[dict[str, float]]:
    """Measured leave-one-out noise per sample at each K against the ``K/(K-1)`` prediction, relative to the
    largest K measured (score-function leave-one-out estimators only, i.e. RLOO)."""
    loo = {int(r["k"]): float(r["noise_per_sample"]) for r in rows if r["advantage"] == "leave_one_out"
           and r["loss"] == "score_function"}
    if len(loo) < 2:
        return []
    ref = max(loo)
    return [{"k": k, "measured_ratio": loo[k] / loo[ref], "predicted_ratio": loo_noise_prediction(k, ref),
             "reference_k": ref} for k in sorted(loo)]


def measure_variance(trainer: Any, spec: VarianceSpec, path: Path) -> dict[str, Any]:
    """Score gradients at the trainer's (base) model on ``spec.groups`` training prompts, each estimator's
    noise and signal on them; writes ``path`` (JSON) and returns the record."""
    estimators = {name: estimator_from_preset(**dict(entry.overrides)) for name, entry in spec.estimators.items()}
    k_max = max(e.samples_per_prompt for e in estimators.values())
    prompts = drawn_prompts(trainer.train_prompts, spec.groups, spec.seed)
    t0 = time.perf_counter()
    with tqdm(total=spec.groups * k_max, desc="score gradients", leave=False) as bar:
        samples = score_gradients(
            trainer.train_policy, trainer.encoder, trainer.pipeline.vae, prompts, trainer.reward_fn, k_max,
            trainer.config.training.train_denoising_steps, spec.seed, progress=lambda n: bar.update(1),
        )
    seconds = time.perf_counter() - t0
    rows = noise_table(list(estimators.values()), samples, spec.batch)
    for (name, entry), est, row in zip(spec.estimators.items(), estimators.values(), rows):
        row.update(name=name, label=entry.label, advantage=est.advantage, loss=est.loss)
    record = {
        "groups": spec.groups, "samples_per_prompt": k_max, "batch": spec.batch, "seed": spec.seed,
        "reward": trainer.reward_name, "parameters": int(samples.scores.shape[1]),
        "reward_mean": float(samples.rewards.mean()), "reward_std": float(samples.rewards.std()),
        "score_gradient_seconds": seconds, "estimators": rows, "loo_check": loo_check(rows),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=1, default=float))
    return record
