"""What the Encoder and Decoder stacks share, and what they keep off the hot path: rotary
angles computed once per forward, the id-range check without a host read on accelerators,
one residual wiring for every layer (compat's included), where learned positions end."""

from __future__ import annotations

from unittest import mock

import pytest
import torch
from torch.testing import assert_close

from attention import Decoder, Encoder, EncoderLayer, Transformer, compat
from attention.layers import residual
from attention.models import _check_ids
from attention.positional import RotaryEmbedding

D, H = 16, 2


def count_cos_sin():
    return mock.patch.object(RotaryEmbedding, "cos_sin", autospec=True,
                             side_effect=RotaryEmbedding.cos_sin)


@pytest.mark.parametrize("padded", [False, True], ids=["dense", "packed"])
def test_rotary_angles_are_computed_once_per_encoder_forward(padded):
    torch.manual_seed(0)
    encoder = Encoder(D, H, n_layers=3, positional="rotary", dropout=0.0).eval()
    x = torch.randn(2, 5, D)
    padding = torch.tensor([[False] * 5, [False] * 3 + [True] * 2]) if padded else None
    with count_cos_sin() as cos_sin:
        out = encoder(x, key_padding_mask=padding)
    assert cos_sin.call_count == 1
    # and the angles shared by the stack are those each layer would compute for itself
    expected = x
    for layer in encoder.layers:
        expected = layer(expected, key_padding_mask=padding)
    expected = encoder.norm(expected)
    if padded:
        expected = expected.masked_fill(padding.unsqueeze(-1), 0.0)
    assert_close(out, expected)


def test_rotary_angles_once_per_decoder_step_with_a_cache():
    torch.manual_seed(0)
    decoder = Decoder(D, H, n_layers=3, positional="rotary", dropout=0.0).eval()
    x, memory = torch.randn(2, 4, D), torch.randn(2, 6, D)
    full = decoder(x, memory)
    cache = decoder.new_cache()
    with count_cos_sin() as cos_sin:
        steps = [decoder(x[:, i:i + 1], memory, cache=cache) for i in range(4)]
    assert cos_sin.call_count == 4
    assert_close(torch.cat(steps, dim=1), full, atol=1e-5, rtol=1e-5)


def test_rotary_cos_sin_of_the_wrong_length_is_refused():
    layer = EncoderLayer(D, H, rotary=True)
    cos_sin = layer.self_attn.rotary.cos_sin(3)
    with pytest.raises(ValueError, match=r"rotary_cos_sin: expected .*Lq=5"):
        layer(torch.randn(1, 5, D), rotary_cos_sin=cos_sin)


def test_id_range_is_checked_on_the_host_only_on_the_cpu():
    with pytest.raises(ValueError, match=r"src_ids: expected ids in \[0, 10\).*from 0 to 12"):
        _check_ids("src_ids", torch.tensor([[0, 12]]), 10)
    # Elsewhere no value is read back: a meta tensor has none to read, and the check is
    # handed to the device as an asynchronous assert.
    ids = torch.zeros(2, 3, dtype=torch.long, device="meta")
    with mock.patch.object(torch, "_assert_async") as device_assert:
        assert _check_ids("src_ids", ids, 10) is ids
    (condition, message), _ = device_assert.call_args
    assert condition.device.type == "meta" and condition.dtype == torch.bool
    assert message.startswith("src_ids: expected ids in [0, 10)")


def test_a_training_forward_checks_each_id_tensor_once():
    model = Transformer(20, 20, d_model=D, n_heads=H, n_encoder_layers=1, n_decoder_layers=1)
    src, tgt = torch.randint(1, 20, (2, 5)), torch.randint(1, 20, (2, 4))
    with mock.patch("attention.models._check_id_range") as check:
        model(src, tgt)
    assert [call.args[0] for call in check.call_args_list] == ["src_ids", "tgt_ids"]


@pytest.mark.parametrize("norm_first", [True, False])
def test_residual_is_the_pre_or_post_norm_block(norm_first):
    torch.manual_seed(0)
    x = torch.randn(2, 3, D)
    norm, dropout = torch.nn.LayerNorm(D), torch.nn.Identity()
    sublayer = torch.nn.Linear(D, D)
    expected = x + sublayer(norm(x)) if norm_first else norm(x + sublayer(x))
    assert_close(residual(x, sublayer, norm, dropout, norm_first), expected)


@pytest.mark.parametrize("module, blocks", [("encoder", 2), ("decoder", 3)])
def test_compat_layers_run_the_residual_block_of_every_layer(module, blocks):
    """torch.nn's layers in attention.compat wire their sub-layers with the same
    ``residual`` as this package's own layers."""
    x = torch.randn(2, 3, D)
    if module == "encoder":
        layer = compat.TransformerEncoderLayer(D, H, 32, dropout=0.0, batch_first=True)
        call = lambda: layer(x)  # noqa: E731
    else:
        layer = compat.TransformerDecoderLayer(D, H, 32, dropout=0.0, batch_first=True)
        call = lambda: layer(x, x)  # noqa: E731
    with mock.patch(f"attention.compat.{module}.residual", side_effect=residual) as wiring:
        call()
    assert wiring.call_count == blocks


@pytest.mark.parametrize("positional, expected", [("learned", 12), ("sinusoidal", None),
                                                  ("rotary", None), (None, None)])
def test_max_positions(positional, expected):
    assert Encoder(D, H, 1, positional=positional, max_len=12).max_positions == expected
    assert Decoder(D, H, 1, positional=positional, max_len=12).max_positions == expected


@pytest.mark.parametrize("is_causal", [False, True])
def test_compile_with_dynamic_shapes_takes_the_causal_flag(is_causal):
    """With dynamic shapes, whether SDPA's own causal mask applies (Lq == Lk) is symbolic
    while compiling; SDPA takes a plain bool only."""
    torch.compiler.reset()  # Encoder.forward's compile cache is shared by the whole suite
    torch.manual_seed(0)
    encoder = Encoder(D, H, n_layers=2, dropout=0.0).eval()
    compiled = torch.compile(encoder, fullgraph=True, dynamic=True, backend="eager")
    for length in (6, 9):
        x = torch.randn(2, length, D)
        assert_close(compiled(x, is_causal=is_causal), encoder(x, is_causal=is_causal))
    torch.compiler.reset()


def test_compiled_transformer_takes_new_batch_shapes_without_recompiling():
    """Token batches differ in size and length at every step: compiled with dynamic shapes,
    the padded batches (packed inside, a graph break at the data-dependent token count)
    run without a recompile per shape. A size turned into text while tracing (an error
    message built eagerly) used to fix the graph to that size."""
    torch.compiler.reset()
    torch.manual_seed(0)
    model = Transformer(30, 30, d_model=D, n_heads=H, n_encoder_layers=1, n_decoder_layers=1,
                        dropout=0.0)
    compiled = torch.compile(model, dynamic=True, backend="eager")

    def batch(size: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        src = torch.randint(3, 30, (size, length))
        src[0, length // 2:] = 0  # padding, so the packed path runs
        return src, torch.randint(3, 30, (size, length + 1))

    compiled(*batch(3, 5)).sum().backward()
    with torch.compiler.set_stance("fail_on_recompile"):
        for size, length in [(4, 7), (2, 9), (5, 6)]:
            src, tgt = batch(size, length)
            assert_close(compiled(src, tgt), model(src, tgt))
    torch.compiler.reset()
