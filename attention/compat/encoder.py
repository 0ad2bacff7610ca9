"""``torch.nn.TransformerEncoderLayer`` and ``torch.nn.TransformerEncoder``, torch.nn's
parameters and wiring, this package's attention."""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .._checks import check_size, check_tensor
from ..functional import causal_mask
from ..layers import feed_forward, get_activation, layer_norm, residual
from .errors import InvalidInputError, InvalidTypeError, torch_errors
from .multihead import MultiheadAttention
from .twins import (
    TORCH_CLASSES,
    LayerTwin,
    check_exact_type,
    convert_part,
    finish,
    twin_of,
)

__all__ = ["TransformerEncoder", "TransformerEncoderLayer", "activation_code",
           "add_layer_parts", "call_attention", "check_layer_input", "clones", "is_causal_mask",
           "load_core_layer_names"]

# The encoder layer's arguments, by the name its self-attention gives them.
SRC_NAMES = {"attn_mask": "src_mask", "key_padding_mask": "src_key_padding_mask"}

def activation_code(activation: Callable[[Tensor], Tensor]) -> int:
    """torch.nn's ``activation_relu_or_gelu``: 1 for relu, 2 for gelu, 0 for anything else."""
    if activation is F.relu or isinstance(activation, nn.ReLU):
        return 1
    if activation is F.gelu or isinstance(activation, nn.GELU):
        return 2
    return 0


def check_layer_input(name: str, x: Tensor, d_model: int, batch_first: bool) -> None:
    """A layer's input: ``(S, N, E)`` (``(N, S, E)`` if batch_first) or unbatched ``(S, E)``,
    with ``E = d_model``."""
    layout = "(N, S, E) if batch_first" if batch_first else "(S, N, E)"
    check_tensor(name, x, [2, 3], f"{layout} or unbatched (S, E)")
    check_size(name, x, -1, d_model, "d_model")


def is_causal_mask(mask: Tensor | None, is_causal: bool | None, length: int) -> bool:
    """torch.nn's ``_detect_is_causal_mask``: ``is_causal`` when given, else whether ``mask``
    is exactly ``generate_square_subsequent_mask(length)`` (compared as booleans, ``True`` =
    masked). Under torch.compile or torch.export the mask is not read (a data-dependent
    branch), and ``False`` is returned: the mask is then applied as given, same numbers."""
    if is_causal is not None:
        return bool(is_causal)
    if mask is None or mask.shape != (length, length) or torch.compiler.is_compiling():
        return False
    masked = mask if mask.dtype == torch.bool else mask == float("-inf")
    if mask.dtype != torch.bool and not bool(((mask == 0) | masked).all()):
        return False
    return bool((masked == causal_mask(length, length, mask.device)).all())


def load_core_layer_names(module: nn.Module, state_dict: dict[str, Tensor], prefix: str,
                          *args: object) -> None:
    """Load-state-dict pre-hook: the names of this package's :class:`attention.EncoderLayer`
    and ``DecoderLayer`` (as ``attention.compat`` had them before it held torch.nn's
    parameters) become torch.nn's: ``feed_forward.linear1`` → ``linear1``, ``cross_attn`` →
    ``multihead_attn`` (the attention's own hook packs ``q_proj``/``k_proj``/``v_proj``)."""
    renames = {prefix + "feed_forward.": prefix, prefix + "cross_attn.": prefix + "multihead_attn."}
    for key in list(state_dict):
        for old, new in renames.items():
            if key.startswith(old):
                state_dict[new + key.removeprefix(old)] = state_dict.pop(key)


def add_layer_parts(layer: nn.Module, sublayers: int, d_model: int, dim_feedforward: int,
                    dropout: float, activation: str | Callable[[Tensor], Tensor],
                    layer_norm_eps: float, norm_first: bool, bias: bool,
                    factory: dict[str, Any]) -> None:
    """What torch.nn's encoder and decoder layers hold after their attention, registered in
    torch.nn's order (so parameters() lines up): ``linear1``, ``dropout``, ``linear2``,
    ``norm1``… and ``dropout1``… (one per sub-layer), ``activation``; and the hook that loads
    this package's core layer names."""
    layer.linear1 = nn.Linear(d_model, dim_feedforward, bias=bias, **factory)
    layer.dropout = nn.Dropout(dropout)
    layer.linear2 = nn.Linear(dim_feedforward, d_model, bias=bias, **factory)
    layer.norm_first = norm_first
    for i in range(1, sublayers + 1):
        setattr(layer, f"norm{i}", layer_norm(d_model, layer_norm_eps, bias, **factory))
    for i in range(1, sublayers + 1):
        setattr(layer, f"dropout{i}", nn.Dropout(dropout))
    activation = get_activation(activation)
    layer.activation_relu_or_gelu = activation_code(activation)
    layer.activation = activation
    layer.register_load_state_dict_pre_hook(load_core_layer_names)


def call_attention(attention: nn.Module, names: dict[str, str], *args: Any, **kwargs: Any
                   ) -> Tensor:
    """``attention(*args, **kwargs)[0]``, its input errors naming the layer's arguments
    (``tgt_mask`` rather than the attention's ``attn_mask``)."""
    try:
        return attention(*args, **kwargs)[0]
    except (InvalidInputError, InvalidTypeError) as error:
        message = str(error)
        for inner, outer in names.items():
            if message.startswith(inner + ":"):
                raise type(error)(f"{outer} (the attention's {inner}):"
                                  f"{message[len(inner) + 1:]}") from error
        raise


def clones(layer: nn.Module, num_layers: int) -> nn.ModuleList:
    """``num_layers`` independent deep copies of ``layer``, as torch.nn's ``_get_clones``."""
    return nn.ModuleList(copy.deepcopy(layer) for _ in range(num_layers))


@twin_of(TORCH_CLASSES["TransformerEncoderLayer"])
class TransformerEncoderLayer(LayerTwin, nn.Module):
    """``torch.nn.TransformerEncoderLayer``: same arguments, defaults, parameters (``self_attn``,
    ``linear1``, ``linear2``, ``norm1``, ``norm2``, in torch.nn's order) and forward.

    Self-attention then feed-forward, each with dropout, a residual and a LayerNorm
    (post-norm unless ``norm_first``): :func:`attention.layers.residual`, the wiring of this
    package's own layers.
    """

    __constants__ = ["norm_first"]

    @torch_errors
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
        factory = {"device": device, "dtype": dtype}
        super().__init__()
        self.self_attn = MultiheadAttention(d_model, nhead, dropout=dropout, bias=bias,
                                            batch_first=batch_first, **factory)
        add_layer_parts(self, 2, d_model, dim_feedforward, dropout, activation, layer_norm_eps,
                        norm_first, bias, factory)

    @torch_errors
    def forward(
        self,
        src: Tensor,
        src_mask: Tensor | None = None,
        src_key_padding_mask: Tensor | None = None,
        is_causal: bool = False,
    ) -> Tensor:
        """Shape: src ``(S, N, E)`` (``(N, S, E)`` if batch_first, ``(S, E)`` unbatched);
        src_mask ``(S, S)`` or ``(N * nhead, S, S)``; src_key_padding_mask ``(N, S)``.
        Masks: boolean ``True`` = may not attend, float = added to the scores."""
        check_layer_input("src", src, self.self_attn.embed_dim, self.self_attn.batch_first)

        def self_attention(x: Tensor) -> Tensor:
            return call_attention(self.self_attn, SRC_NAMES, x, x, x, attn_mask=src_mask,
                                  key_padding_mask=src_key_padding_mask,
                                  need_weights=False, is_causal=is_causal)

        x = residual(src, self_attention, self.norm1, self.dropout1, self.norm_first)
        return residual(x, self._feed_forward, self.norm2, self.dropout2, self.norm_first)

    def _feed_forward(self, x: Tensor) -> Tensor:
        return feed_forward(x, self.linear1, self.activation, self.dropout, self.linear2)


@twin_of(TORCH_CLASSES["TransformerEncoder"])
class TransformerEncoder(nn.Module):
    """``torch.nn.TransformerEncoder``: ``num_layers`` copies of ``encoder_layer``, then
    ``norm`` if given.

    ``encoder_layer`` may be this module's :class:`TransformerEncoderLayer`, a
    ``torch.nn.TransformerEncoderLayer`` (converted with its weights), or any other layer
    module called with torch.nn's layer arguments (a subclass, say), cloned as it is.
    ``enable_nested_tensor`` and ``mask_check`` are kept as attributes; there is no
    nested-tensor path, so padded positions get computed values where torch.nn's fast path
    gives zeros.
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
        if type(encoder_layer) is TransformerEncoderLayer.torch_class:  # converted
            encoder_layer = TransformerEncoderLayer.from_torch(encoder_layer)
        elif not isinstance(encoder_layer, nn.Module):  # any other layer is cloned as it is
            raise TypeError("encoder_layer: expected a TransformerEncoderLayer module, got "
                            f"{type(encoder_layer).__name__}")
        self.layers = clones(encoder_layer, num_layers)
        self.num_layers = num_layers
        self.norm = norm
        self.enable_nested_tensor = enable_nested_tensor
        self.use_nested_tensor = False  # torch.nn's flag for its fast path, which this lacks
        self.mask_check = mask_check

    @classmethod
    def from_torch(cls, module: nn.TransformerEncoder) -> TransformerEncoder:
        """This class with the layers (each converted, or copied if it is not torch.nn's
        own), norm, flags, mode and ``requires_grad`` of ``module``, a
        ``torch.nn.TransformerEncoder`` (exactly)."""
        check_exact_type("module", module, cls.torch_class)
        layers = [convert_part(layer) for layer in module.layers]
        twin = cls(layers[0], len(layers), copy.deepcopy(module.norm),
                   enable_nested_tensor=module.enable_nested_tensor,
                   mask_check=module.mask_check)
        twin.layers = nn.ModuleList(layers)
        return finish(module, twin)

    def to_torch(self) -> nn.TransformerEncoder:
        """The ``torch.nn.TransformerEncoder`` with this encoder's layers, norm and flags
        (its nested-tensor fast path off for pre-norm layers, which it does not support)."""
        layers = [convert_part(layer) for layer in self.layers]
        twin = self.torch_class(layers[0], len(layers), copy.deepcopy(self.norm),
                                enable_nested_tensor=self.enable_nested_tensor
                                and not layers[0].norm_first, mask_check=self.mask_check)
        twin.layers = nn.ModuleList(layers)
        return finish(self, twin)

    @torch_errors
    def forward(
        self,
        src: Tensor,
        mask: Tensor | None = None,
        src_key_padding_mask: Tensor | None = None,
        is_causal: bool | None = None,
    ) -> Tensor:
        """Shapes as for :class:`TransformerEncoderLayer`. ``is_causal=None`` detects a
        causal ``mask``, as torch.nn does, and passes the hint to every layer."""
        attention = self.layers[0].self_attn
        check_layer_input("src", src, attention.embed_dim, attention.batch_first)
        length = src.shape[1 if attention.batch_first and src.dim() == 3 else 0]
        is_causal = is_causal_mask(mask, is_causal, length)
        x = src
        for layer in self.layers:
            x = layer(x, src_mask=mask, src_key_padding_mask=src_key_padding_mask,
                      is_causal=is_causal)
        return self.norm(x) if self.norm is not None else x
