"""Tables in the paper's shape: one row per method, one column per task, mean +/- standard error over seeds,
for the training reward and for the held-out evaluator, written as Markdown and CSV."""

from __future__ import annotations

import csv
import io
import math
from dataclasses import dataclass
from pathlib import Path

from loopdiff.study.results import StudyResults
from loopdiff.study.spec import BASE, METRIC_LABELS, StudySpec, TableSpec
from loopdiff.study.stats import Summary, summarize


@dataclass(frozen=True)
class Table:
    """A filled table: ``cells[method][task]`` summarises the per-seed final evaluations."""

    spec: TableSpec
    metric: str  # "training" or "evaluator"
    task_labels: dict[str, str]
    method_labels: dict[str, str]
    cells: dict[str, dict[str, Summary]]

    @property
    def stem(self) -> str:
        return f"{self.spec.name}_{self.metric}"

    @property
    def caption(self) -> str:
        return f"{self.spec.title} ({METRIC_LABELS[self.metric]}; mean \u00b1 standard error over seeds)"


def metrics_of(spec: StudySpec) -> list[str]:
    """The table metrics the study can report: the training reward, and the evaluator when there is one."""
    return ["training", "evaluator"] if spec.evaluator else ["training"]


def build_table(spec: StudySpec, results: StudyResults, table: TableSpec, metric: str) -> Table:
    cells = {
        method: {task: summarize(results.values(task, method, spec.metric_key(task, metric))) for task in table.tasks}
        for method in table.methods
    }
    return Table(
        spec=table,
        metric=metric,
        task_labels={task: spec.tasks[task].label for task in table.tasks},
        method_labels={method: spec.label(method) for method in table.methods},
        cells=cells,
    )


def format_cell(cell: Summary, digits: int = 4) -> str:
    """``0.6438 ± 0.0123`` (``0.6438`` for a single value, ``–`` when the runs are missing)."""
    if cell.n == 0:
        return "\u2013"
    if math.isnan(cell.se):
        return f"{cell.mean:.{digits}f}"
    return f"{cell.mean:.{digits}f} \u00b1 {cell.se:.{digits}f}"


def table_markdown(table: Table) -> str:
    tasks = table.spec.tasks
    lines = [
        f"**{table.caption}**",
        "",
        "| Method | " + " | ".join(table.task_labels[t] for t in tasks) + " |",
        "|---|" + "---|" * len(tasks),
    ]
    for method, row in table.cells.items():
        lines.append(f"| {table.method_labels[method]} | " + " | ".join(format_cell(row[t]) for t in tasks) + " |")
    seeds = sorted({cell.n for method, row in table.cells.items() if method != BASE for cell in row.values() if cell.n})
    note = f"Seeds per cell: {', '.join(map(str, seeds)) or 'none finished yet'}"
    lines += ["", note + (" (the base model is evaluated once per task)." if BASE in table.cells else ".")]
    return "\n".join(lines) + "\n"


def table_csv(table: Table) -> str:
    """One row per method: ``method, label`` then ``<task>_mean, <task>_se, <task>_n`` per task."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    header = ["method", "label"]
    for task in table.spec.tasks:
        header += [f"{task}_mean", f"{task}_se", f"{task}_n"]
    writer.writerow(header)
    for method, row in table.cells.items():
        line: list[object] = [method, table.method_labels[method]]
        for task in table.spec.tasks:
            cell = row[task]
            line += ["" if cell.n == 0 else repr(cell.mean), "" if math.isnan(cell.se) else repr(cell.se), cell.n]
        writer.writerow(line)
    return buffer.getvalue()


def write_tables(spec: StudySpec, results: StudyResults, folder: Path) -> list[Table]:
    """Write ``<table>_<metric>.md`` and ``.csv`` for every table and metric, plus ``tables.md`` with all."""
    folder.mkdir(parents=True, exist_ok=True)
    tables = [build_table(spec, results, t, m) for t in spec.tables.values() for m in metrics_of(spec)]
    for table in tables:
        (folder / f"{table.stem}.md").write_text(table_markdown(table))
        (folder / f"{table.stem}.csv").write_text(table_csv(table))
    (folder / "tables.md").write_text("\n".join(table_markdown(t) for t in tables))
    return tables
