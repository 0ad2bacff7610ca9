"""The blocks a Transformer stacks: feed-forward, encoder layer, decoder layer.

Each sub-layer is wrapped in a residual connection and a norm (LayerNorm, or RMSNorm with
``norm="rmsnorm"``), either pre-norm (``x + f(norm(x))``, the default: stable without
warm-up tricks) or post-norm (``norm(x + f(x))``, the original paper and torch.nn's
default).

The attention keywords of :class:`~attention.multihead.MultiHeadAttention` (``n_kv_heads``,
``window``, ``alibi``, ``softcap``, ``qk_norm``) pass through the layers to their
self-attention; a decoder's cross-attention takes ``n_kv_heads``, ``softcap`` and
``qk_norm`` (a window or ALiBi distance between target and source positions means nothing).
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import features
from ._checks import (
    check_choice,
    check_mask,
    check_positive_int,
    check_probability,
    check_size,
    check_tensor,
    shape_of,
)
from .inference import prepared_linear
from .multihead import KVCache, MultiHeadAttention
from .packing import Packing

__all__ = ["ACTIVATIONS", "GLU_ACTIVATIONS", "NORMS", "DecoderLayer", "EncoderLayer",
           "FeedForward", "build_norm", "feed_forward", "get_activation", "layer_norm",
           "pack_padding", "residual"]

ACTIVATIONS: dict[str, Callable[[Tensor], Tensor]] = {
    "relu": F.relu,
    "gelu": F.gelu,
    "gelu_tanh": partial(F.gelu, approximate="tanh"),
    "silu": F.silu,
}
# Gated feed-forwards (Shazeer, 2020): the name, and the activation of the gate.
GLU_ACTIVATIONS: dict[str, Callable[[Tensor], Tensor]] = {
    "swiglu": F.silu,
    "geglu": F.gelu,
}
NORMS = ("layernorm", "rmsnorm")


def layer_norm(d_model: int, eps: float, bias: bool, *, device: torch.device | str | None = None,
               dtype: torch.dtype | None = None) -> nn.LayerNorm:
    """``nn.LayerNorm(d_model, eps=eps, bias=bias)``, also on a torch whose LayerNorm has no
    ``bias`` argument (:data:`attention.features.LAYER_NORM_BIAS`): there the bias parameter
    of ``bias=False`` is removed by hand, as torch's own ``bias=False`` does, so the
    parameters and state dict are the same."""
    if features.LAYER_NORM_BIAS:
        return nn.LayerNorm(d_model, eps=eps, bias=bias, device=device, dtype=dtype)
    norm = nn.LayerNorm(d_model, eps=eps, device=device, dtype=dtype)
    if not bias:
        norm.register_parameter("bias", None)
    return norm


def build_norm(norm: str, d_model: int, eps: float, bias: bool) -> nn.Module:
    """The norm named ``norm``: :func:`layer_norm`, or ``nn.RMSNorm`` (which has no bias)."""
    check_choice("norm", norm, NORMS)
    if norm == "rmsnorm":
        return nn.RMSNorm(d_model, eps=eps)
    return layer_norm(d_model, eps, bias)


def get_activation(activation: str | Callable[[Tensor], Tensor]) -> Callable[[Tensor], Tensor]:
    """The activation function named ``activation`` (or ``activation`` itself if callable)."""
    if callable(activation):
        return activation
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation: expected one of {list(ACTIVATIONS) + list(GLU_ACTIVATIONS)}"
                         f" or a callable, got {activation!r}")
    return ACTIVATIONS[activation]


class FeedForward(nn.Module):
    """Position-wise feed-forward: ``linear2(dropout(activation(linear1(x))))``.

    With a gated ``activation`` (``"swiglu"``, ``"geglu"``: Llama's and ModernBERT's),
    ``linear1`` makes ``2 * d_ff`` features, the gate then the value, and the hidden layer
    is ``act(gate) * value`` (``act`` SiLU or GELU).

    Shape:
        x: ``(..., d_model)`` → same shape; the hidden layer has ``d_ff`` features
        (``4 * d_model`` when ``None``).
    """

    def __init__(
        self,
        d_model: int,
        d_ff: int | None = None,
        dropout: float = 0.0,
        activation: str | Callable[[Tensor], Tensor] = "gelu",
        bias: bool = False,
    ) -> None:
        super().__init__()
        self.d_model = check_positive_int("d_model", d_model)
        self.d_ff = 4 * d_model if d_ff is None else check_positive_int("d_ff", d_ff)
        self.gated = isinstance(activation, str) and activation in GLU_ACTIVATIONS
        self.activation = GLU_ACTIVATIONS[activation] if self.gated \
            else get_activation(activation)
        hidden = 2 * self.d_ff if self.gated else self.d_ff
        self.linear1 = nn.Linear(d_model, hidden, bias=bias)
        self.dropout = nn.Dropout(check_probability("dropout", dropout))
        self.linear2 = nn.Linear(self.d_ff, d_model, bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        if self.gated:
            gate, value = self.linear1(x).chunk(2, dim=-1)  # (..., 2·d_ff) -> 2 × (..., d_ff)
            return self.linear2(self.dropout(self.activation(gate) * value))
        return feed_forward(x, self.linear1, self.activation, self.dropout, self.linear2)


def feed_forward(x: Tensor, linear1: nn.Module, activation: Callable[[Tensor], Tensor],
                 dropout: nn.Module, linear2: nn.Module) -> Tensor:
    """``linear2(dropout(activation(linear1(x))))``: the position-wise feed-forward, for
    modules that hold its parts under their own names (torch.nn's layers in
    :mod:`attention.compat`).

    Inside :func:`~attention.inference.prepared_for_inference`, ``linear1``'s activation is
    applied as its product is written (:meth:`PreparedLinear.activated`, the same bits)."""
    prepared = prepared_linear(linear1)
    if prepared is not None:
        return linear2(dropout(prepared.activated(x, activation)))
    return linear2(dropout(activation(linear1(x))))


def residual(x: Tensor, sublayer: Callable[[Tensor], Tensor], norm: nn.Module,
             dropout: nn.Module, norm_first: bool) -> Tensor:
    """One residual block: ``x + dropout(sublayer(norm(x)))`` pre-norm, or
    ``norm(x + dropout(sublayer(x)))`` post-norm."""
    if norm_first:
        return x + dropout(sublayer(norm(x)))
    return norm(x + dropout(sublayer(x)))


def _check_layer_input(name: str, x: object, d_model: int) -> Tensor:
    x = check_tensor(name, x, [3], f"(batch, length, d_model={d_model})")
    check_size(name, x, -1, d_model, "d_model")
    return x


class EncoderLayer(nn.Module):
    """Self-attention then feed-forward, each with dropout, a residual and a LayerNorm.

    ``bias`` applies to every linear layer and LayerNorm, as in torch.nn (``bias=False``
    is the package default: projections that only add weights).

    Shape:
        x: ``(batch, length, d_model)`` → same shape; with ``return_attention`` also the
        ``(batch, n_heads, length, length)`` attention weights.
    """

    def __init__(
        self,
        d_model: int,
        n_heads: int,
        d_ff: int | None = None,
        dropout: float = 0.1,
        activation: str | Callable[[Tensor], Tensor] = "gelu",
        norm_first: bool = True,
        bias: bool = False,
        layer_norm_eps: float = 1e-5,
        rotary: bool = False,
        *,
        rotary_base: float = 10000.0,
        norm: str = "layernorm",
        n_kv_heads: int | None = None,
        window: int | tuple[int, int] | None = None,
        alibi: bool = False,
        softcap: float | None = None,
        qk_norm: bool = False,
    ) -> None:
        super().__init__()
        self.d_model = d_model
        self.norm_first = norm_first
        self.self_attn = MultiHeadAttention(
            d_model, n_heads, dropout, bias, rotary=rotary, rotary_base=rotary_base,
            n_kv_heads=n_kv_heads,
            window=window, alibi=alibi, softcap=softcap, qk_norm=qk_norm)
        self.feed_forward = FeedForward(d_model, d_ff, dropout, activation, bias)
        self.norm1 = build_norm(norm, d_model, layer_norm_eps, bias)
        self.norm2 = build_norm(norm, d_model, layer_norm_eps, bias)
        self.dropout1 = nn.Dropout(dropout)
        self.dropout2 = nn.Dropout(dropout)

    def forward(
        self,
        x: Tensor,
        *,
        key_padding_mask: Tensor | None = None,
        attn_mask: Tensor | None = None,
        is_causal: bool = False,
        return_attention: bool = False,
        packing: Packing | None = None,
        rotary_cos_sin: tuple[Tensor, Tensor] | None = None,
        document_ids: Tensor | None = None,
    ) -> Tensor | tuple[Tensor, Tensor]:
        """Masks: boolean ``True`` = may not attend, float = added to the scores.

        key_padding_mask: ``(batch, length)``; attn_mask: ``(length, length)``,
        ``(batch * n_heads, length, length)`` or ``(batch, n_heads, length, length)``.
        document_ids: ``(batch, length)`` integers: documents packed back to back in a row
        attend only within themselves (:meth:`Packing.from_documents`; no ``attn_mask``).

        A boolean ``key_padding_mask`` (without ``return_attention``) runs the layer on the
        real tokens only (see :mod:`attention.packing`): equal results on real positions,
        zeros at padded ones. ``packing`` passes ``x`` already packed, ``(tokens, d_model)``,
        as :class:`attention.Encoder` does to gather and scatter once for the whole stack;
        ``rotary_cos_sin`` passes the rotary angles it computed once (see
        :class:`MultiHeadAttention`).
        """
        if packing is not None:
            if key_padding_mask is not None or return_attention:
                raise ValueError("packing: expected neither key_padding_mask nor "
                                 "return_attention with packed input (the packing carries the "
                                 "padding; weights need the padded layout)")
            x = check_tensor("x", x, [2], f"(real tokens, d_model={self.d_model})")
            check_size("x", x, -1, self.d_model, "d_model")
            return self._forward(x, None, attn_mask, is_causal, False, packing, rotary_cos_sin)
        x = _check_layer_input("x", x, self.d_model)
        packing = pack_padding(key_padding_mask, x, return_attention, document_ids)
        if packing is not None:
            return packing.unpack(self._forward(packing.pack(x), None, attn_mask, is_causal,
                                                False, packing, rotary_cos_sin))
        return self._forward(x, key_padding_mask, attn_mask, is_causal, return_attention, None,
                             rotary_cos_sin)

    def _forward(
        self,
        x: Tensor,
        key_padding_mask: Tensor | None,
        attn_mask: Tensor | None,
        is_causal: bool,
        return_attention: bool,
        packing: Packing | None,
        rotary_cos_sin: tuple[Tensor, Tensor] | None,
    ) -> Tensor | tuple[Tensor, Tensor]:
        weights = None

        def self_attention(h: Tensor) -> Tensor:
            nonlocal weights
            out, weights = self.self_attn(
                h, key_padding_mask=key_padding_mask, attn_mask=attn_mask,
                is_causal=is_causal, need_weights=return_attention, average_attn_weights=False,
                packing=packing, rotary_cos_sin=rotary_cos_sin,
            )
            return out

        x = residual(x, self_attention, self.norm1, self.dropout1, self.norm_first)
        x = residual(x, self.feed_forward, self.norm2, self.dropout2, self.norm_first)
        return (x, weights) if return_attention else x


def pack_padding(key_padding_mask: Tensor | None, x: Tensor,
                 return_attention: bool = False, document_ids: Tensor | None = None
                 ) -> Packing | None:
    """The :class:`Packing` of a ``(batch, length)`` boolean padding mask of ``x``, or
    ``None`` when the batch runs padded (no mask, a float mask, or weights requested).

    With ``document_ids`` ``(batch, length)``, the packing of the documents in each row
    (:meth:`Packing.from_documents`): they always run packed."""
    batch, length = x.shape[:2]
    if key_padding_mask is not None:
        key_padding_mask = check_mask("key_padding_mask", key_padding_mask, [(batch, length)],
                                      "(batch, length) = ({b}, {n})", b=batch, n=length)
    if document_ids is not None:
        if return_attention:
            raise ValueError("return_attention: expected False with document_ids (packed "
                             "documents attend without the padded weights), got True")
        if key_padding_mask is not None and key_padding_mask.dtype != torch.bool:
            raise TypeError(f"key_padding_mask: expected dtype torch.bool with document_ids "
                            f"(padding is left out of the documents), got "
                            f"{key_padding_mask.dtype}")
        if isinstance(document_ids, Tensor) and tuple(document_ids.shape) != (batch, length):
            raise ValueError(f"document_ids: expected shape (batch, length) = ({batch}, "
                             f"{length}), got {shape_of(document_ids)}")
        return Packing.from_documents(document_ids, key_padding_mask)
    if key_padding_mask is None or return_attention:
        return None
    if key_padding_mask.dtype != torch.bool:
        return None
    return Packing.from_mask(key_padding_mask)


class DecoderLayer(nn.Module):
    """Masked self-attention, cross-attention over the encoder output, feed-forward.

    Each sub-layer has dropout, a residual and a LayerNorm (pre- or post-norm).

    Shape:
        x: ``(batch, Lt, d_model)``; memory: ``(batch, Ls, d_model)`` → ``(batch, Lt,
        d_model)``; with ``return_attention`` also the ``(batch, n_heads, Lt, Ls)``
        cross-attention weights.
    """

    def __init__(
        self,
        d_model: int,
        n_heads: int,
        d_ff: int | None = None,
        dropout: float = 0.1,
        activation: str | Callable[[Tensor], Tensor] = "gelu",
        norm_first: bool = True,
        bias: bool = False,
        layer_norm_eps: float = 1e-5,
        rotary: bool = False,
        *,
        rotary_base: float = 10000.0,
        norm: str = "layernorm",
        n_kv_heads: int | None = None,
        window: int | tuple[int, int] | None = None,
        alibi: bool = False,
        softcap: float | None = None,
        qk_norm: bool = False,
    ) -> None:
        super().__init__()
        self.d_model = d_model
        self.norm_first = norm_first
        self.self_attn = MultiHeadAttention(
            d_model, n_heads, dropout, bias, rotary=rotary, rotary_base=rotary_base,
            n_kv_heads=n_kv_heads,
            window=window, alibi=alibi, softcap=softcap, qk_norm=qk_norm)
        self.cross_attn = MultiHeadAttention(d_model, n_heads, dropout, bias,
                                             n_kv_heads=n_kv_heads, softcap=softcap,
                                             qk_norm=qk_norm)
        self.feed_forward = FeedForward(d_model, d_ff, dropout, activation, bias)
        self.norm1 = build_norm(norm, d_model, layer_norm_eps, bias)
        self.norm2 = build_norm(norm, d_model, layer_norm_eps, bias)
        self.norm3 = build_norm(norm, d_model, layer_norm_eps, bias)
        self.dropout1 = nn.Dropout(dropout)
        self.dropout2 = nn.Dropout(dropout)
        self.dropout3 = nn.Dropout(dropout)

    def forward(
        self,
        x: Tensor,
        memory: Tensor,
        *,
        tgt_key_padding_mask: Tensor | None = None,
        memory_key_padding_mask: Tensor | None = None,
        tgt_mask: Tensor | None = None,
        is_causal: bool = True,
        cache: tuple[KVCache, KVCache] | None = None,
        return_attention: bool = False,
        rotary_cos_sin: tuple[Tensor, Tensor] | None = None,
    ) -> Tensor | tuple[Tensor, Tensor]:
        """Masks: boolean ``True`` = may not attend, float = added to the scores.

        tgt_key_padding_mask: ``(batch, Lt)`` (``Lt`` counting cached positions);
        memory_key_padding_mask: ``(batch, Ls)``; tgt_mask: ``(Lt, Lt)`` or per head.
        cache: ``(self-attention cache, cross-attention cache)`` for incremental decoding.
        rotary_cos_sin: the self-attention's rotary angles, computed once by the caller.
        """
        x = _check_layer_input("x", x, self.d_model)
        memory = _check_layer_input("memory", memory, self.d_model)
        self_cache, cross_cache = cache if cache is not None else (None, None)
        weights = None

        def self_attention(h: Tensor) -> Tensor:
            return self.self_attn(
                h, key_padding_mask=tgt_key_padding_mask, attn_mask=tgt_mask,
                is_causal=is_causal, cache=self_cache, rotary_cos_sin=rotary_cos_sin,
            )[0]

        def cross_attention(h: Tensor) -> Tensor:
            nonlocal weights
            out, weights = self.cross_attn(
                h, memory, key_padding_mask=memory_key_padding_mask, cache=cross_cache,
                need_weights=return_attention, average_attn_weights=False,
            )
            return out

        x = residual(x, self_attention, self.norm1, self.dropout1, self.norm_first)
        x = residual(x, cross_attention, self.norm2, self.dropout2, self.norm_first)
        x = residual(x, self.feed_forward, self.norm3, self.dropout3, self.norm_first)
        return (x, weights) if return_attention else x
