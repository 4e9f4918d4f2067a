"""Noun phrases of a T2I-CompBench prompt, offline and without a language model.

T2I-CompBench's BLIP-VQA score asks one question per noun phrase of the prompt; the benchmark takes
the phrases from spaCy's ``en_core_web_sm`` noun chunks. :func:`split_noun_phrases` gets the same
phrases for the benchmark's prompt shapes with rules over closed word classes (determiners,
conjunctions, prepositions, auxiliaries, pronouns) and a small lexicon of verbs, so it needs no
download. ``split_noun_phrases(prompt, backend="spacy")`` uses spaCy's noun chunks instead when spaCy
and an English pipeline are installed.

Differences from spaCy's chunks, by design: pronouns ("he", "it") are not phrases (a question
"he?" tests nothing), and, as in T2I-CompBench, bare position words ("the left", "the top") are dropped.

>>> split_noun_phrases("a green bench and a red car")
['a green bench', 'a red car']
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache

DETERMINERS = frozenset(
    "a an the this that these those his her its their my your our some each every another any "
    "no several many few both".split()
)
NUMBER_WORDS = frozenset(
    "one two three four five six seven eight nine ten eleven twelve".split()
)
PREPOSITIONS = frozenset(
    "on in of with at near next to from by under over above below behind beside besides between "
    "into onto inside outside through across against along around atop beneath underneath for "
    "upon within without toward towards among amongst beyond like via about after before during "
    "off out up down than per".split()
)
CONJUNCTIONS = frozenset(
    "and or but nor while whereas as because so then that which who whom whose where when if "
    "although though yet".split()
)
PRONOUNS = frozenset(
    "i you he she it we they me him them us itself himself herself themselves itself "
    "someone something everyone everything anyone anything nobody nothing one's".split()
)
AUXILIARIES = frozenset(
    "is are was were be been being am has have had does do did can could will would should may "
    "might must shall not there here".split()
)
ADVERBS = frozenset(
    "very also just only really too together each other here there nearby away back still even upside "
    "quite rather almost all beautifully brightly gently softly neatly perfectly".split()
)
# Verbs that appear in compositional prompts; their inflected forms (-s, -es, -ed, -ing) are derived.
# Verbs whose -s form is a common plural noun (watch, cover, drink, ...) are left out on purpose.
VERBS = frozenset(
    "sit stand lie lay hang hold rest wear ride look eat walk run fly swim jump sleep shine "
    "scribble warm place park contrast complement reflect fill decorate adorn surround lean perch "
    "float grow carry pull push read write make add give create keep chase blend glisten sparkle "
    "stretch wrap protect stay feature contain show serve support accompany provide attach wait "
    "enjoy admire sip pour hug illuminate brighten tie peek gaze stare smile laugh talk perform "
    "throw kick graze roam climb crawl hide nestle bask dangle drape spill hover glide soar wander "
    "stroll dance sing cook bake drive steer hop prance mix open close circle welcome organize "
    "dominate complete cast catch".split()
)
IRREGULAR_PAST = frozenset(
    "sat stood lay hung held wore rode ate drank flew ran swam slept lit made gave kept caught "
    "brought bought sought threw hid grew drove sang".split()
)
# Verbs of posture whose base form is a verb before a preposition ("the bowl and cup sit on").
POSTURE_VERBS = frozenset("sit lie lean perch hover dangle sleep".split())
# Words ending in -ing that are nouns, not verbs.
ING_NOUNS = frozenset(
    "ring earring building painting ceiling clothing king wedding string swing wing spring thing "
    "morning evening pudding icing frosting railing siding awning bedding ping dumpling sibling "
    "stuffing topping filling lighting setting living dining sitting opening ending offering "
    "landing ceiling wrapping sling sapling seedling duckling darling herring shilling lining "
    "shirting sing fling sting".split()
)
# Modifiers that may be coordinated inside one phrase ("a black and white cat").
COORDINABLE_MODIFIERS = frozenset(
    "red orange yellow green blue purple pink brown black white gray grey silver gold golden tan "
    "beige violet teal bright dark light pale big small large tiny tall short long old new".split()
)
# T2I-CompBench drops these chunks ("top", "the side", "the left", "the right").
POSITION_WORDS = frozenset("top side left right front back middle center centre bottom".split())

_FUNCTION_WORDS = (
    DETERMINERS | NUMBER_WORDS | PREPOSITIONS | CONJUNCTIONS | PRONOUNS | AUXILIARIES | ADVERBS
)
_WORD = re.compile(r"[A-Za-z0-9][A-Za-z0-9'\-:]*")
_HARD_BREAK = re.compile(r"[,.;!?()\"]")


@dataclass(frozen=True)
class _Token:
    text: str
    lower: str
    start: int
    end: int


def _verb_stems(word: str) -> list[str]:
    """Candidate base forms of an inflected verb (``sits`` -> ``sit``, ``parked`` -> ``park``)."""
    stems = []
    for suffix in ("ing", "ed", "es", "s"):
        if word.endswith(suffix) and len(word) > len(suffix) + 1:
            stem = word[: -len(suffix)]
            stems += [stem, stem + "e"]
            if len(stem) > 2 and stem[-1] == stem[-2]:
                stems.append(stem[:-1])  # sitting -> sit
    return stems


def _is_inflected_verb(word: str) -> bool:
    return word in IRREGULAR_PAST or any(stem in VERBS for stem in _verb_stems(word))


def _is_function_word(word: str | None) -> bool:
    return word is not None and word in _FUNCTION_WORDS


def _is_number(word: str | None) -> bool:
    return word is not None and (word in NUMBER_WORDS or word[0].isdigit())


def _is_boundary(tokens: list[_Token], i: int, after_break: bool) -> bool:
    """Whether token ``i`` cannot be inside a noun phrase (it ends the current one)."""
    word = tokens[i].lower
    previous = tokens[i - 1].lower if i > 0 else None
    following = tokens[i + 1].lower if i + 1 < len(tokens) else None
    noun_can = following is None or following in CONJUNCTIONS or following in PREPOSITIONS
    if word == "can" and _can_continue(previous) and noun_can:
        return False  # "a soda can", "a watering can on the shelf"
    if _is_function_word(word) and word not in DETERMINERS and word not in NUMBER_WORDS:
        return True
    if previous in DETERMINERS or _is_number(previous):
        return False  # "a sleeping cat", "the ride", "two drinks"
    return _looks_like_verb(tokens, i, after_break)


def _looks_like_verb(tokens: list[_Token], i: int, after_break: bool) -> bool:
    """Whether content word ``i`` is a verb, judged from its form, the lexicon and its neighbours."""
    word = tokens[i].lower
    previous = tokens[i - 1].lower if i > 0 else None
    following = tokens[i + 1].lower if i + 1 < len(tokens) else None
    after_content = previous is not None and not _is_function_word(previous)
    counted = any(_is_number(tokens[k].lower) for k in range(max(0, i - 3), i))
    if counted and word.endswith("s") and not word.endswith("ss"):
        return False  # the noun of a counted phrase: "three green circles", "four dotted stars"
    if previous in AUXILIARIES and (_is_inflected_verb(word) or _looks_past_participle(word)):
        return True  # "is parked", "were placed"
    if previous == "to" and word in VERBS:
        return True  # "a place to rest"
    if word.endswith("ing") and word not in ING_NOUNS:
        # "is wearing", "for serving", "a man wearing a hat", ", casting shadows"
        clause_start = (previous is None and after_break) or _is_function_word(previous)
        return clause_start or not _can_continue(following)
    if following in DETERMINERS and _content_words_before(tokens, i) >= 2:
        return True  # an unknown verb between two phrases: "the plastic tongs mix the greens"
    ends_clause = following is None or _is_number(following) or (
        _is_function_word(following) and following not in DETERMINERS
    )
    past_after_conjunction = previous in CONJUNCTIONS and (word.endswith("ed") or word in IRREGULAR_PAST)
    if (after_content or past_after_conjunction) and _is_inflected_verb(word):
        # "sits on", "chases a", "looked elegant"
        return ends_clause or following in DETERMINERS or word.endswith("ed") or word in IRREGULAR_PAST
    plural_subject = after_content and previous.endswith("s") and word in VERBS
    if (after_content and word in POSTURE_VERBS) or plural_subject:
        return following in PREPOSITIONS or following in ADVERBS  # "the clouds float above"
    if (after_content or previous in CONJUNCTIONS) and _looks_past_participle(word):
        # "were placed in", "kept the books organized", "one truck cluttered the garage", "and played"
        return ends_clause or following in DETERMINERS
    return False


def _content_words_before(tokens: list[_Token], i: int) -> int:
    """How many content words directly precede token ``i`` (back to the last function word)."""
    count = 0
    while i - count - 1 >= 0 and not _is_function_word(tokens[i - count - 1].lower):
        count += 1
    return count


def _looks_past_participle(word: str) -> bool:
    return len(word) > 4 and word.endswith("ed") and word[-3] != "e"


def _can_continue(token: str | None) -> bool:
    """Whether ``token`` exists and could continue a noun phrase (a content word)."""
    return token is not None and not _is_function_word(token)


def _sentence_pieces(prompt: str) -> list[list[_Token]]:
    """Tokens of the prompt, cut at punctuation."""
    pieces: list[list[_Token]] = [[]]
    position = 0
    for match in _WORD.finditer(prompt):
        if _HARD_BREAK.search(prompt[position : match.start()]):
            pieces.append([])
        text = match.group(0).rstrip(":")
        pieces[-1].append(_Token(text, text.lower(), match.start(), match.start() + len(text)))
        position = match.end()
    return [piece for piece in pieces if piece]


def _chunks(tokens: list[_Token], after_break: bool) -> list[tuple[int, int]]:
    """Token index ranges ``[i, j)`` of the noun phrases in one punctuation-free piece."""
    chunks: list[tuple[int, int]] = []
    start: int | None = None
    for i, token in enumerate(tokens):
        if _is_boundary(tokens, i, after_break):
            if start is not None:
                chunks.append((start, i))
                start = None
            continue
        opens_new = token.lower in DETERMINERS or token.lower in NUMBER_WORDS
        if opens_new and start is not None and tokens[i - 1].lower not in DETERMINERS:
            chunks.append((start, i))  # "the man a hat" style run-ons: a determiner opens a phrase
            start = None
        if start is None:
            start = i
    if start is not None:
        chunks.append((start, len(tokens)))
    return _merge_coordinated_modifiers(tokens, chunks)


def _merge_coordinated_modifiers(
    tokens: list[_Token], chunks: list[tuple[int, int]]
) -> list[tuple[int, int]]:
    """Join "a black" + "white cat" across "and" into "a black and white cat"."""
    merged: list[tuple[int, int]] = []
    for chunk in chunks:
        if merged:
            first_start, first_end = merged[-1]
            joined_by_and = chunk[0] == first_end + 1 and tokens[first_end].lower == "and"
            modifier_only = (
                tokens[first_end - 1].lower in COORDINABLE_MODIFIERS
                and first_end - first_start <= 2
                and (first_end - first_start == 1 or tokens[first_start].lower in DETERMINERS)
            )
            no_determiner = tokens[chunk[0]].lower not in DETERMINERS | NUMBER_WORDS
            if joined_by_and and modifier_only and no_determiner:
                merged[-1] = (first_start, chunk[1])
                continue
        merged.append(chunk)
    return merged


def _is_position_only(tokens: list[_Token]) -> bool:
    words = [t.lower for t in tokens if t.lower not in DETERMINERS]
    return len(words) == 1 and words[0] in POSITION_WORDS


def _rule_based(prompt: str) -> list[str]:
    phrases: list[str] = []
    for index, piece in enumerate(_sentence_pieces(prompt)):
        for i, j in _chunks(piece, after_break=index > 0):
            content = [t for t in piece[i:j] if t.lower not in DETERMINERS]
            if not content or _is_position_only(piece[i:j]):
                continue
            phrases.append(prompt[piece[i].start : piece[j - 1].end])
    return phrases


@lru_cache(maxsize=1)
def _spacy_pipeline(name: str):  # pragma: no cover - optional extra
    import spacy

    return spacy.load(name)


def _spacy(prompt: str, model: str) -> list[str]:  # pragma: no cover - optional extra
    try:
        nlp = _spacy_pipeline(model)
    except (ImportError, OSError) as error:
        raise ValueError(
            f"noun-phrase backend 'spacy' needs spaCy and the pipeline '{model}' installed: {error}"
        ) from error
    excluded = {"top", "the side", "the left", "the right"}  # as in T2I-CompBench
    return [chunk.text for chunk in nlp(prompt).noun_chunks if chunk.text not in excluded]


def split_noun_phrases(prompt: str, backend: str = "rules", spacy_model: str = "en_core_web_sm") -> list[str]:
    """The noun phrases of ``prompt``, in order, each a substring of it.

    ``backend="rules"`` (default) needs nothing installed; ``backend="spacy"`` uses spaCy's noun
    chunks (T2I-CompBench's choice) and needs spaCy plus ``spacy_model``. A prompt with no phrase
    found by the rules gives ``[prompt.strip()]`` so that every prompt gets at least one question.
    """
    if backend == "spacy":
        return _spacy(prompt, spacy_model)
    if backend != "rules":
        raise ValueError(f"unknown noun-phrase backend {backend!r}; expected 'rules' or 'spacy'")
    phrases = _rule_based(prompt)
    if not phrases and prompt.strip():
        return [prompt.strip()]
    return phrases
