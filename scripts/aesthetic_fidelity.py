"""Keeping the prompt while optimising the aesthetic score: the trade-off figures and the packaged setting's verdict.

    .venv/bin/python scripts/main_job_acceptance.py --task aesthetic --runs runs/aes-fid \
        --override "reward.monitor=[embedded_vqa]" "output.keep_best=reward/mean:1,monitor/embedded_vqa/mean:2"
    .venv/bin/python scripts/main_job_acceptance.py --task aesthetic --runs runs/aes-fid --kept best \
        --override "reward.monitor=[embedded_vqa]" "output.keep_best=reward/mean:1,monitor/embedded_vqa/mean:2" \
        --results docs/results/aesthetic-fidelity/keep-best
    .venv/bin/python scripts/aesthetic_fidelity.py --runs runs/aes-fid --sweep runs/aes-sweep

The first command is the main job's acceptance (its final models: the unconstrained job, verdict in
docs/results/main-job); the second judges the same LOOP runs by the weights `output.keep_best` kept. This
script reads both verdicts and writes docs/results/aesthetic-fidelity/verdict.json: ``gain_ratio`` (the
kept model's held-out colourfulness gain over the final model's, both over the base, same seeds and
draws) and ``binding_minus_control`` (+- its standard error over the training seeds; the bar: a gain ratio >= 0.7 with
binding no more than one standard error below the control's), and ``trade_off.png``:
held-out colourfulness against colour binding for the base, the control, the final and kept models of
training seed 0 and each single-seed setting under ``--sweep`` (its evaluation at the run's own seed).
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


def points(runs: Path, sweep: Path) -> dict[str, tuple[float, float]]:
    """Every model of training seed 0 at evaluation seed 1234, by label."""
    out = {"base": means(runs / "loop-s0/eval/base.json"),
           "random_control": means(runs / "control-s0/eval/final.json"),
           "LOOP, final (unconstrained)": means(runs / "loop-s0/eval/final.json"),
           "LOOP, output.keep_best": means(runs / "loop-s0/eval/best.json")}
    for run in sorted(p for p in sweep.iterdir() if (p / "eval/final.json").is_file()):
        out[f"LOOP, {run.name}"] = means(run / "eval/final.json")
    return out


def plot(figures: dict[str, tuple[float, float]], path: Path) -> None:
    """Held-out colourfulness (y) against colour binding (x), one labelled point per model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for label, (colour, binding) in figures.items():
        ax.scatter(binding, colour, s=30, color="tab:gray" if label in ("base", "random_control") else "tab:blue")
        ax.annotate(label, (binding, colour), textcoords="offset points", xytext=(5, 3), fontsize=8)
    ax.set_xlabel(f"colour binding ({BINDING}, strict; not optimised)")
    ax.set_ylabel(f"held-out colourfulness ({HELD_OUT})")
    ax.set_title("Aesthetic job, training seed 0: what each setting buys and costs\n"
                 "(40 validation prompts x 10 images, evaluation seed 1234)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=Path, default=Path("runs/aes-fid"))
    parser.add_argument("--sweep", type=Path, default=Path("runs/aes-sweep"))
    parser.add_argument("--unconstrained", type=Path, default=Path("docs/results/main-job/verdict.json"))
    parser.add_argument("--kept", type=Path, default=Path("docs/results/aesthetic-fidelity/keep-best/verdict.json"))
    parser.add_argument("--results", type=Path, default=Path("docs/results/aesthetic-fidelity"))
    args = parser.parse_args(argv)
    final, kept = json.loads(args.unconstrained.read_text()), json.loads(args.kept.read_text())
    figures = points(args.runs, args.sweep)
    verdict = {
        "setting": "output.keep_best=reward/mean:1,monitor/embedded_vqa/mean:2 (reward.monitor=[embedded_vqa])",
        "train_seeds": kept["train_seeds"], "eval_seeds": kept["eval_seeds"],
        "gain_ratio": kept["held_out"]["gain"] / final["held_out"]["gain"],
        "kept_gain": kept["held_out"]["gain"], "kept_gain_se": kept["held_out"]["gain_se"],
        "unconstrained_gain": final["held_out"]["gain"], "unconstrained_gain_se": final["held_out"]["gain_se"],
        "binding_minus_control": kept["binding"]["final_minus_control"],
        "binding_minus_control_se": kept["binding"]["final_minus_control_se"],
        "unconstrained_binding_minus_control": final["binding"]["final_minus_control"],
        "unconstrained_binding_minus_control_se": final["binding"]["final_minus_control_se"],
        "trade_off_seed0": {label: {"held_out": c, "binding": b} for label, (c, b) in figures.items()},
    }
    verdict["bar_holds"] = bool(verdict["gain_ratio"] >= 0.7
                                and verdict["binding_minus_control"] >= -verdict["binding_minus_control_se"])
    args.results.mkdir(parents=True, exist_ok=True)
    (args.results / "verdict.json").write_text(json.dumps(verdict, indent=1) + "\n")
    plot(figures, args.results / "trade_off.png")
    print(json.dumps(verdict, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
