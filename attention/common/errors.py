"""The error both application packages raise for a configuration that cannot run."""

from __future__ import annotations

__all__ = ["ConfigError"]


class ConfigError(ValueError):
    """A configuration that cannot run: the message names the key or the path."""
