"""Non-finite rewards, losses, gradients and weights never reach the optimiser, a checkpoint or an export."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tiny_pipelines import build_tiny_pipeline
from trainer_helpers import PROMPTS, make_trainer, red_minus_blue
from loopdiff.cli import main
from loopdiff.training import checkpoint as ckpt
from loopdiff.training.guards import NonFiniteError


def _weights(unet: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in unet.parameters()])


class NanAt:
    """``red_minus_blue`` with NaN at the given indices of every scored batch; records what it returned."""

    def __init__(self, *indices: int):
        self.indices, self.returned = list(indices), []

    def __call__(self, images, prompts, metadata) -> torch.Tensor:
        scores = red_minus_blue(images, prompts, metadata)
        scores[[i for i in self.indices if i < len(scores)]] = math.nan
        self.returned.append(scores.clone())
        return scores


def _leave_one_out_by_hand(rewards: list[float], groups: list[int]) -> list[float]:
    result = []
    for i, (r, g) in enumerate(zip(rewards, groups)):
        others = [rewards[j] for j in range(len(rewards)) if groups[j] == g and j != i]
        result.append(r - sum(others) / len(others))
    return result


def test_nan_reward_drops_its_group_and_training_stays_finite(tmp_path, capsys) -> None:
    reward = NanAt(5)  # one image out of every 8: samples 5 and 13, in groups 1 and 3 of 4 (K=4)
    trainer = make_trainer(tmp_path, "loop", reward=reward, training={"epochs": 2, "samples_per_epoch": 16},
                           output={"checkpoint_every": 1})
    batches = []
    real_optimise = trainer.loop.optimise
    trainer.loop.optimise = lambda batch, epoch: batches.append(batch) or real_optimise(batch, epoch)
    trainer.train()

    records = [json.loads(line) for line in (trainer.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [(r["nonfinite_rewards"], r["dropped_groups"]) for r in records] == [(2, 2), (2, 2)]
    assert all(math.isfinite(r["reward/mean"]) and math.isfinite(r["loss"]) for r in records)
    assert all(r["skipped_steps"] == 0 for r in records)
    warnings = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 2 and "'NanAt'" in warnings[0] and "2 of 16 images" in warnings[0]

    kept = [0, 1, 2, 3, 8, 9, 10, 11]  # groups 0 and 2
    for epoch, batch in enumerate(batches):
        scores = torch.cat(reward.returned[2 * epoch : 2 * epoch + 2]).tolist()
        assert batch.trajectories.group_ids.tolist() == [0] * 4 + [2] * 4
        assert batch.rewards.tolist() == [scores[i] for i in kept]
        expected = _leave_one_out_by_hand([scores[i] for i in kept], [0] * 4 + [2] * 4)
        torch.testing.assert_close(batch.advantages, torch.tensor(expected), rtol=1e-5, atol=1e-5)

    assert torch.isfinite(_weights(trainer.unet)).all()
    saved = sorted((trainer.run_dir / "checkpoints").glob("epoch_*"))
    assert [p.name for p in saved] == ["epoch_00001", "epoch_00002"]
    for path in saved:
        assert all(torch.isfinite(w).all() for w in load_file(str(path / ckpt.WEIGHTS)).values())


@pytest.mark.parametrize(
    ("nan_at", "message"),
    [
        (range(8), "non-finite for 8 of 8 images in epoch 1 (more than training.max_nonfinite_fraction=0.25)"),
        ([0, 4], "non-finite for 2 of 8 images in epoch 1: no prompt group with only finite rewards remains"),
    ],
)
def test_too_many_nan_rewards_stop_the_run(tmp_path, nan_at, message) -> None:
    trainer = make_trainer(tmp_path, "loop", reward=NanAt(*nan_at))
    before = _weights(trainer.unet).clone()
    with pytest.raises(NonFiniteError) as info:
        trainer.train()
    assert message in str(info.value)
    assert torch.equal(_weights(trainer.unet), before)
    assert ckpt.latest_checkpoint(trainer.run_dir) is None


def test_cli_fails_with_one_line_when_every_reward_is_nan(tmp_path, monkeypatch, capsys) -> None:
    import loopdiff.training.trainer as trainer_module

    monkeypatch.setattr(trainer_module, "build_reward", lambda name, options: NanAt(*range(8)))
    monkeypatch.setattr(trainer_module, "load_pipeline", lambda model: build_tiny_pipeline(seed=0))
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    run = tmp_path / "run"
    code = main([
        "train", "model.device=cpu", "sampling.num_steps=3", "training.train_denoising_steps=null", "sampling.batch_size=8",
        "training.epochs=1",
        "training.samples_per_epoch=8", f"prompts.train={prompts}", f"prompts.val={prompts}", "eval.max_prompts=0",
        "reward.name=jpeg_compressibility", "reward.asynchronous=false", f"output.dir={run}",
        "output.progress=false", "output.tensorboard=false",
    ])
    err = capsys.readouterr().err
    assert code == 1
    errors = [line for line in err.splitlines() if line.startswith("loopdiff train: error:")]
    assert len(errors) == 1 and "reward 'jpeg_compressibility' was non-finite for 8 of 8 images" in errors[0]
    assert "Traceback" not in err
    assert not (run / "final_pipeline").exists() and ckpt.latest_checkpoint(run) is None


def _inject(trainer, kind: str, steps: set[int]) -> None:
    """Make optimiser steps ``steps`` (1-based; one micro-batch each here) have an inf loss or an inf gradient."""
    real, calls = trainer.loop.minibatch_loss, [0]

    def loss(batch, micro):
        out = real(batch, micro)
        calls[0] += 1
        if calls[0] in steps and kind == "loss":
            out.loss = out.loss + math.inf  # the gradient stays finite
        elif calls[0] in steps:
            out.loss.register_hook(lambda grad: grad * math.inf)  # the loss stays finite
        return out

    trainer.loop.minibatch_loss = loss


@pytest.mark.parametrize("kind", ["loss", "gradient"])
def test_a_nonfinite_step_is_skipped(tmp_path, kind) -> None:
    trainer = make_trainer(tmp_path, "loop")  # 4 optimiser steps of one micro-batch each
    _inject(trainer, kind, {1})
    metrics = trainer.run_epoch(0)
    assert metrics["optimizer_steps"] == 4 and metrics["skipped_steps"] == 1
    assert all(math.isfinite(metrics[k]) for k in ("loss", "grad_norm", "approx_kl"))
    assert torch.isfinite(_weights(trainer.unet)).all()
    assert {int(s["step"]) for s in trainer.optimizer.state.values()} == {3}  # AdamW took 3 of the 4 steps


@pytest.mark.parametrize("kind", ["loss", "gradient"])
def test_skipped_steps_leave_the_weights_unchanged(tmp_path, kind) -> None:
    trainer = make_trainer(tmp_path, "loop", training={"max_skipped_fraction": 1.0})
    _inject(trainer, kind, {1, 2, 3, 4})
    before = _weights(trainer.unet).clone()
    metrics = trainer.run_epoch(0)
    assert metrics["skipped_steps"] == 4
    assert torch.equal(_weights(trainer.unet), before)


def test_more_than_half_the_steps_skipped_stops_the_run(tmp_path) -> None:
    trainer = make_trainer(tmp_path, "loop")
    _inject(trainer, "gradient", {1, 2, 3})
    with pytest.raises(NonFiniteError, match="3 of 4 optimiser steps in epoch 1 had a non-finite loss"):
        trainer.train()
    assert ckpt.latest_checkpoint(trainer.run_dir) is None


def test_nan_weights_are_never_saved(tmp_path) -> None:
    trainer = make_trainer(tmp_path, "reinforce")
    trainer.train()  # writes checkpoints/epoch_00001
    good = ckpt.latest_checkpoint(trainer.run_dir)
    assert good is not None and good.name == "epoch_00001"
    files = {p.name: p.read_bytes() for p in good.iterdir()}
    with torch.no_grad():
        trainer.unet.conv_in.weight[0, 0, 0, 0] = math.nan
    trainer.epoch = 2
    with pytest.raises(NonFiniteError, match="refusing to write the checkpoint of epoch 2: non-finite weights in "
                                             "conv_in.weight"):
        trainer.save()
    with pytest.raises(NonFiniteError, match="refusing to write the checkpoint of epoch 3"):
        ckpt.save_checkpoint(trainer.run_dir, 3, trainer._checkpoint_parts(), {})
    with pytest.raises(NonFiniteError, match="refusing to write the exported model"):
        trainer.export()
    assert [p.name for p in (trainer.run_dir / "checkpoints").iterdir()] == ["epoch_00001"]
    assert {p.name: p.read_bytes() for p in good.iterdir()} == files
    assert not (trainer.run_dir / "final_pipeline").exists()


def test_nonfinite_evaluation_scores_are_left_out_counted_and_written_as_valid_json(tmp_path, capsys) -> None:
    from loopdiff.training.model_card import evaluation_table

    # images_per_prompt 2: image 1 (prompt 0's second), and both images of prompt 1 (images 2, 3) are NaN
    trainer = make_trainer(tmp_path, "loop", reward=NanAt(1, 2, 3), eval={"max_prompts": 3, "images_per_prompt": 2})
    trainer.evaluate("final")
    text = (trainer.run_dir / "eval" / "final.json").read_text()
    record = json.loads(text, parse_constant=lambda name: pytest.fail(f"{name} is not JSON"))
    returned = torch.cat(trainer.reward_fn.returned).view(-1, 2)  # what the reward gave, (prompts, images)
    per_prompt = record["per_prompt"]["NanAt"]
    assert per_prompt[0] == pytest.approx(float(returned[0, 0])) and per_prompt[1] is None
    assert per_prompt[2] == pytest.approx(float(returned[2].mean()))
    assert record["means"]["NanAt"] == pytest.approx((per_prompt[0] + per_prompt[2]) / 2)
    assert record["nonfinite"]["NanAt"] == 3
    assert "non-finite scores left out of the means (NanAt: 3 images)" in capsys.readouterr().err
    table = evaluation_table({"base": record, "final": record}, 2)
    assert "nan" not in table.lower().replace("nanat", "") and "(3 non-finite)" in table


def _raising_reward(images, prompts, metadata):
    raise KeyError("colour model not found")


def test_a_reward_that_raises_stops_the_run_in_one_line_naming_it(tmp_path, capsys, monkeypatch) -> None:
    (tmp_path / "p.txt").write_text("a red circle\na blue square\n")
    argv = ["train", f"prompts.train={tmp_path / 'p.txt'}", "reward.name=test_nonfinite:_raising_reward",
            "eval.max_prompts=0", "training.epochs=1", "training.samples_per_epoch=8", "sampling.num_steps=2", "training.train_denoising_steps=2",
            "output.progress=false", "output.tensorboard=false", f"output.dir={tmp_path / 'run'}"]
    monkeypatch.syspath_prepend(str(Path(__file__).parent))
    assert main(argv) == 1
    lines = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
    assert len(lines) == 1, lines
    assert "'test_nonfinite:_raising_reward' raised KeyError: 'colour model not found'" in lines[0], lines
    assert "LOOPDIFF_DEBUG=1" in lines[0]
    monkeypatch.setenv("LOOPDIFF_DEBUG", "1")
    with pytest.raises(Exception, match="colour model not found"):
        main(argv + [f"output.dir={tmp_path / 'run2'}"])
