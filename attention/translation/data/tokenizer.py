"""Tokenizers trained with the ``tokenizers`` library: word-level or byte-pair encoding.

Both kinds share the special tokens below at the same ids, so a model's ``pad_id``,
``bos_id`` and ``eos_id`` do not depend on the data. A tokenizer is saved as its JSON string
(:meth:`tokenizers.Tokenizer.to_str`), which is how checkpoints carry it.
"""

from __future__ import annotations

from collections.abc import Iterable

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

__all__ = ["BOS_ID", "EOS_ID", "PAD_ID", "SPECIAL_TOKENS", "UNK_ID", "train_tokenizer"]

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
