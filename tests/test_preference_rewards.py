"""PickScore and HPSv2 through tiny CLIP models of the real transformers class, saved and loaded back; the
HPS checkpoint written in OpenCLIP's layout; scores against the cosine computed here by hand."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch

pytest.importorskip("transformers")

from loopdiff.rewards.base import RewardError, build_reward, registered_rewards
from test_rewards_real import clip_like_config, clip_normalise, eight_bit

PROMPTS = ["a red cat", "a dog", "a blue striped star and a circle"]


def _tiny_clip(folder, seed: int, with_tokenizer: bool = True):
    from transformers import CLIPConfig, CLIPModel

    config = clip_like_config(CLIPConfig, folder, positions=64, projection_dim=16)
    torch.manual_seed(seed)
    model = CLIPModel(config).eval()
    with torch.no_grad():
        model.logit_scale.fill_(3.0)
    model.save_pretrained(folder)
    if not with_tokenizer:  # PickScore_v1's folder has no tokenizer or image processor
        for name in os.listdir(folder):
            if name not in ("config.json", "model.safetensors"):
                os.remove(folder / name)
    return model


def _cosines(model, tokenizer_folder, images, prompts) -> torch.Tensor:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_folder)
    out = []
    with torch.no_grad():
        for image, prompt in zip(images, prompts):
            i = model.get_image_features(pixel_values=clip_normalise(image)[None])
            t = model.get_text_features(**tokenizer([prompt], return_tensors="pt"))
            i, t = (x if torch.is_tensor(x) else x.pooler_output for x in (i, t))
            out.append(torch.nn.functional.cosine_similarity(i, t).item())
    return torch.tensor(out)


def test_pickscore_is_logit_scale_times_cosine_with_the_separate_processor(tmp_path):
    processor = tmp_path / "processor"
    _tiny_clip(processor, seed=0)  # stands for laion/CLIP-ViT-H-14: its tokenizer
    model = _tiny_clip(tmp_path / "pickscore", seed=1, with_tokenizer=False)
    images = eight_bit(torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(4)))
    reward = build_reward("pickscore", {"pickscore": {"model": str(tmp_path / "pickscore"),
                                                      "processor": str(processor)}})
    expected = torch.tensor(3.0).exp() * _cosines(model, processor, images, PROMPTS)
    torch.testing.assert_close(reward(images, PROMPTS, [{}] * 3), expected, rtol=1e-4, atol=1e-5)


def _open_clip_layout(model) -> dict[str, torch.Tensor]:
    """``model``'s weights under OpenCLIP's names (fused in_proj, x @ proj projections), written out here."""
    state, out = model.state_dict(), {}
    for tower, prefix in (("vision_model", "visual.transformer.resblocks"), ("text_model", "transformer.resblocks")):
        layers = model.config.vision_config.num_hidden_layers if tower == "vision_model" else \
            model.config.text_config.num_hidden_layers
        for i in range(layers):
            src, dst = f"{tower}.encoder.layers.{i}", f"{prefix}.{i}"
            for kind in ("weight", "bias"):
                out[f"{dst}.attn.in_proj_{kind}"] = torch.cat(
                    [state[f"{src}.self_attn.{p}_proj.{kind}"] for p in ("q", "k", "v")])
                out[f"{dst}.attn.out_proj.{kind}"] = state[f"{src}.self_attn.out_proj.{kind}"]
                out[f"{dst}.ln_1.{kind}"] = state[f"{src}.layer_norm1.{kind}"]
                out[f"{dst}.ln_2.{kind}"] = state[f"{src}.layer_norm2.{kind}"]
                out[f"{dst}.mlp.c_fc.{kind}"] = state[f"{src}.mlp.fc1.{kind}"]
                out[f"{dst}.mlp.c_proj.{kind}"] = state[f"{src}.mlp.fc2.{kind}"]
    for kind in ("weight", "bias"):
        out[f"visual.ln_pre.{kind}"] = state[f"vision_model.pre_layrnorm.{kind}"]
        out[f"visual.ln_post.{kind}"] = state[f"vision_model.post_layernorm.{kind}"]
        out[f"ln_final.{kind}"] = state[f"text_model.final_layer_norm.{kind}"]
    out["visual.class_embedding"] = state["vision_model.embeddings.class_embedding"]
    out["visual.positional_embedding"] = state["vision_model.embeddings.position_embedding.weight"]
    out["visual.conv1.weight"] = state["vision_model.embeddings.patch_embedding.weight"]
    out["visual.proj"] = state["visual_projection.weight"].t()
    out["token_embedding.weight"] = state["text_model.embeddings.token_embedding.weight"]
    out["positional_embedding"] = state["text_model.embeddings.position_embedding.weight"]
    out["text_projection"] = state["text_projection.weight"].t()
    out["logit_scale"] = state["logit_scale"]
    out["attn_mask"] = torch.zeros(64, 64)  # OpenCLIP's text mask buffer: not a weight
    return out


def test_hpsv2_loads_the_open_clip_checkpoint_and_scores_its_cosine(tmp_path):
    _tiny_clip(tmp_path / "base", seed=0)  # stands for laion/CLIP-ViT-H-14
    tuned = _tiny_clip(tmp_path / "tuned", seed=5)
    checkpoint = tmp_path / "HPS_v2.1_compressed.pt"
    torch.save({"state_dict": {f"module.{k}": v for k, v in _open_clip_layout(tuned).items()}}, checkpoint)
    images = eight_bit(torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(6)))
    reward = build_reward("hpsv2", {"hpsv2": {"model": str(tmp_path / "base"), "checkpoint": str(checkpoint)}})
    expected = _cosines(tuned, tmp_path / "tuned", images, PROMPTS)
    torch.testing.assert_close(reward(images, PROMPTS, [{}] * 3), expected, rtol=1e-4, atol=1e-5)
    base_only = _cosines(_tiny_clip(tmp_path / "again", seed=0), tmp_path / "base", images, PROMPTS)
    assert (base_only - expected).abs().max() > 1e-3  # the checkpoint's weights, not the base model's


def test_missing_weights_are_named_and_listed(tmp_path):
    with pytest.raises(RewardError, match=r"reward 'pickscore'.*no-such-folder"):
        build_reward("pickscore", {"pickscore": {"model": str(tmp_path / "no-such-folder")}})
    with pytest.raises(RewardError, match=r"reward 'hpsv2' cannot run here: needs option checkpoint=<path to HPS_v2.1_compressed.pt>"):
        build_reward("hpsv2", {})
    _tiny_clip(tmp_path / "base", seed=0)
    torch.save({"state_dict": {"visual.proj": torch.zeros(2, 2)}}, tmp_path / "bad.pt")
    with pytest.raises(RewardError, match=r"reward 'hpsv2': '.*bad.pt' is not an OpenCLIP checkpoint"):
        build_reward("hpsv2", {"hpsv2": {"model": str(tmp_path / "base"), "checkpoint": str(tmp_path / "bad.pt")}})
    info = registered_rewards()
    assert "does not exist" in info["pickscore"].unavailable_reason({"model": str(tmp_path / "nowhere")})
    assert "checkpoint=" in info["hpsv2"].unavailable_reason({})
