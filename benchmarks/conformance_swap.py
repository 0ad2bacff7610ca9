"""A pytest plugin that puts ``attention.compat``'s classes where torch.nn's were.

Loaded with ``-p conformance_swap`` (``benchmarks/`` and the folder holding ``attention``
on ``PYTHONPATH``), it is imported while pytest reads its options, before any test module
is collected, so ``from torch.nn import MultiheadAttention`` and ``nn.TransformerEncoder(...)``
in a test file both get ours. Each of ``SWAPPABLE`` that ``attention.compat`` defines replaces
torch's class under ``torch.nn``, ``torch.nn.modules``, ``torch.nn.modules.activation`` and
``torch.nn.modules.transformer``, in each of those namespaces that has the name already (so
torch's own classes left in place, a decoder built inside torch's ``Transformer`` say, also
build ours). Names compat does not define yet stay torch's.

``benchmarks/conformance.py`` runs PyTorch's tests with and without it. Which names were
swapped is printed in pytest's header and, when ``CONFORMANCE_SWAP_RECORD`` names a file,
written there as a JSON list.
"""

from __future__ import annotations

import importlib
import json
import os
from pathlib import Path
from types import ModuleType

SWAPPABLE = (
    "MultiheadAttention",
    "TransformerEncoderLayer",
    "TransformerEncoder",
    "TransformerDecoderLayer",
    "TransformerDecoder",
    "Transformer",
)
NAMESPACES = (
    "torch.nn",
    "torch.nn.modules",
    "torch.nn.modules.activation",
    "torch.nn.modules.transformer",
)
RECORD_VARIABLE = "CONFORMANCE_SWAP_RECORD"


def available_replacements(compat: ModuleType) -> dict[str, type]:
    """The classes of ``SWAPPABLE`` that ``compat`` defines, by name, in ``SWAPPABLE``'s order."""
    found = {name: getattr(compat, name, None) for name in SWAPPABLE}
    return {name: cls for name, cls in found.items() if isinstance(cls, type)}


def swap_into(namespace: ModuleType, replacements: dict[str, type]) -> list[str]:
    """Replace the names ``namespace`` already has; return those replaced."""
    replaced = [name for name in replacements if hasattr(namespace, name)]
    for name in replaced:
        setattr(namespace, name, replacements[name])
    return replaced


def swap_all(replacements: dict[str, type]) -> dict[str, list[str]]:
    """Swap ``replacements`` into every namespace of ``NAMESPACES``: namespace → names."""
    return {
        module_name: swap_into(importlib.import_module(module_name), replacements)
        for module_name in NAMESPACES
    }


def record(names: list[str], destination: str | None) -> None:
    if destination:
        Path(destination).write_text(json.dumps(names) + "\n")


def describe(names: list[str]) -> str:
    kept = [name for name in SWAPPABLE if name not in names]
    return (f"conformance swap: attention.compat's {', '.join(names) or 'nothing'}; "
            f"torch.nn's own {', '.join(kept) or 'nothing'}")


REPLACEMENTS = available_replacements(importlib.import_module("attention.compat"))
SWAPPED = list(REPLACEMENTS)
swap_all(REPLACEMENTS)
record(SWAPPED, os.environ.get(RECORD_VARIABLE))
print(describe(SWAPPED), flush=True)


def pytest_report_header(config) -> str:
    return describe(SWAPPED)
