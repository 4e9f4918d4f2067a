"""A small CLIP tokenizer for the miniature world: every world word is one token.

The tokenizer is the real ``transformers.CLIPTokenizer`` (byte-level BPE with the ``</w>`` end-of-word
suffix) with a vocabulary learned from the world's words only. Words outside the world still tokenize:
they fall apart into characters, as rare words do in the real CLIP vocabulary.
"""

from __future__ import annotations

from typing import Iterable

from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import CLIPTokenizer

BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"
END_OF_WORD = "</w>"

# Words that glue world captions together; the world's own words are added by the caller.
FUNCTION_WORDS = (
    "a an the and with of on in at to is are there image picture photo "
    "left right top bottom above below under over next near beside side front behind "
    "one two three four five six seven eight nine ten zero no some many several pair "
    "small big large tiny medium shape shapes object objects thing things"
).split()


def _letters_alphabet() -> list[str]:
    """Every byte-level symbol, so no input character maps to the unknown token."""
    return sorted(pre_tokenizers.ByteLevel.alphabet())


def learn_vocab_and_merges(words: Iterable[str]) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Learn a CLIP-style BPE vocabulary in which each of ``words`` is a single token.

    Returns ``(vocab, merges)`` in the format ``CLIPTokenizer(vocab=..., merges=...)`` takes.
    """
    word_list = sorted({w.strip().lower() for w in words if w.strip()})
    bad = [w for w in word_list if not w.isalpha() or not w.isascii()]
    if bad:
        raise ValueError(f"tokenizer words must be ASCII letters only, got {bad[:5]}")
    alphabet = _letters_alphabet()
    trainer = trainers.BpeTrainer(
        vocab_size=100_000,  # large: training stops once every word is a single token
        min_frequency=1,
        special_tokens=[BOS_TOKEN, EOS_TOKEN],
        initial_alphabet=alphabet,
        end_of_word_suffix=END_OF_WORD,
        show_progress=False,
    )
    bpe = Tokenizer(models.BPE(end_of_word_suffix=END_OF_WORD, unk_token=EOS_TOKEN))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.train_from_iterator(word_list, trainer=trainer)
    vocab = bpe.get_vocab()
    # Characters at the end of a word must exist too (e.g. "x</w>"), so unknown words never hit <unk>.
    for char in alphabet:
        for token in (char, char + END_OF_WORD):
            if token not in vocab:
                vocab[token] = len(vocab)
    ordered = dict(sorted(vocab.items(), key=lambda item: item[1]))
    model = bpe.to_str()
    merges = _merges_from_serialized(model)
    return ordered, merges


def _merges_from_serialized(serialized: str) -> list[tuple[str, str]]:
    import json

    raw = json.loads(serialized)["model"]["merges"]
    return [tuple(m.split(" ", 1)) if isinstance(m, str) else (m[0], m[1]) for m in raw]


def build_tokenizer(words: Iterable[str], model_max_length: int) -> CLIPTokenizer:
    """A ``CLIPTokenizer`` whose vocabulary holds ``words`` (plus ``FUNCTION_WORDS``) as single tokens."""
    if model_max_length < 3:
        raise ValueError(f"model_max_length must be at least 3 (BOS, one word, EOS), got {model_max_length}")
    vocab, merges = learn_vocab_and_merges(list(words) + list(FUNCTION_WORDS))
    tokenizer = CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=model_max_length)
    return tokenizer


def words_missing_single_token(tokenizer: CLIPTokenizer, words: Iterable[str]) -> list[str]:
    """The words that the tokenizer splits into more than one token (empty when all are whole)."""
    missing = []
    for word in words:
        ids = tokenizer(word, add_special_tokens=False)["input_ids"]
        if len(ids) != 1:
            missing.append(word)
    return missing
