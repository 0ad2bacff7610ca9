"""Checks of the numbers a benchmark is given, with messages that name the argument and show
what was expected and what came: ``rounds: expected a positive int, got 0``.

``check_positive`` is for functions; ``positive_int``, ``non_negative_int``,
``positive_float`` and ``fraction`` are argparse ``type=`` converters, whose errors argparse
prefixes with the flag (``argument --rounds: expected a positive int, got 0``);
``benchmark_parser`` starts a script's parser with the flags most benchmarks share.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

__all__ = ["benchmark_parser", "check_positive", "fraction", "non_negative_int",
           "positive_float", "positive_int"]


def check_positive(name: str, value: object) -> int:
    """``value`` if it is an int ≥ 1 (not a bool), else ``ValueError`` naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name}: expected a positive int, got {value!r}")
    return value


def _number(text: str, kind: type, expected: str, accept) -> int | float:
    try:
        value = kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}") from None
    if not accept(value):
        raise argparse.ArgumentTypeError(f"expected {expected}, got {text}")
    return value


def positive_int(text: str) -> int:
    return _number(text, int, "a positive int", lambda v: v >= 1)


def non_negative_int(text: str) -> int:
    return _number(text, int, "an int ≥ 0", lambda v: v >= 0)


def positive_float(text: str) -> float:
    return _number(text, float, "a number > 0", lambda v: v > 0)


def fraction(text: str) -> float:
    return _number(text, float, "a fraction in [0, 1)", lambda v: 0 <= v < 1)


def benchmark_parser(doc: str, *, rounds: int | None = None,
                     out: str | os.PathLike | None = None,
                     out_help: str = "results path, without suffix") -> argparse.ArgumentParser:
    """A parser described by the first paragraph of ``doc`` (a script's docstring), with
    ``--rounds`` (a positive int; default ``rounds``) and ``--out`` (a path; default
    ``out``) when their defaults are given."""
    parser = argparse.ArgumentParser(description=" ".join(doc.split("\n\n")[0].split()))
    if rounds is not None:
        parser.add_argument("--rounds", type=positive_int, default=rounds,
                            help="alternated rounds (default: %(default)s)")
    if out is not None:
        parser.add_argument("--out", type=Path, default=Path(out), help=out_help)
    return parser
