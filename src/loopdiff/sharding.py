"""Training with the weights sharded by FSDP2 (``torch.distributed.fsdp.fully_shard``, what accelerate's FSDP2
path applies to the denoiser).

``fully_shard`` works in place: the module stays the same object, its class becomes an FSDP subclass, and every
parameter becomes a DTensor holding this process's shard. The full weights exist only while a forward or
backward pass runs: each block gathers them from all processes first. What that changes for the trainer:

- the parameters are new objects: they are taken from the module after ``accelerator.prepare``;
- a forward pass is a collective: every process runs the same number of them;
- sampling runs under ``torch.no_grad``, not inference mode: the root module keeps the weights it gathered
  from one forward pass to the next, and weights gathered under inference mode cannot enter a training pass;
- before the parameters are read or written directly (an EMA swap, a finiteness check, a load) the module is
  resharded (:func:`reshard`), so that the registered parameters are the shards and the next forward pass
  gathers them again;
- a checkpoint or export gathers the full tensors first (every process takes part, the first one keeps them).

Every function here leaves a module that is not sharded (one process, DDP) as it was.
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterable

import torch

try:
    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.tensor import DTensor, distribute_tensor
except ImportError:  # a torch build without torch.distributed: nothing can be sharded
    FSDPModule = DTensor = None  # type: ignore[assignment,misc]


def is_sharded(module: torch.nn.Module) -> bool:
    """Whether ``module`` was sharded by ``fully_shard`` (FSDP2)."""
    return FSDPModule is not None and isinstance(module, FSDPModule)


def is_dtensor(tensor: Any) -> bool:
    return DTensor is not None and isinstance(tensor, DTensor)


def local(tensor: torch.Tensor) -> torch.Tensor:
    """This process's shard of a DTensor (a view sharing its storage); any other tensor itself."""
    return tensor.to_local() if is_dtensor(tensor) else tensor


def reshard(module: torch.nn.Module) -> None:
    """Free the gathered weights of every FSDP unit in ``module``, so that its registered parameters are the
    shards and the next forward pass gathers them afresh (the root unit keeps them after a forward pass)."""
    for sub in module.modules():
        if is_sharded(sub):
            sub.reshard()


def no_autograd(module: torch.nn.Module) -> contextlib.AbstractContextManager:
    """The context sampling from ``module`` runs in: inference mode, or ``torch.no_grad`` for a sharded module
    (its root unit reuses the weights gathered here in the next training pass, which inference tensors refuse)."""
    return torch.no_grad() if is_sharded(module) else torch.inference_mode()


def _rank() -> int:
    return torch.distributed.get_rank() if torch.distributed.is_initialized() else 0


def full_tensors(named: Iterable[tuple[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """CPU copies of the full tensors, by name.

    A DTensor is gathered from all processes (a collective: every process calls this with the same names in
    the same order) and kept on the first process only; a plain tensor is copied on every process.
    """
    out = {}
    first = _rank() == 0
    for name, tensor in named:
        if is_dtensor(tensor):
            full = tensor.detach().full_tensor()
            if first:
                out[name] = full.cpu().clone()
            del full
        else:
            out[name] = tensor.detach().cpu().clone()
    return out


def shard_like(full: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """This process's shard of ``full`` laid out as the DTensor ``like`` (no communication: every process holds
    ``full``); ``full`` itself when ``like`` is not a DTensor."""
    if not is_dtensor(like):
        return full
    placed = full.to(device=like.device, dtype=like.dtype)
    return distribute_tensor(placed, like.device_mesh, like.placements, src_data_rank=None).to_local()


def _options(**kwargs: Any):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, **kwargs)


def full_model_state_dict(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The full state dict of a sharded module on the CPU of the first process (an empty dict on the others);
    every process must call it."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    reshard(module)
    return get_model_state_dict(module, options=_options(cpu_offload=True))


def load_full_model_state_dict(module: torch.nn.Module, state: dict[str, torch.Tensor], strict: bool = True) -> Any:
    """Load full tensors (every process holds all of ``state``) into a sharded module's shards; returns the
    missing and unexpected keys (``strict`` raises on them instead)."""
    from torch.distributed.checkpoint.state_dict import set_model_state_dict

    reshard(module)
    return set_model_state_dict(module, dict(state), options=_options(strict=strict))


def _inner(optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
    return getattr(optimizer, "optimizer", optimizer)  # accelerate's AcceleratedOptimizer wraps the torch one


def full_optimizer_state_dict(module: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """The optimiser state of a sharded module, gathered in full on the first process (empty on the others;
    every process must call it), in ``torch.optim.Optimizer.state_dict``'s format: parameters numbered in
    the order of the parameter groups, so a checkpoint is the same whether its run was sharded or not."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    reshard(module)
    by_name = get_optimizer_state_dict(module, _inner(optimizer), options=_options(cpu_offload=True))
    if not by_name:
        return {}
    index = {name: i for i, name in enumerate(n for group in by_name["param_groups"] for n in group["params"])}
    return {
        "state": {index[name]: value for name, value in by_name["state"].items()},
        "param_groups": [{**group, "params": [index[n] for n in group["params"]]} for group in by_name["param_groups"]],
    }


def load_full_optimizer_state_dict(
    module: torch.nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any]
) -> None:
    """Load :func:`full_optimizer_state_dict`'s output (held by every process) into a sharded module's
    optimiser."""
    from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

    inner = _inner(optimizer)
    names = {id(p): name for name, p in module.named_parameters()}
    order = [names[id(p)] for group in inner.param_groups for p in group["params"]]
    saved = [i for group in state["param_groups"] for i in group["params"]]
    if len(saved) != len(order):
        raise ValueError(f"the optimiser state holds {len(saved)} parameters, the optimiser {len(order)}")
    by_name = {
        "state": {order[i]: value for i, value in state["state"].items()},
        "param_groups": [{**group, "params": [order[i] for i in group["params"]]} for group in state["param_groups"]],
    }
    reshard(module)
    set_optimizer_state_dict(module, inner, by_name, options=_options())


def unsharded_copy(module: torch.nn.Module, state: dict[str, torch.Tensor]) -> torch.nn.Module:
    """A plain module of a sharded diffusers model's own class and config holding the full ``state``, built
    on the meta device first so that its weights are not allocated twice (for saving it with diffusers)."""
    from accelerate import init_empty_weights

    cls = next(c for c in type(module).__mro__ if not issubclass(c, FSDPModule))
    with init_empty_weights():
        plain = cls.from_config(module.config)
    plain.load_state_dict(state, strict=True, assign=True)
    return plain.eval()
