"""Bad input gets a clear error: the argument's name, what was expected, what came."""

import re

import pytest
import torch

from attention import (
    Decoder,
    Encoder,
    EncoderLayer,
    FeedForward,
    LearnedPositionalEncoding,
    MultiHeadAttention,
    SinusoidalPositionalEncoding,
    Transformer,
)


def raises(exc, *fragments):
    """pytest.raises matching every fragment of the message, in order."""
    return pytest.raises(exc, match=".*".join(re.escape(f) for f in fragments))


# ------------------------------------------------------------------------- constructors


@pytest.mark.parametrize(
    ("build", "exc", "fragments"),
    [
        (lambda: MultiHeadAttention(10, 3), ValueError,
         ["d_model", "multiple of n_heads=3", "d_model=10"]),
        (lambda: MultiHeadAttention(0, 1), ValueError, ["d_model", "positive int", "got 0"]),
        (lambda: MultiHeadAttention(16, 2.0), TypeError, ["n_heads", "positive int", "float"]),
        (lambda: MultiHeadAttention(16, 2, dropout=1.5), ValueError,
         ["dropout", "[0, 1)", "1.5"]),
        (lambda: MultiHeadAttention(6, 2, rotary=True), ValueError,
         ["d_head", "even d_head", "got 3"]),
        (lambda: Encoder(16, 2, 0), ValueError, ["n_layers", "positive int", "got 0"]),
        (lambda: Encoder(16, 2, 1, positional="absolute"), ValueError,
         ["positional", "'sinusoidal', 'learned', 'rotary', None", "'absolute'"]),
        (lambda: Encoder(16, 2, 1, activation="tanh"), ValueError,
         ["activation", "'relu', 'gelu'", "'tanh'"]),
        (lambda: FeedForward(16, d_ff=-4), ValueError, ["d_ff", "positive int", "-4"]),
        (lambda: LearnedPositionalEncoding(16, max_len=0), ValueError, ["max_len", "got 0"]),
        (lambda: Transformer(10, 10, 16, 2, 1, 1, pad_id=10), ValueError,
         ["pad_id", "[0, 10)", "got 10"]),
        (lambda: Transformer(0, 10, 16, 2, 1, 1), ValueError, ["src_vocab_size", "got 0"]),
    ],
)
def test_constructor_errors(build, exc, fragments):
    with raises(exc, *fragments):
        build()


# ------------------------------------------------------------------ MultiHeadAttention


@pytest.fixture
def mha():
    return MultiHeadAttention(16, 2)


def test_query_of_wrong_rank(mha):
    with raises(ValueError, "query", "3-D tensor", "(batch, Lq, d_model=16)", "got shape (5, 16)"):
        mha(torch.randn(5, 16))


def test_query_feature_size(mha):
    with raises(ValueError, "query", "d_model=16", "got shape (2, 5, 12)"):
        mha(torch.randn(2, 5, 12))


def test_integer_query(mha):
    with raises(TypeError, "query", "floating-point", "torch.int64"):
        mha(torch.ones(2, 5, 16, dtype=torch.long))


def test_mismatched_batch(mha):
    with raises(ValueError, "key", "batch (as in query)=2", "got shape (3, 4, 16)"):
        mha(torch.randn(2, 5, 16), torch.randn(3, 4, 16))


def test_key_and_value_lengths(mha):
    with raises(ValueError, "value", "Lk (as in key)=4", "got shape (2, 6, 16)"):
        mha(torch.randn(2, 5, 16), torch.randn(2, 4, 16), torch.randn(2, 6, 16))


def test_value_without_key(mha):
    with raises(ValueError, "value", "None when key is None"):
        mha(torch.randn(2, 5, 16), value=torch.randn(2, 5, 16))


def test_kdim_mismatch():
    mha = MultiHeadAttention(16, 2, kdim=8)
    with raises(ValueError, "key", "kdim=8", "got shape (2, 4, 16)"):
        mha(torch.randn(2, 5, 16), torch.randn(2, 4, 16))


@pytest.mark.parametrize(
    ("kwargs", "exc", "fragments"),
    [
        ({"key_padding_mask": torch.zeros(2, 6, dtype=torch.bool)}, ValueError,
         ["key_padding_mask", "(batch, Lk) = (2, 5)", "got (2, 6)"]),
        ({"key_padding_mask": torch.zeros(2, 1, dtype=torch.bool)}, ValueError,
         ["key_padding_mask", "(2, 5)", "got (2, 1)"]),  # would broadcast: refused
        ({"key_padding_mask": torch.zeros(2, 5, dtype=torch.long)}, TypeError,
         ["key_padding_mask", "torch.bool", "got torch.int64"]),
        ({"attn_mask": torch.zeros(2, 5, dtype=torch.bool)}, ValueError,
         ["attn_mask", "(Lq, Lk) = (5, 5)", "got (2, 5)"]),  # a padding mask in the wrong slot
        ({"attn_mask": torch.zeros(5, dtype=torch.bool)}, ValueError, ["attn_mask", "got (5,)"]),
        ({"attn_mask": torch.zeros(3, 5, 5, dtype=torch.bool)}, ValueError,
         ["attn_mask", "batch * n_heads = 4", "got (3, 5, 5)"]),
        ({"attn_mask": torch.zeros(2, 2, 5, 4)}, ValueError, ["attn_mask", "got (2, 2, 5, 4)"]),
        ({"attn_mask": torch.zeros(5, 5, dtype=torch.int32)}, TypeError,
         ["attn_mask", "torch.bool", "got torch.int32"]),
    ],
)
def test_mask_errors(mha, kwargs, exc, fragments):
    with raises(exc, *fragments):
        mha(torch.randn(2, 5, 16), **kwargs)


# ---------------------------------------------------------------- positional encodings


def test_sequence_longer_than_learned_max_len():
    with raises(ValueError, "x", "at most max_len=4", "got shape (1, 5, 8)"):
        LearnedPositionalEncoding(8, max_len=4)(torch.randn(1, 5, 8))


def test_learned_max_len_counts_the_offset():
    with raises(ValueError, "max_len=4", "offset 3"):
        LearnedPositionalEncoding(8, max_len=4)(torch.randn(1, 2, 8), offset=3)


def test_positional_feature_size():
    with raises(ValueError, "x", "d_model=8", "got shape (1, 5, 6)"):
        SinusoidalPositionalEncoding(8)(torch.randn(1, 5, 6))


def test_encoder_with_learned_positions_refuses_long_input():
    encoder = Encoder(8, 2, 1, positional="learned", max_len=4)
    with raises(ValueError, "max_len=4"):
        encoder(torch.randn(1, 5, 8))


# ------------------------------------------------------------------------------ stacks


@pytest.mark.parametrize("positional", ["sinusoidal", None])
def test_encoder_input_size(positional):
    with raises(ValueError, "x", "d_model=16", "got shape (2, 5, 8)"):
        Encoder(16, 2, 1, positional=positional)(torch.randn(2, 5, 8))


def test_encoder_layer_rank():
    with raises(ValueError, "x", "3-D", "got shape (5, 16)"):
        EncoderLayer(16, 2)(torch.randn(5, 16))


def test_decoder_memory_size():
    with raises(ValueError, "memory", "d_model=16", "got shape (2, 5, 8)"):
        Decoder(16, 2, 1)(torch.randn(2, 3, 16), torch.randn(2, 5, 8))


def test_decoder_memory_batch():
    with raises(ValueError, "key", "batch (as in query)=2", "got shape (3, 5, 16)"):
        Decoder(16, 2, 1)(torch.randn(2, 3, 16), torch.randn(3, 5, 16))


@pytest.fixture
def model():
    return Transformer(10, 12, 16, 2, 1, 1)


def test_float_token_ids(model):
    with raises(TypeError, "src_ids", "torch.int64", "got torch.float32"):
        model(torch.ones(2, 3), torch.ones(2, 3, dtype=torch.long))


def test_token_ids_outside_the_vocabulary(model):
    with raises(ValueError, "tgt_ids", "[0, 12)", "from 1 to 12"):
        model(torch.ones(2, 3, dtype=torch.long), torch.tensor([[1, 12, 3], [1, 2, 3]]))


def test_source_and_target_batch(model):
    with raises(ValueError, "tgt_ids", "batch=2", "got shape (3, 4)"):
        model(torch.ones(2, 3, dtype=torch.long), torch.ones(3, 4, dtype=torch.long))


def test_token_ids_rank(model):
    with raises(ValueError, "src_ids", "2-D", "got shape (3,)"):
        model.encode(torch.ones(3, dtype=torch.long))


@pytest.mark.parametrize(
    ("kwargs", "fragments"),
    [
        ({"beam_size": 0}, ["beam_size", "positive int", "got 0"]),
        ({"max_new_tokens": 0}, ["max_new_tokens", "got 0"]),
        ({"eos_id": 12}, ["eos_id", "[0, 12)", "got 12"]),
        ({"eos_id": 0}, ["eos_id", "distinct", "pad_id=0", "eos_id=0"]),
        ({"eos_id": 1}, ["eos_id", "distinct", "bos_id=1, eos_id=1"]),
        ({"bos_id": 0}, ["bos_id", "distinct", "pad_id=0", "bos_id=0"]),
    ],
)
def test_generate_arguments(model, kwargs, fragments):
    arguments = {"max_new_tokens": 5, "bos_id": 1, "eos_id": 2} | kwargs
    with raises(ValueError, *fragments):
        model.generate(torch.ones(2, 3, dtype=torch.long), **arguments)


def test_generate_length_penalty_type(model):
    with raises(TypeError, "length_penalty", "float", "str"):
        model.generate(torch.ones(2, 3, dtype=torch.long), 5, 1, 2, length_penalty="x")


def test_generate_longer_than_learned_positions():
    model = Transformer(10, 12, 16, 2, 1, 1, positional="learned", max_len=8)
    with raises(ValueError, "max_new_tokens", "max_len=8", "got 20"):
        model.generate(torch.ones(2, 3, dtype=torch.long), 20, 1, 2)
