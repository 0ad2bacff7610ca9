"""Tokenizers trained with the ``tokenizers`` library (word-level or byte-pair encoding), or
read from a user's file (:func:`load_tokenizer`: a ``tokenizer.json`` or a SentencePiece model).

All share the special tokens below at the same ids, so a model's ``pad_id``,
``bos_id`` and ``eos_id`` do not depend on the data. A tokenizer is saved as its JSON string
(:meth:`tokenizers.Tokenizer.to_str`), which is how checkpoints carry it.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from tokenizers import (
    AddedToken,
    Regex,
    Tokenizer,
    decoders,
    models,
    normalizers,
    pre_tokenizers,
    trainers,
)

__all__ = ["BOS_ID", "EOS_ID", "PAD_ID", "SPECIAL_TOKENS", "UNK_ID", "load_tokenizer",
           "train_tokenizer"]

SPECIAL_TOKENS = ["<pad>", "<bos>", "<eos>", "<unk>"]
PAD_ID, BOS_ID, EOS_ID, UNK_ID = range(len(SPECIAL_TOKENS))


def train_tokenizer(sentences: Iterable[str], kind: str = "bpe", vocab_size: int = 8000,
                    lowercase: bool = False) -> Tokenizer:
    """Train a tokenizer on ``sentences``.

    ``word`` splits on whitespace and keeps the ``vocab_size`` most frequent words (for the
    toy language, whose words are the unit of alignment); ``bpe`` learns subwords with a
    SentencePiece-style word-boundary marker, so that decoding restores the spacing of the
    text: ``decode(encode(s)) == s`` for text with single spaces.
    """
    normalizer = [normalizers.NFKC()] + ([normalizers.Lowercase()] if lowercase else [])
    if kind == "word":
        tokenizer = Tokenizer(models.WordLevel(unk_token="<unk>"))
        tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
        trainer = trainers.WordLevelTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS)
    elif kind == "bpe":
        tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
        tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Metaspace(), pre_tokenizers.Punctuation()])
        tokenizer.decoder = decoders.Metaspace()
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                      min_frequency=2)
    else:
        raise ValueError(f"kind: expected 'word' or 'bpe', got {kind!r}")
    tokenizer.normalizer = normalizers.Sequence(normalizer)
    tokenizer.train_from_iterator(sentences, trainer=trainer)
    for token_id, token in enumerate(SPECIAL_TOKENS):
        assert tokenizer.token_to_id(token) == token_id, "special tokens come first"
    return tokenizer


# --- Tokenizers brought by the user ------------------------------------------------------
#
# A user's tokenizer numbers its own special tokens as it likes ([CLS] at 101, <s> at 1, ...).
# ``load_tokenizer`` renumbers it: our four special tokens first, then the user's vocabulary
# in its own order, so that the rest of the application sees the ids it assumes.

SENTENCEPIECE_EXTRA = "pip install 'attention-blocks[sentencepiece]'"
EXPECTED_FILES = "a tokenizers tokenizer.json or a SentencePiece .model"
MODEL_TYPES = ("BPE", "WordPiece", "WordLevel", "Unigram")
# SentencePiece's piece types and model types (sentencepiece_model.proto); text produces only
# normal and user-defined pieces, never unknown (2), control (3, <s>), unused (5) or byte (6)
SPM_NORMAL, SPM_USER_DEFINED = 1, 4
SPM_UNIGRAM, SPM_BPE = 1, 2
# a Unigram score far below any real piece's: a piece that text must not produce
UNREACHABLE_PENALTY = 1e6


def load_tokenizer(path: str | Path) -> Tokenizer:
    """Read a user's tokenizer: a ``tokenizers`` ``tokenizer.json`` (BPE, WordPiece, Unigram
    or WordLevel) or a SentencePiece ``.model`` (unigram or bpe; needs the ``sentencepiece``
    extra). The format is told by the file's content, not its name.

    The tokenizer returned splits text into the same tokens as the user's and decodes them to
    the same text, but its ids are ours: :data:`SPECIAL_TOKENS` at 0-3, then every other
    token of the user's vocabulary in the user's order (a token spelled like one of ours
    becomes ours; the model's unknown token becomes ``<unk>``); and ``encode`` adds no
    special tokens (the application adds ``<bos>``/``<eos>`` itself).

    Raises:
        FileNotFoundError: ``path`` is not a file.
        ValueError: the file is neither of the two formats.
        ImportError: the file is not a tokenizer.json and ``sentencepiece`` (or
            ``protobuf``) is not installed to read it as a SentencePiece model.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"tokenizer file not found: {path}")
    content = path.read_bytes()
    tokenizer_json = _read_tokenizer_json(content)
    if tokenizer_json is None:
        tokenizer_json = json.loads(_sentencepiece_tokenizer(content, path).to_str())
    else:
        _check_tokenizer_json(tokenizer_json, path)
    return Tokenizer.from_str(json.dumps(_with_our_special_tokens(tokenizer_json)))


def _read_tokenizer_json(content: bytes) -> dict[str, Any] | None:
    """The parsed ``tokenizer.json``, or None if ``content`` is not one."""
    try:
        parsed = json.loads(content.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        return None
    return parsed if isinstance(parsed, dict) and "model" in parsed else None


def _check_tokenizer_json(tokenizer_json: dict[str, Any], path: Path) -> None:
    """Raise ValueError unless the ``tokenizers`` library reads ``tokenizer_json`` and its
    model is one of :data:`MODEL_TYPES`."""
    try:
        Tokenizer.from_str(json.dumps(tokenizer_json))
    except Exception as error:  # tokenizers raises a bare Exception for a bad JSON
        raise ValueError(f"{path}: not a valid tokenizers tokenizer.json ({error}); "
                         f"expected {EXPECTED_FILES}") from error
    model_type = _model_type(tokenizer_json["model"])
    if model_type not in MODEL_TYPES:
        raise ValueError(f"{path}: model type {model_type!r}: expected one of "
                         f"{', '.join(MODEL_TYPES)}")


def _with_our_special_tokens(tokenizer_json: dict[str, Any]) -> dict[str, Any]:
    """A ``tokenizer.json`` (as parsed JSON) renumbered to our ids, without post-processor,
    padding or truncation; ``tokenizer_json`` is not changed.

    Every token of the user's (the model's vocabulary and the added tokens) keeps its
    place in the user's id order after our :data:`SPECIAL_TOKENS`; the model's unknown token
    and any token spelled like one of ours merge into ours.
    """
    tokenizer_json = copy.deepcopy(tokenizer_json)
    model = tokenizer_json["model"]
    kind = _model_type(model)
    added_tokens = tokenizer_json.get("added_tokens") or []
    if kind == "Unigram":
        user_tokens = [piece for piece, _ in model["vocab"]]
        unk_id = model.get("unk_id")
        user_unk = user_tokens[unk_id] if unk_id is not None else None
    else:
        user_tokens = [token for token, _ in sorted(model["vocab"].items(), key=lambda t: t[1])]
        user_unk = model.get("unk_token")
    # added tokens the model does not know come after its vocabulary, in their id order
    known = set(user_tokens)
    user_tokens += [added["content"] for added in sorted(added_tokens, key=lambda a: a["id"])
                    if added["content"] not in known]
    ours = _our_spelling(user_unk)
    # dict.fromkeys keeps the first of equal tokens: the unknown token and ours merge
    new_tokens = list(dict.fromkeys([*SPECIAL_TOKENS, *map(ours, user_tokens)]))
    new_ids = {token: new_id for new_id, token in enumerate(new_tokens)}

    if kind == "Unigram":
        model["vocab"] = _unigram_vocab(model["vocab"], user_tokens, new_tokens, ours)
        model["unk_id"] = UNK_ID
    else:
        model["vocab"] = new_ids
        model["unk_token"] = SPECIAL_TOKENS[UNK_ID]
    tokenizer_json["added_tokens"] = _added_tokens(added_tokens, new_ids, ours, user_unk)
    tokenizer_json["post_processor"] = None
    tokenizer_json["padding"] = None  # the application pads and truncates itself
    tokenizer_json["truncation"] = None
    return tokenizer_json


def _model_type(model: dict[str, Any]) -> str:
    """The ``type`` of a ``tokenizer.json``'s ``model``, told by its fields in files that
    do not say it (older ones)."""
    if "type" in model:
        return model["type"]
    if isinstance(model.get("vocab"), list):
        return "Unigram"
    if "merges" in model:
        return "BPE"
    if "continuing_subword_prefix" in model:
        return "WordPiece"
    return "WordLevel"


def _our_spelling(user_unk: str | None):
    """``token -> token``, but the user's unknown token spelled as ours (``<unk>``)."""
    def ours(token: str) -> str:
        return SPECIAL_TOKENS[UNK_ID] if token == user_unk else token
    return ours


def _unigram_vocab(vocab: list[list], user_tokens: list[str], new_tokens: list[str],
                   ours) -> list[list]:
    """``[piece, score]`` in the order of ``new_tokens``: a user's piece keeps its score;
    our special tokens, and added tokens the model did not know, get the lowest score (so
    that the model's score for an unknown piece, which is relative to the lowest, stays)."""
    scores = {ours(piece): score for piece, score in reversed(vocab)}  # first one wins
    lowest = min((score for _, score in vocab), default=0.0)
    return [[token, scores.get(token, lowest)] for token in new_tokens]


def _added_tokens(added_tokens: list[dict[str, Any]], new_ids: dict[str, int], ours,
                  user_unk: str | None) -> list[dict[str, Any]]:
    """Our special tokens at 0-3, then the user's added tokens renumbered (the unknown one
    and those spelled like ours merged into ours)."""
    special = [{"id": token_id, "content": token, "single_word": False, "lstrip": False,
                "rstrip": False, "normalized": False, "special": True}
               for token_id, token in enumerate(SPECIAL_TOKENS)]
    theirs = [{**added, "id": new_ids[added["content"]]} for added in added_tokens
              if ours(added["content"]) not in SPECIAL_TOKENS]
    return special + sorted(theirs, key=lambda added: added["id"])


# --- SentencePiece models -----------------------------------------------------------------


def _sentencepiece_model_proto():
    """SentencePiece's ``ModelProto`` class, or ImportError saying which extra to install."""
    try:
        from sentencepiece import sentencepiece_model_pb2
    except ImportError as error:
        raise ImportError("reading a SentencePiece model needs the sentencepiece and protobuf "
                          f"packages: {SENTENCEPIECE_EXTRA}") from error
    return sentencepiece_model_pb2.ModelProto


def _parse_sentencepiece(content: bytes, path: Path):
    """The SentencePiece ``ModelProto`` in ``content``; ValueError if it is not one."""
    try:
        model_proto = _sentencepiece_model_proto()
    except ImportError as error:
        raise ImportError(f"{path} is not a tokenizers tokenizer.json; reading it as a "
                          f"SentencePiece model needs the sentencepiece extra: "
                          f"{SENTENCEPIECE_EXTRA}") from error
    from google.protobuf.message import DecodeError

    proto = model_proto()
    try:
        proto.ParseFromString(content)
    except (DecodeError, ValueError, RuntimeError) as error:
        raise ValueError(f"{path}: cannot read it as a tokenizer; expected "
                         f"{EXPECTED_FILES}") from error
    if not proto.pieces or not all(piece.piece for piece in proto.pieces):
        raise ValueError(f"{path}: cannot read it as a tokenizer; expected {EXPECTED_FILES}")
    return proto


def _sentencepiece_tokenizer(content: bytes, path: Path) -> Tokenizer:
    """The ``tokenizers`` equivalent of the SentencePiece model in ``content``, with the
    model's own ids (as transformers' ``SpmConverter`` builds it)."""
    proto = _parse_sentencepiece(content, path)
    trainer, normalizer_spec = proto.trainer_spec, proto.normalizer_spec
    if trainer.treat_whitespace_as_suffix:
        raise ValueError(f"{path}: SentencePiece models with treat_whitespace_as_suffix "
                         "are not supported")
    pieces = [(piece.piece, piece.score, piece.type) for piece in proto.pieces]
    tokenizer = Tokenizer(_sentencepiece_model(pieces, trainer, path))
    # user-defined symbols are matched whole, before the model sees the text (as in
    # transformers; spaces around them may then split differently from SentencePiece)
    tokenizer.add_tokens([AddedToken(piece, normalized=False, special=False)
                          for piece, _, kind in pieces if kind == SPM_USER_DEFINED])
    tokenizer.normalizer = _sentencepiece_normalizer(normalizer_spec)
    # "first": the dummy prefix goes before the text, not after a user-defined symbol
    prepend_scheme = "first" if normalizer_spec.add_dummy_prefix else "never"
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(
        replacement="▁", prepend_scheme=prepend_scheme, split=trainer.split_by_whitespace)
    tokenizer.decoder = _sentencepiece_decoder(trainer.byte_fallback,
                                               normalizer_spec.add_dummy_prefix)
    return tokenizer


def _sentencepiece_model(pieces: list[tuple[str, float, int]], trainer, path: Path):
    """The Unigram or BPE model of SentencePiece's ``(piece, score, type)`` and
    ``trainer_spec``."""
    if trainer.model_type == SPM_UNIGRAM:
        return models.Unigram(_unreachable_penalized(pieces), unk_id=trainer.unk_id,
                              byte_fallback=trainer.byte_fallback)
    if trainer.model_type == SPM_BPE:
        vocab = {piece: piece_id for piece_id, (piece, _, _) in enumerate(pieces)}
        return models.BPE(vocab, _sentencepiece_merges(pieces),
                          unk_token=pieces[trainer.unk_id][0], fuse_unk=True,
                          byte_fallback=trainer.byte_fallback)
    raise ValueError(f"{path}: SentencePiece model type {trainer.model_type}: expected "
                     f"unigram ({SPM_UNIGRAM}) or bpe ({SPM_BPE})")


def _sentencepiece_normalizer(normalizer_spec) -> normalizers.Normalizer:
    """SentencePiece's normalization: its precompiled character map (NFKC by default),
    then, with ``remove_extra_whitespaces``, no trailing spaces and no runs of them (the
    leading ones go when the pre-tokenizer makes them the word boundary ``▁``)."""
    steps = []
    if normalizer_spec.precompiled_charsmap:
        steps.append(normalizers.Precompiled(normalizer_spec.precompiled_charsmap))
    if normalizer_spec.remove_extra_whitespaces:
        steps += [normalizers.Strip(left=False, right=True),
                  normalizers.Replace(Regex(" {2,}"), " ")]
    return normalizers.Sequence(steps)


def _sentencepiece_decoder(byte_fallback: bool, add_dummy_prefix: bool) -> decoders.Decoder:
    """Pieces to text as SentencePiece decodes them: ``▁`` is a space, byte pieces
    (``<0xE2>``) join into characters, and the space the model put in front goes."""
    steps = [decoders.Replace("▁", " ")]
    if byte_fallback:
        steps.append(decoders.ByteFallback())
    steps.append(decoders.Fuse())
    if add_dummy_prefix:
        steps.append(decoders.Strip(content=" ", left=1, right=0))
    return decoders.Sequence(steps)


def _unreachable_penalized(pieces: list[tuple[str, float, int]]) -> list[tuple[str, float]]:
    """Unigram ``(piece, score)`` pairs where the pieces SentencePiece never produces from
    text (unknown, control such as ``<s>``, unused, byte) score far below every other.

    A ``tokenizers`` Unigram considers every piece of its vocabulary; SentencePiece skips
    these. One case remains: text that spells such a piece (``<s>``) with a character the
    model does not know (``<``) still produces the piece, since the unknown token scores
    below the lowest piece.
    """
    reachable = [score for _, score, kind in pieces if kind in (SPM_NORMAL, SPM_USER_DEFINED)]
    unreachable = min(reachable, default=0.0) - UNREACHABLE_PENALTY
    return [(piece, score if kind in (SPM_NORMAL, SPM_USER_DEFINED) else unreachable)
            for piece, score, kind in pieces]


def _sentencepiece_merges(pieces: list[tuple[str, float, int]]) -> list[tuple[str, str]]:
    """BPE merges of a SentencePiece bpe model, derived from its ``(piece, score, type)``.

    SentencePiece merges the adjacent pair whose joined piece scores highest; so every split
    of a normal piece into two pieces of the vocabulary is a merge, ranked by the joined
    piece's score (ties: its id), as transformers' ``SentencePieceExtractor`` derives them.
    Pieces text never produces (control, unknown, unused, byte) take part in no merge.
    """
    ids = {piece: piece_id for piece_id, (piece, _, kind) in enumerate(pieces)
           if kind in (SPM_NORMAL, SPM_USER_DEFINED)}
    merges = []
    for piece_id, (piece, score, kind) in enumerate(pieces):
        if kind != SPM_NORMAL:
            continue
        splits = [(piece[:cut], piece[cut:]) for cut in range(1, len(piece))
                  if piece[:cut] in ids and piece[cut:] in ids]
        splits.sort(key=lambda split: (ids[split[0]], ids[split[1]]))
        merges += [(-score, piece_id, left, right) for left, right in splits]
    merges.sort(key=lambda merge: merge[:2])
    return [(left, right) for _, _, left, right in merges]
