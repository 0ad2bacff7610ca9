"""The speed paths give the results of the plain computation.

Padded batches run on their real tokens only (same results on real positions, zeros at
padding, forward and backward); the fused q/k/v product steps aside for hooked or replaced
projections; the attention backend switch and the kernel choice."""

from __future__ import annotations

from unittest import mock

import pytest
import torch
from torch.nn.attention import SDPBackend
from torch.testing import assert_close

from attention import Encoder, EncoderLayer, MultiHeadAttention
from attention.functional import BACKENDS, attend, attention_backend, sdpa_priority
from attention.layers import pack_padding
from attention.multihead import can_use_varlen
from attention.packing import Packing

D, H = 16, 2


def ragged_mask() -> torch.Tensor:
    """(4, 7): right padding, left padding, a hole in the middle, a fully padded row."""
    mask = torch.zeros(4, 7, dtype=torch.bool)
    mask[0, 5:] = True
    mask[1, :2] = True
    mask[2, 3] = True
    mask[3] = True
    return mask


def as_float(mask: torch.Tensor) -> torch.Tensor:
    """The same padding as an additive mask, which runs the padded computation."""
    return torch.zeros(mask.shape).masked_fill(mask, float("-inf"))


def test_packing_round_trip_and_sequence_offsets():
    mask = ragged_mask()
    packing = Packing.from_mask(mask)
    assert packing.tokens == int((~mask).sum()) == 5 + 5 + 6
    assert packing.cu_seqlens.tolist() == [0, 5, 10, 16, 16]
    assert packing.cu_seqlens.dtype == torch.int32
    assert packing.max_seqlen() == 6
    x = torch.randn(4, 7, 3)
    packed = packing.pack(x)
    assert packed.shape == (16, 3)
    assert torch.equal(packed, x[~mask])  # row-major order: each sequence's tokens together
    back = packing.unpack(packed)
    assert torch.equal(back[~mask], x[~mask]) and not back[mask].any()


def test_packing_rejects_a_float_or_wrongly_shaped_mask():
    with pytest.raises(TypeError, match="key_padding_mask: expected dtype torch.bool"):
        Packing.from_mask(as_float(ragged_mask()))
    with pytest.raises(ValueError, match=r"key_padding_mask: expected a 2-D .* \(4, 7, 1\)"):
        Packing.from_mask(ragged_mask()[..., None])


@pytest.mark.parametrize("positional", ["sinusoidal", "learned", "rotary", None])
@pytest.mark.parametrize("norm_first", [True, False], ids=["pre-norm", "post-norm"])
def test_encoder_on_real_tokens_equals_padded_computation(positional, norm_first):
    torch.manual_seed(0)
    encoder = Encoder(D, H, 2, 32, dropout=0.0, positional=positional, norm_first=norm_first)
    mask = ragged_mask()
    real = ~mask
    x = torch.randn(4, 7, D, requires_grad=True)

    packed = encoder(x, key_padding_mask=mask)
    padded = encoder(x, key_padding_mask=as_float(mask))
    assert_close(packed[real], padded[real])
    assert not packed[mask].any()  # zeros at padding, as torch.nn's nested-tensor path

    weights = torch.randn(real.sum(), D)
    grads = [torch.autograd.grad((out[real] * weights).sum(), [x, *encoder.parameters()])
             for out in (packed, padded)]
    for got, expected in zip(*grads, strict=True):
        assert_close(got, expected)


def test_encoder_packs_with_causal_and_attention_masks():
    torch.manual_seed(0)
    encoder = Encoder(D, H, 2, dropout=0.0, positional="rotary").eval()
    mask = ragged_mask()
    x = torch.randn(4, 7, D)
    bias = torch.randn(4 * H, 7, 7)
    for kwargs in ({"is_causal": True}, {"attn_mask": bias}):
        packed = encoder(x, key_padding_mask=mask, **kwargs)
        padded = encoder(x, key_padding_mask=as_float(mask), **kwargs)
        assert_close(packed[~mask], padded[~mask])


def test_encoder_with_weights_requested_keeps_the_padded_layout():
    torch.manual_seed(0)
    encoder = Encoder(D, H, 2, dropout=0.0).eval()
    mask = ragged_mask()
    x = torch.randn(4, 7, D)
    out, weights = encoder(x, key_padding_mask=mask, return_attention=True)
    assert len(weights) == 2 and weights[0].shape == (4, H, 7, 7)
    assert_close(out[~mask], encoder(x, key_padding_mask=mask)[~mask])


def test_encoder_layer_packs_on_its_own():
    torch.manual_seed(0)
    layer = EncoderLayer(D, H, 32, dropout=0.0).eval()
    mask = ragged_mask()
    x = torch.randn(4, 7, D)
    out = layer(x, key_padding_mask=mask)
    assert_close(out[~mask], layer(x, key_padding_mask=as_float(mask))[~mask])
    assert not out[mask].any()


def test_packed_self_attention_refuses_what_it_cannot_take():
    mha = MultiHeadAttention(D, H)
    packing = Packing.from_mask(ragged_mask())
    tokens = torch.randn(packing.tokens, D)
    with pytest.raises(ValueError, match="key: expected None with packing="):
        mha(tokens, tokens, packing=packing)
    with pytest.raises(ValueError, match="need_weights: expected False with packing="):
        mha(tokens, need_weights=True, packing=packing)
    with pytest.raises(ValueError, match=r"query: expected real tokens .*=16 at dim 0"):
        mha(tokens[:3], packing=packing)


def test_dropout_in_training_stays_on_the_packed_path():
    torch.manual_seed(0)
    encoder = Encoder(D, H, 2, dropout=0.5).train()
    out = encoder(torch.randn(4, 7, D), key_padding_mask=ragged_mask())
    assert out.isfinite().all() and not out[ragged_mask()].any()


def test_hooked_or_replaced_projections_run_their_own_forward():
    """The fused q/k/v product reads bare weights only from plain, unhooked nn.Linear."""
    torch.manual_seed(0)
    mha = MultiHeadAttention(D, H).eval()
    x = torch.randn(2, 5, D)
    seen = []
    handle = mha.q_proj.register_forward_hook(lambda module, args, out: seen.append(out))
    assert_close(mha(x)[0], mha(x, x, x)[0])
    assert len(seen) == 2
    handle.remove()

    class Doubled(torch.nn.Module):  # a wrapper, as LoRA or quantization put in place
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, x):
            return 2 * self.inner(x)

    plain = mha(x)[0]
    mha.v_proj = Doubled(mha.v_proj)
    assert_close(mha(x)[0], 2 * plain, atol=1e-5, rtol=1e-5)  # out_proj is linear in v


def test_packed_layer_refuses_a_second_mask():
    layer = EncoderLayer(D, H)
    packing = Packing.from_mask(ragged_mask())
    tokens = torch.randn(packing.tokens, D)
    with pytest.raises(ValueError, match="packing: expected neither key_padding_mask"):
        layer(tokens, key_padding_mask=ragged_mask(), packing=packing)
    with pytest.raises(TypeError, match="key_padding_mask: expected a bool Tensor"):
        Packing.from_mask([[True]])


# ------------------------------------------------------------------ attention backends


def test_explicit_backend_equals_the_fused_kernel():
    torch.manual_seed(0)
    encoder = Encoder(D, H, 2, dropout=0.0).eval()
    x = torch.randn(4, 7, D)
    mask = ragged_mask()
    fused = encoder(x, key_padding_mask=mask)
    with attention_backend("explicit"):
        explicit = encoder(x, key_padding_mask=mask)
    assert_close(explicit, fused)


def test_backend_blocks_nest_and_restore():
    q = torch.randn(1, 2, 3, 4)
    counting = mock.patch("torch.nn.functional.scaled_dot_product_attention",
                          wraps=torch.nn.functional.scaled_dot_product_attention)
    with counting as sdpa:
        with attention_backend("explicit"):
            with attention_backend("math"):
                attend(q, q, q)
            attend(q, q, q)
        attend(q, q, q)
    assert sdpa.call_count == 2  # math, then auto; explicit does not call the fused kernel


def test_forcing_a_kernel_the_device_lacks_raises():
    q = torch.randn(1, 2, 3, 4)
    with attention_backend("flash"):
        attend(q, q, q)  # the CPU has a flash kernel
    with attention_backend("cudnn"), pytest.raises(RuntimeError, match="No viable backend"):
        attend(q, q, q)


def test_unknown_backend_names_the_argument():
    with pytest.raises(ValueError, match=r"backend: expected one of \['auto', 'explicit'"):
        with attention_backend("fast"):
            pass
    assert "auto" in BACKENDS


def test_auto_puts_cudnn_first_on_hopper_only():
    assert sdpa_priority(torch.device("cpu")) is None
    with mock.patch("torch.cuda.get_device_capability", return_value=(9, 0)):
        assert sdpa_priority(torch.device("cuda"))[0] == SDPBackend.CUDNN_ATTENTION
    with mock.patch("torch.cuda.get_device_capability", return_value=(8, 0)):
        assert sdpa_priority(torch.device("cuda")) is None


def test_varlen_kernel_only_where_it_applies():
    cuda, bf16 = torch.device("cuda"), torch.bfloat16
    plain = dict(masked=False, dropout_p=0.0, rotary=False)
    with mock.patch("torch.cuda.get_device_capability", return_value=(9, 0)):
        assert can_use_varlen(cuda, bf16, 64, **plain)
        assert not can_use_varlen(torch.device("cpu"), bf16, 64, **plain)
        assert not can_use_varlen(cuda, torch.float32, 64, **plain)
        assert not can_use_varlen(cuda, bf16, 12, **plain)  # not a multiple of 8
        assert not can_use_varlen(cuda, bf16, 320, **plain)  # beyond the kernel's 256
        assert not can_use_varlen(cuda, bf16, 64, **{**plain, "masked": True})
        assert not can_use_varlen(cuda, bf16, 64, **{**plain, "dropout_p": 0.1})
        assert not can_use_varlen(cuda, bf16, 64, **{**plain, "rotary": True})
        with attention_backend("explicit"):
            assert not can_use_varlen(cuda, bf16, 64, **plain)
    with mock.patch("torch.cuda.get_device_capability", return_value=(7, 5)):  # T4
        assert not can_use_varlen(cuda, bf16, 64, **plain)


@pytest.mark.parametrize("variant", [
    {}, {"positional": "rotary"}, {"positional": "rotary", "window": 5, "n_kv_heads": 1},
    {"alibi": True, "window": (3, 0)}])
def test_long_padded_sequences_attend_one_at_a_time_as_if_alone(variant):
    """Sequences averaging SEQUENCE_BY_SEQUENCE_MIN_TOKENS real tokens or more attend one at
    a time on the CPU (no padded keys, no padding mask): each row, right- or left-padded,
    gives what it gives encoded alone, and the padded layout's path agrees."""
    from attention.multihead import SEQUENCE_BY_SEQUENCE_MIN_TOKENS as MIN

    torch.manual_seed(0)
    encoder = Encoder(D, H, 2, dropout=0.0, **{"positional": "sinusoidal", **variant}).eval()
    length = 2 * MIN
    x = torch.randn(3, length, D)
    mask = torch.zeros(3, length, dtype=torch.bool)
    mask[1, length - 40:] = True  # right padding
    mask[2, :25] = True  # left padding
    with torch.no_grad(), mock.patch.object(
            MultiHeadAttention, "_sequence_by_sequence_attention",
            autospec=True, side_effect=MultiHeadAttention._sequence_by_sequence_attention
    ) as one_at_a_time:
        out = encoder(x, key_padding_mask=mask)
        assert one_at_a_time.call_count == 2  # once per layer
    with torch.no_grad():
        padded = encoder(x, key_padding_mask=as_float(mask))
    real = ~mask
    assert_close(out[real], padded[real], atol=1e-5, rtol=1e-5)
    assert (out[mask] == 0).all()
    if "positional" in variant:  # positions inside attention only: a row alone is the same
        with torch.no_grad():
            alone = encoder(x[1:2, : length - 40])
        assert_close(out[1, : length - 40], alone[0], atol=1e-5, rtol=1e-5)


def test_short_or_holed_sequences_keep_the_padded_layout():
    torch.manual_seed(0)
    encoder = Encoder(D, H, 1, dropout=0.0).eval()
    with mock.patch.object(MultiHeadAttention, "_sequence_by_sequence_attention") as spy:
        encoder(torch.randn(4, 7, D), key_padding_mask=ragged_mask())  # short, a hole
        assert not spy.called


def test_a_mask_with_nothing_padded_runs_as_no_mask():
    torch.manual_seed(0)
    encoder = Encoder(D, H, 2, dropout=0.0).eval()
    x = torch.randn(2, 9, D)
    with torch.no_grad(), mock.patch("attention.models.pack_padding",
                                     wraps=pack_padding) as packing:
        out = encoder(x, key_padding_mask=torch.zeros(2, 9, dtype=torch.bool))
        assert packing.call_args.args[0] is None
    assert torch.equal(out, encoder(x))


def test_long_inputs_without_autograd_project_q_k_v_separately():
    """At least d_model rows without autograd: three products instead of stacking the three
    weights; the same results as the stacked product, and hooks on a projection still run."""
    torch.manual_seed(0)
    attention = MultiHeadAttention(D, H).eval()
    x = torch.randn(2, D, D)  # 2·D rows
    with torch.no_grad(), mock.patch.object(MultiHeadAttention, "project_qkv",
                                            autospec=True) as stacked:
        separate, _ = attention(x)
        assert not stacked.called
    stacked_out, _ = attention(x)  # autograd on: the stacked product
    assert_close(separate, stacked_out)
    seen = []
    attention.k_proj.register_forward_hook(lambda module, args, out: seen.append(out.shape))
    with torch.no_grad():
        attention(x)
    assert seen == [torch.Size([2, D, D])]
