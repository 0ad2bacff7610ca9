"""Helpers both application packages (``attention.translation``, ``attention.bench``) share.

They sit beneath both, so neither borrows from the other: the configuration error, reading
YAML files and checking their values, atomic writes, PNG saving and the choice of device.
Like the application, they may use the application's dependencies (pyyaml, matplotlib); the
library layer (``attention`` outside ``translation``, ``bench`` and ``common``) never imports
them.
"""

from .config_files import check_value, parse_override_value, read_yaml_mapping
from .devices import resolve_device
from .errors import ConfigError
from .files import write_atomic, write_text_atomic

__all__ = [
    "ConfigError",
    "check_value",
    "parse_override_value",
    "read_yaml_mapping",
    "resolve_device",
    "write_atomic",
    "write_text_atomic",
]
