"""Seconds per LOOP epoch for each family the trainer fine-tunes (SD 2, SDXL, SD3, Flux), and the trainer's
overhead over the bare denoiser and VAE calls of the same shapes.

    python bench/families.py                          # the four families at 1/32 width, 64 px, 10 steps (CPU)
    python bench/families.py --scale 8 --resolution 128 --family sd3
    python bench/families.py --scale 1 --device cuda  # the published architectures at their published settings

Each family's pipeline is its published architecture (bench/_families.py: SD 2 base, SDXL base 1.0, SD3
medium without T5, FLUX.1-dev) with random weights, widths divided by ``--scale``, saved with
``save_pretrained`` and loaded through the trainer's own loading path. At ``--scale 1`` an epoch runs at the
family's published setting (``_families.SETTINGS``: SD 2 at 512 px with 50 DDIM steps and 8 trajectories in
one sampling call, SDXL at 1024 px with LoRA, SD3 at 512 px with 10 SDE steps and LoRA 32 / 64, Flux at 512 px
with 6 SDE steps, embedded guidance 3.5 and LoRA 64 / 128); at any other scale at 64 px and 10 steps unless
``--resolution`` / ``--steps`` say otherwise, with the LoRA rank divided like the widths.
Every epoch is LOOP with K = 4 and the JPEG-compressibility reward.

Figures, as bench/epoch.py measures them in the same process: seconds per epoch (wall and process CPU), the
time inside the epoch's own denoiser forwards, VAE decodes and backward passes (in-epoch factor = epoch /
that), and a bare replay of the same calls at the same shapes on random inputs right after each measured
epoch (replay factor = epoch / replay). The first warm-up epoch's calls are checked against the analytic
plan (bench/_calls.py). Medians over the measured epochs.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from dataclasses import asdict
from pathlib import Path
from typing import Any, Sequence

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _families import FAMILIES, SETTINGS, EpochSetting, save_family_pipeline, trainer_values  # noqa: E402
from _setup import write_prompts  # noqa: E402
from epoch import FACTORS, measure_trainer, quiet_libraries  # noqa: E402

CPU_RESOLUTION = 64
CPU_STEPS = 10


def family_setting(family: str, scale: int, **changes: Any) -> EpochSetting:
    """The family's published epoch at scale 1; at any other scale 64 px and 10 steps, and a LoRA rank divided
    by the scale like the widths it adapts (at least 1, alpha / rank kept); then ``changes``."""
    setting = SETTINGS[family]
    if scale != 1:
        rank = max(1, setting.lora_rank // scale)
        setting = setting.with_changes(resolution=CPU_RESOLUTION, steps=CPU_STEPS, lora_rank=rank,
                                       lora_alpha=setting.lora_alpha * rank / setting.lora_rank)
    return setting.with_changes(**changes)


def build_family_trainer(family: str, scale: int, setting: EpochSetting, scratch: Path, device: str = "cpu",
                         mixed_precision: str = "no"):
    """A Trainer for one family's epoch, on a saved random-weight pipeline of its architecture at ``scale``."""
    from loopdiff.config import config_from_dict
    from loopdiff.training.trainer import Trainer

    folder = save_family_pipeline(scratch / f"{family}-s{scale}-{setting.resolution}px", family, scale,
                                  setting.resolution)
    prompts = write_prompts(scratch, setting.prompts)
    values = trainer_values(family, setting, folder, prompts, scratch / f"run-{family}", device, mixed_precision)
    return Trainer(config_from_dict(values))


def measure_family(family: str, scale: int, setting: EpochSetting, scratch: Path, warmup: int, epochs: int,
                   device: str = "cpu", mixed_precision: str = "no") -> dict[str, Any]:
    trainer = build_family_trainer(family, scale, setting, scratch, device, mixed_precision)
    result = measure_trainer(trainer, warmup, epochs)
    del trainer
    return {"family": family, "scale": scale, "setting": {**asdict(setting), "samples": setting.samples},
            "mixed_precision": mixed_precision, **result,
            "images_per_second": setting.samples / result["seconds"]["epoch"]}


HEADER = (
    f"{'family':<6} {'params':>9} {'trained':>9} {'px':>5} {'steps':>5} {'N':>3} {'s/epoch':>8} {'bare s':>8} "
    f"{'cpu s':>8} {'bare cpu':>8} {'in-epoch':>8} {'replay':>7} {'rep.cpu':>7} {'peakMB':>7}"
)
LEGEND = (
    "params: the denoiser's; trained: what the optimiser updates; s/epoch and bare s: wall seconds of the epoch\n"
    "and of its calls replayed bare; cpu s, bare cpu: the same in process CPU seconds; in-epoch, replay, rep.cpu:\n"
    "overhead factors (epoch / time inside its own calls; epoch / replay, wall and CPU); peak RSS is cumulative"
)


def count(n: int) -> str:
    """A parameter count in 5 characters or so: 432, 12.3k, 865.9M, 2.57G."""
    for unit, size in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= size:
            return f"{n / size:.3g}{unit}" if n < 100 * size else f"{n / size:.0f}{unit}"
    return str(n)


def summary_line(r: dict[str, Any]) -> str:
    s, sec, bare, o = r["setting"], r["seconds"], r["bare_seconds"], r["overhead"]
    return (
        f"{r['family']:<6} {count(r['unet_params']):>9} {count(r['trainable_params']):>9} {s['resolution']:>5} "
        f"{s['steps']:>5} {s['samples']:>3} {sec['epoch']:>8.2f} {bare['total']:>8.2f} {sec['epoch_cpu']:>8.2f} "
        f"{bare['cpu']:>8.2f} {o['in_epoch_wall']:>8.3f} {o['replay_wall']:>7.3f} {o['replay_cpu']:>7.3f} "
        f"{r['peak_rss_mb']:>7.0f}"
    )


def print_family(r: dict[str, Any]) -> None:
    s, c, sec, bare = r["setting"], r["calls"], r["seconds"], r["bare_seconds"]
    lora = f"LoRA rank {s['lora_rank']} alpha {s['lora_alpha']}" if s["lora"] else "full fine-tuning"
    print(f"\n{r['family']} at 1/{r['scale']} width: {s['resolution']} px ({r['latent_size']}x{r['latent_size']} "
          f"latents), {s['prompts']} prompts x K={s['k']}, {s['steps']} steps, guidance {s['guidance']}, "
          f"eta / noise level {s['eta']}, sampling calls of {s['sampling_batch']}, micro-batch {s['micro_batch']}, "
          f"{lora}{', gradient checkpointing' if s['gradient_checkpointing'] else ''}, "
          f"mixed precision {r['mixed_precision']}")
    print(f"  calls per epoch: {c['sampling_calls']} sampling ({c['sampling_rows']} rows), {c['decode_calls']} "
          f"VAE decode, {c['training_calls']} training fwd+bwd ({c['training_rows']} rows), {c['optimizer_steps']} "
          f"optimiser steps; trainer matches plan: "
          f"{'yes' if not r['plan_mismatches'] else 'NO: ' + '; '.join(r['plan_mismatches'])}")
    phases = "  ".join(f"{phase} {sec[phase]:.3f}/{bare[phase]:.3f}" for phase in ("sampling", "decoding", "training"))
    print(f"  phase s/epoch / bare s: {phases}  (other {sec['other']:.3f}, reward wait {sec['reward_wait']:.3f})")
    for key in FACTORS:
        per_epoch = ", ".join(f"{f:.3f}" for f in r["overhead_per_epoch"][key])
        print(f"  {key:<14} {r['overhead'][key]:.3f}  [{per_epoch}]")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--family", default=",".join(FAMILIES), help="comma-separated, of: " + ", ".join(FAMILIES))
    parser.add_argument("--scale", type=int, default=32,
                        help="divide widths (and deep layer counts) by this; 1 is the published architecture")
    parser.add_argument("--resolution", type=int, help="pixels (default: the setting's at --scale 1, else 64)")
    parser.add_argument("--steps", type=int, help="sampling steps (default: the setting's at --scale 1, else 10)")
    parser.add_argument("--prompts", type=int, help="prompts per epoch (default 2)")
    parser.add_argument("--k", type=int, help="samples per prompt (default 4)")
    parser.add_argument("--sampling-batch", type=int, help="trajectories per sampling call (default: the setting's)")
    parser.add_argument("--micro-batch", type=int,
                        help="(sample, step) pairs per training call (default: the setting's)")
    parser.add_argument("--epochs", type=int, default=2, help="measured epochs (default 2)")
    parser.add_argument("--warmup", type=int, default=1, help="warm-up epochs (default 1)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--mixed-precision", choices=("no", "fp16", "bf16"),
                        help="default: bf16 on a CUDA device, no elsewhere")
    parser.add_argument("--json", type=Path, help="write every figure to this JSON file")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> list[dict[str, Any]]:
    args = parse_args(argv)
    import torch

    families = [f.strip() for f in args.family.split(",") if f.strip()]
    unknown = [f for f in families if f not in FAMILIES]
    if unknown:
        raise SystemExit(f"--family {','.join(unknown)}: allowed {', '.join(FAMILIES)}")
    quiet_libraries()
    torch.set_num_threads(args.threads)
    precision = args.mixed_precision or ("bf16" if args.device.startswith("cuda") else "no")
    changes = dict(resolution=args.resolution, steps=args.steps, prompts=args.prompts, k=args.k,
                   sampling_batch=args.sampling_batch, micro_batch=args.micro_batch)
    print(f"torch {torch.__version__}, {args.threads} thread(s), device {args.device}; random weights, "
          f"widths / {args.scale}; {args.warmup} warm-up + {args.epochs} measured epochs per family", flush=True)
    results = []
    with tempfile.TemporaryDirectory(prefix="loopdiff-families-") as tmp:
        for family in families:
            setting = family_setting(family, args.scale, **changes)
            result = measure_family(family, args.scale, setting, Path(tmp), args.warmup, args.epochs, args.device,
                                    precision)
            print_family(result)
            results.append(result)
    print(f"\n{HEADER}")
    for result in results:
        print(summary_line(result))
    print(LEGEND)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=1))
    return results


if __name__ == "__main__":
    main()
