"""Per-epoch metrics to the console, a JSONL file in the run folder, TensorBoard and (optionally) wandb; image
grids (evaluations, training samples) to TensorBoard and wandb."""

from __future__ import annotations

import json
import resource
import sys
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm


def tensor_stats(prefix: str, values: torch.Tensor) -> dict[str, float]:
    """mean/std/min/max of a 1-D tensor under ``prefix/``."""
    values = values.detach().float().cpu()
    std = values.std().item() if values.numel() > 1 else 0.0
    return {
        f"{prefix}/mean": values.mean().item(),
        f"{prefix}/std": std,
        f"{prefix}/min": values.min().item(),
        f"{prefix}/max": values.max().item(),
    }


def reset_peak_memory(device: torch.device | str) -> None:
    """Start a new peak for :func:`peak_memory_mb` (a run in a process that ran others before: a study
    worker). CUDA: the allocator's peak; Linux: the resident-set high-water mark (``/proc/self/clear_refs``)."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
    except OSError:
        pass  # not Linux: the peak stays the process's lifetime peak


def peak_memory_mb(device: torch.device | str) -> float:
    """Peak memory in MiB since the last :func:`reset_peak_memory`: allocated CUDA memory on a GPU, the
    resident set's high-water mark on a CPU (the process's lifetime peak where it cannot be reset)."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    try:
        with open("/proc/self/status") as handle:
            for line in handle:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 2**10  # kB
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10


class MetricsLogger:
    """Writes each epoch's metrics everywhere the run asked for."""

    CONSOLE_KEYS = ("reward/mean", "reward/std", "advantage/std", "loss", "approx_kl", "clip_fraction", "grad_norm")

    def __init__(
        self,
        run_dir: Path,
        tensorboard: bool = True,
        wandb: bool = False,
        wandb_project: str = "loopdiff",
        config: Mapping[str, Any] | None = None,
        enabled: bool = True,
    ):
        self.enabled = enabled
        self.path = Path(run_dir) / "metrics.jsonl"
        self.writer = None
        self.wandb_run = None
        if not enabled:
            return
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(Path(run_dir) / "tensorboard"))
        if wandb:
            try:
                import wandb as wandb_module
            except ImportError:
                raise ImportError("output.wandb=true needs the wandb package: pip install wandb") from None
            self.wandb_run = wandb_module.init(project=wandb_project, config=dict(config or {}), dir=str(run_dir))

    def log(self, epoch: int, metrics: Mapping[str, float]) -> None:
        if not self.enabled:
            return
        record = {"epoch": epoch, **{k: float(v) for k, v in metrics.items()}}
        with self.path.open("a") as handle:
            handle.write(json.dumps(record) + "\n")
        if self.writer is not None:
            for key, value in metrics.items():
                self.writer.add_scalar(key, float(value), epoch)
            self.writer.flush()
        if self.wandb_run is not None:
            self.wandb_run.log(dict(metrics), step=epoch)
        shown = "  ".join(f"{k.split('/')[0] if k.endswith('/mean') else k}={metrics[k]:.4g}"
                          for k in self.CONSOLE_KEYS if k in metrics)
        tqdm.write(f"epoch {epoch:4d}  {shown}  ({metrics.get('time/epoch', 0.0):.1f}s)")

    def log_image(self, tag: str, image: Image.Image, epoch: int) -> None:
        """``image`` (an image grid) under ``tag`` at ``epoch``, in TensorBoard and wandb (not the console)."""
        if not self.enabled:
            return
        if self.writer is not None:
            self.writer.add_image(tag, np.asarray(image.convert("RGB")), epoch, dataformats="HWC")
            self.writer.flush()
        if self.wandb_run is not None:
            import wandb as wandb_module

            self.wandb_run.log({tag: wandb_module.Image(image)}, step=epoch)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        if self.wandb_run is not None:
            self.wandb_run.finish()


def read_metrics(run_dir: Path) -> list[dict[str, float]]:
    """The metrics records of a run folder, in order."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
