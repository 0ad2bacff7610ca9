"""Padded batches computed as packed real tokens.

A batch padded to ``(b, n, d)`` with a ``key_padding_mask`` holds ``t`` real tokens. The
per-token work of a Transformer layer (projections, feed-forward, LayerNorm, residuals) gives
the same result on the ``(t, d)`` rows of the real tokens as on the whole padded batch, for
``t / (b·n)`` of the cost: gather the real tokens once, compute, scatter them back at the end.
Only attention needs the sequences: it runs on the padded layout over real keys only, or,
on a GPU, on the packed rows with a variable-length kernel.

Document masking is the same idea with other sequences: several documents packed back to
back in one row (:meth:`Packing.from_documents`) attend only within their own document. On
a GPU the variable-length kernel takes their boundaries (``cu_seqlens``); elsewhere the
documents are laid out one per row, ``(s, m)``, and attend there: block-diagonal attention,
costing ``Σ lᵢ · m``, not the row's ``n²``.

Letter key: ``b`` batch, ``n`` length, ``t`` real tokens in the batch, ``s`` sequences
attention runs over (the rows, or the documents), ``m`` the longest of them.
"""

from __future__ import annotations

import functools
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
        cu_seqlens: ``(s + 1,)`` int32, where each sequence's rows start (and the last ends).
        sequence_index: ``(t,)`` where each real token sits in the flattened ``(s·m)``
            layout attention runs on; ``None`` when the sequences are the rows.
        sequence_padding_mask: ``(s, m)`` boolean, ``True`` past each sequence's end;
            ``None`` when the sequences are the rows.
    """

    key_padding_mask: Tensor
    index: Tensor
    cu_seqlens: Tensor
    sequence_index: Tensor | None = None
    sequence_padding_mask: Tensor | None = None

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

    @classmethod
    def from_documents(cls, document_ids: Tensor, key_padding_mask: Tensor | None = None
                       ) -> Packing:
        """The packing of documents packed back to back in the rows of a batch.

        ``document_ids`` ``(b, n)``, integers: each maximal run of one id in a row is a
        document, which attends only within itself (an id met again after another starts a
        new document). ``key_padding_mask`` ``(b, n)`` boolean, ``True`` at padding (``None``:
        none), leaves padded positions out of every document: a document's positions count
        its real tokens, so padding inside one is no position (on the padded path it is).
        """
        if not isinstance(document_ids, Tensor) or document_ids.dim() != 2 \
                or document_ids.dtype.is_floating_point or document_ids.dtype == torch.bool:
            got = (f"{type(document_ids).__name__}" if not isinstance(document_ids, Tensor)
                   else f"shape {shape_of(document_ids)}, dtype {document_ids.dtype}")
            raise TypeError(f"document_ids: expected an integer Tensor (batch, length), got "
                            f"{got}")
        if key_padding_mask is None:
            key_padding_mask = torch.zeros_like(document_ids, dtype=torch.bool)
        rows = cls.from_mask(key_padding_mask)
        if key_padding_mask.shape != document_ids.shape:
            raise ValueError(f"document_ids: expected the shape of key_padding_mask "
                             f"{shape_of(key_padding_mask)}, got {shape_of(document_ids)}")
        index = rows.index
        tokens = index.shape[0]
        ids = document_ids.flatten().index_select(0, index)  # (t,)
        row = index // document_ids.shape[1]
        starts = torch.ones(tokens, dtype=torch.bool, device=index.device)
        starts[1:] = (ids[1:] != ids[:-1]) | (row[1:] != row[:-1])
        sequence = starts.cumsum(0) - 1  # (t,) which document each token is in
        count = int(sequence[-1]) + 1 if tokens else 0
        lengths = torch.bincount(sequence, minlength=count)  # (s,)
        cu_seqlens = F.pad(lengths.cumsum(0), (1, 0)).to(torch.int32)
        position = torch.arange(tokens, device=index.device) - cu_seqlens[sequence]
        longest = int(lengths.max()) if count else 0
        padding = torch.arange(longest, device=index.device) >= lengths[:, None]  # (s, m)
        return cls(key_padding_mask, index, cu_seqlens, sequence * longest + position,
                   padding)

    @functools.cached_property
    def contiguous(self) -> bool:
        """Whether each sequence's real tokens are next to each other in its row (no padding
        between two of them), so that a position counted among the real tokens is the
        position in the row. Documents always are. Read from the mask once (a host sync)."""
        if self.sequence_index is not None:
            return True
        real = ~self.key_padding_mask
        runs = real[:, :1].long() + (real[:, 1:] & ~real[:, :-1]).sum(dim=1, keepdim=True)
        return bool((runs <= 1).all())

    @property
    def sequences(self) -> int:
        """``s``: how many sequences attention runs over (the rows, or the documents)."""
        return self.cu_seqlens.shape[0] - 1

    @property
    def sequence_length(self) -> int:
        """``m``: the length of the layout attention runs on (``n`` for rows)."""
        if self.sequence_padding_mask is None:
            return self.length
        return self.sequence_padding_mask.shape[1]

    @property
    def attention_padding_mask(self) -> Tensor:
        """``(s, m)``: the padding of the layout attention runs on."""
        if self.sequence_padding_mask is None:
            return self.key_padding_mask
        return self.sequence_padding_mask

    def to_sequences(self, x: Tensor) -> Tensor:
        """``(t, ...)`` → ``(s, m, ...)``: each sequence in a row of its own, zeros after."""
        if self.sequence_index is None:
            return self.unpack(x)
        padded = x.new_zeros((self.sequences * self.sequence_length, *x.shape[1:]))
        return padded.index_copy_(0, self.sequence_index, x).unflatten(
            0, (self.sequences, self.sequence_length))

    def from_sequences(self, x: Tensor) -> Tensor:
        """``(s, m, ...)`` → ``(t, ...)``: the tokens of :meth:`to_sequences` back."""
        if self.sequence_index is None:
            return self.pack(x)
        return x.flatten(0, 1).index_select(0, self.sequence_index)

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
        return int((self.cu_seqlens[1:] - self.cu_seqlens[:-1]).max()) if self.sequences else 0

    def pack(self, x: Tensor) -> Tensor:
        """``(b, n, ...)`` → ``(t, ...)``: the real tokens' rows."""
        return x.flatten(0, 1).index_select(0, self.index)

    def unpack(self, x: Tensor) -> Tensor:
        """``(t, ...)`` → ``(b, n, ...)``: the rows back in place, zeros at padding."""
        padded = x.new_zeros((self.batch * self.length, *x.shape[1:]))
        # In place into the fresh zeros: the out-of-place index_copy would copy them first.
        return padded.index_copy_(0, self.index, x).unflatten(0, (self.batch, self.length))
