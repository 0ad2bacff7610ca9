"""Argument checks shared by every public constructor and forward.

Each check raises ``ValueError`` or ``TypeError`` with a message that names the argument
and shows what was expected and what was received. Checks only read shapes and dtypes,
never tensor values, so they cost nothing at run time and trace cleanly under
``torch.compile``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor


def shape_of(x: Tensor) -> str:
    return str(tuple(int(s) for s in x.shape))


def check_positive_int(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name}: expected a positive int, got {type(value).__name__} {value!r}")
    if value <= 0:
        raise ValueError(f"{name}: expected a positive int, got {value}")
    return value


def check_positive_number(name: str, value: object) -> float:
    """``value`` as a float: a positive, finite number (an int or a float, not a bool)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0 \
            or value == float("inf"):
        raise ValueError(f"{name}: expected a positive finite number, got "
                         f"{type(value).__name__} {value!r}")
    return float(value)


def check_flag(name: str, value: object) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name}: expected True or False, got {type(value).__name__} {value!r}")
    return value


def check_probability(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name}: expected a float in [0, 1), got {type(value).__name__} {value!r}")
    if not 0.0 <= value < 1.0:
        raise ValueError(f"{name}: expected a float in [0, 1), got {value}")
    return float(value)


def check_divisible(d_model: int, n_heads: int) -> int:
    if d_model % n_heads != 0:
        raise ValueError(
            f"d_model: expected a multiple of n_heads={n_heads}, got d_model={d_model} "
            f"(d_model % n_heads = {d_model % n_heads})"
        )
    return d_model // n_heads


def check_tensor(name: str, x: object, ndims: Sequence[int], layout: str) -> Tensor:
    """Check that ``x`` is a floating-point tensor with one of ``ndims`` dimensions."""
    if not isinstance(x, Tensor):
        raise TypeError(f"{name}: expected a Tensor of shape {layout}, got {type(x).__name__}")
    if x.dim() not in ndims:
        raise ValueError(
            f"{name}: expected a {'- or '.join(map(str, ndims))}-D tensor of shape {layout}, "
            f"got shape {shape_of(x)}"
        )
    if not x.is_floating_point():
        raise TypeError(f"{name}: expected a floating-point tensor, got dtype {x.dtype}")
    return x


def check_size(name: str, x: Tensor, dim: int, expected: int, what: str) -> None:
    if x.shape[dim] != expected:
        raise ValueError(
            f"{name}: expected {what}={expected} at dim {dim}, got shape {shape_of(x)}"
        )


def check_mask(name: str, mask: object, expected: Sequence[tuple[int, ...]], layout: str,
               **sizes: int) -> Tensor:
    """Check a boolean or floating-point mask against the exact shapes in ``expected``.

    A shape that merely broadcasts is refused: a wrong-shaped mask is a bug to report, not
    something to stretch silently. ``layout`` is formatted with ``sizes`` only for the error:
    under torch.compile the sizes may be symbolic, and turning one into text would fix the
    compiled graph to that size.
    """
    if not isinstance(mask, Tensor):
        raise TypeError(f"{name}: expected a bool or float Tensor of shape "
                        f"{layout.format(**sizes)}, got {type(mask).__name__}")
    if mask.dtype != torch.bool and not mask.is_floating_point():
        raise TypeError(
            f"{name}: expected dtype torch.bool (True = may not attend) or a floating-point "
            f"dtype (added to the scores), got {mask.dtype}"
        )
    if not any(_same_shape(mask.shape, shape) for shape in expected):
        raise ValueError(f"{name}: expected shape {layout.format(**sizes)}, got "
                         f"{shape_of(mask)}")
    return mask


def _same_shape(shape: Sequence[int], expected: Sequence[int]) -> bool:
    # Size by size: under torch.compile with dynamic shapes the sizes are symbolic, and
    # torch.compile evaluated `tuple(shape) in [tuples]` as False for equal shapes (seen
    # with torch 2.13: "expected (32, 15), got (32, 15)").
    return len(shape) == len(expected) and all(
        a == b for a, b in zip(shape, expected, strict=True))


def check_choice(name: str, value: object, choices: Sequence[object]) -> None:
    if value not in choices:
        raise ValueError(f"{name}: expected one of {list(choices)}, got {value!r}")
