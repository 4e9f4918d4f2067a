"""Kill -9 at named points of a short run, damage checkpoints, change the config: nothing is lost or mixed up.

Every resumed run must end with exactly the weights of one uninterrupted run (one thread on each side).
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from loopdiff.config import ConfigError
from loopdiff.training import checkpoint as ckpt
from trainer_helpers import make_trainer

EPOCHS = 4
RUN = {"training": {"epochs": EPOCHS}, "output": {"checkpoint_every": 1}}

KILLED_RUN = """
import sys
from pathlib import Path
import torch
torch.set_num_threads(1)
sys.path.insert(0, {tests!r})
from trainer_helpers import make_trainer
make_trainer(Path({folder!r}), "ppo", training={{"epochs": {epochs}}}, output={{"checkpoint_every": 1}}).train()
"""


def _weights(unet: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in unet.state_dict().items()}


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def straight(tmp_path_factory) -> tuple[Path, dict[str, torch.Tensor]]:
    """An uninterrupted 4-epoch run: its folder and final weights."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    folder = tmp_path_factory.mktemp("straight")
    trainer = make_trainer(folder, "ppo", **RUN)
    trainer.train()
    torch.set_num_threads(threads)
    return folder / "run-ppo", _weights(trainer.unet)


def _copy(straight: tuple[Path, dict], tmp_path: Path) -> Path:
    """The uninterrupted run's folder copied to ``tmp_path``; returns the copy."""
    shutil.copytree(straight[0], tmp_path / "run-ppo")
    return tmp_path / "run-ppo"


def _rerun(tmp_path: Path, straight: tuple[Path, dict], **sections) -> "object":
    """A trainer into the copied folder with the uninterrupted run's prompt files (the rest as ``sections``)."""
    prompts = str(straight[0].parent / "prompts.txt")
    merged = {key: {**RUN.get(key, {}), **sections.get(key, {})} for key in {*RUN, *sections}}
    return make_trainer(tmp_path, "ppo", prompts={"train": prompts, "val": prompts}, **merged)


def _killed_at(folder: Path, point: str) -> subprocess.CompletedProcess:
    script = KILLED_RUN.format(tests=str(Path(__file__).parent), folder=str(folder), epochs=EPOCHS)
    env = {**os.environ, ckpt.FAULT_ENV: point, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600, env=env)


def _epochs(run: Path) -> list[int]:
    return [int(p.name.split("_")[1]) for p in ckpt.checkpoint_folders(run)]


# point, the complete checkpoints the kill leaves, the folders it leaves
KILLS = {
    "weights@2": ([1], [1]),  # killed writing epoch 2: only epoch 1 is there
    "manifest@3": ([2, 1], [1, 2, 3]),  # epoch 3 renamed into place but without a manifest: incomplete
    "prune@3": ([3, 2], [1, 2, 3]),  # pruning epoch 1: its manifest went first, its files are still there
}


@pytest.mark.parametrize("point", list(KILLS))
def test_kill_at_a_named_point_then_resume_ends_with_the_uninterrupted_weights(point, tmp_path, straight) -> None:
    killed = _killed_at(tmp_path, point)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    run = tmp_path / "run-ppo"
    complete, folders = KILLS[point]
    assert [int(p.name.split("_")[1]) for p in ckpt.complete_checkpoints(run)] == complete
    assert _epochs(run) == folders
    if point.startswith("prune"):
        assert (ckpt.checkpoint_dir(run, 1) / ckpt.WEIGHTS).is_file()  # half deleted, yet not taken as complete
    resumed = make_trainer(tmp_path, "ppo", **RUN)
    resumed.train()
    torch.testing.assert_close(_weights(resumed.unet), straight[1], rtol=0, atol=0)
    assert _epochs(run) == [EPOCHS - 1, EPOCHS]  # the incomplete folders were cleaned up
    logged = [json.loads(line)["epoch"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert logged == list(range(1, EPOCHS + 1))


@pytest.mark.parametrize("damage", ["truncate weights", "truncate state", "flip a byte", "drop the manifest"])
def test_a_damaged_newest_checkpoint_falls_back_to_the_previous_one(damage, tmp_path, straight, capsys) -> None:
    run = _copy(straight, tmp_path)
    newest = ckpt.checkpoint_dir(run, EPOCHS)
    file = newest / (ckpt.STATE if damage == "truncate state" else ckpt.WEIGHTS)
    data = file.read_bytes()
    if damage.startswith("truncate"):
        file.write_bytes(data[: len(data) // 2])
    elif damage == "flip a byte":
        file.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))
    else:
        (newest / ckpt.MANIFEST).unlink()
    assert ckpt.latest_checkpoint(run) == ckpt.checkpoint_dir(run, EPOCHS - 1)
    err = capsys.readouterr().err
    if damage != "drop the manifest":  # without a manifest it is simply incomplete
        assert err.count("warning:") == 1 and newest.name in err and file.name in err, err
    resumed = _rerun(tmp_path, straight)
    assert resumed.resume() and resumed.epoch == EPOCHS - 1
    assert f"resuming from epoch {EPOCHS - 1}" in capsys.readouterr().out
    resumed.train()
    torch.testing.assert_close(_weights(resumed.unet), straight[1], rtol=0, atol=0)


def test_every_checkpoint_damaged_is_one_error(tmp_path, straight) -> None:
    run = _copy(straight, tmp_path)
    for path in ckpt.complete_checkpoints(run):
        (path / ckpt.WEIGHTS).write_bytes(b"")
    with pytest.raises(ckpt.CheckpointError, match="no usable checkpoint.*output.resume=false"):
        ckpt.latest_checkpoint(run)


class _Payload:
    def __reduce__(self):
        return (Path.touch, (Path(os.environ["LOOPDIFF_TEST_MARKER"]),))


def test_a_training_state_with_pickled_code_is_refused_without_running_it(tmp_path, straight, monkeypatch) -> None:
    run = _copy(straight, tmp_path)
    newest = ckpt.checkpoint_dir(run, EPOCHS)
    marker = tmp_path / "code-ran"
    monkeypatch.setenv("LOOPDIFF_TEST_MARKER", str(marker))
    state = torch.load(newest / ckpt.STATE, weights_only=True)
    state["tracker"] = _Payload()
    torch.save(state, newest / ckpt.STATE)
    manifest = json.loads((newest / ckpt.MANIFEST).read_text())  # a consistent manifest: checksums pass
    manifest["files"][ckpt.STATE] = {"size": (newest / ckpt.STATE).stat().st_size,
                                     "sha256": ckpt._sha256(newest / ckpt.STATE)}
    (newest / ckpt.MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(pickle.UnpicklingError):  # the unsafe loader would run it; the check is meaningful
        torch.load(newest / ckpt.STATE, weights_only=True)
    trainer = _rerun(tmp_path, straight)
    with pytest.raises(ckpt.CheckpointError, match="refused"):
        trainer.resume()
    assert not marker.exists()


# ---------------------------------------------------------------- a rerun with another config


@pytest.mark.parametrize(
    "sections, fields",
    [
        ({"training": {"learning_rate": 3e-4}}, ["training.learning_rate 0.001 -> 0.0003"]),
        ({"model": {"lora": True}}, ["model.lora False -> True"]),
        ({"training": {"seed": 1}, "sampling": {"eta": 0.5}}, ["sampling.eta", "training.seed"]),
    ],
)
def test_a_rerun_that_changes_fixed_fields_fails_naming_them(sections, fields, tmp_path, straight) -> None:
    _copy(straight, tmp_path)
    with pytest.raises(ConfigError) as error:
        _rerun(tmp_path, straight, **sections)
    message = str(error.value)
    assert "\n" not in message and "output.resume=false" in message
    for field in fields:
        assert field in message
    assert message.count("->") == len(fields)


def test_epochs_below_those_trained_fails(tmp_path, straight) -> None:
    _copy(straight, tmp_path)
    with pytest.raises(ConfigError, match=f"training.epochs=2 is below the {EPOCHS} epochs already trained"):
        _rerun(tmp_path, straight, training={"epochs": 2})


def test_a_rerun_may_extend_the_run_and_change_eval_and_output_settings(tmp_path, straight, capsys) -> None:
    run = _copy(straight, tmp_path)
    trainer = _rerun(tmp_path, straight, training={"epochs": EPOCHS + 1}, output={"checkpoint_every": 2},
                     eval={"images_per_prompt": 3})
    trainer.train()
    assert f"resuming from epoch {EPOCHS}" in capsys.readouterr().out
    assert trainer.epoch == EPOCHS + 1 and len(trainer.history) == EPOCHS + 1
    recorded = json.loads((run / "config.json").read_text())
    saved = ckpt.read_info(ckpt.latest_checkpoint(run))["config"]
    for config in (recorded, saved):
        assert config["training"]["epochs"] == EPOCHS + 1
        assert config["output"]["checkpoint_every"] == 2 and config["eval"]["images_per_prompt"] == 3


def test_resume_false_starts_over_in_the_same_folder(tmp_path, straight) -> None:
    run = _copy(straight, tmp_path)
    trainer = _rerun(tmp_path, straight, training={"epochs": 2, "learning_rate": 3e-4}, output={"resume": False})
    trainer.train()
    assert _epochs(run) == [1, 2]  # the old run's epochs 3 and 4 are gone, so a later resume cannot take them
    logged = [json.loads(line)["epoch"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert logged == [1, 2]
    assert ckpt.read_info(ckpt.latest_checkpoint(run))["config"]["training"]["learning_rate"] == 3e-4
