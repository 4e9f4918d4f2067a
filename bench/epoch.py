"""Seconds per training epoch of loopdiff, split by phase, against the bare network calls the epoch needs.

    python bench/epoch.py                      # default pipeline, 2 warm-up + 3 measured epochs, scaling table
    python bench/epoch.py --threads 1 --scaling none --epochs 2 --json out.json
    python bench/epoch.py --config embedded-color --json bench/results/world-cost.json   # a packaged job's epoch

Default epoch: 8 prompts x K = 4 trajectories, 20 DDIM steps, guidance 5, timestep fraction 1.0, LOOP
preset, JPEG-compressibility reward, full fine-tuning in float32.

The overhead factor is the epoch's time divided by the time its UNet and VAE calls need, measured two ways
in the same process: (in-epoch) the time spent inside the epoch's own calls and backward passes, timed by
hooks; (replay) the same calls, same batch shapes, replayed bare right after each measured epoch. 1.0 would
mean the trainer adds nothing around the network. Each is given in wall and in process CPU time (the latter
is steadier on a machine shared with other jobs). All figures are medians over the measured epochs.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Sequence

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _calls import (  # noqa: E402
    BareTimes,
    CallShape,
    EpochShape,
    ObservedCalls,
    bare_epoch_seconds,
    epoch_plan,
    observe_calls,
)
from _memory import peak_rss_mb  # noqa: E402
from _setup import BenchSetup, build_trainer, default_pipeline_folder, save_bench_pipeline  # noqa: E402

PHASES = ("sampling", "decoding", "reward", "reward_wait", "advantages", "training", "other")
OVERHEAD_TARGET = 1.15


class TimedReward:
    """Wraps a reward function and adds up the seconds spent inside it (it may run in a worker thread)."""

    def __init__(self, reward_fn):
        self.reward_fn = reward_fn
        self.seconds = 0.0

    def __call__(self, images, prompts, metadata):
        start = time.perf_counter()
        try:
            return self.reward_fn(images, prompts, metadata)
        finally:
            self.seconds += time.perf_counter() - start


def plan_mismatches(seen: ObservedCalls, shape: EpochShape) -> list[str]:
    """Differences between the calls a trainer epoch made and the analytic plan (empty when they agree)."""
    plan = epoch_plan(shape)
    problems = []
    if seen.unet_no_grad != plan.sampling:
        problems.append(f"sampling UNet calls {seen.unet_no_grad} != plan {plan.sampling}")
    if seen.unet_grad != plan.training_calls:
        problems.append(f"training UNet calls {seen.unet_grad} != plan {plan.training_calls}")
    if seen.decoder != plan.decoding:
        problems.append(f"VAE decoder calls {seen.decoder} != plan {plan.decoding}")
    return problems


def _epoch_phases(metrics: dict[str, float], reward_seconds: float) -> dict[str, float]:
    phases = {
        "sampling": metrics["time/sampling"],
        "decoding": metrics["time/decoding"],
        "reward": reward_seconds,
        "reward_wait": metrics["time/reward_wait"],
        "advantages": metrics["time/advantages"],
        "training": metrics["time/training"],
    }
    accounted = sum(v for k, v in phases.items() if k != "reward")  # the reward overlaps (worker thread)
    phases["other"] = metrics["time/epoch"] - accounted
    phases["epoch"] = metrics["time/epoch"]
    return phases


FACTORS = {
    "in_epoch_wall": "epoch wall time / wall time inside its own UNet+VAE calls and backward passes",
    "in_epoch_cpu": "the same in process CPU time",
    "replay_wall": "epoch wall time / the same calls replayed bare right after the epoch",
    "replay_cpu": "the same in process CPU time",
}


def _factors(phases: dict[str, float], inside, bare: BareTimes) -> dict[str, float]:
    return {
        "in_epoch_wall": phases["epoch"] / inside.wall,
        "in_epoch_cpu": phases["epoch_cpu"] / inside.cpu,
        "replay_wall": phases["epoch"] / bare.total,
        "replay_cpu": phases["epoch_cpu"] / bare.cpu,
    }


def measure_setup(
    setup: BenchSetup, pipeline: Path, scratch: Path, warmup: int, epochs: int, device: str = "cpu"
) -> dict[str, Any]:
    """Warm up, then alternate measured trainer epochs (their network calls timed from inside) with bare
    replays of those calls; every figure is a median over the measured epochs."""
    if epochs < 1 or warmup < 1:
        raise ValueError(f"epochs={epochs} and warmup={warmup} must both be >= 1")
    trainer = build_trainer(setup, pipeline, scratch, device)
    result = measure_trainer(trainer, warmup, epochs)
    return {"setup": {**asdict(setup), "samples": setup.samples}, "pipeline": str(pipeline), **result,
            "images_per_second": setup.samples / result["seconds"]["epoch"]}


def measure_config(
    name: str, scratch: Path, warmup: int, epochs: int, device: str = "cpu", overrides: Sequence[str] = ()
) -> dict[str, Any]:
    """``measure_trainer`` on the epoch of a packaged (or given) config, exactly as ``loopdiff train`` runs it:
    its model, sampler, estimator, reward and batch sizes; evaluation, progress bars and logs off."""
    from loopdiff.cli import resolve_config
    from loopdiff.config import load_config
    from loopdiff.training.trainer import Trainer

    quiet = [f"output.dir={scratch / 'run'}", "output.progress=false", "output.tensorboard=false",
             "eval.max_prompts=0", f"model.device={device}", "training.epochs=1000000"]
    config = load_config(resolve_config(name), [*overrides, *quiet])
    result = measure_trainer(Trainer(config), warmup, epochs)
    samples = config.training.samples_per_epoch
    return {"config": name, "overrides": list(overrides), "samples_per_epoch": samples,
            "num_steps": config.sampling.num_steps, "train_denoising_steps": config.training.train_denoising_steps,
            "reward": config.reward.name, **result, "images_per_second": samples / result["seconds"]["epoch"],
            "ms_per_sample": 1000 * result["seconds"]["epoch"] / samples}


def print_config_report(result: dict[str, Any]) -> None:
    sec, bare = result["seconds"], result["bare_seconds"]
    print(f"config {result['config']}: {result['samples_per_epoch']} samples x {result['num_steps']} steps "
          f"({result['train_denoising_steps'] or 'all'} trained), reward {result['reward']}, UNet "
          f"{result['unet_params'] / 1e6:.2f} M params, {result['latent_size']}x{result['latent_size']} latents")
    print(f"{'phase':<12} {'s/epoch':>8}")
    for phase in PHASES:
        print(f"{phase:<12} {sec[phase]:>8.3f}")
    print(f"{'epoch':<12} {sec['epoch']:>8.3f}   bare calls {bare['total']:.3f} s; per epoch "
          f"[{', '.join(f'{s:.3f}' for s in result['seconds_per_epoch_all'])}]")
    print(f"ms per sample: {result['ms_per_sample']:.1f}   (sampling with log-probabilities, the trained steps' "
          f"forward and backward, decoding and the reward)")


def measure_trainer(trainer, warmup: int, epochs: int) -> dict[str, Any]:
    """``measure_setup``'s measurement on a built trainer (any family: UNet, SD3 or Flux transformer): the first
    warm-up epoch's calls checked against the plan, then per measured epoch its phases, the time inside its
    own calls and a bare replay of them."""
    trainer.reward_fn = timed = TimedReward(trainer.reward_fn)
    unet, vae = trainer.unet, trainer.pipeline.vae
    shape = EpochShape.from_trainer(trainer)
    plan = epoch_plan(shape)
    call_shape = CallShape.from_trainer(trainer)
    with observe_calls(unet, vae) as seen:  # warm-up epoch 0, calls counted
        trainer.run_epoch(0)
    mismatches = plan_mismatches(seen, shape)
    for epoch in range(1, warmup):
        trainer.run_epoch(epoch)  # the warm-up epochs also warm the bare calls: same modules, same shapes

    epoch_phases, bare, factors = [], [], []
    for epoch in range(warmup, warmup + epochs):
        timed.seconds = 0.0
        cpu_start = time.process_time()
        with observe_calls(unet, vae, trainer.accelerator) as inside:
            metrics = trainer.run_epoch(epoch)
        phases = _epoch_phases(metrics, timed.seconds)
        phases["epoch_cpu"] = time.process_time() - cpu_start
        phases["inside_calls"], phases["inside_calls_cpu"] = inside.wall, inside.cpu
        autocast = trainer.accelerator.autocast  # the trainer's denoiser calls run under it (mixed precision)
        bare.append(bare_epoch_seconds(unet, vae, plan, call_shape, seed=epoch, autocast=autocast))
        epoch_phases.append(phases)
        factors.append(_factors(phases, inside, bare[-1]))

    median = {key: statistics.median(p[key] for p in epoch_phases) for key in epoch_phases[0]}
    bare_keys = ("sampling", "decoding", "training", "total", "cpu")
    return {
        "unet_params": sum(p.numel() for p in unet.parameters()),
        "trainable_params": sum(p.numel() for p in trainer.params),
        "latent_size": call_shape.latent[1],
        "calls": plan.summary(),
        "plan_mismatches": mismatches,
        "seconds": median,
        "seconds_per_epoch_all": [p["epoch"] for p in epoch_phases],
        "cpu_seconds_per_epoch_all": [p["epoch_cpu"] for p in epoch_phases],
        "bare_seconds": {key: statistics.median(getattr(b, key) for b in bare) for key in bare_keys},
        "overhead": {key: statistics.median(f[key] for f in factors) for key in FACTORS},
        "overhead_per_epoch": {key: [f[key] for f in factors] for key in FACTORS},
        "peak_rss_mb": peak_rss_mb(),
    }


# ---------------------------------------------------------------- scaling table

GRID_STEPS = 10  # the scaling table's base has 10 steps, to keep the whole table within a few minutes
SCALING_ROWS: dict[str, list[tuple[str, dict[str, Any]]]] = {
    "none": [],
    "quick": [("base (10 steps)", {}), ("K=2", {"k": 2}), ("latent 4x4 (32 px)", {"latent": 4})],
    "full": [
        ("base (10 steps)", {}),
        ("K=2", {"k": 2}),
        ("K=8", {"k": 8}),
        ("prompts=4", {"prompts": 4}),
        ("steps=20", {"steps": 20}),
        ("latent 4x4 (32 px)", {"latent": 4}),
        ("latent 16x16 (128 px)", {"latent": 16}),
        ("micro-batch 32", {"micro_batch": 32}),
        ("micro-batch 160", {"micro_batch": 160}),
        ("classic attention", {"attention": "classic"}),
    ],
}


def scaling_table(
    base: BenchSetup, pipeline: Path, scratch: Path, rows: Sequence[tuple[str, dict[str, Any]]], device: str
) -> list[dict[str, Any]]:
    """One warm-up and one measured epoch per row; each row changes one thing of the base setup."""
    results = []
    for label, change in rows:
        change = dict(change)
        latent = change.pop("latent", None)
        folder = pipeline if latent is None else save_bench_pipeline(scratch / f"pipeline-l{latent}", latent)
        setup = base.with_changes(**change)
        row_scratch = scratch / f"row-{len(results)}"
        result = measure_setup(setup, folder, row_scratch, warmup=1, epochs=1, device=device)
        result["label"] = label
        results.append(result)
        print(_scaling_line(result), flush=True)
    return results


def _scaling_line(r: dict[str, Any]) -> str:
    s, o = r["setup"], r["overhead"]
    return (
        f"{r['label']:<22} {s['samples']:>4} {s['steps']:>5} {r['latent_size']:>6} {s['micro_batch']:>5}"
        f" {r['seconds']['epoch']:>8.2f} {r['seconds']['epoch_cpu']:>7.2f} {r['bare_seconds']['cpu']:>7.2f}"
        f" {o['in_epoch_wall']:>8.3f} {o['replay_cpu']:>7.3f} {r['images_per_second']:>6.2f} {r['peak_rss_mb']:>7.0f}"
    )


SCALING_HEADER = (
    f"{'row':<22} {'N':>4} {'steps':>5} {'latent':>6} {'micro':>5} {'s/epoch':>8} {'cpu s':>7} {'bare':>7}"
    f" {'in-epoch':>8} {'replay':>7} {'img/s':>6} {'peakMB':>7}\n"
    f"{'':<42}{'wall':>8} {'CPU seconds':-^15} {'overhead factor':-^16}  (peak RSS is cumulative)"
)


# ---------------------------------------------------------------- report


def print_report(result: dict[str, Any]) -> None:
    s, sec, bare = result["setup"], result["seconds"], result["bare_seconds"]
    print(f"pipeline: {result['pipeline']}  (UNet {result['unet_params'] / 1e6:.2f} M params, "
          f"{result['latent_size']}x{result['latent_size']} latents)")
    print(f"epoch: {s['prompts']} prompts x K={s['k']} = {s['samples']} trajectories, {s['steps']} steps, "
          f"guidance {s['guidance']}, timestep fraction {s['timestep_fraction']}, preset {s['preset']}, "
          f"reward {s['reward']}, micro-batch {s['micro_batch']}, attention {s['attention']}"
          f"{', gradient checkpointing' if s.get('gradient_checkpointing') else ''}")
    c = result["calls"]
    print(f"calls per epoch: {c['sampling_calls']} sampling UNet ({c['sampling_rows']} rows), "
          f"{c['decode_calls']} VAE decode, {c['training_calls']} training UNet fwd+bwd ({c['training_rows']} rows), "
          f"{c['optimizer_steps']} optimiser steps; trainer matches plan: "
          f"{'yes' if not result['plan_mismatches'] else 'NO: ' + '; '.join(result['plan_mismatches'])}")
    print(f"\n{'phase':<12} {'s/epoch':>8} {'bare s':>8} {'ratio':>6}")
    for phase in PHASES:
        if phase in bare:
            print(f"{phase:<12} {sec[phase]:>8.3f} {bare[phase]:>8.3f} {sec[phase] / bare[phase]:>6.3f}")
        else:
            note = "   (in a worker thread, overlaps sampling)" if phase == "reward" else ""
            print(f"{phase:<12} {sec[phase]:>8.3f}{note}")
    print(f"{'epoch':<12} {sec['epoch']:>8.3f} {bare['total']:>8.3f} {sec['epoch'] / bare['total']:>6.3f}")
    print(f"{'epoch (cpu)':<12} {sec['epoch_cpu']:>8.3f} {bare['cpu']:>8.3f} {sec['epoch_cpu'] / bare['cpu']:>6.3f}"
          f"   (process CPU seconds, all threads)")
    print(f"inside the epoch's own network calls: {sec['inside_calls']:.3f} s wall, {sec['inside_calls_cpu']:.3f} s CPU")
    print(f"\noverhead factors (median of per-epoch ratios; target <= {OVERHEAD_TARGET}):")
    for key, meaning in FACTORS.items():
        factor, per_epoch = result["overhead"][key], result["overhead_per_epoch"][key]
        print(f"  {key:<14} {factor:.3f} {'met' if factor <= OVERHEAD_TARGET else 'NOT met':<7} "
              f"[{', '.join(f'{f:.3f}' for f in per_epoch)}]  {meaning}")
    print(f"images per second: {result['images_per_second']:.2f}   peak RSS: {result['peak_rss_mb']:.0f} MB")


def quiet_libraries() -> None:
    """No progress bars or info logs from diffusers/transformers while timing."""
    import diffusers
    import transformers

    for library in (diffusers, transformers):
        library.utils.logging.set_verbosity_error()
        library.utils.logging.disable_progress_bar()


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pipeline", help="pipeline folder (default: embedded weights, else a random-weight "
                        "pipeline of the embedded architecture)")
    parser.add_argument("--epochs", type=int, default=3, help="measured epochs (default 3)")
    parser.add_argument("--warmup", type=int, default=2, help="warm-up epochs (default 2)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    parser.add_argument("--scaling", choices=tuple(SCALING_ROWS), default="full", help="scaling table rows")
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--k", type=int, default=4, help="samples per prompt")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--micro-batch", type=int, default=64, help="(sample, step) pairs per training call")
    parser.add_argument("--attention", choices=("default", "classic"), default="default",
                        help="UNet attention processors: diffusers' default (SDPA) or the classic matmul one")
    parser.add_argument("--gradient-checkpointing", action="store_true",
                        help="recompute UNet activations in the backward pass (less memory, more compute)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--config", help="measure this packaged config's (or config file's) epoch instead")
    parser.add_argument("--override", nargs="*", default=[], help="section.field=value changes to --config")
    parser.add_argument("--json", type=Path, help="write every figure to this JSON file")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    import torch

    quiet_libraries()
    torch.set_num_threads(args.threads)
    setup = BenchSetup(prompts=args.prompts, k=args.k, steps=args.steps, micro_batch=args.micro_batch,
                       attention=args.attention, gradient_checkpointing=args.gradient_checkpointing)
    with tempfile.TemporaryDirectory(prefix="loopdiff-bench-") as tmp:
        scratch = Path(tmp)
        if args.config:
            print(f"torch {torch.__version__}, {args.threads} thread(s); config {args.config}", flush=True)
            result = measure_config(args.config, scratch, args.warmup, args.epochs, args.device, args.override)
            result["threads"] = args.threads
            print_config_report(result)
            return _write_json(result, args.json)
        if args.pipeline:
            pipeline, description = Path(args.pipeline), "given folder"
        else:
            pipeline, description = default_pipeline_folder(scratch)
        print(f"torch {torch.__version__}, {args.threads} thread(s); pipeline: {description}", flush=True)
        result = measure_setup(setup, pipeline, scratch / "main", args.warmup, args.epochs, args.device)
        result["threads"] = args.threads
        result["pipeline_description"] = description
        print_report(result)
        rows = SCALING_ROWS[args.scaling]
        if rows:
            print(f"\nscaling (one change per row from a {GRID_STEPS}-step base; 1 warm-up + 1 measured epoch each)"
                  f"\n{SCALING_HEADER}", flush=True)
            grid_base = setup.with_changes(steps=GRID_STEPS)
            result["scaling"] = scaling_table(grid_base, pipeline, scratch, rows, args.device)
    return _write_json(result, args.json)


def _write_json(result: dict[str, Any], path: Path | None) -> dict[str, Any]:
    if path:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(result, indent=1) + "\n")
    return result


if __name__ == "__main__":
    main()
