"""Training end to end on a tiny pipeline: weights move, reward rises, resume is exact, exports load."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import signal
import subprocess
import sys
from pathlib import Path

from trainer_helpers import PROMPTS, make_trainer


def _weights(unet: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in unet.parameters()])


def test_one_epoch_changes_the_weights_and_logs(tmp_path) -> None:
    trainer = make_trainer(tmp_path, "loop")
    before = _weights(trainer.unet).clone()
    history = trainer.train()
    assert len(history) == 1
    assert (_weights(trainer.unet) - before).abs().max() > 0
    record = history[0]
    assert record["optimizer_steps"] == 4  # LOOP preset: 4 minibatches per batch of samples
    lines = (trainer.run_dir / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 1 and json.loads(lines[0])["reward/mean"] == record["reward/mean"]


def test_full_export_is_a_loadable_pipeline_with_the_trained_unet(tmp_path) -> None:
    from diffusers import StableDiffusionPipeline

    trainer = make_trainer(tmp_path, "reinforce", output={"tensorboard": True})
    trainer.train()
    assert list((trainer.run_dir / "tensorboard").glob("events.out.tfevents.*"))
    path = trainer.export()
    loaded = StableDiffusionPipeline.from_pretrained(path)
    for (name, ours), theirs in zip(trainer.unet.state_dict().items(), loaded.unet.state_dict().values()):
        torch.testing.assert_close(ours, theirs, rtol=0, atol=0, msg=name)


def test_lora_reference_policy_is_the_base_model(tmp_path) -> None:
    trainer = make_trainer(tmp_path, "grpo", model={"lora": True, "lora_rank": 2},
                           training={"learning_rate": 1e-2})
    x, emb = torch.randn(2, 4, 8, 8), torch.randn(2, 12, 16)
    with torch.no_grad():
        base = trainer.unet(x, 10, encoder_hidden_states=emb).sample
    trainer.train()
    with torch.no_grad():
        tuned = trainer.unet(x, 10, encoder_hidden_states=emb).sample
        with trainer.reference.active() as reference:
            ref = reference(x, 10, encoder_hidden_states=emb).sample
        after = trainer.unet(x, 10, encoder_hidden_states=emb).sample
    assert (tuned - base).abs().max() > 1e-6  # LoRA moved the policy
    torch.testing.assert_close(ref, base)  # the reference is the pre-trained model
    torch.testing.assert_close(after, tuned)  # and the adapters are back on afterwards


def test_rloo_raises_a_simple_reward(tmp_path) -> None:
    trainer = make_trainer(
        tmp_path, "rloo", training={"epochs": 16, "samples_per_epoch": 32, "learning_rate": 5e-4}
    )
    rewards = [h["reward/mean"] for h in trainer.train()]
    first, last = np.mean(rewards[:3]), np.mean(rewards[-3:])
    assert last > first + 1.0, rewards


KILLED_RUN = """
import os, signal, sys
from pathlib import Path
import torch
torch.set_num_threads(1)  # float reductions depend on the thread count; both sides use one
sys.path.insert(0, {tests!r})
import signal
import subprocess
import sys
from pathlib import Path

from trainer_helpers import make_trainer

def die_in_epoch_three(epoch, metrics):
    if epoch == 3:  # the checkpoint of epoch 2 exists, epoch 3 is logged but not saved
        os.kill(os.getpid(), signal.SIGKILL)

trainer = make_trainer(Path({folder!r}), "ppo", training={{"epochs": 4}}, output={{"checkpoint_every": 1}})
trainer.train(on_epoch_end=die_in_epoch_three)
"""


def test_kill_then_resume_continues_exactly(tmp_path) -> None:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        _kill_then_resume(tmp_path)
    finally:
        torch.set_num_threads(threads)


def _kill_then_resume(tmp_path) -> None:
    straight = make_trainer(tmp_path / "a", "ppo", training={"epochs": 4}, output={"checkpoint_every": 1})
    straight.train()
    script = KILLED_RUN.format(tests=str(Path(__file__).parent), folder=str(tmp_path / "b"))
    killed = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    resumed = make_trainer(tmp_path / "b", "ppo", training={"epochs": 4}, output={"checkpoint_every": 1})
    assert resumed.resume() and resumed.epoch == 2
    tracker = resumed.loop.advantage_fn  # PPO: the per-prompt stat tracker, restored with its reward history
    assert sum(len(b) for b in tracker.buffers.values()) == 16
    resumed.train()
    torch.testing.assert_close(_weights(resumed.unet), _weights(straight.unet), rtol=0, atol=0)
    a = [h["reward/mean"] for h in straight.history]
    b = [h["reward/mean"] for h in resumed.history]
    assert a == b
    logged = [json.loads(line)["epoch"] for line in (tmp_path / "b" / "run-ppo" / "metrics.jsonl").read_text().splitlines()]
    assert logged == [1, 2, 3, 4]  # the killed run's epoch 3 was dropped and redone


def test_lora_training_exports_weights_that_load(tmp_path) -> None:
    from tiny_pipelines import build_tiny_pipeline

    trainer = make_trainer(tmp_path, "loop", model={"lora": True, "lora_rank": 2})
    frozen = trainer.unet.conv_in.weight.detach().clone()
    trainer.train()
    assert torch.equal(trainer.unet.conv_in.weight, frozen)  # base weights untouched under LoRA
    path = trainer.export()
    pipe = build_tiny_pipeline()
    pipe.load_lora_weights(path)
    x = torch.randn(1, 4, 8, 8)
    emb = torch.randn(1, 12, 16)
    ours = trainer.unet(x, 10, encoder_hidden_states=emb).sample
    loaded = pipe.unet(x, 10, encoder_hidden_states=emb).sample
    torch.testing.assert_close(loaded, ours, atol=1e-5, rtol=1e-4)


def test_bf16_autocast_epoch_keeps_ratios_near_one(tmp_path) -> None:
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(True)  # earlier tests in this process built fp32 accelerators
    try:
        _bf16_epoch(tmp_path)
    finally:
        AcceleratorState._reset_state(True)


def _bf16_epoch(tmp_path) -> None:
    trainer = make_trainer(tmp_path, "loop", model={"mixed_precision": "bf16"})
    traj, rewards = trainer.loop.collect(0)[:2]
    assert traj.log_probs.dtype == torch.float32  # log-probabilities stay float32 under autocast
    from loopdiff.training.loop import Batch

    pairs = torch.stack(torch.meshgrid(torch.arange(len(traj)), torch.arange(3), indexing="ij"), -1).reshape(-1, 2)
    with torch.no_grad():
        out = trainer.loop.minibatch_loss(Batch(traj, rewards, trainer.loop.advantages(rewards, traj.group_ids, traj.prompt_ids)), pairs)
    assert torch.isfinite(out.loss)
    assert out.approx_kl < 1e-3  # same weights: bf16 rounding only
    history = trainer.train()
    assert np.isfinite(history[-1]["loss"])


def test_evaluation_rewards_are_built_once_per_run(tmp_path, monkeypatch) -> None:
    import loopdiff.training.trainer as trainer_module

    trainer = make_trainer(tmp_path, "rloo", eval={"rewards": ["jpeg_incompressibility"]})
    built = []
    real_build = trainer_module.build_reward
    monkeypatch.setattr(trainer_module, "build_reward", lambda *a, **k: built.append(a[0]) or real_build(*a, **k))
    first = trainer.evaluation_rewards()
    second = trainer.evaluation_rewards()
    assert built == ["jpeg_incompressibility"]  # the training reward is reused, the extra one built once
    assert first is second and set(first) == {"red_minus_blue", "jpeg_incompressibility"}
    assert first["red_minus_blue"] is trainer.reward_fn  # a reward_fn goes by its own name


def test_gradient_checkpointing_trains_the_same_weights(tmp_path) -> None:
    """Recomputing activations in backward changes memory and time, not the update (same seed, same epoch)."""
    plain = make_trainer(tmp_path / "plain", "loop")
    checkpointed = make_trainer(tmp_path / "ckpt", "loop", training={"gradient_checkpointing": True})
    assert checkpointed.unet.is_gradient_checkpointing and not plain.unet.is_gradient_checkpointing
    assert torch.equal(_weights(plain.unet), _weights(checkpointed.unet))
    before = _weights(plain.unet)
    plain.run_epoch(1)
    checkpointed.run_epoch(1)
    moved = (_weights(plain.unet) - before).abs().max()
    assert moved > 1e-5  # the epoch did update the weights
    torch.testing.assert_close(_weights(checkpointed.unet), _weights(plain.unet), rtol=0, atol=1e-4 * float(moved))


def test_max_train_keeps_the_first_training_prompts(tmp_path) -> None:
    trainer = make_trainer(tmp_path, "loop", prompts={"max_train": 2})
    assert list(trainer.train_prompts.prompts) == PROMPTS[:2]
    traj, _ = trainer.loop.collect(0)[:2]
    assert set(traj.prompt_ids.tolist()) <= {0, 1}


def test_cross_attention_training_moves_only_the_prompt_keys_and_values(tmp_path) -> None:
    trainer = make_trainer(tmp_path, "loop", model={"train_modules": "cross_attention"})
    before = {name: p.detach().clone() for name, p in trainer.unet.named_parameters()}
    trainer.run_epoch(1)
    changed = {name for name, p in trainer.unet.named_parameters() if not torch.equal(p, before[name])}
    expected = {name for name in before if ".attn2.to_k." in name or ".attn2.to_v." in name}
    assert expected and changed == expected


def test_monitor_rewards_are_logged_on_the_samples_and_never_trained_on(tmp_path) -> None:
    from loopdiff.rewards.base import build_reward
    from loopdiff.sampling.trajectories import decode_latents

    monitored = make_trainer(tmp_path / "m", "loop", reward_section={"monitor": ["jpeg_compressibility"]})
    traj, _ = monitored.loop.collect(0)[:2]
    images = decode_latents(monitored.pipeline.vae, traj.latents[:, -1])
    prompts = [traj.prompts[i] for i in traj.prompt_ids.tolist()]
    expected = build_reward("jpeg_compressibility")(images, prompts, [{}] * len(prompts))
    torch.testing.assert_close(monitored.monitored["jpeg_compressibility"], expected)

    both = make_trainer(tmp_path / "b", "loop", reward_section={"monitor": ["jpeg_compressibility"]},
                        eval={"rewards": ["jpeg_compressibility"]})
    assert both.evaluation_rewards()["jpeg_compressibility"] is both.monitor_rewards["jpeg_compressibility"]

    monitored = make_trainer(tmp_path / "m2", "loop", reward_section={"monitor": ["jpeg_compressibility"]})
    plain = make_trainer(tmp_path / "p", "loop")
    record = monitored.train()[0]
    plain.train()
    assert record["monitor/jpeg_compressibility/mean"] == pytest.approx(float(monitored.monitored["jpeg_compressibility"].mean()))
    torch.testing.assert_close(_weights(monitored.unet), _weights(plain.unet), rtol=0, atol=0)


@pytest.fixture
def fresh_accelerator_state():
    """accelerate keeps one state per process, fixed by its first Accelerator: start and end with none."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    yield
    AcceleratorState._reset_state(reset_partial_state=True)


def test_run_json_records_the_precision_that_ran_and_the_processes_of_each_launch(
        tmp_path, capsys, fresh_accelerator_state) -> None:
    if torch.cuda.is_available():
        pytest.skip("on a GPU fp16 runs as asked")
    first = make_trainer(tmp_path, "loop", model={"device": "cpu", "mixed_precision": "fp16"},
                         output={"checkpoint_every": 1})
    first.train()
    assert "note: model.mixed_precision=fp16 runs in fp32 on cpu" in capsys.readouterr().err
    assert json.loads((first.run_dir / "config.json").read_text())["model"]["mixed_precision"] == "fp16"  # asked
    launch = {"processes": 1, "distributed_type": "NO", "device": "cpu", "mixed_precision_asked": "fp16",
              "mixed_precision_used": "no"}
    assert json.loads((first.run_dir / "run.json").read_text()) == {"launches": [{"start_epoch": 0, **launch}]}
    resumed = make_trainer(tmp_path, "loop", model={"device": "cpu", "mixed_precision": "fp16"},
                           training={"epochs": 2}, output={"checkpoint_every": 1})
    resumed.train()
    launches = json.loads((first.run_dir / "run.json").read_text())["launches"]
    assert launches == [{"start_epoch": 0, **launch}, {"start_epoch": 1, **launch}]  # the resumed launch appended
