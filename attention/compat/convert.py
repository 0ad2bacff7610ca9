"""``from_torch`` and ``to_torch``: trained modules converted both ways, weights copied.

The compat classes hold torch.nn's parameters under torch.nn's names, so converting one is
building its twin with the same arguments and loading the state dict as it is. The batch-first
core classes (``MultiHeadAttention``, ``EncoderLayer``, ``Encoder``) keep separate
``q_proj``/``k_proj``/``v_proj`` and a ``feed_forward``; ``to_torch`` packs and renames them.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..layers import EncoderLayer
from ..models import Encoder
from ..multihead import MultiHeadAttention
from .decoder import TransformerDecoder, TransformerDecoderLayer
from .encoder import TransformerEncoder, TransformerEncoderLayer
from .multihead import MultiheadAttention
from .transformer import Transformer

__all__ = ["from_torch", "to_torch"]

_PROJECTIONS = ("q_proj", "k_proj", "v_proj")


def _factory(weight: Tensor) -> dict[str, Any]:
    return {"device": weight.device, "dtype": weight.dtype}


def _activation_for_torch(activation: Callable[[Tensor], Tensor]) -> str | Callable:
    """torch.nn takes "relu" and "gelu" by name (its fast path needs to know them)."""
    return {F.relu: "relu", F.gelu: "gelu"}.get(activation, activation)


def _attention_args(module: nn.Module) -> dict[str, Any]:
    """The constructor arguments of a (torch.nn or compat) ``MultiheadAttention``."""
    return {
        "embed_dim": module.embed_dim, "num_heads": module.num_heads,
        "dropout": module.dropout, "bias": module.in_proj_bias is not None,
        "add_bias_kv": module.bias_k is not None, "add_zero_attn": module.add_zero_attn,
        "kdim": module.kdim, "vdim": module.vdim, "batch_first": module.batch_first,
        **_factory(module.out_proj.weight),
    }


def _layer_args(module: nn.Module) -> dict[str, Any]:
    """The constructor arguments of a (torch.nn or compat) encoder or decoder layer; the
    parts themselves are copied afterwards, so that whatever was changed in one survives."""
    attention = module.self_attn
    return {
        "d_model": attention.embed_dim, "nhead": attention.num_heads,
        "dropout": attention.dropout, "activation": module.activation,
        "batch_first": attention.batch_first, "norm_first": module.norm_first,
        **_factory(attention.out_proj.weight),
    }


def _finish(source: nn.Module, twin: nn.Module) -> nn.Module:
    """``twin`` with ``source``'s train/eval mode and each parameter's ``requires_grad``."""
    requires_grad = {name: p.requires_grad for name, p in source.named_parameters()}
    for name, parameter in twin.named_parameters():
        parameter.requires_grad_(requires_grad.get(name, parameter.requires_grad))
    return twin.train(source.training)


def _copy(source: nn.Module, target: nn.Module) -> nn.Module:
    """``target`` with ``source``'s weights (same state-dict keys), mode and requires_grad."""
    target.load_state_dict(source.state_dict())
    return _finish(source, target)


# The six classes and their twins: (torch.nn, compat).
_ATTENTION = (nn.MultiheadAttention, MultiheadAttention)
_ENCODER_LAYER = (nn.TransformerEncoderLayer, TransformerEncoderLayer)
_DECODER_LAYER = (nn.TransformerDecoderLayer, TransformerDecoderLayer)
_ENCODER = (nn.TransformerEncoder, TransformerEncoder)
_DECODER = (nn.TransformerDecoder, TransformerDecoder)
_TRANSFORMER = (nn.Transformer, Transformer)
_PAIRS = (_ATTENTION, _ENCODER_LAYER, _DECODER_LAYER, _ENCODER, _DECODER, _TRANSFORMER)


def _convert(module: nn.Module, side: int) -> nn.Module:
    """``module``, exactly of a class ``pair[1 - side]``, rebuilt as its twin ``pair[side]``.
    (A subclass is refused: its own forward would be lost.)"""
    if type(module) is _ATTENTION[1 - side]:
        return _copy(module, _ATTENTION[side](**_attention_args(module)))
    for classes in (_ENCODER_LAYER, _DECODER_LAYER):
        if type(module) is classes[1 - side]:
            args = _layer_args(module)
            if side == 0:
                args["activation"] = _activation_for_torch(args["activation"])
            twin = classes[side](**args)
            # Every part copied as it is (a norm's eps, a linear without bias, a dropout's
            # p, an activation module); the attention converted with its own flags.
            for name, child in module.named_children():
                setattr(twin, name, _convert_part(child, side))
            return _finish(module, twin)
    if type(module) is _ENCODER[1 - side]:
        layers = [_convert_part(layer, side) for layer in module.layers]
        twin = _ENCODER[side](layers[0], len(layers), copy.deepcopy(module.norm),
                              enable_nested_tensor=module.enable_nested_tensor
                              and not (side == 0 and layers[0].norm_first),
                              mask_check=module.mask_check)
        twin.layers = nn.ModuleList(layers)
        return _finish(module, twin)
    if type(module) is _DECODER[1 - side]:
        layers = [_convert_part(layer, side) for layer in module.layers]
        twin = _DECODER[side](layers[0], len(layers), copy.deepcopy(module.norm))
        twin.layers = nn.ModuleList(layers)
        return _finish(module, twin)
    if type(module) is _TRANSFORMER[1 - side]:
        encoder, decoder = _convert_part(module.encoder, side), _convert_part(module.decoder, side)
        twin = _TRANSFORMER[side](module.d_model, module.nhead, custom_encoder=encoder,
                                  custom_decoder=decoder, batch_first=module.batch_first)
        return _copy(module, twin)  # the constructor re-initialised the custom parts
    raise TypeError(f"module: expected one of {[c.__name__ for c in _classes(1 - side)]} "
                    f"({'attention.compat' if side == 0 else 'torch.nn'}), exactly, got "
                    f"{type(module).__module__}.{type(module).__name__}")


def _convert_part(module: nn.Module, side: int) -> nn.Module:
    """A part of a module being converted: converted if it is one of the six classes,
    otherwise (a LayerNorm, a user's own layer) deep-copied as it is."""
    if type(module) in _classes(1 - side):
        return _convert(module, side)
    return copy.deepcopy(module)


def _classes(side: int) -> list[type]:
    return [pair[side] for pair in _PAIRS]


def from_torch(module: nn.Module) -> nn.Module:
    """Convert a torch.nn attention module into its ``attention.compat`` twin.

    Accepts ``nn.MultiheadAttention``, ``nn.TransformerEncoderLayer``,
    ``nn.TransformerEncoder``, ``nn.TransformerDecoderLayer``, ``nn.TransformerDecoder`` and
    ``nn.Transformer``; keeps the layout (``batch_first``), the device and dtype, the
    train/eval mode and every weight (the state dict is copied as it is). Outputs, attention
    weights and gradients match torch.nn's.
    """
    return _convert(module, 1)


def to_torch(module: nn.Module) -> nn.Module:
    """Convert this package's attention modules into torch.nn ones with the same weights.

    Accepts the six ``attention.compat`` classes (their layout is kept) and the batch-first
    core classes (``MultiHeadAttention``, ``EncoderLayer``, and an ``Encoder`` built with
    ``positional=None``), which become ``batch_first=True`` torch.nn modules. The train/eval
    mode is kept.
    """
    if isinstance(module, tuple(_classes(1))):
        return _convert(module, 0)
    if isinstance(module, MultiHeadAttention):
        return _core_attention_to_torch(module).train(module.training)
    if isinstance(module, EncoderLayer):
        return _core_layer_to_torch(module).train(module.training)
    if isinstance(module, Encoder):
        return _core_encoder_to_torch(module).train(module.training)
    raise TypeError("module: expected an attention.compat module or a MultiHeadAttention, "
                    f"EncoderLayer or Encoder, got {type(module).__name__}")


# ----------------------------------------------------------- the batch-first core classes


def _reject_rotary(module: MultiHeadAttention) -> None:
    """Refuse what torch.nn's attention cannot express: rotary positions and the variants."""
    if module.rotary is not None:
        raise ValueError("module: torch.nn has no rotary embeddings; to_torch needs attention "
                         "built without rotary (positional != 'rotary'), got rotary=True")
    variants = module.variants()
    if variants:
        name, value = next(iter(variants.items()))
        raise ValueError(f"{name}: torch.nn.MultiheadAttention has no {name}; to_torch needs "
                         f"plain multi-head attention, got {name}={value!r}")


def _reject_layer_variants(module: EncoderLayer) -> None:
    """Refuse RMSNorm and gated feed-forwards, which torch.nn's layer does not have."""
    if not isinstance(module.norm1, nn.LayerNorm):
        raise ValueError(f"norm: torch.nn.TransformerEncoderLayer has LayerNorm only; got "
                         f"{type(module.norm1).__name__}")
    if module.feed_forward.gated:
        raise ValueError("activation: torch.nn.TransformerEncoderLayer has no gated "
                         "feed-forward (swiglu, geglu); got a gated one")


def _pack_in_proj(state: dict[str, Tensor], prefix: str, same_dims: bool) -> None:
    """``q_proj``/``k_proj``/``v_proj`` → torch.nn's packed (or separate) layout, in place."""
    weights = [state.pop(f"{prefix}{name}.weight") for name in _PROJECTIONS]
    if same_dims:
        state[prefix + "in_proj_weight"] = torch.cat(weights, dim=0)
    else:
        for name, weight in zip(_PROJECTIONS, weights, strict=True):
            state[f"{prefix}{name}_weight"] = weight
    if f"{prefix}q_proj.bias" in state:
        biases = [state.pop(f"{prefix}{name}.bias") for name in _PROJECTIONS]
        state[prefix + "in_proj_bias"] = torch.cat(biases, dim=0)


def _core_attention_to_torch(module: MultiHeadAttention) -> nn.MultiheadAttention:
    _reject_rotary(module)
    theirs = nn.MultiheadAttention(
        module.d_model, module.n_heads, module.dropout, bias=module.q_proj.bias is not None,
        kdim=module.kdim, vdim=module.vdim, batch_first=True,
        **_factory(module.out_proj.weight),
    )
    state = module.state_dict()
    _pack_in_proj(state, "", module.kdim == module.vdim == module.d_model)
    theirs.load_state_dict(state)
    return theirs


def _core_layer_to_torch(module: EncoderLayer) -> nn.TransformerEncoderLayer:
    _reject_rotary(module.self_attn)
    _reject_layer_variants(module)
    feed_forward = module.feed_forward
    theirs = nn.TransformerEncoderLayer(
        module.d_model, module.self_attn.n_heads, feed_forward.d_ff, module.self_attn.dropout,
        _activation_for_torch(feed_forward.activation), module.norm1.eps, True,
        module.norm_first, feed_forward.linear1.bias is not None,
        **_factory(feed_forward.linear1.weight),
    )
    state = module.state_dict()
    _pack_in_proj(state, "self_attn.", True)
    for key in [k for k in state if k.startswith("feed_forward.")]:
        state[key.removeprefix("feed_forward.")] = state.pop(key)
    theirs.load_state_dict(state)
    return theirs


def _core_encoder_to_torch(module: Encoder) -> nn.TransformerEncoder:
    if module.positional is not None or module.layers[0].self_attn.rotary is not None:
        raise ValueError("module: torch.nn.TransformerEncoder has no positional encoding; "
                         "to_torch needs an Encoder built with positional=None")
    layers = [_core_layer_to_torch(layer) for layer in module.layers]
    theirs = nn.TransformerEncoder(layers[0], len(layers), copy.deepcopy(module.norm),
                                   enable_nested_tensor=not layers[0].norm_first)
    theirs.layers = nn.ModuleList(layers)
    return theirs
