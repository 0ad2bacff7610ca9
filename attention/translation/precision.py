"""The numeric precision of the application's forward passes, decided in one place.

``train.precision`` names it, one of :data:`PRECISIONS`; :func:`resolve_precision` turns the
name into the dtype of ``torch.autocast`` on a device (``None``: float32, no autocast):

============  =============================  ==========================  ===============
setting       CUDA with native bf16           older CUDA (T4, V100)       CPU
              (compute capability ≥ 8.0)
============  =============================  ==========================  ===============
``auto``      bf16                            fp16 + loss scaling         fp32
``fp32``      fp32                            fp32                        fp32
``bf16``      bf16                            bf16 (emulated: slow)       bf16 (slow)
``fp16``      fp16 + loss scaling             fp16 + loss scaling         refused
============  =============================  ==========================  ===============

Under autocast, matrix products and attention run in the 16-bit type while autocast keeps
softmax, norms and reductions in float32, and the loss is taken in float32 by
:func:`attention.translation.loss.sequence_loss`; weights, gradients and the optimizer's
state stay float32. bfloat16 has float32's exponent range and needs no loss scaling. float16
has a narrow one: small gradients underflow to zero, so training scales the loss up before
the backward pass and the gradients down before clipping with a ``torch.amp.GradScaler``
(:func:`grad_scaler`), which skips a step whose gradients overflowed and lowers its scale.
On the CPU fp16 is refused: its autocast is some 70 times slower than float32 there, where
bf16 is about 3 times slower (a ``Linear(256, 256)`` forward and backward on a batch of 64,
measured with torch 2.13 on the 2-core machine the tests run on).

Training (its steps and its evaluation) and the translator all use :func:`autocast`.
"""

from __future__ import annotations

import contextlib

import torch

__all__ = ["PRECISIONS", "autocast", "grad_scaler", "precision_name", "resolve_precision"]

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
_DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_precision(name: str, device: torch.device, *, key: str = "precision"
                      ) -> torch.dtype | None:
    """The autocast dtype that precision ``name`` means on ``device`` (see the table above);
    ``None`` for float32 without autocast.

    ``auto`` asks the device: bf16 where the GPU computes it natively (what
    ``torch.cuda.is_bf16_supported(including_emulation=False)`` answers, asked of ``device``
    itself), fp16 on older GPUs, float32 on the CPU.

    Raises:
        ValueError: an unknown name, or fp16 on a device other than CUDA; the message starts
            with ``key``.
    """
    if name not in PRECISIONS:
        raise ValueError(f"{key}: expected one of {list(PRECISIONS)}, got {name!r}")
    if name == "auto":
        if device.type != "cuda":
            return None
        return torch.bfloat16 if _native_bf16(device) else torch.float16
    if name == "fp16" and device.type != "cuda":
        raise ValueError(f"{key}: fp16 needs a CUDA device, got {device.type} (float16 "
                         f"autocast on the CPU is very slow); use bf16 or fp32 there")
    return _DTYPES[name]


def _native_bf16(device: torch.device) -> bool:
    """Whether this GPU computes in bfloat16 natively (Ampere, compute capability 8.0, on;
    any ROCm GPU torch runs on)."""
    return torch.version.hip is not None or torch.cuda.get_device_capability(device)[0] >= 8


def precision_name(dtype: torch.dtype | None) -> str:
    """``fp32``, ``bf16`` or ``fp16``: what :func:`resolve_precision` resolved to."""
    return {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[dtype]


def autocast(device: torch.device, dtype: torch.dtype | None
             ) -> contextlib.AbstractContextManager:
    """The autocast context for forward passes on ``device`` in ``dtype`` (as
    :func:`resolve_precision` gives it); none when ``dtype`` is ``None``."""
    return torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)


def grad_scaler(device: torch.device, dtype: torch.dtype | None) -> torch.amp.GradScaler:
    """The loss scaler of training in ``dtype``: enabled for fp16 only. A disabled one passes
    everything through (``scale`` returns the loss, ``step`` steps the optimizer), so that
    training has one path."""
    return torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
