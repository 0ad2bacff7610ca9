"""Reading a YAML configuration file and checking its values against type hints.

Both application packages read ``--config`` files this way: :func:`read_yaml_mapping` opens one,
:func:`check_value` checks each value against its dataclass field's type, and
:func:`parse_override_value` reads the value of a ``key=value`` override as YAML would.
Every failure is a :class:`~attention.common.errors.ConfigError` naming the key or the path.
"""

from __future__ import annotations

import types
import typing
from pathlib import Path
from typing import Any

import yaml

from .errors import ConfigError

__all__ = ["check_value", "parse_override_value", "read_yaml_mapping"]


def read_yaml_mapping(path: Path, what: str) -> dict[str, Any]:
    """The mapping a ``--config`` YAML file holds (empty file: ``{}``); ``what`` describes
    the mapping expected, for the error when the file holds something else."""
    if not path.is_file():
        raise ConfigError(f"--config: file not found: {path}")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as error:
        raise ConfigError(f"--config: {path} is not valid YAML: {error}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"--config: expected {path} to hold {what}, got a "
                          f"{type(raw).__name__}")
    return raw


def parse_override_value(text: str) -> Any:
    """The value of a ``key=value`` override: ``text`` read as YAML (``""`` is ``None``)."""
    return yaml.safe_load(text) if text else None


def check_value(name: str, value: Any, expected: Any) -> Any:
    """Return ``value`` if it has type ``expected`` (ints accepted as floats), else raise."""
    origin = typing.get_origin(expected)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(expected)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return check_value(name, value, option)
            except ConfigError as error:
                errors.append(error)
        raise errors[0] if len(errors) == 1 else ConfigError(
            f"{name}: expected {_type_name(expected)}, got {type(value).__name__} {value!r}")
    if origin is list:
        (item_type,) = typing.get_args(expected)
        if not isinstance(value, list):
            raise ConfigError(f"{name}: expected a list of {item_type.__name__}, got "
                              f"{type(value).__name__} {value!r}")
        return [check_value(f"{name}[{i}]", item, item_type) for i, item in enumerate(value)]
    if expected is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if expected is float and isinstance(value, str):
        # YAML 1.1 reads 1e-3 (no dot) as a string; users mean the number.
        try:
            return float(value)
        except ValueError:
            pass
    if expected in (int, float) and isinstance(value, bool) or not isinstance(value, expected):
        raise ConfigError(f"{name}: expected {_type_name(expected)}, got "
                          f"{type(value).__name__} {value!r}")
    return value


def _type_name(expected: Any) -> str:
    if typing.get_origin(expected) in (typing.Union, types.UnionType):
        return " or ".join(_type_name(t) for t in typing.get_args(expected))
    return "null" if expected is type(None) else getattr(expected, "__name__", str(expected))
