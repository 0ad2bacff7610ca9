"""The contenders: this package's Encoder (explicit, fused, compiled, forced SDPA kernels),
torch.nn's TransformerEncoder (with and without biases) and x-transformers' Encoder, all of
one config's size, each with a forward that passes the case's mask in its own convention.

Shapes: ``B`` batch, ``L`` length, ``d`` ``d_model``; inputs and outputs are ``(B, L, d)``.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from ..compat import to_torch
from ..functional import attention_backend
from ..layers import ACTIVATIONS
from ..models import Encoder
from .config import CONTENDERS, OURS, SDPA_KERNELS, TORCH_PEERS, WINDOWED, BenchConfig
from .workload import Case

__all__ = [
    "Activation",
    "CompiledForward",
    "Contender",
    "OursForward",
    "TorchForward",
    "XTransformersForward",
    "build_contenders",
    "build_ours",
    "build_torch",
    "build_x_transformers",
    "x_transformers_status",
]


@dataclass
class Contender:
    """A module under test: ``forward(x, case)`` runs it with the case's mask in its own
    convention; ``module`` holds the weights (train/eval mode, gradients)."""

    name: str
    module: nn.Module
    forward: Callable[[Tensor, Case], Tensor]


@dataclass
class OursForward:
    """Our Encoder under :func:`attention_backend` ``backend`` (``"auto"``: the default)."""

    module: Encoder
    backend: str

    def __call__(self, x: Tensor, case: Case) -> Tensor:
        with attention_backend(self.backend):
            return self.module(x, key_padding_mask=case.key_padding_mask)


class CompiledForward:
    """``torch.compile`` of our Encoder (``dynamic=False``: a graph per shape). A backend that
    fails to load is raised by every call, so each cell records it as its error."""

    def __init__(self, module: Encoder, backend: str) -> None:
        self.failure: Exception | None = None
        try:
            self.compiled = torch.compile(module, backend=backend, dynamic=False)
        except Exception as error:  # an unknown backend
            self.failure = error

    def __call__(self, x: Tensor, case: Case) -> Tensor:
        if self.failure is not None:
            raise self.failure
        return self.compiled(x, key_padding_mask=case.key_padding_mask)


@dataclass
class TorchForward:
    """torch.nn's encoder: ``src_key_padding_mask``, ``True`` at padding (our meaning too)."""

    module: nn.Module

    def __call__(self, x: Tensor, case: Case) -> Tensor:
        return self.module(x, src_key_padding_mask=case.key_padding_mask)


@dataclass
class XTransformersForward:
    """x-transformers' encoder: ``mask``, ``True`` = keep (the negation of ours)."""

    module: nn.Module

    def __call__(self, x: Tensor, case: Case) -> Tensor:
        return self.module(x, mask=case.keep_mask)


class Activation(nn.Module):
    """The function :data:`attention.layers.ACTIVATIONS` names, as a module (x-transformers
    takes its feed-forward activation as a module)."""

    def __init__(self, name: str) -> None:
        super().__init__()
        self.name = name
        self.function = ACTIVATIONS[name]

    def forward(self, x: Tensor) -> Tensor:
        return self.function(x)

    def extra_repr(self) -> str:
        return self.name


def _import_x_transformers() -> Any:
    with warnings.catch_warnings():
        # its attend.py decorates a helper with torch.jit.script, deprecated in torch 2.13
        warnings.filterwarnings("ignore", "`torch.jit.script` is deprecated",
                                DeprecationWarning)
        import x_transformers

    return x_transformers


def x_transformers_status() -> str | None:
    """``None`` when x-transformers imports, else why not (one line)."""
    try:
        _import_x_transformers()
    except Exception as error:  # an ImportError, or a broken install
        return f"{type(error).__name__}: {error}"
    return None


def build_ours(config: BenchConfig, window: int | None = None) -> Encoder:
    """This package's Encoder of the config's size, without positions, dropout 0, with
    every layer attending within ``window`` when one is given."""
    return Encoder(config.d_model, config.n_heads, config.n_layers, config.d_ff, dropout=0.0,
                   positional=None, activation=config.activation, window=window)


def build_torch(config: BenchConfig, bias: bool) -> nn.TransformerEncoder:
    """torch.nn's pre-norm encoder of the config's size, with a final LayerNorm as ours.

    Its activation is the function ours uses; torch recognises ``F.relu`` and ``F.gelu``
    (its inference fast path needs one of them)."""
    layer = nn.TransformerEncoderLayer(config.d_model, config.n_heads, config.d_ff, 0.0,
                                       activation=ACTIVATIONS[config.activation],
                                       batch_first=True, norm_first=True, bias=bias)
    return nn.TransformerEncoder(layer, config.n_layers,
                                 norm=nn.LayerNorm(config.d_model, bias=bias),
                                 enable_nested_tensor=False)


def build_x_transformers(config: BenchConfig) -> nn.Module:
    """x-transformers' Encoder of the config's size: pre-norm and a final norm (its
    defaults), no biases, fused attention (``attn_flash``), ``d_head = d_model / n_heads``."""
    x_transformers = _import_x_transformers()
    mult = config.d_ff / config.d_model
    if int(config.d_model * mult) != config.d_ff:
        raise ValueError(f"d_ff: x-transformers takes d_ff as a multiple of d_model, and "
                         f"{config.d_model} × {mult} is not {config.d_ff}")
    return x_transformers.Encoder(
        dim=config.d_model, depth=config.n_layers, heads=config.n_heads,
        attn_dim_head=config.d_model // config.n_heads, ff_mult=mult, ff_no_bias=True,
        ff_custom_activation=Activation(config.activation), attn_flash=True,
    )


def build_contenders(config: BenchConfig, names: Sequence[str], device: torch.device | str,
                     dtype: torch.dtype) -> dict[str, Contender]:
    """The named contenders on ``device`` in ``dtype``, seeded; ``ours-*`` share one Encoder,
    and ``torch-nobias`` carries its weights. x-transformers must import (see
    :func:`x_transformers_status`)."""
    modules = _build_modules(config, names)
    for module in modules.values():
        module.to(device=device, dtype=dtype)
    return {name: _contender(name, modules, config) for name in names}


def _build_modules(config: BenchConfig, names: Sequence[str]) -> dict[str, nn.Module]:
    """One module per peer named, and ``"ours"`` when any of ours is; seeded per module."""
    torch.manual_seed(config.seed)
    ours = build_ours(config)
    built: dict[str, nn.Module] = {}
    if "torch-nobias" in names:
        built["torch-nobias"] = build_torch(config, bias=False)
        built["torch-nobias"].load_state_dict(to_torch(ours).state_dict())
    if "torch-bias" in names:
        torch.manual_seed(config.seed + 1)
        built["torch-bias"] = build_torch(config, bias=True)
    if "x-transformers" in names:
        torch.manual_seed(config.seed + 2)
        built["x-transformers"] = build_x_transformers(config)
    if "ours-window" in names:
        if config.window is None:
            raise ValueError("window: the ours-window contender needs the config's window "
                             "(an integer), got null")
        built["ours-window"] = build_ours(config, window=config.window)
        built["ours-window"].load_state_dict(ours.state_dict())
    if any(name in OURS for name in names):
        built["ours"] = ours
    return built


def _contender(name: str, modules: dict[str, nn.Module], config: BenchConfig) -> Contender:
    """The contender ``name`` over the module it runs (see :func:`_build_modules`)."""
    if name == "ours-explicit":
        forward = OursForward(modules["ours"], "explicit")
    elif name == "ours-fused":
        forward = OursForward(modules["ours"], "auto")
    elif name in SDPA_KERNELS:
        forward = OursForward(modules["ours"], name.removeprefix("ours-sdpa-"))
    elif name in WINDOWED:
        forward = OursForward(modules[name], "auto")
    elif name == "ours-compiled":
        forward = CompiledForward(modules["ours"], config.compile_backend)
    elif name in TORCH_PEERS:
        forward = TorchForward(modules[name])
    elif name == "x-transformers":
        forward = XTransformersForward(modules[name])
    else:
        raise ValueError(f"names: unknown contender {name!r}; expected some of "
                         f"{list(CONTENDERS)}")
    module = modules["ours"] if name in OURS and name not in WINDOWED else modules[name]
    return Contender(name, module, forward)
