"""Pretrained encoders on :class:`attention.Encoder`: token embeddings, the encoder stack, and
the masked-language-model and sequence-classification heads that BERT and ModernBERT put on
top. Plain torch modules, built by :func:`attention.interop.from_transformers` (which fills
them with a transformers model's weights) or by hand.

``attention_mask`` follows transformers: ``(batch, length)``, 1 (or ``True``) at real tokens
and 0 at padding. Padding is left out of the computation (:mod:`attention.packing`): real
positions get what the unpadded sequence gives, padded positions get zeros.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .._checks import check_choice, check_positive_int, shape_of
from ..layers import ACTIVATIONS, layer_norm
from ..models import Encoder

__all__ = ["HEAD_ACTIVATIONS", "TRANSFORMERS_ACTIVATIONS", "MaskedLanguageModel",
           "PredictionHead", "PretrainedEncoder", "SequenceClassifier", "TokenEmbeddings"]

ARCHITECTURES = ("bert", "modernbert")
POOLINGS = ("cls", "mean")
# transformers' activation names, and ours (attention.layers.ACTIVATIONS) for each.
TRANSFORMERS_ACTIVATIONS = {"gelu": "gelu", "gelu_new": "gelu_tanh",
                            "gelu_pytorch_tanh": "gelu_tanh", "relu": "relu", "silu": "silu",
                            "swish": "silu"}
# The heads' activations, by transformers' name (BERT's pooler: tanh).
HEAD_ACTIVATIONS = {**{name: ACTIVATIONS[ours] for name, ours in
                       TRANSFORMERS_ACTIVATIONS.items()}, "tanh": torch.tanh}


class TokenEmbeddings(nn.Module):
    """Token ids to vectors: ``dropout(norm(word + position + token type))``.

    BERT adds learned absolute positions (``max_positions`` of them) and token types
    (``type_vocab_size``); ModernBERT has neither (its positions are rotary, in attention).

    Shape:
        input_ids, token_type_ids: ``(batch, length)`` → ``(batch, length, d_model)``.
    """

    def __init__(self, vocab_size: int, d_model: int, *, max_positions: int | None = None,
                 type_vocab_size: int | None = None, norm_eps: float = 1e-5,
                 norm_bias: bool = True, dropout: float = 0.0,
                 padding_idx: int | None = None) -> None:
        super().__init__()
        self.d_model = check_positive_int("d_model", d_model)
        self.word = nn.Embedding(check_positive_int("vocab_size", vocab_size), d_model,
                                 padding_idx=padding_idx)
        self.position = None if max_positions is None else nn.Embedding(
            check_positive_int("max_positions", max_positions), d_model)
        self.token_type = None if type_vocab_size is None else nn.Embedding(
            check_positive_int("type_vocab_size", type_vocab_size), d_model)
        self.norm = layer_norm(d_model, norm_eps, norm_bias)
        self.dropout = nn.Dropout(dropout)

    def forward(self, input_ids: Tensor, token_type_ids: Tensor | None = None) -> Tensor:
        x = self.word(input_ids)  # (b, n) -> (b, n, d)
        if self.position is not None:
            length = input_ids.shape[1]
            if length > self.position.num_embeddings:
                raise ValueError(f"input_ids: expected at most {self.position.num_embeddings} "
                                 f"positions (the learned position table), got {length}")
            x = x + self.position(torch.arange(length, device=input_ids.device))
        if self.token_type is not None:
            if token_type_ids is None:
                token_type_ids = torch.zeros_like(input_ids)
            elif not isinstance(token_type_ids, Tensor) or token_type_ids.shape != \
                    input_ids.shape or token_type_ids.dtype.is_floating_point:
                raise ValueError(f"token_type_ids: expected integer ids of the shape of "
                                 f"input_ids {shape_of(input_ids)}, got "
                                 f"{described(token_type_ids)}")
            x = x + self.token_type(token_type_ids)
        elif token_type_ids is not None:
            raise ValueError("token_type_ids: expected None, as this model has no token type "
                             "embeddings")
        return self.dropout(self.norm(x))


class PretrainedEncoder(nn.Module):
    """:class:`TokenEmbeddings` then an :class:`attention.Encoder`: what transformers calls
    the base model (``BertModel``, ``ModernBertModel``), giving ``last_hidden_state``.

    Args:
        embeddings: the token embeddings.
        encoder: the stack, ``d_model`` as the embeddings'.
        architecture: ``"bert"`` or ``"modernbert"``, the layout
            :func:`attention.interop.to_transformers` writes back.
        transformers_config: the source model's configuration as a dict (what
            ``to_transformers`` keeps that the modules do not say: token ids, labels, …).

    Shape:
        input_ids, attention_mask, token_type_ids: ``(batch, length)`` → ``(batch, length,
        d_model)``.
    """

    def __init__(self, embeddings: TokenEmbeddings, encoder: Encoder, architecture: str,
                 transformers_config: dict | None = None) -> None:
        super().__init__()
        check_choice("architecture", architecture, ARCHITECTURES)
        if embeddings.d_model != encoder.d_model:
            raise ValueError(f"encoder: expected d_model={embeddings.d_model} (the "
                             f"embeddings'), got {encoder.d_model}")
        self.embeddings = embeddings
        self.encoder = encoder
        self.architecture = architecture
        self.transformers_config = dict(transformers_config or {})

    @property
    def d_model(self) -> int:
        return self.encoder.d_model

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None,
                token_type_ids: Tensor | None = None) -> Tensor:
        if not isinstance(input_ids, Tensor) or input_ids.dim() != 2 \
                or input_ids.dtype.is_floating_point or input_ids.dtype == torch.bool:
            raise ValueError(f"input_ids: expected integer token ids (batch, length), got "
                             f"{described(input_ids)}")
        padding = padding_of(attention_mask, input_ids)
        x = self.embeddings(input_ids, token_type_ids)
        return self.encoder(x, key_padding_mask=padding)


def padding_of(attention_mask: Tensor | None, input_ids: Tensor) -> Tensor | None:
    """transformers' ``attention_mask`` (1 = real token) as a ``key_padding_mask`` (``True``
    = padding), or ``None`` without one."""
    if attention_mask is None:
        return None
    if not isinstance(attention_mask, Tensor) or attention_mask.dtype.is_floating_point \
            or tuple(attention_mask.shape) != tuple(input_ids.shape):
        raise ValueError(f"attention_mask: expected an integer or boolean tensor of the "
                         f"shape of input_ids {shape_of(input_ids)}, 1 at real tokens and 0 "
                         f"at padding, got {described(attention_mask)}")
    return attention_mask == 0


def described(value: object) -> str:
    """``dtype (shape)`` of a tensor, the type's name of anything else: for errors."""
    if isinstance(value, Tensor):
        return f"{value.dtype} {shape_of(value)}"
    return type(value).__name__


class PredictionHead(nn.Module):
    """``norm(activation(dense(x)))``: BERT's and ModernBERT's transform before the
    vocabulary or the classes (BERT's pooler: ``tanh``, no norm).

    Shape:
        x: ``(..., d_model)`` → same shape.
    """

    def __init__(self, d_model: int, activation: str, *, bias: bool = True,
                 norm: nn.Module | None = None) -> None:
        super().__init__()
        check_choice("activation", activation, list(HEAD_ACTIVATIONS))
        self.dense = nn.Linear(d_model, d_model, bias=bias)
        self.activation = activation
        self.norm = norm

    def forward(self, x: Tensor) -> Tensor:
        x = HEAD_ACTIVATIONS[self.activation](self.dense(x))
        return x if self.norm is None else self.norm(x)

    def extra_repr(self) -> str:
        return f"activation={self.activation!r}"


class MaskedLanguageModel(nn.Module):
    """A :class:`PretrainedEncoder` with the masked-language-model head: ``decoder(head(h))``,
    the logits over the vocabulary at every position (``...ForMaskedLM``).

    ``decoder.weight`` is the word embedding's own parameter when the source tied them.

    Shape:
        input_ids, attention_mask: ``(batch, length)`` → ``(batch, length, vocab_size)``.
    """

    def __init__(self, encoder: PretrainedEncoder, head: PredictionHead,
                 decoder: nn.Linear) -> None:
        super().__init__()
        self.encoder = encoder
        self.head = head
        self.decoder = decoder

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None,
                token_type_ids: Tensor | None = None) -> Tensor:
        return self.decoder(self.head(self.encoder(input_ids, attention_mask, token_type_ids)))


class SequenceClassifier(nn.Module):
    """A :class:`PretrainedEncoder` with a classification head
    (``...ForSequenceClassification``): the sequence is pooled (its first token, ``"cls"``,
    or the mean of its real tokens, ``"mean"``), then ``classifier(dropout(head(pooled)))``.
    ``"cls"`` reads position 0: with left padding that is padding, zeros here (transformers
    reads the vector it computed there), so pad on the right, as BERT's tokenizers do.

    Shape:
        input_ids, attention_mask: ``(batch, length)`` → ``(batch, n_labels)``.
    """

    def __init__(self, encoder: PretrainedEncoder, head: PredictionHead, classifier: nn.Linear,
                 *, pooling: str = "cls", dropout: float = 0.0) -> None:
        super().__init__()
        check_choice("pooling", pooling, POOLINGS)
        self.encoder = encoder
        self.head = head
        self.dropout = nn.Dropout(dropout)
        self.classifier = classifier
        self.pooling = pooling

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None,
                token_type_ids: Tensor | None = None) -> Tensor:
        hidden = self.encoder(input_ids, attention_mask, token_type_ids)  # (b, n, d)
        if self.pooling == "cls":
            pooled = hidden[:, 0]
        else:
            real = (hidden.new_ones(hidden.shape[:2]) if attention_mask is None
                    else (attention_mask != 0).to(hidden.dtype)).unsqueeze(-1)
            # (a row of padding only pools to zeros, not NaN)
            pooled = (hidden * real).sum(1) / real.sum(1).clamp_min(1)
        return self.classifier(self.dropout(self.head(pooled)))

    def extra_repr(self) -> str:
        return f"pooling={self.pooling!r}"
