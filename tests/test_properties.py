"""Hypothesis properties of attention, the Encoder, caches and positional encodings.

Shapes, mask patterns and seeds are drawn; tensors are built from the drawn seed with
``torch.manual_seed``. Masks follow torch.nn: a boolean ``True`` means "may not attend".
"""

from __future__ import annotations

from functools import cache

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from attention import (
    Encoder,
    KVCache,
    LearnedPositionalEncoding,
    MultiHeadAttention,
    SinusoidalPositionalEncoding,
    Transformer,
    attend,
)

SETTINGS = settings(max_examples=30, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.too_slow])

seeds = st.integers(0, 2**31 - 1)
densities = st.sampled_from([0.0, 0.2, 0.5, 0.8, 1.0])  # share of True (blocked) entries


def bernoulli(shape, p):
    return torch.rand(shape) < p


def chunk_sizes(draw, length):
    """Split ``length`` positions into consecutive chunks: one at a time, or random sizes."""
    if draw(st.booleans()):
        return [1] * length
    sizes = []
    while sum(sizes) < length:
        sizes.append(draw(st.integers(1, length - sum(sizes))))
    return sizes


# --------------------------------------------------------------------------- attend


@st.composite
def attention_problems(draw):
    batch, heads = draw(st.integers(1, 3)), draw(st.integers(1, 3))
    q_len, k_len, d_head = draw(st.integers(1, 6)), draw(st.integers(1, 6)), draw(st.integers(1, 8))
    torch.manual_seed(draw(seeds))
    q = torch.randn(batch, heads, q_len, d_head, requires_grad=True)
    k = torch.randn(batch, heads, k_len, d_head, requires_grad=True)
    v = torch.randn(batch, heads, k_len, d_head, requires_grad=True)
    kwargs = {}
    layout = draw(st.sampled_from(["none", "LqLk", "BHLqLk", "1HLqLk", "B1LqLk"]))
    if layout != "none":
        shape = {"LqLk": (q_len, k_len), "BHLqLk": (batch, heads, q_len, k_len),
                 "1HLqLk": (1, heads, q_len, k_len), "B1LqLk": (batch, 1, q_len, k_len)}[layout]
        kwargs["attn_mask"] = bernoulli(shape, draw(densities))
    if draw(st.booleans()):
        kwargs["key_padding_mask"] = bernoulli((batch, k_len), draw(densities))
    kwargs["is_causal"] = draw(st.booleans())
    float_masks = draw(st.booleans())
    blocked = torch.zeros(batch, heads, q_len, k_len, dtype=torch.bool)
    if "attn_mask" in kwargs:
        blocked = blocked | kwargs["attn_mask"]
    if "key_padding_mask" in kwargs:
        blocked = blocked | kwargs["key_padding_mask"][:, None, None, :]
    if kwargs["is_causal"]:  # query i sees keys 0 … k_len - q_len + i
        blocked = blocked | (torch.arange(k_len) > torch.arange(q_len)[:, None] + k_len - q_len)
    if float_masks:  # the same masks as -inf biases
        for name in ("attn_mask", "key_padding_mask"):
            if name in kwargs:
                kwargs[name] = torch.zeros(kwargs[name].shape).masked_fill(kwargs[name],
                                                                           float("-inf"))
    return (q, k, v), kwargs, blocked


@SETTINGS
@given(attention_problems())
def test_weights_are_a_distribution_over_allowed_keys(problem):
    (q, k, v), kwargs, blocked = problem
    out, weights = attend(q, k, v, need_weights=True, **kwargs)
    empty = blocked.all(dim=-1)  # (b, h, i): rows that see no key
    assert torch.isfinite(out).all() and torch.isfinite(weights).all()
    assert torch.all(weights[blocked] == 0)  # masked keys get exactly nothing
    assert torch.all(weights >= 0)
    sums = weights.sum(dim=-1)
    torch.testing.assert_close(sums[~empty], torch.ones_like(sums[~empty]))
    assert torch.all(sums[empty] == 0) and torch.all(out[empty] == 0)


@SETTINGS
@given(attention_problems(), st.booleans())
def test_no_nan_in_gradients_for_any_mask(problem, need_weights):
    (q, k, v), kwargs, blocked = problem
    out, weights = attend(q, k, v, need_weights=need_weights, **kwargs)
    loss = (out * torch.randn_like(out)).sum()
    if weights is not None:
        loss = loss + (weights * torch.randn_like(weights)).sum()
    loss.backward()
    for t in (q, k, v):
        assert t.grad is not None and torch.isfinite(t.grad).all()
    empty = blocked.all(dim=-1)
    assert torch.all(q.grad[empty] == 0)


@SETTINGS
@given(attention_problems(), st.sampled_from([None, 0.5, 2.0]))
def test_explicit_and_fused_paths_agree(problem, scale):
    (q, k, v), kwargs, _ = problem
    explicit, _ = attend(q, k, v, need_weights=True, scale=scale, **kwargs)
    fused, none = attend(q, k, v, need_weights=False, scale=scale, **kwargs)
    assert none is None
    torch.testing.assert_close(fused, explicit, atol=1e-5, rtol=1e-5)


# --------------------------------------------------------------------------- Encoder


@cache
def encoder(positional=None):
    torch.manual_seed(0)
    return Encoder(8, 2, 2, d_ff=16, dropout=0.0, positional=positional).eval()


@cache
def mha(rotary):
    torch.manual_seed(1)
    return MultiHeadAttention(8, 2, rotary=rotary).eval()


LAYOUTS = ("packed", "padded")


def padding_as(padding, layout):
    """The padding mask the way the Encoder is given it: boolean (it packs the real tokens
    and computes them alone) or float, 0 / -inf (it runs the padded layout, masks added)."""
    if layout == "packed":
        return padding
    return torch.zeros(padding.shape).masked_fill(padding, float("-inf"))


@SETTINGS
@given(st.integers(1, 3), st.integers(1, 6), seeds, densities, st.data())
def test_encoder_without_positions_is_permutation_equivariant(batch, length, seed, p, data):
    torch.manual_seed(seed)
    x = torch.randn(batch, length, 8)
    padding = bernoulli((batch, length), p)
    perm = torch.tensor(data.draw(st.permutations(range(length))), dtype=torch.long)
    for layout in LAYOUTS:
        mask = padding_as(padding, layout)
        with torch.no_grad():
            out = encoder()(x, key_padding_mask=mask)
            permuted = encoder()(x[:, perm], key_padding_mask=mask[:, perm])
        torch.testing.assert_close(permuted, out[:, perm], atol=1e-5, rtol=1e-5)


@SETTINGS
@given(st.integers(1, 3), st.integers(1, 6), seeds, densities,
       st.sampled_from([None, "sinusoidal", "rotary"]))
def test_encoder_padded_tokens_do_not_affect_real_positions(batch, length, seed, p, positional):
    torch.manual_seed(seed)
    x = torch.randn(batch, length, 8)
    padding = bernoulli((batch, length), p)
    changed = torch.where(padding[..., None], torch.randn(batch, length, 8), x)
    real = {}
    for layout in LAYOUTS:
        mask = padding_as(padding, layout)
        with torch.no_grad():
            out = encoder(positional)(x, key_padding_mask=mask)
            out_changed = encoder(positional)(changed, key_padding_mask=mask)
        assert torch.isfinite(out).all()
        torch.testing.assert_close(out_changed[~padding], out[~padding])
        real[layout] = out[~padding]
    # and both layouts give real positions the same values
    torch.testing.assert_close(real["packed"], real["padded"], atol=1e-5, rtol=1e-5)


@SETTINGS
@given(st.integers(1, 3), st.integers(2, 6), seeds, st.data(),
       st.sampled_from([None, "sinusoidal", "rotary"]))
def test_encoder_causal_outputs_ignore_later_tokens(batch, length, seed, data, positional):
    cut = data.draw(st.integers(1, length - 1))
    torch.manual_seed(seed)
    x = torch.randn(batch, length, 8)
    changed = torch.cat([x[:, :cut], torch.randn(batch, length - cut, 8)], dim=1)
    with torch.no_grad():
        out = encoder(positional)(x, is_causal=True)
        out_changed = encoder(positional)(changed, is_causal=True)
    torch.testing.assert_close(out_changed[:, :cut], out[:, :cut])
    assert not torch.allclose(out_changed[:, cut:], out[:, cut:])


@SETTINGS
@given(st.integers(1, 3), st.integers(2, 6), seeds, st.data(), st.booleans(), st.booleans())
def test_mha_causal_outputs_ignore_later_tokens(batch, length, seed, data, rotary, need_weights):
    cut = data.draw(st.integers(1, length - 1))
    torch.manual_seed(seed)
    x = torch.randn(batch, length, 8)
    changed = torch.cat([x[:, :cut], torch.randn(batch, length - cut, 8)], dim=1)
    with torch.no_grad():
        out, _ = mha(rotary)(x, is_causal=True, need_weights=need_weights)
        out_changed, _ = mha(rotary)(changed, is_causal=True, need_weights=need_weights)
    torch.testing.assert_close(out_changed[:, :cut], out[:, :cut])


# --------------------------------------------------------------------------- caches


@SETTINGS
@given(st.integers(1, 3), st.integers(1, 6), seeds, st.booleans(), st.booleans(), st.data())
def test_mha_cached_decoding_equals_one_causal_pass(batch, length, seed, rotary, need_weights,
                                                    data):
    sizes = chunk_sizes(data.draw, length)
    torch.manual_seed(seed)
    x = torch.randn(batch, length, 8)
    module = mha(rotary)
    cache_ = KVCache()
    with torch.no_grad():
        full, _ = module(x, is_causal=True, need_weights=need_weights)
        pieces, start = [], 0
        for size in sizes:
            out, _ = module(x[:, start : start + size], is_causal=True, cache=cache_,
                            need_weights=need_weights)
            pieces.append(out)
            start += size
            assert len(cache_) == start
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, atol=1e-5, rtol=1e-5)


@cache
def transformer(positional):
    torch.manual_seed(2)
    return Transformer(11, 13, d_model=16, n_heads=2, n_encoder_layers=1, n_decoder_layers=2,
                       d_ff=32, dropout=0.1, positional=positional, max_len=16).eval()


@settings(SETTINGS, max_examples=25)
@given(st.sampled_from(["sinusoidal", "learned", "rotary"]), st.integers(1, 3),
       st.integers(1, 6), st.integers(1, 6), seeds, densities, st.data())
def test_transformer_cached_decode_equals_full_decode(positional, batch, src_len, tgt_len, seed,
                                                      p, data):
    sizes = chunk_sizes(data.draw, tgt_len)
    model = transformer(positional)
    torch.manual_seed(seed)
    src = torch.randint(1, 11, (batch, src_len)).masked_fill(bernoulli((batch, src_len), p), 0)
    tgt = torch.randint(1, 13, (batch, tgt_len))  # no padding: cached decoding has none
    with torch.no_grad():
        memory = model.encode(src)
        mem_mask = model.padding_mask(src)
        full = model.decode(tgt, memory, mem_mask)
        cache_ = model.decoder.new_cache()
        pieces, start = [], 0
        for size in sizes:
            pieces.append(model.decode(tgt[:, start : start + size], memory, mem_mask,
                                       cache=cache_))
            start += size
        assert len(cache_) == tgt_len
    assert torch.isfinite(full).all()
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, atol=1e-5, rtol=1e-5)


# --------------------------------------------------------------------------- positional


def paper_table(length, d_model, offset=0):
    """pe[p, 2i] = sin(p / 10000^(2i/d)), pe[p, 2i+1] = cos(p / 10000^(2i/d)), in float64."""
    table = torch.zeros(length, d_model, dtype=torch.float64)
    for p in range(offset, offset + length):
        for dim in range(d_model):
            angle = p / 10000 ** ((dim - dim % 2) / d_model)
            table[p - offset, dim] = torch.sin(torch.tensor(angle, dtype=torch.float64)) \
                if dim % 2 == 0 else torch.cos(torch.tensor(angle, dtype=torch.float64))
    return table


@SETTINGS
@given(st.integers(1, 8), st.integers(1, 8), st.integers(1, 3), st.integers(1, 6), seeds,
       st.data())
def test_sinusoidal_encoding_adds_its_table_in_eval(d_model, max_len, batch, length, seed, data):
    offset = data.draw(st.integers(0, 4))
    module = SinusoidalPositionalEncoding(d_model, max_len=max_len, dropout=0.5).eval()
    torch.testing.assert_close(module.pe, paper_table(max_len, d_model).float())
    torch.manual_seed(seed)
    x = torch.randn(batch, length, d_model)
    out = module(x, offset)
    if offset + length <= max_len:
        assert torch.equal(out, x + module.pe[offset : offset + length])
    else:  # beyond the precomputed table the same function of the position continues
        longer = SinusoidalPositionalEncoding(d_model, max_len=offset + length)
        assert torch.equal(out, x + longer.pe[offset:])
    torch.testing.assert_close(out, x + paper_table(length, d_model, offset).float())


@SETTINGS
@given(st.integers(1, 8), st.integers(1, 3), st.integers(1, 6), seeds, st.data())
def test_learned_encoding_adds_its_table_in_eval(d_model, batch, length, seed, data):
    max_len = data.draw(st.integers(length, 8))
    offset = data.draw(st.integers(0, max_len - length))
    torch.manual_seed(seed)
    module = LearnedPositionalEncoding(d_model, max_len=max_len, dropout=0.5).eval()
    x = torch.randn(batch, length, d_model)
    assert torch.equal(module(x), x + module.weight[:length])
    assert torch.equal(module(x, offset), x + module.weight[offset : offset + length])


@SETTINGS
@given(seed=seeds, length=st.integers(1, 260), left=st.integers(0, 40),
       right=st.integers(0, 40), causal=st.booleans(), groups=st.sampled_from([1, 2, 4]),
       density=densities, alibi=st.booleans(), softcap=st.sampled_from([None, 2.0]))
def test_blocked_local_attention_equals_the_masked_band(seed, length, left, right, causal,
                                                       groups, density, alibi, softcap):
    """Blocked local attention, at any length and window (blocks partly past the end, windows
    wider than the sequence), gives the full computation's result with the band masked."""
    from attention.alibi import alibi_slopes
    from attention.functional import attention_backend
    from attention.local import local_attention

    torch.manual_seed(seed)
    q = torch.randn(2, 4, length, 8)
    k, v = torch.randn(2, 4 // groups, length, 8), torch.randn(2, 4 // groups, length, 8)
    padding = bernoulli((2, length), density)
    window = (left, 0 if causal else right)
    slopes = alibi_slopes(4) if alibi else None
    got = local_attention(q, k, v, window, scale=8**-0.5, key_padding_mask=padding,
                          alibi_slopes=slopes, softcap=softcap)
    with attention_backend("explicit"):
        expected, _ = attend(q, k, v, key_padding_mask=padding, window=window,
                             is_causal=causal, alibi_slopes=slopes, softcap=softcap)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)
    assert not got.isnan().any()
