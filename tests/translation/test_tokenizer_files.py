"""Tokenizers read from a user's file: a SentencePiece model or a tokenizers tokenizer.json,
renumbered to our special ids but splitting and decoding text as the user's own does."""

from __future__ import annotations

import io
import json
import random
import sys

import pytest
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
from tokenizers import trainers as tokenizer_trainers

from attention.translation.data import load_tokenizer
from attention.translation.data.tokenizer import SPECIAL_TOKENS, UNK_ID

WORDS = ["der", "die", "das", "Haus", "Straße", "Mädchen", "läuft", "schnell", "über", "Garten",
         "spielen", "the", "house", "runs", "quickly", "children", "play", "garden", "café",
         "Zürich", "Berlin", "and", "und", "is", "ist", "green", "grün"]


def make_sentences(count: int, seed: int) -> list[str]:
    """German/English-like sentences: capitals, commas, numbers, accents, end punctuation."""
    rng = random.Random(seed)
    sentences = []
    for _ in range(count):
        words = [rng.choice(WORDS) for _ in range(rng.randint(3, 9))]
        words[0] = words[0].capitalize()
        if rng.random() < 0.5:
            words.insert(rng.randint(1, len(words)), str(rng.randint(0, 2024)))
        if rng.random() < 0.3:
            words[rng.randrange(len(words) - 1)] += ","
        sentences.append(" ".join(words) + rng.choice([".", "!", "?"]))
    return sentences


TRAIN = make_sentences(300, seed=0)
# unseen sentences of seen characters; and sentences SentencePiece normalizes first
HELD_OUT = make_sentences(40, seed=1)
NORMALIZED = ["  Die   Straße  und  der Garten ", "Ｈaus ｉst grün."]  # spaces, full width
UNKNOWN = "☃"  # in no training sentence


# --- SentencePiece models ------------------------------------------------------------------


def train_sentencepiece(model_type: str, byte_fallback: bool = False) -> bytes:
    sentencepiece = pytest.importorskip("sentencepiece")
    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(TRAIN), model_writer=model, model_type=model_type,
        vocab_size=400 if byte_fallback else 120, byte_fallback=byte_fallback,
        minloglevel=2)
    return model.getvalue()


@pytest.fixture(scope="module", params=["unigram", "bpe"])
def spm(request, tmp_path_factory):
    """``(processor, path)``: a tiny SentencePiece model of each type and its file."""
    sentencepiece = pytest.importorskip("sentencepiece")
    model = train_sentencepiece(request.param)
    path = tmp_path_factory.mktemp(request.param) / "spm.model"
    path.write_bytes(model)
    return sentencepiece.SentencePieceProcessor(model_proto=model), path


def our_ids(tokenizer: Tokenizer, processor, sentence: str) -> list[int]:
    """SentencePiece's ids for ``sentence`` in our numbering."""
    return [UNK_ID if piece_id == processor.unk_id()
            else tokenizer.token_to_id(processor.id_to_piece(piece_id))
            for piece_id in processor.encode(sentence)]


def test_sentencepiece_splits_text_as_sentencepiece_does(spm):
    processor, path = spm
    tokenizer = load_tokenizer(path)
    for sentence in HELD_OUT + NORMALIZED:
        encoding = tokenizer.encode(sentence)
        assert encoding.tokens == processor.encode(sentence, out_type=str), sentence
        assert encoding.ids == our_ids(tokenizer, processor, sentence), sentence


def test_sentencepiece_decodes_as_sentencepiece_does(spm):
    processor, path = spm
    tokenizer = load_tokenizer(path)
    for sentence in HELD_OUT + NORMALIZED:
        expected = processor.decode(processor.encode(sentence))
        assert tokenizer.decode(tokenizer.encode(sentence).ids) == expected, sentence
    assert tokenizer.decode(tokenizer.encode(HELD_OUT[0]).ids) == HELD_OUT[0]


def test_sentencepiece_special_tokens_first_then_its_pieces_in_order(spm):
    processor, path = spm
    tokenizer = load_tokenizer(path)
    assert [tokenizer.id_to_token(i) for i in range(4)] == SPECIAL_TOKENS
    # its <unk> merges into ours; every other piece follows in its order
    pieces = [processor.id_to_piece(i) for i in range(processor.get_piece_size())
              if i != processor.unk_id()]
    assert [tokenizer.id_to_token(i) for i in range(4, tokenizer.get_vocab_size())] == pieces
    specials = {added.content for added in tokenizer.get_added_tokens_decoder().values()
                if added.special}
    assert set(SPECIAL_TOKENS) <= specials


def test_sentencepiece_unknown_text_is_unk(spm):
    processor, path = spm
    tokenizer = load_tokenizer(path)
    sentence = f"Das Haus {UNKNOWN} ist grün."
    assert processor.unk_id() in processor.encode(sentence)
    assert UNK_ID in tokenizer.encode(sentence).ids
    assert tokenizer.encode(sentence).ids == our_ids(tokenizer, processor, sentence)


def test_sentencepiece_encode_adds_no_special_tokens(spm):
    processor, path = spm
    tokenizer = load_tokenizer(path)
    controls = {tokenizer.token_to_id("<s>"), tokenizer.token_to_id("</s>")}
    for sentence in HELD_OUT:
        ids = tokenizer.encode(sentence).ids
        assert len(ids) == len(processor.encode(sentence))
        assert not set(ids) & (set(range(len(SPECIAL_TOKENS))) | controls)


def test_sentencepiece_survives_the_json_round_trip(spm):
    processor, path = spm
    tokenizer = load_tokenizer(path)
    reloaded = Tokenizer.from_str(tokenizer.to_str())
    for sentence in HELD_OUT + NORMALIZED:  # NORMALIZED needs the precompiled normalizer
        ids = reloaded.encode(sentence).ids
        assert ids == tokenizer.encode(sentence).ids == our_ids(tokenizer, processor, sentence)
        assert reloaded.decode(ids) == tokenizer.decode(ids)


@pytest.mark.parametrize("model_type", ["unigram", "bpe"])
def test_sentencepiece_byte_fallback_spells_unknown_characters_in_bytes(model_type, tmp_path):
    sentencepiece = pytest.importorskip("sentencepiece")
    model = train_sentencepiece(model_type, byte_fallback=True)
    processor = sentencepiece.SentencePieceProcessor(model_proto=model)
    (tmp_path / "spm.model").write_bytes(model)
    tokenizer = load_tokenizer(tmp_path / "spm.model")
    sentence = f"Das {UNKNOWN}{UNKNOWN} Haus ist grün."
    assert tokenizer.encode(sentence).tokens == processor.encode(sentence, out_type=str)
    assert "<0xE2>" in tokenizer.encode(sentence).tokens
    assert tokenizer.decode(tokenizer.encode(sentence).ids) == sentence
    for sentence in HELD_OUT[:10]:
        assert tokenizer.encode(sentence).tokens == processor.encode(sentence, out_type=str)


def test_a_sentencepiece_file_is_recognized_by_its_content(spm, tmp_path):
    processor, path = spm
    renamed = tmp_path / "vocabulary.bin"
    renamed.write_bytes(path.read_bytes())
    sentence = HELD_OUT[0]
    assert load_tokenizer(str(renamed)).encode(sentence).tokens == processor.encode(
        sentence, out_type=str)


# --- tokenizer.json files ------------------------------------------------------------------


def bert_like_bpe() -> Tokenizer:
    """BPE with its own special tokens and a [CLS] ... [SEP] post-processor."""
    tokenizer = Tokenizer(models.BPE(unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace()
    tokenizer.decoder = decoders.Metaspace()
    tokenizer.train_from_iterator(TRAIN, tokenizer_trainers.BpeTrainer(
        vocab_size=150, special_tokens=["[UNK]", "[PAD]", "[CLS]", "[SEP]"]))
    tokenizer.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", tokenizer.token_to_id("[CLS]")),
                        ("[SEP]", tokenizer.token_to_id("[SEP]"))])
    return tokenizer


def bert_wordpiece() -> Tokenizer:
    tokenizer = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tokenizer.normalizer = normalizers.BertNormalizer(lowercase=False)
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tokenizer.decoder = decoders.WordPiece()
    tokenizer.train_from_iterator(TRAIN, tokenizer_trainers.WordPieceTrainer(
        vocab_size=150, special_tokens=["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]))
    tokenizer.post_processor = processors.BertProcessing(
        ("[SEP]", tokenizer.token_to_id("[SEP]")), ("[CLS]", tokenizer.token_to_id("[CLS]")))
    return tokenizer


def t5_like_unigram() -> Tokenizer:
    """Unigram whose <pad> is spelled like ours and whose <unk> is not at id 3."""
    tokenizer = Tokenizer(models.Unigram())
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace()
    tokenizer.decoder = decoders.Metaspace()
    tokenizer.train_from_iterator(TRAIN, tokenizer_trainers.UnigramTrainer(
        vocab_size=100, special_tokens=["<pad>", "</s>", "<unk>"], unk_token="<unk>"))
    return tokenizer


def word_level() -> Tokenizer:
    tokenizer = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer.decoder = decoders.WordPiece()  # joins words with spaces
    tokenizer.train_from_iterator(TRAIN, tokenizer_trainers.WordLevelTrainer(
        special_tokens=["[UNK]", "[SEP]"]))
    return tokenizer


USER_TOKENIZERS = {"bpe": bert_like_bpe, "wordpiece": bert_wordpiece,
                   "unigram": t5_like_unigram, "wordlevel": word_level}


@pytest.fixture(scope="module", params=sorted(USER_TOKENIZERS))
def user_tokenizer(request, tmp_path_factory):
    """``(tokenizer, path)``: a user's tokenizer of each model type and its tokenizer.json."""
    tokenizer = USER_TOKENIZERS[request.param]()
    path = tmp_path_factory.mktemp(request.param) / "tokenizer.json"
    tokenizer.save(str(path))
    return tokenizer, path


def ours(original: Tokenizer, token: str) -> str:
    """``token`` of the ``original`` tokenizer as we spell it: its unknown token is ours."""
    return "<unk>" if token == unknown_token(original) else token


def unknown_token(original: Tokenizer) -> str:
    model = json.loads(original.to_str())["model"]
    return model["unk_token"] if "unk_token" in model else model["vocab"][model["unk_id"]][0]


def test_tokenizer_json_splits_and_decodes_as_the_users(user_tokenizer):
    original, path = user_tokenizer
    tokenizer = load_tokenizer(path)
    for sentence in HELD_OUT:
        encoding = tokenizer.encode(sentence)
        theirs = original.encode(sentence, add_special_tokens=False)
        # their unknown token is our <unk>
        assert encoding.tokens == [ours(original, token) for token in theirs.tokens], sentence
        assert tokenizer.decode(encoding.ids) == original.decode(theirs.ids), sentence


def test_tokenizer_json_ids_shift_after_ours_in_the_users_order(user_tokenizer):
    original, path = user_tokenizer
    tokenizer = load_tokenizer(path)
    assert [tokenizer.id_to_token(i) for i in range(4)] == SPECIAL_TOKENS
    unk = unknown_token(original)
    theirs = sorted(original.get_vocab().items(), key=lambda item: item[1])
    kept = [token for token, _ in theirs if token not in SPECIAL_TOKENS and token != unk]
    assert [tokenizer.id_to_token(i) for i in range(4, tokenizer.get_vocab_size())] == kept
    assert tokenizer.get_vocab_size() == 4 + len(kept)


def test_tokenizer_json_adds_no_special_tokens(user_tokenizer):
    original, path = user_tokenizer
    tokenizer = load_tokenizer(path)
    assert tokenizer.post_processor is None
    sentence = HELD_OUT[0]
    assert len(tokenizer.encode(sentence).ids) == len(
        original.encode(sentence, add_special_tokens=False).ids)
    assert not {"[CLS]", "[SEP]", "<bos>", "<eos>"} & set(tokenizer.encode(sentence).tokens)


def test_tokenizer_json_unknown_text_is_unk(user_tokenizer):
    _, path = user_tokenizer
    tokenizer = load_tokenizer(path)
    assert UNK_ID in tokenizer.encode(f"Das Haus {UNKNOWN} ist grün.").ids


def test_tokenizer_json_survives_the_json_round_trip(user_tokenizer):
    _, path = user_tokenizer
    tokenizer = load_tokenizer(path)
    reloaded = Tokenizer.from_str(tokenizer.to_str())
    for sentence in HELD_OUT[:10]:
        assert reloaded.encode(sentence).ids == tokenizer.encode(sentence).ids
    assert reloaded.get_vocab() == tokenizer.get_vocab()


# --- errors --------------------------------------------------------------------------------


def test_a_missing_file_is_named(tmp_path):
    path = tmp_path / "nowhere" / "tokenizer.json"
    with pytest.raises(FileNotFoundError, match="nowhere"):
        load_tokenizer(path)


@pytest.mark.parametrize("content", [b"not a tokenizer at all\n", b'{"vocab": {"a": 0}}',
                                     bytes(range(256)) * 4])
def test_a_file_of_neither_format_is_refused_with_what_was_expected(tmp_path, content):
    pytest.importorskip("sentencepiece")
    path = tmp_path / "garbage.model"
    path.write_bytes(content)
    with pytest.raises(ValueError, match="garbage.model") as error:
        load_tokenizer(path)
    assert "tokenizer.json" in str(error.value) and "SentencePiece" in str(error.value)


def test_a_broken_tokenizer_json_is_refused(tmp_path):
    path = tmp_path / "tokenizer.json"
    path.write_text('{"model": {"type": "BPE", "vocab": 3}}')
    with pytest.raises(ValueError, match="tokenizer.json"):
        load_tokenizer(path)


def test_without_sentencepiece_the_message_says_what_to_install(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "sentencepiece", None)  # import sentencepiece fails
    path = tmp_path / "spm.model"
    path.write_bytes(b"\n\x05\n\x01a\x15\x00\x00\x00\x00")
    with pytest.raises(ImportError, match=r"pip install 'attention-blocks\[sentencepiece\]'"):
        load_tokenizer(path)
