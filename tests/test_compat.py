"""attention.compat against torch.nn, the oracle.

The comparisons are float32 (one float64) with ``atol=1e-5, rtol=0``, of outputs, attention
weights, input gradients and parameter gradients (ours put in torch.nn's layout by
``to_torch``).
Parameters are perturbed off their initialisation before each comparison, so that biases
and LayerNorm affines are not trivially zero or one and a tensor swapped or dropped by a
conversion changes the results.

The masks of the equivalence tests never mask all keys of a query (padding is at the end
of a row, key 0 is always visible): there torch.nn returns NaN by design and we return
zeros, which ``test_query_with_all_keys_masked_gets_zeros_where_torch_gives_nan`` pins
separately.
"""

from __future__ import annotations

import copy
import inspect
from functools import partial

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.testing import assert_close

from attention import Encoder, EncoderLayer, MultiHeadAttention, compat
from attention.compat import from_torch, to_torch

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
E, FF, N, L = 16, 32, 3, 6  # d_model, dim_feedforward, batch, length
MASKS = ["none", "padding", "causal", "padding+causal", "float", "3d"]
TORCH_CLASSES = (nn.MultiheadAttention, nn.TransformerEncoderLayer, nn.TransformerEncoder)
# torch.nn warns when it is built with its own defaults but sequence first.
NESTED_WARNING = "ignore:enable_nested_tensor is True:UserWarning"
# ... and warns that nested tensors are a prototype when its eval fast path makes one.
NESTED_PROTOTYPE_WARNING = "ignore:The PyTorch API of nested tensors:UserWarning"


def close(actual: object, expected: object) -> None:
    assert_close(actual, expected, atol=1e-5, rtol=0)


def perturb_(module: nn.Module) -> nn.Module:
    """Move every parameter off its initialisation (zero biases, unit LayerNorm weights)."""
    generator = torch.Generator().manual_seed(1234)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.2 * torch.randn(p.shape, generator=generator).to(p))
    return module


def build_pair(direction: str, make_torch, make_ours, device: str) -> tuple[nn.Module, nn.Module]:
    """(torch.nn module, ours) with equal weights, converted in ``direction``."""
    torch.manual_seed(0)
    if direction == "from_torch":
        theirs = perturb_(make_torch()).to(device)
        return theirs, from_torch(theirs)
    ours = perturb_(make_ours()).to(device)
    return to_torch(ours), ours


def batch_layout(x: Tensor, batch_first: bool) -> Tensor:
    """``(N, L, ...)`` ↔ torch.nn's sequence-first ``(L, N, ...)`` (its own inverse)."""
    return x if batch_first else x.transpose(0, 1)


def make_masks(kind: str, heads: int, device: str, batch: int = N, length: int = L
               ) -> tuple[Tensor | None, Tensor | None, bool, Tensor | None]:
    """``(attn_mask, key_padding_mask, is_causal, padded)`` as torch.nn takes them.

    Both masks have the same type (torch.nn warns otherwise); ``padded`` is the boolean
    ``(N, L)`` padding, ``None`` when nothing is padded.
    """
    lengths = torch.tensor([length, length - 2, 2, length - 1][:batch])
    padded = torch.arange(length) >= lengths[:, None]  # (N, S), True at padding
    attn_mask = key_padding_mask = None
    is_causal = False
    if kind == "padding":
        key_padding_mask = padded
    elif kind == "causal":  # torch.nn's float -inf mask with the is_causal hint
        attn_mask, is_causal = nn.Transformer.generate_square_subsequent_mask(length), True
    elif kind == "padding+causal":
        key_padding_mask, is_causal = padded, True
        attn_mask = torch.ones(length, length, dtype=torch.bool).triu(1)
    elif kind == "float":  # additive masks: -inf at padding, and a bias on every score
        key_padding_mask = torch.zeros(batch, length).masked_fill(padded, float("-inf"))
        attn_mask = torch.randn(length, length)
    elif kind == "3d":  # (N * heads, L, S), a different boolean mask per head
        attn_mask = torch.rand(batch * heads, length, length) < 0.4
        attn_mask[..., 0] = False
    else:
        assert kind == "none"

    def move(mask: Tensor | None) -> Tensor | None:
        return None if mask is None else mask.to(device)

    has_padding = key_padding_mask is not None
    return move(attn_mask), move(key_padding_mask), is_causal, move(padded if has_padding else None)


def cotangent(x: Tensor) -> Tensor:
    """A fixed, non-uniform gradient to pull back through ``x``."""
    return torch.arange(x.numel(), device=x.device, dtype=x.dtype).reshape(x.shape).sin()


def grads_by_torch_name(module: nn.Module) -> dict[str, Tensor]:
    """Parameter gradients keyed by torch.nn's state-dict names (ours via ``to_torch``)."""
    if isinstance(module, TORCH_CLASSES):
        return {name: p.grad for name, p in module.named_parameters()}
    shadow = copy.deepcopy(module)
    with torch.no_grad():
        for target, source in zip(shadow.parameters(), module.parameters(), strict=True):
            target.copy_(source.grad)
    return dict(to_torch(shadow).state_dict())


def run(module: nn.Module, inputs: list[Tensor], *args, real: Tensor | None = None, **kwargs):
    """Forward fresh leaf copies of ``inputs``, backward a fixed cotangent through the output
    (and the attention weights, when returned); through the ``real`` positions of a
    ``(N, L, E)`` output only, when given.

    Returns ``(output, weights or None, input grads, parameter grads by torch.nn name)``.
    """
    leaves = [x.detach().clone().requires_grad_() for x in inputs]
    result = module(*leaves, *args, **kwargs)
    out, weights = result if isinstance(result, tuple) else (result, None)
    if real is not None:
        out = out[real]
    loss = (out * cotangent(out)).sum()
    if weights is not None:
        loss = loss + (weights * cotangent(weights)).sum()
    module.zero_grad(set_to_none=True)
    loss.backward()
    grads = [x.grad for x in leaves]
    return out.detach(), None if weights is None else weights.detach(), grads, \
        grads_by_torch_name(module)


def assert_same_run(ours: tuple, theirs: tuple) -> None:
    out, weights, input_grads, param_grads = ours
    close(out, theirs[0])
    if theirs[1] is None:
        assert weights is None
    else:
        close(weights, theirs[1])
    close(input_grads, theirs[2])
    close(param_grads, theirs[3])


def rand(*shape: int, device: str) -> Tensor:
    return torch.randn(*shape).to(device)


# ------------------------------------------------------------------ MultiheadAttention


@pytest.mark.parametrize("mask", MASKS)
@pytest.mark.parametrize("kv_dims", [None, (12, 10)], ids=["packed", "kdim-vdim"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no-bias"])
@pytest.mark.parametrize("batch_first", [False, True], ids=["seq-first", "batch-first"])
@pytest.mark.parametrize("direction", ["from_torch", "to_torch"])
@pytest.mark.parametrize("device", DEVICES)
def test_multihead_attention_matches_torch(device, direction, batch_first, bias, kv_dims, mask):
    heads = 4
    kdim, vdim = kv_dims or (E, E)
    kwargs = dict(embed_dim=E, num_heads=heads, bias=bias, kdim=kdim, vdim=vdim,
                  batch_first=batch_first)
    theirs, ours = build_pair(direction, partial(nn.MultiheadAttention, **kwargs),
                              partial(compat.MultiheadAttention, **kwargs), device)
    assert isinstance(ours, compat.MultiheadAttention) and ours.batch_first == batch_first
    assert isinstance(theirs, nn.MultiheadAttention) and theirs.batch_first == batch_first
    attn_mask, key_padding_mask, is_causal, _ = make_masks(mask, heads, device)
    inputs = [batch_layout(rand(N, L, dim, device=device), batch_first)
              for dim in (E, kdim, vdim)]

    # torch.nn's positional order: key_padding_mask, need_weights, attn_mask, average, causal
    args = (key_padding_mask, True, attn_mask, True, is_causal)
    expected = run(theirs, inputs, *args)
    actual = run(ours, inputs, *args)
    assert actual[0].shape == inputs[0].shape and actual[1].shape == (N, L, L)
    assert_same_run(actual, expected)

    per_head = dict(key_padding_mask=key_padding_mask, attn_mask=attn_mask, is_causal=is_causal,
                    average_attn_weights=False)
    expected = run(theirs, inputs, **per_head)
    actual = run(ours, inputs, **per_head)
    assert actual[1].shape == (N, heads, L, L)
    assert_same_run(actual, expected)

    no_weights = dict(key_padding_mask=key_padding_mask, attn_mask=attn_mask, is_causal=is_causal,
                      need_weights=False)
    assert_same_run(run(ours, inputs, **no_weights), run(theirs, inputs, **no_weights))


@pytest.mark.parametrize("need_weights", [True, False], ids=["weights", "no-weights"])
@pytest.mark.parametrize("mask", MASKS)
@pytest.mark.parametrize("batch_first", [False, True], ids=["seq-first", "batch-first"])
@pytest.mark.parametrize("device", DEVICES)
def test_multihead_self_attention_matches_torch_in_eval(device, batch_first, mask, need_weights):
    """Eval under no_grad, query is key is value: torch.nn takes its fused fast path."""
    heads = 4
    kwargs = dict(embed_dim=E, num_heads=heads, batch_first=batch_first)
    theirs, ours = build_pair("from_torch", partial(nn.MultiheadAttention, **kwargs),
                              partial(compat.MultiheadAttention, **kwargs), device)
    theirs.eval()
    ours.eval()
    attn_mask, key_padding_mask, is_causal, _ = make_masks(mask, heads, device)
    x = batch_layout(rand(N, L, E, device=device), batch_first)
    with torch.no_grad():
        kwargs = dict(key_padding_mask=key_padding_mask, attn_mask=attn_mask,
                      is_causal=is_causal, need_weights=need_weights)
        out, weights = ours(x, x, x, **kwargs)
        expected_out, expected_weights = theirs(x, x, x, **kwargs)
    close(out, expected_out)
    if need_weights:
        close(weights, expected_weights)
    else:
        assert weights is None and expected_weights is None


def test_query_with_all_keys_masked_gets_zeros_where_torch_gives_nan():
    """Why the oracle comparisons leave such queries out: torch.nn (need_weights=True, its
    default) returns NaN there, in the output, the weights and every gradient; we return
    zero attention (the output is then out_proj's bias) and finite gradients."""
    torch.manual_seed(0)
    theirs = perturb_(nn.MultiheadAttention(E, 2))
    ours = from_torch(theirs)
    attn_mask = torch.zeros(L, L, dtype=torch.bool)
    attn_mask[1] = True  # query 1 may attend to nothing, in every sequence
    key_padding_mask = torch.zeros(N, L, dtype=torch.bool)
    key_padding_mask[2] = True  # sequence 2 is all padding: none of its queries sees a key
    empty = attn_mask.all(-1)[None, :] | key_padding_mask.all(-1)[:, None]  # (N, L)
    inputs = [torch.randn(L, N, E) for _ in range(3)]

    out, weights, grads, param_grads = run(ours, inputs, key_padding_mask=key_padding_mask,
                                           attn_mask=attn_mask)
    t_out, t_weights, t_grads, t_param_grads = run(theirs, inputs,
                                                   key_padding_mask=key_padding_mask,
                                                   attn_mask=attn_mask)
    out, t_out = out.transpose(0, 1), t_out.transpose(0, 1)  # (N, L, E)

    assert t_out[empty].isnan().all() and t_weights[empty].isnan().all()
    assert all(g.isnan().any() for g in t_grads)
    assert any(g.isnan().any() for g in t_param_grads.values())

    bias = ours.out_proj.bias.detach().expand(int(empty.sum()), E)
    close(out[empty], bias)
    assert (weights[empty] == 0).all()
    assert all(g.isfinite().all() for g in grads)
    assert all(g.isfinite().all() for g in param_grads.values())
    # Also without weights (the fused kernel path), which the encoder layers take.
    fused_out, _, fused_grads, fused_param_grads = run(
        ours, inputs, key_padding_mask=key_padding_mask, attn_mask=attn_mask, need_weights=False)
    close(fused_out, out.transpose(0, 1))
    assert all(g.isfinite().all() for g in fused_grads)
    assert all(g.isfinite().all() for g in fused_param_grads.values())
    # Every other query matches torch.nn.
    close(out[~empty], t_out[~empty])
    close(weights[~empty], t_weights[~empty])


@pytest.mark.parametrize("batch_first", [False, True], ids=["seq-first", "batch-first"])
def test_multihead_attention_unbatched_matches_torch(batch_first):
    """(L, E) query with (S, E) key/value, (S,) padding mask, (L, S) or (H, L, S) masks."""
    torch.manual_seed(0)
    heads, q_len, k_len = 2, 5, 7
    theirs = perturb_(nn.MultiheadAttention(E, heads, kdim=12, vdim=10, batch_first=batch_first))
    ours = from_torch(theirs)
    inputs = [torch.randn(q_len, E), torch.randn(k_len, 12), torch.randn(k_len, 10)]
    padding = torch.arange(k_len) >= 5
    cases = [
        dict(key_padding_mask=padding),
        dict(key_padding_mask=padding, attn_mask=torch.rand(q_len, k_len) < 0.3),
        dict(attn_mask=torch.randn(heads, q_len, k_len), average_attn_weights=False),
        dict(key_padding_mask=padding, need_weights=False),
    ]
    for kwargs in cases:
        actual = run(ours, inputs, **kwargs)
        assert actual[0].shape == (q_len, E)
        if kwargs.get("need_weights", True):
            average = kwargs.get("average_attn_weights", True)
            assert actual[1].shape == ((q_len, k_len) if average else (heads, q_len, k_len))
        assert_same_run(actual, run(theirs, inputs, **kwargs))


@pytest.mark.parametrize("cls", ["MultiheadAttention", "TransformerEncoderLayer",
                                 "TransformerEncoder"])
def test_is_causal_without_a_mask_raises_as_in_torch(cls):
    """torch.nn's is_causal is a hint about the mask and needs one: RuntimeError, which ours
    also is (with the argument named); with the mask, the hint gives the masked result."""
    torch.manual_seed(0)
    if cls == "TransformerEncoder":
        ours = compat.TransformerEncoder(compat.TransformerEncoderLayer(E, 2, FF, 0.0), 2)
    else:
        ours = getattr(compat, cls)(E, 2, dropout=0.0)
    perturb_(ours)
    x = torch.randn(L, N, E)
    call = (lambda **kw: ours(x, x, x, need_weights=False, **kw)[0]) \
        if cls == "MultiheadAttention" else (lambda **kw: ours(x, **kw))
    with pytest.raises(RuntimeError, match="is_causal: Need attn_mask") as raised:
        call(is_causal=True)
    assert isinstance(raised.value, ValueError)
    mask = nn.Transformer.generate_square_subsequent_mask(L)
    mask_name = "attn_mask" if cls == "MultiheadAttention" else \
        "src_mask" if cls == "TransformerEncoderLayer" else "mask"
    hinted = call(is_causal=True, **{mask_name: mask})
    close(hinted, call(**{mask_name: mask}))
    assert not torch.allclose(hinted, call())


# ------------------------------------------------------- TransformerEncoderLayer / Encoder


def layer_kwargs(activation: str, norm_first: bool, batch_first: bool) -> dict:
    return dict(d_model=E, nhead=2, dim_feedforward=FF, dropout=0.0, activation=activation,
                batch_first=batch_first, norm_first=norm_first)


def assert_same_in_eval(theirs, ours, x, args, padded, batch_first, mask) -> None:
    """Eval under no_grad; torch.nn's nested-tensor path zeroes padded positions, so only
    real positions are compared.

    torch.nn's fused encoder-layer fast path returns NaN everywhere when a float padding
    mask with -inf meets a float attn_mask, so that case is compared with it switched off.
    """
    theirs.eval()
    ours.eval()
    fastpath = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(fastpath and mask != "float")
    try:
        with torch.no_grad():
            out = batch_layout(ours(x, *args), batch_first)
            expected = batch_layout(theirs(x, *args), batch_first)
    finally:
        torch.backends.mha.set_fastpath_enabled(fastpath)
    real = torch.ones(N, L, dtype=torch.bool, device=x.device) if padded is None else ~padded
    close(out[real], expected[real])


@pytest.mark.parametrize("mask", MASKS)
@pytest.mark.parametrize("batch_first", [False, True], ids=["seq-first", "batch-first"])
@pytest.mark.parametrize("norm_first", [False, True], ids=["post-norm", "pre-norm"])
@pytest.mark.parametrize("activation", ["relu", "gelu"])
@pytest.mark.parametrize("direction", ["from_torch", "to_torch"])
@pytest.mark.parametrize("device", DEVICES)
def test_encoder_layer_matches_torch(device, direction, activation, norm_first, batch_first,
                                     mask):
    kwargs = layer_kwargs(activation, norm_first, batch_first)
    theirs, ours = build_pair(direction, partial(nn.TransformerEncoderLayer, **kwargs),
                              partial(compat.TransformerEncoderLayer, **kwargs), device)
    assert isinstance(ours, compat.TransformerEncoderLayer)
    assert isinstance(theirs, nn.TransformerEncoderLayer)
    attn_mask, key_padding_mask, is_causal, padded = make_masks(mask, 2, device)
    x = batch_layout(rand(N, L, E, device=device), batch_first)
    args = (attn_mask, key_padding_mask, is_causal)  # src_mask, src_key_padding_mask, is_causal
    assert_same_run(run(ours, [x], *args), run(theirs, [x], *args))
    assert_same_in_eval(theirs, ours, x, args, padded, batch_first, mask)


@pytest.mark.filterwarnings(NESTED_PROTOTYPE_WARNING)
@pytest.mark.parametrize("mask", MASKS)
@pytest.mark.parametrize("batch_first", [False, True], ids=["seq-first", "batch-first"])
@pytest.mark.parametrize("norm_first", [False, True], ids=["post-norm", "pre-norm"])
@pytest.mark.parametrize("activation", ["relu", "gelu"])
@pytest.mark.parametrize("direction", ["from_torch", "to_torch"])
@pytest.mark.parametrize("device", DEVICES)
def test_encoder_matches_torch(device, direction, activation, norm_first, batch_first, mask):
    """Two layers, a final LayerNorm when pre-norm; batch-first post-norm keeps torch.nn's
    nested-tensor fast path on in eval."""
    kwargs = layer_kwargs(activation, norm_first, batch_first)
    nested = batch_first and not norm_first

    def make(ns):
        norm = nn.LayerNorm(E) if norm_first else None
        return ns.TransformerEncoder(ns.TransformerEncoderLayer(**kwargs), 2, norm,
                                     enable_nested_tensor=nested)

    theirs, ours = build_pair(direction, partial(make, nn), partial(make, compat), device)
    assert isinstance(ours, compat.TransformerEncoder) and len(ours.layers) == 2
    assert isinstance(theirs, nn.TransformerEncoder) and len(theirs.layers) == 2
    attn_mask, key_padding_mask, is_causal, padded = make_masks(mask, 2, device)
    x = batch_layout(rand(N, L, E, device=device), batch_first)
    args = (attn_mask, key_padding_mask, is_causal)  # mask, src_key_padding_mask, is_causal
    assert_same_run(run(ours, [x], *args), run(theirs, [x], *args))
    assert_same_in_eval(theirs, ours, x, args, padded, batch_first, mask)


@pytest.mark.parametrize("batch_first", [False, True], ids=["seq-first", "batch-first"])
def test_encoder_layer_and_encoder_unbatched_match_torch(batch_first):
    torch.manual_seed(0)
    layer = perturb_(nn.TransformerEncoderLayer(**layer_kwargs("gelu", False, batch_first)))
    encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
    perturb_(encoder)
    x = torch.randn(L, E)
    padding = torch.arange(L) >= 4  # (S,)
    causal = torch.ones(L, L, dtype=torch.bool).triu(1)
    for theirs in (layer, encoder):
        ours = from_torch(theirs)
        for args in [(None, padding), (causal, padding, True), (torch.randn(2, L, L),)]:
            actual = run(ours, [x], *args)
            assert actual[0].shape == (L, E)
            assert_same_run(actual, run(theirs, [x], *args))


# ------------------------------------------------------------------- state dicts, API


ALL_CLASSES = ["MultiheadAttention", "TransformerEncoderLayer", "TransformerEncoder",
               "TransformerDecoderLayer", "TransformerDecoder", "Transformer"]


@pytest.mark.parametrize("cls", ALL_CLASSES)
def test_signatures_and_defaults_match_torch(cls):
    """Same parameter names, order and defaults, in the constructor and in forward; what
    ours adds (``cache``) comes after torch.nn's, keyword-only, defaulting to None."""
    ours, theirs = getattr(compat, cls), getattr(nn, cls)
    for method in ("__init__", "forward", "generate_square_subsequent_mask"):
        if not hasattr(theirs, method):
            continue
        params = list(inspect.signature(getattr(ours, method)).parameters.values())
        expected = [(p.name, p.default) for p in
                    inspect.signature(getattr(theirs, method)).parameters.values()]
        assert [(p.name, p.default) for p in params[:len(expected)]] == expected, \
            f"{cls}.{method}"
        for extra in params[len(expected):]:
            assert extra.kind is inspect.Parameter.KEYWORD_ONLY and extra.default is None, \
                f"{cls}.{method}: {extra.name}"


@pytest.mark.filterwarnings("ignore:enable_nested_tensor is True")  # torch.nn's, sequence first
@pytest.mark.parametrize("cls", ALL_CLASSES)
def test_parameters_are_torchs_names_shapes_and_order(cls):
    """parameters() walks the same tensors in the same order: optimizers, state dicts and
    code that reads in_proj_weight see torch.nn's layout."""
    args = {"MultiheadAttention": (E, 2), "Transformer": (E, 2, 2, 2, FF)}.get(cls, (E, 2, FF))
    if cls in ("TransformerEncoder", "TransformerDecoder"):
        layer = cls + "Layer"
        ours = getattr(compat, cls)(getattr(compat, layer)(E, 2, FF), 2, nn.LayerNorm(E))
        theirs = getattr(nn, cls)(getattr(nn, layer)(E, 2, FF), 2, nn.LayerNorm(E))
    else:
        ours, theirs = getattr(compat, cls)(*args), getattr(nn, cls)(*args)
    assert [(n, p.shape) for n, p in ours.named_parameters()] == \
        [(n, p.shape) for n, p in theirs.named_parameters()]
    assert list(ours.state_dict()) == list(theirs.state_dict())
    ours.load_state_dict(theirs.state_dict())
    theirs.load_state_dict(ours.state_dict())


def test_constructor_defaults_build_torch_modules_defaults():
    mha = compat.MultiheadAttention(E, 2)
    assert not mha.batch_first and mha.dropout == 0.0 and mha.out_proj.bias is not None
    assert mha.in_proj_bias is not None and mha.kdim == mha.vdim == E
    assert mha.bias_k is None and mha.bias_v is None and not mha.add_zero_attn
    layer = compat.TransformerEncoderLayer(E, 2)
    assert layer.linear1.out_features == 2048 and layer.dropout.p == 0.1
    assert layer.activation is F.relu and not layer.norm_first
    assert not layer.self_attn.batch_first
    assert layer.linear1.bias is not None and layer.norm1.bias is not None
    assert layer.norm1.eps == 1e-5


@pytest.mark.filterwarnings("ignore:enable_nested_tensor is True")  # torch.nn's, sequence first
@pytest.mark.parametrize("cls", ALL_CLASSES)
def test_same_seed_gives_torchs_initial_weights(cls):
    """Training from scratch after swapping the import starts from torch.nn's very
    weights: same initialisation, same order of random draws."""
    args = {"MultiheadAttention": (E, 2), "Transformer": (E, 2, 2, 2, FF)}.get(cls, (E, 2, FF))
    if cls in ("TransformerEncoder", "TransformerDecoder"):
        layer = cls + "Layer"
        build = lambda ns: getattr(ns, cls)(getattr(ns, layer)(E, 2, FF), 2)  # noqa: E731
    else:
        build = lambda ns: getattr(ns, cls)(*args)  # noqa: E731
    torch.manual_seed(0)
    ours = build(compat)
    torch.manual_seed(0)
    theirs = build(nn)
    for (name, mine), (_, torchs) in zip(ours.named_parameters(), theirs.named_parameters(),
                                         strict=True):
        assert torch.equal(mine, torchs), name


CHECKPOINT_CASES = {
    "mha": lambda ns: ns.MultiheadAttention(E, 4),
    "mha-kdim-vdim-no-bias": lambda ns: ns.MultiheadAttention(E, 4, bias=False, kdim=12,
                                                              vdim=10),
    "layer": lambda ns: ns.TransformerEncoderLayer(E, 2),
    "layer-pre-norm-gelu-no-bias": lambda ns: ns.TransformerEncoderLayer(
        E, 2, FF, activation="gelu", norm_first=True, bias=False),
    "encoder": lambda ns: ns.TransformerEncoder(ns.TransformerEncoderLayer(E, 2), 2),
    "encoder-norm-batch-first": lambda ns: ns.TransformerEncoder(
        ns.TransformerEncoderLayer(E, 2, FF, batch_first=True), 2, nn.LayerNorm(E)),
}


def eval_forward(module: nn.Module, case: str) -> Tensor:
    torch.manual_seed(1)
    module.eval()
    with torch.no_grad():
        if case.startswith("mha"):
            kdim, vdim = (12, 10) if "kdim" in case else (E, E)
            q, k, v = torch.randn(L, N, E), torch.randn(L, N, kdim), torch.randn(L, N, vdim)
            out, weights = module(q, k, v)
            return torch.cat([out.flatten(), weights.flatten()])
        return module(torch.randn(N, L, E) if "batch-first" in case else torch.randn(L, N, E))


@pytest.mark.filterwarnings(NESTED_WARNING)
@pytest.mark.parametrize("case", list(CHECKPOINT_CASES))
def test_torch_checkpoint_loads_into_compat_twin(case):
    """A torch.nn state dict loads strictly into the compat module built with the same
    arguments (torch.nn's defaults, dropout 0.1, compared in eval); the compat module's own
    state dict loads back into a compat module too."""
    torch.manual_seed(0)
    theirs = perturb_(CHECKPOINT_CASES[case](nn))
    ours = CHECKPOINT_CASES[case](compat)
    result = ours.load_state_dict(theirs.state_dict())  # strict
    assert not result.missing_keys and not result.unexpected_keys
    close(eval_forward(ours, case), eval_forward(theirs, case))

    again = CHECKPOINT_CASES[case](compat)
    again.load_state_dict(ours.state_dict())
    close(eval_forward(again, case), eval_forward(theirs, case))


ROUND_TRIP_CASES = {
    "mha": lambda: nn.MultiheadAttention(E, 4, dropout=0.2),
    "mha-batch-first-no-bias": lambda: nn.MultiheadAttention(E, 4, bias=False, batch_first=True),
    "mha-kdim-vdim": lambda: nn.MultiheadAttention(E, 2, kdim=12, vdim=10),
    "mha-kdim-vdim-no-bias-batch-first": lambda: nn.MultiheadAttention(
        E, 2, bias=False, kdim=12, vdim=10, batch_first=True),
    "layer": lambda: nn.TransformerEncoderLayer(E, 2, FF, 0.2, layer_norm_eps=1e-6),
    "layer-gelu-pre-norm-no-bias-batch-first": lambda: nn.TransformerEncoderLayer(
        E, 2, FF, activation="gelu", norm_first=True, bias=False, batch_first=True),
    "encoder": lambda: nn.TransformerEncoder(nn.TransformerEncoderLayer(E, 2, FF), 3,
                                             enable_nested_tensor=False),
    "encoder-norm-batch-first": lambda: nn.TransformerEncoder(
        nn.TransformerEncoderLayer(E, 2, FF, batch_first=True), 2, nn.LayerNorm(E)),
}


def describe(module: nn.Module) -> dict:
    """The torch.nn configuration a conversion must carry over."""
    if isinstance(module, nn.TransformerEncoder):
        return dict(layers=[describe(layer) for layer in module.layers],
                    norm=None if module.norm is None else module.norm.normalized_shape)
    if isinstance(module, nn.TransformerEncoderLayer):
        return dict(attention=describe(module.self_attn), d_ff=module.linear1.out_features,
                    dropout=module.dropout.p, activation=module.activation,
                    eps=module.norm1.eps, norm_first=module.norm_first)
    return dict(embed_dim=module.embed_dim, num_heads=module.num_heads, kdim=module.kdim,
                vdim=module.vdim, dropout=module.dropout, batch_first=module.batch_first,
                bias=module.in_proj_bias is not None)


@pytest.mark.parametrize("case", list(ROUND_TRIP_CASES))
def test_to_torch_from_torch_round_trips_exactly(case):
    torch.manual_seed(0)
    theirs = perturb_(ROUND_TRIP_CASES[case]())
    ours = from_torch(theirs)
    back = to_torch(ours)
    assert type(back) is type(theirs)
    assert describe(back) == describe(theirs)
    state, expected = back.state_dict(), theirs.state_dict()
    assert list(state) == list(expected)
    for name, tensor in expected.items():
        assert torch.equal(state[name], tensor), name
    # ... and the other way round, from ours.
    again = from_torch(back)
    assert type(again) is type(ours)
    for name, tensor in ours.state_dict().items():
        assert torch.equal(again.state_dict()[name], tensor), name


SIX_CLASSES = {
    "MultiheadAttention": lambda ns: ns.MultiheadAttention(E, 2),
    "TransformerEncoderLayer": lambda ns: ns.TransformerEncoderLayer(E, 2, FF),
    "TransformerDecoderLayer": lambda ns: ns.TransformerDecoderLayer(E, 2, FF),
    "TransformerEncoder": lambda ns: ns.TransformerEncoder(ns.TransformerEncoderLayer(E, 2, FF),
                                                           2, enable_nested_tensor=False),
    "TransformerDecoder": lambda ns: ns.TransformerDecoder(ns.TransformerDecoderLayer(E, 2, FF),
                                                           2),
    "Transformer": lambda ns: ns.Transformer(E, 2, 1, 1, FF, batch_first=True),
}


@pytest.mark.parametrize("name", list(SIX_CLASSES))
def test_each_compat_class_converts_itself(name):
    """``compat.X.from_torch(nn.X)`` and ``compat.X(...).to_torch()`` are the conversions
    ``from_torch``/``to_torch`` dispatch to; a wrong class is refused by name."""
    torch.manual_seed(0)
    cls = getattr(compat, name)
    theirs = perturb_(SIX_CLASSES[name](nn))
    ours = cls.from_torch(theirs)
    assert type(ours) is cls and cls.torch_class is getattr(nn, name)
    back = ours.to_torch()
    assert type(back) is getattr(nn, name)
    for key, tensor in theirs.state_dict().items():
        assert torch.equal(ours.state_dict()[key], tensor), key
        assert torch.equal(back.state_dict()[key], tensor), key
    assert type(from_torch(theirs)) is cls and type(to_torch(ours)) is type(theirs)
    other = nn.LayerNorm(E)
    with pytest.raises(TypeError, match=rf"module: expected torch\.nn\..*\.{name}, exactly, "
                                        r"got torch\.nn\.modules\.normalization\.LayerNorm"):
        cls.from_torch(other)


def test_to_torch_from_torch_keep_encoder_flags():
    theirs = nn.TransformerEncoder(nn.TransformerEncoderLayer(E, 2, FF, batch_first=True), 2,
                                   mask_check=False)
    ours = from_torch(theirs)
    assert ours.mask_check is False
    assert to_torch(ours).mask_check is False


EVAL_CASES = {
    "mha": lambda ns: ns.MultiheadAttention(E, 4, dropout=0.1),
    "layer": lambda ns: ns.TransformerEncoderLayer(E, 2, FF, dropout=0.1),
    "encoder-batch-first": lambda ns: ns.TransformerEncoder(
        ns.TransformerEncoderLayer(E, 2, FF, dropout=0.1, batch_first=True), 2, nn.LayerNorm(E)),
}


@pytest.mark.parametrize("direction", ["from_torch", "to_torch"])
@pytest.mark.parametrize("case", list(EVAL_CASES))
def test_conversion_keeps_eval_mode(case, direction):
    """A model converted for inference stays in eval mode: no dropout on its outputs."""
    torch.manual_seed(0)
    source = perturb_(EVAL_CASES[case](nn if direction == "from_torch" else compat)).eval()
    converted = (from_torch if direction == "from_torch" else to_torch)(source)
    with torch.no_grad():
        x = torch.randn(N, L, E) if "batch-first" in case else torch.randn(L, N, E)
        args = (x, x, x) if case == "mha" else (x,)
        close(converted(*args), source(*args))
    assert not any(m.training for m in converted.modules())


@pytest.mark.parametrize("device", DEVICES)
def test_device_and_dtype_are_kept(device):
    torch.manual_seed(0)
    for cls in ("MultiheadAttention", "TransformerEncoderLayer"):
        ours = getattr(compat, cls)(E, 2, device=device, dtype=torch.float64)
        assert all(p.dtype == torch.float64 and p.device.type == device
                   for p in ours.parameters())
    theirs = perturb_(nn.TransformerEncoder(nn.TransformerEncoderLayer(E, 2, FF, 0.0), 2,
                                            enable_nested_tensor=False))
    theirs = theirs.to(device=device, dtype=torch.float64)
    ours = from_torch(theirs)
    back = to_torch(ours)
    for module in (ours, back):
        assert all(p.dtype == torch.float64 and p.device.type == device
                   for p in module.parameters())
    x = torch.randn(L, N, E, dtype=torch.float64, device=device)
    close(ours(x), theirs(x))
    close(back(x), theirs(x))


# ----------------------------------------------------------- core classes, errors


CORE_CASES = {
    "mha": lambda: MultiHeadAttention(E, 4),
    "mha-bias-kdim-vdim": lambda: MultiHeadAttention(E, 4, bias=True, kdim=12, vdim=10),
    "layer": lambda: EncoderLayer(E, 2, FF, dropout=0.0),
    "layer-post-norm-relu-bias": lambda: EncoderLayer(E, 2, FF, 0.0, "relu", norm_first=False,
                                                      bias=True),
    "layer-silu": lambda: EncoderLayer(E, 2, FF, 0.0, "silu"),
    "encoder": lambda: Encoder(E, 2, 2, FF, dropout=0.0, positional=None),
    "encoder-post-norm-bias": lambda: Encoder(E, 2, 2, FF, 0.0, positional=None,
                                              norm_first=False, bias=True),
}


@pytest.mark.parametrize("case", list(CORE_CASES))
def test_core_batch_first_classes_convert_to_batch_first_torch(case):
    torch.manual_seed(0)
    ours = perturb_(CORE_CASES[case]())
    theirs = to_torch(ours)
    padding = torch.arange(L) >= torch.tensor([L, 4, 2])[:, None]
    if case.startswith("mha"):
        assert isinstance(theirs, nn.MultiheadAttention) and theirs.batch_first
        inputs = [torch.randn(N, L, dim) for dim in (E, ours.kdim, ours.vdim)]
        actual = run(ours, inputs, key_padding_mask=padding)
        expected = run(theirs, inputs, key_padding_mask=padding, need_weights=False)
    else:
        if case.startswith("layer"):
            assert isinstance(theirs, nn.TransformerEncoderLayer)
            assert theirs.self_attn.batch_first
        else:
            assert isinstance(theirs, nn.TransformerEncoder)
            assert all(layer.self_attn.batch_first for layer in theirs.layers)
            assert (theirs.norm is None) == (ours.norm is None)
        # Ours computes the real tokens only (padded positions come out zero), so the loss
        # and the comparison take the real positions only.
        inputs = [torch.randn(N, L, E)]
        actual = run(ours, inputs, key_padding_mask=padding, real=~padding)
        expected = run(theirs, inputs, src_key_padding_mask=padding, real=~padding)
    assert_same_run(actual, expected)


@pytest.mark.parametrize("positional", ["sinusoidal", "learned", "rotary"])
def test_to_torch_rejects_encoder_with_positional_encoding(positional):
    with pytest.raises(ValueError, match="positional=None"):
        to_torch(Encoder(E, 2, 1, positional=positional))


@pytest.mark.parametrize("cls", [MultiHeadAttention, EncoderLayer], ids=lambda c: c.__name__)
def test_to_torch_rejects_rotary(cls):
    with pytest.raises(ValueError, match="rotary"):
        to_torch(cls(E, 2, rotary=True))


@pytest.mark.parametrize("make", [partial(nn.Linear, E, E), partial(nn.GRU, E, E)],
                         ids=["Linear", "GRU"])
def test_unsupported_types_raise_type_error(make):
    module = make()
    name = type(module).__name__
    with pytest.raises(TypeError, match=name):
        from_torch(module)
    with pytest.raises(TypeError, match=name):
        to_torch(module)


class ScaledEncoderLayer(nn.TransformerEncoderLayer):
    """A user's subclass of torch.nn's layer, with a parameter and a forward of its own."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.gate = nn.Parameter(torch.tensor(0.5))

    def forward(self, src, *args, **kwargs):
        return self.gate * super().forward(src, *args, **kwargs)


def test_stacks_clone_a_users_layer_subclass_as_it_is():
    """torch.nn's stacks take any layer module; only torch.nn's own layer class is converted
    to ours, a subclass keeps its forward and its parameters."""
    torch.manual_seed(0)
    layer = ScaledEncoderLayer(E, 2, FF, dropout=0.0)
    ours = compat.TransformerEncoder(layer, 2).eval()
    theirs = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False).eval()
    assert all(type(m) is ScaledEncoderLayer for m in ours.layers)
    assert "layers.0.gate" in ours.state_dict()
    x = torch.randn(L, N, E)
    close(ours(x), theirs(x))
    with pytest.raises(TypeError, match="encoder_layer"):
        compat.TransformerEncoder("not a layer", 2)
    with pytest.raises(TypeError, match="decoder_layer"):
        compat.TransformerDecoder(None, 2)


@pytest.mark.parametrize("flags", [{"add_bias_kv": True}, {"add_zero_attn": True},
                                   {"add_bias_kv": True, "add_zero_attn": True}],
                         ids=["bias_kv", "zero_attn", "both"])
def test_layer_whose_attention_adds_keys_converts_with_its_flags(flags):
    """A torch.nn layer whose self_attn was replaced by one with add_bias_kv/add_zero_attn
    keeps that attention through from_torch, and computes what torch computes."""
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(E, 2, FF, dropout=0.0)
    layer.self_attn = nn.MultiheadAttention(E, 2, **flags)
    ours = from_torch(layer)
    assert (ours.self_attn.bias_k is not None) == flags.get("add_bias_kv", False)
    assert ours.self_attn.add_zero_attn == flags.get("add_zero_attn", False)
    src = torch.randn(L, N, E)
    padding = torch.zeros(N, L, dtype=torch.bool)
    padding[0, -2:] = True
    torch.testing.assert_close(ours(src, src_key_padding_mask=padding),
                               layer(src, src_key_padding_mask=padding), atol=1e-5, rtol=0)
    back = to_torch(ours)
    assert back.self_attn.add_zero_attn == ours.self_attn.add_zero_attn
    assert [n for n, _ in back.named_parameters()] == [n for n, _ in layer.named_parameters()]


# ---------------------------------------------------------------- swap the import


class TinyClassifier(nn.Module):
    """A user's model written against torch.nn, sequence first, torch.nn's defaults except
    dropout; only the namespace ``ns`` it takes its attention modules from changes."""

    def __init__(self, ns, vocab: int = 13, classes: int = 3) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, E)
        layer = ns.TransformerEncoderLayer(E, 2, dim_feedforward=FF, dropout=0.0)
        self.encoder = ns.TransformerEncoder(layer, num_layers=2, norm=nn.LayerNorm(E))
        self.pool = ns.MultiheadAttention(E, 2)
        self.head = nn.Linear(E, classes)

    def forward(self, ids: Tensor, padding: Tensor) -> Tensor:  # ids (L, N), padding (N, L)
        x = self.encoder(self.embed(ids), src_key_padding_mask=padding)
        pooled, _ = self.pool(x.mean(dim=0, keepdim=True), x, x, key_padding_mask=padding)
        return self.head(pooled[0])  # (N, classes)


@pytest.mark.filterwarnings(NESTED_WARNING)
@pytest.mark.parametrize("ns", [nn, compat], ids=["torch.nn", "attention.compat"])
def test_swapping_the_import_keeps_outputs_and_training(ns):
    torch.manual_seed(0)
    reference = TinyClassifier(nn)
    model = TinyClassifier(ns)
    model.load_state_dict(reference.state_dict())
    ids = torch.randint(1, 13, (L, 4))
    padding = torch.arange(L) >= torch.tensor([L, 5, 3, 4])[:, None]
    labels = torch.tensor([0, 1, 2, 1])

    def train(m: nn.Module) -> Tensor:
        optimizer = torch.optim.SGD(m.parameters(), lr=0.1)
        losses = []
        for _ in range(3):
            optimizer.zero_grad()
            loss = F.cross_entropy(m(ids, padding), labels)
            loss.backward()
            optimizer.step()
            losses.append(loss.detach())
        return torch.stack(losses)

    close(model(ids, padding), reference(ids, padding))
    losses, expected = train(model), train(reference)
    assert expected[-1] < expected[0]  # it trained
    close(losses, expected)
    close(model(ids, padding), reference(ids, padding))


def test_replacing_torch_named_parts_of_a_layer_takes_effect():
    """Adapter-style surgery: layer.linear2 = ... must change what the layer computes."""
    torch.manual_seed(0)
    layer = compat.TransformerEncoderLayer(16, 2, 32, dropout=0.0).eval()
    x = torch.randn(5, 2, 16)
    before = layer(x)
    layer.linear2 = nn.Linear(32, 16)
    layer.activation = F.gelu
    layer.dropout = nn.Dropout(0.3)
    assert not torch.allclose(layer(x), before)
    assert [k for k in layer.state_dict() if k.startswith("linear2.")] == \
        ["linear2.weight", "linear2.bias"]


def test_compat_errors_use_torch_names_and_the_callers_shapes():
    layer = compat.TransformerEncoderLayer(32, 4, 64)
    with pytest.raises(ValueError, match=r"src: expected d_model=32 .*got shape \(5, 2, 31\)"):
        layer(torch.randn(5, 2, 31))
    mha = compat.MultiheadAttention(16, 2)
    with pytest.raises(ValueError, match=r"key: expected N \(as in query\)=2 .*\(4, 3, 16\)"):
        mha(torch.randn(5, 2, 16), torch.randn(4, 3, 16), torch.randn(4, 3, 16))


BAD_INPUTS = {  # name: (query, key_padding_mask, the argument the message names)
    "query width": (torch.randn(5, 2, 15), None, "query"),
    "4-D query": (torch.randn(1, 5, 2, 16), None, "query"),
    "mask dtype": (torch.randn(5, 2, 16), torch.zeros(2, 5, dtype=torch.long),
                   "key_padding_mask"),
    "mask shape": (torch.randn(5, 2, 16), torch.zeros(2, 4, dtype=torch.bool),
                   "key_padding_mask"),
}


@pytest.mark.parametrize("bad", BAD_INPUTS)
def test_bad_input_raises_what_torch_users_catch(bad):
    """torch.nn raises AssertionError for these; ours raises an AssertionError too, which
    is also our ValueError/TypeError naming the argument."""
    query, padding, name = BAD_INPUTS[bad]
    with pytest.raises(AssertionError):
        nn.MultiheadAttention(16, 2)(query, query, query, key_padding_mask=padding)
    with pytest.raises(AssertionError, match=name) as raised:
        compat.MultiheadAttention(16, 2)(query, query, query, key_padding_mask=padding)
    assert isinstance(raised.value, (ValueError, TypeError))


def test_transformer_compiles_in_one_graph_and_matches_eager():
    """torch.compile(fullgraph=True): no graph break anywhere in the six classes' forward
    (the causal-mask detection, which reads the mask, is skipped while compiling)."""
    torch.compiler.reset()
    torch.manual_seed(0)
    model = compat.Transformer(E, 2, 1, 1, FF, dropout=0.0, batch_first=True).eval()
    src, tgt = torch.randn(N, L + 2, E), torch.randn(N, L, E)
    padding = torch.zeros(N, L + 2, dtype=torch.bool)
    padding[0, -2:] = True
    kwargs = dict(tgt_mask=nn.Transformer.generate_square_subsequent_mask(L),
                  src_key_padding_mask=padding, memory_key_padding_mask=padding)
    compiled = torch.compile(model, fullgraph=True, backend="eager")
    close(compiled(src, tgt, **kwargs), model(src, tgt, **kwargs))
    torch.compiler.reset()


@pytest.mark.parametrize("kind", ["attention", "encoder layer", "decoder layer"])
def test_state_dicts_of_the_core_layout_load(kind):
    """Checkpoints with separate q_proj/k_proj/v_proj and a feed_forward (this package's
    batch-first classes, and attention.compat's own before it held torch.nn's parameters)
    load into the compat classes and compute the same thing."""
    from attention import DecoderLayer, EncoderLayer
    torch.manual_seed(0)
    x, memory = torch.randn(N, L, E), torch.randn(N, L + 2, E)
    common = dict(dropout=0.0, activation="relu", norm_first=False, bias=True)
    if kind == "attention":
        core = MultiHeadAttention(E, 2, bias=True)
        ours = compat.MultiheadAttention(E, 2, batch_first=True)
        run_core = lambda: core(x, memory)[0]  # noqa: E731
        run_ours = lambda: ours(x, memory, memory, need_weights=False)[0]  # noqa: E731
    elif kind == "encoder layer":
        core = EncoderLayer(E, 2, FF, **common)
        ours = compat.TransformerEncoderLayer(E, 2, FF, 0.0, batch_first=True)
        run_core, run_ours = (lambda: core(x)), (lambda: ours(x))
    else:
        core = DecoderLayer(E, 2, FF, **common)
        ours = compat.TransformerDecoderLayer(E, 2, FF, 0.0, batch_first=True)
        run_core = lambda: core(x, memory, is_causal=False)  # noqa: E731
        run_ours = lambda: ours(x, memory)  # noqa: E731
    perturb_(core)
    ours.load_state_dict(core.state_dict())
    close(run_ours(), run_core())


# ------------------------------------------------ what a review of the drop-in turned up


@pytest.mark.filterwarnings("ignore:enable_nested_tensor is True")  # torch.nn's, sequence first
@pytest.mark.parametrize("batch_first", [False, True])
def test_training_with_dropout_matches_torch_under_the_same_seed(batch_first):
    """torch.nn's default dropout 0.1 in training: the same seed gives the same outputs and
    gradients, because the attention output sits in memory as torch.nn's does, so each
    dropout draws its mask over the same elements."""
    torch.manual_seed(0)
    theirs = nn.Transformer(E, 4, 2, 2, FF, batch_first=batch_first).train()
    torch.manual_seed(0)
    ours = compat.Transformer(E, 4, 2, 2, FF, batch_first=batch_first).train()
    src, tgt = torch.randn(N, L + 1, E), torch.randn(N, L, E)
    if not batch_first:
        src, tgt = src.transpose(0, 1), tgt.transpose(0, 1)
    mask = nn.Transformer.generate_square_subsequent_mask(L)
    outputs = []
    for model in (theirs, ours):
        torch.manual_seed(42)
        out = model(src, tgt, tgt_mask=mask)
        out.square().sum().backward()
        outputs.append((out, {n: p.grad for n, p in model.named_parameters()}))
    close(outputs[1][0], outputs[0][0])
    close(outputs[1][1], outputs[0][1])


def test_a_given_tgt_mask_is_used_on_a_caches_first_call():
    """A prefix-LM mask (the prompt attends both ways) given with a cache is applied as
    given, on the first call as on later ones."""
    torch.manual_seed(0)
    decoder = compat.TransformerDecoder(compat.TransformerDecoderLayer(E, 2, FF, 0.0), 1).eval()
    tgt, memory = torch.randn(L, N, E), torch.randn(L + 1, N, E)
    mask = torch.ones(L, L, dtype=torch.bool).triu(1)
    mask[:3, :3] = False  # the first three positions see each other
    full = decoder(tgt, memory, tgt_mask=mask)
    cache = decoder.new_cache()
    prefill = decoder(tgt[:3], memory, tgt_mask=mask[:3, :3], cache=cache)
    step = decoder(tgt[3:4], memory, tgt_mask=mask[3:4, :4], cache=cache)
    close(prefill, full[:3])
    close(step, full[3:4])


def test_from_torch_keeps_what_was_changed_in_each_part():
    """A norm's eps, a linear without bias, a dropout's p, an activation module, frozen
    parameters: each survives the conversion, and nothing is shared with the source."""
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(E, 2, FF, dropout=0.0, activation=nn.PReLU())
    layer.norm2.eps = 0.1
    layer.dropout1.p = 0.5
    layer.linear2 = nn.Linear(FF, E, bias=False)
    layer.self_attn.in_proj_weight.requires_grad_(False)
    ours = from_torch(layer)
    assert ours.norm2.eps == 0.1 and ours.dropout1.p == 0.5 and ours.linear2.bias is None
    assert not ours.self_attn.in_proj_weight.requires_grad and ours.linear1.weight.requires_grad
    assert ours.activation is not layer.activation
    with torch.no_grad():
        ours.activation.weight.fill_(0.9)
    assert layer.activation.weight.item() != 0.9
    layer.eval(), ours.eval()
    x = torch.randn(L, N, E)
    ours.activation.weight.data.copy_(layer.activation.weight)
    close(ours(x), layer(x))
    with pytest.raises(TypeError, match="ScaledEncoderLayer"):
        from_torch(ScaledEncoderLayer(E, 2, FF))  # a subclass's own forward would be lost


def _mha_call(mha, q, **kwargs):
    return mha(q, q, q, **kwargs)


TORCH_ERRORS = {  # what torch.nn raises, and the call (namespace -> result)
    "attn_mask of the wrong size": (RuntimeError, lambda ns: _mha_call(
        ns.MultiheadAttention(E, 2), torch.randn(L, N, E), attn_mask=torch.zeros(L, L + 1))),
    "integer query": (RuntimeError, lambda ns: _mha_call(
        ns.MultiheadAttention(E, 2), torch.ones(L, N, E, dtype=torch.long))),
    "memory of the wrong width": (RuntimeError, lambda ns: ns.TransformerDecoderLayer(
        E, 2, FF)(torch.randn(L, N, E), torch.randn(L, N, E + 1))),
    "embed_dim not divisible": (AssertionError, lambda ns: ns.MultiheadAttention(10, 4)),
    "unknown activation": (RuntimeError, lambda ns: ns.TransformerEncoderLayer(
        E, 2, activation="tanh")),
    "attn_mask not a tensor": (TypeError, lambda ns: _mha_call(
        ns.MultiheadAttention(E, 2), torch.randn(L, N, E), attn_mask=[[0.0] * L] * L)),
}


@pytest.mark.parametrize("case", TORCH_ERRORS)
def test_errors_are_what_torch_raises(case):
    expected, call = TORCH_ERRORS[case]
    with pytest.raises(expected):
        call(nn)
    with pytest.raises(expected) as raised:
        call(compat)
    assert isinstance(raised.value, (ValueError, TypeError))


def test_a_users_own_exception_passes_through_unchanged():
    class NonFinite(ValueError):
        pass

    def refuse(x):
        raise NonFinite("activation saw a NaN")

    layer = compat.TransformerEncoderLayer(E, 2, FF, activation=refuse)
    with pytest.raises(NonFinite):
        layer(torch.randn(L, N, E))


@pytest.mark.parametrize("flags", [{"add_bias_kv": True}, {"add_zero_attn": True}],
                         ids=["bias_kv", "zero_attn"])
def test_causal_hint_with_extra_keys_matches_torch(flags):
    """With the hint, no padding and no weights asked, torch.nn replaces the mask by a causal
    one from the first key, which hides the extra key; so does ours."""
    torch.manual_seed(0)
    theirs = nn.MultiheadAttention(E, 2, **flags).eval()
    ours = from_torch(theirs)
    x = torch.randn(L, N, E)
    mask = nn.Transformer.generate_square_subsequent_mask(L)
    kwargs = dict(attn_mask=mask, is_causal=True, need_weights=False)
    close(ours(x, x, x, **kwargs)[0], theirs(x, x, x, **kwargs)[0])


def test_memory_is_causal_without_a_mask_raises_even_with_a_cache():
    """Only a self-attention cache stands for the causal mask; cross-attention's
    memory_is_causal needs its memory_mask, as in torch.nn."""
    decoder = compat.TransformerDecoder(compat.TransformerDecoderLayer(E, 2, FF, 0.0), 1)
    cache = decoder.new_cache()
    with pytest.raises(RuntimeError, match="is_causal"):
        decoder(torch.randn(1, N, E), torch.randn(L, N, E), memory_is_causal=True, cache=cache)


@pytest.mark.parametrize("case", ["tgt_mask", "memory_key_padding_mask", "memory"])
def test_decoder_layer_errors_name_the_layers_argument(case):
    layer = compat.TransformerDecoderLayer(E, 2, FF)
    x = torch.randn(L, N, E)
    memory = torch.randn(L + 1, N + 1, E) if case == "memory" else torch.randn(L + 1, N, E)
    kwargs = {"tgt_mask": {"tgt_mask": torch.zeros(L, L + 1)},
              "memory_key_padding_mask": {"memory_key_padding_mask":
                                          torch.zeros(N, L, dtype=torch.bool)},
              "memory": {}}[case]
    with pytest.raises(ValueError, match=f"^{case} "):
        layer(x, memory, **kwargs)
