"""The toy language pair: reproducible, disjoint splits, and the grammar a model must learn.

The grammar tests check the properties the toy pair exists for (see
attention/translation/data/toy.py):
agreement and tense markers aligned to the source word that decides them, and the verb moved
after its object. The lexicon comes from the module; what each marker means is written here.
"""

from __future__ import annotations

import pytest

from attention.translation.data.toy import (
    ADVERBS,
    INTRANSITIVE,
    NOUNS,
    TRANSITIVE,
    Pair,
    generate_pairs,
    toy_splits,
)

# what the markers mean, independently of the module's tables
AGREEMENT = {"-e": ("A", "sg"), "-en": ("A", "pl"), "-o": ("B", "sg"), "-on": ("B", "pl")}
TENSE = {"yesterday": "-pa", "tomorrow": "-su", "now": "-ne"}

NOUN_CLASS = {}  # source noun form -> (class, number)
NOUN_TRANSLATION = {}  # target noun form -> source noun form
for sg, pl, tgt_sg, tgt_pl, noun_class in NOUNS:
    NOUN_CLASS[sg], NOUN_CLASS[pl] = (noun_class, "sg"), (noun_class, "pl")
    NOUN_TRANSLATION[tgt_sg], NOUN_TRANSLATION[tgt_pl] = sg, pl
VERB_TRANSLATION = {tgt: {sg, pl} for sg, pl, tgt in TRANSITIVE + INTRANSITIVE}
SOURCE_VERBS = {form for forms in VERB_TRANSLATION.values() for form in forms}
TRANSITIVE_VERBS = {form for sg, pl, _ in TRANSITIVE for form in (sg, pl)}
SOURCE_ADVERBS = {source for source, _ in ADVERBS}


@pytest.fixture(scope="module")
def pairs() -> list[Pair]:
    return generate_pairs(600, seed=7)


def test_same_seed_same_pairs_different_seed_different():
    first, again, other = generate_pairs(50, seed=3), generate_pairs(50, seed=3), \
        generate_pairs(50, seed=4)
    assert first == again
    assert first != other
    assert toy_splits(30, 5, 5, seed=3) == toy_splits(30, 5, 5, seed=3)


def test_sizes_exact_and_sources_distinct():
    pairs = generate_pairs(257, seed=1)
    assert len(pairs) == 257
    assert len({p.source for p in pairs}) == 257
    splits = toy_splits(300, 40, 70, seed=2)
    assert list(splits) == ["train", "val", "test"]
    assert [len(splits[s]) for s in ("train", "val", "test")] == [300, 40, 70]


def test_splits_share_no_source_and_no_target_sentence():
    splits = toy_splits(2000, 200, 300, seed=5)
    for side in ("source", "target"):
        sentences = {name: {getattr(p, side) for p in split} for name, split in splits.items()}
        assert sentences["train"].isdisjoint(sentences["val"]), side
        assert sentences["train"].isdisjoint(sentences["test"]), side
        assert sentences["val"].isdisjoint(sentences["test"]), side
        # no duplicate inside a split either: a target shared within train would be a
        # duplicate training example
        assert sum(len(s) for s in sentences.values()) == 2500, side


def test_every_sentence_has_3_to_20_words(pairs):
    for p in pairs:
        assert 3 <= len(p.source.split()) <= 20, p
        assert 3 <= len(p.target.split()) <= 20, p
    # the generator's bounds are honoured when narrowed too
    for p in generate_pairs(100, seed=1, min_len=5, max_len=7):
        assert 5 <= len(p.source.split()) <= 7 and 5 <= len(p.target.split()) <= 7, p


def test_impossible_length_bounds_raise():
    with pytest.raises(ValueError, match="could not generate"):
        generate_pairs(5, seed=0, min_len=30, max_len=40)


def test_alignment_covers_target_and_points_at_the_translated_word(pairs):
    for p in pairs:
        source, target = p.source.split(), p.target.split()
        assert p.alignment is not None and len(p.alignment) == len(target), p
        assert all(0 <= i < len(source) for i in p.alignment), p
        for word, i in zip(target, p.alignment, strict=True):
            if word in NOUN_TRANSLATION:
                assert source[i] == NOUN_TRANSLATION[word], (p, word)
            if word in VERB_TRANSLATION:
                assert source[i] in VERB_TRANSLATION[word], (p, word)


def test_agreement_marker_follows_verb_and_is_aligned_to_the_subject_noun(pairs):
    for p in pairs:
        source, target = p.source.split(), p.target.split()
        markers = [i for i, word in enumerate(target) if word in AGREEMENT]
        assert len(markers) == 1, p
        (m,) = markers
        assert target[m - 1] in VERB_TRANSLATION, p
        subject = p.alignment[m]
        first_noun = next(i for i, word in enumerate(source) if word in NOUN_CLASS)
        assert subject == first_noun, p
        assert NOUN_CLASS[source[subject]] == AGREEMENT[target[m]], p


def test_tense_marker_is_aligned_to_the_leading_time_word(pairs):
    with_time = 0
    for p in pairs:
        source, target = p.source.split(), p.target.split()
        markers = [i for i, word in enumerate(target) if word in TENSE.values()]
        if source[0] in TENSE:
            with_time += 1
            assert len(markers) == 1, p
            (m,) = markers
            assert target[m] == TENSE[source[0]], p
            assert p.alignment[m] == 0, p
            # the time word becomes only the marker: nothing else translates it
            assert p.alignment.count(0) == 1, p
        else:
            assert markers == [], p
            assert not any(word in TENSE for word in source), p
    assert 0.3 * len(pairs) < with_time < 0.7 * len(pairs)  # about half the sentences


def test_verb_comes_after_its_object(pairs):
    with_object = 0
    for p in pairs:
        source = p.source.split()
        verb = next(i for i, word in enumerate(source) if word in SOURCE_VERBS)
        end = len(source) - (source[-1] in SOURCE_ADVERBS)
        object_words = set(range(verb + 1, end))
        if source[verb] not in TRANSITIVE_VERBS:
            assert not object_words, p
            continue
        assert object_words, p
        with_object += 1
        (target_verb,) = [t for t, i in enumerate(p.alignment) if i == verb]
        object_positions = [t for t, i in enumerate(p.alignment) if i in object_words]
        assert len(object_positions) == len(object_words), p  # each object word translated
        assert max(object_positions) < target_verb, p
    assert with_object > len(pairs) // 2
