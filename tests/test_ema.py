"""The EMA of the trainable weights: the update against hand computations, what it covers, that evaluations and
the export use it, and that a killed and resumed run ends with the uninterrupted run's EMA bit for bit."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from loopdiff.config import ConfigError, config_from_dict, fixed_changes, format_fields
from loopdiff.training import checkpoint as ckpt
from loopdiff.training.ema import ParameterEMA, ema_decay_at
from trainer_helpers import make_trainer


class Two(torch.nn.Module):
    """One trained parameter of two numbers and one frozen one."""

    def __init__(self) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.tensor([1.0, -2.0]))
        self.frozen = torch.nn.Parameter(torch.tensor([7.0]), requires_grad=False)


def _set(module: Two, values: list[float]) -> None:
    with torch.no_grad():
        module.w.copy_(torch.tensor(values))


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # float reductions depend on the thread count; every run here uses one
    yield
    torch.set_num_threads(threads)


# ---------------------------------------------------------------- the update, by hand


def test_the_decay_warms_up_then_stays_at_the_configured_value() -> None:
    assert ema_decay_at(0.9, 1) == pytest.approx(2 / 11)
    assert ema_decay_at(0.9, 2) == pytest.approx(3 / 12)
    assert ema_decay_at(0.5, 8) == pytest.approx(0.5)  # 9 / 18 = 0.5: the two meet
    assert ema_decay_at(0.9, 1000) == 0.9


def test_two_warm_up_updates_match_the_hand_computation() -> None:
    module = Two()
    ema = ParameterEMA(module, decay=0.99, every=1)  # starts at w0 = (1, -2)
    _set(module, [3.0, 0.0])
    assert ema.step()  # d1 = 2/11
    _set(module, [5.0, 4.0])
    assert ema.step()  # d2 = 3/12
    # e2 = d2 d1 w0 + d2 (1 - d1) w1 + (1 - d2) w2 = (2 w0 + 9 w1 + 33 w2) / 44
    expected = torch.tensor([(2 * 1 + 9 * 3 + 33 * 5) / 44, (2 * -2 + 9 * 0 + 33 * 4) / 44])
    torch.testing.assert_close(ema.average["w"], expected, rtol=0, atol=1e-6)
    assert list(ema.average) == ["w"]  # the frozen parameter is not averaged
    assert ema.steps == 2


def test_two_updates_past_the_warm_up_give_the_closed_form() -> None:
    module, d = Two(), 0.8
    ema = ParameterEMA(module, decay=d, every=1)
    ema.steps = 500  # (1 + n) / (10 + n) > 0.98 from here on: the decay is d
    w0, w1, w2 = [1.0, -2.0], [3.0, 0.0], [5.0, 4.0]
    _set(module, w1)
    ema.step()
    _set(module, w2)
    ema.step()
    expected = [d * d * a + d * (1 - d) * b + (1 - d) * c for a, b, c in zip(w0, w1, w2)]  # 2.44, 0.16
    torch.testing.assert_close(ema.average["w"], torch.tensor(expected), rtol=0, atol=1e-6)


def test_every_n_steps_skips_the_steps_between() -> None:
    module = Two()
    ema = ParameterEMA(module, decay=0.99, every=2)
    _set(module, [3.0, 0.0])
    assert not ema.step()  # step 1: no update
    torch.testing.assert_close(ema.average["w"], torch.tensor([1.0, -2.0]), rtol=0, atol=0)
    _set(module, [5.0, 4.0])
    assert ema.step()  # step 2: d2 = 3/12 applied to w0 and w2
    torch.testing.assert_close(ema.average["w"], torch.tensor([0.25 * 1 + 0.75 * 5, 0.25 * -2 + 0.75 * 4]),
                               rtol=0, atol=1e-6)


def test_swapped_in_holds_the_average_and_restores_the_live_weights_exactly() -> None:
    module = Two()
    ema = ParameterEMA(module, decay=0.99)
    live = [3.1415927, -0.1]
    _set(module, live)
    ema.step()
    with ema.swapped_in():
        assert torch.equal(module.w, ema.average["w"])
        assert not torch.equal(module.w, torch.tensor(live))
    assert torch.equal(module.w, torch.tensor(live))
    with pytest.raises(RuntimeError, match="inside"), ema.swapped_in():
        raise RuntimeError("inside")
    assert torch.equal(module.w, torch.tensor(live))  # restored on an error too
    assert torch.equal(module.frozen, torch.tensor([7.0]))


def test_the_state_round_trips_and_a_mismatch_is_refused() -> None:
    module = Two()
    ema = ParameterEMA(module, decay=0.9, every=3)
    for values in ([3.0, 0.0], [5.0, 4.0], [6.0, 1.0]):
        _set(module, values)
        ema.step()
    other = ParameterEMA(Two(), decay=0.9, every=3)
    other.load_state_dict(ema.state_dict())
    assert other.steps == 3 and torch.equal(other.average["w"], ema.average["w"])
    with pytest.raises(ValueError, match="other parameters"):
        other.load_state_dict({"steps": 1, "average": {"v": torch.zeros(2)}})
    with pytest.raises(ValueError, match="shapes"):
        other.load_state_dict({"steps": 1, "average": {"w": torch.zeros(1)}})


# ---------------------------------------------------------------- the config fields


def test_the_config_fields_are_listed_and_validated(tmp_path) -> None:
    listed = format_fields()
    assert "training.ema_decay: float | None = None" in listed
    assert "training.ema_every: int = 1" in listed
    assert config_from_dict({"training": {"ema_decay": 0.95, "ema_every": 4}}).training.ema_decay == 0.95
    for values, message in [({"ema_decay": 1.0}, "training.ema_decay=1.0 is invalid"),
                            ({"ema_decay": -0.1}, "training.ema_decay=-0.1 is invalid"),
                            ({"ema_every": 0}, "training.ema_every=0 is invalid")]:
        with pytest.raises(ConfigError, match=message):
            config_from_dict({"training": values})
    saved = config_from_dict({}).to_dict()
    changed = config_from_dict({"training": {"ema_decay": 0.9}})
    assert fixed_changes(saved, changed) == ["training.ema_decay None -> 0.9"]  # fixed for a run's life


# ---------------------------------------------------------------- in the trainer


def _flat(tensors) -> torch.Tensor:
    return torch.cat([t.detach().double().flatten() for t in tensors])


def test_the_trainer_updates_the_ema_after_each_optimiser_step(tmp_path) -> None:
    trainer = make_trainer(tmp_path, "loop", training={"ema_decay": 0.9, "ema_every": 2})
    names = [name for name, p in trainer.unet.named_parameters() if p.requires_grad]
    assert list(trainer.ema.average) == names == [name for name, _ in trainer.unet.named_parameters()]
    params = [p for _, p in trainer.unet.named_parameters()]
    expected = _flat(params)  # the EMA starts at the weights training starts from
    after_steps: list[torch.Tensor] = []
    trainer.optimizer.optimizer.register_step_post_hook(lambda *_: after_steps.append(_flat(params)))
    history = trainer.train()
    assert history[0]["optimizer_steps"] == 4 and len(after_steps) == 4
    no_warm_up, every_step = expected.clone(), expected.clone()  # two wrong readings, to show the test can tell
    for n, weights in enumerate(after_steps, start=1):  # updates after steps 2 and 4
        d = min(0.9, (1 + n) / (10 + n))
        every_step = d * every_step + (1 - d) * weights
        if n % 2 == 0:
            expected = d * expected + (1 - d) * weights
            no_warm_up = 0.9 * no_warm_up + 0.1 * weights
    ema = _flat(trainer.ema.average.values())
    assert trainer.ema.steps == 4
    atol = 4 * torch.finfo(torch.float32).eps * float(expected.abs().max())  # float32 rounding of the weights
    torch.testing.assert_close(ema, expected, rtol=0, atol=atol)
    for wrong in (no_warm_up, every_step, after_steps[-1]):
        assert float((ema - wrong).abs().max()) > 100 * atol


def test_with_lora_only_the_adapters_are_averaged_and_the_export_holds_their_ema(tmp_path) -> None:
    from tiny_pipelines import build_tiny_pipeline

    trainer = make_trainer(tmp_path, "loop", model={"lora": True, "lora_rank": 2},
                           training={"ema_decay": 0.5, "learning_rate": 1e-2})
    trained = [name for name, p in trainer.unet.named_parameters() if p.requires_grad]
    assert list(trainer.ema.average) == trained and all(".lora_" in name for name in trained)
    trainer.train()
    path = trainer.export()
    pipe = build_tiny_pipeline()
    pipe.load_lora_weights(path)
    x, emb = torch.randn(1, 4, 8, 8), torch.randn(1, 12, 16)
    with torch.no_grad():
        live = trainer.unet(x, 10, encoder_hidden_states=emb).sample
        with trainer.ema_weights():
            averaged = trainer.unet(x, 10, encoder_hidden_states=emb).sample
        loaded = pipe.unet(x, 10, encoder_hidden_states=emb).sample
    assert (live - averaged).abs().max() > 1e-4
    torch.testing.assert_close(loaded, averaged, atol=1e-5, rtol=1e-4)
    assert "exponential moving average" in (path / "README.md").read_text()


def test_evaluations_and_the_full_export_use_the_ema_weights(tmp_path, monkeypatch) -> None:
    import loopdiff.training.trainer as trainer_module
    from diffusers import StableDiffusionPipeline

    trainer = make_trainer(tmp_path, "loop", training={"epochs": 2, "ema_decay": 0.5},
                           eval={"max_prompts": 2, "images_per_prompt": 2, "before_training": False})
    seen: list[torch.Tensor] = []
    real_evaluate = trainer_module.evaluate

    def spy(policy, *args, **kwargs):
        seen.append(_flat(policy.unet.parameters()))
        return real_evaluate(policy, *args, **kwargs)

    monkeypatch.setattr(trainer_module, "evaluate", spy)
    trainer.train()
    live, ema = _flat(trainer.unet.parameters()), _flat(trainer.ema.average.values())
    assert len(seen) == 1 and float((live - ema).abs().max()) > 1e-5
    assert torch.equal(seen[0], ema)  # the final evaluation sampled from the EMA weights
    final = json.loads((trainer.run_dir / "eval" / "final.json").read_text())

    exported = StableDiffusionPipeline.from_pretrained(trainer.export())
    assert torch.equal(_flat(exported.unet.parameters()), ema)
    assert torch.equal(_flat(trainer.unet.parameters()), live)  # the live weights are back

    # The same evaluation of the EMA weights loaded by hand, with no EMA: the same numbers.
    state = {name: p.detach().clone() for name, p in trainer.unet.named_parameters()}
    state.update(trainer.ema.average)
    trainer.unet.load_state_dict(state, strict=False)
    trainer.ema = None
    by_hand = trainer.evaluate("by_hand")
    assert by_hand.means == pytest.approx(final["means"], rel=0, abs=0)


KILLED_RUN = """
import os, signal, sys
from pathlib import Path
import torch
torch.set_num_threads(1)
sys.path.insert(0, {tests!r})
from trainer_helpers import make_trainer

def die_in_epoch_three(epoch, metrics):
    if epoch == 3:  # the checkpoint of epoch 2 exists; epoch 3 moved the EMA but is not saved
        os.kill(os.getpid(), signal.SIGKILL)

make_trainer(Path({folder!r}), "loop", **{sections!r}).train(on_epoch_end=die_in_epoch_three)
"""


def test_a_killed_and_resumed_run_ends_with_the_uninterrupted_ema_bit_for_bit(tmp_path) -> None:
    # 4 optimiser steps per epoch, an update every 3: the update phase crosses the resumed checkpoint.
    sections = {"training": {"epochs": 4, "ema_decay": 0.7, "ema_every": 3}, "output": {"checkpoint_every": 1}}
    straight = make_trainer(tmp_path / "a", "loop", **sections)
    straight.train()
    script = KILLED_RUN.format(tests=str(Path(__file__).parent), folder=str(tmp_path / "b"), sections=sections)
    killed = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]

    saved = ckpt.latest_checkpoint(tmp_path / "b" / "run-loop")
    state = torch.load(saved / ckpt.STATE, weights_only=True)
    assert saved.name == "epoch_00002" and state["ema"]["steps"] == 8

    resumed = make_trainer(tmp_path / "b", "loop", **sections)
    assert resumed.resume() and resumed.epoch == 2 and resumed.ema.steps == 8
    after_resume = _flat(resumed.ema.average.values())
    assert not torch.equal(after_resume, _flat(resumed.unet.parameters()))  # the EMA was restored, not re-made
    resumed.train()
    assert resumed.ema.steps == straight.ema.steps == 16
    assert resumed.ema.average.keys() == straight.ema.average.keys()
    for name, value in straight.ema.average.items():
        assert torch.equal(resumed.ema.average[name], value), name
    assert torch.equal(_flat(resumed.unet.parameters()), _flat(straight.unet.parameters()))
    assert not torch.equal(_flat(straight.ema.average.values()), _flat(straight.unet.parameters()))


def test_resuming_without_the_ema_state_is_refused(tmp_path) -> None:
    plain = make_trainer(tmp_path, "loop", training={"epochs": 1})
    plain.train()
    with_ema = make_trainer(tmp_path, "loop", training={"epochs": 1, "ema_decay": 0.9}, output={"resume": False})
    parts = with_ema._checkpoint_parts()
    with pytest.raises(ckpt.CheckpointError, match="holds no EMA state"):
        ckpt.load_checkpoint(ckpt.latest_checkpoint(plain.run_dir), parts)


def test_an_ema_without_an_update_is_not_exported_and_the_card_says_so(tmp_path, capsys) -> None:
    from tiny_pipelines import build_tiny_pipeline
    from peft.utils import get_peft_model_state_dict

    # 4 optimiser steps, an update every 8 (the SD3 and Flux configs' setting): the average never moved.
    trainer = make_trainer(tmp_path, "loop", model={"lora": True, "lora_rank": 2},
                           training={"ema_decay": 0.9, "ema_every": 8, "learning_rate": 1e-2})
    trainer.train()
    assert trainer.ema.steps == 4 and trainer.ema.updates == 0
    path = trainer.export()
    err = capsys.readouterr().err
    assert "no EMA update happened in 4 optimiser steps (training.ema_every=8)" in err
    live = {k: v.clone() for k, v in get_peft_model_state_dict(trainer.unet).items()}
    assert any(float(v.abs().max()) > 0 for k, v in live.items() if "lora_B" in k)  # the adapters trained
    pipe = build_tiny_pipeline()
    pipe.load_lora_weights(path)
    x, emb = torch.randn(1, 4, 8, 8), torch.randn(1, 12, 16)
    with torch.no_grad():
        trained = trainer.unet(x, 10, encoder_hidden_states=emb).sample
        loaded = pipe.unet(x, 10, encoder_hidden_states=emb).sample
    torch.testing.assert_close(loaded, trained, atol=1e-5, rtol=1e-4)  # not the all-zero starting adapters
    card = (path / "README.md").read_text()
    assert "trained weights themselves, not their exponential moving average" in card


def test_the_card_counts_the_ema_updates(tmp_path, capsys) -> None:
    trainer = make_trainer(tmp_path, "loop", training={"ema_decay": 0.9, "ema_every": 2})
    trainer.train()
    card = (trainer.export() / "README.md").read_text()
    assert "updated every 2 optimiser steps; 2 updates)" in card and "no EMA update" not in capsys.readouterr().err
