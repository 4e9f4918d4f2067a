"""Training under DeepSpeed ZeRO stage 2 (accelerate's DeepSpeed path, the shipped deepspeed-zero2.yaml).

``accelerator.prepare`` hands the denoiser and the AdamW optimiser to ``deepspeed.initialize``: the model comes
back as a DeepSpeed engine around the same module (whose weights stay whole on every process), the optimiser
as a ZeRO optimiser. That one keeps, on each process, a flat fp32 copy of its partition of the trainable
weights (the master weights AdamW steps), its partition of the reduced gradients and AdamW's moments for that
partition only; after each step every process gathers the updated partitions back into the module's weights.

What the trainer does differently there (see :class:`loopdiff.training.trainer.Trainer`):

- the engine takes the optimiser step: the trainer runs each micro-batch's backward pass through
  ``engine.backward`` (without DeepSpeed's division by its accumulation steps: the trainer weights each
  micro-batch by its share of the step's pairs, as under DDP), marks the last one as the accumulation
  boundary, then calls ``engine.step()`` once per loopdiff optimiser step;
- ZeRO-2 reduces the gradients of every backward pass, a collective: every process runs the same number of
  them (weight-0 passes pad a process left with fewer micro-batches, as under FSDP);
- a step whose gradient norm is not finite is skipped by DeepSpeed itself (its overflow check); a step whose
  loss is not finite on some process has its last backward pass scaled by NaN, so DeepSpeed skips it too;
- checkpoints store the full AdamW state in ``torch.optim``'s format, gathered from the partitions by
  :func:`full_optimizer_state_dict` (every process takes part), and a resumed run writes the loaded weights
  into the master copies and the loaded moments into the partitions (:func:`load_full_state`).
"""

from __future__ import annotations

import logging
import sys
from typing import Any

import torch

CPU_NOTICE = "Setting accelerator to CPU"  # what DeepSpeed logs on importing when torch sees no CUDA device


class _DropCpuNotice(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return CPU_NOTICE not in record.getMessage()


def quiet_cpu_accelerator_notice() -> None:
    """Drop DeepSpeed's "[WARNING] Setting accelerator to CPU" from its logger (and nothing else it logs).

    Once DeepSpeed is installed (the test extra installs it), accelerate imports it in every run, and without
    a CUDA device it logs that notice, which says nothing a CPU run does not already know. A filter on the
    logger survives DeepSpeed's own set-up of it (which sets its level and handler), so this works before
    DeepSpeed is imported; calling it again adds nothing."""
    deepspeed_logger = logging.getLogger("DeepSpeed")
    if not any(isinstance(f, _DropCpuNotice) for f in deepspeed_logger.filters):
        deepspeed_logger.addFilter(_DropCpuNotice())


def zero_optimizer(optimizer: Any) -> Any | None:
    """The DeepSpeed ZeRO stage 1/2 optimiser behind accelerate's wrapper ``optimizer``, or None."""
    if "deepspeed" not in sys.modules:
        return None
    from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer

    inner = getattr(optimizer, "optimizer", optimizer)
    return inner if isinstance(inner, DeepSpeedZeroOptimizer) else None


def _groups(zero: Any) -> list[tuple[list[torch.nn.Parameter], torch.Tensor, dict[str, Any]]]:
    """Per parameter group: the module's parameters (in the optimiser's order), this process's flat fp32
    partition of them (the tensor AdamW steps) and the AdamW group holding it."""
    groups = zero.optimizer.param_groups
    return [(params, group["params"][0], group) for params, group in zip(zero.bit16_groups, groups)]


def _fragments(params: list[torch.nn.Parameter]):
    """(parameter, start in the flattened parameter, start in the flat partition, length) of each parameter's
    piece held by this process's partition."""
    for param in params:
        mapping = getattr(param, "_hp_mapping", None)
        if mapping is not None:
            lp, hp = mapping.lp_fragment_address, mapping.get_hp_fragment_address()
            yield param, lp.start, hp.start, lp.numel


def partition_numel(zero: Any) -> int:
    """How many fp32 master weights this process's partitions hold (padding included)."""
    return sum(flat.numel() for _, flat, _ in _groups(zero))


def full_optimizer_state_dict(zero: Any) -> dict[str, Any]:
    """The AdamW state of all partitions in ``torch.optim.Optimizer.state_dict``'s format (parameters numbered
    in the order of the parameter groups), gathered onto the CPU of the first process; every process must call
    it (one reduction per tensor), the others get no moments. Empty ``state`` before the first step, as an
    unsharded optimiser's."""
    state: dict[int, dict[str, Any]] = {}
    param_groups, index = [], 0
    for params, flat, group in _groups(zero):
        saved = zero.optimizer.state.get(flat, {})
        numbers = list(range(index, index + len(params)))
        index += len(params)
        param_groups.append({**{k: v for k, v in group.items() if k != "params"}, "params": numbers})
        if not saved:
            continue
        moments = [key for key, value in saved.items() if torch.is_tensor(value) and value.shape == flat.shape]
        pieces = {id(p): (lp, hp, n) for p, lp, hp, n in _fragments(params)}
        for number, param in zip(numbers, params):
            entry = {key: value.clone() for key, value in saved.items() if key not in moments}
            for key in moments:
                full = torch.zeros(param.numel(), dtype=saved[key].dtype, device=flat.device)
                if id(param) in pieces:
                    lp, hp, n = pieces[id(param)]
                    full.narrow(0, lp, n).copy_(saved[key].narrow(0, hp, n))
                # each element is held by one process, the others add zeros: the sum is exact
                torch.distributed.reduce(full, torch.distributed.get_global_rank(param._dp_group, 0),
                                         group=param._dp_group)
                entry[key] = full.view_as(param).cpu()
            state[number] = entry
    if torch.distributed.get_rank() != 0:
        return {}
    return {"state": state, "param_groups": param_groups}


def load_full_state(zero: Any, optimizer_state: dict[str, Any]) -> None:
    """After the module's weights were loaded from a checkpoint: copy them into the fp32 master partitions
    (which the next step updates and gathers back), and load ``optimizer_state`` (``torch.optim``'s format,
    as :func:`full_optimizer_state_dict` or an unsharded run writes it) into the AdamW state of this
    process's partitions. Raises ValueError when it holds another number of parameters."""
    groups = _groups(zero)
    saved_groups = optimizer_state["param_groups"]
    if [len(g["params"]) for g in saved_groups] != [len(params) for params, _, _ in groups]:
        raise ValueError(f"the optimiser state holds parameter groups of {[len(g['params']) for g in saved_groups]} "
                         f"parameters, the optimiser {[len(params) for params, _, _ in groups]}")
    for (params, flat, group), saved_group in zip(groups, saved_groups):
        with torch.no_grad():
            for param, lp, hp, n in _fragments(params):
                flat.narrow(0, hp, n).copy_(param.detach().flatten().narrow(0, lp, n))
        group.update({k: v for k, v in saved_group.items() if k != "params"})
        entries = [optimizer_state["state"].get(number) for number in saved_group["params"]]
        if all(entry is None for entry in entries):
            continue
        if any(entry is None for entry in entries):
            raise ValueError("the optimiser state holds moments for only some parameters of a group")
        first = entries[0]
        moments = [key for key, value in first.items() if torch.is_tensor(value) and value.dim() > 0]
        scalars = {key: value for key, value in first.items() if key not in moments}
        if any(not torch.equal(torch.as_tensor(e[k]), torch.as_tensor(v)) for e in entries for k, v in scalars.items()):
            raise ValueError("the parameters of a group have different AdamW step counts; ZeRO keeps one per group")
        pieces = {id(p): (lp, hp, n) for p, lp, hp, n in _fragments(params)}
        state = zero.optimizer.state.setdefault(flat, {})
        for key, value in scalars.items():
            state[key] = value.clone().to(flat.device) if torch.is_tensor(value) else value
        for key in moments:
            buffer = state.get(key)
            if buffer is None:
                buffer = state[key] = torch.zeros_like(flat)
            with torch.no_grad():
                buffer.zero_()
                for param, entry in zip(params, entries):
                    if id(param) in pieces:
                        lp, hp, n = pieces[id(param)]
                        buffer.narrow(0, hp, n).copy_(entry[key].flatten().narrow(0, lp, n))
