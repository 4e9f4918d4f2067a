"""Pretrain the embedded flow-matching base (``embedded-flow``): an SD3-format pipeline on the miniature world.

The pipeline is ``StableDiffusion3Pipeline``: a small ``SD3Transformer2DModel`` (patch 2 on the base VAE's
latents: 16x16x4 and 64 image tokens for the shipped weights, which were trained on the earlier 4x VAE; 8x8x4
on today's embedded VAE), a ``FlowMatchEulerDiscreteScheduler``, two ``CLIPTextModelWithProjection``
encoders and no T5 (diffusers then appends ``max_sequence_length`` zero tokens to the prompt; we keep it
small, ``MAX_SEQUENCE_LENGTH``). The VAE is the shipped embedded one, frozen, with ``shift_factor`` 0. Both
text encoders start from the shipped embedded CLIP text encoder (its projection is new, initialised to the
identity) and train jointly with the transformer, as the UNet stage of ``pretrain.py`` trains its encoder.

Training is SD3's rectified flow: ``x_t = (1 - sigma) x_0 + sigma * eps``, the transformer predicts the
velocity ``eps - x_0`` at timestep ``1000 * sigma``, unweighted MSE, with ``u`` drawn from a logit-normal
density (SD3's default, mean 0, std 1) and ``sigma = shift * u / (1 + (shift - 1) u)``, the same shift the
scheduler applies to its sampling grid. The data stream is ``pretrain_common.draw_batch`` (captions and renders
seeded by ``(seed, stage, step)``), 10% empty captions, AdamW with warm-up and cosine decay, an EMA of the
weights (what gets exported), and a checkpoint every ``checkpoint_every`` steps; a resumed run is bit for bit
the uninterrupted one. ``loopdiff pretrain --family flow --output-dir DIR`` or
``python -m loopdiff.embedded.pretrain_flow --output-dir DIR`` runs it.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from diffusers import (
    AutoencoderKL,
    FlowMatchEulerDiscreteScheduler,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
)
from tqdm.auto import tqdm
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from loopdiff.checks import (
    DEVICE_HERE, FOLDER, SEED, Check, OneLineParser, above, at_least, flag, fraction, ranged,
)
from loopdiff.embedded.pipeline import LATENT_CHANNELS, LATENT_SIZE, TEXT_HIDDEN, embedded_pipeline_path
from loopdiff.embedded.pretrain_common import (
    STATE_DIR, PretrainStateError, check_flags, draw_batch, ema_decay, load_state_file, optimizer_step,
    parse_config, save_atomic, tokenize, update_ema, warmup_cosine,
)

STATE_FILE = "flow_state.pt"
DATA_STAGE = 2  # the same caption/render stream as the UNet stage of pretrain.py
MAX_SEQUENCE_LENGTH = 8  # zero "T5" tokens after the 24 CLIP tokens (diffusers' default of 256 costs 5x here)
JOINT_DIM = 2 * TEXT_HIDDEN  # the two CLIP encoders' hidden states side by side
# No shift (1.0): SD3 shifts by 3 for 1024-px images (4096 latent tokens) and by 1 at its 256-px reference;
# shift grows with resolution, and these are 64 tokens, so any shift > 1 would spend the sampler's steps
# at noise levels where nothing of the 16x16 image is left.
SHIFT = 1.0
BASE = Check(lambda v: (Path(v) / "model_index.json").is_file(), "an embedded SD pipeline folder (with model_index.json)")


@dataclass
class FlowPretrainConfig:
    """Everything that determines the flow-matching base's weights."""

    output_dir: str = ranged(check=FOLDER)
    base: str | None = ranged(None, BASE)  # the embedded SD pipeline to take the VAE, tokenizer and text encoder from
    seed: int = ranged(0, SEED)
    steps: int = ranged(7000, at_least(1))
    batch_size: int = ranged(32, at_least(1))
    lr: float = ranged(1e-3, above(0))
    text_lr: float = ranged(2e-4, above(0))  # the text encoders are pretrained already: a smaller rate keeps them
    warmup_steps: int = ranged(200, at_least(0))
    weight_decay: float = ranged(1e-4, at_least(0, "a number"))
    caption_dropout: float = ranged(0.1, fraction(high_open=True))
    single_object_prob: float = ranged(0.2, fraction())
    drop_attribute_prob: float = ranged(0.2, fraction())
    shift: float = ranged(SHIFT, above(0))
    logit_mean: float = ranged(0.0, Check(math.isfinite, "a finite number"))
    logit_std: float = ranged(1.0, above(0))
    num_layers: int = ranged(4, at_least(1))
    num_heads: int = ranged(4, at_least(1))
    head_dim: int = ranged(24, at_least(1))
    max_sequence_length: int = ranged(MAX_SEQUENCE_LENGTH, at_least(0))
    ema_decay: float = ranged(0.999, fraction(high_open=True))
    grad_clip: float = ranged(1.0, above(0))
    checkpoint_every: int = ranged(250, at_least(1))
    threads: int = ranged(check=at_least(1), factory=lambda: min(4, os.cpu_count() or 1))
    device: str = ranged("cpu", DEVICE_HERE)


# ----------------------------------------------------------------------------- the pipeline


def transformer_config(
    num_layers: int = 4, num_heads: int = 4, head_dim: int = 24, latent_size: int = LATENT_SIZE
) -> dict[str, Any]:
    """The SD3 transformer's config: patch 2 on ``latent_size`` square latents, hidden ``num_heads * head_dim``."""
    return dict(
        sample_size=latent_size,
        patch_size=2,
        in_channels=LATENT_CHANNELS,
        out_channels=LATENT_CHANNELS,
        num_layers=num_layers,
        attention_head_dim=head_dim,
        num_attention_heads=num_heads,
        joint_attention_dim=JOINT_DIM,
        caption_projection_dim=num_heads * head_dim,
        pooled_projection_dim=JOINT_DIM,
        pos_embed_max_size=latent_size,
    )


def vae_latent_size(vae: AutoencoderKL) -> int:
    """The side of the latents ``vae`` encodes its images to (each block after the first halves it)."""
    return vae.config.sample_size // 2 ** (len(vae.config.block_out_channels) - 1)


def text_encoder_with_projection(encoder: CLIPTextModel) -> CLIPTextModelWithProjection:
    """``encoder``'s weights in a CLIPTextModelWithProjection whose new projection is the identity."""
    config = CLIPTextConfig.from_dict({**encoder.config.to_dict(), "projection_dim": encoder.config.hidden_size})
    config.architectures = ["CLIPTextModelWithProjection"]
    model = CLIPTextModelWithProjection(config)
    source = getattr(encoder, "text_model", encoder)  # transformers 5 flattens CLIPTextModel
    model.text_model.load_state_dict(source.state_dict())
    with torch.no_grad():
        model.text_projection.weight.copy_(torch.eye(config.hidden_size))
    return model


def build_untrained_flow_pipeline(
    config: FlowPretrainConfig | None = None, base: str | Path | None = None
) -> StableDiffusion3Pipeline:
    """The SD3-format pipeline before pretraining: shipped VAE and text encoder, a seeded random transformer."""
    config = config or FlowPretrainConfig(output_dir="")
    folder = Path(base or config.base or embedded_pipeline_path())
    tokenizer = CLIPTokenizer.from_pretrained(folder / "tokenizer")
    clip = CLIPTextModel.from_pretrained(folder / "text_encoder")
    vae = AutoencoderKL.from_pretrained(folder / "vae")
    vae.register_to_config(shift_factor=0.0)  # StableDiffusion3Pipeline decodes latents / scale + shift
    torch.manual_seed(config.seed)
    transformer = SD3Transformer2DModel(
        **transformer_config(config.num_layers, config.num_heads, config.head_dim, vae_latent_size(vae))
    )
    return assemble_flow_pipeline(
        tokenizer, text_encoder_with_projection(clip), text_encoder_with_projection(clip), vae, transformer,
        config.shift,
    )


def assemble_flow_pipeline(
    tokenizer: CLIPTokenizer,
    text_encoder: CLIPTextModelWithProjection,
    text_encoder_2: CLIPTextModelWithProjection,
    vae: AutoencoderKL,
    transformer: SD3Transformer2DModel,
    shift: float = SHIFT,
) -> StableDiffusion3Pipeline:
    """The parts in a ``StableDiffusion3Pipeline`` (one tokenizer for both CLIP encoders, no T5)."""
    return StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=shift),
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        text_encoder_2=text_encoder_2,
        tokenizer_2=copy.deepcopy(tokenizer),
        text_encoder_3=None,
        tokenizer_3=None,
    )


# ----------------------------------------------------------------------------- the objective


def encode_captions(
    text_encoders: Sequence[CLIPTextModelWithProjection], input_ids: torch.Tensor, max_sequence_length: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(sequence (B, L + max_sequence_length, JOINT_DIM), pooled (B, JOINT_DIM)) as SD3's ``encode_prompt``
    makes them without T5: penultimate hidden states of each CLIP side by side, then zero tokens; the
    projected pooled outputs concatenated."""
    sequences, pooled = [], []
    for encoder in text_encoders:
        out = encoder(input_ids, output_hidden_states=True)
        pooled.append(out[0])
        sequences.append(out.hidden_states[-2])
    sequence = torch.cat(sequences, dim=-1)
    zeros = sequence.new_zeros(sequence.shape[0], max_sequence_length, sequence.shape[-1])
    return torch.cat([sequence, zeros], dim=1), torch.cat(pooled, dim=-1)


def sample_sigmas(
    n: int, generator: torch.Generator, shift: float, logit_mean: float = 0.0, logit_std: float = 1.0,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """Noise levels: ``u = sigmoid(N(logit_mean, logit_std))`` shifted as the scheduler shifts its grid."""
    u = torch.sigmoid(logit_mean + logit_std * torch.randn(n, generator=generator, device=device))
    return shift * u / (1 + (shift - 1) * u)


def flow_matching_loss(
    transformer: SD3Transformer2DModel,
    latents: torch.Tensor,
    sequence: torch.Tensor,
    pooled: torch.Tensor,
    noise: torch.Tensor,
    sigmas: torch.Tensor,
) -> torch.Tensor:
    """Rectified-flow MSE: the transformer at ``x_t = (1 - sigma) x_0 + sigma eps`` against ``eps - x_0``."""
    s = sigmas.view(-1, 1, 1, 1)
    noisy = (1 - s) * latents + s * noise
    pred = transformer(
        hidden_states=noisy, encoder_hidden_states=sequence, pooled_projections=pooled, timestep=sigmas * 1000
    ).sample
    return F.mse_loss(pred, noise - latents)


# ----------------------------------------------------------------------------- training


class FlowTrainer:
    """Models, optimiser and progress of one flow pretraining run; checkpoints and resumes."""

    def __init__(self, config: FlowPretrainConfig):
        self.config = config
        self.device = torch.device(config.device)
        self.out = Path(config.output_dir)
        self.state_path = self.out / STATE_DIR / STATE_FILE
        pipe = build_untrained_flow_pipeline(config)
        self.tokenizer: CLIPTokenizer = pipe.tokenizer
        self.vae: AutoencoderKL = pipe.vae.to(self.device).eval().requires_grad_(False)
        self.transformer: SD3Transformer2DModel = pipe.transformer.to(self.device)
        self.text_encoders = [pipe.text_encoder.to(self.device), pipe.text_encoder_2.to(self.device)]
        self.ema_transformer = copy.deepcopy(self.transformer).requires_grad_(False)
        self.ema_text_encoders = [copy.deepcopy(e).requires_grad_(False) for e in self.text_encoders]
        fused = {"fused": True} if self.device.type in ("cpu", "cuda") else {}
        text_params = [p for e in self.text_encoders for p in e.parameters()]
        self.opt = torch.optim.AdamW(
            [
                {"params": list(self.transformer.parameters()), "lr": config.lr, "base_lr": config.lr},
                {"params": text_params, "lr": config.text_lr, "base_lr": config.text_lr},
            ],
            weight_decay=config.weight_decay, **fused,
        )
        self.step = 0
        self.history: list[tuple[int, float]] = []

    def modules(self) -> dict[str, torch.nn.Module]:
        return {
            "transformer": self.transformer, "text_encoder": self.text_encoders[0],
            "text_encoder_2": self.text_encoders[1], "ema_transformer": self.ema_transformer,
            "ema_text_encoder": self.ema_text_encoders[0], "ema_text_encoder_2": self.ema_text_encoders[1],
        }

    # -- persistence
    def save_state(self) -> None:
        """Write everything needed to resume (weights, EMA, optimiser, step) atomically."""
        state = {name: module.state_dict() for name, module in self.modules().items()}
        state.update(config=asdict(self.config), step=self.step, opt=self.opt.state_dict(), history=self.history)
        save_atomic(state, self.state_path)

    def load_state(self) -> bool:
        """Resume from ``<output>/pretrain_state/flow_state.pt`` if it exists; returns whether it did."""
        if not self.state_path.is_file():
            return False
        state = load_state_file(self.state_path, self.device)
        for name, module in self.modules().items():
            module.load_state_dict(state[name])
        self.opt.load_state_dict(state["opt"])
        self.step, self.history = state["step"], [tuple(h) for h in state["history"]]
        return True

    def export_pipeline(self) -> None:
        """Write the SD3-format pipeline folder with the EMA transformer and text encoders."""
        # diffusers ignores this key (and says so on loading) but keeps it: loopdiff's prompt encoder reads it
        self.ema_transformer.register_to_config(max_sequence_length=self.config.max_sequence_length)
        pipe = assemble_flow_pipeline(
            self.tokenizer, *self.ema_text_encoders, self.vae, self.ema_transformer, self.config.shift
        )
        pipe.save_pretrained(self.out, safe_serialization=True)
        losses = [loss for _, loss in self.history[-100:]]
        info = {
            "steps": self.step, "recent_loss": sum(losses) / len(losses) if losses else None,
            "max_sequence_length": self.config.max_sequence_length,
            "config": {k: v for k, v in asdict(self.config).items() if k not in ("output_dir", "base", "device")},
        }
        (self.out / "pretrain_flow.json").write_text(json.dumps(info, indent=1) + "\n")

    def checkpoint(self) -> None:
        self.save_state()
        self.export_pipeline()

    def update(self) -> float:
        """One joint transformer + text-encoder step on a fresh batch (10% empty captions); returns the loss."""
        cfg = self.config
        captions, pixels = draw_batch(
            cfg.seed, DATA_STAGE, self.step, cfg.batch_size, cfg.single_object_prob, cfg.drop_attribute_prob
        )
        generator = torch.Generator(self.device).manual_seed(cfg.seed * 1_000_003 + self.step)
        drop = torch.rand(len(captions), generator=generator, device=self.device) < cfg.caption_dropout
        captions = ["" if d else c for c, d in zip(captions, drop.tolist())]
        with torch.no_grad():
            latents = self.vae.encode(pixels.to(self.device)).latent_dist.sample(generator)
            latents = (latents - (self.vae.config.shift_factor or 0.0)) * self.vae.config.scaling_factor
        noise = torch.randn(latents.shape, generator=generator, device=self.device)
        sigmas = sample_sigmas(len(captions), generator, cfg.shift, cfg.logit_mean, cfg.logit_std, self.device)
        sequence, pooled = encode_captions(
            self.text_encoders, tokenize(self.tokenizer, captions, self.device), cfg.max_sequence_length
        )
        loss = flow_matching_loss(self.transformer, latents, sequence, pooled, noise, sigmas)
        scale = warmup_cosine(self.step, cfg.warmup_steps, cfg.steps)
        for group in self.opt.param_groups:
            group["lr"] = group["base_lr"] * scale
        optimizer_step(self.opt, loss, cfg.grad_clip)
        decay = ema_decay(self.step, cfg.ema_decay)
        update_ema(self.ema_transformer, self.transformer, decay)
        for ema, model in zip(self.ema_text_encoders, self.text_encoders):
            update_ema(ema, model, decay)
        self.history.append((self.step, loss.item()))
        self.step += 1
        return self.history[-1][1]

    def train(self, steps: int) -> None:
        """Train up to step ``steps``, checkpointing every ``checkpoint_every`` steps and at the end."""
        self.transformer.train()
        for encoder in self.text_encoders:
            encoder.train()
        bar = tqdm(total=steps, initial=min(self.step, steps), desc="flow", dynamic_ncols=True, mininterval=10)
        while self.step < steps:
            loss = self.update()
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.4f}", refresh=False)
            if self.step % self.config.checkpoint_every == 0 or self.step == steps:
                self.checkpoint()
        bar.close()


def pretrain_flow(config: FlowPretrainConfig, resume: bool = True, stop_at: int | None = None) -> FlowTrainer:
    """Run (or resume) flow pretraining and leave the pipeline folder in ``config.output_dir``.

    ``stop_at`` ends the run early at that step (the schedule still spans ``config.steps``): an interrupted run.
    """
    torch.set_num_threads(config.threads)
    trainer = FlowTrainer(config)
    if resume and trainer.load_state():
        print(f"resumed from {trainer.state_path} at step {trainer.step}")
    start = time.perf_counter()
    trainer.train(config.steps if stop_at is None else min(stop_at, config.steps))
    print(f"flow pretraining: {(time.perf_counter() - start) / 60:.1f} min this run; pipeline in {trainer.out}")
    return trainer


# ----------------------------------------------------------------------------- CLI


def build_parser() -> argparse.ArgumentParser:
    d = FlowPretrainConfig(output_dir="")
    parser = OneLineParser(
        prog="loopdiff pretrain --family flow",
        description="Pretrain the embedded flow-matching base (SD3 format) on the miniature world.",
    )
    parser.add_argument("--output-dir", required=True, help="folder for the pipeline (StableDiffusion3 layout)")
    parser.add_argument("--base", default=None, help="embedded SD pipeline to take VAE/tokenizer/text encoder from")
    for name in ("seed", "steps", "batch_size", "warmup_steps", "num_layers", "num_heads", "head_dim",
                 "max_sequence_length", "checkpoint_every", "threads"):
        parser.add_argument("--" + name.replace("_", "-"), type=int, default=getattr(d, name))
    for name in ("lr", "text_lr", "weight_decay", "caption_dropout", "single_object_prob", "drop_attribute_prob",
                 "shift", "logit_mean", "logit_std", "ema_decay", "grad_clip"):
        parser.add_argument("--" + name.replace("_", "-"), type=float, default=getattr(d, name))
    parser.add_argument("--device", default=d.device)
    parser.add_argument("--max-steps", type=flag(int, at_least(1)), default=None,
                        help="stop at this step (a smoke run; the schedule still spans --steps)")
    parser.add_argument("--no-resume", action="store_true", help="ignore an existing checkpoint in the output")
    return parser


def config_from_args(args: argparse.Namespace) -> FlowPretrainConfig:
    """Parsed arguments -> a validated ``FlowPretrainConfig``."""
    values = {k: v for k, v in vars(args).items() if k in FlowPretrainConfig.__dataclass_fields__}
    config = FlowPretrainConfig(**values)
    check_flags(config)
    return config


def pretrain_flow_cli(argv: list[str] | None = None) -> int:
    """``loopdiff pretrain --family flow``: reproduce the shipped embedded-flow pipeline. Returns an exit code."""
    args, config = parse_config(build_parser(), argv, config_from_args)
    try:
        pretrain_flow(config, resume=not args.no_resume, stop_at=args.max_steps)
    except PretrainStateError as err:
        print(f"loopdiff pretrain --family flow: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(pretrain_flow_cli())
