"""The study report opened in headless Chromium: every image decodes at its file's size and the table cells
show the means and standard errors computed by hand from the runs' files."""

from __future__ import annotations

import json
import math
import statistics
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import pytest
import torch
from PIL import Image

from loopdiff.study import study_spec_from_dict
from loopdiff.reports.study import build_report

CHROMIUM = Path("/usr/bin/chromium")
pytestmark = pytest.mark.skipif(
    not CHROMIUM.exists(),
    reason="headless browser test needs /usr/bin/chromium (apt-get install -y --no-install-recommends chromium)",
)
TASKS, METHODS, SEEDS, EPOCHS = ("color", "shape"), ("ppo", "loop_k4"), (0, 1, 2), 4
REWARD, EVALUATOR = "jpeg_compressibility", "jpeg_incompressibility"
PROBE = """<script>
window.addEventListener("load", function () {
  for (const img of document.images) img.setAttribute("data-natural-width", String(img.naturalWidth));
  document.body.setAttribute("data-probed", "yes");
});
</script>
"""


def spec_dict() -> dict:
    return {
        "name": "browser",
        "seeds": list(SEEDS),
        "evaluator": EVALUATOR,
        "base": {"model": {"pretrained": "/unused"}, "training": {"samples_per_epoch": 8},
                 "reward": {"name": REWARD}, "prompts": {"train": "/unused", "val": "/unused"}},
        "tasks": {task: {"label": task.title()} for task in TASKS},
        "methods": {"ppo": {"label": "PPO", "estimator": {"preset": "ppo"}},
                    "loop_k4": {"label": "LOOP k=4", "estimator": {"preset": "loop", "samples_per_prompt": 4}}},
        "tables": {"main": {"title": "Main", "methods": ["base", *METHODS], "tasks": list(TASKS)}},
        "grids": {"methods": ["base", *METHODS], "images_per_model": 2, "prompts": 2},
        "claims": [{"text": "LOOP beats PPO", "increasing": ["ppo", "loop_k4"], "paper_effect": {"color": 0.5}},
                   {"text": "PPO beats LOOP", "increasing": ["loop_k4", "ppo"], "metric": "evaluator"}],
    }


def write_eval(folder: Path, tag: str, value: float, epoch: int, generator: torch.Generator) -> None:
    prompts = ["a red circle", "a blue square", "a green star"]
    (folder / "eval").mkdir(parents=True, exist_ok=True)
    record = {"tag": tag, "epoch": epoch, "means": {REWARD: value, EVALUATOR: 2 * value}, "prompts": prompts,
              "per_prompt": {REWARD: [value] * 3, EVALUATOR: [2 * value] * 3}}
    (folder / "eval" / f"{tag}.json").write_text(json.dumps(record))
    torch.save(torch.rand(2, 3, 3, 16, 16, generator=generator), folder / "eval" / f"{tag}_grid.pt")


def final_value(task: int, method: int, seed: int) -> float:
    return 0.5 + 0.1 * method + 0.03 * task + 0.01 * seed**2


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A study folder with hand-made evaluations and curves (no training), and its report."""
    out = tmp_path_factory.mktemp("browser-study")
    generator = torch.Generator().manual_seed(0)
    for t, task in enumerate(TASKS):
        write_eval(out / "base" / task, "base", 0.4 + t / 100, 0, generator)
        for m, method in enumerate(METHODS):
            for seed in SEEDS:
                folder = out / "runs" / task / method / f"seed{seed}"
                write_eval(folder, "final", final_value(t, m, seed), EPOCHS, generator)
                lines = [json.dumps({"epoch": e, "reward/mean": 0.4 + 0.02 * e * (m + 1) + 0.01 * seed})
                         for e in range(1, EPOCHS + 1)]
                (folder / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    return build_report(study_spec_from_dict(spec_dict()), out)


def chromium(*args: str, profile: Path) -> subprocess.CompletedProcess:
    command = [str(CHROMIUM), "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
               "--disable-component-update", "--no-first-run", f"--user-data-dir={profile}", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=120)


class Dom(HTMLParser):
    """Collects each <img>'s attributes and each table's rows of cell texts."""

    def __init__(self) -> None:
        super().__init__()
        self.images: list[dict[str, str | None]] = []
        self.tables: dict[str, list[list[str]]] = {}
        self.body: dict[str, str | None] = {}
        self._table: str | None = None
        self._cell: list[str] | None = None

    def handle_starttag(self, tag, attrs):
        attributes = dict(attrs)
        if tag == "img":
            self.images.append(attributes)
        elif tag == "body":
            self.body = attributes
        elif tag == "table":
            self._table = attributes.get("id") or f"table{len(self.tables)}"
            self.tables[self._table] = []
        elif tag == "tr" and self._table:
            self.tables[self._table].append([])
        elif tag in ("td", "th") and self._table:
            self._cell = []

    def handle_endtag(self, tag):
        if tag in ("td", "th") and self._cell is not None and self._table:
            self.tables[self._table][-1].append("".join(self._cell).strip())
            self._cell = None
        elif tag == "table":
            self._table = None

    def handle_data(self, data):
        if self._cell is not None:
            self._cell.append(data)


def test_images_decode_and_tables_show_hand_computed_numbers(report: Path, tmp_path: Path) -> None:
    probe = report.with_name("probe.html")
    probe.write_text(report.read_text().replace("</body>", PROBE + "</body>"))
    result = chromium("--virtual-time-budget=10000", "--dump-dom", probe.as_uri(), profile=tmp_path / "profile")
    assert result.returncode == 0, result.stderr[-2000:]
    dom = Dom()
    dom.feed(result.stdout)
    assert dom.body.get("data-probed") == "yes", "the probe script did not run"

    names = sorted(Path(str(img["src"])).name for img in dom.images)
    assert names == ["curves_main.png", "grid_color.png", "grid_shape.png"]
    for img in dom.images:
        with Image.open(report.parent / str(img["src"])) as picture:
            assert int(str(img["data-natural-width"])) == picture.width > 0, img

    claims = {(row[0], row[1]): row for row in dom.tables["claims"][1:]}
    for task in ("Color", "Shape"):  # LOOP - PPO = 0.1 on every seed (0.2 on the evaluator)
        won = claims[("LOOP beats PPO", task)]
        assert (won[2], won[3], won[5], won[8]) == ("training_reward", "+0.1000 \u00b1 0.0000", "3", "holds")
        lost = claims[("PPO beats LOOP", task)]
        assert (lost[2], lost[3], lost[8]) == ("held_out", "-0.2000 \u00b1 0.0000", "fails")
    lower = statistics.fmean(final_value(0, 0, seed) for seed in SEEDS)
    assert claims[("LOOP beats PPO", "Color")][6] == f"{0.5 * lower:.4f}" and claims[("LOOP beats PPO", "Shape")][6] == "–"

    runs = {tuple(row[:2]): row[2] for row in dom.tables["runs"][1:]}
    assert runs[("Color", "base model")] == "1 / 1" and runs[("Shape", "LOOP k=4")] == "3 / 3"

    for metric, scale in (("training", 1.0), ("evaluator", 2.0)):
        rows = dom.tables[f"main_{metric}"]
        assert rows[0] == ["Method", "Color", "Shape"]
        assert [row[0] for row in rows[1:]] == ["Base model", "PPO", "LOOP k=4"]
        for t, task in enumerate(TASKS):
            assert rows[1][1 + t] == f"{scale * (0.4 + t / 100):.4f}"
            for m in range(len(METHODS)):
                values = [scale * final_value(t, m, seed) for seed in SEEDS]
                expected = f"{statistics.fmean(values):.4f} \u00b1 {statistics.stdev(values) / math.sqrt(3):.4f}"
                assert rows[2 + m][1 + t] == expected


def test_screenshot_renders(report: Path, tmp_path: Path) -> None:
    shot = tmp_path / "report.png"
    result = chromium("--window-size=1280,2400", "--hide-scrollbars", f"--screenshot={shot}", report.as_uri(),
                      profile=tmp_path / "profile")
    assert result.returncode == 0 and shot.is_file(), result.stderr[-2000:]
    with Image.open(shot) as picture:
        assert picture.size == (1280, 2400)
        colours = picture.convert("RGB").resize((64, 120)).getcolors(64 * 120)
        assert colours is not None and len(colours) > 20  # text, tables, plots and grids, not a blank page
