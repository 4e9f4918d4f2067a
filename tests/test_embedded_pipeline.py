"""The embedded base pipeline: SD layout and loading path, tokenizer, pretraining CLI, shipped weights."""

from __future__ import annotations

import json
import os
import subprocess
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline
from transformers import CLIPTokenizer

from loopdiff.embedded import world
from loopdiff.embedded.pipeline import (
    MAX_PROMPT_TOKENS,
    build_untrained_pipeline,
    embedded_pipeline_path,
    load_embedded_pipeline,
    world_vocabulary,
)
from loopdiff.embedded.pretrain import mislabel_colors, pretrain_cli
from loopdiff.embedded.pretrain_common import corrupt_scene, draw_batch
from loopdiff.embedded.tokenizer import build_tokenizer, words_missing_single_token

torch.set_num_threads(1)


def _state_dicts_equal(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def _load(folder) -> StableDiffusionPipeline:
    pipe = StableDiffusionPipeline.from_pretrained(folder, safety_checker=None, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe


# ----------------------------------------------------------------------------- tokenizer


def test_every_world_word_is_one_token_and_survives_save_load(tmp_path):
    words = world_vocabulary()
    tokenizer = build_tokenizer(words, MAX_PROMPT_TOKENS)
    assert words_missing_single_token(tokenizer, words) == []
    tokenizer.save_pretrained(tmp_path)
    loaded = CLIPTokenizer.from_pretrained(tmp_path)
    text = "a red striped circle on the left of two blue squares"
    ids = loaded(text)["input_ids"]
    assert ids == tokenizer(text)["input_ids"]
    assert ids[0] == loaded.bos_token_id and ids[-1] == loaded.eos_token_id
    assert len(ids) == len(text.split()) + 2  # one token per word
    assert loaded.decode(ids, skip_special_tokens=True) == text


def test_unknown_words_split_into_known_pieces():
    tokenizer = build_tokenizer(["red", "circle"], MAX_PROMPT_TOKENS)
    ids = tokenizer("a zebra-xylophone", add_special_tokens=False)["input_ids"]
    assert len(ids) > 2  # split, not dropped
    assert tokenizer.unk_token_id not in ids
    assert tokenizer.decode(ids).replace(" ", "") == "azebra-xylophone"


def test_tokenizer_is_the_same_in_every_process():
    """BPE ties are broken by spelling, so fresh interpreters with different hash seeds agree exactly."""
    script = (
        "import json; from loopdiff.embedded.tokenizer import learn_vocab_and_merges;"
        "from loopdiff.embedded.pipeline import world_vocabulary;"
        "from loopdiff.embedded.tokenizer import FUNCTION_WORDS;"
        "print(json.dumps(learn_vocab_and_merges(world_vocabulary() + list(FUNCTION_WORDS))))"
    )
    outputs = []
    for hash_seed in ("1", "2"):
        env = {**os.environ, "PYTHONHASHSEED": hash_seed}
        done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, check=True)
        outputs.append(json.loads(done.stdout.strip().splitlines()[-1]))
    assert outputs[0] == outputs[1]
    vocab, merges = outputs[0]
    assert len(set(vocab.values())) == len(vocab)  # ids are distinct


def test_bpe_merges_follow_pair_counts():
    """A hand-checkable case: "aa" occurs in both words first, then the ties break by spelling."""
    from loopdiff.embedded.tokenizer import learn_vocab_and_merges

    vocab, merges = learn_vocab_and_merges(["aab", "aac"])
    assert merges[0] == ("a", "a")
    assert merges[1:] == [("aa", "b</w>"), ("aa", "c</w>")]
    assert {"aab</w>", "aac</w>"} <= set(vocab)


def test_tokenizer_rejects_non_letter_words():
    with pytest.raises(ValueError, match="red1"):
        build_tokenizer(["red1"], MAX_PROMPT_TOKENS)


# ----------------------------------------------------------------------------- layout and loading path


def test_untrained_pipeline_round_trips_through_stable_diffusion_loader(tmp_path):
    pipe = build_untrained_pipeline(seed=3)
    pipe.save_pretrained(tmp_path)
    index = json.loads((tmp_path / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionPipeline"
    assert index["safety_checker"] == [None, None] and index["feature_extractor"] == [None, None]
    for part in ("tokenizer", "text_encoder", "unet", "vae", "scheduler"):
        assert (tmp_path / part).is_dir()
    loaded = _load(tmp_path)
    for name in ("unet", "vae", "text_encoder"):
        assert _state_dicts_equal(getattr(pipe, name), getattr(loaded, name)), name
    assert loaded.text_encoder.config.max_position_embeddings == loaded.tokenizer.model_max_length
    assert loaded.text_encoder.config.hidden_size == loaded.unet.config.cross_attention_dim
    assert loaded.vae_scale_factor * loaded.unet.config.sample_size == world.IMAGE_SIZE
    # seeds make the weights reproducible; different seeds differ
    assert _state_dicts_equal(build_untrained_pipeline(seed=3).unet, pipe.unet)
    assert not _state_dicts_equal(build_untrained_pipeline(seed=4).unet, pipe.unet)


# ----------------------------------------------------------------------------- pretraining CLI


def test_pretrain_cli_trains_checkpoints_and_resumes(tmp_path):
    out = tmp_path / "pipe"
    common = ["--output-dir", str(out), "--vae-batch-size", "4", "--unet-batch-size", "4", "--threads", "1"]
    assert pretrain_cli(common + ["--max-steps", "2"]) == 0
    state = torch.load(out / "pretrain_state" / "state.pt", weights_only=False)
    assert (state["vae_step"], state["unet_step"]) == (2, 4)  # stage 3 continues the UNet's step count
    losses = [loss for _, loss in state["history"]["vae_mse"] + state["history"]["unet_loss"]]
    assert len(losses) == 6 and all(np.isfinite(losses))
    trained = _load(out)
    untrained = build_untrained_pipeline(seed=0)
    for name in ("unet", "vae", "text_encoder"):
        assert not _state_dicts_equal(getattr(trained, name), getattr(untrained, name)), name
    assert trained.vae.config.scaling_factor != 1.0  # set from the latent std after the VAE stage

    assert pretrain_cli(common + ["--max-steps", "3"]) == 0  # resumes where the first run stopped
    state = torch.load(out / "pretrain_state" / "state.pt", weights_only=False)
    assert (state["vae_step"], state["unet_step"]) == (3, 6)
    assert [s for s, _ in state["history"]["unet_loss"]] == [0, 1, 2, 3, 4, 5]


def test_decoder_stage_trains_the_decoder_only_and_resumes_exactly(tmp_path):
    from loopdiff.embedded.pretrain import PretrainConfig, Trainer

    def trainer(folder):
        return Trainer(PretrainConfig(output_dir=str(folder), vae_batch_size=4, threads=1, checkpoint_every=2,
                                      vae_steps=1, decoder_steps=4, warmup_steps=2))

    straight = trainer(tmp_path / "a")
    straight.train_vae(1)
    encoder = {k: v.clone() for k, v in straight.vae.encoder.state_dict().items()}
    decoder = {k: v.clone() for k, v in straight.vae.decoder.state_dict().items()}
    straight.train_decoder(4)
    assert all(torch.equal(v, encoder[k]) for k, v in straight.vae.encoder.state_dict().items())  # same latents
    assert any(not torch.equal(v, decoder[k]) for k, v in straight.vae.decoder.state_dict().items())
    assert [s for s, _ in straight.history["decoder_mse"]] == [0, 1, 2, 3]

    halted = trainer(tmp_path / "b")
    halted.train_vae(1)
    halted.train_decoder(2)  # checkpoints at step 2
    resumed = trainer(tmp_path / "b")
    assert resumed.load_state() and resumed.decoder_step == 2
    resumed.train_decoder(4)
    assert _state_dicts_equal(resumed.vae, straight.vae)


def test_mislabel_colors_swaps_or_replaces_colour_words_only():
    caption = "a red circle on the left of a blue square"
    rng = np.random.default_rng(0)
    assert mislabel_colors(caption, rng, swap_prob=1.0, wrong_prob=0.0) == "a blue circle on the left of a red square"
    assert mislabel_colors(caption, rng, swap_prob=0.0, wrong_prob=0.0) == caption
    assert mislabel_colors("two striped stars", rng, swap_prob=1.0, wrong_prob=1.0) == "two striped stars"
    same = mislabel_colors("a red circle and a red square", rng, swap_prob=1.0, wrong_prob=1.0).split(" ")
    assert same[1] != "red" and same[5] != "red"  # swapping equal colours changes nothing: replace instead
    replaced = mislabel_colors("a red circle", rng, swap_prob=1.0, wrong_prob=1.0).split(" ")
    assert replaced[0] == "a" and replaced[2] == "circle" and replaced[1] in world.COLORS and replaced[1] != "red"

    # Rates: a swap with probability p; otherwise each colour is replaced with probability q.
    p, q, n = 0.3, 0.2, 4000
    rng = np.random.default_rng(1)
    outcomes = [mislabel_colors(caption, rng, p, q) for _ in range(n)]
    swapped = sum(o == "a blue circle on the left of a red square" for o in outcomes) / n
    first_wrong = sum(o.split(" ")[1] not in ("red", "blue") for o in outcomes) / n
    assert abs(swapped - p) < 3 * (p * (1 - p) / n) ** 0.5
    other_colors = len(world.COLORS) - 1  # a replacement is uniform over these; 1 of them is "blue"
    expected = (1 - p) * q * (other_colors - 1) / other_colors
    assert abs(first_wrong - expected) < 3 * (expected * (1 - expected) / n) ** 0.5
    for o in outcomes:  # only the colour slots ever change
        w = o.split(" ")
        assert w[0] == "a" and w[2:8] == ["circle", "on", "the", "left", "of", "a"] and w[9] == "square"


def test_corrupt_scene_drops_or_recolours_the_last_object_at_the_given_rates():
    red = world.WorldObject("circle", "red", "plain", 24, 16, 32)
    blue = world.WorldObject("square", "blue", "striped", 24, 48, 32)
    scene = world.Scene((red, blue))
    rng = np.random.default_rng(0)
    assert corrupt_scene(scene, rng, 1.0, 0.0).objects == (red,)
    leaked = corrupt_scene(scene, rng, 0.0, 1.0).objects
    assert leaked[0] == red and leaked[1].color == "red"
    assert (leaked[1].shape, leaked[1].texture, leaked[1].x) == ("square", "striped", 48)
    assert corrupt_scene(world.Scene((blue,)), rng, 1.0, 1.0).objects == (blue,)
    assert corrupt_scene(scene, rng, 0.0, 0.0) == scene

    p, q, n = 0.3, 0.4, 4000  # neglect with probability p; otherwise leakage with probability q
    outcomes = [corrupt_scene(scene, rng, p, q).objects for _ in range(n)]
    dropped = sum(len(o) == 1 for o in outcomes) / n
    leaked_rate = sum(len(o) == 2 and o[1].color == "red" for o in outcomes) / n
    assert abs(dropped - p) < 3 * (p * (1 - p) / n) ** 0.5
    expected = (1 - p) * q
    assert abs(leaked_rate - expected) < 3 * (expected * (1 - expected) / n) ** 0.5


def test_corrupted_batches_keep_the_clean_captions_and_stream():
    clean_captions, clean = draw_batch(0, 2, 7, 16, 0.2, 0.2)
    captions, corrupted = draw_batch(0, 2, 7, 16, 0.2, 0.2, neglect_prob=1.0)
    assert captions == clean_captions  # the captions still name every object
    two_or_more = [i for i, c in enumerate(captions) if " and " in c]
    assert two_or_more and all(not torch.equal(clean[i], corrupted[i]) for i in two_or_more)
    again_captions, again = draw_batch(0, 2, 7, 16, 0.2, 0.2, neglect_prob=0.0)
    assert again_captions == clean_captions and torch.equal(again, clean)


# ----------------------------------------------------------------------------- the shipped weights

shipped = pytest.mark.skipif(
    not (embedded_pipeline_path() / "model_index.json").is_file(), reason="shipped pipeline weights absent"
)


def _renders(n: int, seed: int) -> torch.Tensor:
    from loopdiff.embedded.pretrain import random_scene

    rng = np.random.default_rng(seed)
    images = np.stack([world.render(random_scene(rng)) for _ in range(n)])
    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255.0


@shipped
def test_shipped_pipeline_samples_images_of_the_right_shape():
    pipe = load_embedded_pipeline("cpu", torch.float32)
    assert isinstance(pipe, StableDiffusionPipeline)
    out = pipe(
        ["a red circle", "a blue square"], num_inference_steps=4, guidance_scale=5.0, output_type="pt",
        generator=torch.Generator().manual_seed(0),
    ).images
    assert out.shape == (2, 3, world.IMAGE_SIZE, world.IMAGE_SIZE)
    assert torch.isfinite(out).all() and out.min() >= 0 and out.max() <= 1


@shipped
def test_shipped_tokenizer_is_the_one_build_tokenizer_makes():
    shipped_tokenizer = CLIPTokenizer.from_pretrained(embedded_pipeline_path() / "tokenizer")
    built = build_tokenizer(world_vocabulary(), MAX_PROMPT_TOKENS)
    assert shipped_tokenizer.get_vocab() == built.get_vocab()
    text = "three striped purple hexagons on the left of a zebra"
    assert shipped_tokenizer(text)["input_ids"] == built(text)["input_ids"]


@shipped
def test_shipped_vae_reconstructs_fresh_renders():
    vae = load_embedded_pipeline().vae
    images = _renders(32, seed=12345)
    with torch.no_grad():
        latents = vae.encode(images * 2 - 1).latent_dist.mode()
        recon = (vae.decode(latents).sample / 2 + 0.5).clamp(0, 1)
        scaled_std = float((latents * vae.config.scaling_factor).std())
    assert latents.shape[1:] == (4, 16, 16)
    mse = float(((recon - images) ** 2).mean())
    assert mse < 0.003, mse  # in [0, 1] units (measured 0.0015): RMSE under ~14 grey levels
    assert 0.7 < scaled_std < 1.4  # scaling_factor normalises the latents as in SD


def _nearest_palette_color(images: torch.Tensor) -> np.ndarray:
    """Per pixel, the name of the nearest world colour (either tone) or "background"."""
    names = ["background"]
    tones = [world.BACKGROUND]
    for name, rgb in world.COLORS.items():
        names += [name, name]
        tones += [rgb, world.pattern_color(name)]
    palette = torch.tensor(tones, dtype=torch.float32) / 255.0  # (P, 3)
    pixels = images.permute(0, 2, 3, 1).reshape(-1, 3)
    nearest = torch.cdist(pixels, palette).argmin(dim=1).numpy()
    return np.array(names)[nearest]


@shipped
def test_shipped_model_draws_red_for_a_red_circle():
    pipe = load_embedded_pipeline()
    images = pipe(
        ["a red circle"] * 8, num_inference_steps=20, guidance_scale=5.0, output_type="pt",
        generator=torch.Generator().manual_seed(0),
    ).images
    labels = _nearest_palette_color(images)
    foreground = labels[labels != "background"]
    assert foreground.size > 0.02 * labels.size  # something was drawn
    names, counts = np.unique(foreground, return_counts=True)
    assert names[counts.argmax()] == "red", dict(zip(names, counts))
    assert np.mean(foreground == "red") > 0.5  # chance is 1 / len(COLORS) = 0.125


class _RunsCode:
    """Unpickling this creates ``marker``: what a crafted resume state could do if it were unpickled in full."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.mark.parametrize("family, state_file", [("unet", "state.pt"), ("flow", "flow_state.pt")])
def test_a_crafted_resume_state_is_refused_in_one_line_and_never_run(tmp_path, capsys, family, state_file):
    out, marker = tmp_path / "pipe", tmp_path / "created-by-the-state-file"
    (out / "pretrain_state").mkdir(parents=True)
    torch.save({"vae_step": 0, "payload": _RunsCode(marker)}, out / "pretrain_state" / state_file)
    code = pretrain_cli(["--family", family, "--output-dir", str(out), "--max-steps", "1", "--threads", "1"])
    errors = [line for line in capsys.readouterr().err.splitlines() if "error" in line]  # not the loading bars
    assert code == 2 and not marker.exists()
    assert len(errors) == 1 and state_file in errors[0] and "--no-resume" in errors[0], errors
