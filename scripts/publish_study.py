"""Copy a finished study's report into docs/results, with the paths in it relative to the repository.

    .venv/bin/python scripts/publish_study.py studies/paper docs/results/study-paper

Writes ``<dest>/report/`` (index.html, the tables, claims.json, sampler.json, the PNGs), ``<dest>/study.json``
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


def md_table(header: list[str], rows: list[list[object]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def fmt(value: float | None, digits: int = 3, signed: bool = False) -> str:
    if value is None:
        return "-"
    if value == float("inf"):
        return "never"
    return f"{value:+.{digits}f}" if signed else f"{value:.{digits}f}"


def summary_markdown(study: Path, spec_path: Path) -> str:
    """The README's tables: claims, variance, costs and sample efficiency, the two samplers."""
    from loopdiff.study.efficiency import method_cost, samples_to_reach, targets
    from loopdiff.study.results import collect_results
    from loopdiff.study.spec import load_study_spec

    spec = load_study_spec(spec_path)
    results = collect_results(spec, study)
    claims = json.loads((study / "report" / "claims.json").read_text())
    parts = ["### Claims\n", md_table(
        ["claim", "task", "measure", "difference +- SE", "in SE", "seeds", "paper's gap", "power", "verdict"],
        [[c["claim"], c["task"], c["measure"], f"{fmt(c['difference'], 4, True)} +- {fmt(c['se'], 4)}",
          fmt(c["z"], 1, True), c["seeds"], fmt(c["paper_difference"], 4),
          {True: "yes", False: "no", None: "-"}[c["powered"]], f"**{c['verdict']}**"] for c in claims])]
    for task in (spec.variance.tasks if spec.variance else ()):
        path = study / "variance" / task / "variance.json"
        if not path.is_file():
            continue
        v = json.loads(path.read_text())
        parts += [f"### Variance at the base model: {task} (reward {v['reward']}, {v['groups']} prompts x "
                  f"{v['samples_per_prompt']} samples)\n", md_table(
                      ["estimator", "K", "tr(Cov) per sample", "in reward units", "|signal|^2", f"SNR at {v['batch']}",
                       "samples for SNR 1"],
                      [[r["label"], r["k"], f"{r['noise_per_sample']:.3e}", f"{r['noise_in_reward_units']:.3e}",
                        f"{r['signal_sq']:.2e}", fmt(r["snr"], 3, True),
                        "unresolved" if r["samples_for_snr_one"] is None else f"{r['samples_for_snr_one']:.0f}"]
                       for r in v["estimators"]]),
                  md_table(["K", "LOO noise / noise at K=4", "K/(K-1) prediction"],
                           [[c["k"], fmt(c["measured_ratio"]), fmt(c["predicted_ratio"])] for c in v["loo_check"]])]
    if spec.efficiency:
        for task in spec.efficiency.tasks:
            rows = []
            for method in spec.methods:
                cost = method_cost(spec, study, task, method)
                if cost:
                    rows.append([spec.label(method), f"{cost.seconds_per_epoch:.2f}", f"{cost.peak_memory_mb:.0f}",
                                 cost.denoisers_held, cost.reward_queries, cost.optimiser_steps])
            parts += [f"### Cost per epoch: {task}\n", md_table(
                ["method", "s / epoch", "peak MiB", "denoisers held", "reward queries / epoch", "optimiser steps / epoch"], rows)]
            train_target, held_target = targets(spec, results, task, spec.efficiency.reference)
            rows = []
            for method in spec.efficiency.methods:
                s1, t1 = samples_to_reach(spec, study, results, task, method, train_target, held_out=False)
                s2, t2 = samples_to_reach(spec, study, results, task, method, held_target, held_out=True)
                rows.append([spec.label(method), fmt(s1, 0), fmt(t1, 0), fmt(s2, 0), fmt(t2, 0)])
            parts += [f"### Samples and seconds to reach PPO's final scores: {task} (training reward "
                      f"{train_target:.3f}, held out {held_target:.3f})\n", md_table(
                          ["method", "samples (training reward)", "seconds", "samples (held out)", "seconds"], rows)]
    sampler = json.loads((study / "report" / "sampler.json").read_text())
    for task, rows in sampler.items():
        if rows:
            parts += [f"### Held out under both samplers: {task}\n", md_table(
                ["method", "eta = 1", "eta = 0", "eta 0 - eta 1", "seeds"],
                [[spec.label(r["method"]), fmt(r["stochastic"]["mean"]), fmt(r["deterministic"]["mean"]),
                  f"{fmt(r['difference']['mean'], 4, True)} +- {fmt(r['difference']['se'], 4)}", r["difference"]["n"]]
                 for r in rows])]
    return "\n".join(parts)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("study", type=Path)
    parser.add_argument("dest", type=Path)
    parser.add_argument("--spec", type=Path, default=ROOT / "src" / "loopdiff" / "configs" / "study-paper.yaml")
    args = parser.parse_args()
    publish(args.study, args.dest)
    (args.dest / "summary.md").write_text(summary_markdown(args.study, args.spec))


if __name__ == "__main__":
    main()
