"""bench/gpu.py --tiny runs its GPU code path on the CPU: its figures agree with each other and with counts made
independently here, its CPU-vs-CPU check passes exactly, and a spent budget still writes what it has."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

from _families import FAMILIES, family_configs  # noqa: E402


def run_gpu_bench(tmp_path: Path, *extra: str) -> dict:
    out = tmp_path / "gpu.json"
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    log = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu.py"), "--tiny", "--json", str(out), *extra],
                         capture_output=True, text=True, env=env, timeout=300)
    assert log.returncode == 0, log.stderr[-3000:]
    return json.loads(out.read_text())


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> tuple[dict, Path]:
    folder = tmp_path_factory.mktemp("gpu")
    return run_gpu_bench(folder), folder


def test_cpu_against_cpu_check_is_exact_and_bf16_stays_finite(tiny) -> None:
    result, _ = tiny
    fp32, bf16 = result["checks"]["fp32_cpu_vs_device"], result["checks"]["bf16_finite"]
    assert fp32["passed"] and fp32["log_prob_max_abs_diff"] == 0.0 and fp32["update_rel_diff"] == 0.0
    assert fp32["log_probs"] == 2 * 2 * 4  # 2 prompts x K = 2 samples x 4 steps
    assert fp32["update_norm"] > 0  # the step moved the weights
    assert bf16["passed"] and all(bf16["finite"].values()) and bf16["update_norm"] > 0


def _finite_numbers(value) -> list[float]:
    if isinstance(value, dict):
        return [n for v in value.values() for n in _finite_numbers(v)]
    if isinstance(value, list):
        return [n for v in value for n in _finite_numbers(v)]
    return [value] if isinstance(value, (int, float)) and not isinstance(value, bool) else []


def test_family_figures_are_consistent(tiny) -> None:
    result, _ = tiny
    rows = result["families"]
    assert sorted(r["family"] for r in rows) == sorted(FAMILIES)
    for r in rows:
        assert all(math.isfinite(n) for n in _finite_numbers(r)), r["family"]
        samples, sec = r["setting"]["samples"], r["seconds"]
        assert samples == r["setting"]["prompts"] * r["setting"]["k"] == 2
        assert r["plan_mismatches"] == []  # the warm-up epoch made exactly the planned calls
        assert r["sampling_images_per_second"] == pytest.approx(samples / sec["sampling"])
        assert r["seconds_per_trained_sample"] * samples == pytest.approx(sec["training"])
        assert r["overhead"]["in_epoch_wall"] >= 1.0  # an epoch lasts at least as long as the calls inside it
        assert r["peak_memory_mb"] > 0
        # the meta-device estimate counts what the real trainer trains (LoRA adapters or the whole denoiser)
        assert r["estimate"]["params"]["trainable"] == r["trainable_params"]
        assert r["estimate"]["params"]["denoiser_with_adapters"] == r["unet_params"]


def test_memory_estimate_is_the_parameter_count_times_bytes(tiny) -> None:
    from diffusers import UNet2DConditionModel

    result, _ = tiny
    sd2 = next(r for r in result["families"] if r["family"] == "sd2")
    torch.manual_seed(0)
    unet = UNet2DConditionModel(**family_configs("sd2", 64, 64)["unet"])  # real tensors, counted here
    params = sum(p.numel() for p in unet.parameters())
    estimate = sd2["estimate"]
    assert estimate["params"]["denoiser"] == params
    assert estimate["bytes"]["gradients"] == 4 * params  # full fine-tuning, float32 gradients
    assert estimate["bytes"]["optimizer"] == 8 * params  # AdamW's two moments
    p = estimate["params"]
    assert estimate["bytes"]["weights"] == 4 * (p["denoiser"] + p["vae"] + p["text_encoders"])
    latent = 4 * 8 * 8  # 64 px, 8x downscale, 4 channels
    assert estimate["bytes"]["trajectories"] == 4 * 2 * (2 + 1) * latent  # 2 samples x (2 steps + 1) latents
    assert estimate["total_bytes"] == sum(estimate["bytes"].values())


def test_markdown_table_has_a_row_per_family(tiny) -> None:
    result, folder = tiny
    table = (folder / "gpu.md").read_text()
    rows = [line for line in table.splitlines() if line.startswith("| ") and line.split("|")[1].strip() in FAMILIES]
    assert len(rows) == len(FAMILIES)
    assert "passed" in table and "TRL" in table


def test_spent_budget_still_writes_what_it_has(tmp_path) -> None:
    result = run_gpu_bench(tmp_path, "--budget-s", "0.001", "--skip", "trl")
    assert result["checks"]["fp32_cpu_vs_device"] == {"skipped": "budget spent"}
    assert [r.get("skipped") for r in result["families"]] == ["budget spent"] * len(FAMILIES)
    assert all(r["estimate"]["total_bytes"] > 0 for r in result["families"])  # estimated even when skipped
    assert "trl" not in result and (tmp_path / "gpu.md").is_file()


def test_trl_side_gets_the_sd2_setting_and_its_ratio_is_reported(tmp_path, monkeypatch) -> None:
    """TRL's virtualenv is absent here: a stand-in for the subprocess records the command and answers."""
    import gpu

    monkeypatch.setattr(gpu, "TRL_PYTHON", Path(sys.executable))
    args = gpu.parse_args(["--tiny"])
    setting = {"resolution": 64, "prompts": 1, "k": 4, "samples": 4, "steps": 3, "guidance": 5.0,
               "micro_batch": 2, "clip_range": 1e-4}
    result = {"families": [{"family": "sd2", "setting": setting, "seconds": {"epoch": 2.0}}]}
    seen = []

    def fake_run(command, **kwargs):
        seen.append(command)
        out = Path(command[command.index("--json") + 1])
        out.write_text(json.dumps({"seconds": {"epoch": 5.0}, "versions": {"trl": "0.23.1"}}))
        return subprocess.CompletedProcess(command, 0, "", "")

    gpu.run_trl(result, args, tmp_path, deadline=float("inf"), run=fake_run)
    command = seen[0]
    flag = lambda name: command[command.index(name) + 1]  # noqa: E731
    assert (flag("--samples"), flag("--k"), flag("--steps"), flag("--train-batch")) == ("4", "4", "3", "2")
    assert flag("--device") == "cpu" and flag("--mixed-precision") == "no"
    assert (Path(flag("--pipeline")) / "model_index.json").is_file()
    assert result["trl"]["ratio_trl_over_loopdiff"] == 2.5


@pytest.mark.parametrize("flags, message", [(["--family", "sd5"], "--family sd5: allowed sd2, sdxl, sd3, flux"),
                                            (["--budget-s", "0"], "--budget-s 0.0: must be > 0")])
def test_bad_flags_are_usage_errors(flags, message) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    log = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu.py"), "--tiny", *flags], capture_output=True,
                         text=True, env=env, timeout=120)
    assert log.returncode == 2 and log.stderr.strip().splitlines()[-1].endswith(message)
