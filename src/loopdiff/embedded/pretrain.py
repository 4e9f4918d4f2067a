"""Pretrain the embedded base model from scratch on the miniature world.

Two stages, as latent diffusion is trained, and a third that makes its attribute binding unreliable:

1. the VAE (``AutoencoderKL``) on fresh renders: reconstruction MSE plus a small KL term; afterwards its
   ``scaling_factor`` is set to 1 / std of the latents, as Stable Diffusion does; then its decoder alone
   for ``decoder_steps`` more (the encoder frozen, so the latents stay what the UNet learns): MSE plus an
   L1 term on latents drawn around the posterior mean, which sharpens the edges the 8x upsampling blurs;
2. the text encoder and the UNet jointly, with the VAE frozen: epsilon-prediction MSE under SD's
   scaled-linear 1000-step schedule, min-SNR weighting, 10% empty captions for classifier-free guidance,
   and an EMA of the weights, which is what gets saved;
3. the same training continued for ``noisy_caption_steps`` on captions whose colours are wrong some of the
   time (swapped between two objects, or replaced), at a constant learning rate. Web alt-texts mis-bind
   attributes in the same way, and Stable Diffusion's binding errors are partly learned from them. This
   stage gives the base an unreliable binding that is shared across prompts, which is what RL fine-tuning
   corrects on Stable Diffusion (``docs/embedded-model.md`` has the measurements).

Captions come from ``prompts.random_caption_and_scene`` (T2I-CompBench phrasing; with
``drop_attribute_prob`` some colours and textures go unnamed, like web captions). Every batch is drawn
fresh with a generator seeded by
``(seed, stage, step)``, so a resumed run sees the same data as an uninterrupted one. The training state is
checkpointed into ``<output>/pretrain_state/`` and the pipeline folder is exported at every checkpoint.
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from tqdm.auto import tqdm
from transformers import CLIPTextModel, CLIPTokenizer

from loopdiff.checks import (
    DEVICE_HERE, FOLDER, SEED, OneLineParser, above, at_least, flag, fraction, ranged,
)
from loopdiff.embedded import world
from loopdiff.embedded.pipeline import (
    NOISE_SCHEDULE,
    assemble_pipeline,
    build_untrained_pipeline,
)
from loopdiff.embedded.pretrain_common import (
    STATE_DIR, PretrainStateError, check_flags, draw_batch, ema_decay, load_state_file, optimizer_step,
    parse_config, save_atomic, to_model_pixels, tokenize, update_ema, warmup_cosine,
)

STATE_FILE = "state.pt"


@dataclass
class PretrainConfig:
    """Everything that determines the pretrained weights."""

    output_dir: str = ranged(check=FOLDER)
    seed: int = ranged(0, SEED)
    vae_steps: int = ranged(2000, at_least(1))
    vae_batch_size: int = ranged(32, at_least(1))
    vae_lr: float = ranged(1e-3, above(0))
    vae_kl_weight: float = ranged(1e-4, at_least(0, "a number"))
    decoder_steps: int = ranged(0, at_least(0))  # the shipped 4x VAE needs none; the 8x, 16-channel trial used 2000
    decoder_lr: float = ranged(5e-4, above(0))
    decoder_l1_weight: float = ranged(0.5, at_least(0, "a number"))
    decoder_latent_noise: float = ranged(0.5, at_least(0, "a number"))  # latents = mean + this x std x N(0, I)
    unet_steps: int = ranged(12000, at_least(1))
    unet_batch_size: int = ranged(32, at_least(1))
    unet_lr: float = ranged(5e-4, above(0))
    warmup_steps: int = ranged(200, at_least(0))
    weight_decay: float = ranged(1e-4, at_least(0, "a number"))
    caption_dropout: float = ranged(0.1, fraction(high_open=True))
    single_object_prob: float = ranged(0.2, fraction())
    drop_attribute_prob: float = ranged(0.2, fraction())
    noisy_caption_steps: int = ranged(1500, at_least(0))
    noisy_caption_lr: float = ranged(2e-4, above(0))
    swap_colors_prob: float = ranged(0.3, fraction())
    wrong_color_prob: float = ranged(0.3, fraction())
    neglect_prob: float = ranged(0.0, fraction())
    leak_color_prob: float = ranged(0.0, fraction())
    snr_gamma: float = ranged(5.0, above(0))
    ema_decay: float = ranged(0.999, fraction(high_open=True))
    grad_clip: float = ranged(1.0, above(0))
    checkpoint_every: int = ranged(250, at_least(1))
    # Idle 2-core machine: 3.3 UNet steps/s with 2 threads, 2.8 with 1; when other jobs hold the cores,
    # pass --threads 1 (2 threads then waited on each other and ran 2-4x slower).
    threads: int = ranged(check=at_least(1), factory=lambda: min(4, os.cpu_count() or 1))
    device: str = ranged("cpu", DEVICE_HERE)


# ----------------------------------------------------------------------------- data


def mislabel_colors(caption: str, rng: np.random.Generator, swap_prob: float, wrong_prob: float) -> str:
    """Corrupt a caption's colour words as noisy alt-text does; the image keeps its true colours.

    With probability ``swap_prob`` the first two (different) colour words trade places ("a red circle and
    a blue square" -> "a blue circle and a red square"); otherwise each colour word is replaced by another
    colour with probability ``wrong_prob``. Every other word is kept.
    """
    words = caption.split(" ")
    slots = [i for i, word in enumerate(words) if word in world.COLORS]
    if len(slots) >= 2 and words[slots[0]] != words[slots[1]] and rng.random() < swap_prob:
        words[slots[0]], words[slots[1]] = words[slots[1]], words[slots[0]]
        return " ".join(words)
    for i in slots:
        if rng.random() < wrong_prob:
            words[i] = str(rng.choice([c for c in world.COLORS if c != words[i]]))
    return " ".join(words)


def random_scene(rng: np.random.Generator, max_objects: int = 4) -> world.Scene:
    """A scene of 1..``max_objects`` objects with uniformly random attributes, overlaps allowed (VAE data)."""
    objects = []
    for _ in range(int(rng.integers(1, max_objects + 1))):
        size = int(rng.integers(16, 33))
        objects.append(
            world.WorldObject(
                shape=str(rng.choice(world.SHAPES)),
                color=str(rng.choice(list(world.COLORS))),
                texture=str(rng.choice(world.TEXTURES)),
                size=size,
                x=int(rng.integers(size // 2, world.IMAGE_SIZE - size // 2 + 1)),
                y=int(rng.integers(size // 2, world.IMAGE_SIZE - size // 2 + 1)),
            )
        )
    return world.Scene(tuple(objects))


def draw_images(seed: int, stage: int, step: int, batch_size: int) -> torch.Tensor:
    """``batch_size`` renders of random scenes, float (B, 3, 64, 64) in [-1, 1]."""
    rng = np.random.default_rng([seed, stage, step])
    return to_model_pixels(np.stack([world.render(random_scene(rng)) for _ in range(batch_size)]))


# ----------------------------------------------------------------------------- stage 1: VAE


def vae_loss(vae: AutoencoderKL, pixels: torch.Tensor, kl_weight: float) -> tuple[torch.Tensor, float]:
    """Reconstruction MSE + ``kl_weight`` x mean KL to N(0, I); returns (loss, reconstruction MSE)."""
    posterior = vae.encode(pixels).latent_dist
    recon = vae.decode(posterior.sample()).sample
    mse = F.mse_loss(recon, pixels)
    kl = posterior.kl().mean() / posterior.mean[0].numel()
    return mse + kl_weight * kl, float(mse.detach())


@torch.no_grad()
def latent_std(vae: AutoencoderKL, seed: int, batches: int = 8, batch_size: int = 64) -> float:
    """Standard deviation of sampled VAE latents over fresh renders (SD sets scaling_factor = 1 / this)."""
    device = next(vae.parameters()).device
    latents = []
    for i in range(batches):
        pixels = draw_images(seed, 99, i, batch_size)
        latents.append(vae.encode(pixels.to(device)).latent_dist.sample())
    return float(torch.cat(latents).std())


# ----------------------------------------------------------------------------- stage 2: UNet + text encoder


def min_snr_weights(scheduler: DDPMScheduler, timesteps: torch.Tensor, gamma: float) -> torch.Tensor:
    """Min-SNR-gamma loss weights for epsilon prediction: min(SNR, gamma) / SNR."""
    abar = scheduler.alphas_cumprod.to(timesteps.device)[timesteps]
    snr = abar / (1 - abar)
    return torch.clamp(snr, max=gamma) / snr


def denoising_loss(
    unet: UNet2DConditionModel,
    text_encoder: CLIPTextModel,
    scheduler: DDPMScheduler,
    latents: torch.Tensor,
    input_ids: torch.Tensor,
    generator: torch.Generator,
    snr_gamma: float,
) -> torch.Tensor:
    """Epsilon-prediction MSE at uniformly drawn timesteps, min-SNR weighted per sample."""
    noise = torch.randn(latents.shape, generator=generator, device=latents.device)
    timesteps = torch.randint(
        0, scheduler.config.num_train_timesteps, (latents.shape[0],), generator=generator, device=latents.device
    )
    noisy = scheduler.add_noise(latents, noise, timesteps)
    hidden = text_encoder(input_ids)[0]
    pred = unet(noisy, timesteps, hidden).sample
    per_sample = F.mse_loss(pred, noise, reduction="none").mean(dim=(1, 2, 3))
    return (per_sample * min_snr_weights(scheduler, timesteps, snr_gamma)).mean()


# ----------------------------------------------------------------------------- state


class Trainer:
    """Holds the models, optimisers and progress of one pretraining run; checkpoints and resumes."""

    def __init__(self, config: PretrainConfig):
        self.config = config
        self.device = torch.device(config.device)
        self.out = Path(config.output_dir)
        self.state_path = self.out / STATE_DIR / STATE_FILE
        pipe = build_untrained_pipeline(seed=config.seed)
        self.tokenizer: CLIPTokenizer = pipe.tokenizer
        self.vae: AutoencoderKL = pipe.vae.to(self.device)
        self.unet: UNet2DConditionModel = pipe.unet.to(self.device)
        self.text_encoder: CLIPTextModel = pipe.text_encoder.to(self.device)
        self.ema_unet = copy.deepcopy(self.unet).requires_grad_(False)
        self.ema_text_encoder = copy.deepcopy(self.text_encoder).requires_grad_(False)
        self.noise_scheduler = DDPMScheduler(**NOISE_SCHEDULE)
        fused = {"fused": True} if self.device.type in ("cpu", "cuda") else {}
        self.vae_opt = torch.optim.AdamW(self.vae.parameters(), lr=config.vae_lr, weight_decay=0.0, **fused)
        self.unet_opt = torch.optim.AdamW(
            list(self.unet.parameters()) + list(self.text_encoder.parameters()),
            lr=config.unet_lr, weight_decay=config.weight_decay, **fused,
        )
        decoder_params = list(self.vae.decoder.parameters()) + list(self.vae.post_quant_conv.parameters())
        self.decoder_opt = torch.optim.AdamW(decoder_params, lr=config.decoder_lr, weight_decay=0.0, **fused)
        self.vae_step = 0
        self.decoder_step = 0
        self.unet_step = 0
        self.history: dict[str, list[tuple[int, float]]] = {"vae_mse": [], "unet_loss": []}

    # -- persistence
    def save_state(self) -> None:
        """Write everything needed to resume (weights, EMA, optimisers, steps) atomically."""
        state = {
            "config": asdict(self.config),
            "vae_step": self.vae_step,
            "decoder_step": self.decoder_step,
            "unet_step": self.unet_step,
            "vae": self.vae.state_dict(),
            "unet": self.unet.state_dict(),
            "text_encoder": self.text_encoder.state_dict(),
            "ema_unet": self.ema_unet.state_dict(),
            "ema_text_encoder": self.ema_text_encoder.state_dict(),
            "vae_opt": self.vae_opt.state_dict(),
            "decoder_opt": self.decoder_opt.state_dict(),
            "unet_opt": self.unet_opt.state_dict(),
            "scaling_factor": self.vae.config.scaling_factor,
            "history": self.history,
        }
        save_atomic(state, self.state_path)

    def load_state(self) -> bool:
        """Resume from ``<output>/pretrain_state/state.pt`` if it exists; returns whether it did."""
        if not self.state_path.is_file():
            return False
        state = load_state_file(self.state_path, self.device)
        names = ["vae", "vae_opt"] + (["decoder_opt"] if state.get("decoder_step", 0) > 0 else [])
        if state["unet_step"] > 0:  # before stage 2 the text side is untrained; the vocabulary may differ
            names += ["unet", "text_encoder", "ema_unet", "ema_text_encoder", "unet_opt"]
        for name in names:
            getattr(self, name).load_state_dict(state[name])
        self.vae.register_to_config(scaling_factor=state["scaling_factor"])
        self.vae_step, self.unet_step = state["vae_step"], state["unet_step"]
        self.decoder_step = state.get("decoder_step", 0)
        self.history = state["history"]
        return True

    def export_pipeline(self) -> None:
        """Write the pipeline folder (EMA text encoder and UNet) in the Stable Diffusion layout."""
        pipe = assemble_pipeline(self.tokenizer, self.ema_text_encoder, self.vae, self.ema_unet)
        pipe.save_pretrained(self.out, safe_serialization=True)

    def checkpoint(self) -> None:
        """Save the training state, then export the pipeline folder beside it."""
        self.save_state()
        self.export_pipeline()

    # -- stage 1
    def vae_update(self, total_steps: int) -> float:
        """One VAE optimisation step on a fresh batch; returns the reconstruction MSE."""
        cfg = self.config
        pixels = draw_images(cfg.seed, 1, self.vae_step, cfg.vae_batch_size)
        loss, mse = vae_loss(self.vae, pixels.to(self.device), cfg.vae_kl_weight)
        for group in self.vae_opt.param_groups:
            group["lr"] = cfg.vae_lr * warmup_cosine(self.vae_step, cfg.warmup_steps, total_steps)
        self.vae_opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.vae.parameters(), cfg.grad_clip)
        self.vae_opt.step()
        self.history["vae_mse"].append((self.vae_step, mse))
        self.vae_step += 1
        return mse

    def train_vae(self, steps: int) -> None:
        """Train the VAE up to ``steps``, then (once) set its scaling factor from the latent std."""
        self.vae.train()
        bar = tqdm(total=steps, initial=min(self.vae_step, steps), desc="VAE", dynamic_ncols=True)
        while self.vae_step < steps:
            mse = self.vae_update(steps)
            bar.update(1)
            bar.set_postfix(mse=f"{mse:.4f}")
            if self.vae_step % self.config.checkpoint_every == 0 and self.vae_step < steps:
                self.checkpoint()
        bar.close()
        self.vae.eval().requires_grad_(False)
        if self.unet_step == 0:  # the stage boundary: fix the latent scale before the UNet sees latents
            std = latent_std(self.vae, self.config.seed)
            self.vae.register_to_config(scaling_factor=1.0 / std)
            print(f"VAE done: latent std {std:.4f}, scaling_factor {1.0 / std:.4f}")
            self.checkpoint()

    def decoder_update(self, total_steps: int) -> float:
        """One step of the decoder alone (encoder frozen) on a fresh batch; returns the reconstruction MSE."""
        cfg = self.config
        pixels = draw_images(cfg.seed, 4, self.decoder_step, cfg.vae_batch_size).to(self.device)
        generator = torch.Generator(self.device).manual_seed(cfg.seed * 1_000_003 + self.decoder_step)
        with torch.no_grad():
            posterior = self.vae.encode(pixels).latent_dist
            noise = torch.randn(posterior.mean.shape, generator=generator, device=self.device)
            latents = posterior.mean + cfg.decoder_latent_noise * posterior.std * noise
        recon = self.vae.decode(latents).sample
        mse = F.mse_loss(recon, pixels)
        loss = mse + cfg.decoder_l1_weight * F.l1_loss(recon, pixels)
        for group in self.decoder_opt.param_groups:
            group["lr"] = cfg.decoder_lr * warmup_cosine(self.decoder_step, min(100, cfg.warmup_steps), total_steps)
        optimizer_step(self.decoder_opt, loss, cfg.grad_clip)
        self.history.setdefault("decoder_mse", []).append((self.decoder_step, float(mse)))
        self.decoder_step += 1
        return float(mse)

    def train_decoder(self, steps: int) -> None:
        """Train the VAE's decoder (and its post-quantisation conv) up to ``steps``, the encoder frozen."""
        self.vae.eval()
        self.vae.decoder.train().requires_grad_(True)
        self.vae.post_quant_conv.requires_grad_(True)
        bar = tqdm(total=steps, initial=min(self.decoder_step, steps), desc="VAE decoder", dynamic_ncols=True)
        while self.decoder_step < steps:
            mse = self.decoder_update(steps)
            bar.update(1)
            bar.set_postfix(mse=f"{mse:.4f}")
            if self.decoder_step % self.config.checkpoint_every == 0 or self.decoder_step == steps:
                self.checkpoint()
        bar.close()
        self.vae.eval().requires_grad_(False)

    # -- stages 2 and 3
    def unet_update(self) -> float:
        """One joint text-encoder + UNet step on a fresh batch (10% empty captions); returns the loss.

        Steps past ``unet_steps`` are stage 3: colour words mislabelled, constant ``noisy_caption_lr``.
        """
        cfg = self.config
        noisy = self.unet_step >= cfg.unet_steps
        captions, pixels = draw_batch(
            cfg.seed, 2, self.unet_step, cfg.unet_batch_size, cfg.single_object_prob, cfg.drop_attribute_prob,
            cfg.neglect_prob if noisy else 0.0, cfg.leak_color_prob if noisy else 0.0,
        )
        if noisy:
            rng = np.random.default_rng([cfg.seed, 3, self.unet_step])
            captions = [mislabel_colors(c, rng, cfg.swap_colors_prob, cfg.wrong_color_prob) for c in captions]
        generator = torch.Generator(self.device).manual_seed(cfg.seed * 1_000_003 + self.unet_step)
        drop = torch.rand(len(captions), generator=generator, device=self.device) < cfg.caption_dropout
        captions = ["" if d else c for c, d in zip(captions, drop.tolist())]
        with torch.no_grad():
            latents = self.vae.encode(pixels.to(self.device)).latent_dist.sample(generator)
        loss = denoising_loss(
            self.unet, self.text_encoder, self.noise_scheduler, latents * self.vae.config.scaling_factor,
            tokenize(self.tokenizer, captions, self.device), generator, cfg.snr_gamma,
        )
        lr = cfg.noisy_caption_lr if noisy else cfg.unet_lr * warmup_cosine(
            self.unet_step, cfg.warmup_steps, cfg.unet_steps
        )
        for group in self.unet_opt.param_groups:
            group["lr"] = lr
        optimizer_step(self.unet_opt, loss, cfg.grad_clip)
        decay = ema_decay(self.unet_step, cfg.ema_decay)
        update_ema(self.ema_unet, self.unet, decay)
        update_ema(self.ema_text_encoder, self.text_encoder, decay)
        self.history["unet_loss"].append((self.unet_step, float(loss)))
        self.unet_step += 1
        return float(loss)

    def train_unet(self, steps: int, desc: str = "UNet+text") -> None:
        """Train the text encoder and UNet up to step ``steps``, checkpointing as it goes."""
        self.unet.train()
        self.text_encoder.train()
        bar = tqdm(total=steps, initial=min(self.unet_step, steps), desc=desc, dynamic_ncols=True)
        while self.unet_step < steps:
            loss = self.unet_update()
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.4f}")
            if self.unet_step % self.config.checkpoint_every == 0 or self.unet_step == steps:
                self.checkpoint()
        bar.close()


def pretrain(config: PretrainConfig, resume: bool = True) -> Trainer:
    """Run (or resume) the three stages and leave the pipeline folder in ``config.output_dir``."""
    torch.set_num_threads(config.threads)
    trainer = Trainer(config)
    if resume and trainer.load_state():
        print(f"resumed from {trainer.state_path}: VAE step {trainer.vae_step}, UNet step {trainer.unet_step}")
    start = time.perf_counter()
    trainer.train_vae(config.vae_steps)
    trainer.train_decoder(config.decoder_steps)  # the UNet sees only the frozen encoder's latents
    trainer.train_unet(config.unet_steps)
    trainer.train_unet(config.unet_steps + config.noisy_caption_steps, desc="noisy captions")
    trainer.checkpoint()
    print(f"pretraining finished in {(time.perf_counter() - start) / 60:.1f} min; pipeline in {trainer.out}")
    return trainer


# ----------------------------------------------------------------------------- CLI


def build_parser() -> argparse.ArgumentParser:
    defaults = PretrainConfig(output_dir="")
    parser = OneLineParser(
        prog="loopdiff pretrain",
        description="Pretrain the embedded base pipeline (VAE, then text encoder + UNet) on the miniature world. "
        "'loopdiff pretrain --family flow --help': the SD3-format flow-matching base instead.",
    )
    parser.add_argument("--output-dir", required=True, help="folder for the pipeline (Stable Diffusion layout)")
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--vae-steps", type=int, default=defaults.vae_steps)
    parser.add_argument("--decoder-steps", type=int, default=defaults.decoder_steps,
                        help="stage 1b: steps of the VAE decoder alone, the encoder frozen (0 skips it)")
    parser.add_argument("--unet-steps", type=int, default=defaults.unet_steps)
    parser.add_argument("--vae-batch-size", type=int, default=defaults.vae_batch_size)
    parser.add_argument("--unet-batch-size", type=int, default=defaults.unet_batch_size)
    parser.add_argument("--vae-lr", type=float, default=defaults.vae_lr)
    parser.add_argument("--unet-lr", type=float, default=defaults.unet_lr)
    parser.add_argument("--caption-dropout", type=float, default=defaults.caption_dropout,
                        help="fraction of empty captions (for classifier-free guidance)")
    parser.add_argument("--single-object-prob", type=float, default=defaults.single_object_prob,
                        help="fraction of single-object captions")
    parser.add_argument("--drop-attribute-prob", type=float, default=defaults.drop_attribute_prob,
                        help="probability that a caption leaves out an object's colour or texture")
    parser.add_argument("--noisy-caption-steps", type=int, default=defaults.noisy_caption_steps,
                        help="stage 3: steps on captions with mislabelled colours (0 skips it)")
    parser.add_argument("--noisy-caption-lr", type=float, default=defaults.noisy_caption_lr)
    parser.add_argument("--swap-colors-prob", type=float, default=defaults.swap_colors_prob,
                        help="stage 3: probability that a caption's first two colours trade places")
    parser.add_argument("--wrong-color-prob", type=float, default=defaults.wrong_color_prob,
                        help="stage 3: probability that a colour word is replaced by another colour")
    parser.add_argument("--neglect-prob", type=float, default=defaults.neglect_prob,
                        help="stage 3: probability that a multi-object image leaves out its last object")
    parser.add_argument("--leak-color-prob", type=float, default=defaults.leak_color_prob,
                        help="stage 3: probability that the last object takes the first object's colour")
    parser.add_argument("--ema-decay", type=float, default=defaults.ema_decay)
    parser.add_argument("--warmup-steps", type=int, default=defaults.warmup_steps)
    parser.add_argument("--checkpoint-every", type=int, default=defaults.checkpoint_every)
    parser.add_argument("--max-steps", type=flag(int, at_least(1)), default=None,
                        help="cap every stage at this many steps (quick trials and tests)")
    parser.add_argument("--threads", type=int, default=defaults.threads, help="torch CPU threads")
    parser.add_argument("--device", default=defaults.device)
    parser.add_argument("--no-resume", action="store_true", help="ignore an existing checkpoint in the output")
    return parser


def config_from_args(args: argparse.Namespace) -> PretrainConfig:
    """Turn parsed arguments into a validated ``PretrainConfig``."""
    values: dict[str, Any] = {
        k: v for k, v in vars(args).items() if k in PretrainConfig.__dataclass_fields__ and v is not None
    }
    config = PretrainConfig(**values)
    check_flags(config)
    if args.max_steps is not None:
        config.vae_steps = min(config.vae_steps, args.max_steps)
        config.decoder_steps = min(config.decoder_steps, args.max_steps)
        config.unet_steps = min(config.unet_steps, args.max_steps)
        config.noisy_caption_steps = min(config.noisy_caption_steps, args.max_steps)
        config.warmup_steps = min(config.warmup_steps, args.max_steps)
    return config


def pretrain_cli(argv: list[str] | None = None) -> int:
    """``loopdiff pretrain``: reproduce the shipped embedded pipeline from scratch. Returns an exit code.

    ``--family flow`` pretrains the SD3-format base ``embedded-flow`` instead (``pretrain_flow.py``).
    """
    family = OneLineParser(prog="loopdiff pretrain", add_help=False)
    family.add_argument("--family", choices=("unet", "flow"), default="unet")
    known, rest = family.parse_known_args(argv)
    if known.family == "flow":
        from loopdiff.embedded.pretrain_flow import pretrain_flow_cli

        return pretrain_flow_cli(rest)
    args, config = parse_config(build_parser(), rest, config_from_args)
    try:
        pretrain(config, resume=not args.no_resume)
    except PretrainStateError as err:
        print(f"loopdiff pretrain: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(pretrain_cli())
