"""loopdiff on one GPU: the published architectures at the packaged configs' settings, TRL beside them, and
checks that the GPU computes what the CPU does. One bounded command.

    python bench/gpu.py --json gpu.json                  # on a CUDA GPU (default budget 480 s)
    python bench/gpu.py --tiny --json /tmp/gpu.json      # the same code path on the CPU, in under a minute
    python bench/gpu.py --estimate-memory                # expected memory per packaged config, nothing allocated

Parts, each cut short when its share of ``--budget-s`` is spent (what it has is still written):

1. checks: a tiny pipeline's epoch in fp32 (TF32 off) on the CPU and on the device, same seeds; the sampled
   log-probabilities and one optimiser step's weight update compared to stated tolerances (bench/_gpu_checks.py); the
   same epoch under bf16 mixed precision, checked finite. ``--tiny`` compares the CPU with itself.
2. families: SD 2 base, SDXL base, SD3 medium and FLUX.1-dev (published configs, bench/_families.py; random
   weights built on the device, text encoders cut to two layers with their output shapes kept) at the
   packaged configs' settings (``_families.SETTINGS``), bf16 on CUDA: images per second sampling with
   log-probabilities, seconds per trained sample, peak device memory, and the overhead factors against the
   bare network calls of the same shapes (bench/epoch.py), after one warm-up epoch; one prompt x K = 4 samples
   per epoch. A family whose estimated memory exceeds the device's is skipped; the budget is checked before
   each family (SD 2, SD3, Flux, then SDXL, the costliest). ``--tiny``: widths / 64, 64 px, 2 steps, fp32 on
   the CPU. ``--compile``: with ``model.compile`` (the warm-up epoch then holds the compilation).
3. TRL: TRL's DDPOTrainer on the SD 2 shape at the same settings, when bench/.venv-trl exists
   (bench/peer_trl.py), and its seconds per epoch over loopdiff's. Its training calls have loopdiff's shape
   (TRL's train batch = loopdiff's micro-batch, both guidance branches in one call); TRL then takes one
   optimiser step per train batch, loopdiff its estimator's number per epoch.

The JSON holds every figure; a Markdown table (``--json``'s path with ``.md``) summarises them.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Sequence

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _families import FAMILIES, SETTINGS, save_family_pipeline  # noqa: E402
from _gpu_families import TEXT_LAYERS  # noqa: E402
from _gpu_memory import GIB, TrainingShape, estimate_memory, packaged_estimates  # noqa: E402
from _gpu_report import markdown_report, memory_table  # noqa: E402
from _setup import write_prompts  # noqa: E402
from epoch import quiet_libraries  # noqa: E402
from families import count, family_setting  # noqa: E402
from peer_trl import TRL_PYTHON, TRL_SIDE  # noqa: E402

TINY_SCALE = 64
TINY_CHANGES = dict(resolution=64, steps=2, prompts=1, k=2, sampling_batch=2, micro_batch=2)
# On the GPU: the packaged settings (resolution, steps, K, sampling and micro-batch sizes, LoRA, checkpointing)
# with one prompt per epoch (K = 4 samples), so that all four families fit the default budget.
GPU_CHANGES = dict(prompts=1)
# The cheaper families first: when the budget runs out it cuts the costliest (SDXL at 1024 px).
BUDGET_ORDER = ("sd2", "sd3", "flux", "sdxl")
PART_SHARES = {"checks": 0.15, "families": 0.7, "trl": 0.15}


class Budget:
    """Seconds left overall, handed out to the parts in ``PART_SHARES`` proportions as they start."""

    def __init__(self, seconds: float):
        self.deadline = time.perf_counter() + seconds

    def left(self) -> float:
        return self.deadline - time.perf_counter()

    def part_deadline(self, part: str, remaining_parts: Sequence[str]) -> float:
        share = PART_SHARES[part] / sum(PART_SHARES[p] for p in remaining_parts)
        return time.perf_counter() + max(0.0, self.left()) * share


def run_checks(result: dict[str, Any], args: argparse.Namespace, scratch: Path, deadline: float) -> None:
    from _gpu_checks import bf16_finite, compare_devices

    device = args.device
    checks = result["checks"] = {}
    for name, check in (("fp32_cpu_vs_device", compare_devices), ("bf16_finite", bf16_finite)):
        if time.perf_counter() > deadline:
            checks[name] = {"skipped": "budget spent"}
            continue
        checks[name] = check(scratch, device)
        print(f"check {name}: {'passed' if checks[name]['passed'] else 'FAILED'} {_check_line(checks[name])}",
              flush=True)


def _check_line(check: dict[str, Any]) -> str:
    if "log_prob_max_abs_diff" in check:
        return (f"(max |d log p| {check['log_prob_max_abs_diff']:.1e} <= {check['log_prob_atol']:.0e}, update rel "
                f"{check['update_rel_diff']:.1e} <= {check['update_rtol']:.0e})")
    return f"(finite: {check['finite']})"


def device_memory_gib(device: str) -> float | None:
    import torch

    if device.startswith("cuda"):
        return torch.cuda.get_device_properties(torch.device(device)).total_memory / GIB
    return None


def run_families(result: dict[str, Any], args: argparse.Namespace, scratch: Path, deadline: float) -> None:
    import torch

    from _gpu_families import measure_on_device, reset_peak_memory

    rows = result["families"] = []
    capacity = device_memory_gib(args.device)
    for family in sorted(args.families, key=BUDGET_ORDER.index):
        setting = family_setting(family, args.scale, **(TINY_CHANGES if args.tiny else GPU_CHANGES))
        estimate = estimate_memory(_shape(family, setting, args.precision), args.scale, text_layers=TEXT_LAYERS)
        row: dict[str, Any] = {"family": family, "estimate": estimate}
        if time.perf_counter() > deadline:
            row["skipped"] = "budget spent"
        elif capacity is not None and estimate["total_gib"] > capacity:
            row["skipped"] = f"estimated {estimate['total_gib']:.1f} GiB > the device's {capacity:.1f} GiB"
        else:
            try:
                row.update(measure_on_device(family, args.scale, setting, scratch, args.device, args.precision,
                                             warmup=1, epochs=args.epochs, compile=args.compile))
            except torch.OutOfMemoryError as error:  # the estimate was short: say so, go on with the next
                row["skipped"] = f"out of memory ({str(error).splitlines()[0][:160]})"
            reset_peak_memory(args.device)  # outside the handler: its traceback holds the family's tensors
        rows.append(row)
        print(_family_line(row), flush=True)


def _shape(family: str, setting, precision: str) -> TrainingShape:
    return TrainingShape(family=family, resolution=setting.resolution, lora=setting.lora,
                         lora_rank=setting.lora_rank, lora_alpha=setting.lora_alpha, mixed_precision=precision,
                         micro_batch_size=setting.micro_batch, gradient_checkpointing=setting.gradient_checkpointing,
                         samples_per_epoch=setting.samples, num_steps=setting.steps,
                         max_sequence_length=setting.max_sequence_length, guided=family != "flux")


def _family_line(row: dict[str, Any]) -> str:
    if "skipped" in row:
        return f"{row['family']}: skipped ({row['skipped']})"
    return (f"{row['family']}: {count(row['unet_params'])} params, {row['sampling_images_per_second']:.3g} img/s "
            f"sampling, {row['seconds_per_trained_sample']:.3g} s per trained sample, overhead in-epoch "
            f"{row['overhead']['in_epoch_wall']:.3f} replay {row['overhead']['replay_wall']:.3f}, peak "
            f"{row['peak_memory_mb']:.0f} MB")


def run_trl(result: dict[str, Any], args: argparse.Namespace, scratch: Path, deadline: float,
            run: Callable[..., subprocess.CompletedProcess] = subprocess.run) -> None:
    """TRL's DDPOTrainer at the SD 2 family's setting, in TRL's own virtualenv; the ratio of seconds per epoch."""
    ours = next((r for r in result.get("families", []) if r["family"] == "sd2" and "skipped" not in r), None)
    if not TRL_PYTHON.is_file():
        result["trl"] = {"skipped": f"TRL's virtualenv is absent ({TRL_PYTHON})"}
    elif ours is None:
        result["trl"] = {"skipped": "no loopdiff SD 2 measurement to compare with"}
    elif time.perf_counter() > deadline:
        result["trl"] = {"skipped": "budget spent"}
    else:
        result["trl"] = _trl_epochs(ours, args, scratch, deadline, run)
    print(f"TRL: {result['trl'].get('skipped') or 'ratio %.2f' % result['trl']['ratio_trl_over_loopdiff']}",
          flush=True)


def _trl_epochs(ours: dict[str, Any], args: argparse.Namespace, scratch: Path, deadline: float, run) -> dict[str, Any]:
    s = ours["setting"]
    folder = save_family_pipeline(scratch / f"sd2-s{args.scale}", "sd2", args.scale, s["resolution"],
                                  text_layers=TEXT_LAYERS)  # the pipeline loopdiff's side was measured on
    out = scratch / "trl.json"
    command = [str(TRL_PYTHON), str(TRL_SIDE), "epochs", "--pipeline", str(folder),
               "--prompts", str(write_prompts(scratch, s["prompts"])), "--samples", str(s["samples"]),
               "--k", str(s["k"]), "--steps", str(s["steps"]), "--guidance", str(s["guidance"]),
               "--train-batch", str(s["micro_batch"]), "--clip-range", str(s["clip_range"]),
               "--learning-rate", "1e-5", "--warmup", "1", "--epochs", "1", "--threads", str(args.threads),
               "--device", args.device, "--mixed-precision", args.precision, "--json", str(out)]
    try:
        log = run(command, capture_output=True, text=True, timeout=max(1.0, deadline - time.perf_counter()))
    except subprocess.TimeoutExpired:
        return {"skipped": "budget spent while TRL ran"}
    if log.returncode != 0:
        return {"skipped": f"TRL failed ({log.returncode}): {log.stderr.strip().splitlines()[-1:]}"}
    theirs = json.loads(out.read_text())
    return {**theirs, "ratio_trl_over_loopdiff": theirs["seconds"]["epoch"] / ours["seconds"]["epoch"]}


def write_outputs(result: dict[str, Any], path: Path | None) -> None:
    """The JSON and its Markdown table (``path`` with ``.md``); called after every part."""
    if path is None:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1) + "\n")
    path.with_suffix(".md").write_text(markdown_report(result))


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiny", action="store_true", help="the same code path on the CPU at widths / 64, fast")
    parser.add_argument("--estimate-memory", action="store_true",
                        help="print the expected memory per packaged config (nothing is allocated) and stop")
    parser.add_argument("--family", default=",".join(FAMILIES), help="comma-separated, of: " + ", ".join(FAMILIES))
    parser.add_argument("--device", help="default: cuda (cpu with --tiny)")
    parser.add_argument("--budget-s", type=float, default=480.0, help="seconds for all parts (default 480)")
    parser.add_argument("--epochs", type=int, default=1,
                        help="measured epochs per family, each followed by its bare replay (default 1)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument("--compile", action="store_true", help="families with model.compile (torch.compile)")
    parser.add_argument("--skip", default="", help="comma-separated parts to skip: checks, families, trl")
    parser.add_argument("--json", type=Path, help="write every figure here, and the Markdown table beside it")
    args = parser.parse_args(argv)
    args.families = [f.strip() for f in args.family.split(",") if f.strip()]
    unknown = [f for f in args.families if f not in FAMILIES]
    if unknown:
        parser.error(f"--family {','.join(unknown)}: allowed {', '.join(FAMILIES)}")
    args.skip = {p.strip() for p in args.skip.split(",") if p.strip()}
    if args.skip - set(PART_SHARES):
        parser.error(f"--skip {','.join(sorted(args.skip - set(PART_SHARES)))}: allowed {', '.join(PART_SHARES)}")
    if args.budget_s <= 0:
        parser.error(f"--budget-s {args.budget_s}: must be > 0")
    args.device = args.device or ("cpu" if args.tiny else "cuda")
    args.scale = TINY_SCALE if args.tiny else 1
    args.precision = "bf16" if args.device.startswith("cuda") else "no"
    return args


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    import torch

    quiet_libraries()
    torch.set_num_threads(args.threads)
    if args.estimate_memory:
        rows = packaged_estimates()
        print(memory_table(rows))
        result = {"memory_estimates": rows}
        write_outputs(result, args.json)
        return result
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print(f"--device {args.device}: CUDA is not available here (run with --tiny on a CPU)", file=sys.stderr)
        raise SystemExit(2)
    budget = Budget(args.budget_s)
    result: dict[str, Any] = {
        "device": args.device, "tiny": args.tiny, "scale": args.scale, "mixed_precision": args.precision,
        "budget_s": args.budget_s, "torch": torch.__version__,
        "gpu": torch.cuda.get_device_name(torch.device(args.device)) if args.device.startswith("cuda") else None,
    }
    parts = {"checks": run_checks, "families": run_families, "trl": run_trl}
    remaining = [p for p in parts if p not in args.skip]
    with tempfile.TemporaryDirectory(prefix="loopdiff-gpu-") as tmp:
        for index, part in enumerate(remaining):
            deadline = budget.part_deadline(part, remaining[index:])
            start = time.perf_counter()
            parts[part](result, args, Path(tmp), deadline)
            result.setdefault("part_seconds", {})[part] = time.perf_counter() - start
            write_outputs(result, args.json)
    print(markdown_report(result))
    return result


if __name__ == "__main__":
    main()
