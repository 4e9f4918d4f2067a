"""ImageReward through a tiny BlipForImageTextRetrieval (its config and tokenizer saved and loaded back) and a
checkpoint written in the released ImageReward.pt layout; the score against the computation written out here."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch

pytest.importorskip("transformers")

from loopdiff.rewards.aesthetic import AestheticHead
from loopdiff.rewards.base import RewardError, build_reward
from test_rewards_real import clip_normalise, eight_bit, save_tiny_blip

PROMPTS = ["a red cat", "a dog on the left of a bench", "a blue striped star"]


def _original_layout(model, head) -> dict[str, torch.Tensor]:
    """The weights under the released checkpoint's names (BLIP's ViT and BERT, ImageReward's mlp)."""
    vit = {"embeddings.class_embedding": "cls_token", "embeddings.position_embedding": "pos_embed",
           "embeddings.patch_embedding.weight": "patch_embed.proj.weight",
           "embeddings.patch_embedding.bias": "patch_embed.proj.bias",
           "post_layernorm.weight": "norm.weight", "post_layernorm.bias": "norm.bias"}
    block = {"self_attn.qkv": "attn.qkv", "self_attn.projection": "attn.proj", "layer_norm1": "norm1",
             "layer_norm2": "norm2", "mlp.fc1": "mlp.fc1", "mlp.fc2": "mlp.fc2"}
    out = {}
    for key, value in model.state_dict().items():
        if key.startswith("vision_model."):
            name = key.removeprefix("vision_model.")
            if name.startswith("encoder.layers."):
                _, _, index, rest = name.split(".", 3)
                module, kind = rest.rsplit(".", 1)
                name = f"blocks.{index}.{block[module]}.{kind}"
            else:
                name = vit[name]
            out[f"blip.visual_encoder.{name}"] = value
        elif key.startswith("text_encoder."):
            out[f"blip.{key}"] = value
        else:
            out[f"blip.{key}"] = value  # the projections and ITM head: in the checkpoint, unused by the reward
    out |= {f"mlp.{k}": v for k, v in head.state_dict().items()}
    return out


def test_imagereward_matches_its_score_computed_by_hand(tmp_path):
    from transformers import AutoTokenizer, BlipForImageTextRetrieval

    folder = save_tiny_blip(BlipForImageTextRetrieval, tmp_path / "blip", room_for_enc=False, seed=0)
    torch.manual_seed(9)
    tuned = BlipForImageTextRetrieval.from_pretrained(folder)
    with torch.no_grad():
        for p in tuned.parameters():
            p.add_(0.05 * torch.randn_like(p))
    tuned.eval()
    head = AestheticHead(32).eval()
    torch.save(_original_layout(tuned, head), tmp_path / "ImageReward.pt")

    reward = build_reward("imagereward", {"imagereward": {"checkpoint": str(tmp_path / "ImageReward.pt"),
                                                          "model": str(folder), "image_size": 32}})
    images = eight_bit(torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(2)))
    tokenizer = AutoTokenizer.from_pretrained(folder)
    expected = []
    with torch.no_grad():
        for image, prompt in zip(images, PROMPTS):
            states = tuned.vision_model(pixel_values=clip_normalise(image)[None]).last_hidden_state
            tokens = tokenizer([prompt], padding="max_length", truncation=True, max_length=35, return_tensors="pt")
            cls = tuned.text_encoder(input_ids=tokens.input_ids, attention_mask=tokens.attention_mask,
                                     encoder_hidden_states=states,
                                     encoder_attention_mask=torch.ones(states.shape[:-1], dtype=torch.long)
                                     ).last_hidden_state[:, 0]
            expected.append(((head(cls) - 0.16717362830052426) / 1.0333394966054072).item())
    torch.testing.assert_close(reward(images, PROMPTS, [{}] * 3), torch.tensor(expected), rtol=1e-4, atol=1e-5)


def test_imagereward_names_a_missing_or_unfitting_checkpoint(tmp_path):
    from transformers import BlipForImageTextRetrieval

    with pytest.raises(RewardError, match=r"reward 'imagereward' cannot run here: needs option checkpoint="):
        build_reward("imagereward", {})
    folder = save_tiny_blip(BlipForImageTextRetrieval, tmp_path / "blip", room_for_enc=False, seed=0)
    torch.save({"mlp.layers.0.weight": torch.zeros(2, 2)}, tmp_path / "other.pt")
    with pytest.raises(RewardError, match=r"reward 'imagereward': '.*other.pt' does not fit the BLIP"):
        build_reward("imagereward", {"imagereward": {"checkpoint": str(tmp_path / "other.pt"), "model": str(folder),
                                                     "image_size": 32}})
    with pytest.raises(RewardError, match=r"reward 'imagereward'.*no-blip"):
        build_reward("imagereward", {"imagereward": {"checkpoint": str(tmp_path / "other.pt"),
                                                     "model": str(tmp_path / "no-blip")}})
