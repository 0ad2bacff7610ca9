"""The attention variants (grouped-query heads, sliding windows, ALiBi, softcap, QK-norm)
against a float64 plain-torch reference built from the module's own weights.

The reference repeats the key/value heads (transformers' ``repeat_kv``), masks an explicit
band, adds the paper's ALiBi slopes and caps with ``tanh``, written out here without the
package's code. Every path the module has runs it: the textbook computation, the fused
SDPA call, the blocked local path (long windowed inputs), the packed padding-free path, the
KV cache, ``torch.compile`` and ``torch.export``; in the forward and the backward pass, with
padding (a fully padded row among them) and an attention mask.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch.testing import assert_close

from attention import Decoder, Encoder, MultiHeadAttention, Transformer, functional
from attention.alibi import alibi_slopes
from attention.functional import attend, attention_backend
from attention.multihead import KVCache
from attention.packing import Packing

D, H = 16, 4
INF = float("inf")

VARIANTS = {
    "gqa": dict(n_kv_heads=2),
    "mqa": dict(n_kv_heads=1),
    "window": dict(window=3),
    "window-asymmetric": dict(window=(5, 1)),
    "alibi": dict(alibi=True),
    "softcap": dict(softcap=0.5),
    "qk_norm-rotary": dict(qk_norm=True, rotary=True),
    "all": dict(n_kv_heads=2, window=(4, 2), alibi=True, softcap=2.0, qk_norm=True, bias=True),
}

# ---------------------------------------------------------------------------- reference


def paper_slopes(n):
    """ALiBi's slopes as Press et al.'s reference code computes them (ofirpress/attention_with_
    linear_biases, models/transformer.py, get_slopes)."""
    def get_slopes_power_of_2(n):
        start = 2 ** (-2 ** -(math.log2(n) - 3))
        ratio = start
        return [start * ratio**i for i in range(n)]

    if math.log2(n).is_integer():
        return get_slopes_power_of_2(n)
    closest_power_of_2 = 2 ** math.floor(math.log2(n))
    return (get_slopes_power_of_2(closest_power_of_2)
            + paper_slopes(2 * closest_power_of_2)[0::2][: n - closest_power_of_2])


def rms(x, weight, eps=1e-6):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight


def rotate(x, positions, base=10000.0):
    """RoFormer rotation in the GPT-NeoX layout: pair (x[k], x[k + d/2]) by pos·base^(-2k/d)."""
    d = x.shape[-1]
    inv = base ** (-torch.arange(0, d, 2, dtype=torch.float64) / d)
    angles = positions.double()[:, None] * inv  # (n, d/2)
    cos, sin = angles.cos(), angles.sin()
    x1, x2 = x[..., : d // 2], x[..., d // 2:]
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


def reference(module, x, *, key_padding_mask=None, attn_mask=None, is_causal=False):
    """Self-attention of ``module`` (a float64 copy) on ``x``, written out."""
    m, x = module, x.double()
    batch, length, _ = x.shape
    heads, kv_heads, d_head = m.n_heads, m.n_kv_heads, m.d_head

    def project(linear, n_heads):
        y = x @ linear.weight.T + (linear.bias if linear.bias is not None else 0)
        return y.view(batch, length, n_heads, d_head).transpose(1, 2)  # (b h n d)

    q, k, v = project(m.q_proj, heads), project(m.k_proj, kv_heads), project(m.v_proj, kv_heads)
    if m.q_norm is not None:
        q, k = rms(q, m.q_norm.weight), rms(k, m.k_norm.weight)
    positions = torch.arange(length)
    if m.rotary is not None:
        q, k = rotate(q, positions), rotate(k, positions)
    k = k.repeat_interleave(heads // kv_heads, dim=1)  # repeat_kv: head h reads h // groups
    v = v.repeat_interleave(heads // kv_heads, dim=1)
    scores = q @ k.transpose(-2, -1) / math.sqrt(d_head)
    if m.softcap is not None:
        scores = m.softcap * torch.tanh(scores / m.softcap)
    distance = positions[None, :] - positions[:, None]  # key minus query position
    if m.alibi_slopes is not None:
        slopes = torch.tensor(paper_slopes(heads), dtype=torch.float64)
        scores = scores - slopes[:, None, None] * distance.abs()
    allowed = torch.ones(batch, heads, length, length, dtype=torch.bool)
    if m.window is not None:
        left, right = m.window
        right = 0 if is_causal else right
        allowed &= (distance >= -left) & (distance <= right)
    if is_causal:
        allowed &= distance <= 0
    if key_padding_mask is not None:
        allowed &= ~key_padding_mask[:, None, None, :]
    if attn_mask is not None:
        allowed &= ~attn_mask
    scores = scores.masked_fill(~allowed, -INF)
    empty = ~allowed.any(-1, keepdim=True)
    weights = scores.masked_fill(empty, 0).softmax(-1).masked_fill(empty, 0)
    out = (weights @ v).transpose(1, 2).reshape(batch, length, heads * d_head)
    return m.out_proj(out)


# ---------------------------------------------------------------------------- inputs


def make_module(variant, seed=0):
    torch.manual_seed(seed)
    kwargs = dict(VARIANTS[variant])
    bias = kwargs.pop("bias", False)
    module = MultiHeadAttention(D, H, bias=bias, **kwargs)
    with torch.no_grad():  # learned norm weights away from ones, so that they count
        for norm in (module.q_norm, module.k_norm):
            if norm is not None:
                norm.weight.uniform_(0.5, 1.5)
    return module


def make_inputs(length, seed=1):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(3, length, D, generator=gen)
    padding = torch.zeros(3, length, dtype=torch.bool)
    padding[1, -(length // 3):] = True
    padding[2] = True  # a fully padded row: zeros, never NaN
    attn_mask = torch.rand(length, length, generator=gen) < 0.1
    probe = torch.randn(3, length, D, generator=gen)
    return x, padding, attn_mask, probe


def run_path(module, path, x, padding, attn_mask, is_causal):
    if path == "explicit":
        with attention_backend("explicit"):
            return module(x, key_padding_mask=padding, attn_mask=attn_mask,
                          is_causal=is_causal)[0]
    if path in ("fused", "long"):
        return module(x, key_padding_mask=padding, attn_mask=attn_mask, is_causal=is_causal)[0]
    packing = Packing.from_mask(padding)
    out = module(packing.pack(x), packing=packing, attn_mask=attn_mask, is_causal=is_causal)[0]
    return packing.unpack(out)


PATHS = {"explicit": 12, "fused": 12, "long": 150, "packed": 12, "packed-long": 150}


@pytest.fixture
def local_calls(monkeypatch):
    """How many times the blocked local path ran."""
    calls = []
    original = functional.local_attention

    def counted(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(functional, "local_attention", counted)
    return calls


@pytest.mark.parametrize("is_causal", [False, True], ids=["bidirectional", "causal"])
@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("variant", VARIANTS)
def test_every_path_equals_the_reference_forward_and_backward(variant, path, is_causal,
                                                              local_calls):
    module = make_module(variant)
    expected_module = copy.deepcopy(module).double()
    x, padding, attn_mask, probe = make_inputs(PATHS[path])
    x.requires_grad_(True)
    x_ref = x.detach().double().requires_grad_(True)

    out = run_path(module, path, x, padding, attn_mask, is_causal)
    expected = reference(expected_module, x_ref, key_padding_mask=padding,
                         attn_mask=attn_mask, is_causal=is_causal)
    real = ~padding  # the packed path computes real positions only
    if path.startswith("packed"):
        out, expected, probe = out * real[..., None], expected * real[..., None], \
            probe * real[..., None]
    assert_close(out, expected.float(), atol=2e-5, rtol=1e-4)
    assert not out.isnan().any()

    (out * probe).sum().backward()
    (expected * probe.double()).sum().backward()
    assert_close(x.grad, x_ref.grad.float(), atol=5e-5, rtol=1e-4)
    for (name, param), (_, param_ref) in zip(module.named_parameters(),
                                             expected_module.named_parameters(), strict=True):
        assert param.grad is not None, name
        assert_close(param.grad, param_ref.grad.float(), atol=1e-4, rtol=1e-4, msg=name)
    # Long windowed inputs take the blocked path, and nothing else does.
    blocked = path in ("long", "packed-long") and "window" in VARIANTS[variant]
    assert bool(local_calls) == blocked


def test_float_masks_on_the_blocked_path_equal_their_boolean_meaning():
    torch.manual_seed(2)
    q, k, v = (torch.randn(2, 4, 160, 8) for _ in range(3))
    k, v = k[:, :2], v[:, :2]
    padding = torch.rand(2, 160) < 0.3
    mask = torch.rand(160, 160) < 0.2

    def as_float(m):
        return torch.zeros(m.shape).masked_fill(m, -INF)

    slopes = alibi_slopes(4)
    kwargs = dict(window=(6, 3), alibi_slopes=slopes, softcap=3.0)
    boolean, _ = attend(q, k, v, key_padding_mask=padding, attn_mask=mask, **kwargs)
    floats, _ = attend(q, k, v, key_padding_mask=as_float(padding), attn_mask=as_float(mask),
                       **kwargs)
    with attention_backend("explicit"):
        expected, _ = attend(q, k, v, key_padding_mask=padding, attn_mask=mask, **kwargs)
    assert_close(boolean, expected)
    assert_close(floats, expected)


def test_per_head_masks_on_the_blocked_path():
    torch.manual_seed(3)
    q, k, v = (torch.randn(2, 4, 200, 8) for _ in range(3))
    mask = torch.rand(2, 4, 200, 200) < 0.3
    biases = torch.randn(1, 4, 200, 200)
    for attn_mask in (mask, biases):
        got, _ = attend(q, k, v[:, :], attn_mask=attn_mask, window=5, is_causal=True)
        with attention_backend("explicit"):
            expected, _ = attend(q, k, v, attn_mask=attn_mask, window=5, is_causal=True)
        assert_close(got, expected)


# ---------------------------------------------------------------------------- ALiBi slopes


@pytest.mark.parametrize("n_heads", range(1, 33))
def test_alibi_slopes_are_the_papers(n_heads):
    assert_close(alibi_slopes(n_heads), torch.tensor(paper_slopes(n_heads)))


def test_alibi_slopes_by_hand():
    assert alibi_slopes(8).tolist() == [2.0**-i for i in range(1, 9)]
    # 6 heads: the 4-head slopes 2^-2, 2^-4, 2^-6, 2^-8, then 2^-1, 2^-3 from the 8-head ones.
    assert alibi_slopes(6).tolist() == [2.0**-2, 2.0**-4, 2.0**-6, 2.0**-8, 2.0**-1, 2.0**-3]


def test_alibi_slopes_are_a_buffer_not_saved():
    module = MultiHeadAttention(24, 6, alibi=True)
    assert "alibi_slopes" not in module.state_dict()
    assert_close(module.alibi_slopes, torch.tensor(paper_slopes(6), dtype=torch.float32))


# ---------------------------------------------------------------------------- KV cache


@pytest.mark.parametrize("variant", VARIANTS)
def test_cached_steps_equal_the_full_causal_pass(variant):
    module = make_module(variant).eval()
    x = torch.randn(2, 23, D)
    with torch.no_grad():
        full = module(x, is_causal=True)[0]
        cache = KVCache()
        outs, start = [], 0
        for size in (5, 1, 1, 3, 1, 1, 1, 4, 1, 1, 1, 1, 1, 1):
            outs.append(module(x[:, start: start + size], cache=cache, is_causal=True)[0])
            start += size
    assert start == 23 and len(cache) == 23
    assert_close(torch.cat(outs, dim=1), full, atol=1e-5, rtol=1e-4)
    assert cache.k.shape[1] == module.n_kv_heads  # the cache holds the key/value heads only
    if module.window is not None:
        assert cache.k.shape[-2] <= module.window[0] + 1  # the last step's window


def test_a_windowed_cache_stays_flat_however_long_it_runs():
    module = MultiHeadAttention(D, H, window=(6, 6), n_kv_heads=2).eval()
    cache = KVCache(capacity=4096)  # a capacity a search would ask for: not allocated
    x = torch.randn(1, 1, D)
    rooms = set()
    with torch.no_grad():
        for _ in range(500):
            module(x, cache=cache, is_causal=True)
            rooms.add(cache._k.shape[-2])
    assert len(cache) == 500 and cache.dropped == 493
    assert cache.k.shape == (1, 2, 7, D // H)  # the window's 6 positions and the newest
    assert max(rooms) <= 2 * (6 + 1)


def test_a_padding_mask_over_every_position_seen_is_cut_to_the_window():
    """A mask over all positions decoded so far (as torch.nn's decoders pass it) is read
    for the keys the window's cache still holds."""
    module = MultiHeadAttention(D, H, window=2).eval()
    x = torch.randn(2, 9, D)
    padding = torch.zeros(2, 9, dtype=torch.bool)
    padding[1, 3] = True  # in the windows of positions 3 to 5, let go of after them
    padding[1, 7] = True  # in the last window
    with torch.no_grad():
        full = module(x, key_padding_mask=padding, is_causal=True)[0]
        cache = KVCache()
        steps = [module(x[:, i: i + 1], cache=cache, is_causal=True,
                        key_padding_mask=padding[:, : i + 1])[0] for i in range(9)]
    assert_close(torch.cat(steps, dim=1), full)


def make_seq2seq(**kwargs):
    torch.manual_seed(0)
    model = Transformer(19, 17, d_model=D, n_heads=H, n_encoder_layers=2, n_decoder_layers=2,
                        dropout=0.0, **kwargs)
    with torch.no_grad():
        model.lm_head.weight[2] *= 0.2  # EOS rarer: sentences run long, past the window
    return model.eval()


SEQ2SEQ = {
    "gqa-window-alibi": dict(n_kv_heads=1, window=3, alibi=True, positional=None),
    "llama-like": dict(n_kv_heads=2, window=(4, 0), positional="rotary", qk_norm=True,
                       norm="rmsnorm", activation="swiglu", softcap=5.0),
}


def greedy_by_full_passes(model, src, steps, bos=1):
    tgt = torch.full((src.shape[0], 1), bos)
    for _ in range(steps):
        logits = model(src, tgt)[:, -1]
        logits[:, [model.pad_id, bos]] = -INF
        tgt = torch.cat((tgt, logits.argmax(-1, keepdim=True)), dim=1)
    return tgt[:, 1:]


@pytest.mark.parametrize("config", SEQ2SEQ)
def test_generate_with_a_windowed_cache_equals_full_passes(config):
    model = make_seq2seq(**SEQ2SEQ[config])
    src = torch.randint(3, 19, (3, 7))
    src[1, 5:] = 0
    with torch.no_grad():
        out = model.generate(src, max_new_tokens=14, bos_id=1, eos_id=2)
        expected = greedy_by_full_passes(model, src, out.shape[1])
    assert out.shape[1] > 8  # past the window, where the cache lets go of positions
    for row, ref in zip(out, expected, strict=True):
        end = int((row == 2).nonzero()[0]) + 1 if (row == 2).any() else len(row)
        assert torch.equal(row[:end], ref[:end])


@pytest.mark.parametrize("config", SEQ2SEQ)
def test_beam_search_on_a_windowed_cache_equals_one_that_keeps_everything(config, monkeypatch):
    """Letting go of positions outside the window changes nothing (the mask hides them):
    beam search, which reorders the caches, finds the same hypotheses either way."""
    model = make_seq2seq(**SEQ2SEQ[config])
    src = torch.randint(3, 19, (2, 6))
    with torch.no_grad():
        trimmed = model.generate(src, 14, 1, 2, beam_size=3, num_return_sequences=3,
                                 return_scores=True)
        original = KVCache.append
        monkeypatch.setattr(KVCache, "append",
                            lambda self, k, v, keep=None: original(self, k, v, None))
        kept = model.generate(src, 14, 1, 2, beam_size=3, num_return_sequences=3,
                              return_scores=True)
    assert torch.equal(trimmed[0], kept[0])
    assert_close(trimmed[1], kept[1])


# ---------------------------------------------------------------------------- compile, export


@pytest.fixture
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.mark.parametrize("variant", ["all", "window", "qk_norm-rotary"])
def test_compiled_module_equals_eager_forward_and_backward(variant, fresh_dynamo):
    module = make_module(variant)
    compiled = torch.compile(module, fullgraph=True, backend="aot_eager")
    for length in (12, 150):  # the fused and the blocked path
        x, padding, attn_mask, probe = make_inputs(length)
        x1, x2 = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
        expected = module(x1, key_padding_mask=padding, attn_mask=attn_mask)[0]
        got = compiled(x2, key_padding_mask=padding, attn_mask=attn_mask)[0]
        assert_close(got, expected, atol=1e-5, rtol=1e-4)
        (expected * probe).sum().backward()
        (got * probe).sum().backward()
        assert_close(x2.grad, x1.grad, atol=1e-5, rtol=1e-4)


def test_compiled_encoder_of_todays_blocks_equals_eager(fresh_dynamo):
    encoder = Encoder(D, H, 3, d_ff=32, dropout=0.0, positional="rotary", norm="rmsnorm",
                      activation="swiglu", n_kv_heads=2, window=4, global_every=2,
                      qk_norm=True, softcap=4.0)
    compiled = torch.compile(encoder, fullgraph=True, dynamic=True, backend="eager")
    for length in (20, 170):
        x, padding, _, _ = make_inputs(length)
        assert_close(compiled(x, key_padding_mask=padding), encoder(x, key_padding_mask=padding),
                     atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("variant", ["all", "window", "qk_norm-rotary"])
def test_exported_module_equals_eager_on_new_shapes(variant):
    module = make_module(variant).eval()
    batch, length = torch.export.Dim("batch", min=2), torch.export.Dim("length", min=2)
    x, padding, _, _ = make_inputs(40)
    program = torch.export.export(
        module, (x,), {"key_padding_mask": padding},
        dynamic_shapes={"query": {0: batch, 1: length}, "key_padding_mask": {0: batch,
                                                                              1: length}})
    exported = program.module()
    for new_length in (9, 33, 170):
        x, padding, _, _ = make_inputs(new_length, seed=new_length)
        with torch.no_grad():
            assert_close(exported(x, key_padding_mask=padding)[0],
                         module(x, key_padding_mask=padding)[0], atol=1e-5, rtol=1e-4)


# ---------------------------------------------------------------------------- the stacks


def test_global_every_alternates_global_and_windowed_layers():
    encoder = Encoder(D, H, 7, window=(8, 8), global_every=3)
    assert [layer.self_attn.window for layer in encoder.layers] == \
        [None, (8, 8), (8, 8), None, (8, 8), (8, 8), None]


@pytest.mark.parametrize("stack", ["encoder", "decoder", "transformer"])
def test_the_stacks_take_the_keywords_and_train_every_weight(stack):
    kwargs = dict(n_kv_heads=2, window=3, alibi=True, softcap=4.0, qk_norm=True,
                  norm="rmsnorm", activation="geglu", positional=None, dropout=0.0)
    torch.manual_seed(0)
    x, padding, _, _ = make_inputs(10)
    if stack == "encoder":
        model = Encoder(D, H, 2, global_every=2, **kwargs)
        loss = model(x, key_padding_mask=padding).pow(2).sum()
    elif stack == "decoder":
        model = Decoder(D, H, 2, **kwargs)
        loss = model(x[:2], x[:2, :6]).pow(2).sum()
    else:
        model = Transformer(11, 11, d_model=D, n_heads=H, n_encoder_layers=2,
                            n_decoder_layers=2, global_every=2, **kwargs)
        ids = torch.randint(1, 11, (2, 9))
        loss = F.cross_entropy(model(ids, ids).flatten(0, 1), ids.flatten())
    loss.backward()
    for name, param in model.named_parameters():
        assert param.grad is not None and param.grad.abs().sum() > 0, name
    attentions = [m for m in model.modules() if isinstance(m, MultiHeadAttention)]
    assert all(m.k_proj.out_features == 2 * (D // H) for m in attentions)
    assert all(isinstance(m, torch.nn.RMSNorm) for name, m in model.named_modules()
               if name.endswith(("norm1", "norm2", "norm3", "norm")))
    if stack == "decoder":  # cross-attention takes no window and no ALiBi
        assert all(layer.cross_attn.window is None and layer.cross_attn.alibi_slopes is None
                   for layer in model.layers)
        assert all(layer.cross_attn.softcap == 4.0 for layer in model.layers)


@pytest.mark.parametrize("activation, gate", [("swiglu", F.silu), ("geglu", F.gelu)])
def test_gated_feed_forward_is_act_of_the_gate_times_the_value(activation, gate):
    from attention import FeedForward

    torch.manual_seed(0)
    ff = FeedForward(D, 24, activation=activation)
    assert ff.linear1.out_features == 48 and ff.linear2.in_features == 24
    x = torch.randn(3, 5, D)
    w_gate, w_value = ff.linear1.weight[:24], ff.linear1.weight[24:]
    expected = (gate(x @ w_gate.T) * (x @ w_value.T)) @ ff.linear2.weight.T
    assert_close(ff(x), expected)


# ---------------------------------------------------------------------------- bad values


@pytest.mark.parametrize("kwargs, error, message", [
    (dict(window=-1), ValueError, r"window: expected a non-negative int .*got -1"),
    (dict(window=2.5), ValueError, r"window: .*got 2.5"),
    (dict(window=(3,)), ValueError, r"window: .*pair.*got \(3,\)"),
    (dict(window=(3, -2)), ValueError, r"window: .*got \(3, -2\)"),
    (dict(window=True), ValueError, r"window: .*got True"),
    (dict(softcap=0), ValueError, r"softcap: expected a positive finite number .*got 0"),
    (dict(softcap=float("inf")), ValueError, r"softcap: .*got inf"),
    (dict(softcap=-1.0), ValueError, r"softcap: .*got -1.0"),
    (dict(softcap="5"), ValueError, r"softcap: .*got '5'"),
    (dict(n_kv_heads=3), ValueError, r"n_kv_heads: expected a divisor of n_heads=4 .*got 3"),
    (dict(n_kv_heads=8), ValueError, r"n_kv_heads: expected a divisor of n_heads=4 \(at most "
                                     r"n_heads\), got 8"),
    (dict(n_kv_heads=0), ValueError, r"n_kv_heads: expected a positive int, got 0"),
    (dict(alibi=True, rotary=True), ValueError, r"alibi: expected False with rotary=True"),
    (dict(alibi=1), TypeError, r"alibi: expected True or False, got int 1"),
    (dict(qk_norm="yes"), TypeError, r"qk_norm: expected True or False, got str"),
])
def test_bad_values_name_the_keyword(kwargs, error, message):
    with pytest.raises(error, match=message):
        MultiHeadAttention(D, H, **kwargs)


@pytest.mark.parametrize("build, message", [
    (lambda: Encoder(D, H, 2, global_every=2), r"global_every: expected None without a window"),
    (lambda: Encoder(D, H, 2, window=2, global_every=0),
     r"global_every: expected a positive int, got 0"),
    (lambda: Encoder(D, H, 2, norm="batchnorm"), r"norm: expected one of \['layernorm', "
                                                 r"'rmsnorm'\], got 'batchnorm'"),
    (lambda: Encoder(D, H, 2, activation="reglu"), r"activation: expected one of .*'swiglu', "
                                                   r"'geglu'\] or a callable, got 'reglu'"),
    (lambda: Transformer(9, 9, d_model=D, n_heads=H, alibi=True, positional="rotary"),
     r"alibi: expected False with rotary=True"),
])
def test_bad_stack_values_name_the_keyword(build, message):
    with pytest.raises(ValueError, match=message):
        build()


@pytest.mark.parametrize("backend", ["math", "flash", "efficient"])
def test_a_forced_sdpa_kernel_refuses_softcap_by_name(backend):
    module = MultiHeadAttention(D, H, softcap=5.0)
    with attention_backend(backend), pytest.raises(ValueError, match=r"softcap: F.scaled_dot_"
                                                                    r"product_attention cannot"):
        module(torch.randn(1, 4, D))


def test_attend_refuses_alibi_slopes_of_another_head_count():
    q = torch.randn(1, 4, 3, 8)
    with pytest.raises(ValueError, match=r"alibi_slopes: expected a Tensor of shape \(4,\) "
                                         r".*got \(3,\)"):
        attend(q, q, q, alibi_slopes=torch.ones(3))
    with pytest.raises(ValueError, match=r"alibi_slopes: .*got list"):
        attend(q, q, q, alibi_slopes=[0.5] * 4)


@pytest.mark.parametrize("kwargs, name", [(dict(window=2), "window"), (dict(alibi=True), "alibi")])
def test_cross_attention_refuses_a_window_or_alibi(kwargs, name):
    """A distance between target and source positions means nothing: refused, not computed
    (cached steps would otherwise differ from the full pass)."""
    module = MultiHeadAttention(D, H, **kwargs)
    with pytest.raises(ValueError, match=rf"^{name}: expected self-attention"):
        module(torch.randn(1, 5, D), torch.randn(1, 7, D))
    x = torch.randn(1, 5, D)
    assert module(x, x, x)[0].shape == x.shape  # torch.nn's mha(x, x, x) is self-attention


def test_a_failed_append_leaves_a_windowed_cache_as_it_was():
    cache = KVCache()
    cache.append(torch.randn(2, 1, 6, 4), torch.randn(2, 1, 6, 4))
    with pytest.raises(ValueError, match=r"cache: expected new keys for batch=2"):
        cache.append(torch.randn(3, 1, 1, 4), torch.randn(3, 1, 1, 4), keep=2)
    assert len(cache) == 6 and cache.k.shape[-2] == 6


# ---------------------------------------------------------------------------- documents


def documents_batch(seed=0):
    """Two rows of documents packed back to back, the second ending in padding."""
    gen = torch.Generator().manual_seed(seed)
    lengths = [[5, 1, 7, 3], [4, 6]]  # row 1: 10 real tokens of 16
    ids = torch.tensor([[0] * 5 + [1] + [2] * 7 + [3] * 3,
                        [7] * 4 + [5] * 6 + [0] * 6])
    padding = torch.zeros(2, 16, dtype=torch.bool)
    padding[1, 10:] = True
    x = torch.randn(2, 16, D, generator=gen)
    return x, ids, padding, lengths


ENCODERS = {
    "sinusoidal": dict(positional="sinusoidal"),
    "learned": dict(positional="learned", max_len=32),
    "rotary-gqa-qk_norm": dict(positional="rotary", n_kv_heads=2, qk_norm=True),
    "alibi-window-softcap": dict(positional=None, alibi=True, window=2, softcap=3.0),
}


@pytest.mark.parametrize("is_causal", [False, True], ids=["bidirectional", "causal"])
@pytest.mark.parametrize("config", ENCODERS)
def test_packed_documents_equal_each_document_encoded_alone(config, is_causal):
    torch.manual_seed(0)
    encoder = Encoder(D, H, 2, d_ff=32, dropout=0.0, **ENCODERS[config])
    x, ids, padding, lengths = documents_batch()
    x.requires_grad_(True)
    out = encoder(x, key_padding_mask=padding, document_ids=ids, is_causal=is_causal)
    probe = torch.randn_like(out)
    (out * probe).sum().backward()
    assert (out[1, 10:] == 0).all()  # padding stays zeros
    for row, row_lengths in enumerate(lengths):
        start = 0
        for n in row_lengths:
            alone_x = x.detach()[row: row + 1, start: start + n].requires_grad_(True)
            alone = encoder(alone_x, is_causal=is_causal)
            assert_close(out[row: row + 1, start: start + n], alone, atol=1e-5, rtol=1e-4)
            (alone * probe[row: row + 1, start: start + n]).sum().backward()
            assert_close(x.grad[row: row + 1, start: start + n], alone_x.grad, atol=1e-5,
                         rtol=1e-4)
            start += n


def test_documents_in_a_layer_attend_only_within_themselves():
    torch.manual_seed(0)
    from attention import EncoderLayer

    layer = EncoderLayer(D, H, 32, dropout=0.0, n_kv_heads=1)
    x, ids, padding, _ = documents_batch()
    out = layer(x, document_ids=ids, key_padding_mask=padding)
    # The block-diagonal mask, on the padded path, gives the same on real positions.
    same_document = ids[:, :, None] == ids[:, None, :]
    with attention_backend("explicit"):
        expected = layer(x, attn_mask=(~same_document)[:, None].expand(-1, H, -1, -1),
                         key_padding_mask=padding.float().masked_fill(padding, -INF))
    real = ~padding
    assert_close(out[real], expected[real], atol=1e-5, rtol=1e-4)


def test_documents_pack_with_their_boundaries():
    _, ids, padding, lengths = documents_batch()
    packing = Packing.from_documents(ids, padding)
    assert packing.cu_seqlens.tolist() == [0, 5, 6, 13, 16, 20, 26]
    assert packing.sequences == 6 and packing.sequence_length == 7 and packing.max_seqlen() == 7
    tokens = torch.arange(26.0)[:, None]
    assert torch.equal(packing.from_sequences(packing.to_sequences(tokens)), tokens)
    assert packing.attention_padding_mask.sum(1).tolist() == [2, 6, 0, 4, 3, 1]
    # An id met again after another document starts a new one.
    again = Packing.from_documents(torch.tensor([[1, 1, 2, 1]]))
    assert again.cu_seqlens.tolist() == [0, 2, 3, 4]


@pytest.mark.parametrize("call, error, message", [
    (lambda enc, x, ids, pad: enc(x, document_ids=ids, attn_mask=torch.zeros(16, 16,
                                                                            dtype=torch.bool)),
     ValueError, r"attn_mask: expected None with packed documents"),
    (lambda enc, x, ids, pad: enc(x, document_ids=ids, return_attention=True),
     ValueError, r"return_attention: expected False with document_ids"),
    (lambda enc, x, ids, pad: enc(x, document_ids=ids[:, :8]),
     ValueError, r"document_ids: expected shape \(batch, length\) = \(2, 16\), got \(2, 8\)"),
    (lambda enc, x, ids, pad: enc(x, document_ids=ids.float()),
     TypeError, r"document_ids: expected an integer Tensor \(batch, length\), got shape "
                r"\(2, 16\), dtype torch.float32"),
    (lambda enc, x, ids, pad: enc(x, document_ids=ids, key_padding_mask=pad.float()),
     TypeError, r"key_padding_mask: expected dtype torch.bool with document_ids"),
])
def test_bad_document_inputs_name_the_argument(call, error, message):
    encoder = Encoder(D, H, 1, dropout=0.0)
    x, ids, padding, _ = documents_batch()
    with pytest.raises(error, match=message):
        call(encoder, x, ids, padding)


# ---------------------------------------------------------------------------- converters


@pytest.mark.parametrize("kwargs, name", [
    (dict(n_kv_heads=2), "n_kv_heads"), (dict(window=4), "window"), (dict(alibi=True), "alibi"),
    (dict(softcap=3.0), "softcap"), (dict(qk_norm=True), "qk_norm"),
    (dict(norm="rmsnorm"), "norm"), (dict(activation="swiglu"), "activation"),
])
def test_torch_nn_conversion_refuses_what_torch_nn_cannot_express(kwargs, name):
    """torch.nn's modules have none of the variants: to_torch refuses by name instead of
    dropping them."""
    from attention.compat import to_torch

    encoder = Encoder(D, H, 2, positional=None, **kwargs)
    with pytest.raises(ValueError, match=rf"^{name}: "):
        to_torch(encoder)
    if name not in ("norm", "activation"):
        with pytest.raises(ValueError, match=rf"^{name}: "):
            to_torch(encoder.layers[0].self_attn)


def test_a_run_config_describes_the_variants_and_rebuilds_them():
    from attention.translation.checkpoint import model_from_config
    from attention.translation.export import model_config_of

    kwargs = dict(n_kv_heads=1, window=3, global_every=2, alibi=True, softcap=5.0,
                  qk_norm=True, norm="rmsnorm", activation="swiglu")
    model = Transformer(9, 9, d_model=D, n_heads=H, n_encoder_layers=3, n_decoder_layers=2,
                        d_ff=32, **kwargs)
    config = model_config_of(model)
    assert {key: getattr(config, key) for key in kwargs} == kwargs
    rebuilt = model_from_config(config, 9, 9, 0)
    assert [m.variants() for m in rebuilt.modules() if isinstance(m, MultiHeadAttention)] == \
        [m.variants() for m in model.modules() if isinstance(m, MultiHeadAttention)]
    # What a config cannot say is refused by name: two widths, layers that differ.
    with pytest.raises(ValueError, match=r"^window: expected one width on both sides"):
        model_config_of(Transformer(9, 9, d_model=D, n_heads=H, window=(3, 1)))
    odd = Transformer(9, 9, d_model=D, n_heads=H, n_encoder_layers=2, n_decoder_layers=1)
    odd.encoder.layers[1].self_attn.softcap = 2.0
    with pytest.raises(ValueError, match=r"^softcap: expected the same softcap in every layer"):
        model_config_of(odd)


def test_variants_lists_what_is_not_plain_attention():
    assert MultiHeadAttention(D, H).variants() == {}
    assert MultiHeadAttention(D, H, n_kv_heads=H).variants() == {}
    assert MultiHeadAttention(D, H, n_kv_heads=1, window=3, alibi=True, softcap=2.0,
                              qk_norm=True).variants() == dict(
        n_kv_heads=1, window=(3, 3), alibi=True, softcap=2.0, qk_norm=True)


# ---------------------------------------------------------------------------- on the device

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kwargs", [dict(window=(16, 16)), dict(window=(32, 0), n_kv_heads=2),
                                    dict(n_kv_heads=1, qk_norm=True)],
                         ids=["window", "causal-window-gqa", "mqa-qk_norm"])
@pytest.mark.parametrize("is_causal", [False, True], ids=["bidirectional", "causal"])
def test_bf16_paths_on_the_device_agree_with_the_textbook(device, kwargs, is_causal):
    """The kernels each device picks in bfloat16 (on a GPU with it: varlen_attn with
    window_size and enable_gqa, dense and packed; on the CPU: blocked and padded) against
    the textbook computation. ``make gpu-check`` runs this on CUDA."""
    torch.manual_seed(0)
    module = MultiHeadAttention(64, 4, **kwargs).to(device=device, dtype=torch.bfloat16).eval()
    x = torch.randn(2, 300, 64, device=device, dtype=torch.bfloat16)
    padding = torch.zeros(2, 300, dtype=torch.bool, device=device)
    padding[1, 250:] = True  # right padding: no hole, so the packed rows may go to varlen
    packing = Packing.from_mask(padding)
    with torch.no_grad():
        with attention_backend("explicit"):
            expected_dense = module(x, is_causal=is_causal)[0]
            expected_padded = module(x, key_padding_mask=padding.float().masked_fill(
                padding, -INF).to(torch.bfloat16), is_causal=is_causal)[0]
        dense = module(x, is_causal=is_causal)[0]
        packed = packing.unpack(module(packing.pack(x), packing=packing, is_causal=is_causal)[0])
    assert_close(dense, expected_dense, atol=3e-2, rtol=3e-2)
    real = ~padding
    assert_close(packed[real], expected_padded[real], atol=3e-2, rtol=3e-2)
