"""The :class:`~attention.translation.config.ModelConfig` that describes a built model.

A :class:`~attention.translation.translator.Translator` holds its model, not the run's
config; exporting writes the config back from the modules themselves, and refuses a model
that a config cannot describe (biases, another LayerNorm epsilon, a callable activation,
attention variants that differ between layers otherwise than ``global_every`` makes them),
since :func:`~attention.translation.checkpoint.model_from_config` could not rebuild it.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ...layers import ACTIVATIONS, GLU_ACTIVATIONS
from ...models import Transformer
from ...positional import LearnedPositionalEncoding, SinusoidalPositionalEncoding
from ..checkpoint import shared_entries
from ..config import ModelConfig

__all__ = ["LAYER_NORM_EPS", "model_config_of", "positional_name", "tied_parameters"]

LAYER_NORM_EPS = 1e-5  # the layers' default, which model_from_config builds


def positional_name(model: Transformer) -> str | None:
    """``"sinusoidal"``, ``"learned"``, ``"rotary"`` or ``None``: the model's positions."""
    encoding = model.encoder.positional
    if isinstance(encoding, SinusoidalPositionalEncoding):
        return "sinusoidal"
    if isinstance(encoding, LearnedPositionalEncoding):
        return "learned"
    return "rotary" if model.encoder.layers[0].self_attn.rotary is not None else None


def _activation_name(model: Transformer) -> str:
    feed_forward = model.encoder.layers[0].feed_forward
    names = GLU_ACTIVATIONS if feed_forward.gated else ACTIVATIONS
    for name, function in names.items():
        if feed_forward.activation is function:
            return name
    raise ValueError(f"activation: expected one of {list(ACTIVATIONS) + list(GLU_ACTIVATIONS)} "
                     f"(a config can name only those), got the callable "
                     f"{feed_forward.activation!r}")


def model_config_of(model: Transformer) -> ModelConfig:
    """The config whose :func:`model_from_config` builds a model shaped like ``model``.

    Raises ``TypeError`` for anything but a :class:`Transformer`, and ``ValueError`` naming
    what a config cannot express.
    """
    model = getattr(model, "_orig_mod", model)  # torch.compile's wrapper holds the module
    if not isinstance(model, Transformer):
        raise TypeError(f"model: expected an attention.Transformer, got {type(model).__name__}")
    first = model.encoder.layers[0]
    variants = _variants_of(model)
    if first.self_attn.q_proj.bias is not None:
        raise ValueError("bias: expected a model built with bias=False (a ModelConfig has no "
                         "bias), got one with biases")
    if first.norm1.eps != LAYER_NORM_EPS:
        raise ValueError(f"layer_norm_eps: expected {LAYER_NORM_EPS} (a ModelConfig has no "
                         f"epsilon), got {first.norm1.eps}")
    positional = positional_name(model)
    encoding = model.encoder.positional
    return ModelConfig(
        d_model=model.d_model,
        n_heads=first.self_attn.n_heads,
        n_encoder_layers=len(model.encoder.layers),
        n_decoder_layers=len(model.decoder.layers),
        d_ff=first.feed_forward.d_ff,
        dropout=first.dropout1.p,
        positional=positional,
        max_len=encoding.max_len if encoding is not None else ModelConfig.max_len,
        norm_first=first.norm_first,
        activation=_activation_name(model),
        tie_embeddings=_tie_embeddings(model),
        **variants,
    )


def _variants_of(model: Transformer) -> dict[str, Any]:
    """The config's attention-variant keys for ``model``, checked to be what
    :func:`model_from_config` builds from them in every layer; ``ValueError`` naming the key
    a config cannot express (a window with two widths, layers that differ otherwise)."""
    first = model.encoder.layers[0]
    window = model.encoder.window
    if window is not None and window[0] != window[1]:
        raise ValueError(f"window: expected one width on both sides (a ModelConfig has one "
                         f"int), got {window}")
    norm = "rmsnorm" if isinstance(first.norm1, nn.RMSNorm) else "layernorm"
    if norm == "layernorm" and not isinstance(first.norm1, nn.LayerNorm):
        raise ValueError(f"norm: expected LayerNorm or RMSNorm, got {type(first.norm1).__name__}")
    attention = first.self_attn
    variants = {
        "n_kv_heads": attention.n_kv_heads if attention.n_kv_heads != attention.n_heads else None,
        "window": None if window is None else window[0],
        "global_every": model.encoder.global_every,
        "alibi": attention.alibi_slopes is not None,
        "softcap": attention.softcap,
        "qk_norm": attention.q_norm is not None,
        "norm": norm,
    }
    with torch.device("meta"):  # the layout only: no weights are allocated
        expected = Transformer(2, 2, d_model=model.d_model, n_heads=attention.n_heads,
                               n_encoder_layers=len(model.encoder.layers),
                               n_decoder_layers=len(model.decoder.layers), d_ff=1,
                               positional=None, **variants)
    built = [layer.self_attn.variants() for layer in (*expected.encoder.layers,
                                                      *expected.decoder.layers)]
    found = [layer.self_attn.variants() for layer in (*model.encoder.layers,
                                                      *model.decoder.layers)]
    for want, got in zip(built, found, strict=True):
        if want != got:
            name = next(key for key in (*want, *got) if want.get(key) != got.get(key))
            raise ValueError(f"{name}: expected the same {name} in every layer as a ModelConfig "
                             f"builds ({want.get(name)!r}), got {got.get(name)!r} in a layer")
    if any(type(layer.norm1) is not type(first.norm1)
           for layer in (*model.encoder.layers, *model.decoder.layers)):
        raise ValueError("norm: expected one kind of norm in every layer, got a mix")
    return variants



def _tie_embeddings(model: Transformer) -> bool | str:
    """A config's ``tie_embeddings`` for the model's shared matrices."""
    if model.src_embed.weight is model.tgt_embed.weight:
        return "all"
    return model.lm_head.weight is model.tgt_embed.weight


def tied_parameters(model: nn.Module) -> dict[str, str]:
    """``{name: name of the same tensor}`` for each state-dict entry that repeats an earlier
    one (``lm_head.weight`` → ``tgt_embed.weight`` with tied embeddings)."""
    return shared_entries(model.state_dict(keep_vars=True))
