"""Which optional torch APIs this torch has, found by looking at them, not at its version.

Each answer is a constant computed once at import, by inspecting the API itself (a signature,
an enum member): cheap, and right for a build whose version string says nothing (a nightly, a
vendor's backport). The modules that use one read it from here at call time, so a test can
set it to "absent" and run the fallback.

``SDPA_SET_PRIORITY``
    ``torch.nn.attention.sdpa_kernel`` takes ``set_priority``: "auto" can try the kernels in
    the package's order (:func:`attention.functional.sdpa_priority`). Without it, torch's own
    order.
``CUDNN_ATTENTION``
    ``SDPBackend.CUDNN_ATTENTION`` exists: ``attention_backend("cudnn")`` and the cuDNN-first
    order on Hopper. Without it, ``"cudnn"`` is refused by name.
``LAYER_NORM_BIAS``
    ``nn.LayerNorm`` takes ``bias``. Without it, :func:`attention.layers.layer_norm` removes
    the bias parameter by hand for ``bias=False``, as torch does.
``DDP_FORWARD_SYNC_BUFFERS``
    ``DistributedDataParallel`` takes ``forward_sync_buffers`` (2.13 does, 2.11 does not).
    Without it, ``broadcast_buffers=False`` is the older spelling (deprecated where the new
    one exists); it also skips the buffers' broadcast at construction.
``ONEDNN_LINEAR``
    This build has oneDNN (``torch.backends.mkldnn``) with the private ops
    ``mkldnn._reorder_linear_weight`` and ``mkldnn._linear_pointwise`` that inductor's CPU
    freezing uses: :mod:`attention.inference` packs Linear weights in oneDNN's layout once
    for a decoding loop. Without it, the weights are used as they are.

Not detected: APIs that every torch since the floor in pyproject.toml (2.11) has, used as
they are: ``sdpa_kernel`` and ``SDPBackend`` themselves, ``scaled_dot_product_attention``'s
``scale``, ``torch.compiler.is_compiling``, ``torch.load(weights_only=True)``,
``init_process_group(device_id=)`` and the ``bias`` of ``nn.TransformerEncoderLayer`` (compat,
the benchmark's torch.nn peers). One private name is read: the ``_dynamo_marked_constant``
mark on :func:`attention.functional.current_backend`, which the compile tests pin. torch's
variable-length kernel (``torch.nn.attention.varlen``) is looked up where it is used, in
:mod:`attention.multihead`: importing it here would import ``torch._dynamo`` (about a second).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable

import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

__all__ = ["CUDNN_ATTENTION", "DDP_FORWARD_SYNC_BUFFERS", "LAYER_NORM_BIAS", "ONEDNN_LINEAR",
           "SDPA_SET_PRIORITY", "accepts_keyword", "has_member"]


def accepts_keyword(function: Callable, keyword: str) -> bool:
    """Whether ``function`` (or a class's constructor) has a parameter named ``keyword``;
    ``False`` where its signature cannot be read."""
    try:
        return keyword in inspect.signature(function).parameters
    except (TypeError, ValueError):
        return False


def has_member(enumeration: type, name: str) -> bool:
    """Whether the enumeration ``enumeration`` (a Python ``Enum`` or a pybind11 enum, such as
    ``SDPBackend``) has a member called ``name``."""
    return name in getattr(enumeration, "__members__", {})


SDPA_SET_PRIORITY: bool = accepts_keyword(sdpa_kernel, "set_priority")
CUDNN_ATTENTION: bool = has_member(SDPBackend, "CUDNN_ATTENTION")
LAYER_NORM_BIAS: bool = accepts_keyword(nn.LayerNorm, "bias")
DDP_FORWARD_SYNC_BUFFERS: bool = accepts_keyword(nn.parallel.DistributedDataParallel,
                                                 "forward_sync_buffers")
ONEDNN_LINEAR: bool = (torch.backends.mkldnn.is_available()
                       and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")
                       and hasattr(torch.ops.mkldnn, "_linear_pointwise"))
