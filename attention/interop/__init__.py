"""Bridges to Hugging Face transformers (the optional extra ``interop``).

- :func:`from_transformers` / :func:`to_transformers`: BERT and ModernBERT (base models and
  their masked-LM and sequence-classification heads) onto :class:`attention.Encoder` and back.
- :func:`register_with_transformers`: ``attn_implementation="attention_blocks"``, our
  attention inside any transformers model that takes a registered attention function.

``import attention.interop`` does not import transformers; the functions do, when called.
"""

from .convert import from_transformers, to_transformers
from .encoders import (
    MaskedLanguageModel,
    PredictionHead,
    PretrainedEncoder,
    SequenceClassifier,
    TokenEmbeddings,
)
from .registry import ATTENTION_IMPLEMENTATION, register_with_transformers

__all__ = [
    "ATTENTION_IMPLEMENTATION",
    "MaskedLanguageModel",
    "PredictionHead",
    "PretrainedEncoder",
    "SequenceClassifier",
    "TokenEmbeddings",
    "from_transformers",
    "register_with_transformers",
    "to_transformers",
]
