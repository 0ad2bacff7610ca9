"""``torch.nn.TransformerDecoderLayer`` and ``torch.nn.TransformerDecoder``, with the
incremental decoding torch.nn lacks.

torch.nn's decoder re-runs the whole prefix for every new token. Here
``decoder.new_cache()`` makes a :class:`DecoderCache`, and ``decoder(tgt, memory,
cache=cache)`` takes only the new positions in ``tgt``: the self-attention keys and values of
earlier calls are kept and the new ones appended, and each layer projects the memory once.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch.nn.functional as F
from torch import Tensor, nn

from ..layers import feed_forward, residual
from ..multihead import KVCache
from .encoder import (
    add_layer_parts,
    call_attention,
    check_layer_input,
    clones,
    is_causal_mask,
)
from .errors import torch_errors
from .multihead import MultiheadAttention
from .twins import (
    TORCH_CLASSES,
    LayerTwin,
    check_exact_type,
    convert_part,
    finish,
    twin_of,
)

__all__ = ["DecoderCache", "LayerCache", "TransformerDecoder", "TransformerDecoderLayer"]

# The decoder layer's arguments, by the names its two attentions give them.
TGT_NAMES = {"attn_mask": "tgt_mask", "key_padding_mask": "tgt_key_padding_mask",
             "is_causal": "tgt_is_causal"}
MEMORY_NAMES = {"attn_mask": "memory_mask", "key_padding_mask": "memory_key_padding_mask",
                "key, value": "memory", "key": "memory", "value": "memory",
                "is_causal": "memory_is_causal"}

@dataclass
class LayerCache:
    """What one decoder layer keeps between calls: its self-attention's keys and values so
    far, and its cross-attention's projection of the memory."""

    self_attn: KVCache = field(default_factory=KVCache)
    cross_attn: KVCache = field(default_factory=KVCache)

    def __len__(self) -> int:
        """Target positions cached so far."""
        return len(self.self_attn)

    def reorder(self, index: Tensor) -> None:
        """Keep batch rows ``index``, in that order (beam search reorders hypotheses)."""
        self.self_attn.reorder(index)
        self.cross_attn.reorder(index)


@dataclass
class DecoderCache:
    """A :class:`LayerCache` per layer of a :class:`TransformerDecoder`."""

    layers: list[LayerCache]

    def __len__(self) -> int:
        """Target positions cached so far."""
        return len(self.layers[0]) if self.layers else 0

    def reorder(self, index: Tensor) -> None:
        """Keep batch rows ``index``, in that order, in every layer."""
        for layer in self.layers:
            layer.reorder(index)


@twin_of(TORCH_CLASSES["TransformerDecoderLayer"])
class TransformerDecoderLayer(LayerTwin, nn.Module):
    """``torch.nn.TransformerDecoderLayer``: same arguments, defaults, parameters
    (``self_attn``, ``multihead_attn``, ``linear1``, ``linear2``, ``norm1``–``norm3``, in
    torch.nn's order) and forward, plus ``cache=`` (see :meth:`forward`).

    Self-attention, cross-attention over ``memory``, feed-forward, each with dropout, a
    residual and a LayerNorm (post-norm unless ``norm_first``).
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
        self.multihead_attn = MultiheadAttention(d_model, nhead, dropout=dropout, bias=bias,
                                                 batch_first=batch_first, **factory)
        add_layer_parts(self, 3, d_model, dim_feedforward, dropout, activation, layer_norm_eps,
                        norm_first, bias, factory)

    def new_cache(self) -> LayerCache:
        """An empty cache for ``forward(…, cache=)``."""
        return LayerCache()

    @torch_errors
    def forward(
        self,
        tgt: Tensor,
        memory: Tensor,
        tgt_mask: Tensor | None = None,
        memory_mask: Tensor | None = None,
        tgt_key_padding_mask: Tensor | None = None,
        memory_key_padding_mask: Tensor | None = None,
        tgt_is_causal: bool = False,
        memory_is_causal: bool = False,
        *,
        cache: LayerCache | None = None,
    ) -> Tensor:
        """Shape: tgt ``(T, N, E)`` (``(N, T, E)`` if batch_first, ``(T, E)`` unbatched);
        memory ``(S, N, E)`` likewise; tgt_mask ``(T, T)`` or ``(N * nhead, T, T)``;
        memory_mask ``(T, S)``; tgt_key_padding_mask ``(N, T)``; memory_key_padding_mask
        ``(N, S)``. Masks: boolean ``True`` = may not attend, float = added to the scores.

        With a ``cache`` (from :meth:`new_cache`), ``tgt`` holds only the new positions:
        they attend to every cached position and causally among themselves; a ``tgt_mask``,
        if given, replaces that and is ``(T_new, T_cached + T_new)``. ``tgt_key_padding_mask``
        covers all positions so far, ``(N, T_cached + T_new)``.
        """
        attention = self.self_attn
        check_layer_input("tgt", tgt, attention.embed_dim, attention.batch_first)
        check_layer_input("memory", memory, attention.embed_dim, attention.batch_first)
        self_cache = cross_cache = None
        if cache is not None:
            self_cache, cross_cache = cache.self_attn, cache.cross_attn
            if tgt_mask is None:  # the new positions: causal among themselves, all cached
                tgt_is_causal = True

        def self_attention(x: Tensor) -> Tensor:
            return call_attention(self.self_attn, TGT_NAMES, x, x, x, attn_mask=tgt_mask,
                                  key_padding_mask=tgt_key_padding_mask, need_weights=False,
                                  is_causal=tgt_is_causal, cache=self_cache)

        def cross_attention(x: Tensor) -> Tensor:
            return call_attention(self.multihead_attn, MEMORY_NAMES, x, memory, memory,
                                  attn_mask=memory_mask,
                                  key_padding_mask=memory_key_padding_mask, need_weights=False,
                                  is_causal=memory_is_causal, cache=cross_cache)

        x = residual(tgt, self_attention, self.norm1, self.dropout1, self.norm_first)
        x = residual(x, cross_attention, self.norm2, self.dropout2, self.norm_first)
        return residual(x, self._feed_forward, self.norm3, self.dropout3, self.norm_first)

    def _feed_forward(self, x: Tensor) -> Tensor:
        return feed_forward(x, self.linear1, self.activation, self.dropout, self.linear2)


@twin_of(TORCH_CLASSES["TransformerDecoder"])
class TransformerDecoder(nn.Module):
    """``torch.nn.TransformerDecoder``: ``num_layers`` copies of ``decoder_layer``, then
    ``norm`` if given; plus incremental decoding (:meth:`new_cache`, ``forward(…, cache=)``).

    ``decoder_layer`` may be this module's :class:`TransformerDecoderLayer`, a
    ``torch.nn.TransformerDecoderLayer`` (converted with its weights), or any other layer
    module called with torch.nn's layer arguments (a subclass, say), cloned as it is.
    """

    def __init__(
        self,
        decoder_layer: TransformerDecoderLayer | nn.TransformerDecoderLayer,
        num_layers: int,
        norm: nn.Module | None = None,
    ) -> None:
        super().__init__()
        if type(decoder_layer) is TransformerDecoderLayer.torch_class:  # converted
            decoder_layer = TransformerDecoderLayer.from_torch(decoder_layer)
        elif not isinstance(decoder_layer, nn.Module):  # any other layer is cloned as it is
            raise TypeError("decoder_layer: expected a TransformerDecoderLayer module, got "
                            f"{type(decoder_layer).__name__}")
        self.layers = clones(decoder_layer, num_layers)
        self.num_layers = num_layers
        self.norm = norm

    @classmethod
    def from_torch(cls, module: nn.TransformerDecoder) -> TransformerDecoder:
        """This class with the layers (each converted, or copied if it is not torch.nn's
        own), norm, mode and ``requires_grad`` of ``module``, a
        ``torch.nn.TransformerDecoder`` (exactly)."""
        check_exact_type("module", module, cls.torch_class)
        return _rebuild_stack(module, cls)

    def to_torch(self) -> nn.TransformerDecoder:
        """The ``torch.nn.TransformerDecoder`` with this decoder's layers and norm."""
        return _rebuild_stack(self, self.torch_class)

    def new_cache(self) -> DecoderCache:
        """An empty cache for ``forward(…, cache=)``, one :class:`LayerCache` per layer."""
        return DecoderCache([layer.new_cache() for layer in self.layers])

    @torch_errors
    def forward(
        self,
        tgt: Tensor,
        memory: Tensor,
        tgt_mask: Tensor | None = None,
        memory_mask: Tensor | None = None,
        tgt_key_padding_mask: Tensor | None = None,
        memory_key_padding_mask: Tensor | None = None,
        tgt_is_causal: bool | None = None,
        memory_is_causal: bool = False,
        *,
        cache: DecoderCache | None = None,
    ) -> Tensor:
        """Shapes as for :class:`TransformerDecoderLayer`. ``tgt_is_causal=None`` detects a
        causal ``tgt_mask``, as torch.nn does.

        With a ``cache`` (from :meth:`new_cache`), ``tgt`` holds only the new positions and
        the output is theirs; step by step it equals a full causal pass (see
        :meth:`TransformerDecoderLayer.forward` for the masks).
        """
        attention = self.layers[0].self_attn
        check_layer_input("tgt", tgt, attention.embed_dim, attention.batch_first)
        if cache is not None and len(cache.layers) != len(self.layers):
            raise ValueError(f"cache: expected a cache of {len(self.layers)} layers (from this "
                             f"decoder's new_cache()), got {len(cache.layers)}")
        length = tgt.shape[1 if attention.batch_first and tgt.dim() == 3 else 0]
        tgt_is_causal = is_causal_mask(tgt_mask, tgt_is_causal, length)
        x = tgt
        for i, layer in enumerate(self.layers):
            x = layer(x, memory, tgt_mask=tgt_mask, memory_mask=memory_mask,
                      tgt_key_padding_mask=tgt_key_padding_mask,
                      memory_key_padding_mask=memory_key_padding_mask,
                      tgt_is_causal=tgt_is_causal, memory_is_causal=memory_is_causal,
                      cache=None if cache is None else cache.layers[i])
        return self.norm(x) if self.norm is not None else x


def _rebuild_stack(source: nn.Module, twin_class: type) -> nn.Module:
    """A decoder stack as ``twin_class``, each layer converted or copied as it is."""
    layers = [convert_part(layer) for layer in source.layers]
    twin = twin_class(layers[0], len(layers), copy.deepcopy(source.norm))
    twin.layers = nn.ModuleList(layers)
    return finish(source, twin)
