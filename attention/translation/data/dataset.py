"""From a data config to encoded splits: the pairs of each split, and their token ids."""

from __future__ import annotations

from tokenizers import Tokenizer
from torch import Tensor

from ..config import DataConfig
from .batching import collate
from .corpus import read_parallel
from .tokenizer import BOS_ID, EOS_ID, PAD_ID
from .toy import Pair, toy_splits

__all__ = ["ParallelData", "load_splits"]

SPLITS = ("train", "val", "test")


def load_splits(data: DataConfig) -> dict[str, list[Pair]]:
    """The ``train``, ``val`` and ``test`` pairs that ``data`` describes."""
    if data.corpus == "toy":
        return toy_splits(data.toy_train_size, data.toy_val_size, data.toy_test_size,
                          data.toy_seed)
    splits = {}
    for split in SPLITS:
        rows = read_parallel(data.split_files(split), name=f"data.{split}")
        if not rows:
            raise ValueError(f"data.{split}: no sentence pairs found")
        splits[split] = [Pair(source, target) for source, target in rows]
    return splits


class ParallelData:
    """Pairs encoded for a model: source ``ids + [eos]``, target ``[bos] + ids + [eos]``.

    The decoder reads ``target[:-1]`` and is trained to predict ``target[1:]``.
    """

    def __init__(self, pairs: list[Pair], src_tokenizer: Tokenizer, tgt_tokenizer: Tokenizer,
                 max_tokens: int | None = None) -> None:
        sources = [e.ids + [EOS_ID] for e in src_tokenizer.encode_batch([p.source for p in pairs])]
        targets = [[BOS_ID, *e.ids, EOS_ID]
                   for e in tgt_tokenizer.encode_batch([p.target for p in pairs])]
        keep = [i for i in range(len(pairs)) if max_tokens is None or
                max(len(sources[i]), len(targets[i]) - 1) <= max_tokens]
        self.pairs = [pairs[i] for i in keep]
        self.sources = [sources[i] for i in keep]
        self.targets = [targets[i] for i in keep]
        self.dropped = len(pairs) - len(keep)

    def __len__(self) -> int:
        return len(self.pairs)

    @property
    def lengths(self) -> list[int]:
        """The padded length each example costs: the longer of its two sides."""
        return [max(len(s), len(t) - 1) for s, t in zip(self.sources, self.targets, strict=True)]

    def batch(self, indices: list[int]) -> tuple[Tensor, Tensor, Tensor]:
        """``(src (B, Ls), tgt_in (B, Lt), tgt_out (B, Lt))`` for the examples ``indices``."""
        src = collate([self.sources[i] for i in indices], PAD_ID)
        tgt = collate([self.targets[i] for i in indices], PAD_ID)
        return src, tgt[:, :-1], tgt[:, 1:]

