"""LoRA options: target modules, dropout, and starting from an adapter saved by diffusers or by peft."""

from __future__ import annotations

import pytest
import torch

from tiny_pipelines import build_tiny_pipeline
from loopdiff.config import ConfigError
from trainer_helpers import make_trainer


def _lora_state(unet: torch.nn.Module) -> dict[str, torch.Tensor]:
    from peft.utils import get_peft_model_state_dict

    return {k: v.detach().clone() for k, v in get_peft_model_state_dict(unet).items()}


def _random_adapter(seed: int = 3):
    """A tiny pipeline whose UNet carries a rank-2 adapter on to_q and to_v with random (non-zero) weights."""
    from peft import LoraConfig

    pipe = build_tiny_pipeline(seed=0)
    pipe.unet.add_adapter(LoraConfig(r=2, lora_alpha=3.0, lora_dropout=0.1, target_modules=["to_q", "to_v"]))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in pipe.unet.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=generator))
    return pipe


def test_target_modules_and_dropout_shape_the_new_adapter(tmp_path) -> None:
    trainer = make_trainer(tmp_path, "ppo", model={"device": "cpu", "lora": True, "lora_dropout": 0.25,
                                                   "lora_target_modules": ["to_k", "to_out.0"]})
    adapted = {name.rsplit(".", 1)[-1] if not name.endswith("to_out.0") else "to_out.0"
               for name, module in trainer.unet.named_modules() if hasattr(module, "lora_A")}
    assert adapted == {"to_k", "to_out.0"}
    dropouts = [m.lora_dropout["default"] for m in trainer.unet.modules() if hasattr(m, "lora_dropout")]
    assert dropouts and all(isinstance(d, torch.nn.Dropout) and d.p == 0.25 for d in dropouts)
    assert all("lora_" in n for n, p in trainer.unet.named_parameters() if p.requires_grad)


def test_default_targets_are_the_attention_projections(tmp_path) -> None:
    trainer = make_trainer(tmp_path, "ppo", model={"device": "cpu", "lora": True})
    assert set(trainer.unet.peft_config["default"].target_modules) == {"to_q", "to_k", "to_v", "to_out.0"}


def test_lora_init_starts_from_an_adapter_saved_by_diffusers(tmp_path) -> None:
    from diffusers import StableDiffusionPipeline
    from diffusers.utils import convert_state_dict_to_diffusers

    source = _random_adapter()
    saved = _lora_state(source.unet)
    folder = tmp_path / "adapter"
    StableDiffusionPipeline.save_lora_weights(
        folder, unet_lora_layers=convert_state_dict_to_diffusers(saved),
        unet_lora_adapter_metadata=source.unet.peft_config["default"].to_dict(), safe_serialization=True)
    trainer = make_trainer(tmp_path, "ppo", model={"device": "cpu", "lora": True, "lora_init": str(folder)})
    loaded = _lora_state(trainer.unet)
    assert sorted(loaded) == sorted(saved)
    for key in saved:
        torch.testing.assert_close(loaded[key], saved[key], rtol=0, atol=0)
    config = trainer.unet.peft_config["default"]
    assert (config.r, config.lora_alpha, config.lora_dropout) == (2, 3.0, 0.1)
    trainable = {n for n, p in trainer.unet.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable) and len(trainable) == len(saved)


def test_lora_init_starts_from_an_adapter_saved_by_peft(tmp_path) -> None:
    from peft import LoraConfig, get_peft_model

    pipe = build_tiny_pipeline(seed=0)
    peft_model = get_peft_model(pipe.unet, LoraConfig(r=2, lora_alpha=5.0, target_modules=["to_k"]))
    generator = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=generator))
    from peft.utils import get_peft_model_state_dict

    saved = {k.removeprefix("base_model.model."): v.clone() for k, v in get_peft_model_state_dict(peft_model).items()}
    peft_model.save_pretrained(tmp_path / "peft_adapter")
    trainer = make_trainer(tmp_path, "ppo", model={"device": "cpu", "lora": True,
                                                   "lora_init": str(tmp_path / "peft_adapter")})
    loaded = _lora_state(trainer.unet)
    assert sorted(loaded) == sorted(saved)
    for key in saved:
        torch.testing.assert_close(loaded[key], saved[key], rtol=0, atol=0)
    assert trainer.unet.peft_config["default"].lora_alpha == 5.0


def test_bad_lora_settings_are_refused_in_one_line(tmp_path) -> None:
    with pytest.raises(ConfigError, match=r"model.lora_init='.*nowhere' is not a folder"):
        make_trainer(tmp_path, "ppo", model={"device": "cpu", "lora": True, "lora_init": str(tmp_path / "nowhere")})
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match=r"model.lora_init='.*empty' could not be loaded"):
        make_trainer(tmp_path, "ppo", model={"device": "cpu", "lora": True, "lora_init": str(tmp_path / "empty")})
    with pytest.raises(ConfigError, match=r"model.lora_target_modules=\['no_such_layer'\] is invalid"):
        make_trainer(tmp_path, "ppo", model={"device": "cpu", "lora": True, "lora_target_modules": ["no_such_layer"]})
    with pytest.raises(ConfigError, match="model.lora_init='x' is invalid; allowed: none without model.lora=true"):
        make_trainer(tmp_path, "ppo", model={"device": "cpu", "lora_init": "x"})
