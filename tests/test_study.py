"""``loopdiff study``: a mini study on the tiny pipeline, checked against hand computations from the runs'
own files (eval JSONs, metrics.jsonl), plus the statistics and the study-config validation."""

from __future__ import annotations

import csv
import json
import math
import os
import statistics
from pathlib import Path

import pytest
import torch

from loopdiff.reports.study_command import run_and_report, study_cli
from loopdiff.study import StudyError, load_study_spec, study_spec_from_dict
from loopdiff.study.results import run_dir
from loopdiff.study.runner import _check_unchanged, plan_study
from loopdiff.study.stats import prediction_interval, student_t_quantile, summarize

TRAIN_REWARD, EVALUATOR = "jpeg_compressibility", "jpeg_incompressibility"
TASKS, METHODS, SEEDS, EPOCHS = ("plain", "short"), ("ppo", "loop_k2"), (0, 1), 2


# ---------------------------------------------------------------- statistics


def t90_closed_form(df: int) -> float:
    """Exact 0.9 quantiles of Student's t for df = 1, 2, 4 (independent of the numerical inverse)."""
    p = 0.9
    if df == 1:
        return math.tan(math.pi * (p - 0.5))
    if df == 2:
        return (2 * p - 1) / math.sqrt(2 * p * (1 - p))
    alpha = 4 * p * (1 - p)  # df = 4
    q = math.cos(math.acos(math.sqrt(alpha)) / 3) / math.sqrt(alpha)
    return 2 * math.sqrt(q - 1)


@pytest.mark.parametrize("df", [1, 2, 4])
def test_t_quantile_matches_closed_forms(df: int) -> None:
    assert student_t_quantile(0.9, df) == pytest.approx(t90_closed_form(df), abs=1e-7)


@pytest.mark.parametrize(("p", "df", "table"), [
    (0.9, 3, 1.637744), (0.9, 5, 1.475884), (0.9, 10, 1.372184), (0.9, 30, 1.310415),
    (0.975, 2, 4.302653), (0.95, 7, 1.894579), (0.1, 3, -1.637744),
])
def test_t_quantile_matches_printed_tables(p: float, df: int, table: float) -> None:
    assert student_t_quantile(p, df) == pytest.approx(table, abs=2e-6)


def test_prediction_interval_by_hand() -> None:
    rows = [[1.0, 2.0, 0.5], [3.0, 6.0, 0.5], [5.0, 4.0, 0.5]]  # 3 seeds x 3 epochs
    mean, low, high = prediction_interval(torch.tensor(rows).numpy())
    for k in range(3):
        column = [r[k] for r in rows]
        half = t90_closed_form(2) * statistics.stdev(column) * math.sqrt(1 + 1 / 3)
        assert mean[k] == pytest.approx(statistics.fmean(column))
        assert (low[k], high[k]) == pytest.approx((statistics.fmean(column) - half, statistics.fmean(column) + half))
    assert low[2] == high[2] == 0.5  # no spread, no interval


def test_summary_standard_error() -> None:
    s = summarize([0.2, 0.5, 0.6])
    assert (s.mean, s.n) == (pytest.approx(statistics.fmean([0.2, 0.5, 0.6])), 3)
    assert s.se == pytest.approx(statistics.stdev([0.2, 0.5, 0.6]) / math.sqrt(3))
    assert math.isnan(summarize([0.4]).se) and summarize([]).n == 0


# ---------------------------------------------------------------- the study config


def study_dict(pipeline: Path | str, prompts: Path | str) -> dict:
    return {
        "name": "mini",
        "seeds": list(SEEDS),
        "evaluator": EVALUATOR,
        "base": {
            "model": {"pretrained": str(pipeline), "device": "cpu"},
            "sampling": {"num_steps": 3, "batch_size": 8},
            "training": {"epochs": EPOCHS, "samples_per_epoch": 8, "learning_rate": 1e-3},
            "prompts": {"train": str(prompts), "val": str(prompts)},
            "reward": {"name": TRAIN_REWARD, "asynchronous": False},
            "eval": {"images_per_prompt": 2, "max_prompts": 2, "grid_prompts": 2, "deterministic": True},
            "output": {"tensorboard": False, "checkpoint_every": 1},
        },
        "tasks": {"plain": {"label": "Plain"}, "short": {"label": "Short", "sampling": {"num_steps": 2}}},
        "methods": {"ppo": {"label": "PPO", "estimator": {"preset": "ppo"}},
                    "loop_k2": {"label": "LOOP k=2", "estimator": {"preset": "loop", "samples_per_prompt": 2}}},
        "tables": {"main": {"title": "Main", "methods": ["base", *METHODS], "tasks": list(TASKS)}},
        "grids": {"methods": ["base", *METHODS], "seed": 0, "images_per_model": 2, "prompts": 2},
        "claims": [{"text": "LOOP beats PPO", "increasing": ["ppo", "loop_k2"], "metric": "training"},
                   {"increasing": ["ppo", "loop_k2"], "metric": "training_curve"}],
        "variance": {"tasks": ["plain"], "groups": 3, "batch": 4,
                     "estimators": {"reinforce": {"preset": "reinforce"},
                                    "rloo_k2": {"label": "RLOO k=2", "preset": "rloo", "samples_per_prompt": 2}}},
        "efficiency": {"tasks": ["plain"], "methods": ["loop_k2"], "reference": "ppo"},
    }


@pytest.mark.parametrize(("change", "expected"), [
    (lambda d: d["tables"]["main"].update(methods=["base", "rloo"]), ["tables.main.methods", "'rloo'"]),
    (lambda d: d["methods"]["ppo"].update(estimator={"preset": "ppo", "samples_per_prompt": 3}),
     ["run plain/ppo/seed0", "training.samples_per_epoch=8", "K=3"]),
    (lambda d: d["methods"]["ppo"].update(training={"samples_per_epoch": 16}),
     ["methods.ppo", "samples_per_epoch=16", "'plain'", "8"]),
    (lambda d: d["methods"]["ppo"].update(estimator={"presett": "ppo"}), ["methods.ppo", "estimator.presett"]),
    (lambda d: d["methods"]["ppo"].update(estimator={"preset": "ddpg"}),  # the config's own choice check
     ["methods.ppo: estimator.preset='ddpg' is invalid; allowed: reinforce, reinforce_bc, rloo, ppo"]),
    (lambda d: d.update(seeds=[0, 0]), ["seeds=[0, 0]"]),
    (lambda d: d.update(sedes=[0]), ["unknown study field 'sedes'"]),
    (lambda d: d["methods"].update(base={}), ["methods.base", "reserved"]),
    (lambda d: d["claims"][0].update(metric="speed"), ["claims[0].metric='speed'", "training_curve"]),
    (lambda d: d["grids"].update(seed=7), ["grids.seed=7"]),
    (lambda d: d["base"]["eval"].update(max_prompts=0), ["eval.max_prompts=0"]),
    (lambda d: d["base"]["training"].update(epochs="many"), ["training.epochs='many'"]),
])
def test_invalid_study_configs_name_field_and_value(change, expected: list[str]) -> None:
    data = study_dict("/nowhere/pipeline", "/nowhere/prompts.txt")
    change(data)
    with pytest.raises(StudyError) as info:
        study_spec_from_dict(data)
    assert all(part in str(info.value) for part in expected), str(info.value)


def test_run_configs_layer_base_task_method_and_study_fields(tmp_path) -> None:
    spec = study_spec_from_dict(study_dict("/pipe", "/prompts.txt"))
    config = spec.run_config("short", "loop_k2", 1, tmp_path / "r")
    assert (config.sampling.num_steps, config.sampling.batch_size) == (2, 8)  # task over base
    assert (config.estimator.preset, config.estimator.samples_per_prompt) == ("loop", 2)
    assert (config.training.seed, config.eval.before_training, config.output.resume) == (1, False, True)
    assert config.eval.rewards == [EVALUATOR] and config.output.dir == str(tmp_path / "r")
    assert spec.base_config("plain", tmp_path).training.epochs == 0


def test_study_file_keeps_the_text_of_text_fields(tmp_path) -> None:
    """As in a run config file, an unquoted yes/0777/off under a text field stays text in base, tasks, methods."""
    import yaml

    values = study_dict("/pipe", "/prompts.txt")
    values["base"]["model"]["revision"] = "REVISION"
    values["tasks"]["plain"]["prompts"] = {"train": "TRAIN"}
    values["methods"]["ppo"]["eval"] = {"rewards": ["x"], "seed": 7}
    text = yaml.safe_dump(values).replace("REVISION", "0777").replace("TRAIN", "off")
    (tmp_path / "mini.yaml").write_text(text.replace("seed: 7", "seed: 0x07"))
    spec = load_study_spec(tmp_path / "mini.yaml")
    config = spec.run_config("plain", "ppo", 0, tmp_path / "r")
    assert (config.model.revision, config.prompts.train, config.eval.seed) == ("0777", "off", 7)
    assert spec.seeds == SEEDS and spec.grids.images_per_model == 2  # the study's own fields read as before


def test_run_folder_saved_under_a_renamed_field_is_unchanged(tmp_path) -> None:
    values = study_dict("/pipe", "/prompts.txt")
    values["base"]["training"]["train_denoising_steps"] = 2
    job = plan_study(study_spec_from_dict(values), tmp_path)[-1]
    saved = job.config.to_dict()
    saved["training"]["first_steps"] = saved["training"].pop("train_denoising_steps")
    job.folder.mkdir(parents=True)
    (job.folder / "config.json").write_text(json.dumps(saved))
    _check_unchanged(job)  # the old name holds the same value: no StudyError
    saved["training"]["first_steps"] = 1
    (job.folder / "config.json").write_text(json.dumps(saved))
    with pytest.raises(StudyError, match="training.train_denoising_steps=1"):
        _check_unchanged(job)


def test_shipped_paper_study_has_both_tables_and_equal_samples() -> None:
    from importlib import resources

    spec = load_study_spec(Path(str(resources.files("loopdiff") / "configs" / "study-paper.yaml")))
    assert spec.seeds == (0, 1, 2) and spec.evaluator_for("color") == "embedded_eval"
    assert spec.evaluator_for("aesthetic") == "embedded_colorfulness"
    t1, t2, t3 = spec.tables["table1"], spec.tables["table2_tasks"], spec.tables["table3"]
    assert t1.methods == ("reinforce", "reinforce_bc", "ppo") and t1.tasks == ("aesthetic", "color")
    assert spec.tables["table2"].methods == ("base", "ppo", "loop_k2", "loop_k3", "loop_k4")
    assert t3.tasks == ("aesthetic",) and "control" in t3.methods
    assert t2.methods == ("base", "ppo", "loop_k4")
    assert t2.tasks == ("color", "shape", "texture", "spatial", "numeracy")
    ks = {}
    for task, method in spec.pairs():
        config = spec.run_config(task, method, 0, Path("r"))
        from loopdiff.config import build_estimator

        ks[method] = build_estimator(config).samples_per_prompt
        assert config.training.samples_per_epoch == spec.run_config(task, "ppo", 0, Path("r")).training.samples_per_epoch
    assert (ks["loop_k2"], ks["loop_k3"], ks["loop_k4"], ks["ppo"]) == (2, 3, 4, 1)
    assert len(spec.pairs()) * len(spec.seeds) == 21 + 42  # the aesthetic task's 7 methods, the binding tasks'
    control = spec.run_config("aesthetic", "control", 0, Path("r"))
    assert control.reward.name == "random_control" and control.reward.monitor == ["embedded_aesthetic"]
    assert {"embedded_aesthetic", "embedded_colorfulness"} <= set(control.eval.rewards)
    rewards = {t: spec.run_config(t, "ppo", 0, Path("r")).reward.name for t in t2.tasks}
    assert rewards == {"color": "embedded_vqa", "shape": "embedded_vqa", "texture": "embedded_vqa",
                       "spatial": "embedded_spatial", "numeracy": "embedded_numeracy"}


# ---------------------------------------------------------------- a mini study on the tiny pipeline


@pytest.fixture(scope="module")
def mini_study(tiny_pipeline_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("study")
    prompts = root / "prompts.txt"
    prompts.write_text("a red circle\na blue square\na green star\na big cat\n")
    spec = study_spec_from_dict(study_dict(tiny_pipeline_dir, prompts))
    out = root / "out"
    outcome = run_and_report(spec, out, threads=1, command="loopdiff study mini.yaml", progress=False,
                             log=lambda _: None)
    return spec, out, outcome


def all_run_ids() -> list[str]:
    return [f"{t}/{m}/seed{s}" for t in TASKS for m in METHODS for s in SEEDS]


def watched_files(out: Path) -> dict[Path, int]:
    files = [*out.glob("runs/*/*/seed*/eval/final.json"), *out.glob("runs/*/*/seed*/metrics.jsonl"),
             *out.glob("base/*/eval/base.json")]
    return {f: f.stat().st_mtime_ns for f in files}


def test_every_run_and_base_evaluation_is_in_its_folder(mini_study) -> None:
    spec, out, outcome = mini_study
    assert sorted(outcome.ran) == sorted(["base/plain", "base/short", "variance/plain", *all_run_ids()])
    assert not outcome.failed
    for task in TASKS:
        assert json.loads((out / "base" / task / "eval" / "base.json").read_text())["epoch"] == 0
        for method in METHODS:
            for seed in SEEDS:
                folder = out / "runs" / task / method / f"seed{seed}"
                saved = json.loads((folder / "config.json").read_text())
                assert (saved["training"]["seed"], saved["eval"]["before_training"]) == (seed, False)
                assert json.loads((folder / "eval" / "final.json").read_text())["epoch"] == EPOCHS
                assert not (folder / "eval" / "base.json").exists()  # the base model is evaluated once per task
                epochs = [json.loads(line)["epoch"] for line in (folder / "metrics.jsonl").read_text().splitlines()]
                assert epochs == list(range(1, EPOCHS + 1))
    record = json.loads((out / "study.json").read_text())
    assert record["invocations"][0]["command"] == "loopdiff study mini.yaml"
    assert record["total_wall_time_s"] >= record["invocations"][0]["wall_time_s"] > 0
    assert all(r["status"] == "done" and r["wall_time_s"] > 0 for r in record["runs"].values())


def test_rerun_skips_every_finished_run(mini_study) -> None:
    spec, out, _ = mini_study
    before = watched_files(out)
    outcome = run_and_report(spec, out, threads=1, progress=False, log=lambda _: None)
    assert outcome.ran == [] and len(outcome.skipped) == len(all_run_ids()) + len(TASKS) + 1  # + variance/plain
    assert watched_files(out) == before


def test_deleting_one_final_eval_reruns_exactly_that_run_in_a_worker_process(mini_study) -> None:
    spec, out, _ = mini_study
    target = run_dir(out, "short", "loop_k2", 1)
    (target / "eval" / "final.json").unlink()
    before = watched_files(out)
    lines = (target / "metrics.jsonl").read_text()
    outcome = run_and_report(spec, out, jobs=2, threads=1, progress=False, log=lambda _: None)
    assert outcome.ran == ["short/loop_k2/seed1"] and not outcome.failed
    after = watched_files(out)
    changed = {f for f in after if before.get(f) != after[f]}
    assert target / "eval" / "final.json" in changed and all(target in f.parents for f in changed)
    assert (target / "metrics.jsonl").read_text() == lines  # resumed from the last checkpoint: no new epochs
    assert len(json.loads((out / "study.json").read_text())["invocations"]) >= 2


def read_csv(path: Path) -> dict[str, dict[str, str]]:
    with path.open() as handle:
        return {row["method"]: row for row in csv.DictReader(handle)}


@pytest.mark.parametrize("metric, reward", [("training", TRAIN_REWARD), ("evaluator", EVALUATOR)])
def test_tables_equal_hand_computation_from_eval_files(mini_study, metric: str, reward: str) -> None:
    spec, out, _ = mini_study
    table = read_csv(out / "report" / f"main_{metric}.csv")
    markdown = (out / "report" / f"main_{metric}.md").read_text()
    assert list(table) == ["base", *METHODS]
    for task in TASKS:
        base = json.loads((out / "base" / task / "eval" / "base.json").read_text())
        assert float(table["base"][f"{task}_mean"]) == pytest.approx(statistics.fmean(base["per_prompt"][reward]))
        for method in METHODS:
            values = []
            for seed in SEEDS:
                record = json.loads((out / "runs" / task / method / f"seed{seed}" / "eval" / "final.json").read_text())
                assert len(record["per_prompt"][reward]) == 2
                values.append(statistics.fmean(record["per_prompt"][reward]))  # per-prompt mean, then over prompts
            row, mean, se = table[method], statistics.fmean(values), statistics.stdev(values) / math.sqrt(2)
            assert float(row[f"{task}_mean"]) == pytest.approx(mean, abs=1e-6)  # float32 means in the eval files
            assert float(row[f"{task}_se"]) == pytest.approx(se, abs=1e-6)
            assert row[f"{task}_n"] == "2"
            shown = f"{float(row[f'{task}_mean']):.4f} \u00b1 {float(row[f'{task}_se']):.4f}"
            assert shown in markdown
def test_curves_equal_hand_prediction_intervals(mini_study) -> None:
    spec, out, _ = mini_study
    with (out / "report" / "curves_main.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == len(TASKS) * len(METHODS) * EPOCHS
    t = t90_closed_form(1)  # two seeds: one degree of freedom
    for row in rows:
        rewards = []
        for seed in SEEDS:
            metrics = (out / "runs" / row["task"] / row["method"] / f"seed{seed}" / "metrics.jsonl").read_text()
            by_epoch = {json.loads(l)["epoch"]: json.loads(l)["reward/mean"] for l in metrics.splitlines()}
            rewards.append(by_epoch[int(row["epoch"])])
        half = t * statistics.stdev(rewards) * math.sqrt(1 + 1 / 2)
        assert float(row["mean"]) == pytest.approx(statistics.fmean(rewards))
        assert float(row["low"]) == pytest.approx(statistics.fmean(rewards) - half)
        assert float(row["high"]) == pytest.approx(statistics.fmean(rewards) + half)


def test_claims_are_paired_differences_over_seeds(mini_study) -> None:
    spec, out, _ = mini_study
    records = json.loads((out / "report" / "claims.json").read_text())
    assert len(records) == 2 * len(TASKS)
    for record in (r for r in records if r["metric"] == "training"):
        diffs = []
        for seed in SEEDS:
            means = {m: json.loads((out / "runs" / record["task"] / m / f"seed{seed}" / "eval" / "final.json")
                                   .read_text())["means"][TRAIN_REWARD] for m in METHODS}
            diffs.append(means["loop_k2"] - means["ppo"])
        assert record["difference"] == pytest.approx(statistics.fmean(diffs))
        assert record["se"] == pytest.approx(statistics.stdev(diffs) / math.sqrt(len(SEEDS)))
        z = record["difference"] / record["se"]
        expected = "holds" if z >= 2 else "fails" if z <= -2 else "undecided"
        assert (record["measure"], record["seeds"], record["verdict"]) == ("training_reward", len(SEEDS), expected)
    claims = (out / "report" / "claims.md").read_text()
    assert f"**{records[0]['verdict']}**" in claims.split("\n")[1]


def test_the_deterministic_sampler_and_the_extra_sections(mini_study) -> None:
    spec, out, _ = mini_study
    folder = out / "runs" / "plain" / "ppo" / "seed0" / "eval"
    noisy = json.loads((folder / "final.json").read_text())["means"][EVALUATOR]
    plain = json.loads((folder / "final_deterministic.json").read_text())["means"][EVALUATOR]
    assert noisy != plain  # eta = 0 samples other images from the same initial noise
    rows = json.loads((out / "report" / "sampler.json").read_text())["plain"]
    ppo = next(r for r in rows if r["method"] == "ppo")
    assert ppo["deterministic"]["n"] == len(SEEDS) and rows[0]["method"] == "base"
    seeds = [json.loads((out / "runs" / "plain" / "ppo" / f"seed{s}" / "eval" / name).read_text())["means"][EVALUATOR]
             for s in SEEDS for name in ("final.json", "final_deterministic.json")]
    assert ppo["difference"]["mean"] == pytest.approx(statistics.fmean(seeds[1::2]) - statistics.fmean(seeds[0::2]))
    variance = json.loads((out / "variance" / "plain" / "variance.json").read_text())
    assert [r["name"] for r in variance["estimators"]] == ["reinforce", "rloo_k2"]
    assert variance["samples_per_prompt"] == 2 and all(r["noise_per_sample"] > 0 for r in variance["estimators"])
    index = (out / "report" / "index.html").read_text()
    for section in ("variance.png", "efficiency_plain.png", "eta = 0 (deterministic)", "RLOO k=2", "claims.json"):
        assert section in index
    assert (out / "report" / "efficiency_plain.png").is_file()


def test_markdown_sections_carry_the_records_numbers(mini_study) -> None:
    """sections.md (the results README's tables) shows each claim's and estimator's recorded numbers, as the
    HTML report does, and the HTML variance table has the column in reward units."""
    spec, out, _ = mini_study
    markdown = (out / "report" / "sections.md").read_text()
    index = (out / "report" / "index.html").read_text()
    for record in json.loads((out / "report" / "claims.json").read_text()):
        cell = f"{record['difference']:+.4f} \u00b1 {record['se']:.4f}"
        assert cell in index
        assert any(cell in line and f"**{record['verdict']}**" in line and record["measure"] in line
                   for line in markdown.splitlines())
    variance = json.loads((out / "variance" / "plain" / "variance.json").read_text())
    for r in variance["estimators"]:  # these estimators' advantages are raw rewards: reward units are theirs
        cells = [r["label"], str(r["k"]), f"{r['noise_per_sample']:.3e}", f"{r['noise_in_reward_units']:.3e}",
                 f"{r['signal_sq']:.3e}", f"{r['snr']:+.3f}"]
        assert "| " + " | ".join(cells) + " |" in markdown, cells
        assert "<tr>" + "".join(f"<td>{c}</td>" for c in cells) in index, cells
    assert "in reward units" in index and "seconds per epoch" in markdown and "eta = 0 (deterministic)" in markdown


def test_report_links_are_relative_and_present(mini_study) -> None:
    import re

    spec, out, _ = mini_study
    index = (out / "report" / "index.html").read_text()
    links = re.findall(r'(?:src|href)="([^"]+)"', index)
    assert {"curves_main.png", "grid_plain.png", "grid_short.png", "main_training.csv", "main_evaluator.md"} <= set(links)
    for link in links:
        assert not link.startswith(("/", "file:", "http")) and (out / "report" / link).is_file(), link
    assert os.getcwd() not in index  # the folder the study ran in is the machine's, not the report's
    from PIL import Image

    grid = Image.open(out / "report" / "grid_plain.png")
    assert grid.width == 220 + 3 * 2 * (128 + 4) and grid.height == 18 + 2 * (128 + 4)  # 3 models x 2 images, 2 prompts


def test_only_and_changed_settings(mini_study, tmp_path) -> None:
    spec, out, _ = mini_study
    ids = [job.id for job in plan_study(spec, out, ["plain/ppo/*"])]
    assert ids == ["base/plain", "plain/ppo/seed0", "plain/ppo/seed1"]
    with pytest.raises(StudyError, match="matches no run"):
        plan_study(spec, out, ["nothing/*"])
    saved = out / "runs" / "plain" / "ppo" / "seed0" / "config.json"  # as written before a field existed
    original = saved.read_text()
    older = json.loads(original)
    del older["model"]["train_modules"]
    saved.write_text(json.dumps(older))
    try:
        plan_study(spec, out)  # the missing field is at its default: not a change
        older["training"]["micro_batch_size"] = 7
        saved.write_text(json.dumps(older))
        with pytest.raises(StudyError, match=r"training.micro_batch_size=7"):
            plan_study(spec, out)
    finally:
        saved.write_text(original)
    data = study_dict(spec.base["model"]["pretrained"], spec.base["prompts"]["train"])
    data["base"]["training"]["learning_rate"] = 5e-4
    with pytest.raises(StudyError, match=r"training.learning_rate=0.001, the study now asks for 0.0005"):
        plan_study(study_spec_from_dict(data), out)


def test_cli_report_only_dry_run_and_errors(mini_study, tmp_path, capsys) -> None:
    import yaml

    spec, out, _ = mini_study
    config = tmp_path / "mini.yaml"
    config.write_text(yaml.safe_dump(study_dict(spec.base["model"]["pretrained"], spec.base["prompts"]["train"])))
    (out / "report" / "index.html").unlink()
    assert study_cli([str(config), "--out", str(out), "--report-only"]) == 0
    assert (out / "report" / "index.html").is_file()
    assert study_cli([str(config), "--out", str(out), "--dry-run", "--only", "short/*"]) == 0
    printed = capsys.readouterr().out
    assert "done  short/ppo/seed0" in printed and "plain/ppo" not in printed
    assert study_cli([str(tmp_path / "missing.yaml")]) == 2
    assert "study config" in capsys.readouterr().err
    bad = tmp_path / "bad.yaml"
    data = study_dict("/x", spec.base["prompts"]["train"])
    data["base"]["reward"]["name"] = "no_such_reward"
    bad.write_text(yaml.safe_dump(data))
    assert study_cli([str(bad), "--out", str(tmp_path / "o")]) == 2
    assert "unknown reward 'no_such_reward'" in capsys.readouterr().err


def test_a_users_module_function_reward_passes_the_preflight(tmp_path, tiny_pipeline_dir, monkeypatch) -> None:
    from loopdiff.study.runner import preflight

    (tmp_path / "study_user_reward.py").write_text("def greenness(images, prompts, metadata):\n"
                                                   "    return images[:, 1].mean(dim=(1, 2))\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\na blue square\n")
    for reward, error in [("study_user_reward:greenness", None),
                          ("study_user_reward:greenness:1,jpeg_compressibility:0.5", None),
                          ("study_user_reward:blueness", "module 'study_user_reward' has no attribute 'blueness'"),
                          ("no_such_module_here:f", "cannot import module 'no_such_module_here'")]:
        data = study_dict(tiny_pipeline_dir, prompts)
        data["base"]["reward"]["name"] = reward
        plan = plan_study(study_spec_from_dict(data), tmp_path / f"out{len(reward)}")
        if error is None:
            preflight(plan)
        else:
            with pytest.raises(StudyError, match=error):
                preflight(plan)
