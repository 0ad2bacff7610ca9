"""Drop-in replacements for torch.nn's attention modules, and weight converters.

``MultiheadAttention``, ``TransformerEncoderLayer`` and ``TransformerEncoder`` take
torch.nn's constructor arguments with torch.nn's defaults (sequence first, post-norm, relu,
biases) and torch.nn's forward signatures, so an existing model changes its import and
nothing else. They are subclasses of this package's modules, and they load torch.nn state
dicts as they are (the packed ``in_proj_weight`` is split into ``q_proj``/``k_proj``/
``v_proj`` on loading).

``from_torch(module)`` and ``to_torch(module)`` convert trained modules both ways.

Differences from torch.nn, on purpose:

- a query whose keys are all masked gets zeros, not NaN;
- ``is_causal`` is not only a hint: with no ``attn_mask`` it applies a causal mask
  (torch.nn raises); with one, the mask is used as given, as torch.nn does;
- no nested-tensor fast path: padded positions get computed values, not zeros;
- attention weights are returned before dropout (torch.nn returns them after), so their
  rows sum to 1 in training too.

And where the drop-in ends: the classes are not subclasses of torch.nn's, the projections
are ``q_proj``/``k_proj``/``v_proj`` (there is no ``in_proj_weight`` to initialise by
hand), and ``state_dict()`` uses those names: torch.nn checkpoints load into these classes,
and ``to_torch`` turns a trained module back into torch.nn's layout. TorchScript
(``torch.jit.script``) is not supported; ``torch.compile`` and ``torch.export`` are.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._checks import check_size, check_tensor, shape_of
from .layers import EncoderLayer
from .models import Encoder
from .multihead import MultiHeadAttention

__all__ = [
    "MultiheadAttention",
    "TransformerEncoder",
    "TransformerEncoderLayer",
    "from_torch",
    "to_torch",
]

_PROJECTIONS = ("q_proj", "k_proj", "v_proj")


# --------------------------------------------------------------------------- layouts


def _to_batch_first(x: Tensor | None, batch_first: bool, batched: bool) -> Tensor | None:
    """torch.nn layouts (``(L, N, E)``, ``(N, L, E)`` or unbatched ``(L, E)``) → ``(N, L, E)``."""
    if x is None:
        return None
    if not batched:
        return x.unsqueeze(0)
    return x if batch_first else x.transpose(0, 1)


def _from_batch_first(x: Tensor, batch_first: bool, batched: bool) -> Tensor:
    if not batched:
        return x.squeeze(0)
    return x if batch_first else x.transpose(0, 1)


def _is_batched(name: str, x: Tensor, layout: str) -> bool:
    x = check_tensor(name, x, [2, 3], layout)
    return x.dim() == 3


def _unbatched_mask(mask: Tensor | None, batched: bool) -> Tensor | None:
    """torch.nn accepts an unbatched ``(S,)`` key padding mask with unbatched inputs."""
    if mask is not None and not batched and mask.dim() == 1:
        return mask.unsqueeze(0)
    return mask


# ------------------------------------------------------------------ state dict layout


def _split_in_proj(state_dict: dict[str, Any], prefix: str) -> None:
    """torch.nn's packed (or separate) input projections → ``q_proj``/``k_proj``/``v_proj``."""
    packed = state_dict.pop(prefix + "in_proj_weight", None)
    if packed is not None:
        for name, weight in zip(_PROJECTIONS, packed.chunk(3, dim=0), strict=True):
            state_dict[f"{prefix}{name}.weight"] = weight
    for name in _PROJECTIONS:
        separate = state_dict.pop(f"{prefix}{name}_weight", None)
        if separate is not None:
            state_dict[f"{prefix}{name}.weight"] = separate
    packed_bias = state_dict.pop(prefix + "in_proj_bias", None)
    if packed_bias is not None:
        for name, bias in zip(_PROJECTIONS, packed_bias.chunk(3, dim=0), strict=True):
            state_dict[f"{prefix}{name}.bias"] = bias


def _join_in_proj(state_dict: dict[str, Tensor], prefix: str, same_dims: bool) -> None:
    """``q_proj``/``k_proj``/``v_proj`` → torch.nn's packed or separate layout."""
    weights = [state_dict.pop(f"{prefix}{name}.weight") for name in _PROJECTIONS]
    if same_dims:
        state_dict[prefix + "in_proj_weight"] = torch.cat(weights, dim=0)
    else:
        for name, weight in zip(_PROJECTIONS, weights, strict=True):
            state_dict[f"{prefix}{name}_weight"] = weight
    if f"{prefix}q_proj.bias" in state_dict:
        biases = [state_dict.pop(f"{prefix}{name}.bias") for name in _PROJECTIONS]
        state_dict[prefix + "in_proj_bias"] = torch.cat(biases, dim=0)


def _mha_load_hook(module: nn.Module, state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
    _split_in_proj(state_dict, prefix)


def _layer_load_hook(module: nn.Module, state_dict: dict[str, Any], prefix: str, *args: Any
                     ) -> None:
    for name in ("linear1", "linear2"):
        for key in [k for k in state_dict if k.startswith(f"{prefix}{name}.")]:
            state_dict[key.replace(f"{prefix}{name}.", f"{prefix}feed_forward.{name}.", 1)] = \
                state_dict.pop(key)


def _reject_unsupported(**flags: bool) -> None:
    for name, value in flags.items():
        if value:
            raise NotImplementedError(f"{name}=True is not supported by attention.compat "
                                      f"(got {name}={value}); use torch.nn for it")


def _factory(module: nn.Module, device: Any, dtype: Any) -> nn.Module:
    return module.to(device=device, dtype=dtype) if device is not None or dtype is not None \
        else module


# --------------------------------------------------------------------------- modules


class MultiheadAttention(MultiHeadAttention):
    """``torch.nn.MultiheadAttention``, same arguments and defaults, this package's maths.

    Sequence first unless ``batch_first``; returns ``(output, weights)`` with the weights
    averaged over heads by default (``need_weights=True``, as in torch.nn). Masks: boolean
    ``True`` = may not attend, float = added to the scores.
    """

    def __init__(
        self,
        embed_dim: int,
        num_heads: int,
        dropout: float = 0.0,
        bias: bool = True,
        add_bias_kv: bool = False,
        add_zero_attn: bool = False,
        kdim: int | None = None,
        vdim: int | None = None,
        batch_first: bool = False,
        device: Any = None,
        dtype: Any = None,
    ) -> None:
        _reject_unsupported(add_bias_kv=add_bias_kv, add_zero_attn=add_zero_attn)
        super().__init__(embed_dim, num_heads, dropout, bias, kdim=kdim, vdim=vdim)
        self.embed_dim = embed_dim
        self.num_heads = num_heads
        self.head_dim = self.d_head
        self.batch_first = batch_first
        self._qkv_same_embed_dim = self.kdim == self.vdim == embed_dim
        self.bias_k = self.bias_v = None  # torch.nn's attributes for what is not supported
        self.add_zero_attn = False
        self._reset_parameters()
        _factory(self, device, dtype)
        self.register_load_state_dict_pre_hook(_mha_load_hook)

    def _reset_parameters(self) -> None:
        """torch.nn's initialisation: Xavier-uniform input projections, zero biases."""
        if self._qkv_same_embed_dim:  # Xavier over the packed (3E, E) matrix, as torch.nn
            bound = math.sqrt(6.0 / (self.embed_dim + 3 * self.embed_dim))
            for name in _PROJECTIONS:
                nn.init.uniform_(getattr(self, name).weight, -bound, bound)
        else:
            for name in _PROJECTIONS:
                nn.init.xavier_uniform_(getattr(self, name).weight)
        for linear in (self.q_proj, self.k_proj, self.v_proj, self.out_proj):
            if linear.bias is not None:
                nn.init.zeros_(linear.bias)

    def forward(  # type: ignore[override]
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        key_padding_mask: Tensor | None = None,
        need_weights: bool = True,
        attn_mask: Tensor | None = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
    ) -> tuple[Tensor, Tensor | None]:
        """Shape: query ``(L, N, E)`` (``(N, L, E)`` if batch_first, ``(L, E)`` unbatched);
        key/value likewise with ``S``; key_padding_mask ``(N, S)``; attn_mask ``(L, S)`` or
        ``(N * num_heads, L, S)``. Returns ``(L, N, E)`` and ``(N, L, S)`` weights (or
        ``(N, num_heads, L, S)`` when not ``average_attn_weights``)."""
        # Checked in the caller's layout, so that messages show the shapes they passed.
        layout = "(N, L, E) if batch_first" if self.batch_first else "(L, N, E)"
        batched = _is_batched("query", query, f"{layout} or unbatched (L, E)")
        for name, x in (("key", key), ("value", value)):
            if _is_batched(name, x, f"{layout} or unbatched (S, E)") != batched:
                raise ValueError(f"{name}: expected a {query.dim()}-D tensor like query, got "
                                 f"shape {shape_of(x)}")
        for name, x, size in (("query", query, "embed_dim"), ("key", key, "kdim"),
                              ("value", value, "vdim")):
            check_size(name, x, -1, getattr(self, size), size)
        if batched:
            batch_dim = 0 if self.batch_first else 1
            for name, x in (("key", key), ("value", value)):
                check_size(name, x, batch_dim, query.shape[batch_dim], "N (as in query)")
        out, weights = super().forward(
            _to_batch_first(query, self.batch_first, batched),
            _to_batch_first(key, self.batch_first, batched),
            _to_batch_first(value, self.batch_first, batched),
            key_padding_mask=_unbatched_mask(key_padding_mask, batched),
            attn_mask=attn_mask,
            is_causal=is_causal and attn_mask is None,
            need_weights=need_weights,
            average_attn_weights=average_attn_weights,
        )
        if weights is not None and not batched:
            weights = weights.squeeze(0)
        return _from_batch_first(out, self.batch_first, batched), weights


class TransformerEncoderLayer(EncoderLayer):
    """``torch.nn.TransformerEncoderLayer``: same arguments, defaults and forward.

    ``self_attn`` is a :class:`MultiheadAttention` in the layer's layout, called as torch.nn
    calls it; ``linear1``, ``linear2``, ``dropout`` and ``activation`` are there as in
    torch.nn. Masks: boolean ``True`` = may not attend, float = added to the scores.
    """

    def __init__(
        self,
        d_model: int,
        nhead: int,
        dim_feedforward: int = 2048,
        dropout: float = 0.1,
        activation: str | Callable[[Tensor], Tensor] = F.relu,
        layer_norm_eps: float = 1e-5,
        batch_first: bool = False,
        norm_first: bool = False,
        bias: bool = True,
        device: Any = None,
        dtype: Any = None,
    ) -> None:
        super().__init__(d_model, nhead, dim_feedforward, dropout, activation, norm_first, bias,
                         layer_norm_eps)
        self.self_attn = MultiheadAttention(d_model, nhead, dropout, bias, batch_first=batch_first)
        self.batch_first = batch_first
        _factory(self, device, dtype)
        self.register_load_state_dict_pre_hook(_layer_load_hook)

    # torch.nn's names for the feed-forward's parts: read and replaced through them.
    linear1 = property(lambda self: self.feed_forward.linear1)
    linear2 = property(lambda self: self.feed_forward.linear2)
    dropout = property(lambda self: self.feed_forward.dropout)
    activation = property(lambda self: self.feed_forward.activation)

    def __setattr__(self, name: str, value: Any) -> None:
        if name in ("linear1", "linear2", "dropout", "activation") and \
                "feed_forward" in self._modules:
            setattr(self.feed_forward, name, value)
        else:
            super().__setattr__(name, value)

    def forward(  # type: ignore[override]
        self,
        src: Tensor,
        src_mask: Tensor | None = None,
        src_key_padding_mask: Tensor | None = None,
        is_causal: bool = False,
    ) -> Tensor:
        """Shape: src ``(S, N, E)`` (``(N, S, E)`` if batch_first, ``(S, E)`` unbatched);
        src_mask ``(S, S)`` or ``(N * nhead, S, S)``; src_key_padding_mask ``(N, S)``."""

        layout = "(N, S, E) if batch_first" if self.batch_first else "(S, N, E)"
        _is_batched("src", src, f"{layout} or unbatched (S, E)")
        check_size("src", src, -1, self.d_model, "d_model")

        def self_attention(x: Tensor) -> Tensor:
            return self.self_attn(x, x, x, key_padding_mask=src_key_padding_mask,
                                  need_weights=False, attn_mask=src_mask, is_causal=is_causal)[0]

        # EncoderLayer's residual blocks, around torch.nn's attention call in its layout.
        return self.residual_blocks(src, self_attention)


class TransformerEncoder(nn.Module):
    """``torch.nn.TransformerEncoder``: ``num_layers`` copies of ``encoder_layer``, then
    ``norm`` if given.

    ``encoder_layer`` may be this module's :class:`TransformerEncoderLayer` or a
    ``torch.nn.TransformerEncoderLayer`` (converted with its weights). ``enable_nested_tensor``
    and ``mask_check`` are accepted for compatibility; there is no nested-tensor path.
    """

    def __init__(
        self,
        encoder_layer: TransformerEncoderLayer | nn.TransformerEncoderLayer,
        num_layers: int,
        norm: nn.Module | None = None,
        enable_nested_tensor: bool = True,
        mask_check: bool = True,
    ) -> None:
        super().__init__()
        if isinstance(encoder_layer, nn.TransformerEncoderLayer):
            encoder_layer = from_torch(encoder_layer)
        if not isinstance(encoder_layer, TransformerEncoderLayer):
            raise TypeError("encoder_layer: expected attention.compat.TransformerEncoderLayer or "
                            f"torch.nn.TransformerEncoderLayer, got {type(encoder_layer).__name__}")
        self.layers = nn.ModuleList(copy.deepcopy(encoder_layer) for _ in range(num_layers))
        self.num_layers = num_layers
        self.norm = norm
        self.enable_nested_tensor = enable_nested_tensor
        self.mask_check = mask_check

    def forward(
        self,
        src: Tensor,
        mask: Tensor | None = None,
        src_key_padding_mask: Tensor | None = None,
        is_causal: bool | None = None,
    ) -> Tensor:
        """Shapes as for :class:`TransformerEncoderLayer`."""
        x = src
        for layer in self.layers:
            x = layer(x, src_mask=mask, src_key_padding_mask=src_key_padding_mask,
                      is_causal=bool(is_causal))
        return self.norm(x) if self.norm is not None else x


# -------------------------------------------------------------------------- converters


def _activation_for_torch(activation: Callable[[Tensor], Tensor]) -> str | Callable:
    return {F.relu: "relu", F.gelu: "gelu"}.get(activation, activation)


def _mha_from_torch(module: nn.MultiheadAttention) -> MultiheadAttention:
    _reject_unsupported(add_bias_kv=module.bias_k is not None,
                        add_zero_attn=module.add_zero_attn)
    weight = module.out_proj.weight
    ours = MultiheadAttention(
        module.embed_dim, module.num_heads, module.dropout, bias=module.in_proj_bias is not None,
        kdim=module.kdim, vdim=module.vdim, batch_first=module.batch_first,
        device=weight.device, dtype=weight.dtype,
    )
    ours.load_state_dict(module.state_dict())
    return ours


def _layer_from_torch(module: nn.TransformerEncoderLayer) -> TransformerEncoderLayer:
    _reject_unsupported(add_bias_kv=module.self_attn.bias_k is not None,
                        add_zero_attn=module.self_attn.add_zero_attn)
    weight = module.linear1.weight
    ours = TransformerEncoderLayer(
        module.self_attn.embed_dim, module.self_attn.num_heads, module.linear1.out_features,
        module.dropout.p, module.activation, module.norm1.eps, module.self_attn.batch_first,
        module.norm_first, module.linear1.bias is not None,
        device=weight.device, dtype=weight.dtype,
    )
    ours.load_state_dict(module.state_dict())
    return ours


def from_torch(module: nn.Module) -> nn.Module:
    """Convert a trained ``torch.nn`` attention module into its ``attention.compat`` twin.

    Accepts ``nn.MultiheadAttention``, ``nn.TransformerEncoderLayer`` and
    ``nn.TransformerEncoder``; keeps the layout (``batch_first``), the device and dtype, the
    train/eval mode, and copies every weight. Outputs, attention weights and gradients match
    torch.nn's.
    """
    return _convert_from_torch(module).train(module.training)


def _convert_from_torch(module: nn.Module) -> nn.Module:
    if isinstance(module, nn.MultiheadAttention):
        return _mha_from_torch(module)
    if isinstance(module, nn.TransformerEncoderLayer):
        return _layer_from_torch(module)
    if isinstance(module, nn.TransformerEncoder):
        layers = [_layer_from_torch(layer) for layer in module.layers]
        ours = TransformerEncoder(layers[0], len(layers), copy.deepcopy(module.norm),
                                  enable_nested_tensor=module.enable_nested_tensor,
                                  mask_check=module.mask_check)
        for target, source in zip(ours.layers, layers, strict=True):
            target.load_state_dict(source.state_dict())
        return ours
    raise TypeError("module: expected nn.MultiheadAttention, nn.TransformerEncoderLayer or "
                    f"nn.TransformerEncoder, got {type(module).__name__}")


def _reject_rotary(module: MultiHeadAttention) -> None:
    if module.rotary is not None:
        raise ValueError("module: torch.nn has no rotary embeddings; to_torch needs attention "
                         "built without rotary (positional != 'rotary'), got rotary=True")


def _mha_to_torch(module: MultiHeadAttention, batch_first: bool) -> nn.MultiheadAttention:
    _reject_rotary(module)
    weight = module.out_proj.weight
    theirs = nn.MultiheadAttention(
        module.d_model, module.n_heads, module.dropout, bias=module.q_proj.bias is not None,
        kdim=module.kdim, vdim=module.vdim, batch_first=batch_first,
        device=weight.device, dtype=weight.dtype,
    )
    state = module.state_dict()
    _join_in_proj(state, "", module.kdim == module.vdim == module.d_model)
    theirs.load_state_dict(state)
    return theirs


def _layer_to_torch(module: EncoderLayer, batch_first: bool) -> nn.TransformerEncoderLayer:
    _reject_rotary(module.self_attn)
    weight = module.feed_forward.linear1.weight
    theirs = nn.TransformerEncoderLayer(
        module.d_model, module.self_attn.n_heads, module.feed_forward.d_ff,
        module.self_attn.dropout, _activation_for_torch(module.feed_forward.activation),
        module.norm1.eps, batch_first, module.norm_first, module.feed_forward.linear1.bias
        is not None, device=weight.device, dtype=weight.dtype,
    )
    state = module.state_dict()
    _join_in_proj(state, "self_attn.", True)
    for key in [k for k in state if k.startswith("feed_forward.")]:
        state[key.removeprefix("feed_forward.")] = state.pop(key)
    theirs.load_state_dict(state)
    return theirs


def to_torch(module: nn.Module) -> nn.Module:
    """Convert this package's attention modules into ``torch.nn`` ones with the same weights.

    Accepts the ``attention.compat`` classes (their layout is kept) and the batch-first core
    classes (``MultiHeadAttention``, ``EncoderLayer``, and an ``Encoder`` built with
    ``positional=None``), which become ``batch_first=True`` torch.nn modules. The train/eval
    mode is kept.
    """
    return _convert_to_torch(module).train(module.training)


def _convert_to_torch(module: nn.Module) -> nn.Module:
    batch_first = getattr(module, "batch_first", True)
    if isinstance(module, MultiHeadAttention):
        return _mha_to_torch(module, batch_first)
    if isinstance(module, EncoderLayer):
        return _layer_to_torch(module, batch_first)
    if isinstance(module, TransformerEncoder):
        layers = [_layer_to_torch(layer, layer.batch_first) for layer in module.layers]
        norm, nested, mask_check = (copy.deepcopy(module.norm), module.enable_nested_tensor,
                                    module.mask_check)
    elif isinstance(module, Encoder):
        if module.positional is not None or module.layers[0].self_attn.rotary is not None:
            raise ValueError("module: torch.nn.TransformerEncoder has no positional encoding; "
                             "to_torch needs an Encoder built with positional=None")
        layers = [_layer_to_torch(layer, True) for layer in module.layers]
        norm, nested, mask_check = copy.deepcopy(module.norm), False, True
    else:
        raise TypeError("module: expected an attention MultiHeadAttention, EncoderLayer, Encoder "
                        f"or compat module, got {type(module).__name__}")
    theirs = nn.TransformerEncoder(layers[0], len(layers), norm,
                                   enable_nested_tensor=nested and not layers[0].norm_first,
                                   mask_check=mask_check)
    for target, source in zip(theirs.layers, layers, strict=True):
        target.load_state_dict(source.state_dict())
    return theirs
