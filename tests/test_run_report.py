"""A single run's report.html: its numbers are the evaluation files' and metrics.jsonl's, its images exist."""

from __future__ import annotations

import json
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest

from loopdiff.reports.run import build_run_report
from trainer_helpers import make_trainer


class Page(HTMLParser):
    """The image sources and, per table row with a ``data-reward``, its cells' text."""

    def __init__(self) -> None:
        super().__init__()
        self.images: list[str] = []
        self.rows: dict[str, list[str]] = {}
        self._row: str | None = None

    def handle_starttag(self, tag, attrs) -> None:
        attrs = dict(attrs)
        if tag == "img":
            self.images.append(attrs["src"])
        elif tag == "tr" and "data-reward" in attrs:
            self._row = attrs["data-reward"]
            self.rows[self._row] = []
        elif tag == "td" and self._row is not None:
            self.rows[self._row].append("")

    def handle_endtag(self, tag) -> None:
        if tag == "tr":
            self._row = None

    def handle_data(self, data) -> None:
        if self._row is not None and self.rows[self._row]:
            self.rows[self._row][-1] += data


def test_the_report_holds_the_runs_evaluation_and_links_its_images(tmp_path: Path) -> None:
    trainer = make_trainer(tmp_path, "loop", training={"epochs": 2},
                           eval={"max_prompts": 3, "images_per_prompt": 2, "rewards": ["jpeg_incompressibility"]})
    trainer.train()
    page = Page()
    page.feed(build_run_report(trainer.run_dir).read_text())
    base, final = (json.loads((trainer.run_dir / "eval" / f"{t}.json").read_text()) for t in ("base", "final"))
    assert set(page.rows) == {"red_minus_blue", "jpeg_incompressibility"}
    for name, cells in page.rows.items():
        assert cells[0] == name
        assert float(cells[1]) == pytest.approx(base["means"][name], abs=5e-5)
        assert float(cells[2]) == pytest.approx(final["means"][name], abs=5e-5)
        diff = np.subtract(final["per_prompt"][name], base["per_prompt"][name])  # paired, by hand
        change, se = (float(part) for part in cells[3].split("\u00b1"))
        assert change == pytest.approx(diff.mean(), abs=5e-5)
        assert se == pytest.approx(diff.std(ddof=1) / np.sqrt(len(diff)), abs=5e-5)
    assert "grids/base_vs_final.png" in page.images and "grids/training_reward.png" in page.images
    assert all((trainer.run_dir / src).is_file() for src in page.images)
    assert "epoch" in (trainer.run_dir / "report.html").read_text() and "of 2 (metrics.jsonl)" in \
        (trainer.run_dir / "report.html").read_text()
