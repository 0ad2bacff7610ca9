"""The work of a cell: the FLOP count, the padding mask and lengths, the loss weights."""

import pytest
import torch

from attention.bench.workload import encoder_flops, make_case, padding_lengths, padding_mask


def test_encoder_flops_matches_a_hand_count():
    # d=4, d_ff=8, B=2, L=3: projections and FFN 2·6·(4·16 + 2·4·8) = 1536, attention
    # 4·4·(3² + 3²) = 288 per layer
    assert encoder_flops(4, 1, 8, 2, 3, None, False) == 1536 + 288
    assert encoder_flops(4, 2, 8, 2, 3, 6, False) == 2 * (1536 + 288)
    assert encoder_flops(4, 1, 8, 2, 3, 6, True) == 3 * (1536 + 288)
    # padded, lengths 3 and 1: only real work, 2·4·128 = 1024 and 4·4·(9 + 1) = 160
    assert encoder_flops(4, 1, 8, 2, 3, 4, False, seq_lengths=[3, 1]) == 1024 + 160
    with pytest.raises(ValueError, match="seq_lengths"):
        encoder_flops(4, 1, 8, 2, 3, 4, False, seq_lengths=[3, 4])


@pytest.mark.parametrize("batch,length", [(4, 16), (8, 128), (32, 128), (5, 10)])
def test_padding_mask_pads_a_quarter_from_half_to_full_length(batch, length):
    mask, lengths = padding_mask(batch, length, 0.25)
    assert mask.shape == (batch, length) and mask.dtype == torch.bool
    assert int(mask.sum()) == round(0.25 * batch * length)  # True at padding
    assert min(lengths) == length // 2 and max(lengths) == length
    assert lengths == sorted(lengths)
    steps = [b - a for a, b in zip(lengths, lengths[1:], strict=False)]
    assert max(steps) - min(steps) <= 2  # evenly spread, up to rounding
    for row, n in zip(mask, lengths, strict=True):  # right padding
        assert not row[:n].any() and row[n:].all()


def test_padding_lengths_of_one_sequence_and_the_loss_weights():
    assert padding_lengths(1, 1024, 0.25) == [768]
    assert padding_lengths(3, 8, 0.0) == [8, 8, 8]
    case = make_case("padded", 4, 16, 32, 0.25, "cpu")
    assert case.real_tokens == 48
    assert case.keep_mask.equal(~case.key_padding_mask)
    assert case.loss_weight.sum().item() * 32 == pytest.approx(1.0)
    assert (case.loss_weight.squeeze(-1)[case.key_padding_mask] == 0).all()
    dense = make_case("dense", 4, 16, 32, 0.25, "cpu")
    assert dense.key_padding_mask is None and dense.real_tokens == 64
