"""model.train_text_encoder: LoRA adapters on the CLIP text encoder trained with the UNet's, resumed exactly,
exported in diffusers' format and loaded by pipeline.load_lora_weights."""

from __future__ import annotations

import pytest
import torch

from tiny_pipelines import build_tiny_pipeline
from loopdiff.config import ConfigError
from trainer_helpers import make_trainer

MODEL = {"device": "cpu", "lora": True, "lora_rank": 2, "train_text_encoder": True}


def _text_lora(trainer) -> dict[str, torch.Tensor]:
    from peft.utils import get_peft_model_state_dict

    return {k: v.detach().clone() for k, v in get_peft_model_state_dict(trainer.text_encoder).items()}


def _states(text_encoder, tokenizer, prompts) -> torch.Tensor:
    tokens = tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                       return_tensors="pt")
    with torch.no_grad():
        return text_encoder(tokens.input_ids)[0]


def test_text_encoder_adapters_train_and_export_loadable_by_load_lora_weights(tmp_path) -> None:
    trainer = make_trainer(tmp_path, "ppo", model=MODEL, training={"epochs": 2})
    before = _text_lora(trainer)
    assert before and all("lora_" in k for k in before)
    first_ratio_loss = []
    loss = trainer.loop.minibatch_loss

    def recording(batch, micro):
        out = loss(batch, micro)
        first_ratio_loss.append(out)
        return out

    trainer.loop.minibatch_loss = recording
    history = trainer.train()
    assert history[-1]["skipped_steps"] == 0 and history[-1]["grad_norm"] > 0
    after = _text_lora(trainer)
    assert max((after[k] - before[k]).abs().max().item() for k in before) > 0  # the text encoder's adapters moved
    assert abs(float(first_ratio_loss[0].approx_kl)) < 1e-6  # on-policy: the re-encoded prompts match sampling's

    path = trainer.export()
    fresh = build_tiny_pipeline(seed=0)
    fresh.load_lora_weights(str(path))
    prompts = ["a red circle", "a big cat"]
    torch.testing.assert_close(_states(fresh.text_encoder, fresh.tokenizer, prompts),
                               _states(trainer.text_encoder, trainer.pipeline.tokenizer, prompts), rtol=1e-5, atol=1e-6)
    assert not torch.allclose(_states(fresh.text_encoder, fresh.tokenizer, prompts),
                              _states(build_tiny_pipeline(seed=0).text_encoder, fresh.tokenizer, prompts))


def test_a_resumed_run_continues_the_text_encoder_exactly(tmp_path) -> None:
    straight = make_trainer(tmp_path / "a", "ppo", model=MODEL, training={"epochs": 3})
    straight.train()

    class Stop(Exception):
        pass

    def stop(epoch, metrics):
        if epoch == 2:  # the checkpoint of epoch 1 exists
            raise Stop

    first = make_trainer(tmp_path / "b", "ppo", model=MODEL, training={"epochs": 3}, output={"checkpoint_every": 1})
    with pytest.raises(Stop):
        first.train(on_epoch_end=stop)
    resumed = make_trainer(tmp_path / "b", "ppo", model=MODEL, training={"epochs": 3}, output={"checkpoint_every": 1})
    assert resumed.resume() and resumed.epoch == 1
    resumed.train()
    a, b = _text_lora(straight), _text_lora(resumed)
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=0, atol=0)


@pytest.mark.parametrize("sections, needed", [
    ({"model": {**MODEL, "lora": False}}, "model.lora=true"),
    ({"model": MODEL, "training": {"ema_decay": 0.9}}, "no EMA"),
    ({"model": MODEL, "output": {"keep_best": "reward/mean"}}, "output.keep_best unset"),
])
def test_unsupported_combinations_are_refused(tmp_path, sections, needed) -> None:
    with pytest.raises(ConfigError, match=f"model.train_text_encoder=true needs {needed}"):
        make_trainer(tmp_path, "ppo", **sections)
