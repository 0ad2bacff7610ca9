"""A toy language pair that needs attention to translate, with gold word alignments.

The source language reads like English: ``[time] subject verb [object] [adverb]``, where a
noun phrase is ``determiner adjective* noun [preposition noun-phrase]``. The target language
has its own words and differs in three ways a word-by-word lookup cannot handle:

* **Reordering.** The verb goes to the end (subject-object-verb), adjectives follow their
  noun in reverse order, the determiner closes its noun phrase and prepositions become
  postpositions (``with the dog`` → ``baku ka sim``).
* **Agreement.** Each target noun has a class (A or B). Adjectives and determiners take the
  class of their noun, and the verb is followed by a marker that agrees with the class and
  number of the *subject*, which may be many words back.
* **A marker decided far away.** A sentence-initial time word (``yesterday``, ``tomorrow``,
  ``now``) is not translated as a word: it becomes a tense marker after the verb, at the
  other end of the sentence.

Every target word is aligned to one source word: the word it translates, or for a marker the
source word that decides it (the subject noun for agreement, the time word for tense).
Generation is deterministic given the seed; :func:`toy_splits` returns train, validation and
test splits that share no sentence.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

__all__ = ["Pair", "generate_pairs", "toy_splits"]

# source singular, source plural, target singular, target plural, target class
NOUNS = [
    ("dog", "dogs", "baku", "bakui", "A"), ("cat", "cats", "miro", "miroi", "B"),
    ("bird", "birds", "tupi", "tupis", "A"), ("horse", "horses", "gelan", "gelani", "B"),
    ("child", "children", "nesu", "nesum", "A"), ("teacher", "teachers", "dorak", "doraki", "B"),
    ("farmer", "farmers", "pulo", "pulos", "A"), ("king", "kings", "ravi", "ravim", "B"),
    ("queen", "queens", "soli", "solis", "A"), ("girl", "girls", "kemi", "kemis", "B"),
    ("boy", "boys", "taro", "taroi", "A"), ("friend", "friends", "wenu", "wenui", "B"),
    ("wolf", "wolves", "fasko", "faskoi", "A"), ("sailor", "sailors", "marun", "maruni", "B"),
    ("baker", "bakers", "lipa", "lipas", "A"), ("doctor", "doctors", "hekto", "hektos", "B"),
]
ADJECTIVES = [  # source, target stem (+ "a" for class A, "o" for class B)
    ("big", "grand"), ("small", "pit"), ("red", "rub"), ("old", "vek"), ("young", "nov"),
    ("happy", "fel"), ("quiet", "tac"), ("green", "vird"), ("angry", "ir"), ("clever", "sag"),
]
TRANSITIVE = [  # source singular, source plural, target
    ("sees", "see", "vidu"), ("likes", "like", "amo"), ("follows", "follow", "sekwe"),
    ("helps", "help", "jutu"), ("finds", "find", "trovi"), ("calls", "call", "voko"),
    ("watches", "watch", "rigar"), ("knows", "know", "sabi"),
]
INTRANSITIVE = [
    ("sleeps", "sleep", "dormi"), ("runs", "run", "kuri"), ("sings", "sing", "kanta"),
    ("waits", "wait", "atendo"), ("laughs", "laugh", "ridu"),
]
PREPOSITIONS = [("with", "sim"), ("near", "pres"), ("behind", "dor"), ("under", "sub")]
ADVERBS = [("today", "hodie"), ("quickly", "rapi"), ("again", "dene"), ("often", "ofte")]
TIMES = [("yesterday", "pa"), ("tomorrow", "su"), ("now", "ne")]
# determiners by meaning: source singular, source plural, then target by (class, number)
DETERMINERS = {
    "definite": ("the", "the", {("A", "sg"): "ka", ("A", "pl"): "kai", ("B", "sg"): "ko",
                                ("B", "pl"): "koi"}),
    "indefinite": ("a", "some", {("A", "sg"): "un", ("A", "pl"): "uni", ("B", "sg"): "on",
                                 ("B", "pl"): "oni"}),
    "demonstrative": ("this", "these", {("A", "sg"): "ta", ("A", "pl"): "tai",
                                        ("B", "sg"): "to", ("B", "pl"): "toi"}),
}
AGREEMENT = {("A", "sg"): "-e", ("A", "pl"): "-en", ("B", "sg"): "-o", ("B", "pl"): "-on"}


@dataclass(frozen=True)
class Pair:
    """One sentence pair. For the toy language, also the gold alignment: for each target
    word (split on spaces), the index of its source word; ``None`` where unknown."""

    source: str
    target: str
    alignment: tuple[int, ...] | None = None


class _Builder:
    """Accumulates source words and target words (with their source index) side by side."""

    def __init__(self) -> None:
        self.source: list[str] = []

    def add(self, word: str) -> int:
        self.source.append(word)
        return len(self.source) - 1


def _noun_phrase(rng: random.Random, b: _Builder, depth: int) -> tuple[list, str, str, int]:
    """Emit a source noun phrase; return its target words as (word, source index) pairs,
    the noun's class and number, and the noun's source index."""
    meaning = rng.choice(list(DETERMINERS))
    number = rng.choice(("sg", "pl"))
    singular, plural, det_target = DETERMINERS[meaning]
    det_index = b.add(singular if number == "sg" else plural)
    adjectives = rng.sample(ADJECTIVES, k=rng.choice((0, 0, 1, 1, 2)))
    adj_indices = [b.add(source) for source, _ in adjectives]
    noun = rng.choice(NOUNS)
    noun_class = noun[4]
    noun_index = b.add(noun[0] if number == "sg" else noun[1])
    target = [(noun[2] if number == "sg" else noun[3], noun_index)]
    suffix = "a" if noun_class == "A" else "o"
    for (_, stem), index in reversed(list(zip(adjectives, adj_indices, strict=True))):
        target.append((stem + suffix, index))
    target.append((det_target[noun_class, number], det_index))
    if depth < 1 and rng.random() < 0.3:
        prep_source, prep_target = rng.choice(PREPOSITIONS)
        prep_index = b.add(prep_source)
        inner, _, _, _ = _noun_phrase(rng, b, depth + 1)
        target += inner + [(prep_target, prep_index)]
    return target, noun_class, number, noun_index


def _sentence(rng: random.Random) -> Pair:
    b = _Builder()
    time = rng.choice(TIMES) if rng.random() < 0.5 else None
    time_index = b.add(time[0]) if time else None
    subject, subject_class, number, subject_index = _noun_phrase(rng, b, 0)
    transitive = rng.random() < 0.7
    verb = rng.choice(TRANSITIVE if transitive else INTRANSITIVE)
    verb_index = b.add(verb[0] if number == "sg" else verb[1])
    obj = _noun_phrase(rng, b, 0)[0] if transitive else []
    target = subject + obj + [(verb[2], verb_index),
                              (AGREEMENT[subject_class, number], subject_index)]
    if time is not None:
        target.append(("-" + time[1], time_index))
    if rng.random() < 0.3:
        source, translated = rng.choice(ADVERBS)
        target.append((translated, b.add(source)))
    words, alignment = zip(*target, strict=True)
    return Pair(" ".join(b.source), " ".join(words), tuple(alignment))


def generate_pairs(n: int, seed: int, min_len: int = 3, max_len: int = 20) -> list[Pair]:
    """``n`` distinct pairs whose source and target lengths lie in ``[min_len, max_len]``."""
    rng = random.Random(seed)
    pairs: dict[str, Pair] = {}
    attempts = 0
    while len(pairs) < n:
        attempts += 1
        if attempts > 50 * n + 1000:
            raise ValueError(f"n: could not generate {n} distinct sentences of {min_len} to "
                             f"{max_len} words (got {len(pairs)})")
        pair = _sentence(rng)
        lengths = (len(pair.source.split()), len(pair.target.split()))
        if min_len <= min(lengths) and max(lengths) <= max_len:
            pairs.setdefault(pair.source, pair)
    return list(pairs.values())


def toy_splits(n_train: int, n_val: int, n_test: int, seed: int) -> dict[str, list[Pair]]:
    """Disjoint ``train``/``val``/``test`` splits: distinct sentences, dealt out in order."""
    pairs = generate_pairs(n_train + n_val + n_test, seed)
    return {"train": pairs[:n_train], "val": pairs[n_train:n_train + n_val],
            "test": pairs[n_train + n_val:]}
