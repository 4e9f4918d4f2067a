"""loopdiff against TRL's DDPOTrainer on the same pipeline, prompts, batch, steps, guidance and reward.

    python bench/peer_trl.py                     # loss check, then 1 round of timed epochs per side
    python bench/peer_trl.py --threads 1 --rounds 2 --json out.json

TRL 0.23.1 (the last release with DDPOTrainer) runs in its own virtualenv, ``bench/.venv-trl`` (see
bench/README.md for the commands that create it), through ``bench/_trl_side.py`` in a subprocess; loopdiff runs
``bench/epoch.py`` in a subprocess too, so both sides start from a fresh process and report their own peak
memory. Rounds alternate the sides, so a change in the machine's background load hits both.

1. Same math: stored samples (latents, old log-probabilities, advantages) go through loopdiff's
   ``Trainer.minibatch_loss`` and TRL's ``DDPOTrainer.calculate_loss`` with the same UNet weights; the losses,
   the recomputed log-probabilities and the gradients are compared.
2. Speed: seconds per epoch and peak resident memory of each side, and their ratio. loopdiff runs twice:
   with its default micro-batch (64 (sample, step) pairs per UNet call, stacked across timesteps) and with
   TRL's call shapes (8 pairs per call: TRL trains one timestep of its train batch per call).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any, Sequence

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))

from _setup import BenchSetup, build_trainer, default_pipeline_folder, write_prompts  # noqa: E402
from epoch import quiet_libraries  # noqa: E402

TRL_PYTHON = BENCH / ".venv-trl" / "bin" / "python"
TRL_SIDE = BENCH / "_trl_side.py"
EPOCH_SCRIPT = BENCH / "epoch.py"


# ---------------------------------------------------------------- 1. identical math on stored samples


def _perturb(unet, scale: float, seed: int = 0) -> None:
    """Move every weight by ``scale`` of its tensor's spread, so pi_theta != pi_old and some ratios clip."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in unet.parameters():
            spread = p.std() if p.numel() > 1 else p.abs()
            p.add_(torch.randn(p.shape, generator=generator) * scale * (spread + 1e-8))


def _check_pairs(n_samples: int, n_steps: int, seed: int = 0) -> list:
    """Micro-batches of (sample, step) pairs: mixed random steps, the last step, the first step."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    samples = torch.arange(n_samples)
    mixed = torch.stack([samples, torch.randint(0, n_steps, (n_samples,), generator=generator)], dim=1)
    last = torch.stack([samples, torch.full((n_samples,), n_steps - 1)], dim=1)
    first = torch.stack([samples, torch.zeros(n_samples, dtype=torch.long)], dim=1)
    return [mixed, last, first]


def loopdiff_stored_losses(pipeline: Path, scratch: Path, setup: BenchSetup, perturbation: float) -> dict[str, Any]:
    """Sample with loopdiff, perturb the weights, and compute loopdiff's loss/log-probs/gradients per micro-batch."""
    import torch

    from loopdiff.training.loop import Batch

    trainer = build_trainer(setup, pipeline, scratch)
    trajectories, rewards = trainer.loop.collect(0)[:2]
    batch = Batch(trajectories, rewards, trainer.loop.advantages(rewards, trajectories.group_ids, trajectories.prompt_ids))
    _perturb(trainer.unet, perturbation)
    unet, traj = trainer.unet, trajectories
    stored, ours = [], []
    for micro in _check_pairs(len(traj), traj.log_probs.shape[1]):
        i, j = micro[:, 0], micro[:, 1]
        unet.zero_grad(set_to_none=True)
        out = trainer.loop.minibatch_loss(batch, micro)
        out.loss.backward()
        grad = torch.cat([p.grad.flatten() for p in unet.parameters()])
        with torch.no_grad():
            log_probs = trainer.train_policy.log_prob(
                traj.latents[i, j], traj.latents[i, j + 1], traj.timesteps[j], traj.prompt_embeds[i], trainer.uncond
            )
        stored.append({
            "latents": traj.latents[i, j], "next_latents": traj.latents[i, j + 1], "timesteps": traj.timesteps[j],
            "old_log_probs": traj.log_probs[i, j], "advantages": batch.advantages[i],
            "embeds": traj.prompt_embeds[i], "uncond": trainer.uncond,
        })
        ours.append({"loss": float(out.loss.detach()), "approx_kl": float(out.approx_kl),
                     "clip_fraction": float(out.clip_fraction), "log_probs": log_probs, "grad": grad})
    package = {
        "unet_state": {k: v.detach().clone() for k, v in unet.state_dict().items()},
        "micro_batches": stored,
        "clip_range": trainer.estimator.clip_range,
        "guidance": trainer.config.sampling.guidance_scale,
        "steps": trainer.config.sampling.num_steps,
    }
    return {"package": package, "loopdiff": ours, "timesteps": traj.timesteps.tolist()}


def compare_losses(ours: list[dict[str, Any]], theirs: list[dict[str, Any]]) -> list[dict[str, float]]:
    """Per micro-batch: both losses, |difference|, max |log-prob difference|, relative gradient difference."""
    import torch

    rows = []
    for mine, trl in zip(ours, theirs):
        their_grad = torch.tensor(trl["grad"])
        rows.append({
            "loss_loopdiff": mine["loss"],
            "loss_trl": trl["loss"],
            "loss_abs_diff": abs(mine["loss"] - trl["loss"]),
            "log_prob_max_abs_diff": float((mine["log_probs"] - torch.tensor(trl["log_probs"])).abs().max()),
            "grad_rel_diff": float((mine["grad"] - their_grad).norm() / mine["grad"].norm().clamp(min=1e-30)),
            "grad_norm": float(mine["grad"].norm()),
            "clip_fraction_loopdiff": mine["clip_fraction"],
            "clip_fraction_trl": trl["clip_fraction"],
            "approx_kl_loopdiff": mine["approx_kl"],
            "approx_kl_trl": trl["approx_kl"],
        })
    return rows


def same_math_check(pipeline: Path, scratch: Path, threads: int, perturbation: float) -> list[dict[str, float]]:
    import torch

    setup = BenchSetup(prompts=2, k=4)
    mine = loopdiff_stored_losses(pipeline, scratch / "loss", setup, perturbation)
    stored = scratch / "stored.pt"
    torch.save(mine["package"], stored)
    out = scratch / "trl-loss.json"
    _run([str(TRL_PYTHON), str(TRL_SIDE), "loss", "--pipeline", str(pipeline), "--stored", str(stored),
          "--json", str(out), "--threads", str(threads)])
    return compare_losses(mine["loopdiff"], json.loads(out.read_text())["micro_batches"])


# ---------------------------------------------------------------- 2. seconds per epoch and memory


def _run(command: Sequence[str]) -> None:
    log = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    if log.returncode != 0:
        raise RuntimeError(f"{' '.join(command[:3])} failed ({log.returncode}):\n{log.stderr[-4000:]}")


def run_loopdiff(
    pipeline: Path, out: Path, args: argparse.Namespace, micro_batch: int, checkpointing: bool = False
) -> dict[str, Any]:
    _run([sys.executable, str(EPOCH_SCRIPT), "--pipeline", str(pipeline), "--scaling", "none",
          "--epochs", str(args.epochs), "--warmup", str(args.warmup), "--threads", str(args.threads),
          "--micro-batch", str(micro_batch), "--json", str(out)]
         + (["--gradient-checkpointing"] if checkpointing else []))
    return json.loads(out.read_text())


def run_trl(pipeline: Path, prompts: Path, out: Path, args: argparse.Namespace, setup: BenchSetup) -> dict[str, Any]:
    minibatches = 4  # the LOOP preset's optimiser steps per epoch; TRL gets the same via its train batch
    _run([str(TRL_PYTHON), str(TRL_SIDE), "epochs", "--pipeline", str(pipeline), "--prompts", str(prompts),
          "--samples", str(setup.samples), "--k", str(setup.k), "--steps", str(setup.steps),
          "--guidance", str(setup.guidance), "--train-batch", str(setup.samples // minibatches),
          "--clip-range", str(setup.clip_range), "--timestep-fraction", str(setup.timestep_fraction),
          "--learning-rate", str(setup.learning_rate), "--epochs", str(args.epochs), "--warmup", str(args.warmup),
          "--threads", str(args.threads), "--json", str(out)])
    return json.loads(out.read_text())


def _side_row(name: str, runs: list[dict[str, Any]], sampling_keys: Sequence[str]) -> dict[str, Any]:
    def median(get) -> float:
        return statistics.median(get(r) for r in runs)

    return {
        "name": name,
        "epoch": median(lambda r: r["seconds"]["epoch"]),
        "epoch_cpu": median(lambda r: r["seconds"]["epoch_cpu"]),
        "sampling+decoding": median(lambda r: sum(r["seconds"][k] for k in sampling_keys)),
        "training": median(lambda r: r["seconds"]["training"]),
        "peak_rss_mb": median(lambda r: r["peak_rss_mb"]),
        "images_per_second": median(lambda r: r["images_per_second"]),
        "all_epochs": [s for r in runs for s in r["seconds_per_epoch_all"]],
        "all_epochs_cpu": [s for r in runs for s in r["cpu_seconds_per_epoch_all"]],
    }


def print_speed_table(rows: list[dict[str, Any]], reference: dict[str, Any]) -> None:
    print(f"\n{'side':<38} {'s/epoch':>8} {'sample+dec':>10} {'train':>7} {'img/s':>6} {'x ref':>6} "
          f"{'cpu s':>7} {'x ref':>6} {'peak MB':>8}")
    for row in rows:
        print(f"{row['name']:<38} {row['epoch']:>8.2f} {row['sampling+decoding']:>10.2f} {row['training']:>7.2f} "
              f"{row['images_per_second']:>6.2f} {row['epoch'] / reference['epoch']:>6.2f} "
              f"{row['epoch_cpu']:>7.2f} {row['epoch_cpu'] / reference['epoch_cpu']:>6.2f} {row['peak_rss_mb']:>8.0f}")
    print(f"(wall-clock seconds by phase; 'cpu s' is process CPU time per epoch, steadier on a shared machine; "
          f"x ref = relative to {reference['name']})")


def print_loss_table(rows: list[dict[str, float]], timesteps: Sequence[int] | None = None) -> None:
    print(f"{'micro-batch':<22} {'loss loopdiff':>14} {'loss TRL':>14} {'|diff|':>9} {'max|dlogp|':>10} "
          f"{'grad rel diff':>13} {'clip frac':>10}")
    for label, row in zip(("8 pairs, random steps", "8 pairs, last step", "8 pairs, first step"), rows):
        print(f"{label:<22} {row['loss_loopdiff']:>14.6e} {row['loss_trl']:>14.6e} {row['loss_abs_diff']:>9.1e} "
              f"{row['log_prob_max_abs_diff']:>10.1e} {row['grad_rel_diff']:>13.1e} "
              f"{row['clip_fraction_loopdiff']:>4.2f}/{row['clip_fraction_trl']:.2f}")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pipeline", help="pipeline folder (default as bench/epoch.py)")
    parser.add_argument("--epochs", type=int, default=3, help="measured epochs per side and round")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=1, help="alternating rounds of both sides")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--perturbation", type=float, default=3e-3,
                        help="relative weight change between sampling and the loss check")
    parser.add_argument("--skip-loss-check", action="store_true")
    parser.add_argument("--skip-matched-shapes", action="store_true",
                        help="do not time loopdiff at TRL's call shapes (micro-batch 8)")
    parser.add_argument("--checkpointed-micro-batch", type=int, default=160,
                        help="also time loopdiff with gradient checkpointing at this micro-batch (0: skip)")
    parser.add_argument("--json", type=Path)
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    if not TRL_PYTHON.is_file():
        sys.exit(f"TRL's virtualenv is missing: {TRL_PYTHON} (create it with the commands in bench/README.md)")
    import torch

    quiet_libraries()
    torch.set_num_threads(args.threads)
    setup = BenchSetup()
    result: dict[str, Any] = {"setup": {**setup.__dict__, "samples": setup.samples}, "threads": args.threads}
    with tempfile.TemporaryDirectory(prefix="loopdiff-peer-") as tmp:
        scratch = Path(tmp)
        pipeline, description = (Path(args.pipeline), "given folder") if args.pipeline else default_pipeline_folder(scratch)
        print(f"pipeline: {description} ({pipeline}); {args.threads} thread(s) per side", flush=True)
        if not args.skip_loss_check:
            print("\n1. same stored samples through both losses (weights perturbed after sampling)", flush=True)
            rows = same_math_check(pipeline, scratch, args.threads, args.perturbation)
            print_loss_table(rows)
            result["loss_check"] = rows
        prompts = write_prompts(scratch, setup.prompts)
        runs: dict[str, list[dict[str, Any]]] = {"loopdiff": [], "loopdiff_micro8": [], "loopdiff_ckpt": [], "trl": []}
        ckpt_micro = args.checkpointed_micro_batch
        for round_index in range(args.rounds):
            print(f"\n2. timing round {round_index + 1}/{args.rounds}: loopdiff", flush=True)
            runs["loopdiff"].append(run_loopdiff(pipeline, scratch / f"ld-{round_index}.json", args, setup.micro_batch))
            print("   TRL", flush=True)
            runs["trl"].append(run_trl(pipeline, prompts, scratch / f"trl-{round_index}.json", args, setup))
            if not args.skip_matched_shapes:
                print("   loopdiff at TRL's call shapes (micro-batch 8)", flush=True)
                runs["loopdiff_micro8"].append(run_loopdiff(pipeline, scratch / f"ld8-{round_index}.json", args, 8))
            if ckpt_micro:
                print(f"   loopdiff with gradient checkpointing (micro-batch {ckpt_micro})", flush=True)
                runs["loopdiff_ckpt"].append(
                    run_loopdiff(pipeline, scratch / f"ldc-{round_index}.json", args, ckpt_micro, checkpointing=True)
                )
    loopdiff_keys = ("sampling", "decoding")
    rows = [_side_row("loopdiff (micro-batch 64)", runs["loopdiff"], loopdiff_keys)]
    if runs["loopdiff_micro8"]:
        rows.append(_side_row("loopdiff (micro-batch 8, TRL's shapes)", runs["loopdiff_micro8"], loopdiff_keys))
    if runs["loopdiff_ckpt"]:
        label = f"loopdiff (micro-batch {args.checkpointed_micro_batch}, gradient checkpointing)"
        rows.append(_side_row(label, runs["loopdiff_ckpt"], loopdiff_keys))
    rows.append(_side_row(f"TRL {runs['trl'][0]['versions']['trl']} DDPOTrainer", runs["trl"], ("sampling+decoding",)))
    print(f"\n{setup.prompts} prompts x K={setup.k}, {setup.steps} steps, guidance {setup.guidance}, clip range "
          f"{setup.clip_range}, timestep fraction {setup.timestep_fraction}, JPEG reward, full fine-tuning fp32, "
          f"4 optimiser steps per epoch; medians over {args.rounds} round(s) x {args.epochs} epochs")
    print_speed_table(rows, rows[0])
    factors = {key: statistics.median(r["overhead"][key] for r in runs["loopdiff"]) for key in runs["loopdiff"][0]["overhead"]}
    print("loopdiff's overhead factors: " + ", ".join(f"{key} {value:.3f}" for key, value in factors.items()))
    result.update({"rows": rows, "runs": runs, "trl_versions": runs["trl"][0]["versions"],
                   "ratio_trl_over_loopdiff": rows[-1]["epoch"] / rows[0]["epoch"],
                   "ratio_trl_over_loopdiff_cpu": rows[-1]["epoch_cpu"] / rows[0]["epoch_cpu"]})
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
