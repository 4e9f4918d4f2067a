"""Copy a finished study's report into docs/results, with the paths in it relative to the repository.

    .venv/bin/python scripts/publish_study.py studies/paper docs/results/study-paper

Writes ``<dest>/report/`` (index.html, the tables, claims.json, sampler.json, the PNGs, and sections.md: the
claims, variance, cost and sampler tables in Markdown, for the README), ``<dest>/study.json``
(the command, wall times and status of every run; no machine paths), ``<dest>/claims.json`` and
``<dest>/summary.json`` (the claims' verdict counts, the tables' means and the variance measurements).
"""

from __future__ import annotations

import argparse
import json
import shutil
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
KEEP = (".html", ".md", ".csv", ".json", ".png")


def relative(path: str) -> str:
    """A path under the repository, written relative to it."""
    p = Path(path)
    return str(p.resolve().relative_to(ROOT)) if p.is_absolute() and p.resolve().is_relative_to(ROOT) else str(p)


def publish(study: Path, dest: Path) -> None:
    report, out = study / "report", dest / "report"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    for file in sorted(report.iterdir()):
        if file.suffix in KEEP:
            text_like = file.suffix != ".png"
            if text_like:
                (out / file.name).write_text(file.read_text().replace(str(ROOT) + "/", ""))
            else:
                shutil.copy2(file, out / file.name)
    record = json.loads((study / "study.json").read_text())
    for invocation in record["invocations"]:
        invocation.pop("cwd", None)
    for run in record["runs"].values():
        run["folder"] = relative(run["folder"])
    record["spec"] = relative(record["spec"]) if record.get("spec") else record.get("spec")
    (dest / "study.json").write_text(json.dumps(record, indent=1) + "\n")
    claims = json.loads((report / "claims.json").read_text())
    (dest / "claims.json").write_text(json.dumps(claims, indent=1) + "\n")
    variance = {p.parent.name: json.loads(p.read_text()) for p in sorted((study / "variance").glob("*/variance.json"))}
    summary = {
        "verdicts": dict(Counter(c["verdict"] for c in claims)),
        "verdicts_by_measure": {m: dict(Counter(c["verdict"] for c in claims if c["measure"] == m))
                                for m in sorted({c["measure"] for c in claims})},
        "tables": {f.stem: f.read_text() for f in sorted(report.glob("table*.csv"))},
        "sampler": json.loads((report / "sampler.json").read_text()),
        "variance": variance,
        "main_invocation_wall_time_s": max(i["wall_time_s"] for i in record["invocations"]),
    }
    (dest / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("study", type=Path)
    parser.add_argument("dest", type=Path)
    args = parser.parse_args()
    publish(args.study, args.dest)


if __name__ == "__main__":
    main()
