"""DDPO's image-text alignment reward: caption the image, score the caption with BERTScore recall.

DDPO (Black et al. 2023) asks LLaVA "what is going on in this image?" and rewards the BERTScore
recall of the answer (candidate) against the reference ``"The image contains <prompt>"``, with
``bert_score``'s defaults for ``microsoft/deberta-xlarge-mnli`` (layer 40, no IDF, no baseline
rescaling). Here the captioner is a transformers ``BlipForConditionalGeneration`` (greedy decoding;
LLaVA is too large for this setting) and BERTScore recall is implemented directly:

    R = sum_j w_j max_i cos(c_i, r_j) / sum_j w_j

over the contextual embeddings (hidden states of layer ``layer``) of the caption tokens ``c_i`` and
reference tokens ``r_j``, the caption's special tokens included among the candidates, and the
reference's special tokens given weight 0 (as ``bert_score`` does for [CLS]/[SEP]); ``w_j = 1``
without IDF, or ``idf(t) = log((M + 1) / (df(t) + 1))`` over the ``M`` references of the batch with
``idf=True`` (``bert_score``'s ``idf=True`` with the references as the IDF corpus). Padding is
excluded from the maximum (``bert_score`` zeroes it instead, which only matters when every
similarity of a token is negative). ``scale`` multiplies the result (the LOOP paper's values near
20 suggest an unspecified scaling).
"""

from __future__ import annotations

import math
from collections import Counter
from typing import Any, Mapping, Sequence

import torch

from loopdiff.rewards.base import RewardError, register_reward
from loopdiff.rewards.hf_models import HuggingFaceScorer, check_images, concat, weights_check

DEFAULT_CAPTIONER = "Salesforce/blip-image-captioning-large"
DEFAULT_SCORER = "microsoft/deberta-xlarge-mnli"
# bert_score's default layers for a few encoders; other models use their last layer unless layer= is given.
DEFAULT_LAYERS = {
    "microsoft/deberta-xlarge-mnli": 40,
    "roberta-large": 17,
    "bert-base-uncased": 9,
    "distilbert-base-uncased": 5,
}
REFERENCE_TEMPLATE = "The image contains {}"


def greedy_recall(
    candidate: torch.Tensor,
    candidate_mask: torch.Tensor,
    reference: torch.Tensor,
    reference_weights: torch.Tensor,
) -> torch.Tensor:
    """BERTScore recall per pair from padded embeddings.

    ``candidate`` ``(B, Lc, D)`` with ``candidate_mask`` ``(B, Lc)`` (1 = real token); ``reference``
    ``(B, Lr, D)`` with ``reference_weights`` ``(B, Lr)`` (0 for padding and special tokens).
    """
    candidate = candidate / candidate.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    reference = reference / reference.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    similarity = torch.bmm(reference, candidate.transpose(1, 2))  # (B, Lr, Lc)
    similarity = similarity.masked_fill(~candidate_mask.bool()[:, None, :], float("-inf"))
    best = similarity.max(dim=-1).values  # each reference token's best candidate token
    best = torch.where(reference_weights > 0, best, torch.zeros_like(best))
    return (best * reference_weights).sum(-1) / reference_weights.sum(-1).clamp_min(1e-12)


def idf_weights(token_ids: Sequence[Sequence[int]]) -> dict[int, float]:
    """``log((M + 1) / (df + 1))`` per token over ``M`` tokenised references (document frequency)."""
    frequency = Counter(token for ids in token_ids for token in set(ids))
    total = len(token_ids)
    return {token: math.log((total + 1) / (count + 1)) for token, count in frequency.items()}


class BertScoreRecall(HuggingFaceScorer):
    """BERTScore recall of candidate sentences against reference sentences, over a transformers encoder."""

    def __init__(
        self,
        model: str = DEFAULT_SCORER,
        device: str | torch.device = "cpu",
        dtype: Any = torch.float32,
        layer: int | None = None,
        idf: bool = False,
        batch_size: int = 32,
        name: str = "alignment",
    ):
        from transformers import AutoModel

        super().__init__(AutoModel, model, device, dtype, batch_size, name)
        self.encoder = self.model
        layers = self.encoder.config.num_hidden_layers
        self.layer = layer if layer is not None else DEFAULT_LAYERS.get(str(model), layers)
        if not 0 <= self.layer <= layers:
            raise RewardError(f"reward '{name}': layer {self.layer} outside 0..{layers} of '{model}'")
        self.idf = idf

    def _tokenize(self, texts: Sequence[str]) -> dict[str, torch.Tensor]:
        return self.tokenizer(
            [t.strip() for t in texts],
            padding=True,
            truncation=True,
            return_special_tokens_mask=True,
            return_tensors="pt",
        )

    @torch.no_grad()
    def embed(self, tokens: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Hidden states of layer ``layer`` for tokenised texts ``(B, L, D)``."""
        inputs = {k: v.to(self.device) for k, v in tokens.items() if k in ("input_ids", "attention_mask", "token_type_ids")}
        output = self.encoder(**inputs, output_hidden_states=True)
        return output.hidden_states[self.layer].float().cpu()

    @staticmethod
    def _weights(tokens: Mapping[str, torch.Tensor], idf: Mapping[int, float] | None) -> torch.Tensor:
        """1 (or the token's IDF) for real tokens, 0 for padding and special tokens."""
        weights = (tokens["attention_mask"].bool() & ~tokens["special_tokens_mask"].bool()).float()
        if idf is not None:
            weights = weights * torch.tensor([[idf.get(int(t), 0.0) for t in row] for row in tokens["input_ids"]])
        return weights

    def __call__(self, candidates: Sequence[str], references: Sequence[str]) -> torch.Tensor:
        """Recall of each candidate against its reference (CPU float32)."""
        if len(candidates) != len(references):
            raise RewardError(f"reward '{self.name}': {len(candidates)} candidates but {len(references)} references")
        idf = None
        if self.idf:
            ids = self.tokenizer([r.strip() for r in references], add_special_tokens=False)["input_ids"]
            idf = idf_weights(ids)

        def recall(candidate_texts: Sequence[str], reference_texts: Sequence[str]) -> torch.Tensor:
            candidate_tokens, reference_tokens = self._tokenize(candidate_texts), self._tokenize(reference_texts)
            return greedy_recall(
                self.embed(candidate_tokens),
                candidate_tokens["attention_mask"],
                self.embed(reference_tokens),
                self._weights(reference_tokens, idf),
            )

        return concat(self.in_chunks(recall, candidates, references))


class BlipCaptioner(HuggingFaceScorer):
    """Greedy (or beam) captions from a transformers ``BlipForConditionalGeneration``."""

    def __init__(
        self,
        model: str = DEFAULT_CAPTIONER,
        device: str | torch.device = "cpu",
        dtype: Any = torch.float32,
        batch_size: int = 16,
        max_new_tokens: int = 30,
        num_beams: int = 1,
        prompt: str = "",
        name: str = "alignment",
    ):
        from transformers import BlipForConditionalGeneration

        super().__init__(BlipForConditionalGeneration, model, device, dtype, batch_size, name)
        self.max_new_tokens = max_new_tokens
        self.num_beams = num_beams
        self.prompt = prompt

    def __call__(self, images: torch.Tensor) -> list[str]:
        images = check_images(images, self.name)
        return [caption for part in self.in_chunks(self.captions, images) for caption in part]

    @torch.no_grad()
    def captions(self, images: torch.Tensor) -> list[str]:
        """The captions of one chunk of images."""
        pixels = self.model_pixels(images, mode="bicubic")
        kwargs: dict[str, Any] = {}
        if self.prompt:
            kwargs = dict(self.tokenizer([self.prompt] * pixels.shape[0], return_tensors="pt").to(self.device))
            kwargs.pop("token_type_ids", None)
        ids = self.model.generate(
            pixel_values=pixels,
            max_new_tokens=self.max_new_tokens,
            num_beams=self.num_beams,
            do_sample=False,
            **kwargs,
        )
        return [t.strip() for t in self.tokenizer.batch_decode(ids, skip_special_tokens=True)]


class AlignmentScore:
    """Callable reward: ``scale * BERTScore-recall(caption(image), "The image contains <prompt>")``."""

    def __init__(self, captioner: Any, scorer: Any, scale: float = 1.0, template: str = REFERENCE_TEMPLATE):
        self.captioner = captioner
        self.scorer = scorer
        self.scale = scale
        self.template = template
        self.last_captions: list[str] = []

    def __call__(
        self, images: torch.Tensor, prompts: Sequence[str], metadata: Sequence[Mapping[str, Any]]
    ) -> torch.Tensor:
        self.last_captions = self.captioner(images)
        references = [self.template.format(prompt) for prompt in prompts]
        return self.scale * self.scorer(self.last_captions, references)


def _check(options: Mapping[str, Any]) -> str | None:
    captioner = weights_check(DEFAULT_CAPTIONER, "captioner")(options)
    return captioner or weights_check(DEFAULT_SCORER, "scorer")(options)


@register_reward(
    "alignment",
    description="DDPO image-text alignment: BERTScore recall of a BLIP caption vs 'The image contains <prompt>'",
    needs=f"captioner= BlipForConditionalGeneration (default '{DEFAULT_CAPTIONER}'), "
    f"scorer= encoder (default '{DEFAULT_SCORER}')",
    extras=("transformers",),
    check=_check,
)
def alignment(
    captioner: str = DEFAULT_CAPTIONER,
    scorer: str = DEFAULT_SCORER,
    device: str = "cpu",
    dtype: Any = "float32",
    batch_size: int = 16,
    layer: int | None = None,
    idf: bool = False,
    max_new_tokens: int = 30,
    num_beams: int = 1,
    caption_prompt: str = "",
    scale: float = 1.0,
) -> AlignmentScore:
    return AlignmentScore(
        BlipCaptioner(captioner, device, dtype, batch_size, max_new_tokens, num_beams, caption_prompt),
        BertScoreRecall(scorer, device, dtype, layer, idf, batch_size),
        scale,
    )
