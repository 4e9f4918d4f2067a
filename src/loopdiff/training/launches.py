"""``run.json`` in the run folder: how each launch of the run actually ran, which ``config.json`` (the settings
asked for) cannot say: the number of processes, the distributed backend, the device and the mixed precision in
use (accelerate runs ``fp16`` on the CPU in fp32: it has no fp16 autocast there). A resumed run appends its
launch; a run started over begins a new list."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

RUN_FILE = "run.json"


def precision_in_use(asked: str, native_amp: bool, distributed_type: str) -> str:
    """The mixed precision a run computes in: ``asked`` when accelerate autocasts to it (``native_amp``) or
    DeepSpeed handles it, else ``no`` (fp32)."""
    return asked if asked == "no" or native_amp or distributed_type == "DEEPSPEED" else "no"


def record_launch(run_dir: Path, launch: dict[str, Any], resumed: bool) -> list[dict[str, Any]]:
    """Append ``launch`` to ``run_dir/run.json``'s launches (a fresh list unless ``resumed``); returns them."""
    path = Path(run_dir) / RUN_FILE
    launches = read_launches(run_dir) if resumed else []
    launches.append(launch)
    path.write_text(json.dumps({"launches": launches}, indent=2))
    return launches


def read_launches(run_dir: Path) -> list[dict[str, Any]]:
    """The launches ``run.json`` records (none when it is missing or unreadable)."""
    path = Path(run_dir) / RUN_FILE
    try:
        return list(json.loads(path.read_text())["launches"])
    except (OSError, ValueError, KeyError, TypeError):
        return []
