"""T2I-CompBench's BLIP-VQA score (colour, shape, texture; docs/rewards.md).

For each noun phrase of the prompt the model is asked ``"<phrase>?"``; the answer score is the first
decoder step's ``p(yes) / (p(yes) + p(no))`` (the softmax renormalised over the two answer tokens,
which equals ``sigmoid(logit_yes - logit_no)``); the image score is the product over the phrases
(at most ``max_phrases``, T2I-CompBench's ``np_num = 8``).

As in T2I-CompBench (BLIP's ``BLIP_VQA.vqa_prob``, also LAVIS's ``BlipVQA``):

- questions are lower-cased with ``.!"()*#:;~`` removed (BLIP's ``pre_question``), tokenised with
  padding to the longest and truncation at 35 tokens, and their first token ([CLS]) is replaced by
  BLIP's [ENC] token before the image-grounded text encoder;
- images are 8-bit, resized to 480 x 480 with bicubic resampling and CLIP normalisation; the ViT's
  position embeddings are interpolated to the 30 x 30 grid (``interpolate_pos_encoding=True``);
- the answer decoder starts from [DEC] (the text config's ``bos_token_id``) and cross-attends to the
  question states with the question's attention mask.

The transformers checkpoints (``Salesforce/blip-vqa-capfilt-large`` is T2I-CompBench's
``model_base_vqa_capfilt_large``) were converted at 384 px, so their 480 px position embeddings are
an interpolation of an interpolation of the original 480 px ones: a small, unavoidable difference.
"""

from __future__ import annotations

import re
from dataclasses import replace
from typing import Any, Mapping, Sequence

import torch

from loopdiff.rewards.base import RewardError, register_reward
from loopdiff.rewards.hf_models import HuggingFaceScorer, check_images, concat, weights_check
from loopdiff.rewards.phrases import split_noun_phrases

DEFAULT_MODEL = "Salesforce/blip-vqa-capfilt-large"
QUESTION_MAX_TOKENS = 35
_QUESTION_PUNCTUATION = re.compile(r"[.!\"()*#:;~]")


def blip_question(phrase: str) -> str:
    """``"A green bench"`` -> ``"a green bench?"`` (BLIP's ``pre_question`` of ``f"{phrase}?"``)."""
    return _QUESTION_PUNCTUATION.sub("", f"{phrase}?".lower()).rstrip(" ")


class BlipVqaScore(HuggingFaceScorer):
    """Callable reward: product over noun phrases of BLIP-VQA's renormalised p(yes)."""

    def __init__(
        self,
        model: str = DEFAULT_MODEL,
        device: str | torch.device = "cpu",
        dtype: Any = torch.float32,
        batch_size: int = 16,
        image_size: int = 480,
        max_phrases: int = 8,
        phrase_backend: str = "rules",
        enc_token_id: int | None = None,
        name: str = "blip_vqa",
    ):
        from transformers import BlipForQuestionAnswering

        super().__init__(BlipForQuestionAnswering, model, device, dtype, batch_size, name)
        self.image_settings = replace(self.settings, size=image_size)
        self.max_phrases = max_phrases
        self.phrase_backend = phrase_backend
        self.enc_token_id = self._resolve_enc_token(enc_token_id)
        self.bos_token_id = self.model.config.text_config.bos_token_id
        self.yes_id, self.no_id = (self._single_token(word) for word in ("yes", "no"))

    def _single_token(self, word: str) -> int:
        ids = self.tokenizer(word, add_special_tokens=False)["input_ids"]
        if len(ids) != 1 or ids[0] == self.tokenizer.unk_token_id:
            raise RewardError(f"reward '{self.name}': the tokenizer has no single token for '{word}' (got {ids})")
        return ids[0]

    def _resolve_enc_token(self, enc_token_id: int | None) -> int:
        """BLIP's [ENC] id: given, else the tokenizer's '[ENC]', else [DEC] + 1 (30523 after 30522)."""
        vocab_size = self.model.config.text_config.vocab_size
        if enc_token_id is None:
            known = self.tokenizer.convert_tokens_to_ids("[ENC]")
            unknown = known is None or known == self.tokenizer.unk_token_id
            enc_token_id = self.model.config.text_config.bos_token_id + 1 if unknown else known
        if not 0 <= enc_token_id < vocab_size:
            raise RewardError(
                f"reward '{self.name}': [ENC] token id {enc_token_id} is outside the vocabulary of {vocab_size}; "
                "pass enc_token_id"
            )
        return int(enc_token_id)

    def questions(self, prompt: str) -> list[str]:
        """The questions asked for ``prompt``: one per noun phrase, at most ``max_phrases``."""
        phrases = split_noun_phrases(prompt, backend=self.phrase_backend)[: self.max_phrases]
        return [blip_question(phrase) for phrase in phrases]

    @torch.no_grad()
    def image_embeddings(self, images: torch.Tensor) -> torch.Tensor:
        """ViT states ``(N, tokens, width)`` of images at ``image_size`` px (position embeddings interpolated)."""
        pixels = self.model_pixels(images, self.image_settings, mode="bicubic")
        vision = self.model.vision_model(pixel_values=pixels, interpolate_pos_encoding=True)
        return vision.last_hidden_state

    @torch.no_grad()
    def yes_probability(self, image_states: torch.Tensor, questions: Sequence[str]) -> torch.Tensor:
        """Renormalised p(yes) of the first answer token, one per (image state, question) pair."""
        device = image_states.device
        tokens = self.tokenizer(
            list(questions), padding="longest", truncation=True, max_length=QUESTION_MAX_TOKENS, return_tensors="pt"
        ).to(device)
        input_ids = tokens["input_ids"].clone()
        input_ids[:, 0] = self.enc_token_id
        image_mask = torch.ones(image_states.shape[:-1], dtype=torch.long, device=device)
        question_states = self.model.text_encoder(
            input_ids=input_ids,
            attention_mask=tokens["attention_mask"],
            encoder_hidden_states=image_states,
            encoder_attention_mask=image_mask,
        ).last_hidden_state
        start = torch.full((len(questions), 1), self.bos_token_id, dtype=torch.long, device=device)
        logits = self.model.text_decoder(
            input_ids=start,
            encoder_hidden_states=question_states,
            encoder_attention_mask=tokens["attention_mask"],
        ).logits[:, 0, :].float()
        return torch.sigmoid(logits[:, self.yes_id] - logits[:, self.no_id])

    def phrase_scores(self, images: torch.Tensor, prompts: Sequence[str]) -> list[torch.Tensor]:
        """Per image, the renormalised p(yes) of each of its questions (CPU float32)."""
        images = check_images(images, self.name)
        if len(prompts) != images.shape[0]:
            raise RewardError(f"reward '{self.name}': {images.shape[0]} images but {len(prompts)} prompts")
        questions = [self.questions(prompt) for prompt in prompts]
        return [score for part in self.in_chunks(self._chunk_scores, images, questions) for score in part]

    def _chunk_scores(self, images: torch.Tensor, questions: Sequence[Sequence[str]]) -> tuple[torch.Tensor, ...]:
        """Per image of one chunk, the p(yes) of each of its questions."""
        states = self.image_embeddings(images)
        pairs = [(i, q) for i, qs in enumerate(questions) for q in qs]
        return torch.split(self._pair_probabilities(states, pairs), [len(qs) for qs in questions])

    def _pair_probabilities(self, states: torch.Tensor, pairs: list[tuple[int, str]]) -> torch.Tensor:
        """p(yes) for (image index into ``states``, question) pairs, ``batch_size`` pairs at a time."""

        def probabilities(part: list[tuple[int, str]]) -> torch.Tensor:
            image_index = torch.tensor([i for i, _ in part], device=states.device)
            return self.yes_probability(states[image_index], [q for _, q in part]).cpu()

        return concat(self.in_chunks(probabilities, pairs))

    def __call__(
        self, images: torch.Tensor, prompts: Sequence[str], metadata: Sequence[Mapping[str, Any]]
    ) -> torch.Tensor:
        return torch.stack([p.prod() for p in self.phrase_scores(images, prompts)]).float()


@register_reward(
    "blip_vqa",
    description="T2I-CompBench BLIP-VQA (colour/shape/texture): product over noun phrases of p(yes)/(p(yes)+p(no))",
    needs=f"BlipForQuestionAnswering weights (default '{DEFAULT_MODEL}'; option model=<folder or Hub id>)",
    extras=("transformers",),
    check=weights_check(DEFAULT_MODEL),
)
def blip_vqa(
    model: str = DEFAULT_MODEL,
    device: str = "cpu",
    dtype: Any = "float32",
    batch_size: int = 16,
    image_size: int = 480,
    max_phrases: int = 8,
    phrase_backend: str = "rules",
    enc_token_id: int | None = None,
) -> BlipVqaScore:
    return BlipVqaScore(model, device, dtype, batch_size, image_size, max_phrases, phrase_backend, enc_token_id)
