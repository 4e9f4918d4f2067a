"""The learning-rate schedule: diffusers' ``get_scheduler`` schedules, stepped once per epoch.

Epoch ``n`` (1-based) trains at the learning rate times the schedule's factor at step ``n`` of
``training.epochs + 1`` steps, with ``training.warmup_epochs`` warm-up steps: the first epoch of a warm-up
is not spent at a learning rate of 0, nor the last epoch of a decay. ``constant_with_warmup`` is therefore
the linear warm-up ``min(1, n / warmup_epochs)`` followed by the constant learning rate.

The schedule is a ``LambdaLR`` whose state (the epochs stepped) the checkpoint saves, so a resumed run
continues it.
"""

from __future__ import annotations

import torch

def schedule_factor(name: str, warmup_epochs: int, epochs: int):
    """The factor of diffusers' schedule ``name`` as a function of its step (over ``epochs + 1`` steps)."""
    from diffusers.optimization import get_scheduler

    probe = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)  # only to build the schedule
    schedule = get_scheduler(name, probe, num_warmup_steps=warmup_epochs, num_training_steps=epochs + 1)
    return schedule.lr_lambdas[0]


def epoch_lr_scheduler(
    optimizer: torch.optim.Optimizer, name: str, warmup_epochs: int, epochs: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """A per-epoch ``LambdaLR`` on ``optimizer``: its epoch ``e`` (0-based) uses the schedule's step ``e + 1``."""
    factor = schedule_factor(name, warmup_epochs, epochs)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda epoch: factor(epoch + 1))
