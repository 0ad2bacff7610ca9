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
differentiated through them; the modules are restored on exit, and the prepared copies
dropped. A weight is packed on its first product of at least ``PACKED_MIN_MACS``; packing all
of the decoding benchmark's model (5.6M weights in Linear layers) took 19 ms on this CPU,
once per block: a loop of ``generate`` calls on unchanging weights saves it by holding one
block around them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import features
from .multihead import MultiHeadAttention

__all__ = ["PACKED_MIN_MACS", "PreparedLinear", "prepared_for_inference", "prepared_linear"]

# Products smaller than this (rows × out × in multiply-adds) keep F.linear: below it oneDNN's
# call costs more than it saves (one row of a 256×256 weight ran at 0.32× F.linear's speed,
# eight rows at 0.93×; one row of the 8000×256 output head at 1.25×).
PACKED_MIN_MACS = 1_000_000


def onednn_applies(weight: Tensor) -> bool:
    """Whether a weight is packed for oneDNN: a float32 CPU weight, outside CPU autocast
    (whose products run in bfloat16), where this torch has the ops."""
    return (features.ONEDNN_LINEAR and weight.device.type == "cpu"
            and weight.dtype == torch.float32 and not torch.is_autocast_enabled("cpu"))


# Activations oneDNN applies to a product's output as it writes it, with the separate
# operation's result bit for bit (torch 2.13, float32; tested): the post-op's name and
# arguments. ``F.gelu`` is the erf form ("none"); its tanh form differs in the last bits.
_FUSED_ACTIVATIONS: dict[Callable[[Tensor], Tensor], tuple[str, list, str]] = {
    F.relu: ("relu", [], ""),
    F.gelu: ("gelu", [], "none"),
}
# A residual sum written with the product (``_linear_pointwise.binary``, "add").
_FUSED_ADD = features.ONEDNN_LINEAR and "binary" in torch.ops.mkldnn._linear_pointwise.overloads()


class PreparedLinear:
    """``x @ weight.T + bias`` with ``weight`` prepared once (see the module's text)."""

    def __init__(self, weight: Tensor, bias: Tensor | None) -> None:
        self.weight = weight.detach()
        self.bias = None if bias is None else bias.detach()
        self.packs = onednn_applies(self.weight)
        self.packed: Tensor | None = None  # packed on the first product big enough

    def _packed_for(self, x: Tensor) -> Tensor | None:
        """The packed weight when ``x``'s product runs on it, else ``None``."""
        if self.packs and x.dtype == torch.float32 and x.device.type == "cpu" \
                and x.numel() * self.weight.shape[0] >= PACKED_MIN_MACS:
            if self.packed is None:
                self.packed = torch.ops.mkldnn._reorder_linear_weight(self.weight, None)
            return self.packed
        return None

    def __call__(self, x: Tensor) -> Tensor:
        packed = self._packed_for(x)
        if packed is not None:
            return torch.ops.mkldnn._linear_pointwise(x, packed, self.bias, "none", [], "")
        return F.linear(x, self.weight, self.bias)

    def activated(self, x: Tensor, activation: Callable[[Tensor], Tensor]) -> Tensor:
        """``activation(self(x))``, the activation applied as the product is written where
        oneDNN has it (``F.relu``, ``F.gelu``): one pass over the output fewer."""
        packed = self._packed_for(x)
        if packed is not None and activation in _FUSED_ACTIVATIONS:
            return torch.ops.mkldnn._linear_pointwise(x, packed, self.bias,
                                                      *_FUSED_ACTIVATIONS[activation])
        return activation(self(x))

    def added(self, x: Tensor, other: Tensor) -> Tensor:
        """``other + self(x)`` (a residual), the sum written with the product where oneDNN
        has it (the same bits: one float32 addition either way)."""
        packed = self._packed_for(x)
        if packed is not None and _FUSED_ADD and other.shape[:-1] == x.shape[:-1] \
                and other.dtype == x.dtype and other.is_contiguous():
            return torch.ops.mkldnn._linear_pointwise.binary(x, other, packed, self.bias, "add")
        return other + self(x)


def prepared_linear(module: nn.Module) -> PreparedLinear | None:
    """The :class:`PreparedLinear` that :func:`prepared_for_inference` put in place of
    ``module``'s forward, or ``None`` outside a block (or for a layer it left as it is)."""
    prepared = module.__dict__.get("forward")
    return prepared if isinstance(prepared, PreparedLinear) else None


def _plain_linear(module: nn.Module) -> bool:
    """Exactly ``nn.Linear`` without hooks: its forward is ``F.linear`` and nothing else."""
    return type(module) is nn.Linear and not module._forward_hooks \
        and not module._forward_pre_hooks


@contextmanager
def prepared_for_inference(module: nn.Module) -> Iterator[None]:
    """Within the block, ``module``'s plain ``nn.Linear`` layers and attention projections
    run on weights prepared on entry (see the module's text). Quantized, wrapped or hooked
    layers keep running their own forward, and so does everything under global hooks.

    The weights are read once, on entry: a change to them inside the block is not seen
    (``generate`` holds a block for one call; hold one around many calls, as
    :class:`~attention.translation.translator.Translator` does for its batches, only while
    nothing trains the model). A nested block leaves the modules to the enclosing one.
    """
    if nn.modules.module._global_forward_hooks or nn.modules.module._global_forward_pre_hooks:
        yield
        return
    patched_attentions: list[MultiHeadAttention] = []
    patched_linears: list[nn.Linear] = []
    try:
        with torch.no_grad():
            for m in module.modules():
                if isinstance(m, MultiHeadAttention) and m._plain_projections() \
                        and m._qkv_projection is None:
                    m._qkv_projection = PreparedLinear(*m._concatenated_qkv())
                    patched_attentions.append(m)
                elif _plain_linear(m) and "forward" not in m.__dict__:
                    # An instance attribute, found before nn.Linear.forward.
                    m.forward = PreparedLinear(m.weight, m.bias)
                    patched_linears.append(m)
        yield
    finally:  # also when preparing failed half-way: every module patched is restored
        for attention in patched_attentions:
            attention._qkv_projection = None
        for linear in patched_linears:
            del linear.forward
