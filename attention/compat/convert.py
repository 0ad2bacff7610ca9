"""``from_torch`` and ``to_torch``: trained modules converted both ways, weights copied.

The compat classes hold torch.nn's parameters under torch.nn's names, so converting one is
building its twin with the same arguments and loading the state dict as it is. The batch-first
core classes (``MultiHeadAttention``, ``EncoderLayer``, ``Encoder``) keep separate
``q_proj``/``k_proj``/``v_proj`` and a ``feed_forward``; ``to_torch`` packs and renames them.
"""

from __future__ import annotations

import copy

import torch
from torch import Tensor, nn

from ..layers import EncoderLayer
from ..models import Encoder
from ..multihead import MultiHeadAttention
from .decoder import TransformerDecoder, TransformerDecoderLayer
from .encoder import TransformerEncoder, TransformerEncoderLayer
from .multihead import MultiheadAttention
from .transformer import Transformer
from .twins import activation_for_torch, compat_class_of, factory_args

__all__ = ["from_torch", "to_torch"]

_PROJECTIONS = ("q_proj", "k_proj", "v_proj")
# The compat classes, imported above so that each is registered as its torch.nn twin's.
_COMPAT_CLASSES = (MultiheadAttention, TransformerEncoderLayer, TransformerDecoderLayer,
                   TransformerEncoder, TransformerDecoder, Transformer)


def from_torch(module: nn.Module) -> nn.Module:
    """Convert a torch.nn attention module into its ``attention.compat`` twin.

    Accepts ``nn.MultiheadAttention``, ``nn.TransformerEncoderLayer``,
    ``nn.TransformerEncoder``, ``nn.TransformerDecoderLayer``, ``nn.TransformerDecoder`` and
    ``nn.Transformer`` (exactly: a subclass's own forward would be lost); keeps the layout
    (``batch_first``), the device and dtype, the train/eval mode and every weight (the state
    dict is copied as it is). Outputs, attention weights and gradients match torch.nn's.
    Each compat class does its own conversion (``TransformerEncoder.from_torch``, …); this
    picks the class.
    """
    compat_class = compat_class_of(type(module))
    if compat_class is None:
        names = [compat.torch_class.__name__ for compat in _COMPAT_CLASSES]
        raise TypeError(f"module: expected one of {names} (torch.nn), exactly, got "
                        f"{type(module).__module__}.{type(module).__name__}")
    return compat_class.from_torch(module)


def to_torch(module: nn.Module) -> nn.Module:
    """Convert this package's attention modules into torch.nn ones with the same weights.

    Accepts the six ``attention.compat`` classes (their layout is kept; each converts itself
    with ``to_torch()``) and the batch-first core classes (``MultiHeadAttention``,
    ``EncoderLayer``, and an ``Encoder`` built with ``positional=None``), which become
    ``batch_first=True`` torch.nn modules. The train/eval mode is kept.
    """
    if isinstance(module, _COMPAT_CLASSES):
        if type(module) not in _COMPAT_CLASSES:  # a subclass's own forward would be lost
            raise TypeError(f"module: expected one of {[c.__name__ for c in _COMPAT_CLASSES]} "
                            f"(attention.compat), exactly, got {type(module).__module__}."
                            f"{type(module).__name__}")
        return module.to_torch()
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
        **factory_args(module.out_proj.weight),
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
        activation_for_torch(feed_forward.activation), module.norm1.eps, True,
        module.norm_first, feed_forward.linear1.bias is not None,
        **factory_args(feed_forward.linear1.weight),
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
