"""A small CLIP tokenizer for the miniature world: every world word is one token.

The tokenizer is the real ``transformers.CLIPTokenizer`` (byte-level BPE with the ``</w>`` end-of-word
suffix) with a vocabulary learned from the world's words only. Words outside the world still tokenize:
they fall apart into characters, as rare words do in the real CLIP vocabulary.
"""

from __future__ import annotations

from typing import Iterable

from tokenizers import pre_tokenizers
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

    Plain byte-pair encoding over the distinct words, each counted once: repeatedly merge the most
    frequent adjacent pair (ties broken by the pair's spelling, so the result is the same in every
    process) until every word is one symbol. The last symbol of a word carries ``</w>``, as in CLIP.

    Returns ``(vocab, merges)`` in the format ``CLIPTokenizer(vocab=..., merges=...)`` takes.
    """
    word_list = sorted({w.strip().lower() for w in words if w.strip()})
    bad = [w for w in word_list if not w.isalpha() or not w.isascii()]
    if bad:
        raise ValueError(f"tokenizer words must be ASCII letters only, got {bad[:5]}")
    alphabet = _letters_alphabet()
    # Every byte-level symbol exists alone and word-final, so unknown words never hit the unknown token.
    tokens = [BOS_TOKEN, EOS_TOKEN] + alphabet + [char + END_OF_WORD for char in alphabet]
    symbols = [list(word[:-1]) + [word[-1] + END_OF_WORD] for word in word_list]
    merges: list[tuple[str, str]] = []
    while True:
        counts: dict[tuple[str, str], int] = {}
        for seq in symbols:
            for pair in zip(seq, seq[1:]):
                counts[pair] = counts.get(pair, 0) + 1
        if not counts:
            break
        best = min(counts, key=lambda pair: (-counts[pair], pair))
        merges.append(best)
        tokens.append(best[0] + best[1])
        symbols = [_merge_pair(seq, best) for seq in symbols]
    vocab: dict[str, int] = {}
    for token in tokens:
        vocab.setdefault(token, len(vocab))
    return vocab, merges


def _merge_pair(seq: list[str], pair: tuple[str, str]) -> list[str]:
    """``seq`` with every non-overlapping occurrence of ``pair`` (left to right) joined into one symbol."""
    out: list[str] = []
    i = 0
    while i < len(seq):
        if i + 1 < len(seq) and (seq[i], seq[i + 1]) == pair:
            out.append(seq[i] + seq[i + 1])
            i += 2
        else:
            out.append(seq[i])
            i += 1
    return out


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
