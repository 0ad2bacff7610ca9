"""Weights prepared once for a loop of inference calls, such as the steps of decoding.

A decoding step multiplies a few rows by every weight matrix of the decoder, so the cost of
each product's setup counts. :func:`prepared_for_inference` does that setup once for the
loop:

- each :class:`~attention.multihead.MultiHeadAttention` stacks its ``q_proj``, ``k_proj``
  and ``v_proj`` weights once, not at every call;
- on the CPU in float32, every weight is also reordered once into oneDNN's blocked layout,
  and products of at least :data:`PACKED_MIN_MACS` multiply-adds run on it (the packing
  inductor's CPU freezing does). On the 2-core AMD EPYC (AVX-512) these ran 1.5-2.5×
  faster than ``F.linear`` (MKL) from 8-32 rows up, and slower on one row of a small
  weight, which keeps ``F.linear``: ``benchmarks/results/onednn-linear-cpu-2026-11-30.md``.
  The sums are accumulated in another order, so outputs differ from ``F.linear``'s in the
  last bits (about 1e-6 relative).

Inside the block the weights must not change (they are read on entry) and nothing is
differentiated through them; the modules are restored on exit. The prepared weights are
kept on each module for the next block, and prepared again once a weight has changed (an
optimizer step, ``load_state_dict``, a move to another device): a packed copy of each
weight stays in memory beside it.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import features
from .multihead import MultiHeadAttention

__all__ = ["PACKED_MIN_MACS", "PreparedLinear", "prepared_for_inference"]

# Products smaller than this (rows × out × in multiply-adds) keep F.linear: below it oneDNN's
# call costs more than it saves (one row of a 256×256 weight ran at 0.32× F.linear's speed,
# eight rows at 0.93×; one row of the 8000×256 output head at 1.25×).
PACKED_MIN_MACS = 1_000_000


def onednn_applies(weight: Tensor) -> bool:
    """Whether a weight is packed for oneDNN: a float32 CPU weight, outside CPU autocast
    (whose products run in bfloat16), where this torch has the ops."""
    return (features.ONEDNN_LINEAR and weight.device.type == "cpu"
            and weight.dtype == torch.float32 and not torch.is_autocast_enabled("cpu"))


class PreparedLinear:
    """``x @ weight.T + bias`` with ``weight`` prepared once (see the module's text)."""

    def __init__(self, weight: Tensor, bias: Tensor | None) -> None:
        self.weight = weight.detach()
        self.bias = None if bias is None else bias.detach()
        self.packed = torch.ops.mkldnn._reorder_linear_weight(self.weight, None) \
            if onednn_applies(self.weight) else None

    def __call__(self, x: Tensor) -> Tensor:
        if self.packed is not None and x.dtype == torch.float32 and x.device.type == "cpu" \
                and x.numel() * self.weight.shape[0] >= PACKED_MIN_MACS:
            return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")
        return F.linear(x, self.weight, self.bias)


def _plain_linear(module: nn.Module) -> bool:
    """Exactly ``nn.Linear`` without hooks: its forward is ``F.linear`` and nothing else."""
    return type(module) is nn.Linear and not module._forward_hooks \
        and not module._forward_pre_hooks


# Prepared weights by module, outside the modules: copying or pickling a module must not
# meet oneDNN's packed tensors, which have no storage to copy. Gone with their module.
_KEPT: weakref.WeakKeyDictionary[nn.Module, tuple[tuple, PreparedLinear]] = \
    weakref.WeakKeyDictionary()


def _kept(module: nn.Module, tensors: list[Tensor | None],
          prepare: Callable[[], PreparedLinear]) -> PreparedLinear:
    """``module``'s prepared weights from an earlier block while ``tensors`` are unchanged
    (the same tensors, storage, version, dtype), else ``prepare()``'s, kept for the next."""
    key = tuple((id(t), t.data_ptr(), t._version, t.dtype) for t in tensors if t is not None)
    kept = _KEPT.get(module)
    if kept is None or kept[0] != key or onednn_applies(tensors[0]) != (kept[1].packed is not None):
        kept = (key, prepare())
        _KEPT[module] = kept
    return kept[1]


@contextmanager
def prepared_for_inference(module: nn.Module) -> Iterator[None]:
    """Within the block, ``module``'s plain ``nn.Linear`` layers and attention projections
    run on weights prepared once (see the module's text). Quantized, wrapped or hooked
    layers keep running their own forward, and so does everything under global hooks."""
    if nn.modules.module._global_forward_hooks or nn.modules.module._global_forward_pre_hooks:
        yield
        return
    # Those an enclosing block prepared are left to it.
    attentions = [m for m in module.modules() if isinstance(m, MultiHeadAttention)
                  and m._plain_projections() and m._qkv_projection is None]
    linears = [m for m in module.modules() if _plain_linear(m) and "forward" not in m.__dict__]
    with torch.no_grad():
        for attention in attentions:
            projections = (attention.q_proj, attention.k_proj, attention.v_proj)
            attention._qkv_projection = _kept(
                attention, [t for p in projections for t in (p.weight, p.bias)],
                lambda a=attention: PreparedLinear(*a._concatenated_qkv()))
        for linear in linears:  # an instance attribute, found before nn.Linear.forward
            linear.forward = _kept(linear, [linear.weight, linear.bias],
                                   lambda m=linear: PreparedLinear(m.weight, m.bias))
    try:
        yield
    finally:
        for attention in attentions:
            attention._qkv_projection = None
        for linear in linears:
            del linear.forward
