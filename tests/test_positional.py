"""Positional encodings: the paper's table, learned positions, rotary embeddings."""

import math

import torch

from attention import LearnedPositionalEncoding, RotaryEmbedding, SinusoidalPositionalEncoding
from attention.positional import sinusoid_table


def test_sinusoid_table_is_the_papers_formula():
    table = sinusoid_table(50, 8)
    for pos in (0, 1, 17, 49):
        for i in range(4):
            angle = pos / 10000 ** (2 * i / 8)
            assert math.isclose(table[pos, 2 * i], math.sin(angle), abs_tol=1e-6)
            assert math.isclose(table[pos, 2 * i + 1], math.cos(angle), abs_tol=1e-6)


def test_sinusoid_table_with_odd_width():
    table = sinusoid_table(10, 7)
    assert table.shape == (10, 7)
    assert math.isclose(table[9, 6], math.sin(9 / 10000 ** (6 / 7)), abs_tol=1e-6)
    assert math.isclose(table[9, 5], math.cos(9 / 10000 ** (4 / 7)), abs_tol=1e-6)


def test_sinusoidal_extends_beyond_its_precomputed_table():
    short, long = SinusoidalPositionalEncoding(8, max_len=4), SinusoidalPositionalEncoding(8, 64)
    x = torch.randn(2, 10, 8)
    torch.testing.assert_close(short(x), long(x))
    torch.testing.assert_close(short(x[:, 7:], offset=7), long(x)[:, 7:])


def test_offset_continues_the_positions():
    encoding = LearnedPositionalEncoding(8, max_len=16).eval()
    x = torch.randn(1, 10, 8)
    torch.testing.assert_close(encoding(x[:, 4:], offset=4), encoding(x)[:, 4:])


def test_learned_positions_are_trained():
    encoding = LearnedPositionalEncoding(8, max_len=16)
    encoding(torch.randn(2, 5, 8)).pow(2).sum().backward()
    assert encoding.weight.grad[:5].abs().sum() > 0
    assert encoding.weight.grad[5:].abs().sum() == 0


def test_rotary_scores_depend_on_distance_only():
    torch.manual_seed(0)
    rotary = RotaryEmbedding(8)
    q, k = torch.randn(1, 1, 1, 8), torch.randn(1, 1, 1, 8)

    def score(q_pos, k_pos):
        return (rotary(q, q_pos) * rotary(k, k_pos)).sum().item()

    assert math.isclose(score(3, 1), score(10, 8), rel_tol=1e-4)
    assert math.isclose(score(0, 5), score(20, 25), rel_tol=1e-4)
    assert not math.isclose(score(3, 1), score(3, 2), rel_tol=1e-3)


def test_rotary_is_a_rotation():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 7, 8)
    rotated = RotaryEmbedding(8)(x)
    torch.testing.assert_close(rotated.norm(dim=-1), x.norm(dim=-1))
    torch.testing.assert_close(rotated[:, :, 0], x[:, :, 0])  # position 0: no rotation
