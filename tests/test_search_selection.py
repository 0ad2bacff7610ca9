"""The searches' selections over a vocabulary: first_maximum and best_extensions give what
the plain reductions over every candidate give."""

import pytest
import torch

from attention.decoding import CHUNK, best_extensions, first_maximum, log_softmax_

VOCABS = [8 * CHUNK, 8000, 8 * CHUNK + 37]  # a whole number of chunks, and a shorter last


@pytest.mark.parametrize("vocab", VOCABS)
def test_first_maximum_is_max_dims_first_index_ties_included(vocab):
    generator = torch.Generator().manual_seed(vocab)
    scores = torch.randn(64, vocab, generator=generator)
    assert torch.equal(first_maximum(scores), scores.max(dim=-1).indices)
    ties = torch.randint(0, 3, (64, vocab), generator=generator).float()  # many maxima
    ties[5] = float("-inf")
    ties[6, -1] = 9.0  # the maximum in the shorter last chunk
    assert torch.equal(first_maximum(ties), ties.max(dim=-1).indices)


@pytest.mark.parametrize("vocab", VOCABS)
@pytest.mark.parametrize("beams", [1, 4])
def test_best_extensions_are_the_topk_of_every_sum(vocab, beams):
    generator = torch.Generator().manual_seed(beams * vocab)
    batch, n = 16, 8
    log_probs = torch.randn(batch * beams, vocab, generator=generator).mul_(3).log_softmax(-1)
    log_probs[:, :5] = float("-inf")  # banned tokens
    log_probs[3, vocab - 1] = 2.0  # a best token in the shorter last chunk
    beam_scores = torch.randn(batch, beams, generator=generator) * 2
    beam_scores[0, 1:] = float("-inf")  # a sentence whose other beams are not started
    expected = (log_probs + beam_scores.reshape(-1, 1)).view(batch, -1).topk(n, dim=-1)
    scores, index = best_extensions(log_probs, beam_scores, n)
    assert torch.equal(scores, expected.values)
    assert torch.equal(index, expected.indices)


def test_best_extensions_keep_only_real_candidates_when_few_are_finite():
    log_probs = torch.full((2, 8 * CHUNK + 3), float("-inf"))
    log_probs[0, 7], log_probs[1, 8 * CHUNK + 2] = -1.0, -2.0
    scores, index = best_extensions(log_probs, torch.zeros(1, 2), 4)
    assert scores[0, :2].tolist() == [-1.0, -2.0]
    assert index[0, :2].tolist() == [7, 2 * (8 * CHUNK + 3) - 1]
    assert torch.isinf(scores[0, 2:]).all()


def test_log_softmax_in_place_gives_log_softmax_values():
    scores = torch.randn(32, 8000, generator=torch.Generator().manual_seed(0)) * 5
    scores[3, :100] = float("-inf")
    expected = scores.log_softmax(dim=-1)
    out = log_softmax_(scores)
    assert out.data_ptr() == scores.data_ptr()  # written over the scores
    assert torch.equal(out, expected)
