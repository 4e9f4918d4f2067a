"""The study report: a self-contained folder ``<out>/report/`` with index.html, tables (CSV, Markdown),
training curves and image grids (PNG), all linked relatively."""

from __future__ import annotations

import html
import json
import math
import pickle
import warnings
from importlib import resources
from pathlib import Path
from string import Template
from typing import Any

import torch

from loopdiff.grids import side_by_side
from loopdiff.study.claims import ClaimVerdict, check_claims, claims_json, claims_markdown, step_text
from loopdiff.study.curves import plot_table_curves, write_curve_csv
from loopdiff.study.results import (
    BASE_TAG, FINAL_TAG, RUN_RECORD, StudyResults, base_dir, collect_results, read_eval, report_dir, run_dir,
)
from loopdiff.reports.study_sections import (
    claims_table, efficiency_section, sampler_json, sampler_section, sections_markdown, variance_section,
)
from loopdiff.study.spec import BASE, StudySpec
from loopdiff.study.tables import Table, format_cell, write_tables



def build_report(spec: StudySpec, out: Path) -> Path:
    """Write everything under ``<out>/report/`` from the runs finished so far; returns index.html."""
    out = Path(out)
    folder = report_dir(out)
    folder.mkdir(parents=True, exist_ok=True)
    results = collect_results(spec, out)
    tables = write_tables(spec, results, folder)
    verdicts = check_claims(spec, results)
    (folder / "claims.md").write_text(claims_markdown(spec, verdicts) if verdicts else "No claims configured.\n")
    (folder / "claims.json").write_text(claims_json(spec, verdicts))
    (folder / "sampler.json").write_text(sampler_json(spec, results))
    (folder / "sections.md").write_text(sections_markdown(spec, out, results, verdicts))
    curves = write_curves(spec, results, folder)
    grids = write_grids(spec, out, folder)
    page = Template((resources.files("loopdiff") / "reports" / "study_report.html").read_text()).substitute(
        title=html.escape(f"loopdiff study: {spec.name}"),
        meta=meta_html(spec, out),
        claims=claims_table(spec, verdicts).html() + "\n" + claims_html(spec, verdicts),
        variance=variance_section(spec, out, folder),
        efficiency=efficiency_section(spec, out, results, folder),
        sampler=sampler_section(spec, results),
        tables="\n".join(table_html(t) for t in tables),
        curves="\n".join(figure_html(path, caption) for path, caption in curves) or "<p>No training curves yet.</p>",
        grids="\n".join(figure_html(path, caption) for path, caption in grids) or "<p>No image grids yet.</p>",
        runs=runs_html(spec, out),
    )
    index = folder / "index.html"
    index.write_text(page)
    return index


# ---------------------------------------------------------------- pictures


def write_curves(spec: StudySpec, results: StudyResults, folder: Path) -> list[tuple[Path, str]]:
    figures = []
    for table in spec.tables.values():
        png = plot_table_curves(spec, results, table, folder / f"curves_{table.name}.png")
        if png is not None:
            write_curve_csv(spec, results, table, folder / f"curves_{table.name}.csv")
            figures.append((png, f"{table.title}: training reward per epoch "
                                 f"(<a href=\"curves_{table.name}.csv\">CSV</a>)"))
    return figures


def grid_columns(spec: StudySpec, out: Path, task: str) -> tuple[list[str], dict[str, torch.Tensor]]:
    """The prompts and, per model label, the ``(prompts, images, 3, H, W)`` evaluation images of one task.

    Models whose evaluation used other prompts than the first model found are left out."""
    assert spec.grids is not None
    prompts: list[str] | None = None
    columns: dict[str, torch.Tensor] = {}
    for method in spec.grids.methods:
        if method == BASE:
            folder, tag = base_dir(out, task), BASE_TAG
        elif (task, method) in spec.pairs():
            folder, tag = run_dir(out, task, method, spec.grids.seed), FINAL_TAG
        else:
            continue
        record, tensor_file = read_eval(folder, tag), folder / "eval" / f"{tag}_grid.pt"
        if record is None or not tensor_file.is_file():
            continue
        try:
            images = torch.load(tensor_file, weights_only=True)
        except pickle.UnpicklingError:  # not plain tensors: skipped, never run
            warnings.warn(f"{tensor_file} is not a plain tensor file; its grid column is left out")
            continue
        if images.numel() == 0:
            continue
        if prompts is None:
            prompts = list(record["prompts"][: len(images)])
        if list(record["prompts"][: len(prompts)]) != prompts[: len(images)]:
            continue
        columns[spec.label(method)] = images
    if prompts is None:
        return [], {}
    n = min([spec.grids.prompts, len(prompts), *(len(images) for images in columns.values())])
    return prompts[:n], {label: images[:n] for label, images in columns.items()}


def write_grids(spec: StudySpec, out: Path, folder: Path) -> list[tuple[Path, str]]:
    if spec.grids is None:
        return []
    figures = []
    for task in spec.tasks:
        prompts, columns = grid_columns(spec, out, task)
        if not columns:
            continue
        per_model = min(spec.grids.images_per_model, *(images.shape[1] for images in columns.values()))
        path = side_by_side(folder / f"grid_{task}.png", prompts, columns, per_model=per_model)
        caption = (f"{html.escape(spec.tasks[task].label)}: " + ", ".join(html.escape(c) for c in columns)
                   + f" (training seed {spec.grids.seed})")
        figures.append((path, caption))
    return figures


def figure_html(path: Path, caption: str) -> str:
    return (f'<figure><img src="{html.escape(path.name)}" alt="{html.escape(path.stem)}">'
            f"<figcaption>{caption}</figcaption></figure>")


# ---------------------------------------------------------------- text


def table_html(table: Table) -> str:
    tasks = table.spec.tasks
    best = {task: max((row[task].mean for row in table.cells.values() if row[task].n), default=None)
            for task in tasks}
    head = "".join(f"<th>{html.escape(table.task_labels[t])}</th>" for t in tasks)
    rows = []
    for method, row in table.cells.items():
        cells = []
        for task in tasks:
            cell = row[task]
            cls = "missing" if cell.n == 0 else ("best" if cell.mean == best[task] else "")
            cells.append(f'<td class="{cls}" data-n="{cell.n}">{html.escape(format_cell(cell))}</td>')
        rows.append(f'<tr data-method="{html.escape(method)}"><td>{html.escape(table.method_labels[method])}</td>'
                    + "".join(cells) + "</tr>")
    return (
        f'<h3>{html.escape(table.caption)}</h3>\n<table id="{html.escape(table.stem)}">'
        f"<thead><tr><th>Method</th>{head}</tr></thead><tbody>{''.join(rows)}</tbody></table>\n"
        f'<p class="files"><a href="{table.stem}.csv">CSV</a> &middot; <a href="{table.stem}.md">Markdown</a></p>'
    )


def claims_html(spec: StudySpec, verdicts: list[ClaimVerdict]) -> str:
    if not verdicts:
        return "<p>No claims configured.</p>"
    items = []
    for verdict in verdicts:
        rows = []
        for task in verdict.tasks:
            mark = task.verdict
            values = ", ".join(
                f"{html.escape(spec.label(m))} {s.mean:.4f}" if s.n else f"{html.escape(spec.label(m))} &ndash;"
                for m, s in zip(verdict.claim.increasing, task.summaries)
            )
            steps = "; ".join(html.escape(step_text(spec, s)) for s in task.steps)
            rows.append(f'<li><span class="{mark}">{mark}</span> {html.escape(spec.tasks[task.task].label)}: '
                        f"{values}. {steps}</li>")
        items.append(f"<li><b>{html.escape(verdict.claim.text)}</b> ({verdict.claim.metric}): "
                     f"{html.escape(verdict.summary)}<ul>{''.join(rows)}</ul></li>")
    return f'<ul class="claims">{"".join(items)}</ul>\n<p class="files"><a href="claims.md">Markdown</a> \u00b7 <a href="claims.json">JSON</a></p>'


def read_study_record(out: Path) -> dict[str, Any]:
    path = Path(out) / "study.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def meta_html(spec: StudySpec, out: Path) -> str:
    record = read_study_record(out)
    lines = [f"Study config: <code>{html.escape(spec.source or spec.name)}</code>; seeds "
             f"{', '.join(map(str, spec.seeds))}; {len(spec.pairs())} (task, method) pairs."]
    if record.get("invocations"):
        last = record["invocations"][-1]
        lines.append(f"Command: <code>{html.escape(last['command'])}</code>")  # not its folder: reports get shared
        lines.append(f"Total wall time: {_duration(record.get('total_wall_time_s', 0.0))} over "
                     f"{len(record['invocations'])} invocation(s).")
    lines.append('Files: <a href="tables.md">tables.md</a> &middot; <a href="claims.md">claims.md</a>')
    return "<br>\n".join(lines)


def runs_html(spec: StudySpec, out: Path) -> str:
    """Per (task, method): how many evaluations are finished, and the mean wall time of the timed runs."""
    rows = []
    for task in spec.tasks:
        entries = [("base model", [(base_dir(out, task), BASE_TAG)])]
        entries += [(spec.label(method), [(run_dir(out, task, method, s), FINAL_TAG) for s in spec.seeds])
                    for t, method in spec.pairs() if t == task]
        for label, folders in entries:
            done = sum(read_eval(folder, tag) is not None for folder, tag in folders)
            times = [record["wall_time_s"] for folder, _ in folders if (record := _run_record(folder)) is not None]
            mean_time = _duration(sum(times) / len(times)) if times else "&ndash;"
            rows.append(f'<tr><td>{html.escape(spec.tasks[task].label)}</td><td class="left">{html.escape(label)}'
                        f"</td><td>{done} / {len(folders)}</td><td>{mean_time}</td></tr>")
    return ('<table id="runs"><thead><tr><th>Task</th><th class="left">Method</th><th>Finished</th>'
            f"<th>Wall time per run</th></tr></thead><tbody>{''.join(rows)}</tbody></table>")


def _run_record(folder: Path) -> dict[str, Any] | None:
    path = Path(folder) / RUN_RECORD
    return json.loads(path.read_text()) if path.is_file() else None


def _duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "&ndash;"
    minutes, secs = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h {minutes:02d}m {secs:02d}s" if hours else f"{minutes}m {secs:02d}s"
