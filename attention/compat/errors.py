"""Exceptions a torch.nn user's code still catches.

torch.nn's attention modules reject bad input with ``AssertionError`` (shapes, mask dtypes)
or ``RuntimeError`` (``nn.Transformer``'s size checks, ``is_causal`` without a mask); this
package raises ``ValueError`` and ``TypeError`` with a message that names the argument.
The compat classes raise exceptions that are both: ``except AssertionError`` written for
torch.nn still catches them, and so does ``except ValueError``.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, TypeVar

__all__ = ["AssertionTypeError", "AssertionValueError", "RuntimeValueError", "torch_errors"]


class AssertionValueError(ValueError, AssertionError):
    """A bad value or shape, where torch.nn raises ``AssertionError``."""


class AssertionTypeError(TypeError, AssertionError):
    """A bad type (a mask neither bool nor float, a non-tensor), where torch.nn raises
    ``AssertionError``."""


class RuntimeValueError(ValueError, RuntimeError):
    """A bad value, where torch.nn raises ``RuntimeError`` (``nn.Transformer``'s checks of
    ``src`` against ``tgt``, ``is_causal`` without a mask)."""


F = TypeVar("F", bound=Callable[..., Any])


def torch_errors(forward: F) -> F:
    """Re-raise the ``ValueError``/``TypeError`` of this package's checks inside ``forward``
    as :class:`AssertionValueError`/:class:`AssertionTypeError`, same message."""

    @functools.wraps(forward)
    def checked(*args: Any, **kwargs: Any) -> Any:
        try:
            return forward(*args, **kwargs)
        except (AssertionError, RuntimeError):
            raise  # torch's own, or already converted by an inner compat module
        except ValueError as error:
            raise AssertionValueError(str(error)) from error
        except TypeError as error:
            raise AssertionTypeError(str(error)) from error

    return checked  # type: ignore[return-value]
