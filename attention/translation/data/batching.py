"""Batches bucketed by length and sized in tokens, deterministic from a seed and an epoch.

Sentences of similar length go together so that little of a batch is padding, and each
batch holds at most ``batch_tokens`` tokens (its longest sequence times its row count,
padding included) so that memory stays flat while lengths vary.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["collate", "token_batches"]


def token_batches(lengths: list[int], batch_tokens: int, *, seed: int, epoch: int,
                  shuffle: bool = True) -> list[list[int]]:
    """Split example indices into batches of at most ``batch_tokens`` padded tokens.

    ``lengths[i]`` is the length of example ``i`` (the longer of its two sides). With
    ``shuffle``, examples of equal length are permuted and the batches come out in random
    order, both from a generator seeded by ``(seed, epoch)``: the same call gives the same
    batches, which is what lets a resumed run continue exactly. An example longer than
    ``batch_tokens`` gets a batch of its own.
    """
    if batch_tokens <= 0:
        raise ValueError(f"batch_tokens: expected a positive number, got {batch_tokens}")
    generator = torch.Generator().manual_seed(seed * 100_003 + epoch)
    order = torch.randperm(len(lengths), generator=generator).tolist() if shuffle else \
        list(range(len(lengths)))
    order.sort(key=lambda i: lengths[i])  # stable: ties keep their random order
    batches: list[list[int]] = []
    batch: list[int] = []
    longest = 0
    for index in order:
        longest_if_added = max(longest, lengths[index])
        if batch and longest_if_added * (len(batch) + 1) > batch_tokens:
            batches.append(batch)
            batch, longest_if_added = [], lengths[index]
        batch.append(index)
        longest = longest_if_added
    if batch:
        batches.append(batch)
    if shuffle:
        batches = [batches[i] for i in torch.randperm(len(batches), generator=generator)]
    return batches


def collate(sequences: list[list[int]], pad_id: int) -> Tensor:
    """Pad id lists on the right into a ``(B, L)`` LongTensor."""
    longest = max(len(s) for s in sequences)
    out = torch.full((len(sequences), longest), pad_id, dtype=torch.long)
    for row, ids in enumerate(sequences):
        out[row, :len(ids)] = torch.tensor(ids, dtype=torch.long)
    return out
