"""The work of one cell: its input, the dense or padded case (masks and loss weights), and
the FLOPs that shape costs.

Shapes: ``B`` batch, ``L`` length, ``d`` ``d_model``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from .config import BenchConfig

__all__ = ["Case", "encoder_flops", "make_case", "make_input", "padding_lengths",
           "padding_mask"]


def window_keys(length: int, window: int) -> int:
    """The (query, key) pairs of one sequence within ``window`` positions of each other."""
    def one_side(n: int) -> int:  # Σ_i min(i, window) for i < n
        if n - 1 <= window:
            return n * (n - 1) // 2
        return window * (window + 1) // 2 + (n - 1 - window) * window

    return 2 * one_side(length) + length


def encoder_flops(d_model: int, n_layers: int, d_ff: int, batch: int, length: int,
                  real_tokens: int | None = None, training: bool = False, *,
                  seq_lengths: Sequence[int] | None = None, window: int | None = None) -> int:
    """Floating-point operations of an encoder's matmuls (a multiply-add is 2), per run.

    Per layer: the four ``d × d`` projections and the feed-forward,
    ``2·tokens·(4·d² + 2·d·d_ff)``, and attention (``q·kᵀ`` and ``weights·v``),
    ``4·d·Σ lᵢ²``. Dense: ``tokens = batch·length`` and every ``lᵢ = length``. Padded (pass
    ``real_tokens`` and ``seq_lengths``): only the useful work, real tokens for the matmuls
    and each sequence's own length for attention. Training counts 3× the forward (the
    backward computes two products per forward one). LayerNorms, softmax and the activation
    are left out. With a sliding ``window`` (``w`` keys on each side), attention counts the
    keys inside it, ``4·d·Σ keys``, not what blocked attention computes around it.
    """
    if seq_lengths is None:
        seq_lengths = [length] * batch
    if len(seq_lengths) != batch or any(not 0 <= n <= length for n in seq_lengths):
        raise ValueError(f"seq_lengths: expected {batch} lengths in [0, {length}], got "
                         f"{list(seq_lengths)}")
    tokens = batch * length if real_tokens is None else real_tokens
    projections = 2 * tokens * (4 * d_model**2 + 2 * d_model * d_ff)
    attention = 4 * d_model * sum(n * n if window is None else window_keys(n, window)
                                  for n in seq_lengths)
    forward = n_layers * (projections + attention)
    return 3 * forward if training else forward


def padding_lengths(batch: int, length: int, padding: float = 0.25) -> list[int]:
    """Sequence lengths spread evenly from ``length·(1 - 2·padding)`` to ``length`` whose sum
    is ``(1 - padding)·batch·length`` (rounded; one sequence: that length alone)."""
    total = round((1 - padding) * batch * length)
    if batch == 1:
        return [max(1, total)]
    low = length * (1 - 2 * padding)
    exact = [low + (length - low) * i / (batch - 1) for i in range(batch)]
    lengths = [min(length, max(1, round(n))) for n in exact]
    # Rounding moves the total by a few tokens: give them back where rounding took most.
    missing = total - sum(lengths)
    order = sorted(range(batch), key=lambda i: lengths[i] - exact[i], reverse=missing < 0)
    for i in order:
        if missing == 0:
            break
        step = 1 if missing > 0 else -1
        if 1 <= lengths[i] + step <= length:
            lengths[i] += step
            missing -= step
    return lengths


def padding_mask(batch: int, length: int, padding: float = 0.25,
                 device: torch.device | str | None = None) -> tuple[Tensor, list[int]]:
    """A ``(batch, length)`` key padding mask, ``True`` at padding (right padding), and the
    sequence lengths (:func:`padding_lengths`)."""
    lengths = padding_lengths(batch, length, padding)
    positions = torch.arange(length, device=device)
    mask = positions[None, :] >= torch.tensor(lengths, device=device)[:, None]  # (B, L)
    return mask, lengths


@dataclass
class Case:
    """The masks of one case and the weights of the training loss.

    ``key_padding_mask``: ``(B, L)``, ``True`` at padding, ``None`` when dense.
    ``keep_mask``: its negation (x-transformers' meaning), made once outside the timing.
    ``loss_weight``: ``(B, L, 1)`` float32, ``1 / (real tokens · d_model)`` at real
    positions and 0 at padding, so ``(out² · loss_weight).sum()`` is the mean square over
    real positions, without a boolean index (which would synchronize a GPU).
    """

    name: str
    seq_lengths: list[int]
    key_padding_mask: Tensor | None
    keep_mask: Tensor | None
    loss_weight: Tensor

    @property
    def real_tokens(self) -> int:
        return sum(self.seq_lengths)


def make_case(name: str, batch: int, length: int, d_model: int, padding: float,
              device: torch.device | str) -> Case:
    """The ``dense`` or ``padded`` case for ``(batch, length)`` inputs on ``device``."""
    if name == "dense":
        mask, lengths = None, [length] * batch
        real = torch.ones(batch, length, device=device)
    else:
        mask, lengths = padding_mask(batch, length, padding, device)
        real = (~mask).float()
    weight = (real / (sum(lengths) * d_model)).unsqueeze(-1)  # (B, L, 1)
    return Case(name, lengths, mask, None if mask is None else ~mask, weight)


def make_input(config: BenchConfig, length: int, device: torch.device | str,
               dtype: torch.dtype) -> Tensor:
    """Seeded ``(batch, length, d_model)`` normal input, the same for every contender."""
    generator = torch.Generator().manual_seed(config.seed + length)
    x = torch.randn(config.batch, length, config.d_model, generator=generator)
    return x.to(device=device, dtype=dtype)
