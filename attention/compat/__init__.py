"""Drop-in replacements for torch.nn's Transformer family, and weight converters.

``MultiheadAttention``, ``TransformerEncoderLayer``, ``TransformerEncoder``,
``TransformerDecoderLayer``, ``TransformerDecoder`` and ``Transformer`` take torch.nn's
constructor arguments with torch.nn's defaults (sequence first, post-norm, relu, biases,
dropout 0.1) and torch.nn's forward signatures, and hold torch.nn's parameters: same names,
shapes, order and initialisation. An existing model changes its import and nothing else;
its state dicts, and its optimizer's, load as they are. State dicts with separate
``q_proj``/``k_proj``/``v_proj`` and a ``feed_forward`` (this package's batch-first layers,
and ``attention.compat`` before it held torch.nn's parameters) load too. The attention is
this package's :func:`attention.functional.attend`.

``from_torch(module)`` and ``to_torch(module)`` convert trained modules both ways.

Beyond torch.nn: ``TransformerDecoder.new_cache()`` and ``forward(…, cache=)`` decode
incrementally (each new token costs one position, not a re-run of the prefix).

Differences from torch.nn, on purpose:

- a query whose keys are all masked gets zeros, not NaN;
- no nested-tensor fast path: padded positions get computed values, not zeros;
- attention weights are returned before dropout (torch.nn returns them after), so their
  rows sum to 1 in training too;
- bad input raises exceptions that are ``AssertionError`` and ``RuntimeError`` (whichever
  torch.nn raises for the mistake, code that catches it still does) and also
  ``ValueError``/``TypeError`` with a message naming the argument
  (:mod:`attention.compat.errors`).

The classes are not subclasses of torch.nn's (``isinstance(m, nn.MultiheadAttention)`` is
false). TorchScript (``torch.jit.script``) is not supported; ``torch.compile`` and
``torch.export`` are.
"""

from .convert import from_torch, to_torch
from .decoder import DecoderCache, LayerCache, TransformerDecoder, TransformerDecoderLayer
from .encoder import TransformerEncoder, TransformerEncoderLayer
from .errors import InvalidInputError, InvalidTypeError
from .multihead import MultiheadAttention
from .transformer import Transformer

__all__ = [
    "DecoderCache",
    "InvalidInputError",
    "InvalidTypeError",
    "LayerCache",
    "MultiheadAttention",
    "Transformer",
    "TransformerDecoder",
    "TransformerDecoderLayer",
    "TransformerEncoder",
    "TransformerEncoderLayer",
    "from_torch",
    "to_torch",
]
