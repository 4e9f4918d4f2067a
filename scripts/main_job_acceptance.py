"""Does the main job learn? LOOP against its noise control, over training seeds and evaluation draws.

    .venv/bin/python scripts/main_job_acceptance.py                    # 3 seeds x (LOOP, control), 2 at a time
    .venv/bin/python scripts/main_job_acceptance.py --seeds 0 --jobs 1 # one pair
    .venv/bin/python scripts/main_job_acceptance.py --task aesthetic --runs runs/aesthetic \
        --results docs/results/aesthetic-fidelity/unconstrained     # the aesthetic job
    .venv/bin/python scripts/main_job_acceptance.py --config embedded-flow-aesthetic --base-model embedded-flow \
        --eval-args="--eta 0.7" --no-agreement --runs runs/embedded-flow --results docs/results/embedded-flow

``--task`` picks the job and its measures: ``color`` (the main job, `embedded-color`: colour binding, trained on
the learned VQA reward, judged by the analytic evaluator) or ``aesthetic`` (`embedded-aesthetic`: the learned
aesthetic scorer, judged by colourfulness, with colour binding as the prompt-fidelity measure).
For each training seed it runs the task's config (`loopdiff train`) and the same config with
`reward.name=random_control`, which trains on uniform noise: what the optimiser alone does to the
model. Each is evaluated on the 40 validation prompts x 10 images under two evaluation seeds (1234,
inside the run, and 99 with `loopdiff eval`), as is the base model. Runs already finished are reused.

Writes into ``--results`` (default docs/results/main-job): ``summary.json`` (one row per training
seed x evaluation seed: held-out evaluator and training reward of the base, the fine-tuned model and
the control, and the commands), ``training_reward.png`` (the training reward over the epochs against
the control's, both with 80% prediction bands over seeds) and ``base_vs_final.png`` (the first seed's
grid; ``base_vs_best.png`` with ``--kept best``), and ``verdict.json`` (the acceptance figures, and how often the training reward orders pairs of
each model's images as the held-out evaluator does). The run folders go to ``--runs`` (default
runs/main-job). ``--config`` / ``--base-model`` / ``--eval-args`` / ``--override`` run the same protocol on
another config (the flow-matching base's, docs/results/embedded-flow); ``--no-agreement`` skips the scorer
agreement, which samples with the UNet base's sampler.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from loopdiff.study.stats import prediction_interval, summarize

# Per task: its config, the held-out evaluator, the training reward and the colour-binding measure.
TASKS = {
    "color": {"config": "embedded-color", "held_out": "embedded_eval", "reward": "embedded_vqa",
              "binding": "embedded_eval", "extra": ["embedded_eval_graded"]},
    "aesthetic": {"config": "embedded-aesthetic", "held_out": "embedded_colorfulness", "reward": "embedded_aesthetic",
                  "binding": "embedded_eval", "extra": []},
}
HELD_OUT, REWARD, BINDING = "embedded_eval", "embedded_vqa", "embedded_eval"  # main() sets these from --task
TRAIN_EVAL_SEED, SECOND_EVAL_SEED = 1234, 99
ROOT = Path(__file__).resolve().parent.parent
# What the job runs beyond the shipped main job; main() sets these from its flags.
SETUP: dict = {"config": None, "overrides": [], "base_model": "embedded", "eval_args": [], "runs": Path("runs/main-job"),
               "task": "color", "kept": "final"}


def kept_tag(kind: str) -> str:
    """The evaluation tag of the model a run is judged by: ``final``, or ``best`` (``output.keep_best``) for
    the LOOP runs when ``--kept best``; a control is always judged by its final model."""
    return SETUP["kept"] if kind == "loop" else "final"


def kept_model(run_dir: Path, kind: str) -> Path:
    """The exported folder of the model a run is judged by."""
    return run_dir / f"{kept_tag(kind)}_pipeline"


def eval_rewards() -> str:
    """The rewards every evaluation scores, as a config list ``[a,b,...]``."""
    task = TASKS[SETUP["task"]]
    return "[" + ",".join(dict.fromkeys([REWARD, HELD_OUT, BINDING, *task["extra"]])) + "]"


def sampler_flags() -> list[str]:
    """`loopdiff eval` flags that sample as the config's training evaluation does (steps, guidance, eta)."""
    from loopdiff.cli import resolve_config
    from loopdiff.config import load_config

    config = load_config(resolve_config(SETUP["config"]), SETUP["overrides"])
    s = config.sampling
    return ["--steps", str(s.num_steps), "--guidance-scale", str(s.guidance_scale), "--eta", str(s.eta)]


def train_command(kind: str, seed: int, run_dir: Path) -> list[str]:
    """The `loopdiff train` command of one run (``kind`` is ``loop`` or ``control``)."""
    command = ["loopdiff", "train", "--config", SETUP["config"]]
    command += [f"training.seed={seed}", f"output.dir={run_dir}", f"eval.rewards={eval_rewards()}", *SETUP["overrides"]]
    if kind == "control":
        command += ["reward.name=random_control", f"reward.monitor=[{REWARD}]", "output.keep_best=null"]
    return command


def eval_command(model: str, out: Path, seed: int) -> list[str]:
    """`loopdiff eval` with the main job's evaluation protocol under another seed."""
    return ["loopdiff", "eval", "--model", model, "--prompts", "embedded:color:val", "--max-prompts", "40",
            "--images-per-prompt", "10", "--batch-size", "32", *sampler_flags(), "--seed", str(seed),
            "--reward", eval_rewards().strip("[]"), "--out", str(out), *SETUP["eval_args"]]


def run(command: list[str], log: Path, threads: int) -> None:
    """Run a loopdiff command with the venv's executable, ``threads`` torch threads, output to ``log``."""
    executable = str(Path(sys.executable).parent / command[0])
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "HF_HUB_OFFLINE": "1"}
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("w") as handle:
        subprocess.run([executable, *command[1:]], check=True, stdout=handle, stderr=subprocess.STDOUT, env=env, cwd=ROOT)


def per_prompt(path: Path) -> dict[str, np.ndarray]:
    """Per-prompt means of every reward in an evaluation JSON (from training or `loopdiff eval`)."""
    return {name: np.asarray(values) for name, values in json.loads(path.read_text())["per_prompt"].items()}


def reward_curve(run_dir: Path, key: str, window: int) -> np.ndarray:
    """``(epochs, 2)`` of (epoch, trailing mean over ``window`` epochs of ``key``) from metrics.jsonl."""
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    values = np.array([r[key] for r in records])
    smoothed = np.array([values[max(0, i - window + 1) : i + 1].mean() for i in range(len(values))])
    return np.stack([np.array([r["epoch"] for r in records], dtype=float), smoothed], axis=1)


def plot_curves(runs: Path, seeds: list[int], path: Path, window: int = 10) -> dict[str, float]:
    """LOOP's training reward and the control's (the same reward, monitored) with 80% bands over seeds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curves = {
        f"LOOP (trained on {REWARD})": np.stack(
            [reward_curve(runs / f"loop-s{s}", "reward/mean", window)[:, 1] for s in seeds]),
        "random_control (trained on noise)": np.stack(
            [reward_curve(runs / f"control-s{s}", f"monitor/{REWARD}/mean", window)[:, 1] for s in seeds]),
    }
    epochs = np.arange(1, next(iter(curves.values())).shape[1] + 1)
    fig, ax = plt.subplots(figsize=(7, 4))
    bands = {}
    for (label, rows), color in zip(curves.items(), ("tab:blue", "tab:gray")):
        mean, low, high = prediction_interval(rows, 0.8)
        ax.plot(epochs, mean, color=color, label=label)
        ax.fill_between(epochs, low, high, color=color, alpha=0.25)
        bands[label] = (mean, low, high)
    ax.set_xlabel("epoch")
    ax.set_ylabel(f"training reward ({REWARD}),\n{window}-epoch trailing mean")
    ax.set_title(f"{SETUP['config'] or 'Main job'}: mean and 80% prediction band over {len(seeds)} seeds")
    ax.legend(loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    (loop_mean, loop_low, _), (_, _, control_high) = bands.values()
    above = loop_low > control_high
    return {"first_epoch_loop_band_above_control_band": int(epochs[above][0]) if above.any() else None,
            "final_loop_mean": float(loop_mean[-1]), "final_control_band_high": float(control_high[-1])}


def comparison_grid(run_dir: Path, results: Path) -> None:
    """The base beside the model the run is judged by (the same prompts and seeds, three images each):
    the run's own ``base_vs_final.png``, or ``base_vs_best.png`` drawn from its evaluation grids."""
    kept = kept_tag("loop")
    if kept == "final":
        shutil.copy(run_dir / "grids/base_vs_final.png", results / "base_vs_final.png")
        return
    import torch

    from loopdiff.grids import side_by_side

    grids = {tag: torch.load(run_dir / f"eval/{tag}_grid.pt", weights_only=True) for tag in ("base", kept)}
    prompts = json.loads((run_dir / "eval/base.json").read_text())["prompts"]
    n = min(len(g) for g in grids.values())
    side_by_side(results / f"base_vs_{kept}.png", prompts[:n], {t: g[:n] for t, g in grids.items()}, per_model=3)


def paired(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    """Mean of ``a - b`` over prompts and its standard error."""
    difference = summarize(a - b)
    return difference.mean, difference.se


def summary_rows(runs: Path, seeds: list[int]) -> list[dict]:
    """One row per training seed x evaluation seed."""
    rows = []
    for seed in seeds:
        loop_dir, control_dir = runs / f"loop-s{seed}", runs / f"control-s{seed}"
        files = {
            TRAIN_EVAL_SEED: (loop_dir / "eval/base.json", loop_dir / f"eval/{kept_tag('loop')}.json",
                              control_dir / "eval/final.json"),
            SECOND_EVAL_SEED: (runs / f"base-eval{SECOND_EVAL_SEED}.json",
                               loop_dir / f"eval/{kept_tag('loop')}-eval{SECOND_EVAL_SEED}.json",
                               control_dir / f"eval/final-eval{SECOND_EVAL_SEED}.json"),
        }
        for eval_seed, (base_file, final_file, control_file) in files.items():
            base, final, control = per_prompt(base_file), per_prompt(final_file), per_prompt(control_file)
            gain, gain_se = paired(final[HELD_OUT], control[HELD_OUT])
            rows.append({
                "train_seed": seed, "eval_seed": eval_seed,
                "base": float(base[HELD_OUT].mean()), "final": float(final[HELD_OUT].mean()),
                "control_final": float(control[HELD_OUT].mean()),
                "final_minus_control": gain, "final_minus_control_se_over_prompts": gain_se,
                "reward_base": float(base[REWARD].mean()), "reward_final": float(final[REWARD].mean()),
                "reward_control_final": float(control[REWARD].mean()),
                "binding_base": float(base[BINDING].mean()), "binding_final": float(final[BINDING].mean()),
                "binding_control_final": float(control[BINDING].mean()),
                "prompts": len(base[HELD_OUT]),
                "commands": {
                    "loop": shlex.join(train_command("loop", seed, runs / f"loop-s{seed}")),
                    "control": shlex.join(train_command("control", seed, runs / f"control-s{seed}")),
                    **({} if eval_seed == TRAIN_EVAL_SEED else {
                        "eval_loop": shlex.join(eval_command(str(kept_model(loop_dir, "loop")),
                                                             loop_dir / f"eval/{kept_tag('loop')}-eval{eval_seed}.json",
                                                             eval_seed)),
                        "eval_control": shlex.join(eval_command(str(control_dir / "final_pipeline"),
                                                                control_dir / f"eval/final-eval{eval_seed}.json", eval_seed)),
                        "eval_base": shlex.join(eval_command(SETUP["base_model"], runs / f"base-eval{eval_seed}.json", eval_seed)),
                    }),
                },
            })
    return rows


def verdict(rows: list[dict]) -> dict:
    """The acceptance figures: gains over the base, LOOP minus control with its standard error over seeds."""
    seeds = sorted({r["train_seed"] for r in rows})
    per_seed = {key: [np.mean([r[key] for r in rows if r["train_seed"] == s]) for s in seeds]
                for key in ("base", "final", "control_final", "reward_base", "reward_final", "reward_control_final",
                            "binding_base", "binding_final", "binding_control_final")}
    out = {"task": SETUP["task"], "config": SETUP["config"], "train_seeds": len(seeds),
           "eval_seeds": len({r["eval_seed"] for r in rows})}
    for prefix, (b, f, c) in {"held_out": ("base", "final", "control_final"),
                              "reward": ("reward_base", "reward_final", "reward_control_final"),
                              "binding": ("binding_base", "binding_final", "binding_control_final")}.items():
        gain = summarize([x - y for x, y in zip(per_seed[f], per_seed[b])])
        control_gain = summarize([x - y for x, y in zip(per_seed[c], per_seed[b])])
        difference = summarize([x - y for x, y in zip(per_seed[f], per_seed[c])])
        out[prefix] = {"base": float(np.mean(per_seed[b])), "gain": gain.mean, "gain_se": gain.se,
                       "control_gain": control_gain.mean, "control_gain_se": control_gain.se,
                       "final_minus_control": difference.mean, "final_minus_control_se": difference.se,
                       "relative_gain": gain.mean / float(np.mean(per_seed[b]))}
    out["held_out"]["evaluator"], out["reward"]["name"], out["binding"]["evaluator"] = HELD_OUT, REWARD, BINDING
    return out


def scorer_agreement(models: dict[str, str | None], n: int = 256, seed: int = 7) -> dict[str, float]:
    """Per model, the share of image pairs the training reward orders as the held-out evaluator does."""
    if SETUP["task"] == "color":
        return binding_agreement(models, n, seed)
    import torch

    from loopdiff.embedded.aesthetic import ColorfulnessEvaluator, LearnedAesthetic
    from loopdiff.embedded.train_scorers import base_model_images, pairwise_agreement

    scorer, evaluator = LearnedAesthetic(), ColorfulnessEvaluator()
    out = {}
    for name, model in models.items():
        images = base_model_images(n, seed, "val", model=model)
        with torch.no_grad():
            out[name] = pairwise_agreement(scorer(images, [""] * n, [{}] * n), evaluator(images, [""] * n, [{}] * n))
    return out


def binding_agreement(models: dict[str, str | None], prompts: int = 40, per_prompt: int = 8, seed: int = 7) -> dict:
    """Per model, on ``per_prompt`` images of each of ``prompts`` validation prompts (the config's sampler):
    among pairs of images of one prompt that the strict evaluator tells apart (one binds, one does not), the
    share the VQA reward ranks the same way (0.5 is chance), and the evaluator's and the reward's means."""
    import torch

    from loopdiff.embedded.evaluator import HeldOutEvaluator
    from loopdiff.embedded.pipeline import load_embedded_pipeline
    from loopdiff.embedded.prompts import load_prompts
    from loopdiff.embedded.rewards import EmbeddedVQA

    steps, guidance, eta = (float(v) for v in sampler_flags()[1::2])
    chosen = load_prompts("color", "val")[:prompts]
    reward, evaluator = EmbeddedVQA(), HeldOutEvaluator()
    out = {}
    for name, model in models.items():
        pipe = load_embedded_pipeline(path=model)
        batch = [p for p in chosen for _ in range(per_prompt)]
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            images = pipe(batch, num_inference_steps=int(steps), guidance_scale=guidance, eta=eta,
                          generator=generator, output_type="pt").images.float().clamp(0, 1)
            scores = reward(images, batch, [{}] * len(batch)).view(prompts, per_prompt)
        truth = evaluator(images, batch, [{}] * len(batch)).view(prompts, per_prompt)
        agree = total = 0.0
        for r, t in zip(scores, truth):
            differs = t[:, None] > t[None, :]
            agree += float(((r[:, None] > r[None, :]) & differs).sum() + 0.5 * ((r[:, None] == r[None, :]) & differs).sum())
            total += float(differs.sum())
        out[name] = {"pairwise_agreement": agree / total if total else None, "pairs": int(total),
                     "evaluator_mean": float(truth.mean()), "reward_mean": float(scores.mean())}
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", choices=tuple(TASKS), default="color", help="the job and its measures")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--runs", type=Path, default=Path("runs/main-job"))
    parser.add_argument("--results", type=Path, default=Path("docs/results/main-job"))
    parser.add_argument("--jobs", type=int, default=2, help="runs at a time")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per run")
    parser.add_argument("--config", default=None, help="the config to train (default: the task's)")
    parser.add_argument("--base-model", default="embedded", help="the base model the config fine-tunes")
    parser.add_argument("--eval-args", default="", help="extra `loopdiff eval` flags (the config's sampler)")
    parser.add_argument("--override", nargs="*", default=[], help="extra section.field=value for every run")
    parser.add_argument("--no-agreement", action="store_true", help="skip the scorer agreement measure")
    parser.add_argument("--kept", choices=("final", "best"), default="final",
                        help="judge the LOOP runs by their final model or by the one output.keep_best kept")
    args = parser.parse_args(argv)
    global HELD_OUT, REWARD, BINDING
    task = TASKS[args.task]
    HELD_OUT, REWARD, BINDING = task["held_out"], task["reward"], task["binding"]
    SETUP.update(task=args.task, config=args.config or task["config"], overrides=args.override, base_model=args.base_model,
                 eval_args=shlex.split(args.eval_args), runs=args.runs, kept=args.kept)

    jobs = []
    for seed in args.seeds:
        for kind in ("loop", "control"):
            run_dir = args.runs / f"{kind}-s{seed}"
            if not (run_dir / "eval/final.json").is_file():
                jobs.append((train_command(kind, seed, run_dir), run_dir / "train.log"))
    with ThreadPoolExecutor(args.jobs) as pool:
        list(pool.map(lambda job: run(*job, args.threads), jobs))
    evals = []
    base_file = args.runs / f"base-eval{SECOND_EVAL_SEED}.json"
    if not base_file.is_file():
        evals.append((eval_command(args.base_model, base_file, SECOND_EVAL_SEED), args.runs / "base-eval.log"))
    for seed in args.seeds:
        for kind in ("loop", "control"):
            run_dir = args.runs / f"{kind}-s{seed}"
            out = run_dir / f"eval/{kept_tag(kind)}-eval{SECOND_EVAL_SEED}.json"
            if not out.is_file():
                evals.append((eval_command(str(kept_model(run_dir, kind)), out, SECOND_EVAL_SEED), run_dir / "eval.log"))
    with ThreadPoolExecutor(args.jobs) as pool:
        list(pool.map(lambda job: run(*job, args.threads), evals))

    args.results.mkdir(parents=True, exist_ok=True)
    rows = summary_rows(args.runs, args.seeds)
    (args.results / "summary.json").write_text(json.dumps(rows, indent=1) + "\n")
    figures = verdict(rows) | {"curves": plot_curves(args.runs, args.seeds, args.results / "training_reward.png")}
    models = {"base": None} | {f"{kind}-s{s}": str(kept_model(args.runs / f"{kind}-s{s}", kind))
                               for s in args.seeds for kind in ("loop", "control")}
    if not args.no_agreement:
        figures["scorer_agreement"] = scorer_agreement(models)
    (args.results / "verdict.json").write_text(json.dumps(figures, indent=1) + "\n")
    comparison_grid(args.runs / f"loop-s{args.seeds[0]}", args.results)
    fidelity = args.runs / f"loop-s{args.seeds[0]}/grids/fidelity.png"
    if fidelity.is_file():
        shutil.copy(fidelity, args.results / "fidelity.png")
    print(json.dumps(figures, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
