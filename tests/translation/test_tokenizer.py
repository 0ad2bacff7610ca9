"""Tokenizers: fixed special ids, lossless round trips, unknown words, saving as a string."""

from __future__ import annotations

import pytest
from tokenizers import Tokenizer

from attention.translation.data.tokenizer import (
    BOS_ID,
    EOS_ID,
    PAD_ID,
    SPECIAL_TOKENS,
    UNK_ID,
    train_tokenizer,
)
from attention.translation.data.toy import generate_pairs

CORPUS = [
    "Der Bär läuft schnell über die Straße.",
    "Die Mädchen spielen im Garten; sie lachen, singen und tanzen.",
    "L'élève a mangé une crêpe, puis il est parti à l'école.",
    "Ça va ? Très bien, merci ! Où est la gare ?",
    "The state-of-the-art model works well, doesn't it?",
    "A well-known café serves crème brûlée and Käsekuchen.",
    "Zwei Männer, drei Frauen und ein Kind warten am Bahnhof.",
    "Les enfants jouent près de la fenêtre, n'est-ce pas ?",
]
# unseen sentences made of seen characters, single-spaced, with punctuation and accents
HELD_OUT = [
    "Die Frauen lachen über den Bären.",
    "L'enfant a mangé, puis il est parti.",
    "A well-known state-of-the-art café, n'est-ce pas ?",
    "Où sont les Männer ? Très bien !",
]


@pytest.fixture(scope="module")
def bpe() -> Tokenizer:
    return train_tokenizer(CORPUS * 3, kind="bpe", vocab_size=300)


@pytest.fixture(scope="module")
def word() -> Tokenizer:
    return train_tokenizer(CORPUS, kind="word")


def test_special_ids_are_fixed():
    assert (PAD_ID, BOS_ID, EOS_ID, UNK_ID) == (0, 1, 2, 3)
    assert SPECIAL_TOKENS == ["<pad>", "<bos>", "<eos>", "<unk>"]
    for kind in ("word", "bpe"):
        tokenizer = train_tokenizer(["zebra yak", "yak zebra ."] * 2, kind=kind, vocab_size=50)
        for token_id, token in enumerate(SPECIAL_TOKENS):
            assert tokenizer.token_to_id(token) == token_id, (kind, token)


def test_bpe_round_trip_multilingual(bpe):
    assert bpe.get_vocab_size() <= 300
    for sentence in CORPUS + HELD_OUT:
        encoding = bpe.encode(sentence)
        assert UNK_ID not in encoding.ids, sentence
        assert bpe.decode(encoding.ids) == sentence
    # subwords, not only characters: a frequent word is one token
    assert len(bpe.encode("Straße").ids) == 1


def test_word_round_trip(word):
    for sentence in CORPUS:
        assert word.decode(word.encode(sentence).ids) == sentence
    toy = [p.target for p in generate_pairs(200, seed=0)]
    toy_tokenizer = train_tokenizer(toy, kind="word")
    for sentence in toy:
        ids = toy_tokenizer.encode(sentence).ids
        assert len(ids) == len(sentence.split())  # one token per word: the unit of alignment
        assert toy_tokenizer.decode(ids) == sentence


def test_word_vocabulary_keeps_every_word_seen(word):
    words = {w for sentence in CORPUS for w in sentence.split()}
    assert word.get_vocab_size() == len(SPECIAL_TOKENS) + len(words)


def test_unknown_words_map_to_unk(word, bpe):
    ids = word.encode("Der Zebra läuft").ids
    assert ids[1] == UNK_ID
    assert ids[0] != UNK_ID and ids[2] != UNK_ID
    assert UNK_ID in bpe.encode("Straße ψ").ids  # a character never seen in training


def test_lowercase_option():
    tokenizer = train_tokenizer(CORPUS, kind="word", lowercase=True)
    assert tokenizer.encode("DER BÄR").ids == tokenizer.encode("der bär").ids
    assert UNK_ID not in tokenizer.encode("DER BÄR").ids


@pytest.mark.parametrize("kind", ["word", "bpe"])
def test_to_str_from_str_round_trip(kind, word, bpe):
    tokenizer = {"word": word, "bpe": bpe}[kind]
    restored = Tokenizer.from_str(tokenizer.to_str())
    for sentence in CORPUS + HELD_OUT + ["Der Zebra ψ läuft"]:
        original, again = tokenizer.encode(sentence), restored.encode(sentence)
        assert again.ids == original.ids and again.tokens == original.tokens
        assert restored.decode(again.ids) == tokenizer.decode(original.ids)


def test_bad_kind():
    with pytest.raises(ValueError, match=r"kind: expected 'word' or 'bpe', got 'char'"):
        train_tokenizer(CORPUS, kind="char")
