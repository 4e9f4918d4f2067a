"""TRL's side of the peer comparison; runs inside the TRL virtualenv (bench/.venv-trl), never imports loopdiff.

    python _trl_side.py epochs --pipeline DIR --json OUT [--samples 32 --k 4 --steps 20 ...]
    python _trl_side.py loss --pipeline DIR --stored FILE.pt --json OUT

``epochs`` times ``DDPOTrainer.step`` (one epoch: sample, reward, advantages, train) after warm-up epochs,
full fine-tuning, by default in float32 on the CPU (``--device cuda --mixed-precision bf16`` on a GPU). ``loss`` feeds stored samples through ``DDPOTrainer.calculate_loss``
and reports its loss, log-probabilities and gradient for comparison with loopdiff's on the same inputs.
"""

from __future__ import annotations

import argparse
import io
import itertools
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from _memory import peak_rss_mb  # noqa: E402  (bench/ is the script's folder, first on sys.path)


def jpeg_compressibility(images, prompts, metadata):
    """Minus the JPEG size in kB at quality 95 (DDPO's reward), float32, as TRL's reward interface wants."""
    array = (images.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    sizes = []
    for image in array:
        buffer = io.BytesIO()
        Image.fromarray(np.ascontiguousarray(image)).save(buffer, format="JPEG", quality=95)
        sizes.append(buffer.tell() / 1000.0)
    return -torch.tensor(sizes, dtype=torch.float32), {}


def grouped_prompts(prompts: list[str], k: int):
    """TRL asks for one prompt per sample: yield each prompt K times in a row, cycling through the list."""
    counter = itertools.count()

    def prompt_fn():
        return prompts[(next(counter) // k) % len(prompts)], {}

    return prompt_fn


def build_trainer(args, prompts: list[str], logdir: str):
    from accelerate import PartialState
    from trl import DDPOConfig, DDPOTrainer
    from trl.models.modeling_sd_base import DefaultDDPOStableDiffusionPipeline

    PartialState(cpu=args.device == "cpu")  # must exist before the pipeline when the folder holds no LoRA weights
    pipeline = DefaultDDPOStableDiffusionPipeline(str(args.pipeline), use_lora=False)
    config = DDPOConfig(
        num_epochs=10**6,
        save_freq=10**9,  # no checkpoint inside the timed epochs (loopdiff's run_epoch saves none either)
        logdir=logdir,
        project_kwargs={"project_dir": logdir},
        mixed_precision=args.mixed_precision,
        sample_num_steps=args.steps,
        sample_eta=1.0,
        sample_guidance_scale=args.guidance,
        sample_batch_size=args.samples,
        sample_num_batches_per_epoch=1,
        train_batch_size=args.train_batch,
        train_gradient_accumulation_steps=1,
        train_num_inner_epochs=1,
        train_cfg=True,
        train_learning_rate=args.learning_rate,
        train_adv_clip_max=args.adv_clip,
        train_clip_range=args.clip_range,
        train_timestep_fraction=args.timestep_fraction,
        per_prompt_stat_tracking=True,
        per_prompt_stat_tracking_buffer_size=32,
        per_prompt_stat_tracking_min_count=16,
        async_reward_computation=False,
        seed=0,
    )
    trainer = DDPOTrainer(config, jpeg_compressibility, grouped_prompts(prompts, args.k), pipeline)
    pipeline.set_progress_bar_config(disable=True)  # TRL turns the per-step bar on; keep its cost out
    return trainer


def timed(owner, name: str, totals: dict[str, float]) -> None:
    """Replace ``owner.name`` by a wrapper adding its seconds to ``totals[name]``."""
    function = getattr(owner, name)

    def wrapper(*args, **kwargs):
        start = time.perf_counter()
        try:
            return function(*args, **kwargs)
        finally:
            totals[name] += time.perf_counter() - start

    setattr(owner, name, wrapper)


def run_epochs(args) -> dict:
    prompts = Path(args.prompts).read_text().split("\n")
    prompts = [p for p in prompts if p.strip()]
    with tempfile.TemporaryDirectory(prefix="trl-bench-") as logdir:
        trainer = build_trainer(args, prompts, logdir)
        totals = {"_generate_samples": 0.0, "compute_rewards": 0.0, "_train_batched_samples": 0.0}
        for name in totals:
            timed(trainer, name, totals)
        global_step = 0
        for epoch in range(args.warmup):
            global_step = trainer.step(epoch, global_step)
        per_epoch, cpu_per_epoch, phases = [], [], []
        for epoch in range(args.warmup, args.warmup + args.epochs):
            for name in totals:
                totals[name] = 0.0
            start, cpu_start = time.perf_counter(), time.process_time()
            global_step = trainer.step(epoch, global_step)
            per_epoch.append(time.perf_counter() - start)
            cpu_per_epoch.append(time.process_time() - cpu_start)
            phases.append(dict(totals))
        optimizer_steps = global_step // (args.warmup + args.epochs)
    median = {name: statistics.median(p[name] for p in phases) for name in totals}
    epoch_seconds = statistics.median(per_epoch)
    seconds = {
        "sampling+decoding": median["_generate_samples"],
        "reward": median["compute_rewards"],
        "training": median["_train_batched_samples"],
        "epoch": epoch_seconds,
        "epoch_cpu": statistics.median(cpu_per_epoch),
    }
    seconds["other"] = epoch_seconds - seconds["sampling+decoding"] - seconds["reward"] - seconds["training"]
    return {
        "seconds": seconds,
        "seconds_per_epoch_all": per_epoch,
        "cpu_seconds_per_epoch_all": cpu_per_epoch,
        "optimizer_steps": optimizer_steps,
        "images_per_second": args.samples / epoch_seconds,
        "peak_rss_mb": peak_rss_mb(),
        "peak_cuda_mb": torch.cuda.max_memory_allocated() / 2**20 if args.device.startswith("cuda") else None,
        "versions": _versions(),
    }


def loss_on_stored(args) -> dict:
    """TRL's loss, log-probabilities and gradient on the stored micro-batches (same weights as loopdiff's)."""
    stored = torch.load(args.stored)
    args.adv_clip = float("inf")  # loopdiff's LOOP preset does not clip advantages
    args.clip_range = stored["clip_range"]
    args.guidance = stored["guidance"]
    args.steps = stored["steps"]
    with tempfile.TemporaryDirectory(prefix="trl-loss-") as logdir:
        trainer = build_trainer(args, ["a red circle"], logdir)
        unet = trainer.sd_pipeline.unet
        unet.load_state_dict(stored["unet_state"])
        trainer.sd_pipeline.scheduler.set_timesteps(args.steps)
        results = []
        for micro in stored["micro_batches"]:
            n = len(micro["latents"])
            embeds = torch.cat([micro["uncond"].expand(n, -1, -1), micro["embeds"]])
            unet.zero_grad(set_to_none=True)
            loss, approx_kl, clipfrac = trainer.calculate_loss(
                micro["latents"], micro["timesteps"], micro["next_latents"], micro["old_log_probs"],
                micro["advantages"], embeds,
            )
            loss.backward()
            grad = torch.cat([p.grad.flatten() for p in unet.parameters()])
            with torch.no_grad():
                noise = unet(torch.cat([micro["latents"]] * 2), torch.cat([micro["timesteps"]] * 2), embeds).sample
                uncond, cond = noise.chunk(2)
                guided = uncond + args.guidance * (cond - uncond)
                step = trainer.sd_pipeline.scheduler_step(
                    guided, micro["timesteps"], micro["latents"], eta=1.0, prev_sample=micro["next_latents"]
                )
            results.append({
                "loss": float(loss),
                "approx_kl": float(approx_kl),
                "clip_fraction": float(clipfrac),
                "log_probs": step.log_probs.tolist(),
                "grad": grad.tolist(),
            })
    return {"micro_batches": results, "versions": _versions()}


def _versions() -> dict[str, str]:
    import diffusers
    import transformers
    import trl

    return {"trl": trl.__version__, "torch": torch.__version__, "diffusers": diffusers.__version__,
            "transformers": transformers.__version__}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("mode", choices=("epochs", "loss"))
    parser.add_argument("--pipeline", type=Path, required=True)
    parser.add_argument("--json", type=Path, required=True)
    parser.add_argument("--prompts", type=Path, help="prompt file (epochs mode)")
    parser.add_argument("--stored", type=Path, help="stored samples (loss mode)")
    parser.add_argument("--samples", type=int, default=32)
    parser.add_argument("--k", type=int, default=4)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--guidance", type=float, default=5.0)
    parser.add_argument("--train-batch", type=int, default=8, help="samples per optimiser step (per timestep call)")
    parser.add_argument("--clip-range", type=float, default=1e-4)
    parser.add_argument("--adv-clip", type=float, default=5.0)
    parser.add_argument("--timestep-fraction", type=float, default=1.0)
    parser.add_argument("--learning-rate", type=float, default=1e-5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu", help="cpu, or cuda (accelerate's device)")
    parser.add_argument("--mixed-precision", choices=("no", "fp16", "bf16"), default="no")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    import diffusers
    import transformers

    for library in (diffusers, transformers):
        library.utils.logging.set_verbosity_error()
        library.utils.logging.disable_progress_bar()
    result = run_epochs(args) if args.mode == "epochs" else loss_on_stored(args)
    args.json.write_text(json.dumps(result))


if __name__ == "__main__":
    main()
