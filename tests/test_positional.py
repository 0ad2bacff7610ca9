"""Positional encodings: the paper's table, learned positions, rotary embeddings."""

import math

import pytest
import torch
from torch.testing import assert_close

from attention import (
    Encoder,
    LearnedPositionalEncoding,
    MultiHeadAttention,
    RotaryEmbedding,
    SinusoidalPositionalEncoding,
)
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


def roformer_rotation(x, position, base):
    """RoFormer's rotation in the GPT-NeoX layout, by hand: pair ``(k, k + d/2)`` turns by
    ``position · θ_k``, ``θ_k = base^(-2k/d)``."""
    d = len(x)
    out = [0.0] * d
    for k in range(d // 2):
        angle = position * base ** (-2 * k / d)
        out[k] = x[k] * math.cos(angle) - x[k + d // 2] * math.sin(angle)
        out[k + d // 2] = x[k + d // 2] * math.cos(angle) + x[k] * math.sin(angle)
    return out


@pytest.mark.parametrize("base", [None, 100.0, 7.5])
def test_rotary_is_the_roformer_rotation_at_explicit_positions(base):
    rotary = RotaryEmbedding(4) if base is None else RotaryEmbedding(4, base)
    base = 10000.0 if base is None else base
    x = torch.tensor([1.0, 2.0, 3.0, 4.0]).expand(1, 1, 6, 4)  # positions 0 … 5
    rotated = rotary(x)
    for position in (0, 1, 5):
        expected = torch.tensor(roformer_rotation([1.0, 2.0, 3.0, 4.0], position, base))
        torch.testing.assert_close(rotated[0, 0, position], expected)
        # the same position given as an offset (a decoding step on a cache)
        torch.testing.assert_close(rotary(x[:, :, :1], position)[0, 0, 0], expected)


def test_rotary_with_base_100_written_out():
    """d_head=4, base 100: θ = (1, 0.1); pairs (x0, x2) and (x1, x3); position 5."""
    x = torch.tensor([1.0, 2.0, 3.0, 4.0]).reshape(1, 1, 1, 4)
    c1, s1, c2, s2 = math.cos(5), math.sin(5), math.cos(0.5), math.sin(0.5)
    expected = torch.tensor([1 * c1 - 3 * s1, 2 * c2 - 4 * s2, 3 * c1 + 1 * s1, 4 * c2 + 2 * s2])
    torch.testing.assert_close(RotaryEmbedding(4, base=100.0)(x, 5)[0, 0, 0], expected)


def test_each_layer_rotates_with_its_own_base():
    """ModernBERT's layout: global layers with one rotary base, local ones with another;
    the stack computes each base's angles once and hands each layer its own."""
    torch.manual_seed(0)
    encoder = Encoder(16, 2, 3, dropout=0.0, positional="rotary", window=2, global_every=2,
                      rotary_base=500.0, global_rotary_base=80000.0).eval()
    assert [layer.self_attn.rotary.base for layer in encoder.layers] == [80000.0, 500.0,
                                                                         80000.0]
    x = torch.randn(2, 9, 16)
    by_hand = x
    for layer in encoder.layers:  # each layer computing its own angles
        by_hand = layer(by_hand)
    assert_close(encoder(x), encoder.norm(by_hand))
    same_base = Encoder(16, 2, 3, dropout=0.0, positional="rotary", window=2,
                        global_every=2).eval()
    same_base.load_state_dict(encoder.state_dict())
    assert not torch.allclose(same_base(x), encoder(x))


def test_rotary_base_arguments_are_checked():
    with pytest.raises(ValueError, match="rotary_base: expected a positive finite number"):
        MultiHeadAttention(16, 2, rotary=True, rotary_base=0)
    with pytest.raises(ValueError, match="global_rotary_base: expected None without "
                                         "global_every"):
        Encoder(16, 2, 2, positional="rotary", global_rotary_base=1e5)


def test_rotary_frequencies_stay_float32_in_half_precision_models():
    encoder = Encoder(16, 2, 1, positional="rotary").to(torch.bfloat16)
    rotary = encoder.layers[0].self_attn.rotary
    assert rotary.inv_freq.dtype == torch.float32
    assert torch.equal(rotary.inv_freq, RotaryEmbedding(8).inv_freq)


def test_global_rotary_base_is_checked_by_its_name():
    with pytest.raises(ValueError, match="global_rotary_base: expected a positive finite"):
        Encoder(16, 2, 2, positional="rotary", window=2, global_every=2,
                global_rotary_base=-1.0)
    with pytest.raises(ValueError, match="global_rotary_base: expected None without "
                                         "global_every and positional='rotary'"):
        Encoder(16, 2, 2, window=2, global_every=2, global_rotary_base=1e5)


MODEL_POSITIONS = [{"positional": "sinusoidal"}, {"positional": "rotary"},
                   {"positional": None, "alibi": True}]


@pytest.mark.parametrize("options", MODEL_POSITIONS, ids=["sinusoidal", "rotary", "alibi"])
def test_a_model_built_on_meta_given_storage_and_loaded_equals_the_original(options):
    """The usual start of a large model: build on the meta device, ``to_empty``, load the
    weights. The computed tables (no state dict carries them) must not be left as whatever
    memory held."""
    from attention import Transformer

    torch.manual_seed(0)
    reference = Transformer(11, 13, d_model=16, n_heads=4, n_encoder_layers=1,
                            n_decoder_layers=1, **options).eval()
    with torch.device("meta"):
        model = Transformer(11, 13, d_model=16, n_heads=4, n_encoder_layers=1,
                            n_decoder_layers=1, **options)
    model.to_empty(device="cpu").load_state_dict(reference.state_dict())
    model.eval()
    src, tgt = torch.randint(1, 11, (2, 7)), torch.randint(1, 13, (2, 5))
    assert torch.equal(model(src, tgt), reference(src, tgt))


def test_reset_parameters_computes_the_tables_again():
    encoding, rotary = SinusoidalPositionalEncoding(8, max_len=16), RotaryEmbedding(8)
    attention = MultiHeadAttention(16, 4, alibi=True)
    expected = (encoding.pe.clone(), rotary.inv_freq.clone(), attention.alibi_slopes.clone())
    for table in (encoding.pe, rotary.inv_freq, attention.alibi_slopes):
        table.fill_(float("nan"))
    with torch.device("meta"):  # the tables are made on the CPU, whatever the default
        encoding.reset_parameters()
        rotary.reset_parameters()
        attention.reset_parameters()
    assert torch.equal(encoding.pe, expected[0]) and torch.equal(rotary.inv_freq, expected[1])
    assert torch.equal(attention.alibi_slopes, expected[2])
