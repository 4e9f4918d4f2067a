"""Image grids: rows of prompts, columns of samples, with the prompt written beside each row (evaluation
grids, ``loopdiff sample``, the study report)."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont


def to_pil(image: torch.Tensor) -> Image.Image:
    """(3, H, W) in [0, 1] -> PIL RGB."""
    array = (image.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()
    return Image.fromarray(np.ascontiguousarray(array))


def image_grid(
    rows: Sequence[torch.Tensor],
    row_labels: Sequence[str] = (),
    column_titles: Sequence[str] = (),
    cell: int = 128,
    label_width: int = 220,
) -> Image.Image:
    """One row per tensor (n, 3, H, W); small images are enlarged with nearest-neighbour to ``cell`` px."""
    font = ImageFont.load_default()
    n_cols = max(len(r) for r in rows)
    top = 18 if column_titles else 0
    left = label_width if row_labels else 0
    grid = Image.new("RGB", (left + n_cols * (cell + 4), top + len(rows) * (cell + 4)), "white")
    draw = ImageDraw.Draw(grid)
    for c, title in enumerate(column_titles):
        draw.text((left + c * (cell + 4) + 4, 2), title, fill="black", font=font)
    for r, images in enumerate(rows):
        y = top + r * (cell + 4)
        if row_labels:
            _draw_wrapped(draw, row_labels[r], (4, y + 4), label_width - 8, font)
        for c, image in enumerate(images):
            tile = to_pil(image).resize((cell, cell), Image.NEAREST)
            grid.paste(tile, (left + c * (cell + 4), y))
    return grid


def _draw_wrapped(draw: ImageDraw.ImageDraw, text: str, xy: tuple[int, int], width: int, font) -> None:
    words, line, lines = text.split(), "", []
    for word in words:
        trial = f"{line} {word}".strip()
        if draw.textlength(trial, font=font) > width and line:
            lines.append(line)
            line = word
        else:
            line = trial
    lines.append(line)
    for k, text_line in enumerate(lines[:8]):
        draw.text((xy[0], xy[1] + 12 * k), text_line, fill="black", font=font)


def save_grid(path: Path, rows: Sequence[torch.Tensor], row_labels: Sequence[str] = (),
              column_titles: Sequence[str] = ()) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    image_grid(rows, row_labels, column_titles).save(path)
    return path


def side_by_side(path: Path, prompts: Sequence[str], columns: dict[str, torch.Tensor], per_model: int = 2) -> Path:
    """For each prompt, ``per_model`` images of each model (same seeds), models left to right: at most the
    images each model has (``columns[name]``: (prompts, images, 3, H, W)), one column title per image."""
    per_model = min(per_model, *(images.shape[1] for images in columns.values()))
    rows, titles = [], []
    for name in columns:
        titles += [name] * per_model
    for p in range(len(prompts)):
        rows.append(torch.cat([images[p, :per_model] for images in columns.values()]))
    return save_grid(path, rows, prompts, titles)
