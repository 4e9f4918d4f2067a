"""Run by tests/test_deepspeed.py under ``accelerate launch --config_file <shipped deepspeed-zero2.yaml or ddp.yaml>
--num_processes 2``: the tiny pipeline trained by two CPU processes with gloo, then exported.

``deepspeed`` as the first argument corrects accelerate's process count, as a CPU stand-in for GPUs. Under a
DeepSpeed launch accelerate 1.15 lets DeepSpeed start the process group (on the CPU: DeepSpeed's CPU
accelerator with gloo, as oneCCL is not installed), but without a GPU it takes no backend of its own and so
counts one process on each rank (``PartialState``: ``backend`` None -> ``num_processes`` 1, ``process_index``
0), although the group holds both. Before the Accelerator is built, the worker sets the process state's
backend, process count and index from the process group, and builds the Accelerator without ``cpu=True``
(which ``model.device=cpu`` asks for, and with which accelerate runs plain DDP instead of DeepSpeed); everything
after that (DeepSpeed's engine and ZeRO-2 optimiser from the shipped file's settings, its reductions over gloo)
is what accelerate and DeepSpeed do on GPUs. ``ddp`` runs the same training under plain data parallel. Both
train with ``model.device=cpu``, so that either resumes the other's checkpoints.

Arguments: deepspeed|ddp, the output folder, the number of epochs, then ``key=value`` settings: ``lora=1``,
``micro=N`` (training.micro_batch_size), ``nan_rank1=1`` (the reward is NaN for rank 1's first prompt group in
epoch 1), ``inject=loss`` or ``inject=gradient`` (rank 1's loss, or its gradient, is infinite in the first
optimiser step of epoch 1). Each process writes ``rank<i>.json`` into the output folder.
"""

import json
import math
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from accelerate import Accelerator  # noqa: E402
from accelerate.state import PartialState  # noqa: E402

import loopdiff.training.trainer as trainer_module  # noqa: E402
from loopdiff.training import zero  # noqa: E402
from multiprocess_helpers import worker_arguments, worker_trainer  # noqa: E402


class CPUCountedDeepSpeed(Accelerator):
    """An Accelerator on the CPU under a DeepSpeed launch that counts the processes DeepSpeed's group holds
    (see the module docstring)."""

    def __init__(self, *args, **kwargs):
        assert os.environ.get("ACCELERATE_USE_DEEPSPEED") == "true", "launch with the shipped deepspeed-zero2.yaml"
        state = PartialState()  # DeepSpeed starts the process group here
        assert state.backend is None and state.num_processes == 1, (state.backend, state.num_processes)
        assert torch.distributed.get_world_size() == 2, torch.distributed.get_world_size()
        PartialState._shared_state.update(
            backend=torch.distributed.get_backend(), num_processes=torch.distributed.get_world_size(),
            process_index=torch.distributed.get_rank(), local_process_index=int(os.environ["LOCAL_RANK"]),
        )
        super().__init__(*args, **{**kwargs, "cpu": False})
        assert self.distributed_type.value == "DEEPSPEED" and self.num_processes == 2


def inject(trainer, kind: str) -> None:
    """Make rank 1's loss (``loss``: its gradient stays finite) or its gradient (``gradient``) infinite in the
    first micro-batch of epoch 1."""
    real, calls = trainer.loop.minibatch_loss, [0]

    def loss(batch, micro):
        out = real(batch, micro)
        calls[0] += trainer.epoch == 0
        if calls[0] == 1 and trainer.epoch == 0 and trainer.accelerator.process_index == 1:
            if kind == "loss":
                out.loss = out.loss + math.inf
            else:
                out.loss.register_hook(lambda grad: grad * math.inf)
        return out

    trainer.loop.minibatch_loss = loss


def main() -> None:
    backend, out, epochs, settings = worker_arguments(sys.argv)
    torch.set_num_threads(1)
    if backend == "deepspeed":
        trainer_module.Accelerator = CPUCountedDeepSpeed
    trainer = worker_trainer(out, epochs, settings, max_grad_norm=0.5)
    if "inject" in settings:
        inject(trainer, settings["inject"])
    engine, optimizer = trainer.train_unet, zero.zero_optimizer(trainer.optimizer)
    info = {
        "distributed_type": trainer.accelerator.distributed_type.value,
        "processes": trainer.accelerator.num_processes,
        "engine": type(engine).__name__,
        "optimizer": type(optimizer).__name__,
        "trained_numel": sum(p.numel() for p in trainer.unet.parameters() if p.requires_grad),
    }
    if optimizer is not None:
        info.update(zero_stage=engine.zero_optimization_stage(), gradient_clipping=engine.gradient_clipping(),
                    gradient_accumulation_steps=engine.gradient_accumulation_steps(),
                    partition_numel=zero.partition_numel(optimizer))
    trainer.train()
    trainer.export()
    info["epoch"] = trainer.epoch
    if optimizer is not None:
        info["moment_numel"] = sum(s["exp_avg"].numel() for s in optimizer.optimizer.state.values())
        info["engine_steps"], info["engine_skipped"] = engine.global_steps, engine.skipped_steps
    (out / f"rank{trainer.accelerator.process_index}.json").write_text(json.dumps(info))


if __name__ == "__main__":
    main()
