"""A benchmark's configuration: the choices it may name, :class:`BenchConfig` read and checked
from a YAML file with ``key=value`` overrides, and the contender names of ``--contenders``."""

from __future__ import annotations

import dataclasses
import os
import typing
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..common.config_files import check_value, parse_override_value, read_yaml_mapping
from ..common.errors import ConfigError
from ..layers import ACTIVATIONS

__all__ = [
    "CASES",
    "CONTENDERS",
    "DEFAULT_CONTENDERS",
    "DEVICES",
    "DTYPES",
    "OURS",
    "PASSES",
    "PEERS",
    "SDPA_KERNELS",
    "TORCH_PEERS",
    "WINDOWED",
    "BenchConfig",
    "apply_bench_overrides",
    "check_contenders",
    "check_device",
    "load_bench_config",
    "parse_contenders",
]

DEVICES = ("cpu", "cuda")
# Our Encoder with F.scaled_dot_product_attention forced to one kernel (attention_backend):
# opt-in contenders, to compare the kernels; one the device lacks is recorded as an error.
SDPA_KERNELS = ("ours-sdpa-math", "ours-sdpa-flash", "ours-sdpa-efficient", "ours-sdpa-cudnn")
# Our Encoder with every layer's attention within the config's ``window`` (blocked local
# attention): opt-in, since it computes another function than the full contenders.
WINDOWED = ("ours-window",)
OURS = ("ours-explicit", "ours-fused", "ours-compiled", *SDPA_KERNELS, *WINDOWED)
TORCH_PEERS = ("torch-nobias", "torch-bias")
PEERS = (*TORCH_PEERS, "x-transformers")
CONTENDERS = (*OURS, *PEERS)
DEFAULT_CONTENDERS = tuple(name for name in CONTENDERS
                           if name not in SDPA_KERNELS and name not in WINDOWED)
PASSES = ("inference", "training")
CASES = ("dense", "padded")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class BenchConfig:
    """One benchmark: the model's size, the shapes, and how to time them.

    ``lengths`` and ``dtypes`` are one list for every device or a mapping
    ``{cpu: [...], cuda: [...]}``. ``activation`` is a name in
    :data:`attention.layers.ACTIVATIONS`. ``padding`` is the fraction of padded positions in
    the padded case (below 0.5: every sequence keeps a token). ``warmup`` runs per contender
    and cell precede ``repeats`` alternated rounds (at least 5, for the ratios).
    ``cpu_peak_rss`` measures CPU memory, one subprocess per cell (slow; on by default).
    ``seed`` seeds the weights and the inputs. ``window`` is the ``ours-window``
    contender's sliding window (``None``: that contender cannot run).
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
    window: int | None = None

    @classmethod
    def from_dict(cls, raw: Any, name: str) -> BenchConfig:
        """Check every key and value of ``raw`` (a parsed YAML mapping) and build the config."""
        if not isinstance(raw, dict):
            raise ConfigError(f"config: expected a mapping of keys to values, got "
                              f"{type(raw).__name__}")
        _check_keys(cls, raw)
        hints = typing.get_type_hints(cls)
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
        self._check_sizes()
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
        if self.window is not None and self.window < 0:
            raise ConfigError(f"window: expected a non-negative integer or null, got "
                              f"{self.window}")
        if not self.compile_backend:
            raise ConfigError("compile_backend: expected a torch.compile backend name, got ''")

    def _check_sizes(self) -> None:
        for key in ("d_model", "n_heads", "n_layers", "d_ff", "batch"):
            if getattr(self, key) < 1:
                raise ConfigError(f"{key}: expected a positive integer, got "
                                  f"{getattr(self, key)}")
        if self.d_model % self.n_heads:
            raise ConfigError(f"d_model: expected a multiple of n_heads={self.n_heads}, got "
                              f"{self.d_model}")

    def lengths_for(self, device: str) -> list[int]:
        return _for_device("lengths", self.lengths, device)

    def dtypes_for(self, device: str) -> list[str]:
        return _for_device("dtypes", self.dtypes, device)

    def to_dict(self) -> dict[str, Any]:
        """The keys of a config file (without ``name``), as :meth:`from_dict` takes them."""
        raw = dataclasses.asdict(self)
        del raw["name"]
        return raw


def _check_keys(cls: type[BenchConfig], raw: dict[str, Any]) -> None:
    """Every key of ``raw`` is a field, and every field without a default is there."""
    fields = [f for f in dataclasses.fields(cls) if f.name != "name"]
    known = [f.name for f in fields]
    for key in raw:
        if key not in known:
            raise ConfigError(f"{key}: unknown key; expected one of {known}")
    required = [f.name for f in fields if f.default is dataclasses.MISSING
                and f.default_factory is dataclasses.MISSING]
    for key in required:
        if key not in raw:
            raise ConfigError(f"{key}: missing; a bench config sets {required}")


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
    raw = dict(raw)
    for assignment in assignments:
        key, sep, text = assignment.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {assignment!r}: expected key=value, e.g. repeats=10")
        raw[key] = parse_override_value(text)
    return raw


def load_bench_config(path: str | os.PathLike, overrides: Sequence[str] = ()) -> BenchConfig:
    """Read a bench YAML file (its stem names the config), apply overrides, check it all."""
    path = Path(path)
    raw = read_yaml_mapping(path, "a mapping of keys to values")
    return BenchConfig.from_dict(apply_bench_overrides(raw, overrides), name=path.stem)


def check_contenders(names: Sequence[str], config: BenchConfig | None = None) -> None:
    """Every name is one of :data:`CONTENDERS`, and (given the ``config``) one it can
    build, else a :class:`ConfigError` naming it, before any work."""
    for name in names:
        if name not in CONTENDERS:
            raise ConfigError(f"contenders: unknown {name!r}; expected some of "
                              f"{list(CONTENDERS)}")
    if config is not None and "ours-window" in names and config.window is None:
        raise ConfigError("window: the ours-window contender needs the config's window (an "
                          "integer, e.g. window=64), got null; set it or leave ours-window "
                          "out")


def check_device(device: str) -> None:
    """``device`` is one of :data:`DEVICES`, and CUDA is there when asked for."""
    if device not in DEVICES:
        raise ConfigError(f"device: expected one of {list(DEVICES)}, got {device!r}")
    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device: 'cuda' requested, but this machine has no CUDA device "
                          f"(torch {torch.__version__}); use cpu")


def parse_contenders(text: str | None) -> list[str]:
    """``"ours-fused,torch-bias"`` → the names in :data:`CONTENDERS` order; ``None``: the
    :data:`DEFAULT_CONTENDERS` (all but the forced SDPA kernels)."""
    if text is None:
        return list(DEFAULT_CONTENDERS)
    names = [name.strip() for name in text.split(",") if name.strip()]
    check_contenders(names)
    if not names:
        raise ConfigError(f"contenders: expected some of {list(CONTENDERS)}, got none")
    return [name for name in CONTENDERS if name in names]
