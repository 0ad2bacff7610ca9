"""Token-sized, length-bucketed batches: a partition of the data, within budget, reproducible."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from attention.translation.data.batching import collate, token_batches

SETTINGS = settings(max_examples=50, deadline=None)

lengths_st = st.lists(st.integers(1, 60), max_size=80)
budgets = st.integers(1, 400)
seeds = st.integers(0, 10_000)
epochs = st.integers(0, 100)


def flat(batches: list[list[int]]) -> list[int]:
    return [i for batch in batches for i in batch]


@SETTINGS
@given(lengths=lengths_st, batch_tokens=budgets, seed=seeds, epoch=epochs,
       shuffle=st.booleans())
def test_every_index_exactly_once(lengths, batch_tokens, seed, epoch, shuffle):
    batches = token_batches(lengths, batch_tokens, seed=seed, epoch=epoch, shuffle=shuffle)
    assert all(batches), "no empty batch"
    assert sorted(flat(batches)) == list(range(len(lengths)))


@SETTINGS
@given(lengths=lengths_st, batch_tokens=budgets, seed=seeds, epoch=epochs,
       shuffle=st.booleans())
def test_batches_fit_the_token_budget(lengths, batch_tokens, seed, epoch, shuffle):
    for batch in token_batches(lengths, batch_tokens, seed=seed, epoch=epoch, shuffle=shuffle):
        padded = max(lengths[i] for i in batch) * len(batch)
        if padded > batch_tokens:  # only an overlong example, alone
            assert len(batch) == 1 and lengths[batch[0]] > batch_tokens, batch


@SETTINGS
@given(lengths=lengths_st, batch_tokens=budgets, seed=seeds, epoch=epochs)
def test_same_seed_and_epoch_same_batches(lengths, batch_tokens, seed, epoch):
    first = token_batches(lengths, batch_tokens, seed=seed, epoch=epoch)
    assert token_batches(list(lengths), batch_tokens, seed=seed, epoch=epoch) == first


@SETTINGS
@given(lengths=lengths_st, batch_tokens=budgets, seed=seeds, epoch=epochs)
def test_batches_are_length_buckets(lengths, batch_tokens, seed, epoch):
    """Shuffled or not, each batch is a run of the length-sorted examples, so padding is small:
    laid end to end by length, the batches' lengths never go down."""
    batches = token_batches(lengths, batch_tokens, seed=seed, epoch=epoch, shuffle=True)
    spans = sorted([sorted(lengths[i] for i in batch) for batch in batches],
                   key=lambda s: (s[0], s[-1]))
    laid_out = [n for span in spans for n in span]
    assert laid_out == sorted(lengths)


@SETTINGS
@given(lengths=lengths_st, batch_tokens=budgets, seed=seeds, epoch=epochs)
def test_no_shuffle_is_sorted_greedy_and_ignores_seed(lengths, batch_tokens, seed, epoch):
    batches = token_batches(lengths, batch_tokens, seed=seed, epoch=epoch, shuffle=False)
    assert flat(batches) == sorted(range(len(lengths)), key=lambda i: (lengths[i], i))
    assert token_batches(lengths, batch_tokens, seed=seed + 1, epoch=epoch + 1,
                         shuffle=False) == batches
    # greedy packing: a batch ends only when the next example would not have fitted
    for batch, following in zip(batches, batches[1:], strict=False):
        grown = batch + following[:1]
        assert max(lengths[i] for i in grown) * len(grown) > batch_tokens


def test_different_epoch_or_seed_different_order():
    lengths = [(7 * i) % 23 + 1 for i in range(300)]
    base = token_batches(lengths, 64, seed=0, epoch=0)
    assert token_batches(lengths, 64, seed=0, epoch=1) != base
    assert token_batches(lengths, 64, seed=1, epoch=0) != base
    # equal lengths are regrouped too, not only the batch order
    same = [5] * 40
    groups = {frozenset(b) for b in token_batches(same, 20, seed=0, epoch=0)}
    assert groups != {frozenset(b) for b in token_batches(same, 20, seed=0, epoch=1)}


def test_a_batch_may_fill_the_budget_exactly():
    assert token_batches([5] * 8, 20, seed=0, epoch=0, shuffle=False) == [[0, 1, 2, 3],
                                                                          [4, 5, 6, 7]]
    assert [len(b) for b in token_batches([5] * 8, 20, seed=0, epoch=3)] == [4, 4]
    # the longest example sets the cost: 3 rows of 7 do not fit in 20, 2 rows do
    assert token_batches([7, 2, 7, 2], 20, seed=0, epoch=0, shuffle=False) == [[1, 3], [0, 2]]


def test_edge_cases():
    assert token_batches([], 10, seed=0, epoch=0) == []
    assert token_batches([50], 10, seed=0, epoch=0) == [[0]]
    with pytest.raises(ValueError, match="batch_tokens: expected a positive number, got 0"):
        token_batches([1, 2], 0, seed=0, epoch=0)


def test_collate_pads_with_pad_id():
    out = collate([[5, 6, 7], [8], [9, 10]], pad_id=4)
    assert out.dtype == torch.long and out.shape == (3, 3)
    assert out.tolist() == [[5, 6, 7], [8, 4, 4], [9, 10, 4]]
    assert collate([[1, 2]], pad_id=0).tolist() == [[1, 2]]
