"""Keeping the prompt while optimising the aesthetic score: the trade-off figures and the packaged setting's verdict.

    .venv/bin/python scripts/main_job_acceptance.py --task aesthetic --runs runs/aes-mix \
        --config embedded-aesthetic-fidelity --results docs/results/aesthetic-fidelity/packaged
    .venv/bin/python scripts/aesthetic_fidelity.py --sweep runs/aes-sweep

The first command judges the packaged setting (`embedded-aesthetic-fidelity`) as the main job is judged: 3
training seeds x 2 evaluation draws, each against a `random_control` run of the same seeds. This script reads
its verdict beside the unconstrained main job's (docs/results/main-job) and writes
docs/results/aesthetic-fidelity/verdict.json: ``gain_ratio`` (the setting's held-out colourfulness gain over
the unconstrained job's, both over the base, same seeds and draws) and ``binding_minus_control`` (+- its
standard error over the training seeds; the bar: a gain ratio >= 0.7 with binding no more than one standard
error below the control's), and ``trade_off.png``: held-out colourfulness against colour binding at training
seed 0 and evaluation seed 1234 for the base, the control, the unconstrained job, each judged setting and
each single-seed run under ``--sweep`` (its final and, where `output.keep_best` kept one, its kept model).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

HELD_OUT, BINDING = "embedded_colorfulness", "embedded_eval"


def means(path: Path) -> tuple[float, float]:
    """(held-out colourfulness, colour binding) means over the prompts of one evaluation JSON."""
    per_prompt = json.loads(path.read_text())["per_prompt"]
    return float(np.mean(per_prompt[HELD_OUT])), float(np.mean(per_prompt[BINDING]))


def seed0(summary: Path) -> dict:
    """The row of training seed 0 at the run's own evaluation seed (1234) of an acceptance summary."""
    return next(r for r in json.loads(summary.read_text()) if r["train_seed"] == 0 and r["eval_seed"] == 1234)


def points(judged: dict[str, Path], sweep: Path) -> dict[str, tuple[float, float]]:
    """Every model of training seed 0 at evaluation seed 1234, by label."""
    unconstrained = seed0(judged["unconstrained"] / "summary.json")
    out = {"base": (unconstrained["base"], unconstrained["binding_base"]),
           "random_control": (unconstrained["control_final"], unconstrained["binding_control_final"])}
    for label, folder in judged.items():
        row = seed0(folder / "summary.json")
        out[f"LOOP, {label}"] = (row["final"], row["binding_final"])
    for run in sorted(p for p in sweep.iterdir() if (p / "eval/final.json").is_file()) if sweep.is_dir() else []:
        out[f"{run.name}, final"] = means(run / "eval/final.json")
        if (run / "eval/best.json").is_file():
            out[f"{run.name}, kept"] = means(run / "eval/best.json")
    return out


def plot(figures: dict[str, tuple[float, float]], path: Path) -> None:
    """Held-out colourfulness (y) against colour binding (x), one labelled point per model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 6))
    for label, (colour, binding) in figures.items():
        ax.scatter(binding, colour, s=30, color="tab:gray" if label in ("base", "random_control") else "tab:blue")
    ax.margins(x=0.25, y=0.08)
    ax.set_xlabel(f"colour binding ({BINDING}, strict; not optimised)")
    ax.set_ylabel(f"held-out colourfulness ({HELD_OUT})")
    ax.set_title("Aesthetic job, training seed 0: what each setting buys and costs\n"
                 "(40 validation prompts x 10 images, evaluation seed 1234)", fontsize=10)
    fig.tight_layout()
    renderer = fig.canvas.get_renderer()
    from matplotlib.transforms import Bbox

    # the boxes labels should not cover, in display units: every point's marker, then each label placed
    taken = [Bbox.from_bounds(x - 4, y - 4, 8, 8) for x, y in ax.transData.transform([(b, c) for c, b in figures.values()])]
    spots = [(dx, dy, "left" if dx > 0 else "right") for dy in (3, -11, 14, -22) for dx in (5, -5)]
    for label, (colour, binding) in figures.items():
        best = None  # the spot whose label box overlaps the boxes placed so far least
        for dx, dy, ha in spots:
            text = ax.annotate(label, (binding, colour), textcoords="offset points", xytext=(dx, dy), ha=ha, fontsize=8)
            box = text.get_window_extent(renderer)
            overlap = sum(max(0, min(box.x1, o.x1) - max(box.x0, o.x0)) * max(0, min(box.y1, o.y1) - max(box.y0, o.y0))
                          for o in taken)
            if best is not None:
                if overlap >= best[0]:
                    text.remove()
                    continue
                best[1].remove()
            best = (overlap, text, box)
            if overlap == 0:
                break
        taken.append(best[2])
    fig.savefig(path, dpi=110)
    plt.close(fig)


def judged_figures(verdict: dict, unconstrained: dict) -> dict:
    """A setting's gain over the base as a share of the unconstrained job's, and its binding against the control."""
    figures = {"train_seeds": verdict["train_seeds"], "eval_seeds": verdict["eval_seeds"],
               "gain_ratio": verdict["held_out"]["gain"] / unconstrained["held_out"]["gain"],
               "gain": verdict["held_out"]["gain"], "gain_se": verdict["held_out"]["gain_se"],
               "held_out_minus_control": verdict["held_out"]["final_minus_control"],
               "held_out_minus_control_se": verdict["held_out"]["final_minus_control_se"],
               "binding_minus_control": verdict["binding"]["final_minus_control"],
               "binding_minus_control_se": verdict["binding"]["final_minus_control_se"]}
    figures["bar_holds"] = bool(figures["gain_ratio"] >= 0.7
                                and figures["binding_minus_control"] >= -figures["binding_minus_control_se"])
    return figures


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sweep", type=Path, default=Path("runs/aes-sweep"))
    parser.add_argument("--unconstrained", type=Path, default=Path("docs/results/main-job"))
    parser.add_argument("--judged", nargs="*", default=["packaged=docs/results/aesthetic-fidelity/packaged",
                                                        "keep_best=docs/results/aesthetic-fidelity/keep-best"],
                        help="LABEL=FOLDER of acceptance results; the first is the packaged setting")
    parser.add_argument("--setting", default="--config embedded-aesthetic-fidelity",
                        help="how the first judged setting is run, for the record")
    parser.add_argument("--results", type=Path, default=Path("docs/results/aesthetic-fidelity"))
    args = parser.parse_args(argv)
    judged = {label: Path(folder) for label, folder in (item.split("=", 1) for item in args.judged)}
    unconstrained = json.loads((args.unconstrained / "verdict.json").read_text())
    figures = {label: judged_figures(json.loads((folder / "verdict.json").read_text()), unconstrained)
               for label, folder in judged.items()}
    packaged = next(iter(figures))
    verdict = {"setting": args.setting, **figures[packaged],
               "unconstrained_gain": unconstrained["held_out"]["gain"],
               "unconstrained_gain_se": unconstrained["held_out"]["gain_se"],
               "unconstrained_binding_minus_control": unconstrained["binding"]["final_minus_control"],
               "unconstrained_binding_minus_control_se": unconstrained["binding"]["final_minus_control_se"],
               "others": {label: f for label, f in figures.items() if label != packaged}}
    points_seed0 = points({"unconstrained": args.unconstrained, **judged}, args.sweep)
    verdict["trade_off_seed0"] = {label: {"held_out": c, "binding": b} for label, (c, b) in points_seed0.items()}
    args.results.mkdir(parents=True, exist_ok=True)
    (args.results / "verdict.json").write_text(json.dumps(verdict, indent=1) + "\n")
    plot(points_seed0, args.results / "trade_off.png")
    print(json.dumps(verdict, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
