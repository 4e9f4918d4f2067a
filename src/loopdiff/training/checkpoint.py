"""Save and resume the whole training state.

A checkpoint folder ``<run>/checkpoints/epoch_<N>/`` holds the trainable weights (safetensors: the whole UNet,
or the LoRA adapter), the optimiser and LR-schedule state, the per-prompt stat tracker, the EMA of the weights
(with ``training.ema_decay``), the text encoder's LoRA adapter (with ``model.train_text_encoder``), the RNG
states and the epoch. Sampling and shuffling draw from generators seeded by (seed, epoch), so a resumed run on
the CPU continues exactly as the uninterrupted one.

A checkpoint is complete only once its ``manifest.json`` (each file's size and sha256) exists: it is written
last, atomically by a rename, and removed first when the checkpoint is pruned. Loading verifies every file
against it, so a damaged newest checkpoint is reported and the previous complete one is used. The training
state loads with ``torch.load(weights_only=True)``: it holds only tensors, numbers, strings and containers.

When FSDP shards the UNet, every process takes part in a save (the weights, the EMA and the optimiser state
are gathered in full onto the main process, which alone writes) and every process loads the whole
checkpoint and keeps its shards. The files are the same as an unsharded run's, so either kind of run
resumes from the other's checkpoints. Under DeepSpeed ZeRO-2 the weights are whole on every process but
the AdamW state is partitioned: every process takes part in gathering it into the same format
(:mod:`loopdiff.training.zero`), and on resume every process keeps its partition.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import random
import re
import shutil
import signal
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from loopdiff.config import ConfigError, RunConfig, fixed_changes
from loopdiff.training.ema import ParameterEMA
from loopdiff.training.guards import check_finite_weights
from loopdiff.sharding import full_optimizer_state_dict, is_sharded, load_full_optimizer_state_dict
from loopdiff.models import load_trainable_state_dict, trainable_state_dict
from loopdiff.training import zero

WEIGHTS = "trainable.safetensors"
STATE = "training_state.pt"
INFO = "checkpoint.json"
MANIFEST = "manifest.json"
FILES = (WEIGHTS, STATE, INFO)
FAULT_ENV = "LOOPDIFF_FAULT"  # "<point>@<epoch>": kill this process there (fault-injection tests only)
_NAME = re.compile(r"epoch_\d{5}")


class CheckpointError(RuntimeError):
    """A checkpoint is missing a file or does not match its manifest."""


@dataclass
class Resumable:
    """The objects a checkpoint restores."""

    unet: torch.nn.Module
    lora: bool
    optimizer: torch.optim.Optimizer
    lr_scheduler: torch.optim.lr_scheduler.LRScheduler
    advantage_fn: Any  # an AdvantageFunction: its state (a DDPO tracker's per-prompt rewards) is saved as 'tracker'
    ema: ParameterEMA | None = None
    text_encoder: torch.nn.Module | None = None  # with LoRA adapters (model.train_text_encoder)


def checkpoint_dir(run_dir: Path, epoch: int) -> Path:
    return Path(run_dir) / "checkpoints" / f"epoch_{epoch:05d}"


def fault_point(name: str, epoch: int) -> None:
    """SIGKILL this process when ``LOOPDIFF_FAULT`` names this point and epoch (for fault-injection tests)."""
    if os.environ.get(FAULT_ENV) == f"{name}@{epoch}":
        os.kill(os.getpid(), signal.SIGKILL)


def checkpoint_folders(run_dir: Path) -> list[Path]:
    """Every checkpoint folder (complete or not), oldest first."""
    root = Path(run_dir) / "checkpoints"
    return sorted(p for p in root.iterdir() if _NAME.fullmatch(p.name)) if root.is_dir() else []


def is_complete(path: Path) -> bool:
    """Whether the checkpoint's manifest exists (it is written last)."""
    return (path / MANIFEST).is_file()


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def verify(path: Path) -> None:
    """Raise CheckpointError naming the first file that is missing or differs from the manifest."""
    try:
        manifest = json.loads((path / MANIFEST).read_text())
        files = manifest["files"]
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise CheckpointError(f"{MANIFEST} is unreadable ({error})") from None
    for name in FILES:
        entry, file = files.get(name), path / name
        if entry is None or not file.is_file():
            raise CheckpointError(f"{name} is missing")
        if file.stat().st_size != entry["size"]:
            raise CheckpointError(f"{name} has {file.stat().st_size} bytes, the manifest {entry['size']}")
        if _sha256(file) != entry["sha256"]:
            raise CheckpointError(f"{name} does not match its sha256 checksum")


def complete_checkpoints(run_dir: Path) -> Iterator[Path]:
    """The complete checkpoints, newest first."""
    yield from (p for p in reversed(checkpoint_folders(run_dir)) if is_complete(p))


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The newest complete checkpoint that matches its manifest; warns in one line about each damaged newer one.

    Raises CheckpointError when checkpoints exist but every complete one is damaged.
    """
    damaged: list[str] = []
    for path in complete_checkpoints(run_dir):
        try:
            verify(path)
        except CheckpointError as error:
            damaged.append(f"{path.name}: {error}")
            print(f"warning: checkpoint {path} is damaged ({error}); trying the previous one", file=sys.stderr)
            continue
        return path
    if damaged:
        raise CheckpointError(f"no usable checkpoint in {Path(run_dir) / 'checkpoints'} ({'; '.join(damaged)}); "
                              "start over with output.resume=false or a new output.dir")
    return None


def read_info(path: Path) -> dict[str, Any]:
    """The checkpoint's info (``epoch``, ``history``, ``config``)."""
    return json.loads((path / INFO).read_text())


def resume_point(run_dir: Path, config: RunConfig) -> Path | None:
    """The checkpoint of ``run_dir`` to resume from, after checking that ``config`` may continue it.

    Raises ConfigError naming the fields that changed but are fixed for a run's life, or when
    ``training.epochs`` is below the epochs already trained.
    """
    path = latest_checkpoint(run_dir)
    if path is None:
        return None
    info = read_info(path)
    changes = fixed_changes(info.get("config", {}), config)
    way_out = "start over with output.resume=false (removes its checkpoints) or use a new output.dir"
    if changes:
        raise ConfigError(f"output.dir='{run_dir}' holds a run with other settings that cannot change "
                          f"mid-run: {'; '.join(changes)}; rerun with the saved values, or {way_out}")
    epochs = config.training.epochs
    if epochs < info["epoch"]:
        raise ConfigError(f"training.epochs={epochs} is below the {info['epoch']} epochs already trained in "
                          f"'{run_dir}'; allowed: >= {info['epoch']}, or {way_out}")
    return path


def truncate_metrics(run_dir: Path, epoch: int) -> None:
    """Drop the epochs logged after ``epoch`` from ``metrics.jsonl`` (a resumed run trains them again)."""
    metrics_file = Path(run_dir) / "metrics.jsonl"
    if metrics_file.is_file():
        lines = [l for l in metrics_file.read_text().splitlines() if l and json.loads(l)["epoch"] <= epoch]
        metrics_file.write_text("".join(line + "\n" for line in lines))


def start_over(run_dir: Path) -> None:
    """Remove the run folder's checkpoints and metrics (``output.resume=false``)."""
    for path in checkpoint_folders(run_dir):
        remove_checkpoint(path)
    (Path(run_dir) / "metrics.jsonl").unlink(missing_ok=True)


def _rng_state() -> dict[str, Any]:
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "numpy": {"name": name, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(gauss)},
        "python": {"version": version, "internal": list(internal), "gauss_next": gauss_next},
    }


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    p = state["python"]
    random.setstate((p["version"], tuple(p["internal"]), p["gauss_next"]))


def _write_json_atomically(path: Path, value: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w") as handle:
        json.dump(value, handle, indent=2)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def _fsync(path: Path) -> None:
    with path.open("rb") as handle:
        os.fsync(handle.fileno())


def remove_checkpoint(path: Path, epoch: int | None = None) -> None:
    """Delete a checkpoint: its manifest first, so it never looks complete while half deleted."""
    (path / MANIFEST).unlink(missing_ok=True)
    if epoch is not None:
        fault_point("prune", epoch)
    for name in FILES:  # the heavy files go one by one: a kill between them leaves an incomplete folder
        (path / name).unlink(missing_ok=True)
    shutil.rmtree(path, ignore_errors=True)


def save_checkpoint(
    run_dir: Path, epoch: int, parts: Resumable, extra: dict[str, Any], keep: int = 2, write: bool = True
) -> Path | None:
    """Write the checkpoint for ``epoch`` (the number of finished epochs) and prune older ones.

    With the UNet sharded by FSDP, or the optimiser by DeepSpeed ZeRO, every process calls this: all gather
    the state, only the one with ``write`` (the main process) writes; the others return None.
    Raises NonFiniteError, writing nothing, when a weight is non-finite: the older checkpoints stay as they are.
    """
    sharded, zero_optimizer = is_sharded(parts.unet), zero.zero_optimizer(parts.optimizer)
    if zero_optimizer is not None:  # partitioned AdamW state, whole weights: only the state is gathered
        optimizer = zero.full_optimizer_state_dict(zero_optimizer)
    if not write and not sharded:
        return None
    weights = trainable_state_dict(parts.unet, parts.lora)
    ema = parts.ema.state_dict() if parts.ema is not None else None
    if zero_optimizer is None:
        optimizer = full_optimizer_state_dict(parts.unet, parts.optimizer) if sharded else parts.optimizer.state_dict()
    if not write:
        return None
    check_finite_weights(weights.items(), f"the checkpoint of epoch {epoch}")
    if ema is not None:
        check_finite_weights(((f"ema.{k}", v) for k, v in ema["average"].items()), f"the checkpoint of epoch {epoch}")
    path = checkpoint_dir(run_dir, epoch)
    tmp = path.with_name(path.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file(weights, str(tmp / WEIGHTS))
    fault_point("weights", epoch)
    state = {
        "optimizer": optimizer,
        "lr_scheduler": parts.lr_scheduler.state_dict(),
        "tracker": parts.advantage_fn.state_dict() if parts.advantage_fn is not None else None,
        "ema": ema,
        "rng": _rng_state(),
    }
    if parts.text_encoder is not None:
        state["text_encoder_lora"] = trainable_state_dict(parts.text_encoder, lora=True)
    torch.save(state, tmp / STATE)
    (tmp / INFO).write_text(json.dumps({"epoch": epoch, **extra}, indent=2))
    for name in FILES:
        _fsync(tmp / name)
    if path.exists():
        remove_checkpoint(path)
    tmp.rename(path)
    fault_point("manifest", epoch)
    files = {name: {"size": (path / name).stat().st_size, "sha256": _sha256(path / name)} for name in FILES}
    _write_json_atomically(path / MANIFEST, {"epoch": epoch, "files": files})
    prune(run_dir, keep, epoch)
    return path


def prune(run_dir: Path, keep: int, epoch: int) -> None:
    """Keep the ``keep`` newest complete checkpoints; delete older and incomplete ones and stale temporaries."""
    kept = list(complete_checkpoints(run_dir))[:keep]
    for old in checkpoint_folders(run_dir):
        if old not in kept:
            remove_checkpoint(old, epoch)
    for stale in (Path(run_dir) / "checkpoints").glob("epoch_*.tmp"):
        shutil.rmtree(stale, ignore_errors=True)


def load_checkpoint(path: Path, parts: Resumable) -> dict[str, Any]:
    """Restore ``parts`` from ``path`` (verified against its manifest); returns the checkpoint info."""
    verify(path)
    load_trainable_state_dict(parts.unet, load_file(str(path / WEIGHTS)), parts.lora)
    try:
        state = torch.load(path / STATE, weights_only=True)
    except pickle.UnpicklingError as error:
        reason = str(error).strip().splitlines()[0]
        raise CheckpointError(f"checkpoint {path}: {STATE} holds more than tensors and numbers, refused: {reason}")
    zero_optimizer = zero.zero_optimizer(parts.optimizer)
    if is_sharded(parts.unet):
        load_full_optimizer_state_dict(parts.unet, parts.optimizer, state["optimizer"])
    elif zero_optimizer is not None:  # the weights into the fp32 master copies, the AdamW state into the partitions
        zero.load_full_state(zero_optimizer, state["optimizer"])
    else:
        parts.optimizer.load_state_dict(state["optimizer"])
    parts.lr_scheduler.load_state_dict(state["lr_scheduler"])
    if parts.advantage_fn is not None and state["tracker"] is not None:
        parts.advantage_fn.load_state_dict(state["tracker"])
    if parts.ema is not None:
        if state.get("ema") is None:
            raise CheckpointError(f"checkpoint {path} holds no EMA state, but training.ema_decay is set")
        try:
            parts.ema.load_state_dict(state["ema"])
        except ValueError as error:
            raise CheckpointError(f"checkpoint {path}: {error}") from None
    if parts.text_encoder is not None:
        if state.get("text_encoder_lora") is None:
            raise CheckpointError(f"checkpoint {path} holds no text-encoder LoRA, but model.train_text_encoder is set")
        load_trainable_state_dict(parts.text_encoder, state["text_encoder_lora"], lora=True)
    _set_rng_state(state["rng"])
    return read_info(path)
