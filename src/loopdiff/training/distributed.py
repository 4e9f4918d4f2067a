"""What one optimiser step needs from the processes: gathers, the backward passes, finite checks and the step,
under DDP, FSDP2 or DeepSpeed ZeRO-2 (or one process).

Under DDP the gradients are all-reduced on the step's last backward pass (the others run under ``no_sync``).
Under FSDP2 every forward and backward pass gathers the sharded weights, and under ZeRO-2 every backward pass
reduces the gradients: collectives, so there every process runs the same number of passes, and a process left
with fewer micro-batches (non-finite rewards dropped its samples) pads with weight-0 passes. Under DeepSpeed the
engine takes the backward passes and the step (:mod:`loopdiff.training.zero`).

A step reads one value back from the device: whether its loss and gradient norm are finite on every process.
The loss statistics stay on the device until the epoch ends.
"""

from __future__ import annotations

import contextlib
import math
from typing import Callable, Iterable, Sequence

import torch
from accelerate import Accelerator

from loopdiff.objectives import LossOutput
from loopdiff.sharding import is_dtensor, local, reshard
from loopdiff.training.guards import check_engine_step, nonfinite_names, refuse_nonfinite_weights

LOSS_STATS = ("loss", "approx_kl", "clip_fraction", "kl_penalty")


class Backend:
    """The accelerate-prepared denoiser and optimiser, and the collectives of a training step."""

    def __init__(self, accelerator: Accelerator, train_unet: torch.nn.Module, optimizer: torch.optim.Optimizer,
                 params: Sequence[torch.nn.Parameter], sharded: bool, deepspeed: bool, max_grad_norm: float):
        self.accelerator, self.train_unet, self.optimizer = accelerator, train_unet, optimizer
        self.params, self.sharded, self.deepspeed, self.max_grad_norm = list(params), sharded, deepspeed, max_grad_norm
        self.device = accelerator.device

    # ------------------------------------------------------------------ gathers

    def gather(self, values: torch.Tensor) -> torch.Tensor:
        """``values`` of every process, concatenated in process order, on the CPU."""
        return self.accelerator.gather(values.to(self.device)).cpu()

    def gather_columns(self, *columns: torch.Tensor) -> list[torch.Tensor]:
        """Several per-sample columns of every process in one collective, each in its own dtype again (float64
        carries float32 values and integer ids below 2^53 exactly)."""
        stacked = torch.stack([c.to(torch.float64) for c in columns], dim=1)
        gathered = self.gather(stacked)
        return [gathered[:, k].to(c.dtype) for k, c in enumerate(columns)]

    def local(self, values: torch.Tensor) -> torch.Tensor:
        """This process's share of a gathered per-sample tensor."""
        share = len(values) // self.accelerator.num_processes
        return values[self.accelerator.process_index * share :][:share]

    def finite_everywhere(self, *values: torch.Tensor) -> bool:
        """Whether the scalars ``values`` are finite on every process (every process calls this; one read)."""
        bad = torch.stack([~torch.isfinite(v.detach().to(self.device, torch.float64).reshape(())) for v in values])
        return not bool(self.accelerator.gather(bad.any().reshape(1).float()).any())

    def passes(self, micro_batches: int) -> int:
        """How many forward and backward passes this step takes: its micro-batches, or under FSDP and DeepSpeed
        the most any process has."""
        if not (self.sharded or self.deepspeed):
            return micro_batches
        return int(self.accelerator.gather(torch.tensor([micro_batches], device=self.device)).max())

    # ------------------------------------------------------------------ one optimiser step

    def accumulate(self, minibatch: list[torch.Tensor],
                   loss_of: Callable[[torch.Tensor], LossOutput]) -> dict[str, torch.Tensor]:
        """Backward through one optimiser step's micro-batches, gradients synced on the last one. Each
        micro-batch's loss is weighted by its share of the step's pairs, so the step averages over them.

        Returns the loss statistics summed over the micro-batches, weighted by their numbers of pairs
        (float64 tensors on the device)."""
        total = sum(len(m) for m in minibatch)
        sums = {key: torch.zeros((), dtype=torch.float64, device=self.device) for key in LOSS_STATS}
        passes = self.passes(len(minibatch))
        for k in range(passes):
            # A pass beyond this process's micro-batches (FSDP and DeepSpeed only) repeats one pair with weight 0.
            micro, weight = (minibatch[k], len(minibatch[k]) / total) if k < len(minibatch) else (minibatch[0][:1], 0.0)
            last = k == passes - 1
            sync = contextlib.nullcontext() if last or self.deepspeed else self.accelerator.no_sync(self.train_unet)
            with sync:
                out = loss_of(micro)
                if k < len(minibatch):
                    for key in sums:
                        sums[key] = sums[key] + getattr(out, key).detach().to(torch.float64) * len(micro)
                if self.deepspeed:
                    self._engine_backward(out.loss * weight, last, sums["loss"])
                else:
                    self.accelerator.backward(out.loss * weight)
        return sums

    def _engine_backward(self, loss: torch.Tensor, last: bool, loss_sum: torch.Tensor) -> None:
        """A backward pass under DeepSpeed: through the engine, the last of the step marked as its accumulation
        boundary, and not divided by DeepSpeed's accumulation steps (the micro-batch weights already average).

        On the last pass, when the step's loss (``loss_sum`` so far) is not finite on some process, the pass is
        scaled by NaN: DeepSpeed then finds a non-finite gradient norm and skips the step, as it skips one whose
        gradients are not finite (see :meth:`step_if_finite`)."""
        if last and not self.finite_everywhere(loss_sum):
            loss = loss * math.nan
        self.train_unet.set_gradient_accumulation_boundary(last)
        self.train_unet.backward(loss, scale_wrt_gas=False)

    def step_if_finite(self, loss: torch.Tensor) -> tuple[bool, torch.Tensor | float]:
        """Clip the gradients to ``training.max_grad_norm`` and take the optimiser step, unless the loss or the
        gradient norm is non-finite on any process. Returns whether it stepped, and the norm before clipping.

        A skipped step drops its gradients (and, under fp16, lowers the loss scale). Under DeepSpeed the engine
        clips (to the config's ``gradient_clipping``, which the launch check made ``training.max_grad_norm``),
        steps, and skips a step whose gradient norm is not finite; a non-finite loss was made one by
        :meth:`_engine_backward`.
        """
        if self.deepspeed:
            self.train_unet.step()
            applied, grad_norm = self.train_unet.was_step_applied(), float(self.train_unet.get_global_grad_norm())
            check_engine_step(applied, grad_norm)
            return applied, grad_norm
        grad_norm = self.accelerator.clip_grad_norm_(self.params, self.max_grad_norm)
        grad_norm = grad_norm.full_tensor() if is_dtensor(grad_norm) else torch.as_tensor(grad_norm)
        finite = self.finite_everywhere(loss, grad_norm)
        if finite:
            self.optimizer.step()
        elif self.accelerator.scaler is not None:
            self.accelerator.scaler.update()  # clip_grad_norm_ unscaled and found the overflow
        self.optimizer.zero_grad(set_to_none=True)
        return finite, grad_norm

    # ------------------------------------------------------------------ weights

    def check_weights(self, named: Iterable[tuple[str, torch.Tensor]], what: str, module: torch.nn.Module) -> None:
        """Raise NonFiniteError (on every process) if one of the ``named`` weights is non-finite, before writing
        ``what``. Under FSDP each process checks its shards of ``module``'s weights, and one all-reduce tells every
        process which tensors are non-finite anywhere (every process calls this)."""
        named = list(named)
        if self.sharded:
            reshard(module)
            bad_here = set(nonfinite_names((name, local(t)) for name, t in named))
            flags = torch.tensor([float(name in bad_here) for name, _ in named], device=self.device)
            bad = [name for (name, _), flag in zip(named, self.accelerator.reduce(flags, "sum").tolist()) if flag]
        else:
            bad = nonfinite_names(named)
        weights = [name for name in bad if not name.startswith("ema.")]
        refuse_nonfinite_weights(weights or bad, what)
