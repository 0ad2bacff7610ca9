"""The numeric precision of the application's forward passes, decided in one place.

The policy: on CUDA, forward passes run under ``torch.autocast`` in bfloat16 (matrix products
and attention in bf16; autocast keeps softmax, norms and reductions in float32, and the loss
is taken in float32 by :func:`attention.translation.training.sequence_loss`); on the CPU
they run in float32, without autocast. bfloat16 has float32's exponent range, so no loss
scaling is needed. Training (its steps and its evaluation) and the translator both use
:func:`autocast`.
"""

from __future__ import annotations

import contextlib

import torch

__all__ = ["autocast"]


def autocast(device: torch.device) -> contextlib.AbstractContextManager:
    """The autocast context for forward passes on ``device``: bf16 on CUDA, none on the CPU."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
