"""Exceptions a torch.nn user's code still catches.

torch.nn's attention modules reject bad input with ``AssertionError`` (its shape asserts,
mask dtypes) or ``RuntimeError`` (``nn.Transformer``'s size checks, ``is_causal`` without a
mask, mask shapes, and the errors its matrix products raise for a wrong size or dtype); this
package raises ``ValueError`` and ``TypeError`` with a message that names the argument. The
compat classes raise exceptions that are all of these: ``except AssertionError`` or
``except RuntimeError`` written for torch.nn still catches them, and so does
``except ValueError`` (or ``TypeError``).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, TypeVar

__all__ = ["InvalidInputError", "InvalidTypeError", "torch_errors"]


class InvalidInputError(ValueError, AssertionError, RuntimeError):
    """A bad value or shape: our ``ValueError``, and the ``AssertionError`` or
    ``RuntimeError`` torch.nn raises for the same mistake."""


class InvalidTypeError(TypeError, AssertionError, RuntimeError):
    """A bad type (a mask neither bool nor float, an integer input, a non-tensor): our
    ``TypeError``, and torch.nn's ``AssertionError`` or ``RuntimeError``."""


F = TypeVar("F", bound=Callable[..., Any])


def torch_errors(function: F) -> F:
    """Re-raise the plain ``ValueError``/``TypeError`` of this package's checks inside
    ``function`` (a compat class's ``__init__`` or ``forward``) as :class:`InvalidInputError`
    /:class:`InvalidTypeError`, same message. Subclasses (a user's own exceptions, raised by
    an activation or a hook) pass through unchanged."""

    @functools.wraps(function)
    def checked(*args: Any, **kwargs: Any) -> Any:
        try:
            return function(*args, **kwargs)
        except (ValueError, TypeError) as error:
            if type(error) is ValueError:
                raise InvalidInputError(str(error)) from error
            if type(error) is TypeError:
                raise InvalidTypeError(str(error)) from error
            raise

    return checked  # type: ignore[return-value]
