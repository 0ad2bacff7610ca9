"""Padded batches computed as packed real tokens.

A batch padded to ``(b, n, d)`` with a ``key_padding_mask`` holds ``t`` real tokens. The
per-token work of a Transformer layer (projections, feed-forward, LayerNorm, residuals) gives
the same result on the ``(t, d)`` rows of the real tokens as on the whole padded batch, for
``t / (b·n)`` of the cost: gather the real tokens once, compute, scatter them back at the end.
Only attention needs the sequences: it runs on the padded layout over real keys only, or,
on a GPU, on the packed rows with a variable-length kernel.

Letter key: ``b`` batch, ``n`` length, ``t`` real tokens in the batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from ._checks import shape_of

__all__ = ["Packing"]


@dataclass(frozen=True)
class Packing:
    """Where the real tokens of a padded batch are, and how to gather and scatter them.

    Attributes:
        key_padding_mask: ``(b, n)`` boolean, ``True`` at padding (torch.nn's convention).
        index: ``(t,)`` positions of the real tokens in the flattened ``(b·n)`` batch, in
            order, so each sequence's tokens are consecutive rows of the packed tensor.
        cu_seqlens: ``(b + 1,)`` int32, where each sequence's rows start (and the last ends).
    """

    key_padding_mask: Tensor
    index: Tensor
    cu_seqlens: Tensor

    @classmethod
    def from_mask(cls, key_padding_mask: Tensor) -> Packing:
        """The packing of a ``(b, n)`` boolean mask, ``True`` at padding."""
        if not isinstance(key_padding_mask, Tensor):
            raise TypeError("key_padding_mask: expected a bool Tensor (batch, length), got "
                            f"{type(key_padding_mask).__name__}")
        if key_padding_mask.dim() != 2:
            raise ValueError("key_padding_mask: expected a 2-D (batch, length) mask, got shape "
                             f"{shape_of(key_padding_mask)}")
        if key_padding_mask.dtype != torch.bool:
            raise TypeError("key_padding_mask: expected dtype torch.bool to pack a batch "
                            f"(True = padding), got {key_padding_mask.dtype}")
        real = ~key_padding_mask
        index = real.flatten().nonzero().squeeze(1)  # (t,)
        cu_seqlens = F.pad(real.sum(dim=1).cumsum(dim=0), (1, 0)).to(torch.int32)
        return cls(key_padding_mask, index, cu_seqlens)

    @property
    def batch(self) -> int:
        return self.key_padding_mask.shape[0]

    @property
    def length(self) -> int:
        return self.key_padding_mask.shape[1]

    @property
    def tokens(self) -> int:
        return self.index.shape[0]

    def max_seqlen(self) -> int:
        """The longest sequence's real tokens (a device-to-host copy on a GPU)."""
        return int((self.cu_seqlens[1:] - self.cu_seqlens[:-1]).max()) if self.batch else 0

    def pack(self, x: Tensor) -> Tensor:
        """``(b, n, ...)`` → ``(t, ...)``: the real tokens' rows."""
        return x.flatten(0, 1).index_select(0, self.index)

    def unpack(self, x: Tensor) -> Tensor:
        """``(t, ...)`` → ``(b, n, ...)``: the rows back in place, zeros at padding."""
        padded = x.new_zeros((self.batch * self.length, *x.shape[1:]))
        # In place into the fresh zeros: the out-of-place index_copy would copy them first.
        return padded.index_copy_(0, self.index, x).unflatten(0, (self.batch, self.length))
