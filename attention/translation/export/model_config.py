"""The :class:`~attention.translation.config.ModelConfig` that describes a built model.

A :class:`~attention.translation.translator.Translator` holds its model, not the run's
config; exporting writes the config back from the modules themselves, and refuses a model
that a config cannot describe (biases, another LayerNorm epsilon, a callable activation),
since :func:`~attention.translation.checkpoint.model_from_config` could not rebuild it.
"""

from __future__ import annotations

from torch import nn

from ...layers import ACTIVATIONS
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
    activation = model.encoder.layers[0].feed_forward.activation
    for name, function in ACTIVATIONS.items():
        if activation is function:
            return name
    raise ValueError(f"activation: expected one of {list(ACTIVATIONS)} (a config can name "
                     f"only those), got the callable {activation!r}")


def model_config_of(model: Transformer) -> ModelConfig:
    """The config whose :func:`model_from_config` builds a model shaped like ``model``.

    Raises ``TypeError`` for anything but a :class:`Transformer`, and ``ValueError`` naming
    what a config cannot express.
    """
    model = getattr(model, "_orig_mod", model)  # torch.compile's wrapper holds the module
    if not isinstance(model, Transformer):
        raise TypeError(f"model: expected an attention.Transformer, got {type(model).__name__}")
    first = model.encoder.layers[0]
    for layer in (*model.encoder.layers, *model.decoder.layers):
        variants = layer.self_attn.variants()
        if variants:
            name, value = next(iter(variants.items()))
            raise ValueError(f"{name}: expected plain multi-head attention (a ModelConfig has "
                             f"no {name}), got {name}={value!r}")
    if not isinstance(first.norm1, nn.LayerNorm):
        raise ValueError(f"norm: expected LayerNorm (a ModelConfig has no norm), got "
                         f"{type(first.norm1).__name__}")
    if first.feed_forward.gated:
        raise ValueError("activation: expected one of the ungated activations "
                         f"{list(ACTIVATIONS)} (a ModelConfig has no gated feed-forward), got "
                         "a gated one")
    if first.self_attn.q_proj.bias is not None:
        raise ValueError("bias: expected a model built with bias=False (a ModelConfig has no "
                         "bias), got one with biases")
    if first.norm1.eps != LAYER_NORM_EPS:
        raise ValueError(f"layer_norm_eps: expected {LAYER_NORM_EPS} (a ModelConfig has no "
                         f"epsilon), got {first.norm1.eps}")
    positional = positional_name(model)
    if positional is None:
        raise ValueError("positional: expected sinusoidal, learned or rotary (a config must "
                         "name one), got a model without positions")
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
    )


def _tie_embeddings(model: Transformer) -> bool | str:
    """A config's ``tie_embeddings`` for the model's shared matrices."""
    if model.src_embed.weight is model.tgt_embed.weight:
        return "all"
    return model.lm_head.weight is model.tgt_embed.weight


def tied_parameters(model: nn.Module) -> dict[str, str]:
    """``{name: name of the same tensor}`` for each state-dict entry that repeats an earlier
    one (``lm_head.weight`` → ``tgt_embed.weight`` with tied embeddings)."""
    return shared_entries(model.state_dict(keep_vars=True))
