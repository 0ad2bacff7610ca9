"""Saving a matplotlib figure as a PNG, whole or not at all."""

from __future__ import annotations

import os
from pathlib import Path

from matplotlib.figure import Figure

from .files import write_atomic

__all__ = ["DPI", "save_png"]

DPI = 110


def save_png(fig: Figure, path: str | os.PathLike) -> Path:
    """Write ``fig`` to ``path`` as a PNG atomically, creating parent directories."""
    return write_atomic(path, lambda file: fig.savefig(file, format="png", dpi=DPI,
                                                       bbox_inches="tight"))
