"""OCR reward (flow_grpo's OCR task): does the image show the prompt's quoted text?

The target is the text between quotes in the prompt (``a sign that says "hello world"`` ->
``hello world``; :func:`quoted_text`). An OCR model (PP-OCRv4 detection + recognition, ONNX, run
by ``rapidocr-onnxruntime``, whose wheel ships the models) reads the image; its lines with
confidence ``>= min_confidence`` are joined in reading order (top to bottom, left to right). Both
strings are normalised by :func:`normalize_text` (lower-cased, all whitespace removed) and

    reward = clip(1 - levenshtein(read, target) / max(len(target), 1), 0, 1)

so a correct rendering scores 1, a blank image 0. With ``substring_match=True`` a reading that
contains the target scores 1 whatever else it contains (flow_grpo's rule). See docs/rewards.md.
"""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch

from loopdiff.rewards.base import RewardError, register_reward
from loopdiff.rewards.hf_models import check_images

PACKAGE = "rapidocr_onnxruntime"
MODEL_FILES = ("models/ch_PP-OCRv4_det_infer.onnx", "models/ch_PP-OCRv4_rec_infer.onnx")

# Double quotes: straight or curly, any opener with any closer; the text holds no double quote.
_DOUBLE = re.compile(r"[\"\u201c]([^\"\u201c\u201d]*)[\"\u201d]")
# Single quotes, straight or curly: an opener not preceded by a letter or digit and a closer not
# followed by one, so apostrophes (dog's, kids', don't) are not taken for quotes.
_SINGLE = re.compile(r"(?<!\w)['\u2018](.+?)['\u2019](?!\w)")


def quoted_text(prompt: str) -> str | None:
    """The text between quotes in ``prompt``, or ``None`` if it quotes nothing.

    Double-quoted spans (``"..."``, ``\u201c...\u201d``) are used if there are any, else single-quoted
    ones (``'...'``, ``\u2018...\u2019``). Several spans are joined with a space, in order.
    """
    spans = _DOUBLE.findall(prompt)
    if not spans:
        spans = _SINGLE.findall(prompt)
    if not spans:
        return None
    return " ".join(spans)


def normalize_text(text: str) -> str:
    """Lower-case and remove all whitespace (OCR often drops or adds spaces between words)."""
    return "".join(text.lower().split())


def levenshtein(a: str, b: str) -> int:
    """Edit distance: the fewest single-character insertions, deletions and substitutions."""
    if len(a) < len(b):
        a, b = b, a
    previous = list(range(len(b) + 1))
    for i, char_a in enumerate(a, 1):
        current = [i]
        for j, char_b in enumerate(b, 1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (char_a != char_b)))
        previous = current
    return previous[-1]


def text_score(read: str, target: str, substring_match: bool = False) -> float:
    """``clip(1 - levenshtein / max(len(target), 1), 0, 1)`` of the normalised strings."""
    read, target = normalize_text(read), normalize_text(target)
    if substring_match and target in read:
        return 1.0
    return min(max(1.0 - levenshtein(read, target) / max(len(target), 1), 0.0), 1.0)


def _package_dir() -> Path | None:
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def _models_check(options: Mapping[str, Any]) -> str | None:
    folder = _package_dir()
    if folder is None:
        return f"python package '{PACKAGE}' is not installed"
    for name in MODEL_FILES:
        if not (folder / name).is_file():
            return f"'{PACKAGE}' has no model file {name}"
    return None


def to_bgr_uint8(images: torch.Tensor) -> list[np.ndarray]:
    """``(N, 3, H, W)`` in [0, 1] -> N contiguous ``(H, W, 3)`` uint8 BGR arrays (what RapidOCR takes)."""
    array = (images.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    return [np.ascontiguousarray(image[:, :, ::-1]) for image in array]


class OcrReward:
    """Callable reward: ``1 - normalised edit distance`` between the prompt's quoted text and the OCR reading.

    The OCR engine is built once, here. ``last_texts`` holds the last batch's readings (before
    normalisation) and ``last_targets`` their targets.
    """

    def __init__(
        self,
        min_confidence: float = 0.5,
        substring_match: bool = False,
        use_cls: bool = False,
        threads: int | None = None,
        det_limit_side_len: int = 736,
    ):
        if not 0.0 <= min_confidence <= 1.0:
            raise RewardError(f"reward 'ocr': min_confidence must be in [0, 1]; got {min_confidence}")
        reason = _models_check({})
        if reason is not None:
            raise RewardError(f"reward 'ocr' cannot run here: {reason} (pip install 'loopdiff[ocr]')")
        try:
            from rapidocr_onnxruntime import RapidOCR
        except ImportError as error:
            raise RewardError(f"reward 'ocr': cannot import {PACKAGE}: {error}") from error
        self.min_confidence = float(min_confidence)
        self.substring_match = bool(substring_match)
        self.use_cls = bool(use_cls)
        threads = torch.get_num_threads() if threads is None else int(threads)
        self.engine = RapidOCR(
            text_score=0.0,  # confidences are filtered here, by min_confidence
            use_cls=self.use_cls,
            intra_op_num_threads=threads,
            inter_op_num_threads=1,
            det_limit_side_len=det_limit_side_len,
        )
        self.last_texts: list[str] = []
        self.last_targets: list[str] = []

    def read(self, image: np.ndarray) -> str:
        """The text read in one ``(H, W, 3)`` uint8 BGR image: confident lines in reading order, space-joined."""
        lines, _ = self.engine(image)
        return " ".join(str(text) for _, text, confidence in lines or [] if float(confidence) >= self.min_confidence)

    def read_images(self, images: torch.Tensor) -> list[str]:
        """Readings of a ``(N, 3, H, W)`` batch in [0, 1]."""
        return [self.read(image) for image in to_bgr_uint8(check_images(images, "ocr"))]

    def __call__(
        self, images: torch.Tensor, prompts: Sequence[str], metadata: Sequence[Mapping[str, Any]]
    ) -> torch.Tensor:
        images = check_images(images, "ocr")
        if len(prompts) != images.shape[0]:
            raise RewardError(f"reward 'ocr': {images.shape[0]} images but {len(prompts)} prompts")
        targets = []
        for prompt in prompts:
            target = quoted_text(prompt)
            if target is None:
                raise RewardError(
                    f"reward 'ocr': prompt {prompt!r} has no quoted text to read "
                    "(expected e.g. a sign that says \"hello\")"
                )
            targets.append(target)
        texts = self.read_images(images)
        self.last_texts, self.last_targets = texts, targets
        scores = [text_score(text, target, self.substring_match) for text, target in zip(texts, targets)]
        return torch.tensor(scores, dtype=torch.float32)


@register_reward(
    "ocr",
    description="1 - normalised edit distance between the prompt's quoted text and its OCR reading (flow_grpo OCR)",
    needs="PP-OCRv4 ONNX models (shipped in the rapidocr-onnxruntime wheel; pip install 'loopdiff[ocr]')",
    extras=(PACKAGE,),
    check=_models_check,
)
def ocr(
    min_confidence: float = 0.5,
    substring_match: bool = False,
    use_cls: bool = False,
    threads: int | None = None,
    det_limit_side_len: int = 736,
) -> OcrReward:
    return OcrReward(min_confidence, substring_match, use_cls, threads, det_limit_side_len)
