"""What a run writes of its evaluations: ``eval/<tag>.json`` (means, per-prompt means, prompts), the images of
the first prompts (``eval/<tag>_grid.pt``, ``grids/<tag>.png``) and the base-vs-final comparison grid."""

from __future__ import annotations

import json
import pickle
import sys
import warnings
from pathlib import Path

import torch

from loopdiff.evaluation import EvalResult
from loopdiff.grids import save_grid, side_by_side


def write_evaluation(run_dir: Path, tag: str, epoch: int, result: EvalResult) -> Path | None:
    """Write the evaluation ``tag`` of epoch ``epoch``; says on stderr which rewards gave non-finite scores.
    Returns the grid image's path."""
    out = Path(run_dir) / "eval"
    out.mkdir(parents=True, exist_ok=True)
    record = {"tag": tag, "epoch": epoch, **result.record()}
    if (warning := result.nonfinite_warning()) is not None:
        print(f"{tag}: {warning}", file=sys.stderr)
    (out / f"{tag}.json").write_text(json.dumps(record, indent=1))
    torch.save(result.grid_images, out / f"{tag}_grid.pt")
    n = len(result.grid_images)
    return save_grid(Path(run_dir) / "grids" / f"{tag}.png", list(result.grid_images[:, :4]), result.prompts[:n])


def comparison_grid(run_dir: Path, tags: tuple[str, str] = ("base", "final")) -> Path | None:
    """Side-by-side grid of two evaluations (same prompts, same seeds), or None when one is missing."""
    run_dir = Path(run_dir)
    files = [run_dir / "eval" / f"{tag}_grid.pt" for tag in tags]
    if not all(f.is_file() for f in files):
        return None
    try:
        grids = {tag: torch.load(f, weights_only=True) for tag, f in zip(tags, files)}
    except pickle.UnpicklingError as err:  # not a tensor file: never run what is inside it
        warnings.warn(f"no comparison grid: {files[0].parent} holds a grid file that is not plain tensors ({err})")
        return None
    prompts = json.loads((run_dir / "eval" / f"{tags[0]}.json").read_text())["prompts"]
    n = min(len(g) for g in grids.values())
    path = run_dir / "grids" / f"{tags[0]}_vs_{tags[1]}.png"
    return side_by_side(path, prompts[:n], {t: g[:n] for t, g in grids.items()}, per_model=3)
