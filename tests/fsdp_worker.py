"""Run by tests/test_fsdp.py under ``accelerate launch --config_file <shipped fsdp.yaml or ddp.yaml>
--num_processes 2``: the tiny pipeline trained by two CPU processes with gloo, then exported.

``fsdp`` as the first argument forces accelerate's FSDP2 path, as a CPU stand-in for GPUs: accelerate enables
FSDP only on GPUs (and other accelerators), and on the CPU it runs an FSDP launch as plain data parallel
(DistributedType.MULTI_CPU). Setting the accelerator state's ``distributed_type`` to FSDP, with the FSDP
plugin accelerate builds from the launch's environment (the shipped fsdp.yaml's settings), makes
``accelerator.prepare`` shard the denoiser with torch's ``fully_shard`` exactly as on GPUs; torch's FSDP2
itself runs on the CPU with gloo. ``ddp`` runs the same training under plain data parallel.

Arguments: fsdp|ddp, the output folder, the number of epochs, then ``key=value`` settings: ``lora=1``,
``nan_rank1=1`` (the reward is NaN for rank 1's first prompt group in epoch 1), ``micro=N``
(training.micro_batch_size), ``nan_check=1`` (after the export, a NaN in rank 1's shard of one weight, then
a checkpoint, which both ranks must refuse). Each process writes ``rank<i>.json`` into the output folder.
"""

import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from accelerate import Accelerator, FullyShardedDataParallelPlugin  # noqa: E402
from accelerate.state import PartialState  # noqa: E402
from accelerate.utils import DistributedType  # noqa: E402

import loopdiff.training.trainer as trainer_module  # noqa: E402
from loopdiff.training.guards import NonFiniteError  # noqa: E402
from loopdiff.sharding import local  # noqa: E402
from multiprocess_helpers import worker_arguments, worker_trainer  # noqa: E402


class CPUForcedFSDP(Accelerator):
    """An Accelerator on the CPU that takes accelerate's FSDP2 path (see the module docstring)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        assert os.environ.get("ACCELERATE_USE_FSDP") == "true", "launch with the shipped fsdp.yaml"
        assert self.state.distributed_type == DistributedType.MULTI_CPU, self.state.distributed_type
        self.state.fsdp_plugin = FullyShardedDataParallelPlugin()  # from FSDP_* set by accelerate launch
        self.state.distributed_type = DistributedType.FSDP
        # accelerate copies the type into the process state too (AcceleratorState.__init__ does it on GPUs),
        # else the next AcceleratorState() (the prepared optimiser makes one) would reset it to MULTI_CPU.
        PartialState._shared_state["distributed_type"] = DistributedType.FSDP


def main() -> None:
    backend, out, epochs, settings = worker_arguments(sys.argv)
    torch.set_num_threads(1)
    if backend == "fsdp":
        trainer_module.Accelerator = CPUForcedFSDP
    trainer = worker_trainer(out, epochs, settings)
    params = [p for p in trainer.unet.parameters() if p.requires_grad]
    info = {
        "distributed_type": trainer.accelerator.distributed_type.value,
        "processes": trainer.accelerator.num_processes,
        "sharded": trainer.sharded,
        "parameter_types": sorted({type(p).__name__ for p in params}),
        "local_numel": sum(local(p).numel() for p in params),
        "numel": sum(p.numel() for p in params),
        "fsdp_units": sum(type(m).__name__.startswith("FSDP") for m in trainer.unet.modules()),
    }
    trainer.train()
    trainer.export()
    info["epoch"] = trainer.epoch
    if settings.get("nan_check") == "1":  # a NaN in rank 1's shard of one weight: both ranks refuse to save
        name, param = next((n, p) for n, p in trainer.unet.named_parameters() if p.requires_grad and p.shape[0] > 1)
        if trainer.accelerator.process_index == 1:
            with torch.no_grad():
                local(param).view(-1)[0] = float("nan")
        try:
            trainer.save()
            info["nan_check"] = "saved"
        except NonFiniteError as error:
            info["nan_check"] = str(error)
        info["nan_parameter"] = name
    info["distributed_type_at_end"] = trainer.accelerator.distributed_type.value
    info["fsdp2_at_end"] = trainer.accelerator.is_fsdp2
    (out / f"rank{trainer.accelerator.process_index}.json").write_text(json.dumps(info))


if __name__ == "__main__":
    main()
