"""Positional encodings: where each token sits.

Letter key: ``b`` batch, ``h`` heads, ``n`` length, ``d`` features.

- :class:`SinusoidalPositionalEncoding`: the fixed sin/cos table of "Attention Is All You
  Need", added to the input.
- :class:`LearnedPositionalEncoding`: a trained vector per position, added to the input.
- :class:`RotaryEmbedding`: rotates queries and keys inside attention by an angle that
  grows with the position, so ``q·k`` depends on the distance between them.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from ._checks import (
    check_choice,
    check_positive_int,
    check_positive_number,
    check_probability,
    check_size,
    check_tensor,
    shape_of,
)

__all__ = [
    "POSITIONAL_ENCODINGS",
    "LearnedPositionalEncoding",
    "RotaryEmbedding",
    "SinusoidalPositionalEncoding",
    "apply_rotary",
    "build_positional_encoding",
    "sinusoid_table",
]

POSITIONAL_ENCODINGS = ("sinusoidal", "learned", "rotary", None)


def sinusoid_table(length: int, d_model: int, *, offset: int = 0, base: float = 10000.0) -> Tensor:
    """The ``(length, d_model)`` table of the paper.

    ``pe[p, 2i] = sin(p / base^(2i/d_model))`` and ``pe[p, 2i+1] = cos(p / base^(2i/d_model))``
    for positions ``p = offset … offset + length - 1``.
    """
    position = torch.arange(offset, offset + length, dtype=torch.float64).unsqueeze(1)
    inv_freq = base ** (-torch.arange(0, d_model, 2, dtype=torch.float64) / d_model)
    angles = position * inv_freq  # (n, ceil(d/2))
    table = torch.zeros(length, d_model, dtype=torch.float64)
    table[:, 0::2] = torch.sin(angles)
    table[:, 1::2] = torch.cos(angles[:, : d_model // 2])
    return table.float()


def _check_input(module: nn.Module, x: Tensor, offset: int) -> None:
    check_tensor("x", x, [3], f"(batch, length, d_model={module.d_model})")
    check_size("x", x, -1, module.d_model, "d_model")
    if isinstance(offset, bool) or not isinstance(offset, int) or offset < 0:
        raise ValueError(f"offset: expected a non-negative int, got {offset!r}")


def refill_(buffer: Tensor, compute: Callable[[], Tensor]) -> None:
    """Write what ``compute()`` gives (made on the CPU, whatever the default device) into
    ``buffer`` in place, as its storage may be shared; also when the buffer was made under
    ``torch.inference_mode``. A tensor subclass (a DTensor, say) is left as it is."""
    if type(buffer) is not Tensor:
        return
    with torch.device("cpu"):
        values = compute()
    with torch.no_grad(), torch.inference_mode(buffer.is_inference()):
        buffer.copy_(values)


class SinusoidalPositionalEncoding(nn.Module):
    """Adds the fixed sinusoid table to ``x``, then dropout.

    The table is precomputed for ``max_len`` positions and computed on the fly beyond them
    (a fixed function of the position extends to any length). Under torch.compile and
    torch.export it is always computed on the fly: a branch on the length would tie the
    compiled or exported program to one side of ``max_len``.

    Shape:
        x: ``(batch, length, d_model)`` → same shape.
    """

    def __init__(self, d_model: int, max_len: int = 1024, dropout: float = 0.0) -> None:
        super().__init__()
        self.d_model = check_positive_int("d_model", d_model)
        self.max_len = check_positive_int("max_len", max_len)
        self.dropout = nn.Dropout(check_probability("dropout", dropout))
        self.register_buffer("pe", sinusoid_table(max_len, d_model), persistent=False)

    def reset_parameters(self) -> None:
        """Compute the table again, in place, in its dtype and on its device."""
        refill_(self.pe, lambda: sinusoid_table(self.max_len, self.d_model))

    def _apply(self, fn: Callable[[Tensor], Tensor],
               recurse: bool = True) -> SinusoidalPositionalEncoding:
        """After ``.to()``, ``.half()`` and the like, and ``to_empty()``, the table is computed
        again where it now lives: a model built on the meta device and given storage by
        ``to_empty`` would otherwise add whatever memory held, and no state dict carries the
        table to mend it."""
        super()._apply(fn, recurse)
        self.reset_parameters()
        return self

    def forward(self, x: Tensor, offset: int = 0) -> Tensor:
        """``x`` plus the encoding of positions ``offset … offset + length - 1``."""
        _check_input(self, x, offset)
        length = x.shape[1]
        if not torch.compiler.is_compiling() and offset + length <= self.max_len:
            pe = self.pe[offset : offset + length]
        else:
            pe = sinusoid_table(length, self.d_model, offset=offset).to(self.pe.device)
        return self.dropout(x + pe.to(x.dtype))

    def extra_repr(self) -> str:
        return f"d_model={self.d_model}, max_len={self.max_len}"


class LearnedPositionalEncoding(nn.Module):
    """Adds a trained ``(max_len, d_model)`` position table to ``x``, then dropout.

    Shape:
        x: ``(batch, length, d_model)`` with ``length ≤ max_len`` → same shape.
    """

    def __init__(self, d_model: int, max_len: int = 1024, dropout: float = 0.0) -> None:
        super().__init__()
        self.d_model = check_positive_int("d_model", d_model)
        self.max_len = check_positive_int("max_len", max_len)
        self.dropout = nn.Dropout(check_probability("dropout", dropout))
        self.weight = nn.Parameter(torch.empty(max_len, d_model))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.normal_(self.weight, std=0.02)

    def forward(self, x: Tensor, offset: int = 0) -> Tensor:
        """``x`` plus the learned encoding of positions ``offset … offset + length - 1``."""
        _check_input(self, x, offset)
        length = x.shape[1]
        if offset + length > self.max_len:
            raise ValueError(
                f"x: expected at most max_len={self.max_len} positions (offset {offset} + "
                f"length), got shape {shape_of(x)}; construct the encoding with a larger max_len"
            )
        return self.dropout(x + self.weight[offset : offset + length].to(x.dtype))

    def extra_repr(self) -> str:
        return f"d_model={self.d_model}, max_len={self.max_len}"


def rotate_half(x: Tensor) -> Tensor:
    """``(x1, x2) -> (-x2, x1)`` on the two halves of the last dimension."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate each pair ``(x[k], x[k + d/2])`` by the angle whose cos and sin are given.

    Shape:
        x: ``(b, h, n, d)``; cos, sin: ``(n, d)``.
    """
    return x * cos.to(x.dtype) + rotate_half(x) * sin.to(x.dtype)


class RotaryEmbedding(nn.Module):
    """Rotary position embedding (RoFormer), applied to queries and keys in attention.

    Pairs ``(x[k], x[k + d_head/2])`` are rotated by ``position · base^(-2k/d_head)``
    (the GPT-NeoX layout), so the score of a query and a key depends on their distance.

    Shape:
        x: ``(batch, heads, length, d_head)`` → same shape.
    """

    def __init__(self, d_head: int, base: float = 10000.0) -> None:
        super().__init__()
        self.d_head = check_positive_int("d_head", d_head)
        if d_head % 2:
            raise ValueError(f"d_head: rotary embeddings need an even d_head, got {d_head}")
        self.base = check_positive_number("base", base)
        self.register_buffer("inv_freq", self._inverse_frequencies(None), persistent=False)

    def _inverse_frequencies(self, device: torch.device | None) -> Tensor:
        """``base^(-2k/d_head)``, ``(d_head / 2,)``, in float32."""
        exponents = torch.arange(0, self.d_head, 2, dtype=torch.float32, device=device)
        return self.base ** (-exponents / self.d_head)

    def reset_parameters(self) -> None:
        """Compute the frequencies again, in float32, on their device."""
        if self.inv_freq.dtype == torch.float32:
            refill_(self.inv_freq, lambda: self._inverse_frequencies(None))
        else:
            self.inv_freq = self._inverse_frequencies(self.inv_freq.device)

    def _apply(self, fn: Callable[[Tensor], Tensor], recurse: bool = True) -> RotaryEmbedding:
        """``.to(dtype)``, ``.half()``, … leave the frequencies in float32 (in bfloat16 a
        position of 8,000 would be off by about half a radian), and ``to_empty()`` leaves
        them computed, not whatever memory held (no state dict carries them)."""
        super()._apply(fn, recurse)
        self.reset_parameters()
        return self

    def cos_sin(self, length: int, offset: int = 0) -> tuple[Tensor, Tensor]:
        """The cos and sin of the rotation angles of positions ``offset … offset + length -
        1``, each ``(length, d_head)``: computed once, they serve queries and keys of every
        layer (see :func:`apply_rotary`)."""
        position = torch.arange(offset, offset + length, device=self.inv_freq.device)
        angles = position.float().unsqueeze(-1) * self.inv_freq  # (n, d/2)
        angles = torch.cat((angles, angles), dim=-1)  # (n, d)
        return angles.cos(), angles.sin()

    def forward(self, x: Tensor, offset: int = 0) -> Tensor:
        """Rotate ``x`` as if its positions were ``offset … offset + length - 1``."""
        check_tensor("x", x, [4], f"(batch, heads, length, d_head={self.d_head})")
        check_size("x", x, -1, self.d_head, "d_head")
        return apply_rotary(x, *self.cos_sin(x.shape[-2], offset))

    def extra_repr(self) -> str:
        return f"d_head={self.d_head}, base={self.base:g}"


def build_positional_encoding(
    positional: str | None, d_model: int, max_len: int, dropout: float
) -> nn.Module | None:
    """The additive encoding named by ``positional``; ``None`` for ``"rotary"`` and ``None``.

    Rotary embeddings act inside attention, so the layers build them, not the embedding.
    """
    check_choice("positional", positional, POSITIONAL_ENCODINGS)
    if positional == "sinusoidal":
        return SinusoidalPositionalEncoding(d_model, max_len, dropout)
    if positional == "learned":
        return LearnedPositionalEncoding(d_model, max_len, dropout)
    return None

