"""Real-model rewards through tiny models of the real transformers classes, loaded from disk.

Each model is built from a small config, saved with ``save_pretrained`` and loaded back by the
reward through ``from_pretrained`` (offline). Scores are checked against computations written out
here step by step from the same model's outputs.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pytest
import torch
from PIL import Image

transformers = pytest.importorskip("transformers")

from loopdiff.rewards.aesthetic import AestheticHead, AestheticScore
from loopdiff.rewards.alignment import AlignmentScore, BertScoreRecall, BlipCaptioner
from loopdiff.rewards.base import RewardError, build_reward
from loopdiff.rewards.blip_vqa import BlipVqaScore
from loopdiff.rewards.clipscore import ClipScore
from loopdiff.rewards.detection import (
    Detection,
    NumeracyScore,
    OwlDetector,
    SpatialScore,
    box_iou,
    numeracy_score,
    spatial_score,
)

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
AESTHETIC_HEAD = DATA / "aesthetic" / "sac+logos+ava1-l14-linearMSE.pth"
CLIP_MEAN = torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(3, 1, 1)
CLIP_STD = torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(3, 1, 1)
WORDS = (
    "a an the green red blue bench car cat dog striped dotted triangle star circle square yes no ? and "
    "image contains picture of photo with on left right"
).split()


# ----------------------------------------------------------------------------- tiny models


def bert_vocab(folder: Path, extra: tuple[str, ...] = ()) -> Path:
    """A WordPiece vocab.txt: special tokens, the test words, then ``extra``."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "vocab.txt"
    path.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS, *extra]) + "\n")
    return path


def clip_tokenizer(folder: Path):
    """A character-level CLIP BPE tokenizer ("!" is id 0, as OWLv2's padding expects)."""
    from transformers import CLIPTokenizer

    letters = "abcdefghijklmnopqrstuvwxyz"
    tokens = ["!", *letters, *(c + "</w>" for c in letters), "<|startoftext|>", "<|endoftext|>"]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    return CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), pad_token="!")


def small(hidden: int = 32, **extra) -> dict:
    return {"hidden_size": hidden, "intermediate_size": 37, "num_hidden_layers": 1, "num_attention_heads": 2, **extra}


def save_tiny_blip(model_class, folder: Path, room_for_enc: bool, seed: int) -> Path:
    """A tiny BLIP with a BERT vocabulary ending in [DEC] (no [ENC] in the tokenizer, as on the Hub)."""
    from transformers import BertTokenizer, BlipConfig

    tokenizer = BertTokenizer(str(bert_vocab(folder, extra=("[DEC]",))), bos_token="[DEC]")
    size = len(tokenizer) + int(room_for_enc)  # the VQA model's vocabulary has [ENC] = [DEC] + 1
    text = small(
        vocab_size=size, encoder_hidden_size=32, bos_token_id=len(tokenizer) - 1, pad_token_id=0, sep_token_id=3,
        max_position_embeddings=40, initializer_range=0.3,
    )  # fmt: skip
    config = BlipConfig(text_config=text, vision_config=small(image_size=32, patch_size=16, initializer_range=0.3))
    torch.manual_seed(seed)
    model_class(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def blip_vqa_folder(tmp_path_factory) -> Path:
    from transformers import BlipForQuestionAnswering

    return save_tiny_blip(BlipForQuestionAnswering, tmp_path_factory.mktemp("blip_vqa"), room_for_enc=True, seed=0)


def clip_like_config(config_class, folder: Path, positions: int, projection_dim: int):
    """A tiny CLIP-style (CLIP, OWLv2) config and its character-level tokenizer, saved to ``folder``."""
    tokenizer = clip_tokenizer(folder)
    tokenizer.save_pretrained(folder)
    n = len(tokenizer)
    return config_class(
        text_config=small(vocab_size=n, max_position_embeddings=positions, bos_token_id=n - 2, eos_token_id=n - 1),
        vision_config=small(image_size=32, patch_size=8),
        projection_dim=projection_dim,
    )


@pytest.fixture(scope="module")
def owl_folder(tmp_path_factory) -> Path:
    from transformers import Owlv2Config, Owlv2ForObjectDetection

    folder = tmp_path_factory.mktemp("owlv2")
    config = clip_like_config(Owlv2Config, folder, positions=16, projection_dim=32)
    torch.manual_seed(0)
    model = Owlv2ForObjectDetection(config)
    with torch.no_grad():  # moderate class logits, so that scores spread over (0, 1)
        model.class_head.logit_scale.weight.zero_()
        model.class_head.logit_scale.bias.fill_(2.0)
        model.class_head.logit_shift.weight.mul_(0.1)
        model.class_head.logit_shift.bias.zero_()
    model.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def clip_folder(tmp_path_factory) -> Path:
    """A tiny CLIPModel with ViT-L/14's projection width (768), for the real aesthetic head."""
    from transformers import CLIPConfig, CLIPModel

    folder = tmp_path_factory.mktemp("clip")
    config = clip_like_config(CLIPConfig, folder, positions=64, projection_dim=768)
    torch.manual_seed(0)
    CLIPModel(config).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def captioner_folder(tmp_path_factory) -> Path:
    from transformers import BlipForConditionalGeneration

    folder = tmp_path_factory.mktemp("blip_caption")
    return save_tiny_blip(BlipForConditionalGeneration, folder, room_for_enc=False, seed=1)


@pytest.fixture(scope="module")
def bert_folder(tmp_path_factory) -> Path:
    from transformers import BertConfig, BertModel, BertTokenizer

    folder = tmp_path_factory.mktemp("bert")
    tokenizer = BertTokenizer(str(bert_vocab(folder)))
    torch.manual_seed(2)
    config = BertConfig(vocab_size=len(tokenizer), max_position_embeddings=40, **small(num_hidden_layers=2))
    BertModel(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def clip_normalise(images: torch.Tensor) -> torch.Tensor:
    return (images - CLIP_MEAN) / CLIP_STD


def eight_bit(images: torch.Tensor) -> torch.Tensor:
    return (images * 255).round() / 255


# ----------------------------------------------------------------------------- BLIP-VQA


def blip_by_hand(model, tokenizer, image: torch.Tensor, phrases: list[str], first_token: int) -> float:
    """T2I-CompBench's vqa_prob, one question at a time: no batching, no padding."""
    yes, no = tokenizer.convert_tokens_to_ids(["yes", "no"])
    bos = model.config.text_config.bos_token_id
    with torch.no_grad():
        states = model.vision_model(pixel_values=clip_normalise(image)[None], interpolate_pos_encoding=True)
        score = 1.0
        for phrase in phrases:
            ids = tokenizer(f"{phrase}?".lower(), return_tensors="pt").input_ids
            ids[0, 0] = first_token
            question = model.text_encoder(input_ids=ids, encoder_hidden_states=states.last_hidden_state)
            logits = model.text_decoder(
                input_ids=torch.tensor([[bos]]), encoder_hidden_states=question.last_hidden_state
            ).logits[0, 0]
            p = logits.softmax(-1)
            score *= float(p[yes] / (p[yes] + p[no]))
    return score


def test_blip_vqa_matches_per_question_computation(blip_vqa_folder):
    from transformers import BertTokenizer, BlipForQuestionAnswering

    model = BlipForQuestionAnswering.from_pretrained(blip_vqa_folder).eval()
    tokenizer = BertTokenizer.from_pretrained(blip_vqa_folder)
    enc = model.config.text_config.bos_token_id + 1
    prompts = ["a green bench and a red car", "a striped triangle", "a cat and a dog and a blue star"]
    phrases = [["a green bench", "a red car"], ["a striped triangle"], ["a cat", "a dog", "a blue star"]]
    torch.manual_seed(3)
    images = eight_bit(torch.rand(3, 3, 48, 48))  # 48 px on a 32 px model: position embeddings interpolated

    reward = BlipVqaScore(str(blip_vqa_folder), batch_size=2, image_size=48)
    scores = reward(images, prompts, [{}] * 3)

    expected = torch.tensor([blip_by_hand(model, tokenizer, im, ph, enc) for im, ph in zip(images, phrases)])
    assert reward.enc_token_id == enc
    torch.testing.assert_close(scores, expected, rtol=1e-5, atol=1e-6)
    assert expected.std() > 1e-3  # the images and questions give different answers
    with_cls = torch.tensor([blip_by_hand(model, tokenizer, images[0], phrases[0], tokenizer.cls_token_id)])
    assert not torch.allclose(scores[:1], with_cls, atol=1e-5)  # [ENC] instead of [CLS] matters


def test_blip_vqa_resizes_to_its_image_size(blip_vqa_folder):
    from transformers import BertTokenizer, BlipForQuestionAnswering

    model = BlipForQuestionAnswering.from_pretrained(blip_vqa_folder).eval()
    tokenizer = BertTokenizer.from_pretrained(blip_vqa_folder)
    torch.manual_seed(4)
    pixels = torch.randint(0, 256, (64, 64, 3), dtype=torch.uint8)
    resized = Image.fromarray(pixels.numpy()).resize((48, 48), Image.BICUBIC)  # T2I-CompBench's transform
    expected_pixels = torch.from_numpy(np.array(resized)).permute(2, 0, 1).float() / 255
    reward = BlipVqaScore(str(blip_vqa_folder), image_size=48)
    expected = blip_by_hand(model, tokenizer, expected_pixels, ["a cat"], reward.enc_token_id)
    images = pixels.permute(2, 0, 1)[None].float() / 255
    assert reward(images, ["a cat"], [{}]).item() == pytest.approx(expected, rel=1e-3)


def test_blip_vqa_missing_weights_name_reward_and_path(tmp_path):
    missing = tmp_path / "no-such-blip"
    with pytest.raises(RewardError, match=f"blip_vqa.*{missing.name}"):
        BlipVqaScore(str(missing))
    with pytest.raises(RewardError, match=f"blip_vqa.*{missing.name}"):
        build_reward("blip_vqa", {"blip_vqa": {"model": str(missing)}})


def test_blip_vqa_through_registry(blip_vqa_folder):
    reward = build_reward("blip_vqa", {"blip_vqa": {"model": str(blip_vqa_folder), "image_size": 48}})
    direct = BlipVqaScore(str(blip_vqa_folder), image_size=48)
    images = eight_bit(torch.rand(2, 3, 48, 48))
    prompts = ["a red circle and a blue square", "a dotted star"]
    torch.testing.assert_close(reward(images, prompts, [{}, {}]), direct(images, prompts, [{}, {}]))


# ----------------------------------------------------------------------------- OWLv2 spatial / numeracy


def owl_detections_by_hand(folder: Path, image: torch.Tensor, names: list[str], threshold: float, nms_iou: float):
    """Detections from the model's raw outputs via transformers' own post-processing, then NMS."""
    from transformers import AutoTokenizer, Owlv2ForObjectDetection
    from transformers.models.owlv2.image_processing_pil_owlv2 import Owlv2ImageProcessorPil

    model = Owlv2ForObjectDetection.from_pretrained(folder).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    height, width = image.shape[-2:]
    side = max(height, width)
    square = torch.full((3, side, side), 0.5)
    square[:, :height, :width] = image
    texts = [f"a photo of a {name}" for name in names]
    tokens = tokenizer(texts, padding="max_length", max_length=16, return_tensors="pt")
    with torch.no_grad():
        output = model(pixel_values=clip_normalise(square)[None], **tokens)
    result = Owlv2ImageProcessorPil().post_process_object_detection(
        output, threshold=threshold, target_sizes=[(side, side)]
    )[0]
    found = [
        Detection(names[int(label)], float(score), tuple(box.tolist()))
        for score, label, box in zip(result["scores"], result["labels"], result["boxes"])
    ]
    kept: list[Detection] = []
    for d in sorted(found, key=lambda d: -d.score):  # brute-force per-label NMS
        if all(k.label != d.label or box_iou(k.box, d.box) <= nms_iou for k in kept):
            kept.append(d)
    return kept


def test_owl_detector_matches_transformers_post_processing(owl_folder):
    torch.manual_seed(5)
    images = eight_bit(torch.rand(2, 3, 24, 32))  # padded to 32 x 32 (the model's size) at the bottom
    detector = OwlDetector(str(owl_folder), score_threshold=0.3, nms_iou=0.5)
    found = detector(images, [["cat", "dog"], ["dog"]])
    for image, names, got in zip(images, [["cat", "dog"], ["dog"]], found):
        expected = owl_detections_by_hand(owl_folder, image, names, 0.3, 0.5)
        assert [d.label for d in got] == [d.label for d in expected]
        assert [d.score for d in got] == pytest.approx([d.score for d in expected], abs=1e-5)
        for a, b in zip(got, expected):
            assert a.box == pytest.approx(b.box, abs=1e-3)
    assert 0 < sum(len(f) for f in found) < 2 * 16 * 2  # some, not all, boxes pass the threshold


def test_spatial_and_numeracy_rewards_over_owl(owl_folder):
    torch.manual_seed(6)
    images = eight_bit(torch.rand(3, 3, 32, 32))
    detector = OwlDetector(str(owl_folder), score_threshold=0.2, nms_iou=0.5)
    spatial_prompts = ["a cat on the left of a dog", "a dog near a cat", "a car on the top of a bench"]
    spatial = SpatialScore(detector)(images, spatial_prompts, [{}] * 3)
    pairs = [("cat", "dog"), ("dog", "cat"), ("car", "bench")]
    relations = ["on the left of", "near", "on the top of"]
    for i, ((first, last), relation) in enumerate(zip(pairs, relations)):
        found = owl_detections_by_hand(owl_folder, images[i], [first, last], 0.2, 0.5)
        assert spatial[i].item() == pytest.approx(spatial_score(found, first, last, relation, (32, 32)), abs=1e-6)

    numeracy_prompts = ["two cats and a dog", "three dogs", "one car, two benches and a star"]
    numeracy = NumeracyScore(detector)(images, numeracy_prompts, [{}] * 3)
    objects = [[("cat", 2), ("dog", 1)], [("dog", 3)], [("car", 1), ("bench", 2), ("star", 1)]]
    for i, asked in enumerate(objects):
        found = owl_detections_by_hand(owl_folder, images[i], [name for name, _ in asked], 0.2, 0.5)
        assert numeracy[i].item() == pytest.approx(numeracy_score(found, asked), abs=1e-6)
    assert numeracy.max() > 0  # the detector found something to count


# ----------------------------------------------------------------------------- aesthetic, CLIPScore


def test_aesthetic_equals_affine_map_of_real_head(clip_folder):
    if not AESTHETIC_HEAD.is_file():
        pytest.skip(f"aesthetic head weights not found at {AESTHETIC_HEAD}")
    from transformers import CLIPModel

    state = torch.load(AESTHETIC_HEAD, map_location="cpu", weights_only=True)
    w = {k: v.double() for k, v in state.items()}
    # Linear layers without activations collapse into one affine map e -> a.e + c.
    a = w["layers.7.weight"] @ w["layers.6.weight"] @ w["layers.4.weight"] @ w["layers.2.weight"] @ w["layers.0.weight"]
    c = w["layers.0.bias"]
    for layer in (2, 4, 6, 7):
        c = w[f"layers.{layer}.weight"] @ c + w[f"layers.{layer}.bias"]

    torch.manual_seed(7)
    images = eight_bit(torch.rand(3, 3, 32, 32))
    clip = CLIPModel.from_pretrained(clip_folder).eval()
    with torch.no_grad():
        features = clip.get_image_features(pixel_values=clip_normalise(images))
    features = features if torch.is_tensor(features) else features.pooler_output
    embeddings = (features / features.norm(dim=-1, keepdim=True)).double()
    expected = (embeddings @ a.T).squeeze(-1) + c

    reward = AestheticScore(AESTHETIC_HEAD, model=str(clip_folder), batch_size=2)
    scores = reward(images, ["", "", ""], [{}] * 3)
    torch.testing.assert_close(scores.double(), expected, rtol=1e-5, atol=1e-5)
    assert scores.std() > 0


def test_aesthetic_head_matches_released_layout():
    if not AESTHETIC_HEAD.is_file():
        pytest.skip(f"aesthetic head weights not found at {AESTHETIC_HEAD}")
    state = torch.load(AESTHETIC_HEAD, map_location="cpu", weights_only=True)
    head = AestheticHead()
    assert set(head.state_dict()) == set(state)
    assert [tuple(v.shape) for v in head.state_dict().values()] == [tuple(v.shape) for v in state.values()]


def test_aesthetic_rejects_missing_head(clip_folder, tmp_path):
    with pytest.raises(RewardError, match="aesthetic.*nothing.pth"):
        AestheticScore(tmp_path / "nothing.pth", model=str(clip_folder))
    with pytest.raises(RewardError, match="cannot run here: needs option head"):
        build_reward("aesthetic", {"aesthetic": {"model": str(clip_folder)}})


def test_clipscore_variants_match_cosine_by_hand(clip_folder):
    from transformers import AutoTokenizer, CLIPModel

    clip = CLIPModel.from_pretrained(clip_folder).eval()
    tokenizer = AutoTokenizer.from_pretrained(clip_folder)
    torch.manual_seed(8)
    images = eight_bit(torch.rand(4, 3, 32, 32))
    prompts = ["a red cat", "a dog", "a blue striped star and a circle", "green"]
    with torch.no_grad():
        expected = []
        for image, prompt in zip(images, prompts):
            tokens = tokenizer([prompt], return_tensors="pt")
            i = clip.get_image_features(pixel_values=clip_normalise(image)[None])
            t = clip.get_text_features(**tokens)
            i, t = (x if torch.is_tensor(x) else x.pooler_output for x in (i, t))
            expected.append(torch.nn.functional.cosine_similarity(i, t).item())
    expected = torch.tensor(expected)

    cosine = ClipScore(str(clip_folder), batch_size=3)(images, prompts, [{}] * 4)
    hessel = ClipScore(str(clip_folder), variant="hessel")(images, prompts, [{}] * 4)
    torch.testing.assert_close(cosine, expected, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(hessel, 2.5 * expected.clamp(min=0), rtol=1e-4, atol=1e-5)
    with pytest.raises(RewardError, match="'mean'"):
        ClipScore(str(clip_folder), variant="mean")


# ----------------------------------------------------------------------------- alignment (caption + BERTScore)


def recall_by_hand(model, tokenizer, candidate: str, reference: str, layer: int, idf=None) -> float:
    """BERTScore recall with explicit loops over the reference tokens (no batching, no padding)."""
    with torch.no_grad():
        c_ids = tokenizer(candidate, return_tensors="pt").input_ids
        r_ids = tokenizer(reference, return_tensors="pt").input_ids
        c = model(input_ids=c_ids, output_hidden_states=True).hidden_states[layer][0]
        r = model(input_ids=r_ids, output_hidden_states=True).hidden_states[layer][0]
    specials = {tokenizer.cls_token_id, tokenizer.sep_token_id}
    total, weight = 0.0, 0.0
    for j, token in enumerate(r_ids[0].tolist()):
        if token in specials:
            continue
        w = 1.0 if idf is None else idf[token]
        best = max(torch.nn.functional.cosine_similarity(r[j], c[i], dim=0).item() for i in range(len(c)))
        total += w * best
        weight += w
    return total / weight


def test_bertscore_recall_matches_brute_force(bert_folder):
    from transformers import AutoTokenizer, BertModel

    model = BertModel.from_pretrained(bert_folder).eval()
    tokenizer = AutoTokenizer.from_pretrained(bert_folder)
    candidates = ["a red car", "a cat with a dog on the left", "blue", "a dotted star and a striped circle"]
    references = ["The image contains a red car", "The image contains a cat", "The image contains a blue bench",
                  "The image contains a star"]  # fmt: skip
    scorer = BertScoreRecall(str(bert_folder), layer=1, batch_size=3)
    expected = torch.tensor([recall_by_hand(model, tokenizer, c, r, 1) for c, r in zip(candidates, references)])
    torch.testing.assert_close(scorer(candidates, references), expected, rtol=1e-5, atol=1e-6)
    assert scorer(references, references) == pytest.approx(torch.ones(4), abs=1e-5)  # identical -> 1

    import math

    ids = [tokenizer(r.strip(), add_special_tokens=False).input_ids for r in references]
    df = {t: sum(t in set(row) for row in ids) for row in ids for t in row}
    idf = {t: math.log((len(ids) + 1) / (n + 1)) for t, n in df.items()}
    with_idf = BertScoreRecall(str(bert_folder), layer=1, idf=True)(candidates, references)
    expected_idf = torch.tensor(
        [recall_by_hand(model, tokenizer, c, r, 1, idf) for c, r in zip(candidates, references)]
    )
    torch.testing.assert_close(with_idf, expected_idf, rtol=1e-5, atol=1e-6)


def test_alignment_scores_the_caption_against_the_prompt(captioner_folder, bert_folder):
    from transformers import AutoTokenizer, BertModel, BlipForConditionalGeneration

    torch.manual_seed(9)
    images = eight_bit(torch.rand(2, 3, 32, 32))
    prompts = ["a red car", "a cat and a dog"]
    reward = AlignmentScore(
        BlipCaptioner(str(captioner_folder), max_new_tokens=6),
        BertScoreRecall(str(bert_folder), layer=2),
        scale=20.0,
    )
    scores = reward(images, prompts, [{}, {}])

    captioner = BlipForConditionalGeneration.from_pretrained(captioner_folder).eval()
    caption_tokenizer = AutoTokenizer.from_pretrained(captioner_folder)
    with torch.no_grad():
        ids = captioner.generate(pixel_values=clip_normalise(images), max_new_tokens=6, do_sample=False, num_beams=1)
    captions = [c.strip() for c in caption_tokenizer.batch_decode(ids, skip_special_tokens=True)]
    assert reward.last_captions == captions and all(captions)
    bert = BertModel.from_pretrained(bert_folder).eval()
    bert_tokenizer = AutoTokenizer.from_pretrained(bert_folder)
    references = [f"The image contains {p}" for p in prompts]
    expected = [20.0 * recall_by_hand(bert, bert_tokenizer, c, r, 2) for c, r in zip(captions, references)]
    torch.testing.assert_close(scores, torch.tensor(expected), rtol=1e-5, atol=1e-5)


def test_reward_model_dtype_option(clip_folder):
    reward = ClipScore(str(clip_folder), dtype="bfloat16")
    assert next(reward.clip.parameters()).dtype == torch.bfloat16
    scores = reward(eight_bit(torch.rand(2, 3, 32, 32)), ["a cat", "a dog"], [{}, {}])
    assert scores.dtype == torch.float32 and scores.shape == (2,)
    with pytest.raises(RewardError, match="'float12'"):
        ClipScore(str(clip_folder), dtype="float12")
