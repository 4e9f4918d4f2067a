"""The network calls one training epoch needs: counted analytically, observed with hooks, and timed bare.

An epoch of N trajectories of T steps with classifier-free guidance makes (Flux's embedded guidance: one
branch, as without guidance)
- sampling: T denoiser calls per sampling chunk, at 2 x chunk rows (both guidance branches in one call);
- decoding: one VAE decode per chunk (at most ``decode_batch`` latents per call);
- training: per inner epoch, N x round(T x timestep_fraction) (sample, step) pairs split into ``minibatches``
  optimiser steps of micro-batches of at most ``micro_batch_size`` pairs; one forward+backward denoiser call
  at 2 x micro rows each.

The denoiser is the UNet of Stable Diffusion 1/2 or SDXL, or an SD3 or Flux transformer; :class:`CallShape`
holds what one call takes besides its rows (latents, text states, and SDXL's pooled embeddings and size time
ids, SD3's pooled projections, or Flux's pooled projections, position ids and guidance).
``bare_epoch_seconds`` times exactly these calls on random inputs of the same shapes and nothing else: the
floor an epoch cannot go below. An epoch's time divided by it is the trainer's overhead factor. Both wall
time and process CPU time are kept: on a machine shared with other jobs, CPU time is the steadier of the two.
On a GPU every timed call is bracketed by ``torch.cuda.synchronize``.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import torch

from loopdiff.minibatches import steps_per_sample

# Inner batch sizes of loopdiff.sampling.trajectories.sample_trajectories / decode_latents (their defaults).
SAMPLER_BATCH = 64
DECODE_BATCH = 64


@dataclass(frozen=True)
class EpochShape:
    """What fixes the number and shape of an epoch's network calls."""

    samples: int
    num_steps: int
    sampling_chunk: int
    guided: bool = True
    timestep_fraction: float = 1.0
    inner_epochs: int = 1
    minibatches: int = 1
    micro_batch_size: int = 64
    train_denoising_steps: int | None = None  # only the first N steps enter the objective (None: all)

    @classmethod
    def from_trainer(cls, trainer) -> "EpochShape":
        from loopdiff.models import is_flux

        c, est = trainer.config, trainer.estimator
        return cls(
            samples=c.training.samples_per_epoch // trainer.accelerator.num_processes,
            num_steps=c.sampling.num_steps,
            sampling_chunk=c.sampling.batch_size,
            guided=c.sampling.guidance_scale != 1.0 and not is_flux(trainer.pipeline),  # Flux: guidance embedded
            timestep_fraction=c.training.timestep_fraction,
            train_denoising_steps=c.training.train_denoising_steps,
            inner_epochs=est.inner_epochs,
            minibatches=est.minibatches,
            micro_batch_size=c.training.micro_batch_size,
        )


def _split(total: int, size: int) -> list[int]:
    """Sizes of consecutive chunks of at most ``size`` covering ``total``."""
    return [min(size, total - start) for start in range(0, total, size)]


def _tensor_split_sizes(total: int, parts: int) -> list[int]:
    """Sizes ``torch.tensor_split`` gives when splitting ``total`` items into ``parts`` near-equal parts."""
    return [total // parts + (1 if i < total % parts else 0) for i in range(parts)]


@dataclass
class CallPlan:
    """Rows (batch size) of each network call of one epoch, in order."""

    sampling: list[int] = field(default_factory=list)  # UNet forward, no gradients
    decoding: list[int] = field(default_factory=list)  # VAE decode, no gradients
    training: list[list[int]] = field(default_factory=list)  # per optimiser step: UNet forward+backward calls

    @property
    def training_calls(self) -> list[int]:
        return [rows for step in self.training for rows in step]

    def summary(self) -> dict[str, int]:
        return {
            "sampling_calls": len(self.sampling),
            "sampling_rows": sum(self.sampling),
            "decode_calls": len(self.decoding),
            "decode_rows": sum(self.decoding),
            "training_calls": len(self.training_calls),
            "training_rows": sum(self.training_calls),
            "optimizer_steps": len(self.training),
        }


def epoch_plan(shape: EpochShape) -> CallPlan:
    """The network calls the trainer makes in one epoch of ``shape`` (see the module docstring)."""
    branches = 2 if shape.guided else 1
    plan = CallPlan()
    for chunk in _split(shape.samples, shape.sampling_chunk):
        for rows in _split(chunk, SAMPLER_BATCH):
            plan.sampling += [branches * rows] * shape.num_steps
        plan.decoding += _split(chunk, DECODE_BATCH)
    pairs = shape.samples * steps_per_sample(shape.num_steps, shape.timestep_fraction, shape.train_denoising_steps)
    for _ in range(shape.inner_epochs):
        for step_pairs in _tensor_split_sizes(pairs, shape.minibatches):
            plan.training.append([branches * rows for rows in _split(step_pairs, shape.micro_batch_size)])
    return plan


# ---------------------------------------------------------------- observing the calls a trainer makes


@dataclass
class ObservedCalls:
    """Rows of every UNet call (with or without gradients) and VAE decode, and the time spent inside them."""

    unet_no_grad: list[int] = field(default_factory=list)
    unet_grad: list[int] = field(default_factory=list)
    decoder: list[int] = field(default_factory=list)
    wall: float = 0.0  # seconds inside the observed calls (and backward passes, when timed)
    cpu: float = 0.0  # process CPU seconds inside them


def device_sync(module: torch.nn.Module) -> Callable[[], None]:
    """A function that waits for the module's device to finish its queued work (nothing to wait for on a CPU)."""
    device = next(module.parameters()).device
    return torch.cuda.synchronize if device.type == "cuda" else (lambda: None)


class _Stopwatch:
    """Adds the wall and process CPU time between ``start`` and ``stop`` to an ObservedCalls."""

    def __init__(self, seen: ObservedCalls, sync: Callable[[], None] = lambda: None):
        self.seen = seen
        self.sync = sync
        self.started: tuple[float, float] | None = None

    def start(self) -> None:
        self.sync()
        self.started = (time.perf_counter(), time.process_time())

    def stop(self) -> None:
        if self.started is not None:
            self.sync()
            wall, cpu = self.started
            self.seen.wall += time.perf_counter() - wall
            self.seen.cpu += time.process_time() - cpu
            self.started = None


@contextlib.contextmanager
def observe_calls(unet: torch.nn.Module, vae: torch.nn.Module, accelerator=None) -> Iterator[ObservedCalls]:
    """Record the batch size and time of each denoiser forward (``unet``: a UNet or an SD3 transformer) and VAE
    decode while the context is open; given the trainer's ``accelerator``, also time its backward passes (the
    denoiser's backward, plus the loss's)."""
    seen = ObservedCalls()
    watch = _Stopwatch(seen, device_sync(unet))

    def before_unet(module, args, kwargs):
        sample = args[0] if args else kwargs.get("sample", kwargs.get("hidden_states"))
        (seen.unet_grad if torch.is_grad_enabled() else seen.unet_no_grad).append(sample.shape[0])
        watch.start()

    def after_unet(module, args, kwargs, output):
        watch.stop()

    decode = vae.decode

    def timed_decode(z, *args, **kwargs):
        seen.decoder.append(z.shape[0])
        watch.start()
        try:
            return decode(z, *args, **kwargs)
        finally:
            watch.stop()

    handles = [
        unet.register_forward_pre_hook(before_unet, with_kwargs=True),
        unet.register_forward_hook(after_unet, with_kwargs=True),
    ]
    vae.decode = timed_decode
    backward = accelerator.backward if accelerator is not None else None
    if backward is not None:

        def timed_backward(loss, **kwargs):
            watch.start()
            try:
                return backward(loss, **kwargs)
            finally:
                watch.stop()

        accelerator.backward = timed_backward
    try:
        yield seen
    finally:
        for handle in handles:
            handle.remove()
        del vae.decode  # back to the class's method
        if backward is not None:
            del accelerator.backward


# ---------------------------------------------------------------- timing the bare calls


@dataclass
class BareTimes:
    """Wall seconds of the bare network calls of one epoch by phase, and the process CPU seconds of all."""

    sampling: float
    decoding: float
    training: float
    cpu: float

    @property
    def total(self) -> float:
        return self.sampling + self.decoding + self.training


@dataclass(frozen=True)
class CallShape:
    """What one denoiser call takes besides its number of rows: latents (C, H, W), text states (L, D), the
    pooled text embedding's width (SDXL, SD3, Flux) and the call's signature (``kind``): ``"sd"`` (UNet with
    text states), ``"sdxl"`` (UNet with ``added_cond_kwargs`` text_embeds and time_ids), ``"sd3"`` (transformer
    with ``hidden_states``, ``encoder_hidden_states`` and ``pooled_projections``) or ``"flux"`` (the same with
    the latents packed into 2x2 patch tokens, ``img_ids``, ``txt_ids`` and, for a guidance-distilled
    transformer, ``guidance``)."""

    latent: tuple[int, int, int]
    text: tuple[int, int]
    pooled: int | None = None
    kind: str = "sd"
    guidance: float | None = None  # Flux's embedded guidance (None: a transformer without guidance embeds)

    @classmethod
    def from_trainer(cls, trainer) -> "CallShape":
        """The shapes of the trainer's own denoiser calls (its sampled latent shape, its prompt embeddings)."""
        from loopdiff.sampling.embeds import PromptEmbeds
        from loopdiff.sampling.flux import FluxPolicy

        policy = trainer.rollout_policy
        uncond, latent = trainer.uncond, tuple(policy.latent_shape)
        if not isinstance(uncond, PromptEmbeds):
            return cls(latent, tuple(uncond.shape[1:]))
        text, pooled = tuple(uncond.sequence.shape[1:]), int(uncond.pooled.shape[1])
        if isinstance(policy, FluxPolicy):
            return cls(latent, text, pooled, "flux", policy.config.guidance_scale if policy.guidance_embedded else None)
        return cls(latent, text, pooled, "sdxl" if uncond.time_ids is not None else "sd3")

    def inputs(self, rows: int, generator: torch.Generator, device: torch.device) -> dict[str, Any]:
        """Random keyword inputs of one call of ``rows`` rows, drawn on the CPU, then moved to ``device``."""
        def randn(*shape: int) -> torch.Tensor:
            return torch.randn(rows, *shape, generator=generator).to(device)

        latents, states = randn(*self.latent), randn(*self.text)
        timesteps = torch.randint(0, 1000, (rows,), generator=generator).to(device)
        if self.kind == "flux":
            from loopdiff.sampling.flux import latent_image_ids, pack_latents

            guidance = None if self.guidance is None else torch.full((rows,), self.guidance, device=device)
            return {"hidden_states": pack_latents(latents), "timestep": timesteps.float() / 1000, "guidance": guidance,
                    "encoder_hidden_states": states, "pooled_projections": randn(self.pooled),
                    "txt_ids": torch.zeros(self.text[0], 3, device=device),
                    "img_ids": latent_image_ids(self.latent[1], self.latent[2], device, torch.float32)}
        if self.kind == "sd3":
            return {"hidden_states": latents, "timestep": timesteps.float(), "encoder_hidden_states": states,
                    "pooled_projections": randn(self.pooled)}
        inputs = {"sample": latents, "timestep": timesteps, "encoder_hidden_states": states}
        if self.kind == "sdxl":
            height, width = self.latent[1] * 8, self.latent[2] * 8
            time_ids = torch.tensor([[height, width, 0, 0, height, width]], dtype=torch.float32).repeat(rows, 1)
            inputs["added_cond_kwargs"] = {"text_embeds": randn(self.pooled), "time_ids": time_ids.to(device)}
        return inputs


def _as_call_shape(unet: torch.nn.Module, shape: "CallShape | tuple[int, int]") -> CallShape:
    """A CallShape; a (tokens, width) pair is a Stable Diffusion UNet's text states at its native latent size."""
    if isinstance(shape, CallShape):
        return shape
    size = unet.config.sample_size
    height, width = (size, size) if isinstance(size, int) else tuple(size)
    return CallShape((unet.config.in_channels, height, width), tuple(shape))  # type: ignore[arg-type]


def bare_epoch_seconds(
    unet: torch.nn.Module, vae: torch.nn.Module, plan: CallPlan, shape: "CallShape | tuple[int, int]", seed: int = 0,
    autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
) -> BareTimes:
    """Time the plan's calls alone: denoiser forwards under inference mode, forward+backward calls (gradients
    accumulated per optimiser step, then dropped), VAE decodes. Inputs are drawn before each timed call.

    ``shape`` is a :class:`CallShape` (or, for a Stable Diffusion UNet, the (tokens, width) shape of the
    text-encoder states it cross-attends to); denoiser calls run inside ``autocast()`` (the trainer's
    ``accelerator.autocast`` under mixed precision), decodes outside it, as in the trainer.
    """
    shape = _as_call_shape(unet, shape)
    generator = torch.Generator().manual_seed(seed)
    device, sync = next(unet.parameters()).device, device_sync(unet)
    was_training = unet.training
    sampling = decoding = training = cpu = 0.0
    unet.eval()
    with torch.inference_mode():
        for rows in plan.sampling:
            inputs = shape.inputs(rows, generator, device)
            sync()
            start, cpu_start = time.perf_counter(), time.process_time()
            with autocast():
                unet(**inputs)
            sync()
            sampling += time.perf_counter() - start
            cpu += time.process_time() - cpu_start
        for rows in plan.decoding:
            z = torch.randn(rows, *shape.latent, generator=generator).to(next(vae.parameters()).device, vae.dtype)
            sync()
            start, cpu_start = time.perf_counter(), time.process_time()
            vae.decode(z)
            sync()
            decoding += time.perf_counter() - start
            cpu += time.process_time() - cpu_start
    unet.train()
    for step in plan.training:
        for rows in step:
            inputs = shape.inputs(rows, generator, device)
            sync()
            start, cpu_start = time.perf_counter(), time.process_time()
            with autocast():
                out = unet(**inputs).sample
            out.float().square().mean().backward()
            sync()
            training += time.perf_counter() - start
            cpu += time.process_time() - cpu_start
        unet.zero_grad(set_to_none=True)
    unet.train(was_training)
    return BareTimes(sampling, decoding, training, cpu)


def text_context_shape(trainer) -> tuple[int, int]:
    """(tokens, width) of the trainer's text-encoder states."""
    return CallShape.from_trainer(trainer).text
