"""The benchmark harness: this package's Encoder against torch.nn's and x-transformers'.

What is measured
----------------
One *cell* is a config × sequence length × dtype × pass × case × contender.

Contenders, all of the config's size, dropout 0, built by :func:`build_contenders`:

- ``ours-explicit``: :class:`attention.Encoder` on the textbook attention math
  (``attention_backend("explicit")``);
- ``ours-fused``: the same Encoder on its default path (fused SDPA);
- ``ours-compiled``: ``torch.compile`` of the same Encoder (``dynamic=False``: a graph per
  shape, compiled during the warm-up);
- ``ours-sdpa-math``, ``-flash``, ``-efficient``, ``-cudnn`` (only when asked for by name):
  the same Encoder with ``F.scaled_dot_product_attention`` forced to that kernel, to compare
  the kernels (a kernel the device lacks is recorded as an error);
- ``torch-nobias``: ``nn.TransformerEncoder`` (pre-norm, batch first, ``bias=False``, a
  final LayerNorm as ours has), carrying our weights (``compat.to_torch``);
- ``torch-bias``: the same with biases (torch's inference fast path needs them);
- ``x-transformers``: its ``Encoder`` (pre-norm, no biases, fused attention), when installed.

Passes: ``inference`` (``eval()`` under ``torch.inference_mode()``) and ``training``
(``train()``, forward, then backward of the mean square of the outputs at real positions
with respect to the input and every weight; gradients are set to ``None`` before each run).

Cases: ``dense`` (no mask) and ``padded``: a ``(B, L)`` key padding mask, ``True`` at
padding (torch.nn's meaning; x-transformers gets ``~mask``), a ``padding`` fraction of the
positions padded, with sequence lengths spread evenly from ``L·(1 - 2·padding)`` to ``L``
(right padding): ``L/2`` to ``L`` for the default 0.25.

How
---
The contenders of one (length, dtype, pass, case) live in one process. Each runs ``warmup``
times (which covers compilation), then ``repeats`` rounds run every contender once,
alternating run by run; each round starts one contender later, so that none always follows
the same neighbour. A run is timed with ``time.perf_counter`` on the CPU, with CUDA events
after a synchronize on the GPU. Per cell:

- every run's time; the median, min, max and interquartile range;
- tokens/s, counting real tokens only (padding is not work done);
- FLOPs counted from the shape (:func:`encoder_flops`, useful work only), FLOP/s, and MFU:
  FLOP/s over the best time of a square matmul (2048³ on the CPU, 8192³ on CUDA) measured
  in the same run and dtype;
- ratios, for each pair of one of ours and one peer: per round, peer time / ours time
  (> 1: ours is faster), their list and median; the table shows them against the faster
  torch.nn contender of the cell and against x-transformers;
- memory, as what a run adds above the built model and its input. CUDA: the peak allocated
  during a timed run minus what was allocated before it. CPU: a subprocess builds only that
  cell's contender and input, reads its resident set (``VmRSS``), warms up, resets the peak
  (``/proc/self/clear_refs``) where Linux allows it, runs, and reads the peak (``VmHWM``).
  (Not ``ru_maxrss``: a child of ``subprocess`` inherits its parent's peak in it.)

An out-of-memory is recorded as ``"oom"`` for its cell, any other failure (a compile that
fails) as ``"error"`` with its message, and the run goes on. Beside the timings, the JSON
records the largest difference between ours and ``torch-nobias`` (same weights) on real
positions, per length, dtype and case: a correctness check.

Results: a table on the terminal, and ``{device}-{config}-{date}.json`` and ``.md`` (and a
log-log ``.png`` of time and memory against length when the config has several lengths).
"""

from __future__ import annotations

import dataclasses
import datetime
import gc
import importlib.metadata
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
import typing
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..functional import attention_backend
from ..models import Encoder
from ..translation.config import ConfigError, check_value, read_yaml_mapping
from ..translation.files import write_atomic

__all__ = [
    "CONTENDERS",
    "DEFAULT_CONTENDERS",
    "BenchConfig",
    "Case",
    "Contender",
    "build_contenders",
    "check_against_torch",
    "encoder_flops",
    "format_markdown",
    "format_table",
    "is_out_of_memory",
    "load_bench_config",
    "make_case",
    "measure_cpu_peak_rss",
    "measure_matmul_peak",
    "padding_lengths",
    "padding_mask",
    "parse_contenders",
    "plot_scaling",
    "run_benchmark",
    "run_group",
    "write_results",
    "x_transformers_status",
]

DEVICES = ("cpu", "cuda")
# Our Encoder with F.scaled_dot_product_attention forced to one kernel (attention_backend):
# opt-in contenders, to compare the kernels; one the device lacks is recorded as an error.
SDPA_KERNELS = ("ours-sdpa-math", "ours-sdpa-flash", "ours-sdpa-efficient", "ours-sdpa-cudnn")
OURS = ("ours-explicit", "ours-fused", "ours-compiled", *SDPA_KERNELS)
TORCH_PEERS = ("torch-nobias", "torch-bias")
PEERS = (*TORCH_PEERS, "x-transformers")
CONTENDERS = (*OURS, *PEERS)
DEFAULT_CONTENDERS = tuple(name for name in CONTENDERS if name not in SDPA_KERNELS)
PASSES = ("inference", "training")
CASES = ("dense", "padded")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
ACTIVATIONS = ("relu", "gelu", "gelu_tanh", "silu")
MATMUL_SIZE = {"cpu": 2048, "cuda": 8192}
MATMUL_RUNS = 5  # the peak is the best of these, after one warm-up
MEMORY_RUNS = 2  # runs after the warm-up in a CPU memory subprocess
MIB = 2**20
ROOT = Path(__file__).resolve().parents[2]


# ----------------------------------------------------------------------------- config


@dataclass
class BenchConfig:
    """One benchmark: the model's size, the shapes, and how to time them.

    ``lengths`` and ``dtypes`` are one list for every device or a mapping
    ``{cpu: [...], cuda: [...]}``. ``padding`` is the fraction of padded positions in the
    padded case (below 0.5: every sequence keeps a token). ``warmup`` runs per contender
    and cell precede ``repeats`` alternated rounds (at least 5, for the ratios).
    ``cpu_peak_rss`` measures CPU memory, one subprocess per cell (slow; on by default).
    ``seed`` seeds the weights and the inputs.
    ``name`` is the file's stem, not a key.
    """

    name: str
    d_model: int
    n_heads: int
    n_layers: int
    d_ff: int
    batch: int
    lengths: list[int] | dict[str, list[int]]
    activation: str = "gelu"
    padding: float = 0.25
    dtypes: list[str] | dict[str, list[str]] = field(
        default_factory=lambda: {"cpu": ["float32"], "cuda": ["float32", "bfloat16"]})
    warmup: int = 2
    repeats: int = 5
    passes: list[str] = field(default_factory=lambda: list(PASSES))
    cases: list[str] = field(default_factory=lambda: list(CASES))
    seed: int = 0
    compile_backend: str = "inductor"  # torch.compile(backend=...); "eager" compiles in seconds
    cpu_peak_rss: bool = True

    @classmethod
    def from_dict(cls, raw: Any, name: str) -> BenchConfig:
        """Check every key and value of ``raw`` (a parsed YAML mapping) and build the config."""
        if not isinstance(raw, dict):
            raise ConfigError(f"config: expected a mapping of keys to values, got "
                              f"{type(raw).__name__}")
        hints = typing.get_type_hints(cls)
        known = [f.name for f in dataclasses.fields(cls) if f.name != "name"]
        for key in raw:
            if key not in known:
                raise ConfigError(f"{key}: unknown key; expected one of {known}")
        required = [f.name for f in dataclasses.fields(cls)
                    if f.name != "name" and f.default is dataclasses.MISSING
                    and f.default_factory is dataclasses.MISSING]
        for key in required:
            if key not in raw:
                raise ConfigError(f"{key}: missing; a bench config sets {required}")
        values = {}
        for key, value in raw.items():
            if key in ("lengths", "dtypes"):
                item = int if key == "lengths" else str
                values[key] = _check_per_device(key, value, item)
            else:
                values[key] = check_value(key, value, hints[key])
        config = cls(name=name, **values)
        config.check()
        return config

    def check(self) -> None:
        """Value checks that types alone do not make; each message names its key."""
        for key in ("d_model", "n_heads", "n_layers", "d_ff", "batch"):
            if getattr(self, key) < 1:
                raise ConfigError(f"{key}: expected a positive integer, got "
                                  f"{getattr(self, key)}")
        if self.d_model % self.n_heads:
            raise ConfigError(f"d_model: expected a multiple of n_heads={self.n_heads}, got "
                              f"{self.d_model}")
        for device, lengths in _per_device_items(self.lengths):
            name = "lengths" if device is None else f"lengths.{device}"
            if not lengths or any(n < 1 for n in lengths):
                raise ConfigError(f"{name}: expected a non-empty list of positive integers, "
                                  f"got {lengths}")
        for device, dtypes in _per_device_items(self.dtypes):
            name = "dtypes" if device is None else f"dtypes.{device}"
            _check_choices(name, dtypes, tuple(DTYPES))
        if self.activation not in ACTIVATIONS:
            raise ConfigError(f"activation: expected one of {list(ACTIVATIONS)}, got "
                              f"{self.activation!r}")
        if not 0 <= self.padding < 0.5:
            raise ConfigError(f"padding: expected a fraction in [0, 0.5), got {self.padding}")
        if self.warmup < 1:
            raise ConfigError(f"warmup: expected at least 1 run (it covers compilation), got "
                              f"{self.warmup}")
        if self.repeats < 5:
            raise ConfigError(f"repeats: expected at least 5 alternated rounds, got "
                              f"{self.repeats}")
        _check_choices("passes", self.passes, PASSES)
        _check_choices("cases", self.cases, CASES)
        if not self.compile_backend:
            raise ConfigError("compile_backend: expected a torch.compile backend name, got ''")

    def lengths_for(self, device: str) -> list[int]:
        return _for_device("lengths", self.lengths, device)

    def dtypes_for(self, device: str) -> list[str]:
        return _for_device("dtypes", self.dtypes, device)

    def to_dict(self) -> dict[str, Any]:
        """The keys of a config file (without ``name``), as :meth:`from_dict` takes them."""
        raw = dataclasses.asdict(self)
        del raw["name"]
        return raw


def _check_per_device(key: str, value: Any, item: type) -> list | dict[str, list]:
    if isinstance(value, dict):
        checked = {}
        for device, items in value.items():
            if device not in DEVICES:
                raise ConfigError(f"{key}.{device}: unknown device; expected one of "
                                  f"{list(DEVICES)}")
            checked[device] = check_value(f"{key}.{device}", items, list[item])
        return checked
    if not isinstance(value, list):
        raise ConfigError(f"{key}: expected a list of {item.__name__} or a mapping "
                          f"{{cpu: [...], cuda: [...]}}, got {type(value).__name__} {value!r}")
    return check_value(key, value, list[item])


def _per_device_items(value: list | dict[str, list]) -> list[tuple[str | None, list]]:
    return list(value.items()) if isinstance(value, dict) else [(None, value)]


def _for_device(key: str, value: list | dict[str, list], device: str) -> list:
    if not isinstance(value, dict):
        return list(value)
    if device not in value:
        raise ConfigError(f"{key}: no list for device {device!r}; the config has "
                          f"{sorted(value)}")
    return list(value[device])


def _check_choices(key: str, values: list[str], allowed: tuple[str, ...]) -> None:
    if not values:
        raise ConfigError(f"{key}: expected a non-empty list from {list(allowed)}, got []")
    for value in values:
        if value not in allowed:
            raise ConfigError(f"{key}: expected items from {list(allowed)}, got {value!r}")
    if len(set(values)) != len(values):
        raise ConfigError(f"{key}: expected each item once, got {values}")


def apply_bench_overrides(raw: dict[str, Any], assignments: Sequence[str]) -> dict[str, Any]:
    """Set ``key=value`` strings (values parsed as YAML) in a raw bench config."""
    import yaml

    raw = dict(raw)
    for assignment in assignments:
        key, sep, text = assignment.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {assignment!r}: expected key=value, e.g. repeats=10")
        raw[key] = yaml.safe_load(text) if text else None
    return raw


def load_bench_config(path: str | os.PathLike, overrides: Sequence[str] = ()) -> BenchConfig:
    """Read a bench YAML file (its stem names the config), apply overrides, check it all."""
    path = Path(path)
    raw = read_yaml_mapping(path, "a mapping of keys to values")
    return BenchConfig.from_dict(apply_bench_overrides(raw, overrides), name=path.stem)


def parse_contenders(text: str | None) -> list[str]:
    """``"ours-fused,torch-bias"`` → the names in :data:`CONTENDERS` order; ``None``: the
    :data:`DEFAULT_CONTENDERS` (all but the forced SDPA kernels)."""
    if text is None:
        return list(DEFAULT_CONTENDERS)
    names = [name.strip() for name in text.split(",") if name.strip()]
    for name in names:
        if name not in CONTENDERS:
            raise ConfigError(f"contenders: unknown {name!r}; expected some of "
                              f"{list(CONTENDERS)}")
    if not names:
        raise ConfigError(f"contenders: expected some of {list(CONTENDERS)}, got none")
    return [name for name in CONTENDERS if name in names]


# ----------------------------------------------------------------------------- shapes


def encoder_flops(d_model: int, n_layers: int, d_ff: int, batch: int, length: int,
                  real_tokens: int | None = None, training: bool = False, *,
                  seq_lengths: Sequence[int] | None = None) -> int:
    """Floating-point operations of an encoder's matmuls (a multiply-add is 2), per run.

    Per layer: the four ``d × d`` projections and the feed-forward,
    ``2·tokens·(4·d² + 2·d·d_ff)``, and attention (``q·kᵀ`` and ``weights·v``),
    ``4·d·Σ lᵢ²``. Dense: ``tokens = batch·length`` and every ``lᵢ = length``. Padded (pass
    ``real_tokens`` and ``seq_lengths``): only the useful work, real tokens for the matmuls
    and each sequence's own length for attention. Training counts 3× the forward (the
    backward computes two products per forward one). LayerNorms, softmax and the activation
    are left out.
    """
    if seq_lengths is None:
        seq_lengths = [length] * batch
    if len(seq_lengths) != batch or any(not 0 <= n <= length for n in seq_lengths):
        raise ValueError(f"seq_lengths: expected {batch} lengths in [0, {length}], got "
                         f"{list(seq_lengths)}")
    tokens = batch * length if real_tokens is None else real_tokens
    projections = 2 * tokens * (4 * d_model**2 + 2 * d_model * d_ff)
    attention = 4 * d_model * sum(n * n for n in seq_lengths)
    forward = n_layers * (projections + attention)
    return 3 * forward if training else forward


def padding_lengths(batch: int, length: int, padding: float = 0.25) -> list[int]:
    """Sequence lengths spread evenly from ``length·(1 - 2·padding)`` to ``length`` whose sum
    is ``(1 - padding)·batch·length`` (rounded; one sequence: that length alone)."""
    total = round((1 - padding) * batch * length)
    if batch == 1:
        return [max(1, total)]
    low = length * (1 - 2 * padding)
    exact = [low + (length - low) * i / (batch - 1) for i in range(batch)]
    lengths = [min(length, max(1, round(n))) for n in exact]
    # Rounding moves the total by a few tokens: give them back where rounding took most.
    missing = total - sum(lengths)
    order = sorted(range(batch), key=lambda i: lengths[i] - exact[i], reverse=missing < 0)
    for i in order:
        if missing == 0:
            break
        step = 1 if missing > 0 else -1
        if 1 <= lengths[i] + step <= length:
            lengths[i] += step
            missing -= step
    return lengths


def padding_mask(batch: int, length: int, padding: float = 0.25,
                 device: torch.device | str | None = None) -> tuple[Tensor, list[int]]:
    """A ``(batch, length)`` key padding mask, ``True`` at padding (right padding), and the
    sequence lengths (:func:`padding_lengths`)."""
    lengths = padding_lengths(batch, length, padding)
    positions = torch.arange(length, device=device)
    mask = positions[None, :] >= torch.tensor(lengths, device=device)[:, None]  # (B, L)
    return mask, lengths


@dataclass
class Case:
    """The masks of one case and the weights of the training loss.

    ``key_padding_mask``: ``(B, L)``, ``True`` at padding, ``None`` when dense.
    ``keep_mask``: its negation (x-transformers' meaning), made once outside the timing.
    ``loss_weight``: ``(B, L, 1)`` float32, ``1 / (real tokens · d_model)`` at real
    positions and 0 at padding, so ``(out² · loss_weight).sum()`` is the mean square over
    real positions, without a boolean index (which would synchronize a GPU).
    """

    name: str
    seq_lengths: list[int]
    key_padding_mask: Tensor | None
    keep_mask: Tensor | None
    loss_weight: Tensor

    @property
    def real_tokens(self) -> int:
        return sum(self.seq_lengths)


def make_case(name: str, batch: int, length: int, d_model: int, padding: float,
              device: torch.device | str) -> Case:
    """The ``dense`` or ``padded`` case for ``(batch, length)`` inputs on ``device``."""
    if name == "dense":
        mask, lengths = None, [length] * batch
        real = torch.ones(batch, length, device=device)
    else:
        mask, lengths = padding_mask(batch, length, padding, device)
        real = (~mask).float()
    weight = (real / (sum(lengths) * d_model)).unsqueeze(-1)  # (B, L, 1)
    return Case(name, lengths, mask, None if mask is None else ~mask, weight)


def make_input(config: BenchConfig, length: int, device: torch.device | str,
               dtype: torch.dtype) -> Tensor:
    """Seeded ``(batch, length, d_model)`` normal input, the same for every contender."""
    generator = torch.Generator().manual_seed(config.seed + length)
    x = torch.randn(config.batch, length, config.d_model, generator=generator)
    return x.to(device=device, dtype=dtype)


# ------------------------------------------------------------------------- contenders


@dataclass
class Contender:
    """A module under test: ``forward(x, case)`` runs it with the case's mask in its own
    convention; ``module`` holds the weights (train/eval mode, gradients)."""

    name: str
    module: nn.Module
    forward: Callable[[Tensor, Case], Tensor]


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


def build_ours(config: BenchConfig) -> Encoder:
    return Encoder(config.d_model, config.n_heads, config.n_layers, config.d_ff, dropout=0.0,
                   positional=None, activation=config.activation)


def build_torch(config: BenchConfig, bias: bool) -> nn.TransformerEncoder:
    """torch.nn's pre-norm encoder of the config's size, with a final LayerNorm as ours."""
    from ..layers import ACTIVATIONS as FUNCTIONS

    activation = config.activation if config.activation in ("relu", "gelu") else \
        FUNCTIONS[config.activation]
    layer = nn.TransformerEncoderLayer(config.d_model, config.n_heads, config.d_ff, 0.0,
                                       activation=activation, batch_first=True,
                                       norm_first=True, bias=bias)
    return nn.TransformerEncoder(layer, config.n_layers,
                                 norm=nn.LayerNorm(config.d_model, bias=bias),
                                 enable_nested_tensor=False)


def build_x_transformers(config: BenchConfig) -> nn.Module:
    """x-transformers' Encoder of the config's size: pre-norm and a final norm (its
    defaults), no biases, fused attention (``attn_flash``), ``d_head = d_model / n_heads``."""
    x_transformers = _import_x_transformers()
    activation = {"relu": nn.ReLU, "gelu": nn.GELU, "silu": nn.SiLU,
                  "gelu_tanh": lambda: nn.GELU(approximate="tanh")}[config.activation]
    mult = config.d_ff / config.d_model
    if int(config.d_model * mult) != config.d_ff:
        raise ValueError(f"d_ff: x-transformers takes d_ff as a multiple of d_model, and "
                         f"{config.d_model} × {mult} is not {config.d_ff}")
    return x_transformers.Encoder(
        dim=config.d_model, depth=config.n_layers, heads=config.n_heads,
        attn_dim_head=config.d_model // config.n_heads, ff_mult=mult, ff_no_bias=True,
        ff_custom_activation=activation(), attn_flash=True,
    )


def build_contenders(config: BenchConfig, names: Sequence[str], device: torch.device | str,
                     dtype: torch.dtype) -> dict[str, Contender]:
    """The named contenders on ``device`` in ``dtype``, seeded; ``ours-*`` share one Encoder,
    and ``torch-nobias`` carries its weights. x-transformers must import (see
    :func:`x_transformers_status`)."""
    from ..compat import to_torch

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
    if any(name in OURS for name in names):
        built["ours"] = ours
    del ours
    for module in built.values():
        module.to(device=device, dtype=dtype)

    contenders = {}
    for name in names:
        if name == "ours-explicit":
            contenders[name] = Contender(name, built["ours"],
                                         _ours_forward(built["ours"], "explicit"))
        elif name == "ours-fused":
            contenders[name] = Contender(name, built["ours"], _ours_forward(built["ours"], "auto"))
        elif name in SDPA_KERNELS:
            contenders[name] = Contender(name, built["ours"], _ours_forward(
                built["ours"], name.removeprefix("ours-sdpa-")))
        elif name == "ours-compiled":
            contenders[name] = Contender(name, built["ours"], _compiled_forward(
                built["ours"], config.compile_backend))
        elif name in TORCH_PEERS:
            contenders[name] = Contender(name, built[name], _torch_forward(built[name]))
        elif name == "x-transformers":
            contenders[name] = Contender(name, built[name], _x_forward(built[name]))
        else:
            raise ValueError(f"names: unknown contender {name!r}; expected some of "
                             f"{list(CONTENDERS)}")
    return contenders


def _ours_forward(module: Encoder, backend: str) -> Callable[[Tensor, Case], Tensor]:
    """Our Encoder with :func:`attention_backend` ``backend`` (``"auto"``: the default)."""
    def forward(x: Tensor, case: Case) -> Tensor:
        with attention_backend(backend):
            return module(x, key_padding_mask=case.key_padding_mask)

    return forward


def _compiled_forward(module: Encoder, backend: str) -> Callable[[Tensor, Case], Tensor]:
    try:
        compiled = torch.compile(module, backend=backend, dynamic=False)
    except Exception as error:  # an unknown backend: every cell records it as its error
        failure = error

        def compiled(*args: Any, **kwargs: Any) -> Tensor:
            raise failure

    def forward(x: Tensor, case: Case) -> Tensor:
        return compiled(x, key_padding_mask=case.key_padding_mask)

    return forward


def _torch_forward(module: nn.Module) -> Callable[[Tensor, Case], Tensor]:
    def forward(x: Tensor, case: Case) -> Tensor:
        return module(x, src_key_padding_mask=case.key_padding_mask)

    return forward


def _x_forward(module: nn.Module) -> Callable[[Tensor, Case], Tensor]:
    def forward(x: Tensor, case: Case) -> Tensor:
        return module(x, mask=case.keep_mask)  # True = keep, x-transformers' meaning

    return forward


# ---------------------------------------------------------------------------- running


def _run(contender: Contender, x: Tensor, case: Case, training: bool) -> None:
    """One run: a forward (inference), or a forward and a backward (training)."""
    if training:
        out = contender.forward(x, case)
        (out.float().pow(2) * case.loss_weight).sum().backward()
    else:
        with torch.inference_mode():
            contender.forward(x, case)


def _prepare(contender: Contender, x: Tensor, training: bool) -> None:
    """The mode of the pass, and no gradients left from an earlier run."""
    contender.module.train(training)
    for parameter in contender.module.parameters():
        parameter.grad = None
    x.grad = None


def _timed(fn: Callable[[], None], device: torch.device) -> float:
    """Seconds that ``fn`` takes, measured on the GPU's clock on CUDA."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1000
    start_time = time.perf_counter()
    fn()
    return time.perf_counter() - start_time


def is_out_of_memory(error: BaseException) -> bool:
    if isinstance(error, (MemoryError, torch.OutOfMemoryError)):
        return True
    message = str(error).lower()
    return isinstance(error, RuntimeError) and ("out of memory" in message
                                                or "can't allocate memory" in message)


def _describe(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0] if lines else ''}"[:300]


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def run_group(contenders: dict[str, Contender], x: Tensor, case: Case, training: bool,
              warmup: int, repeats: int) -> dict[str, dict[str, Any]]:
    """Warm every contender up, then time ``repeats`` alternated rounds of one run each.

    Returns per contender ``status`` (``ok``, ``oom`` or ``error``), ``error`` (a message
    or ``None``), ``times`` (seconds, one per round) and, on CUDA, ``memory``.
    """
    device = x.device
    x = x.detach().requires_grad_(training)
    results = {name: {"status": "ok", "error": None, "times": [], "memory": None}
               for name in contenders}

    def fail(name: str, error: BaseException) -> None:
        results[name].update(status="oom" if is_out_of_memory(error) else "error",
                             error=_describe(error), times=[], memory=None)
        _prepare(contenders[name], x, training)  # drop gradients a failed run left
        _free(device)

    for name, contender in contenders.items():
        try:
            for _ in range(warmup):
                _prepare(contender, x, training)
                _run(contender, x, case, training)
        except Exception as error:
            fail(name, error)
    names = list(contenders)
    for round_index in range(repeats):
        start = round_index % len(names)
        for name in names[start:] + names[:start]:
            if results[name]["status"] != "ok":
                continue
            contender = contenders[name]
            _prepare(contender, x, training)
            try:
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                    torch.cuda.reset_peak_memory_stats(device)
                    before = torch.cuda.memory_allocated(device)
                seconds = _timed(lambda c=contender: _run(c, x, case, training), device)
            except Exception as error:
                fail(name, error)
                continue
            results[name]["times"].append(seconds)
            if device.type == "cuda":
                peak = torch.cuda.max_memory_allocated(device)
                memory = results[name]["memory"]
                if memory is None or peak - before > memory["run_mib"] * MIB:
                    results[name]["memory"] = {
                        "status": "ok", "kind": "cuda_allocated", "baseline_mib": before / MIB,
                        "peak_mib": peak / MIB, "run_mib": (peak - before) / MIB}
    for contender in contenders.values():
        _prepare(contender, x, training)
    return results


def measure_matmul_peak(device: torch.device | str, dtype: torch.dtype,
                        size: int | None = None, runs: int = MATMUL_RUNS) -> dict[str, Any]:
    """The best FLOP/s of a ``size³`` matmul in ``dtype`` (one warm-up, best of ``runs``)."""
    device = torch.device(device)
    size = MATMUL_SIZE[device.type] if size is None else size
    generator = torch.Generator().manual_seed(0)
    a = torch.randn(size, size, generator=generator).to(device=device, dtype=dtype)
    b = torch.randn(size, size, generator=generator).to(device=device, dtype=dtype)
    a @ b
    best = min(_timed(lambda: a @ b, device) for _ in range(runs))
    return {"size": size, "best_seconds": best, "flop_per_s": 2 * size**3 / best}


def check_against_torch(ours: Encoder, theirs: nn.Module, x: Tensor,
                        case: Case) -> dict[str, float | str]:
    """Largest ``|ours - torch|`` on real positions, explicit and fused, in eval mode:
    a number, or ``"oom"``, or ``"nan"``/``"inf"`` (JSON has no such numbers)."""
    names = ("ours-explicit", "ours-fused")
    ours.eval()
    theirs.eval()
    with torch.inference_mode():
        try:
            reference = theirs(x, src_key_padding_mask=case.key_padding_mask).float()
        except Exception as error:
            if not is_out_of_memory(error):
                raise
            _free(x.device)
            return dict.fromkeys(names, "oom")
        differences: dict[str, float | str] = {}
        for name, backend in zip(names, ("explicit", "auto"), strict=True):
            try:
                with attention_backend(backend):
                    out = ours(x, key_padding_mask=case.key_padding_mask).float()
            except Exception as error:
                if not is_out_of_memory(error):
                    raise
                differences[name] = "oom"
                _free(x.device)
                continue
            gap = (out - reference).abs()  # (B, L, d)
            if case.key_padding_mask is not None:
                gap = gap[case.keep_mask]  # (real tokens, d)
            largest = gap.max().item()
            differences[name] = largest if math.isfinite(largest) else str(largest)
    return differences


# ----------------------------------------------------------------------- CPU memory


_CHILD = "import sys; from attention.bench.harness import _rss_child; _rss_child(sys.argv[1])"


def measure_cpu_peak_rss(config: BenchConfig, name: str, length: int, dtype: str,
                         pass_: str, case: str, threads: int | None = None,
                         runs: int = MEMORY_RUNS, timeout: float | None = None
                         ) -> dict[str, Any]:
    """Run one CPU cell in a fresh Python process and return its memory: ``status``, and
    when ``ok``: ``baseline_mib`` (RSS after building the contender and input),
    ``peak_mib`` (peak RSS of the measured runs), ``run_mib`` (their difference)."""
    spec = {"config": config.to_dict(), "name": config.name, "contender": name,
            "length": length, "dtype": dtype, "pass": pass_, "case": case, "runs": runs,
            "threads": threads or torch.get_num_threads()}
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])}
    try:
        done = subprocess.run([sys.executable, "-c", _CHILD, json.dumps(spec)],
                              capture_output=True, text=True, env=env, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"status": "error", "error": f"memory subprocess: over {timeout} s"}
    lines = done.stdout.strip().splitlines()
    if done.returncode or not lines:
        tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
        return {"status": "error", "error": f"memory subprocess exited with status "
                                            f"{done.returncode}: {tail}"[:300]}
    return json.loads(lines[-1])


def _rss_child(spec_text: str) -> None:
    """The subprocess of :func:`measure_cpu_peak_rss`: prints one JSON line."""
    spec = json.loads(spec_text)
    torch.set_num_threads(spec["threads"])
    try:
        result = _rss_cell(spec)
    except Exception as error:
        result = {"status": "oom" if is_out_of_memory(error) else "error",
                  "error": _describe(error)}
    print(json.dumps(result), flush=True)


def _rss_cell(spec: dict[str, Any]) -> dict[str, Any]:
    config = BenchConfig.from_dict(spec["config"], name=spec["name"])
    training = spec["pass"] == "training"
    contender = build_contenders(config, [spec["contender"]], "cpu",
                                 DTYPES[spec["dtype"]])[spec["contender"]]
    x = make_input(config, spec["length"], "cpu", DTYPES[spec["dtype"]])
    x.requires_grad_(training)
    case = make_case(spec["case"], config.batch, spec["length"], config.d_model,
                     config.padding, "cpu")
    gc.collect()
    baseline = _rss_bytes("VmRSS")
    for _ in range(config.warmup):
        _prepare(contender, x, training)
        _run(contender, x, case, training)
    reset = _reset_peak_rss()
    for _ in range(spec["runs"]):
        _prepare(contender, x, training)
        _run(contender, x, case, training)
    peak = _rss_bytes("VmHWM")
    source = "VmHWM"
    if baseline is None or peak is None:  # not Linux: the whole process's peak
        import resource

        scale = 1 if sys.platform == "darwin" else 1024
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale
        baseline, source = baseline or 0, "ru_maxrss"
    return {"status": "ok", "error": None, "kind": "cpu_rss", "baseline_mib": baseline / MIB,
            "peak_mib": peak / MIB, "run_mib": max(0, peak - baseline) / MIB,
            "peak_source": source, "peak_reset_after_warmup": reset}


def _rss_bytes(field_name: str) -> int | None:
    """``VmRSS`` (now) or ``VmHWM`` (peak) of this process from /proc, in bytes."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field_name + ":"):
                return int(line.split()[1]) * 1024  # reported in kB
    except OSError:
        return None
    return None


def _reset_peak_rss() -> bool:
    """Reset ``VmHWM`` to the current RSS (Linux ≥ 4.0), so that the peak excludes the
    warm-up (a compilation)."""
    try:
        with open("/proc/self/clear_refs", "w") as file:
            file.write("5")
    except OSError:
        return False
    return True


# ------------------------------------------------------------------------ the runner


def _timing_summary(times: list[float]) -> dict[str, Any]:
    q1, _, q3 = statistics.quantiles(times, n=4, method="inclusive")
    return {"times_ms": [t * 1e3 for t in times], "median_ms": statistics.median(times) * 1e3,
            "min_ms": min(times) * 1e3, "max_ms": max(times) * 1e3, "iqr_ms": (q3 - q1) * 1e3}


def _ratio(peer: list[float], ours: list[float]) -> dict[str, Any]:
    per_round = [p / o for p, o in zip(peer, ours, strict=True)]
    return {"median": statistics.median(per_round), "per_round": per_round}


def _cells(config: BenchConfig, group: dict[str, dict[str, Any]], length: int, dtype: str,
           pass_: str, case: Case, peaks: dict[str, Any]) -> list[dict[str, Any]]:
    """One record per contender of a group, with its timings, rates and ratios."""
    training = pass_ == "training"
    flops = encoder_flops(config.d_model, config.n_layers, config.d_ff, config.batch, length,
                          case.real_tokens, training, seq_lengths=case.seq_lengths)
    ok = {name: result for name, result in group.items() if result["status"] == "ok"}
    torch_best = min((name for name in TORCH_PEERS if name in ok),
                     key=lambda name: statistics.median(ok[name]["times"]), default=None)
    cells = []
    for name, result in group.items():
        cell: dict[str, Any] = {
            "contender": name, "pass": pass_, "case": case.name, "length": length,
            "dtype": dtype, "batch": config.batch, "real_tokens": case.real_tokens,
            "status": result["status"], "error": result["error"], "times_ms": [],
            "median_ms": None, "min_ms": None, "max_ms": None, "iqr_ms": None,
            "tokens_per_s": None, "flops": flops, "flop_per_s": None, "mfu": None,
            "memory": result["memory"], "torch_best": None, "ratios": {},
        }
        if name in ok:
            cell.update(_timing_summary(result["times"]))
            seconds = cell["median_ms"] / 1e3
            cell["tokens_per_s"] = case.real_tokens / seconds
            cell["flop_per_s"] = flops / seconds
            cell["mfu"] = cell["flop_per_s"] / peaks[dtype]["flop_per_s"]
            if name in OURS:
                cell["torch_best"] = torch_best
                cell["ratios"] = {peer: _ratio(ok[peer]["times"], result["times"])
                                  for peer in PEERS if peer in ok}
        cells.append(cell)
    return cells


def git_commit() -> tuple[str | None, bool | None]:
    """The short commit of the checkout the package runs from, and whether it has changes."""
    def git(*args: str) -> str | None:
        try:
            done = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True,
                                  timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            return None
        return done.stdout.strip() if done.returncode == 0 else None

    commit = git("rev-parse", "--short", "HEAD")
    if commit is None:
        return None, None
    status = git("status", "--porcelain", "--untracked-files=no")
    return commit, None if status is None else bool(status)


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return f"{line.partition(':')[2].strip()}, {os.cpu_count()} CPUs"
    except OSError:
        pass
    return f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs"


def environment(device: torch.device, command: str) -> dict[str, Any]:
    commit, dirty = git_commit()
    try:
        x_version = importlib.metadata.version("x-transformers")
    except importlib.metadata.PackageNotFoundError:
        x_version = None
    return {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "device": device.type, "device_name": device_name(device),
        "threads": torch.get_num_threads(), "torch": torch.__version__,
        "cuda": torch.version.cuda if device.type == "cuda" else None,
        "float32_matmul_precision": torch.get_float32_matmul_precision(),
        "x_transformers": x_version, "python": platform.python_version(),
        "platform": platform.platform(), "git_commit": commit, "git_dirty": dirty,
        "command": command,
    }


def _log_to_stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def run_benchmark(config: BenchConfig, device: str = "cpu", *,
                  contenders: Sequence[str] | None = None, threads: int | None = None,
                  command: str = "", log: Callable[[str], None] = _log_to_stderr
                  ) -> dict[str, Any]:
    """Measure every cell of ``config`` on ``device`` and return the report (see the module
    docstring; :func:`write_results` writes it). ``threads`` sets torch's CPU threads for
    the run; ``log`` receives progress lines and notices."""
    names = list(DEFAULT_CONTENDERS if contenders is None else contenders)
    for name in names:
        if name not in CONTENDERS:
            raise ConfigError(f"contenders: unknown {name!r}; expected some of "
                              f"{list(CONTENDERS)}")
    if device not in DEVICES:
        raise ConfigError(f"device: expected one of {list(DEVICES)}, got {device!r}")
    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device: 'cuda' requested, but this machine has no CUDA device "
                          f"(torch {torch.__version__}); use cpu")
    lengths, dtypes = config.lengths_for(device), config.dtypes_for(device)
    skipped = {}
    if "x-transformers" in names:
        reason = x_transformers_status()
        if reason is not None:
            log(f"notice: x-transformers skipped, it does not import ({reason}); "
                f"pip install 'attention-blocks[bench]' to include it")
            skipped["x-transformers"] = reason
            names.remove("x-transformers")
    if not names:
        raise ConfigError("contenders: none left to run")

    previous_threads = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        return _run_all(config, torch.device(device), names, skipped, lengths, dtypes,
                        command, log)
    finally:
        torch.set_num_threads(previous_threads)


def _run_all(config: BenchConfig, device: torch.device, names: list[str],
             skipped: dict[str, str], lengths: list[int], dtypes: list[str], command: str,
             log: Callable[[str], None]) -> dict[str, Any]:
    report: dict[str, Any] = {
        "schema": 1, "name": config.name, "device": device.type,
        "config": config.to_dict(), "lengths": lengths, "dtypes": dtypes,
        "contenders": names, "skipped": skipped,
        "environment": environment(device, command),
        "matmul_peak": {}, "correctness": [], "cells": [],
    }
    log(f"{config.name} on {report['environment']['device_name']}, "
        f"{torch.get_num_threads()} threads: {', '.join(names)}")
    for dtype in dtypes:
        peak = measure_matmul_peak(device, DTYPES[dtype])
        report["matmul_peak"][dtype] = peak
        log(f"matmul peak {dtype}: {peak['flop_per_s'] / 1e9:.1f} GFLOP/s "
            f"({peak['size']}³)")
    import torch._dynamo as dynamo

    measure_rss = device.type == "cpu" and config.cpu_peak_rss
    # A graph per shape, mode and mask: more than dynamo's default limit of 8.
    with dynamo.config.patch(recompile_limit=256):
        for dtype in dtypes:
            _run_dtype(config, device, names, lengths, dtype, measure_rss, report, log)
            dynamo.reset()  # the compiled graphs of this dtype are not needed again
            _free(device)
    return report


def _run_dtype(config: BenchConfig, device: torch.device, names: list[str],
               lengths: list[int], dtype: str, measure_rss: bool, report: dict[str, Any],
               log: Callable[[str], None]) -> None:
    """Every cell of one dtype, added to ``report``."""
    contenders = build_contenders(config, names, device, DTYPES[dtype])
    ours = _ours_module(config, contenders, device, DTYPES[dtype])
    for length in lengths:
        x = make_input(config, length, device, DTYPES[dtype])
        cases = {name: make_case(name, config.batch, length, config.d_model,
                                 config.padding, device) for name in config.cases}
        if ours is not None:
            for case in cases.values():
                differences = check_against_torch(
                    ours, contenders["torch-nobias"].module, x, case)
                report["correctness"].append({
                    "length": length, "dtype": dtype, "case": case.name,
                    "reference": "torch-nobias", "max_abs_diff": differences})
        for pass_ in config.passes:
            for case in cases.values():
                group = run_group(contenders, x, case, pass_ == "training",
                                  config.warmup, config.repeats)
                if measure_rss:
                    for name in names:
                        if group[name]["status"] == "ok":
                            group[name]["memory"] = measure_cpu_peak_rss(
                                config, name, length, dtype, pass_, case.name)
                cells = _cells(config, group, length, dtype, pass_, case,
                               report["matmul_peak"])
                report["cells"].extend(cells)
                log(f"{dtype} L={length} {pass_} {case.name}: " + ", ".join(
                    f"{c['contender']} " + (f"{c['median_ms']:.2f} ms"
                                            if c["status"] == "ok" else c["status"])
                    for c in cells))
                for cell in cells:
                    if cell["status"] == "error":
                        log(f"notice: {cell['contender']} failed: {cell['error']}")


def _ours_module(config: BenchConfig, contenders: dict[str, Contender],
                 device: torch.device, dtype: torch.dtype) -> Encoder | None:
    """The Encoder whose weights torch-nobias carries (``None`` without torch-nobias)."""
    if "torch-nobias" not in contenders:
        return None
    for name in OURS:
        if name in contenders:
            return contenders[name].module
    torch.manual_seed(config.seed)  # the seed build_contenders built it with
    return build_ours(config).to(device=device, dtype=dtype)


# ----------------------------------------------------------------------------- output


def _flop_unit(device: str) -> tuple[str, float]:
    return ("TFLOP/s", 1e12) if device == "cuda" else ("GFLOP/s", 1e9)


def table_rows(report: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """The header and one row of strings per cell."""
    unit, scale = _flop_unit(report["device"])
    header = ["contender", "pass", "case", "length", "dtype", "median ms", "tokens/s", unit,
              "MFU %", "mem MiB", "vs torch", "vs x-t"]
    rows = []
    for cell in report["cells"]:
        row = [cell["contender"], cell["pass"], cell["case"], str(cell["length"]),
               cell["dtype"]]
        if cell["status"] != "ok":
            rows.append(row + [cell["status"]] + ["-"] * 6)
            continue
        memory = cell["memory"]
        if memory is None:
            memory_text = "-"
        elif memory.get("status", "ok") != "ok":
            memory_text = memory["status"]
        else:
            memory_text = f"{memory['run_mib']:.0f}"
        ratios, best = cell["ratios"], cell["torch_best"]
        versus_torch = (f"{ratios[best]['median']:.2f}× ({best.removeprefix('torch-')})"
                        if best in ratios else "-")
        versus_x = (f"{ratios['x-transformers']['median']:.2f}×"
                    if "x-transformers" in ratios else "-")
        rows.append(row + [f"{cell['median_ms']:.2f}", f"{cell['tokens_per_s']:.0f}",
                           f"{cell['flop_per_s'] / scale:.2f}", f"{100 * cell['mfu']:.1f}",
                           memory_text, versus_torch, versus_x])
    return header, rows


def format_table(report: dict[str, Any], markdown: bool = False) -> str:
    header, rows = table_rows(report)
    left = {"contender", "pass", "case", "dtype"}
    if markdown:
        lines = ["| " + " | ".join(header) + " |",
                 "| " + " | ".join("---" if h in left else "---:" for h in header) + " |"]
        return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])
    widths = [max(len(h), *(len(row[i]) for row in rows)) if rows else len(h)
              for i, h in enumerate(header)]

    def line(cells: list[str]) -> str:
        return "  ".join(c.ljust(w) if h in left else c.rjust(w)
                         for c, w, h in zip(cells, widths, header, strict=True)).rstrip()

    return "\n".join([line(header)] + [line(row) for row in rows])


def result_stem(report: dict[str, Any]) -> str:
    """``{device}-{config name}-{YYYY-MM-DD}``: the name of the result files."""
    return f"{report['device']}-{report['name']}-{report['environment']['date'][:10]}"


def format_markdown(report: dict[str, Any]) -> str:
    env = report["environment"]
    unit, _ = _flop_unit(report["device"])
    commit = env["git_commit"] or "unknown"
    if env["git_dirty"]:
        commit += " (with uncommitted changes)"
    peaks = ", ".join(f"{dtype} {p['flop_per_s'] / 1e9:.1f} GFLOP/s ({p['size']}³)"
                      for dtype, p in report["matmul_peak"].items())
    memory = ("peak allocated during a timed run, above what was allocated before it"
              if report["device"] == "cuda" else
              f"peak RSS of {MEMORY_RUNS} runs after the warm-up, in a subprocess per cell, "
              "above the RSS after building the contender and its input (for ours-compiled "
              "it includes what compilation keeps)" if report["config"]["cpu_peak_rss"]
              else "not measured (cpu_peak_rss: false)")
    lines = [
        f"# Benchmark `{report['name']}` on {env['device_name']} ({report['device']})", "",
        f"{env['date']}, torch {env['torch']}, threads: {env['threads']}, commit {commit}.", "",
        f"Command: `{env['command']}`", "",
        format_table(report, markdown=True), "",
        f"- times: median of {report['config']['repeats']} alternated rounds, after "
        f"warm-up runs ({report['config']['warmup']} per contender and cell); tokens/s "
        f"counts real tokens only;",
        f"- {unit} and MFU: FLOPs counted from the shape (useful work only), against the "
        f"matmul peak measured in the run: {peaks};",
        f"- mem MiB: {memory};",
        "- vs torch, vs x-t: peer time ÷ ours time per round, median (> 1: ours is "
        "faster); vs torch is against the faster of torch-nobias and torch-bias in the "
        "cell, named in brackets.",
    ]
    if report["skipped"]:
        lines += ["", "Skipped: " + "; ".join(f"{name} ({why})"
                                              for name, why in report["skipped"].items())]
    if report["correctness"]:
        lines += ["", "## Correctness: max |ours - torch-nobias| on real positions, same "
                  "weights, eval", "", "| length | dtype | case | ours-explicit | ours-fused |",
                  "| ---: | --- | --- | ---: | ---: |"]
        for row in report["correctness"]:
            diffs = [row["max_abs_diff"][name] for name in ("ours-explicit", "ours-fused")]
            lines.append(f"| {row['length']} | {row['dtype']} | {row['case']} | " + " | ".join(
                d if isinstance(d, str) else f"{d:.2e}" for d in diffs) + " |")
    lines += ["", "## Environment", ""] + [f"- {key}: {value}" for key, value in env.items()]
    lines += ["", "## Config", "", "```json", json.dumps(report["config"], indent=2), "```"]
    return "\n".join(lines) + "\n"


def plot_scaling(report: dict[str, Any], path: str | os.PathLike) -> Path:
    """Time and memory against length, log-log: a row of two panels per dtype, a line per
    contender and pass (inference solid, training dashed), in the dense case if run."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import LogFormatter, NullFormatter

    from ..translation.plotting import save_png

    cases = report["config"]["cases"]
    case = "dense" if "dense" in cases else cases[0]
    dtypes = report["dtypes"]
    fig = Figure(figsize=(12, 4.2 * len(dtypes)), layout="constrained")
    axes = fig.subplots(len(dtypes), 2, squeeze=False)
    colors = {name: f"C{i}" for i, name in enumerate(CONTENDERS)}
    styles = {"inference": "-", "training": "--"}
    for row, dtype in enumerate(dtypes):
        time_ax, memory_ax = axes[row]
        any_memory = False
        for name in report["contenders"]:
            for pass_ in report["config"]["passes"]:
                cells = sorted((c for c in report["cells"]
                                if c["contender"] == name and c["pass"] == pass_
                                and c["case"] == case and c["dtype"] == dtype
                                and c["status"] == "ok"), key=lambda c: c["length"])
                style = dict(color=colors[name], linestyle=styles[pass_], marker="o",
                             markersize=3, label=f"{name}, {pass_}")
                if cells:
                    time_ax.plot([c["length"] for c in cells],
                                 [c["median_ms"] for c in cells], **style)
                points = [(c["length"], c["memory"]["run_mib"]) for c in cells
                          if c["memory"] and c["memory"].get("status", "ok") == "ok"
                          and c["memory"]["run_mib"] > 0]
                if points:
                    any_memory = True
                    memory_ax.plot(*zip(*points, strict=True), **style)
        time_ax.set(ylabel="median ms per run", title=f"time, {dtype}, {case}")
        memory_ax.set(ylabel="MiB above model and input",
                      title=f"peak memory of a run, {dtype}, {case}")
        for ax in (time_ax, memory_ax) if any_memory else (time_ax,):
            ax.set(xscale="log", yscale="log", xlabel="length")
            ax.set_xticks(report["lengths"], labels=[str(n) for n in report["lengths"]])
            ax.xaxis.set_minor_formatter(NullFormatter())
            ax.yaxis.set_major_formatter(LogFormatter(labelOnlyBase=False))
            ax.yaxis.set_minor_formatter(LogFormatter(labelOnlyBase=False))
            ax.grid(True, which="both", alpha=0.3)
        if not any_memory:
            memory_ax.set(xticks=[], yticks=[])
            memory_ax.text(0.5, 0.5, "memory not measured", ha="center", va="center",
                           transform=memory_ax.transAxes, color="0.4")
    handles, labels = axes[0][0].get_legend_handles_labels()
    if handles:
        fig.legend(handles, labels, loc="outside right upper", fontsize=8)
    fig.suptitle(f"{report['name']} on {report['environment']['device_name']}")
    return save_png(fig, path)


def write_results(report: dict[str, Any], out_dir: str | os.PathLike) -> list[Path]:
    """Write ``{stem}.json`` and ``{stem}.md`` (and ``{stem}.png`` for several lengths)
    into ``out_dir`` atomically; return their paths."""
    out_dir = Path(out_dir)
    stem = result_stem(report)
    text = json.dumps(report, indent=2, allow_nan=False) + "\n"
    paths = [write_atomic(out_dir / f"{stem}.json", lambda f: f.write(text.encode())),
             write_atomic(out_dir / f"{stem}.md",
                          lambda f: f.write(format_markdown(report).encode()))]
    if len(report["lengths"]) > 1:
        paths.append(plot_scaling(report, out_dir / f"{stem}.png"))
    return paths
