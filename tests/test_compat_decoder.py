"""attention.compat's decoder side and whole Transformer against torch.nn, the oracle.

Every comparison is float32 with ``atol=1e-5, rtol=0``: outputs, attention weights,
gradients w.r.t. the inputs and gradients w.r.t. the parameters, matched by name (the compat
classes have torch.nn's parameter names, shapes and order). Parameters are perturbed off
their initialisation so that zero biases and unit LayerNorm weights cannot hide a tensor
dropped or swapped by a conversion. Dropout is 0 in the comparisons that train.

No mask here leaves a query without a visible key (padding is at the end of a row and never
covers a whole row, causal rows see their diagonal): torch.nn gives NaN there by design.

Incremental decoding (``new_cache``/``cache=``) is ours only; its oracle is torch.nn's full
pass with the causal mask, in eval mode.
"""

from __future__ import annotations

import copy
import inspect
import io
from functools import partial

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.testing import assert_close

from attention import compat

E, FF, N, T, S = 16, 32, 3, 5, 7  # d_model, dim_feedforward, batch, tgt length, src length
TGT_LENGTHS, SRC_LENGTHS = [T, T - 2, 2], [S, 3, S - 1]  # real lengths, padding after

# torch.nn warns when a float attn_mask meets a bool key_padding_mask ("mixed" masks)...
MISMATCHED_WARNING = "ignore:Support for mismatched:UserWarning"
# ... and when nn.Transformer builds its sequence-first encoder with enable_nested_tensor.
NESTED_WARNING = "ignore:enable_nested_tensor is True:UserWarning"
NESTED_PROTOTYPE_WARNING = "ignore:The PyTorch API of nested tensors:UserWarning"

pytestmark = [pytest.mark.filterwarnings(MISMATCHED_WARNING),
              pytest.mark.filterwarnings(NESTED_WARNING),
              pytest.mark.filterwarnings(NESTED_PROTOTYPE_WARNING)]


def scaled_silu(x: Tensor) -> Tensor:
    """An activation neither torch.nn nor we know by name."""
    return 1.5 * F.silu(x)


ACTIVATIONS = {"relu": "relu", "gelu": "gelu", "callable": scaled_silu}


def close(actual: object, expected: object, msg: str | None = None) -> None:
    assert_close(actual, expected, atol=1e-5, rtol=0, msg=msg)


def perturb_(module: nn.Module, seed: int = 1234) -> nn.Module:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.2 * torch.randn(p.shape, generator=generator).to(p))
    return module


def layout(x: Tensor, batch_first: bool) -> Tensor:
    """``(N, L, E)`` ↔ torch.nn's sequence-first ``(L, N, E)`` (its own inverse)."""
    return x if batch_first or x.dim() < 3 else x.transpose(0, 1)


def causal(length: int) -> Tensor:
    return nn.Transformer.generate_square_subsequent_mask(length)


def bool_causal(length: int) -> Tensor:
    return torch.ones(length, length, dtype=torch.bool).triu(1)


def padding(lengths: list[int], length: int) -> Tensor:
    return torch.arange(length) >= torch.tensor(lengths)[:, None]  # (N, L), True at padding


def float_padding(padded: Tensor, generator: torch.Generator) -> Tensor:
    """Additive: -inf at padding, random finite values elsewhere."""
    return (0.5 * torch.randn(padded.shape, generator=generator)).masked_fill(padded,
                                                                           float("-inf"))


def check_same_params(ours: nn.Module, theirs: nn.Module) -> None:
    assert [(n, p.shape) for n, p in ours.named_parameters()] == \
        [(n, p.shape) for n, p in theirs.named_parameters()]
    ours_storage = {p.data_ptr() for p in ours.parameters()}
    assert not ours_storage & {p.data_ptr() for p in theirs.parameters()}, "shared parameters"


def build_pair(direction: str, make) -> tuple[nn.Module, nn.Module]:
    """``(torch.nn module, ours)`` with equal weights; ``make(ns)`` builds either one."""
    torch.manual_seed(0)
    if direction == "from_torch":
        theirs = perturb_(make(nn))
        ours = compat.from_torch(theirs)
    else:
        ours = perturb_(make(compat))
        theirs = compat.to_torch(ours)
    assert ours is not theirs
    check_same_params(ours, theirs)
    return theirs, ours


def cotangent(x: Tensor) -> Tensor:
    """A fixed, non-uniform gradient to pull back through ``x``."""
    return torch.arange(x.numel(), dtype=x.dtype).reshape(x.shape).sin()


def run(module: nn.Module, inputs: list[Tensor], **kwargs) -> tuple:
    """Forward fresh leaf copies of ``inputs``, backward a fixed cotangent through the output
    (and the attention weights when there are some).

    Returns ``(output, weights or None, input grads, parameter grads by name)``.
    """
    leaves = [x.detach().clone().requires_grad_() for x in inputs]
    out = module(*leaves, **kwargs)
    out, weights = out if isinstance(out, tuple) else (out, None)
    loss = (out * cotangent(out)).sum()
    if weights is not None:
        loss = loss + (weights * cotangent(weights)).sum()
    module.zero_grad(set_to_none=True)
    loss.backward()
    grads = {name: p.grad for name, p in module.named_parameters()}
    return (out.detach(), None if weights is None else weights.detach(),
            [x.grad for x in leaves], grads)


def assert_same_run(actual: tuple, expected: tuple, what: str = "") -> None:
    out, weights, input_grads, param_grads = actual
    assert out.shape == expected[0].shape, what
    close(out, expected[0], f"{what}: output")
    if expected[1] is None:
        assert weights is None, what
    else:
        close(weights, expected[1], f"{what}: attention weights")
    close(input_grads, expected[2], f"{what}: input gradients")
    assert list(param_grads) == list(expected[3]), what
    close(param_grads, expected[3], f"{what}: parameter gradients")


# ------------------------------------------------------------------------------ masks

MASKS = ["none", "causal", "causal-hint", "bool-causal", "padding", "padding+causal",
         "float", "mixed", "per-head"]


def make_masks(kind: str, heads: int, batched: bool = True) -> dict:
    """Every mask torch.nn.Transformer's forward takes, for ``kind``; the decoder classes use
    the ``tgt_*``/``memory_*`` ones. Memory is the source: its padding is the source's.

    ``kind``:
      - ``causal``: torch.nn's float -inf causal ``tgt_mask`` (``causal-hint``: with
        ``tgt_is_causal=True``, and a causal ``src_mask`` with ``src_is_causal=True``);
      - ``bool-causal``: a bool causal ``tgt_mask``;
      - ``padding``: bool key padding masks (tgt and memory), ``padding+causal`` with a bool
        causal ``tgt_mask``;
      - ``float``: additive masks, random finite values, -inf at padding;
      - ``mixed``: float attention masks (causal + random) with bool key padding masks;
      - ``per-head``: 3-D ``(N * heads, L, S)`` masks, bool for tgt, float for memory.
    """
    g = torch.Generator().manual_seed(7)
    batch = N if batched else 1
    tgt_pad = padding(TGT_LENGTHS, T)
    src_pad = padding(SRC_LENGTHS, S)
    masks: dict = {}
    if kind == "causal":
        masks.update(tgt_mask=causal(T))
    elif kind == "causal-hint":
        masks.update(tgt_mask=causal(T), tgt_is_causal=True, src_mask=causal(S),
                     src_is_causal=True)
    elif kind == "bool-causal":
        masks.update(tgt_mask=bool_causal(T))
    elif kind in ("padding", "padding+causal", "mixed"):
        masks.update(tgt_key_padding_mask=tgt_pad, memory_key_padding_mask=src_pad,
                     src_key_padding_mask=src_pad)
        if kind == "padding+causal":
            masks.update(tgt_mask=bool_causal(T))
        elif kind == "mixed":
            masks.update(tgt_mask=causal(T) + torch.randn(T, T, generator=g),
                         memory_mask=torch.randn(T, S, generator=g),
                         src_mask=torch.randn(S, S, generator=g))
    elif kind == "float":
        masks.update(tgt_mask=torch.randn(T, T, generator=g),
                     memory_mask=torch.randn(T, S, generator=g),
                     src_mask=torch.randn(S, S, generator=g),
                     tgt_key_padding_mask=float_padding(tgt_pad, g),
                     memory_key_padding_mask=float_padding(src_pad, g),
                     src_key_padding_mask=float_padding(src_pad, g))
    elif kind == "per-head":
        tgt_mask = bool_causal(T) | (torch.rand(batch * heads, T, T, generator=g) < 0.3)
        tgt_mask.diagonal(dim1=-2, dim2=-1).fill_(False)
        masks.update(tgt_mask=tgt_mask,
                     memory_mask=torch.randn(batch * heads, T, S, generator=g),
                     src_mask=torch.randn(batch * heads, S, S, generator=g))
    else:
        assert kind == "none"
    if not batched:  # row 1, which has padding in tgt and memory
        masks = {k: v[1] if k.endswith("key_padding_mask") else v for k, v in masks.items()}
    return masks


def decoder_masks(masks: dict) -> dict:
    return {k: v for k, v in masks.items() if not k.startswith("src_")}


# -------------------------------------------------------- the grid: outputs and gradients


def decoder_layer_kwargs(batch_first, norm_first, activation, bias, heads=2) -> dict:
    return dict(d_model=E, nhead=heads, dim_feedforward=FF, dropout=0.0,
                activation=ACTIVATIONS[activation], batch_first=batch_first,
                norm_first=norm_first, bias=bias)


def make_decoder_layer(ns, **kwargs):
    return ns.TransformerDecoderLayer(**kwargs)


def make_decoder(ns, **kwargs):
    """Two layers and a final LayerNorm (torch.nn.Transformer's decoder)."""
    norm = nn.LayerNorm(E, bias=kwargs["bias"])
    return ns.TransformerDecoder(ns.TransformerDecoderLayer(**kwargs), 2, norm)


def make_transformer(ns, **kwargs):
    return ns.Transformer(num_encoder_layers=2, num_decoder_layers=2, **kwargs)


CLASSES = {
    "TransformerDecoderLayer": make_decoder_layer,
    "TransformerDecoder": make_decoder,
    "Transformer": make_transformer,
}


def grid_inputs(cls: str, batch_first: bool, batched: bool = True) -> list[Tensor]:
    """``[tgt, memory]`` for the decoders, ``[src, tgt]`` for the Transformer."""
    g = torch.Generator().manual_seed(3)
    src = torch.randn(N, S, E, generator=g)
    tgt = torch.randn(N, T, E, generator=g)
    if not batched:
        src, tgt = src[1], tgt[1]
    src, tgt = layout(src, batch_first), layout(tgt, batch_first)
    return [src, tgt] if cls == "Transformer" else [tgt, src]


def check_grid_case(cls, direction, batch_first, norm_first, activation, bias, heads=2,
                    batched=True, masks=MASKS):
    kwargs = decoder_layer_kwargs(batch_first, norm_first, activation, bias, heads)
    theirs, ours = build_pair(direction, partial(CLASSES[cls], **kwargs))
    assert isinstance(ours, getattr(compat, cls)) and isinstance(theirs, getattr(nn, cls))
    inputs = grid_inputs(cls, batch_first, batched)
    for kind in masks:
        mask_kwargs = make_masks(kind, heads, batched)
        if cls != "Transformer":
            mask_kwargs = decoder_masks(mask_kwargs)
        expected = run(theirs, inputs, **mask_kwargs)
        actual = run(ours, inputs, **mask_kwargs)
        assert actual[0].shape == inputs[1 if cls == "Transformer" else 0].shape
        assert_same_run(actual, expected, f"{cls}, mask {kind}")


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no-bias"])
@pytest.mark.parametrize("activation", list(ACTIVATIONS))
@pytest.mark.parametrize("norm_first", [False, True], ids=["post-norm", "pre-norm"])
@pytest.mark.parametrize("batch_first", [False, True], ids=["seq-first", "batch-first"])
@pytest.mark.parametrize("direction", ["from_torch", "to_torch"])
@pytest.mark.parametrize("cls", list(CLASSES))
def test_matches_torch_outputs_and_gradients(cls, direction, batch_first, norm_first,
                                             activation, bias):
    """Every mask kind of MASKS, one after the other, on the same pair of modules."""
    check_grid_case(cls, direction, batch_first, norm_first, activation, bias,
                    heads=4 if cls == "Transformer" else 2)


@pytest.mark.parametrize("norm_first", [False, True], ids=["post-norm", "pre-norm"])
@pytest.mark.parametrize("batch_first", [False, True], ids=["seq-first", "batch-first"])
@pytest.mark.parametrize("cls", list(CLASSES))
def test_unbatched_matches_torch(cls, batch_first, norm_first):
    """(T, E) tgt, (S, E) memory/src, (L,) key padding masks, (L, S) and (heads, L, S)
    attention masks."""
    check_grid_case(cls, "from_torch", batch_first, norm_first, "gelu", True, batched=False,
                    masks=["none", "causal", "padding+causal", "float", "mixed", "per-head"])


@pytest.mark.parametrize("tgt_is_causal", [None, True, False])
def test_decoder_causal_hint_and_detection(tgt_is_causal):
    """torch.nn's decoder detects a causal tgt_mask when tgt_is_causal is None (float -inf
    or bool), and takes the hint as given otherwise; the result is the masked one in every
    case, which ours must match."""
    kwargs = decoder_layer_kwargs(True, False, "relu", True)
    theirs, ours = build_pair("from_torch", partial(make_decoder, **kwargs))
    inputs = grid_inputs("TransformerDecoder", True)
    for mask in (causal(T), bool_causal(T)):
        expected = run(theirs, inputs, tgt_mask=mask, tgt_is_causal=tgt_is_causal)
        assert_same_run(run(ours, inputs, tgt_mask=mask, tgt_is_causal=tgt_is_causal),
                        expected)


# ------------------------------------------------------------- parameter layout, state


LAYOUT_CASES = {
    "mha": lambda ns: ns.MultiheadAttention(E, 4),
    "mha-kdim-vdim-no-bias": lambda ns: ns.MultiheadAttention(E, 4, bias=False, kdim=12,
                                                              vdim=10),
    "mha-bias-kv-zero-attn": lambda ns: ns.MultiheadAttention(E, 4, add_bias_kv=True,
                                                              add_zero_attn=True),
    "mha-kdim-vdim-bias-kv": lambda ns: ns.MultiheadAttention(E, 2, add_bias_kv=True,
                                                              kdim=12, vdim=10),
    "encoder-layer": lambda ns: ns.TransformerEncoderLayer(E, 2, FF),
    "encoder-layer-no-bias-pre-norm": lambda ns: ns.TransformerEncoderLayer(
        E, 2, FF, bias=False, norm_first=True),
    "encoder-norm": lambda ns: ns.TransformerEncoder(ns.TransformerEncoderLayer(E, 2, FF), 2,
                                                     nn.LayerNorm(E)),
    "decoder-layer": lambda ns: ns.TransformerDecoderLayer(E, 2, FF),
    "decoder-layer-no-bias-pre-norm-batch-first": lambda ns: ns.TransformerDecoderLayer(
        E, 2, FF, bias=False, norm_first=True, batch_first=True),
    "decoder": lambda ns: ns.TransformerDecoder(ns.TransformerDecoderLayer(E, 2, FF), 3),
    "decoder-norm": lambda ns: ns.TransformerDecoder(ns.TransformerDecoderLayer(E, 2, FF), 2,
                                                     nn.LayerNorm(E)),
    "transformer": lambda ns: ns.Transformer(E, 2, 2, 3, FF),
    "transformer-no-bias-pre-norm-batch-first": lambda ns: ns.Transformer(
        E, 4, 1, 1, FF, bias=False, norm_first=True, batch_first=True),
}


def eval_forward(module: nn.Module, case: str) -> Tensor:
    """An eval-mode output (dropout is torch.nn's default 0.1) of any LAYOUT_CASES module."""
    g = torch.Generator().manual_seed(1)
    batch_first = "batch-first" in case
    module.eval()
    with torch.no_grad():
        if case.startswith("mha"):
            kdim, vdim = (12, 10) if "kdim" in case else (E, E)
            q, k, v = (torch.randn(S, N, d, generator=g) for d in (E, kdim, vdim))
            out, weights = module(q[:T], k, v)
            return torch.cat([out.flatten(), weights.flatten()])
        src = layout(torch.randn(N, S, E, generator=g), batch_first)
        tgt = layout(torch.randn(N, T, E, generator=g), batch_first)
        if case.startswith("encoder"):
            return module(src)
        if case.startswith("decoder"):
            return module(tgt, src)
        return module(src, tgt)


@pytest.mark.parametrize("case", list(LAYOUT_CASES))
def test_parameter_layout_and_state_dict_are_torchs(case):
    """Same parameter names, shapes and order as torch.nn; the state dicts have the same
    keys and load into each other strictly, with equal results."""
    torch.manual_seed(0)
    theirs = perturb_(LAYOUT_CASES[case](nn))
    ours = LAYOUT_CASES[case](compat)
    assert [(n, p.shape) for n, p in ours.named_parameters()] == \
        [(n, p.shape) for n, p in theirs.named_parameters()]
    assert list(ours.state_dict()) == list(theirs.state_dict())
    result = ours.load_state_dict(theirs.state_dict(), strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    close(eval_forward(ours, case), eval_forward(theirs, case))

    back = perturb_(LAYOUT_CASES[case](nn), seed=99)
    back.load_state_dict(ours.state_dict(), strict=True)
    for name, tensor in theirs.state_dict().items():
        assert torch.equal(back.state_dict()[name], tensor), name


@pytest.mark.parametrize("case", list(LAYOUT_CASES))
def test_conversions_copy_weights_and_keep_dtype_and_mode(case):
    """from_torch/to_torch: the other class, the same state dict (keys in torch.nn's
    order, equal tensors, no storage shared), float64 kept, train/eval mode kept."""
    torch.manual_seed(0)
    for training in (True, False):
        theirs = perturb_(LAYOUT_CASES[case](nn)).double().train(training)
        ours = compat.from_torch(theirs)
        back = compat.to_torch(ours)
        assert isinstance(ours, type(LAYOUT_CASES[case](compat)))
        assert type(back) is type(theirs)
        for module in (ours, back):
            check_same_params(module, theirs)
            state = module.state_dict()
            assert list(state) == list(theirs.state_dict())
            for name, tensor in theirs.state_dict().items():
                assert torch.equal(state[name], tensor), name
            assert all(p.dtype == torch.float64 for p in module.parameters())
            assert all(m.training == training for m in module.modules())
        # Copies: training ours leaves the source and the converted-back module alone.
        snapshot = copy.deepcopy(theirs.state_dict())
        with torch.no_grad():
            for p in ours.parameters():
                p.add_(1.0)
        for module in (theirs, back):
            for name, tensor in module.state_dict().items():
                assert torch.equal(tensor, snapshot[name]), name


def describe(module: nn.Module) -> dict:
    """The configuration, read off torch.nn's attributes, that a conversion must carry."""
    if isinstance(module, nn.Transformer):
        return dict(encoder=describe(module.encoder), decoder=describe(module.decoder),
                    d_model=module.d_model, nhead=module.nhead, batch_first=module.batch_first)
    if isinstance(module, nn.TransformerEncoder | nn.TransformerDecoder):
        return dict(layers=[describe(layer) for layer in module.layers],
                    norm=None if module.norm is None else
                    (module.norm.normalized_shape, module.norm.eps),
                    num_layers=module.num_layers)
    if isinstance(module, nn.TransformerEncoderLayer | nn.TransformerDecoderLayer):
        cross = getattr(module, "multihead_attn", None)
        return dict(attention=describe(module.self_attn),
                    cross=None if cross is None else describe(cross),
                    d_ff=module.linear1.out_features, dropout=module.dropout.p,
                    activation=module.activation, eps=module.norm1.eps,
                    norm_first=module.norm_first)
    return dict(embed_dim=module.embed_dim, num_heads=module.num_heads, kdim=module.kdim,
                vdim=module.vdim, dropout=module.dropout, batch_first=module.batch_first,
                bias_kv=module.bias_k is not None, zero_attn=module.add_zero_attn)


ROUND_TRIP_CASES = {
    "decoder-layer": lambda: nn.TransformerDecoderLayer(E, 2, FF, 0.2, layer_norm_eps=1e-6),
    "decoder-layer-callable-pre-norm-batch-first": lambda: nn.TransformerDecoderLayer(
        E, 4, FF, activation=scaled_silu, norm_first=True, batch_first=True),
    "decoder-layer-gelu-no-bias": lambda: nn.TransformerDecoderLayer(E, 2, FF,
                                                                     activation="gelu",
                                                                     bias=False),
    "decoder": lambda: nn.TransformerDecoder(nn.TransformerDecoderLayer(E, 2, FF), 3),
    "decoder-norm-batch-first": lambda: nn.TransformerDecoder(
        nn.TransformerDecoderLayer(E, 2, FF, batch_first=True), 2, nn.LayerNorm(E, eps=1e-6)),
    "transformer": lambda: nn.Transformer(E, 2, 2, 1, FF, 0.3, layer_norm_eps=1e-6),
    "transformer-gelu-pre-norm-batch-first-no-bias": lambda: nn.Transformer(
        E, 4, 1, 2, FF, activation="gelu", batch_first=True, norm_first=True, bias=False),
    "mha-bias-kv-zero-attn": lambda: nn.MultiheadAttention(E, 4, 0.1, add_bias_kv=True,
                                                           add_zero_attn=True),
}


@pytest.mark.parametrize("case", list(ROUND_TRIP_CASES))
def test_to_torch_from_torch_round_trips_configuration(case):
    torch.manual_seed(0)
    theirs = perturb_(ROUND_TRIP_CASES[case]())
    back = compat.to_torch(compat.from_torch(theirs))
    assert type(back) is type(theirs)
    assert describe(back) == describe(theirs)
    for name, tensor in theirs.state_dict().items():
        assert torch.equal(back.state_dict()[name], tensor), name


def test_transformer_attributes_and_mask_helper():
    torch.manual_seed(0)
    ours = compat.Transformer(E, 4, 1, 2, FF, batch_first=True)
    assert (ours.d_model, ours.nhead, ours.batch_first) == (E, 4, True)
    assert isinstance(ours.encoder, compat.TransformerEncoder)
    assert isinstance(ours.decoder, compat.TransformerDecoder)
    assert len(ours.encoder.layers) == 1 and len(ours.decoder.layers) == 2
    assert isinstance(ours.encoder.norm, nn.LayerNorm)
    assert isinstance(ours.decoder.norm, nn.LayerNorm)
    for args in [(5,), (4, "cpu", torch.float64), (3, None, torch.bool)]:
        mask = compat.Transformer.generate_square_subsequent_mask(*args)
        expected = nn.Transformer.generate_square_subsequent_mask(*args)
        assert mask.dtype == expected.dtype and torch.equal(mask, expected)
    assert torch.equal(ours.generate_square_subsequent_mask(6), causal(6))  # also bound

    encoder = compat.TransformerEncoder(compat.TransformerEncoderLayer(E, 2, FF), 1)
    decoder = compat.TransformerDecoder(compat.TransformerDecoderLayer(E, 2, FF), 1)
    custom = compat.Transformer(E, 2, custom_encoder=encoder, custom_decoder=decoder)
    assert custom.encoder is encoder and custom.decoder is decoder


@pytest.mark.parametrize("cls", ["TransformerDecoderLayer", "TransformerDecoder",
                                 "Transformer"])
def test_signatures_and_defaults_match_torch(cls):
    """torch.nn's parameter names, order and defaults, in the constructor and in forward;
    the decoders' forward adds a keyword-only ``cache=None`` at the end."""
    ours, theirs = getattr(compat, cls), getattr(nn, cls)

    def params(function):
        return [(p.name, p.kind, p.default)
                for p in inspect.signature(function).parameters.values()]

    assert params(ours.__init__) == params(theirs.__init__)
    expected = params(theirs.forward)
    if cls != "Transformer":
        expected.append(("cache", inspect.Parameter.KEYWORD_ONLY, None))
    assert params(ours.forward) == expected


def test_decoder_constructor_defaults_are_torchs():
    layer = compat.TransformerDecoderLayer(E, 2)
    assert layer.linear1.out_features == 2048 and layer.dropout.p == 0.1
    assert layer.activation is F.relu and not layer.norm_first
    assert not layer.self_attn.batch_first and not layer.multihead_attn.batch_first
    assert layer.norm1.eps == layer.norm3.eps == 1e-5 and layer.norm3.bias is not None
    decoder = compat.TransformerDecoder(layer, 2)
    assert decoder.norm is None and decoder.num_layers == 2
    assert decoder.layers[0] is not layer and decoder.layers[0] is not decoder.layers[1]
    model = compat.Transformer()
    assert (model.d_model, model.nhead, model.batch_first) == (512, 8, False)
    assert len(model.encoder.layers) == len(model.decoder.layers) == 6


# ------------------------------------------------------------------- optimizer state


def make_transformer_for_training(ns):
    return ns.Transformer(E, 2, 1, 2, FF, dropout=0.0, batch_first=True, norm_first=True)


OPTIMIZER_CASES = {
    "transformer": make_transformer_for_training,
    "transformer-seq-first-gelu": lambda ns: ns.Transformer(E, 4, 2, 1, FF, dropout=0.0,
                                                           activation="gelu"),
    "mha": lambda ns: ns.MultiheadAttention(E, 4),
    "mha-kdim-vdim-bias-kv": lambda ns: ns.MultiheadAttention(E, 2, kdim=12, vdim=10,
                                                              add_bias_kv=True),
}

# eps=1e-2, not the default 1e-8: the key part of in_proj_bias has an exactly zero gradient
# in exact arithmetic (adding a constant to every key's score of a query leaves the softmax
# alone), so in float32 it is rounding noise, ~1e-7, which differs between two correct
# implementations; Adam divides by sqrt(v) + eps, and with eps=1e-8 it turns that noise into
# steps of size lr (measured: 2e-2 apart after 3 steps). eps=1e-2 keeps those steps below
# 1e-7 and the real ones (gradients ~0.1 to 1) near lr.
OPTIMIZERS = {
    "adam": lambda params: torch.optim.Adam(params, lr=1e-2, eps=1e-2),
    "adamw": lambda params: torch.optim.AdamW(params, lr=1e-2, eps=1e-2, weight_decay=0.1),
    # torch's defaults otherwise: momentum buffers are state too, and nothing amplifies noise
    "sgd-momentum": lambda params: torch.optim.SGD(params, lr=1e-2, momentum=0.9),
}


def training_batches(case: str, count: int) -> list[tuple]:
    g = torch.Generator().manual_seed(5)
    batches = []
    for _ in range(count):
        if case.startswith("mha"):
            kdim, vdim = (12, 10) if "kdim" in case else (E, E)
            q = torch.randn(T, N, E, generator=g)
            k, v = torch.randn(S, N, kdim, generator=g), torch.randn(S, N, vdim, generator=g)
            batches.append((q, k, v, padding(SRC_LENGTHS, S)))
        else:
            batch_first = "seq-first" not in case
            src = layout(torch.randn(N, S, E, generator=g), batch_first)
            tgt = layout(torch.randn(N, T, E, generator=g), batch_first)
            batches.append((src, tgt, padding(SRC_LENGTHS, S), padding(TGT_LENGTHS, T)))
    return batches


def train_step(model: nn.Module, optimizer, batch: tuple, case: str) -> Tensor:
    optimizer.zero_grad()
    if case.startswith("mha"):
        q, k, v, pad = batch
        out, weights = model(q, k, v, key_padding_mask=pad)
        loss = (out * cotangent(out)).sum() + (weights * cotangent(weights)).sum()
    else:
        src, tgt, src_pad, tgt_pad = batch
        out = model(src, tgt, tgt_mask=causal(T), src_key_padding_mask=src_pad,
                    tgt_key_padding_mask=tgt_pad, memory_key_padding_mask=src_pad)
        loss = (out * cotangent(out)).sum()
    loss.backward()
    optimizer.step()
    return loss.detach()


@pytest.mark.parametrize("optimizer", list(OPTIMIZERS))
@pytest.mark.parametrize("case", list(OPTIMIZER_CASES))
def test_torch_optimizer_state_continues_training_in_compat(case, optimizer):
    """k=3 steps on torch.nn; its model and optimizer state dicts are saved; 3 more steps on
    a fresh torch.nn model and on ours, both loaded from them, give the same parameters."""
    make, make_optimizer = OPTIMIZER_CASES[case], OPTIMIZERS[optimizer]
    batches = training_batches(case, 6)
    torch.manual_seed(0)
    first = make(nn)
    first_optimizer = make_optimizer(first.parameters())
    for batch in batches[:3]:
        train_step(first, first_optimizer, batch, case)
    saved = io.BytesIO()
    torch.save({"model": first.state_dict(), "optimizer": first_optimizer.state_dict()}, saved)

    def resume(ns) -> tuple[nn.Module, Tensor]:
        torch.manual_seed(1)  # a different initialisation, overwritten by the checkpoint
        model = make(ns)
        saved.seek(0)
        checkpoint = torch.load(saved, weights_only=True)
        model.load_state_dict(checkpoint["model"], strict=True)
        opt = make_optimizer(model.parameters())
        opt.load_state_dict(checkpoint["optimizer"])
        losses = torch.stack([train_step(model, opt, batch, case) for batch in batches[3:]])
        return model, losses

    theirs, expected_losses = resume(nn)
    ours, losses = resume(compat)
    assert isinstance(ours, compat.Transformer if case.startswith("transformer")
                      else compat.MultiheadAttention)
    close(losses, expected_losses)
    params = dict(ours.named_parameters())
    expected = dict(theirs.named_parameters())
    assert list(params) == list(expected)
    close({k: v.detach() for k, v in params.items()},
          {k: v.detach() for k, v in expected.items()})
    # The optimizer state mattered: with fresh moments torch.nn ends elsewhere.
    fresh = make(nn)
    saved.seek(0)
    fresh.load_state_dict(torch.load(saved, weights_only=True)["model"])
    fresh_optimizer = make_optimizer(fresh.parameters())
    for batch in batches[3:]:
        train_step(fresh, fresh_optimizer, batch, case)
    assert any((p - q).abs().max() > 1e-4
               for p, q in zip(fresh.parameters(), theirs.parameters(), strict=True))


# ----------------------------------------------------------------- incremental decoding


STEPS = {"one-by-one": (1,) * 6, "1-2-3": (1, 2, 3), "all-at-once": (6,), "2-4": (2, 4)}


def cache_pair(cls: str, batch_first: bool, norm_first: bool):
    """(torch.nn module, ours) in eval mode; dropout 0.1 so that eval has to matter.

    ``cls``: ``layer``, ``decoder`` (two layers) or ``decoder-final-norm`` (and a LayerNorm).
    """
    torch.manual_seed(0)
    layer = nn.TransformerDecoderLayer(E, 2, FF, 0.1, batch_first=batch_first,
                                       norm_first=norm_first)
    if cls == "layer":
        theirs = layer
    else:
        norm = nn.LayerNorm(E) if cls == "decoder-final-norm" else None
        theirs = nn.TransformerDecoder(layer, 2, norm)
    theirs = perturb_(theirs).eval()
    ours = compat.from_torch(theirs).eval()
    return theirs, ours


def decode(ours: nn.Module, tgt: Tensor, memory: Tensor, steps: tuple[int, ...],
           batch_first: bool, tgt_key_padding_mask: Tensor | None = None,
           **kwargs) -> list[tuple[int, int, Tensor]]:
    """Feed ``tgt`` in chunks of ``steps`` positions to ``ours`` with one cache; the padding
    mask given each time covers every position so far. Returns (start, stop, output)."""
    cache = ours.new_cache()
    seq = 1 if batch_first else 0
    outputs, start = [], 0
    for step in steps:
        stop = start + step
        chunk = tgt.narrow(seq, start, step)
        if tgt_key_padding_mask is not None:
            kwargs["tgt_key_padding_mask"] = tgt_key_padding_mask[:, :stop]
        out = ours(chunk, memory, cache=cache, **kwargs)
        assert out.shape == chunk.shape
        outputs.append((start, stop, out))
        start = stop
    assert start == tgt.size(seq)
    return outputs


def check_decoding(outputs, full: Tensor, batch_first: bool) -> None:
    seq = 1 if batch_first else 0
    for start, stop, out in outputs:
        close(out, full.narrow(seq, start, stop - start), f"positions {start}:{stop}")


def decoding_inputs(batch_first: bool, length: int = 6) -> tuple[Tensor, Tensor, Tensor]:
    g = torch.Generator().manual_seed(11)
    tgt = layout(torch.randn(N, length, E, generator=g), batch_first)
    memory = layout(torch.randn(N, S, E, generator=g), batch_first)
    return tgt, memory, padding(SRC_LENGTHS, S)


CACHED = ["layer", "decoder", "decoder-final-norm"]


@pytest.mark.parametrize("steps", list(STEPS))
@pytest.mark.parametrize("norm_first", [False, True], ids=["post-norm", "pre-norm"])
@pytest.mark.parametrize("batch_first", [False, True], ids=["seq-first", "batch-first"])
@pytest.mark.parametrize("cls", CACHED)
def test_cached_decoding_matches_full_causal_pass(cls, batch_first, norm_first, steps):
    """Each call's output equals torch.nn's full pass with the causal tgt_mask at those
    positions, a memory_key_padding_mask given throughout."""
    theirs, ours = cache_pair(cls, batch_first, norm_first)
    tgt, memory, memory_pad = decoding_inputs(batch_first)
    with torch.no_grad():
        full = theirs(tgt, memory, tgt_mask=causal(6), memory_key_padding_mask=memory_pad)
        outputs = decode(ours, tgt, memory, STEPS[steps], batch_first,
                         memory_key_padding_mask=memory_pad)
    check_decoding(outputs, full, batch_first)


@pytest.mark.parametrize("steps", ["one-by-one", "1-2-3"])
@pytest.mark.parametrize("norm_first", [False, True], ids=["post-norm", "pre-norm"])
@pytest.mark.parametrize("batch_first", [False, True], ids=["seq-first", "batch-first"])
@pytest.mark.parametrize("cls", CACHED)
def test_cached_decoding_with_tgt_key_padding(cls, batch_first, norm_first, steps):
    """A tgt_key_padding_mask given with a cache is (N, positions so far): cached and new.
    Rows are padded at their end; the oracle is torch.nn's full pass with the whole
    padding mask and the causal mask (padded queries still see the real keys before)."""
    theirs, ours = cache_pair(cls, batch_first, norm_first)
    tgt, memory, memory_pad = decoding_inputs(batch_first)
    tgt_pad = padding([6, 4, 1], 6)
    with torch.no_grad():
        full = theirs(tgt, memory, tgt_mask=bool_causal(6), tgt_key_padding_mask=tgt_pad,
                      memory_key_padding_mask=memory_pad)
        outputs = decode(ours, tgt, memory, STEPS[steps], batch_first, tgt_pad,
                         memory_key_padding_mask=memory_pad)
    check_decoding(outputs, full, batch_first)
    # The padding mattered: without it the last position of row 1 (length 4) differs.
    with torch.no_grad():
        unpadded = theirs(tgt, memory, tgt_mask=bool_causal(6),
                          memory_key_padding_mask=memory_pad)
    last = (lambda x: x[1, 5]) if batch_first else (lambda x: x[5, 1])
    assert (last(unpadded) - last(full)).abs().max() > 1e-3


def test_caches_are_independent():
    """Two sequences decoded in turns, each with its own cache, as if decoded alone."""
    theirs, ours = cache_pair("decoder-final-norm", True, True)
    tgt_a, memory_a, pad_a = decoding_inputs(True)
    g = torch.Generator().manual_seed(12)
    tgt_b, memory_b = torch.randn(2, 4, E, generator=g), torch.randn(2, 3, E, generator=g)
    with torch.no_grad():
        full_a = theirs(tgt_a, memory_a, tgt_mask=causal(6), memory_key_padding_mask=pad_a)
        full_b = theirs(tgt_b, memory_b, tgt_mask=causal(4))
        cache_a, cache_b = ours.new_cache(), ours.new_cache()
        for i in range(6):
            out = ours(tgt_a[:, i:i + 1], memory_a, memory_key_padding_mask=pad_a,
                       cache=cache_a)
            close(out, full_a[:, i:i + 1], f"a, position {i}")
            if i < 4:
                out = ours(tgt_b[:, i:i + 1], memory_b, cache=cache_b)
                close(out, full_b[:, i:i + 1], f"b, position {i}")


@pytest.mark.parametrize("batch_first", [False, True], ids=["seq-first", "batch-first"])
def test_transformer_decoder_cache_after_encoding(batch_first):
    """The usual generation loop: encode once with ours.encoder, decode token by token with
    ours.decoder and a cache; equals torch.nn.Transformer's full causal pass."""
    torch.manual_seed(0)
    theirs = perturb_(nn.Transformer(E, 2, 1, 2, FF, batch_first=batch_first)).eval()
    ours = compat.from_torch(theirs).eval()
    tgt, src, src_pad = decoding_inputs(batch_first)
    seq = 1 if batch_first else 0
    with torch.no_grad():
        full = theirs(src, tgt, tgt_mask=causal(6), src_key_padding_mask=src_pad,
                      memory_key_padding_mask=src_pad)
        memory = ours.encoder(src, src_key_padding_mask=src_pad)
        cache = ours.decoder.new_cache()
        for i in range(6):
            out = ours.decoder(tgt.narrow(seq, i, 1), memory, memory_key_padding_mask=src_pad,
                               cache=cache)
            close(out, full.narrow(seq, i, 1), f"position {i}")


# ------------------------------------------------- MultiheadAttention: bias_kv, zero_attn


MHA_FLAGS = {"bias-kv": dict(add_bias_kv=True), "zero-attn": dict(add_zero_attn=True),
             "both": dict(add_bias_kv=True, add_zero_attn=True)}


def mha_masks(kind: str, heads: int, batched: bool = True) -> dict:
    g = torch.Generator().manual_seed(9)
    pad = padding(SRC_LENGTHS, S)
    if kind == "bool":
        attn_mask = torch.rand(T, S, generator=g) < 0.4
        attn_mask[:, 0] = False
        masks = dict(key_padding_mask=pad, attn_mask=attn_mask)
    elif kind == "float":
        masks = dict(key_padding_mask=float_padding(pad, g),
                     attn_mask=torch.randn(T, S, generator=g))
    elif kind == "mixed-3d":
        masks = dict(key_padding_mask=pad, attn_mask=torch.randn(N * heads, T, S, generator=g))
    else:
        assert kind == "none"
        masks = {}
    if not batched:  # row 1, which has padding
        masks = {k: v[1] if k == "key_padding_mask" else v for k, v in masks.items()}
        if kind == "mixed-3d":
            masks["attn_mask"] = masks["attn_mask"][:heads]
    return masks


def mha_inputs(batch_first: bool, kdim: int, vdim: int, batched: bool = True) -> list[Tensor]:
    g = torch.Generator().manual_seed(4)
    inputs = [torch.randn(N, T, E, generator=g), torch.randn(N, S, kdim, generator=g),
              torch.randn(N, S, vdim, generator=g)]
    if not batched:
        inputs = [x[1] for x in inputs]
    return [layout(x, batch_first) for x in inputs]


@pytest.mark.parametrize("kv_dims", [None, (12, 10)], ids=["packed", "kdim-vdim"])
@pytest.mark.parametrize("batch_first", [False, True], ids=["seq-first", "batch-first"])
@pytest.mark.parametrize("direction", ["from_torch", "to_torch"])
@pytest.mark.parametrize("flags", list(MHA_FLAGS))
def test_multihead_bias_kv_and_zero_attn_match_torch(flags, direction, batch_first, kv_dims):
    """Outputs, attention weights (averaged or per head; S + 1 or S + 2 keys) and gradients,
    with key_padding_mask and attn_mask (torch.nn pads both by a column for each flag)."""
    heads = 4
    kdim, vdim = kv_dims or (E, E)

    def make(ns):
        return ns.MultiheadAttention(E, heads, kdim=kdim, vdim=vdim, batch_first=batch_first,
                                     **MHA_FLAGS[flags])

    theirs, ours = build_pair(direction, make)
    extra = sum(MHA_FLAGS[flags].values())  # one more key for each flag
    for batched in (True, False):
        inputs = mha_inputs(batch_first, kdim, vdim, batched)
        for kind in ("none", "bool", "float", "mixed-3d"):
            masks = mha_masks(kind, heads, batched)
            for options in (dict(), dict(average_attn_weights=False),
                            dict(need_weights=False)):
                what = f"batched={batched}, mask {kind}, {options}"
                expected = run(theirs, inputs, **masks, **options)
                actual = run(ours, inputs, **masks, **options)
                if expected[1] is not None:
                    assert expected[1].shape[-1] == S + extra
                assert_same_run(actual, expected, what)


def test_multihead_bias_kv_is_used():
    """bias_k and bias_v change the output (so the comparisons above can catch them dropped)."""
    torch.manual_seed(0)
    ours = perturb_(compat.MultiheadAttention(E, 2, add_bias_kv=True))
    q, k, v = mha_inputs(False, E, E)
    before = ours(q, k, v)[0]
    with torch.no_grad():
        ours.bias_k.add_(1.0)
        ours.bias_v.add_(1.0)
    assert not torch.allclose(ours(q, k, v)[0], before)
    assert ours.bias_k.shape == ours.bias_v.shape == (1, 1, E)


# ------------------------------------------------------------------------------ errors


def _x(*shape: int) -> Tensor:
    return torch.randn(*shape)


def _seq(batch_first: bool, length: int, dim: int = E, batch: int = N) -> Tensor:
    return _x(batch, length, dim) if batch_first else _x(length, batch, dim)


INT_PAD = torch.zeros(N, S, dtype=torch.long)
INT_TGT_PAD = torch.zeros(N, T, dtype=torch.long)

# (module factory, call, torch.nn's exception) — the exception verified against torch.nn
ERROR_CASES = {
    "mha-query-embed-dim": (
        lambda ns, bf: ns.MultiheadAttention(E, 2, batch_first=bf),
        lambda m, bf: m(_seq(bf, T, E + 1), _seq(bf, S), _seq(bf, S)), AssertionError),
    "mha-4d-query": (
        lambda ns, bf: ns.MultiheadAttention(E, 2, batch_first=bf),
        lambda m, bf: m(_x(2, T, N, E), _seq(bf, S), _seq(bf, S)), AssertionError),
    "mha-int64-key-padding-mask": (
        lambda ns, bf: ns.MultiheadAttention(E, 2, batch_first=bf),
        lambda m, bf: m(_seq(bf, T), _seq(bf, S), _seq(bf, S), key_padding_mask=INT_PAD),
        AssertionError),
    "mha-int64-attn-mask": (
        lambda ns, bf: ns.MultiheadAttention(E, 2, batch_first=bf),
        lambda m, bf: m(_seq(bf, T), _seq(bf, S), _seq(bf, S),
                        attn_mask=torch.zeros(T, S, dtype=torch.long)), AssertionError),
    "encoder-layer-embed-dim": (
        lambda ns, bf: ns.TransformerEncoderLayer(E, 2, FF, batch_first=bf),
        lambda m, bf: m(_seq(bf, S, E + 1)), AssertionError),
    "encoder-int64-key-padding-mask": (
        lambda ns, bf: ns.TransformerEncoder(ns.TransformerEncoderLayer(E, 2, FF,
                                                                        batch_first=bf), 2),
        lambda m, bf: m(_seq(bf, S), src_key_padding_mask=INT_PAD), AssertionError),
    "decoder-layer-tgt-embed-dim": (
        lambda ns, bf: ns.TransformerDecoderLayer(E, 2, FF, batch_first=bf),
        lambda m, bf: m(_seq(bf, T, E + 1), _seq(bf, S)), AssertionError),
    "decoder-layer-4d-tgt": (
        lambda ns, bf: ns.TransformerDecoderLayer(E, 2, FF, batch_first=bf),
        lambda m, bf: m(_x(2, T, N, E), _seq(bf, S)), AssertionError),
    "decoder-layer-4d-memory": (
        lambda ns, bf: ns.TransformerDecoderLayer(E, 2, FF, batch_first=bf),
        lambda m, bf: m(_seq(bf, T), _x(2, S, N, E)), AssertionError),
    "decoder-layer-int64-tgt-key-padding-mask": (
        lambda ns, bf: ns.TransformerDecoderLayer(E, 2, FF, batch_first=bf),
        lambda m, bf: m(_seq(bf, T), _seq(bf, S), tgt_key_padding_mask=INT_TGT_PAD),
        AssertionError),
    "decoder-int64-memory-key-padding-mask": (
        lambda ns, bf: ns.TransformerDecoder(ns.TransformerDecoderLayer(E, 2, FF,
                                                                        batch_first=bf), 2),
        lambda m, bf: m(_seq(bf, T), _seq(bf, S), memory_key_padding_mask=INT_PAD),
        AssertionError),
    "decoder-tgt-embed-dim": (
        lambda ns, bf: ns.TransformerDecoder(ns.TransformerDecoderLayer(E, 2, FF,
                                                                        batch_first=bf), 2),
        lambda m, bf: m(_seq(bf, T, E + 1), _seq(bf, S)), AssertionError),
    "transformer-batch-mismatch": (
        lambda ns, bf: ns.Transformer(E, 2, 1, 1, FF, batch_first=bf),
        lambda m, bf: m(_seq(bf, S), _seq(bf, T, batch=N + 1)), RuntimeError),
    "transformer-src-feature-mismatch": (
        lambda ns, bf: ns.Transformer(E, 2, 1, 1, FF, batch_first=bf),
        lambda m, bf: m(_seq(bf, S, E + 1), _seq(bf, T)), RuntimeError),
    "transformer-tgt-feature-mismatch": (
        lambda ns, bf: ns.Transformer(E, 2, 1, 1, FF, batch_first=bf),
        lambda m, bf: m(_seq(bf, S), _seq(bf, T, E + 1)), RuntimeError),
    "transformer-4d-src": (
        lambda ns, bf: ns.Transformer(E, 2, 1, 1, FF, batch_first=bf),
        lambda m, bf: m(_x(2, S, N, E), _x(2, T, N, E)), AssertionError),
    "transformer-int64-src-key-padding-mask": (
        lambda ns, bf: ns.Transformer(E, 2, 1, 1, FF, batch_first=bf),
        lambda m, bf: m(_seq(bf, S), _seq(bf, T), src_key_padding_mask=INT_PAD),
        AssertionError),
    "transformer-int64-tgt-key-padding-mask": (
        lambda ns, bf: ns.Transformer(E, 2, 1, 1, FF, batch_first=bf),
        lambda m, bf: m(_seq(bf, S), _seq(bf, T), tgt_key_padding_mask=INT_TGT_PAD),
        AssertionError),
}


@pytest.mark.parametrize("batch_first", [False, True], ids=["seq-first", "batch-first"])
@pytest.mark.parametrize("case", list(ERROR_CASES))
def test_bad_input_raises_torchs_exception_class(case, batch_first):
    """In training mode, where torch.nn's checks are the asserts of its Python path: ours
    raises an instance of torch.nn's class and, where that is AssertionError, also a
    ValueError or TypeError."""
    make, call, expected = ERROR_CASES[case]
    torch.manual_seed(0)
    with pytest.raises(expected):  # the class is torch.nn's
        call(make(nn, batch_first), batch_first)
    with pytest.raises(expected) as info:
        call(make(compat, batch_first), batch_first)
    if expected is AssertionError:
        assert isinstance(info.value, ValueError | TypeError), repr(info.value)


@pytest.mark.parametrize("cls", ["TransformerEncoderLayer", "TransformerDecoderLayer",
                                 "MultiheadAttention"])
def test_bad_input_raises_the_same_class_in_eval(cls):
    """torch.nn is not consistent here: in eval under no_grad, batch first, its fused
    self-attention fast path raises RuntimeError for a wrong embedding size where training
    raises AssertionError. Ours raises the same class in both modes: AssertionError (and
    ValueError/TypeError) in both."""
    torch.manual_seed(0)
    ours = getattr(compat, cls)(E, 2, batch_first=True).eval()
    x = _seq(True, T, E + 1)
    args = {"TransformerEncoderLayer": (x,), "TransformerDecoderLayer": (x, _seq(True, S)),
            "MultiheadAttention": (x, x, x)}[cls]
    with torch.no_grad(), pytest.raises(AssertionError) as info:
        ours(*args)
    assert isinstance(info.value, ValueError | TypeError), repr(info.value)
