"""An exponential moving average (EMA) of the trainable weights, kept as flow_grpo keeps one.

After the n-th optimiser step taken (n = 1, 2, ...; a skipped non-finite step does not count), when n is a
multiple of ``training.ema_every``::

    ema <- d_n * ema + (1 - d_n) * theta,    d_n = min(training.ema_decay, (1 + n) / (10 + n))

The warm-up term lets the average follow the weights over the first steps instead of staying near the
base model. The average starts at the weights training starts from and covers the parameters with
``requires_grad`` only: the LoRA adapters when LoRA is on, else what ``model.train_modules`` trains.
Training and its samples use the live weights; evaluations and the export swap the average in
(:meth:`ParameterEMA.swapped_in`) and the live weights back afterwards. The average and its step count are
saved in every checkpoint, so a resumed run continues it exactly. Before its first update (fewer than
``training.ema_every`` optimiser steps) the average is the starting weights: evaluations and the export then
use the live weights, with a warning (the model card says which weights it holds). Every process updates its own copy from
the same synchronised weights, so the copies agree across processes. When FSDP shards the module, the average
is sharded as its parameters are (each process averages its own shards), and :meth:`ParameterEMA.state_dict`
gathers it.
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator

import torch

from loopdiff.sharding import full_tensors, is_dtensor, is_sharded, local, reshard, shard_like

WARMUP = 10  # d_n <= (1 + n) / (WARMUP + n)


def ema_decay_at(decay: float, step: int) -> float:
    """The decay used at optimiser step ``step`` (1-based): ``min(decay, (1 + step) / (10 + step))``."""
    return min(decay, (1 + step) / (WARMUP + step))


def trainable_parameters(module: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    """The parameters of ``module`` that training changes (``requires_grad``), by name."""
    return {name: p for name, p in module.named_parameters() if p.requires_grad}


@torch.no_grad()
def ema_update(average: dict[str, torch.Tensor], params: dict[str, torch.Tensor], decay: float) -> None:
    """``average <- decay * average + (1 - decay) * params`` in place, name by name (shard by shard under FSDP)."""
    for name, value in params.items():
        local(average[name]).lerp_(local(value.detach()), 1.0 - decay)


class ParameterEMA:
    """The moving average of ``module``'s trainable parameters (``decay`` in (0, 1), updated every
    ``every`` optimiser steps); see the module docstring for the formula."""

    def __init__(self, module: torch.nn.Module, decay: float, every: int = 1):
        if not 0 < decay < 1 or every < 1:
            raise ValueError(f"EMA needs 0 < decay < 1 and every >= 1, got decay={decay}, every={every}")
        self.module, self.decay, self.every = module, decay, every
        self.steps = 0  # optimiser steps taken so far
        if is_sharded(module):
            reshard(module)
        self.average = {name: p.detach().clone() for name, p in trainable_parameters(module).items()}

    @property
    def updates(self) -> int:
        """How many times the average was updated: until the first (optimiser step ``every``) it holds the
        weights training started from, which :meth:`Trainer.ema_weights` then does not swap in."""
        return self.steps // self.every

    def step(self) -> bool:
        """Count one optimiser step taken; update the average when the count is a multiple of ``every``.
        Returns whether it updated."""
        self.steps += 1
        if self.steps % self.every:
            return False
        ema_update(self.average, self._parameters(), ema_decay_at(self.decay, self.steps))
        return True

    def _parameters(self) -> dict[str, torch.nn.Parameter]:
        if is_sharded(self.module):
            reshard(self.module)  # the registered parameters are the shards again
        params = trainable_parameters(self.module)
        if params.keys() != self.average.keys():
            raise RuntimeError("the trainable parameters changed since the EMA was created")
        return params

    @contextlib.contextmanager
    def swapped_in(self) -> Iterator[None]:
        """Within the block the module holds the average; the live weights (kept on the CPU meanwhile) are
        restored bit for bit afterwards. Under FSDP each process swaps its own shards, and the module is
        resharded on the way out: a forward pass inside the block leaves gathered average weights behind."""
        params = self._parameters()
        live = {name: local(p).detach().to("cpu", copy=True) for name, p in params.items()}
        with torch.no_grad():
            for name, p in params.items():
                local(p).copy_(local(self.average[name]))
        try:
            yield
        finally:
            if is_sharded(self.module):
                reshard(self.module)
            with torch.no_grad():
                for name, p in params.items():
                    local(p).copy_(live[name])

    def state_dict(self) -> dict[str, Any]:
        """The step count and the average (CPU tensors): what a checkpoint stores. A sharded average is
        gathered (every process calls this) onto the first process; the others get an empty average."""
        if any(is_dtensor(t) for t in self.average.values()):
            return {"steps": self.steps, "average": full_tensors(self.average.items())}
        return {"steps": self.steps, "average": {name: t.detach().cpu().clone() for name, t in self.average.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`'s output; raises ValueError when it holds other parameters."""
        saved = state["average"]
        if saved.keys() != self.average.keys():
            missing, extra = sorted(self.average.keys() - saved.keys()), sorted(saved.keys() - self.average.keys())
            raise ValueError(f"the EMA state holds other parameters (missing {missing[:3]}, unexpected {extra[:3]})")
        shapes = [name for name, t in saved.items() if t.shape != self.average[name].shape]
        if shapes:
            raise ValueError(f"the EMA state's shapes differ from the parameters' (first: {shapes[0]})")
        with torch.no_grad():
            for name, tensor in saved.items():
                target = self.average[name]
                if is_dtensor(target):  # every process holds the full average and keeps its shard
                    local(target).copy_(shard_like(tensor, target))
                else:
                    target.copy_(tensor)
        self.steps = int(state["steps"])
