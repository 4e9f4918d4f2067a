"""loopdiff: reinforcement-learning fine-tuning of text-to-image diffusion models (LOOP, DDPO, RLOO, ...).

``from loopdiff import RunConfig, Trainer, train``: see ``loopdiff.api.train`` and docs/custom-rewards.md.
The names load on first use, so ``import loopdiff`` stays light.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "RunConfig": "loopdiff.config",
    "load_config": "loopdiff.config",
    "Trainer": "loopdiff.training.trainer",
    "train": "loopdiff.api",
    "run_config": "loopdiff.api",
}
__all__ = [*_EXPORTS, "__version__"]


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'loopdiff' has no attribute {name!r}")
    return getattr(import_module(_EXPORTS[name]), name)
