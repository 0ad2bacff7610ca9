"""How a compat class and its torch.nn twin rebuild each other, with every weight.

Each of the six compat classes is registered with :func:`twin_of` and converts itself: its
``from_torch`` classmethod builds it from its torch.nn twin, its ``to_torch`` method builds
the twin back. The helpers here are what the six share: the constructor arguments read off a
module, copying state, mode and ``requires_grad``, and :func:`convert_part` for the parts of
a module being converted (one of the six classes is converted by its own class; anything
else, a LayerNorm or a user's layer, is deep-copied as it is).
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any, TypeVar

import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "TORCH_CLASSES",
    "LayerTwin",
    "activation_for_torch",
    "attention_args",
    "check_exact_type",
    "compat_class_of",
    "convert_part",
    "copy_into",
    "factory_args",
    "finish",
    "layer_args",
    "rebuild_children",
    "twin_of",
]

# torch.nn's six classes as they were at import: a test harness may put ours in their place
# later (PyTorch's own tests, run against this package, do).
TORCH_CLASSES = {name: getattr(nn, name) for name in (
    "MultiheadAttention", "TransformerEncoderLayer", "TransformerDecoderLayer",
    "TransformerEncoder", "TransformerDecoder", "Transformer")}

_COMPAT_OF: dict[type, type] = {}  # torch.nn class -> its compat twin

Twin = TypeVar("Twin", bound=type)


def twin_of(torch_class: type) -> Callable[[Twin], Twin]:
    """Class decorator: the decorated compat class is ``torch_class``'s twin (and gets it as
    its ``torch_class`` attribute)."""
    def register(compat_class: Twin) -> Twin:
        compat_class.torch_class = torch_class
        _COMPAT_OF[torch_class] = compat_class
        return compat_class
    return register


def compat_class_of(torch_class: type) -> type | None:
    """The compat twin of ``torch_class`` (exactly that class, not a subclass), or None."""
    return _COMPAT_OF.get(torch_class)


def check_exact_type(name: str, module: Any, expected: type) -> None:
    """Refuse anything but ``expected`` itself: a subclass's own forward would be lost."""
    if type(module) is not expected:
        raise TypeError(f"{name}: expected {expected.__module__}.{expected.__name__}, exactly, "
                        f"got {type(module).__module__}.{type(module).__name__}")


def convert_part(module: nn.Module) -> nn.Module:
    """A part of a module being converted: one of the six classes (either side) becomes its
    twin, anything else (a LayerNorm, a user's own layer) is deep-copied as it is."""
    compat_class = _COMPAT_OF.get(type(module))
    if compat_class is not None:
        return compat_class.from_torch(module)
    if type(module) in _COMPAT_OF.values():
        return module.to_torch()
    return copy.deepcopy(module)


def factory_args(weight: Tensor) -> dict[str, Any]:
    return {"device": weight.device, "dtype": weight.dtype}


def activation_for_torch(activation: Callable[[Tensor], Tensor]) -> str | Callable:
    """torch.nn takes "relu" and "gelu" by name (its fast path needs to know them)."""
    return {F.relu: "relu", F.gelu: "gelu"}.get(activation, activation)


def attention_args(module: nn.Module) -> dict[str, Any]:
    """The constructor arguments of a (torch.nn or compat) ``MultiheadAttention``."""
    return {
        "embed_dim": module.embed_dim, "num_heads": module.num_heads,
        "dropout": module.dropout, "bias": module.in_proj_bias is not None,
        "add_bias_kv": module.bias_k is not None, "add_zero_attn": module.add_zero_attn,
        "kdim": module.kdim, "vdim": module.vdim, "batch_first": module.batch_first,
        **factory_args(module.out_proj.weight),
    }


def layer_args(module: nn.Module, *, for_torch: bool = False) -> dict[str, Any]:
    """The constructor arguments of a (torch.nn or compat) encoder or decoder layer; the
    parts themselves are copied afterwards (:func:`rebuild_children`), so that whatever was
    changed in one survives."""
    attention = module.self_attn
    activation = module.activation
    return {
        "d_model": attention.embed_dim, "nhead": attention.num_heads,
        "dropout": attention.dropout,
        "activation": activation_for_torch(activation) if for_torch else activation,
        "batch_first": attention.batch_first, "norm_first": module.norm_first,
        **factory_args(attention.out_proj.weight),
    }


def finish(source: nn.Module, twin: nn.Module) -> nn.Module:
    """``twin`` with ``source``'s train/eval mode and each parameter's ``requires_grad``."""
    requires_grad = {name: p.requires_grad for name, p in source.named_parameters()}
    for name, parameter in twin.named_parameters():
        parameter.requires_grad_(requires_grad.get(name, parameter.requires_grad))
    return twin.train(source.training)


def copy_into(source: nn.Module, twin: nn.Module) -> nn.Module:
    """``twin`` with ``source``'s weights (same state-dict keys), mode and requires_grad."""
    twin.load_state_dict(source.state_dict())
    return finish(source, twin)


def rebuild_children(source: nn.Module, twin: nn.Module) -> nn.Module:
    """``twin`` with each of ``source``'s children converted or copied as it is (a norm's
    eps, a linear without bias, a dropout's p, an activation module, an attention with its
    own flags), then ``source``'s mode and requires_grad."""
    for name, child in source.named_children():
        setattr(twin, name, convert_part(child))
    return finish(source, twin)


class LayerTwin:
    """``from_torch`` and ``to_torch`` of an encoder or decoder layer: the twin built from
    the layer's constructor arguments, then each part converted (the attention, with its
    own flags) or copied as it is (a norm's eps, a linear without bias, an activation
    module). The class it is mixed into is registered with :func:`twin_of`."""

    torch_class: type

    @classmethod
    def from_torch(cls, module: nn.Module) -> nn.Module:
        """This class with the parts, weights, layout, mode and ``requires_grad`` of
        ``module``, its torch.nn twin (exactly: a subclass's own forward would be lost)."""
        check_exact_type("module", module, cls.torch_class)
        return rebuild_children(module, cls(**layer_args(module)))

    def to_torch(self) -> nn.Module:
        """The torch.nn twin with this layer's parts, weights, layout and mode."""
        return rebuild_children(self, self.torch_class(**layer_args(self, for_torch=True)))
