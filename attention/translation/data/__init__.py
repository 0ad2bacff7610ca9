"""Data for translation: the toy language pair, corpus readers, tokenizers and batches."""

from .batching import collate, token_batches
from .corpus import read_parallel
from .dataset import ParallelData, load_splits
from .tokenizer import (
    BOS_ID,
    EOS_ID,
    PAD_ID,
    SPECIAL_TOKENS,
    UNK_ID,
    load_tokenizer,
    train_tokenizer,
)
from .toy import Pair, generate_pairs, toy_splits

__all__ = [
    "BOS_ID",
    "EOS_ID",
    "PAD_ID",
    "SPECIAL_TOKENS",
    "UNK_ID",
    "Pair",
    "ParallelData",
    "collate",
    "generate_pairs",
    "load_splits",
    "load_tokenizer",
    "read_parallel",
    "token_batches",
    "toy_splits",
    "train_tokenizer",
]
