"""ALiBi: attention with linear biases (Press et al., 2022), in place of position encodings.

Head ``h`` adds ``-m_h · |i - j|`` to the score of query position ``i`` and key position
``j``: a penalty growing with the distance, steeper for heads with a larger slope ``m_h``.

Letter key: ``h`` heads, ``i`` query positions, ``j`` key positions.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ._checks import check_positive_int

__all__ = ["alibi_bias", "alibi_slopes"]


def _power_of_two_slopes(n_heads: int) -> list[float]:
    start = 2.0 ** (-8.0 / n_heads)  # 2^(-8/n), the paper's first slope and ratio
    return [start ** (h + 1) for h in range(n_heads)]


def alibi_slopes(n_heads: int) -> Tensor:
    """The ``(n_heads,)`` float32 slopes ``m_h`` of the reference implementation.

    For ``n_heads`` a power of two: the geometric sequence that starts at ``2^(-8/n)`` with
    that ratio. Otherwise the slopes of the nearest smaller power of two, then the first
    missing ones taken from every other slope of the next power of two.
    """
    check_positive_int("n_heads", n_heads)
    if n_heads & (n_heads - 1) == 0:
        return torch.tensor(_power_of_two_slopes(n_heads))
    closest = 2 ** math.floor(math.log2(n_heads))
    extra = alibi_slopes(2 * closest)[0::2][: n_heads - closest]
    return torch.cat((alibi_slopes(closest), extra))


def alibi_bias(slopes: Tensor, q_len: int, k_len: int, dtype: torch.dtype | None = None
               ) -> Tensor:
    """The ``(h, i, j)`` biases ``-m_h · |i - j|``, query positions aligned to the last key.

    As :func:`attention.functional.causal_mask` places them: query ``i`` sits at position
    ``k_len - q_len + i``, so the newest queries of a key/value cache are the last positions.
    """
    q_pos = torch.arange(q_len, device=slopes.device) + (k_len - q_len)
    k_pos = torch.arange(k_len, device=slopes.device)
    distance = (q_pos[:, None] - k_pos[None, :]).abs().to(slopes.dtype)  # (i, j)
    bias = -slopes[:, None, None] * distance  # (h, 1, 1) * (i, j) -> (h, i, j)
    return bias if dtype is None else bias.to(dtype)
