"""The clock of every benchmark: how long one call takes on a device.

On the CPU, ``time.perf_counter`` around the call. On CUDA, whose calls only queue work, the
queue is drained first (``torch.cuda.synchronize``) and the call is timed by two CUDA events
recorded around it, waited for: the GPU's own clock, with the launch overhead in it.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, TypeVar

import torch

__all__ = ["timed", "timed_call"]

T = TypeVar("T")


def timed_call(fn: Callable[[], T], device: torch.device | str = "cpu") -> tuple[float, T]:
    """Seconds that ``fn()`` takes on ``device``, and what it returned."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        start.record()
        result = fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1000, result
    start_time = time.perf_counter()
    result = fn()
    return time.perf_counter() - start_time, result


def timed(fn: Callable[[], Any], device: torch.device | str = "cpu") -> float:
    """Seconds that ``fn()`` takes on ``device`` (see :func:`timed_call`)."""
    return timed_call(fn, device)[0]
