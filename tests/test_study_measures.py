"""The study's measurements against independent computations: estimator noise, the K/(K-1) identity,
claim verdicts from paired differences, crossing points, and the deterministic sampler."""

from __future__ import annotations

import math
import statistics

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler

from loopdiff.advantages import leave_one_out
from loopdiff.diagnostics.estimator_variance import (
    ScoreSamples, estimator_noise, loo_noise_prediction, noise_table,
)
from loopdiff.estimators import estimator_from_preset
from loopdiff.sampling.policy import DiffusionPolicy, PolicyConfig
from loopdiff.study.claims import paired_step
from loopdiff.study.efficiency import first_crossing, smoothed
from loopdiff.study.spec import StudyError, study_spec_from_dict


def synthetic(groups: int, k: int, dims: int, seed: int = 0, coupled: float = 0.0, offset: float = 0.0) -> ScoreSamples:
    """Random score vectors; rewards independent of them unless ``coupled`` (then the first coordinate
    of the score adds to the reward, giving a true gradient along it)."""
    g = torch.Generator().manual_seed(seed)
    scores = torch.randn(groups * k, dims, generator=g)
    rewards = offset + torch.randn(groups * k, generator=g).double() + coupled * scores[:, 0].double()
    prompts = [f"p{j}" for j in range(groups) for _ in range(k)]
    return ScoreSamples(scores, rewards, prompts, k)


def test_estimator_noise_matches_a_brute_force_covariance() -> None:
    samples = synthetic(groups=7, k=3, dims=5, coupled=0.5)
    for est in (estimator_from_preset("rloo", samples_per_prompt=2), estimator_from_preset("reinforce")):
        k = est.samples_per_prompt
        rewards = samples.rewards.numpy().reshape(7, 3)[:, :k]
        scores = samples.scores.numpy().reshape(7, 3, 5)[:, :k]
        if k == 1:
            adv = rewards
        else:
            adv = np.stack([rewards[:, i] - np.delete(rewards, i, axis=1).mean(axis=1) for i in range(k)], axis=1)
        units = (adv[..., None] * scores).mean(axis=1).reshape(-1, 5)
        trace = np.trace(np.cov(units, rowvar=False, ddof=1))
        stats = estimator_noise(est, samples)
        assert stats.units == len(units)
        assert stats.noise_per_sample == pytest.approx(k * trace, rel=1e-5)
        assert stats.mean_sq == pytest.approx(float((units.mean(axis=0) ** 2).sum()), rel=1e-5)
        assert stats.signal_sq == pytest.approx(stats.mean_sq - trace / len(units), rel=1e-5)
        assert stats.snr(24) == pytest.approx(stats.signal_sq * 24 / (k * trace), rel=1e-5)


def test_leave_one_out_noise_follows_k_over_k_minus_one() -> None:
    """With rewards independent of the scores, per-sample noise is K/(K-1) sigma^2 |s|^2 exactly in
    expectation; 20000 groups pin the ratios to about 1%."""
    samples = synthetic(groups=20000, k=4, dims=3, seed=1)
    rewards = samples.rewards
    groups = torch.arange(len(rewards)) // 4
    assert torch.allclose(leave_one_out(rewards, groups),
                          4 / 3 * (rewards - rewards.view(-1, 4).mean(1).repeat_interleave(4)))
    noise = {k: estimator_noise(estimator_from_preset("rloo", samples_per_prompt=k), samples).noise_per_sample
             for k in (2, 3, 4)}
    for k in (2, 3):
        assert noise[k] / noise[4] == pytest.approx(loo_noise_prediction(k, 4), rel=0.03)
    assert noise[4] == pytest.approx(4 / 3 * 1.0 * 3, rel=0.03)  # sigma^2 = 1, E|s|^2 = 3 dims
    with pytest.raises(ValueError, match="K >= 2"):
        loo_noise_prediction(1, 4)


def test_loop_and_rloo_share_the_on_policy_gradient_and_unbiased_signal_agrees() -> None:
    samples = synthetic(groups=10000, k=4, dims=2, seed=2, coupled=1.0, offset=3.0)
    rows = {r["estimator"]: r for r in noise_table(
        [estimator_from_preset("reinforce"), estimator_from_preset("rloo"), estimator_from_preset("loop")], samples, 24)}
    assert rows["loop"]["noise_per_sample"] == pytest.approx(rows["rloo"]["noise_per_sample"])
    # E[r s] = E[s_0^2] e_0 = e_0: both unbiased estimators see |signal|^2 = 1; the baseline removes the
    # rewards' offset of 3, which REINFORCE carries as noise
    assert rows["reinforce"]["signal_sq"] == pytest.approx(1.0, abs=0.15)  # 3 sd of its estimate
    assert rows["rloo"]["signal_sq"] == pytest.approx(1.0, abs=0.1)
    assert rows["rloo"]["noise_per_sample"] < rows["reinforce"]["noise_per_sample"]
    ppo = noise_table([estimator_from_preset("ppo", advantage_clip=1e9)], samples, 24)[0]
    std = float(samples.subset(1).rewards.std(unbiased=False))  # PPO takes one sample per prompt
    assert ppo["gradient_scale"] == pytest.approx(1 / std, rel=1e-5)
    # the z-scored advantages are (r - mean) / std: in reward units, a batch-mean baseline's noise
    bc = noise_table([estimator_from_preset("reinforce_bc")], samples, 24)[0]
    assert ppo["noise_in_reward_units"] == pytest.approx(bc["noise_per_sample"], rel=1e-4)
    assert rows["rloo"]["samples_for_snr_one"] == pytest.approx(
        rows["rloo"]["noise_per_sample"] / rows["rloo"]["signal_sq"])


@pytest.mark.parametrize(("higher", "paper", "verdict", "powered"), [
    ({0: 1.30, 1: 1.31, 2: 1.29}, 0.1, "holds", True),      # +0.30, se ~0.006
    ({0: 0.90, 1: 0.91, 2: 0.89}, 0.1, "fails", True),      # -0.10 at many SE
    ({0: 1.01, 1: 1.02, 2: 0.98}, 0.5, "fails", True),      # near zero; +0.5 excluded
    ({0: 1.05, 1: 0.96, 2: 1.04}, 0.05, "undecided", False),  # noise larger than the paper's gap
    ({0: 1.05, 1: 0.96, 2: 1.04}, None, "undecided", None),
])
def test_paired_step_verdicts(higher, paper, verdict, powered) -> None:
    lower = {0: 1.0, 1: 1.0, 2: 1.0}
    step = paired_step(lower, higher, paper, ("a", "b"))
    diffs = [higher[s] - lower[s] for s in (0, 1, 2)]
    assert step.difference == pytest.approx(statistics.fmean(diffs))
    assert step.se == pytest.approx(statistics.stdev(diffs) / math.sqrt(3))
    assert (step.verdict, step.powered, step.seeds) == (verdict, powered, 3)


def test_paired_step_pairs_seeds_and_the_base_model() -> None:
    step = paired_step({0: 1.0, 1: 2.0, 5: 9.0}, {0: 1.5, 1: 2.4, 7: 0.0}, None, ("a", "b"))
    assert step.seeds == 2 and step.difference == pytest.approx(0.45)
    base = paired_step({-1: 1.0}, {0: 1.2, 1: 1.4}, 0.1, ("base", "b"))
    assert (base.seeds, base.difference, base.paper_difference) == (2, pytest.approx(0.3), pytest.approx(0.1))
    assert paired_step({0: 1.0}, {0: 2.0}, None, ("a", "b")).verdict == "undecided"  # one seed decides nothing


def test_first_crossing_and_smoothing() -> None:
    xs, ys = np.array([1, 2, 3, 4.0]), np.array([0.1, 0.3, 0.7, 0.9])
    assert first_crossing(xs, ys, 0.5) == pytest.approx(2.5)
    assert first_crossing(xs, ys, 0.05) == 1.0 and first_crossing(xs, ys, 1.0) == math.inf
    values = np.array([1.0, 3.0, 5.0, 7.0, 9.0])
    assert smoothed(values, 2).tolist() == [1.0, 2.0, 4.0, 6.0, 8.0]


def test_deterministic_policy_is_ddim_eta_zero() -> None:
    scheduler = DDIMScheduler(num_train_timesteps=100)

    class Constant(torch.nn.Module):
        def forward(self, x, t, encoder_hidden_states=None):
            return type("Out", (), {"sample": 0.3 * x + 0.01 * encoder_hidden_states.mean()})()

    policy = DiffusionPolicy(Constant(), scheduler, PolicyConfig(guidance_scale=1.0, eta=1.0, num_steps=5))
    plain = policy.deterministic()
    assert plain.config.eta == 0.0 and policy.config.eta == 1.0 and plain.unet is policy.unet
    x = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    embeds = torch.ones(2, 1, 8)
    t = scheduler.timesteps[1]
    out = plain.step(x, t, embeds, embeds, generator=torch.Generator().manual_seed(1))
    expected = DDIMScheduler(num_train_timesteps=100)
    expected.set_timesteps(5)
    ref = expected.step(0.3 * x + 0.01, t, x, eta=0.0).prev_sample
    assert out.log_prob is None and torch.allclose(out.prev_sample, ref, atol=1e-6)


def test_study_evaluators_variance_and_claim_fields_are_checked() -> None:
    def study(**extra):
        base = {"name": "s", "base": {"model": {"pretrained": "embedded"}},
                "tasks": {"a": {}, "b": {}}, "methods": {"ppo": {"estimator": {"preset": "ppo"}}},
                "tables": {"t": {"methods": ["base", "ppo"], "tasks": ["a", "b"]}}}
        return study_spec_from_dict({**base, **extra})

    spec = study(evaluator={"a": "embedded_eval"})
    assert (spec.evaluator_for("a"), spec.evaluator_for("b")) == ("embedded_eval", None)
    assert "embedded_eval" in spec.run_config("a", "ppo", 0, __import__("pathlib").Path("r")).eval.rewards
    for bad, message in [
        ({"evaluator": {"c": "x"}}, "evaluator.c: no such task"),
        ({"evaluator": 3}, "evaluator=3"),
        ({"evaluator": {"a": "embedded_eval"},
          "claims": [{"increasing": ["base", "ppo"], "metric": "evaluator"}]}, "no evaluator for task 'b'"),
        ({"variance": {"tasks": ["a"], "estimators": {"x": {"preset": "nope"}}}}, "variance.estimators.x"),
        ({"variance": {"tasks": ["a"], "groups": 1, "estimators": {"x": {"preset": "rloo"}}}}, "variance.groups=1"),
        ({"claims": [{"increasing": ["base", "ppo"], "paper_effect": {"z": 0.1}}]}, "paper_effect.z"),
        ({"claims": [{"increasing": ["base", "ppo"], "paper_effect": {"a": "big"}}]}, "paper_effect.a='big'"),
        ({"efficiency": {"tasks": ["a"], "methods": ["ppo"], "reference": "loop"}}, "efficiency.reference"),
    ]:
        with pytest.raises(StudyError, match=message.replace("(", r"\(").replace(")", r"\)")):
            study(**bad)


def test_study_workers_end_with_their_parent(tmp_path) -> None:
    """A killed ``loopdiff study`` takes its workers with it (they would go on writing into the study)."""
    import os
    import signal
    import subprocess
    import sys
    import time

    script = tmp_path / "parent.py"
    pid_file = tmp_path / "worker.pid"
    script.write_text(
        "import multiprocessing, os, sys, time\n"
        "from concurrent.futures import ProcessPoolExecutor\n"
        "from loopdiff.study.runner import exit_with_parent\n"
        "def work(path):\n"
        "    open(path, 'w').write(str(os.getpid()))\n"
        "    time.sleep(900)\n"
        "if __name__ == '__main__':\n"
        "    pool = ProcessPoolExecutor(1, mp_context=multiprocessing.get_context('spawn'), initializer=exit_with_parent)\n"
        f"    pool.submit(work, {str(pid_file)!r})\n"
        "    time.sleep(900)\n"
    )
    parent = subprocess.Popen([sys.executable, str(script)], env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    try:
        for _ in range(3000):  # a loaded machine may take minutes to start the worker
            if pid_file.is_file() and pid_file.read_text():
                break
            time.sleep(0.1)
        worker = int(pid_file.read_text())
        os.kill(worker, 0)  # alive while its parent is
        parent.send_signal(signal.SIGKILL)
        parent.wait()
        for _ in range(600):
            try:
                os.kill(worker, 0)
            except ProcessLookupError:
                break
            time.sleep(0.1)
        else:
            os.kill(worker, signal.SIGKILL)
            pytest.fail("the worker outlived its killed parent")
    finally:
        parent.kill()


def test_study_threads_must_be_positive(tmp_path) -> None:
    from loopdiff.study.runner import run_study

    spec = study_spec_from_dict({"name": "s", "base": {"model": {"pretrained": "embedded"}}, "tasks": {"a": {}},
                                 "methods": {"ppo": {"estimator": {"preset": "ppo"}}},
                                 "tables": {"t": {"methods": ["ppo"], "tasks": ["a"]}}})
    with pytest.raises(StudyError, match="--threads 0 must be >= 1"):
        run_study(spec, tmp_path, threads=0, progress=False)
    assert not (tmp_path / "runs").exists()


def test_peak_memory_is_reset_per_run() -> None:
    """The peak a study run reports is its own, not that of an earlier job in the same worker process."""
    import sys

    from loopdiff.training.metrics import peak_memory_mb, reset_peak_memory

    if not sys.platform.startswith("linux"):
        pytest.skip("the resident-set high-water mark is reset through /proc on Linux")
    reset_peak_memory("cpu")
    before = peak_memory_mb("cpu")
    block = torch.ones(512 * 2**20 // 4)  # 512 MiB, touched
    grown = peak_memory_mb("cpu")
    del block
    reset_peak_memory("cpu")
    after = peak_memory_mb("cpu")
    assert grown - before > 400 and after < grown - 400
