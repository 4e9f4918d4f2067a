"""The evaluation grids a run writes: one column per image shown, each titled with its model."""

from __future__ import annotations

import numpy as np
from PIL import Image

from trainer_helpers import make_trainer

CELL, GAP, LABELS, TITLES = 128, 4, 220, 18  # grids.image_grid's layout with row labels and column titles


def title_strip(grid: np.ndarray, column: int) -> np.ndarray:
    """The pixels of the title above ``column``."""
    x = LABELS + column * (CELL + GAP)
    return grid[:TITLES, x: x + CELL]


def test_base_vs_final_titles_each_of_the_images_per_prompt_by_model(tmp_path) -> None:
    trainer = make_trainer(tmp_path, "loop", eval={"max_prompts": 2, "images_per_prompt": 2})
    trainer.train()
    grid = np.asarray(Image.open(trainer.run_dir / "grids" / "base_vs_final.png").convert("L"))
    assert grid.shape == (TITLES + 2 * (CELL + GAP), LABELS + 4 * (CELL + GAP))  # 2 prompts x (2 base, 2 final)
    strips = [title_strip(grid, c) for c in range(4)]
    assert (strips[0] < 128).any() and (strips[2] < 128).any()  # both titles are written
    assert np.array_equal(strips[0], strips[1]) and np.array_equal(strips[2], strips[3])  # base base, final final
    assert not np.array_equal(strips[1], strips[2])  # not base base base final


def test_a_single_panel_curve_keeps_its_whole_title(tmp_path) -> None:
    from types import SimpleNamespace

    from loopdiff.study.curves import plot_table_curves

    curve = np.array([[1, 0.1], [2, 0.3], [3, 0.2]])
    spec = SimpleNamespace(label=lambda method: method.upper(), tasks={"only": SimpleNamespace(label="Only")})
    results = SimpleNamespace(curves={("only", "loop"): {0: curve, 1: curve + [0, 0.1]}})
    table = SimpleNamespace(methods=["base", "loop"], tasks=["only"], title="A table with a long enough title")
    path = plot_table_curves(spec, results, table, tmp_path / "curves.png")
    pixels = np.asarray(Image.open(path).convert("L"))
    top = pixels[: pixels.shape[0] // 8]
    assert (top < 128).any()  # the title is drawn in the top band
    assert (top[:, 0] > 250).all() and (top[:, -1] > 250).all()  # and no letter is cut off at either edge
