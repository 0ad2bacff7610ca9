"""transformers' BERT and ModernBERT to :class:`attention.Encoder` and back.

:func:`from_transformers` takes ``BertModel``, ``ModernBertModel``, their ``...ForMaskedLM``
and ``...ForSequenceClassification`` (or a folder one of them was saved in) and returns a
:class:`~attention.interop.encoders.PretrainedEncoder`,
:class:`~attention.interop.encoders.MaskedLanguageModel` or
:class:`~attention.interop.encoders.SequenceClassifier` holding the same weights: equal
outputs at real positions, with our padding-free packing and, in ModernBERT's local layers,
our linear-cost windows. :func:`to_transformers` writes such a module back.

The mapping, layer by layer:

========================  ===================================  ==========================
ours                      BERT                                 ModernBERT
========================  ===================================  ==========================
``embeddings.word``       ``embeddings.word_embeddings``       ``embeddings.tok_embeddings``
``embeddings.position``   ``embeddings.position_embeddings``   (rotary, in attention)
``embeddings.norm``       ``embeddings.LayerNorm``             ``embeddings.norm``
``self_attn.q/k/v_proj``  ``attention.self.query/key/value``   ``attn.Wqkv`` (rows q, k, v)
``self_attn.out_proj``    ``attention.output.dense``           ``attn.Wo``
``norm1``                 ``attention.output.LayerNorm``       ``attn_norm`` (layer 0: none)
``feed_forward.linear1``  ``intermediate.dense``               ``mlp.Wi`` (gate, then value)
``feed_forward.linear2``  ``output.dense``                     ``mlp.Wo``
``norm2``                 ``output.LayerNorm``                 ``mlp_norm``
``encoder.norm``          (post-norm: none)                    ``final_norm``
========================  ===================================  ==========================

transformers is imported when these functions run, never by ``import attention``: it is the
optional extra ``interop`` (``pip install 'attention-blocks[interop]'``).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from ..layers import ACTIVATIONS, GLU_ACTIVATIONS
from ..models import Encoder
from .encoders import (
    TRANSFORMERS_ACTIVATIONS,
    MaskedLanguageModel,
    PredictionHead,
    PretrainedEncoder,
    SequenceClassifier,
    TokenEmbeddings,
)

__all__ = ["from_transformers", "import_transformers", "to_transformers"]

SUPPORTED = ("BertModel", "BertForMaskedLM", "BertForSequenceClassification",
             "ModernBertModel", "ModernBertForMaskedLM", "ModernBertForSequenceClassification")
# transformers' activation names and ours (attention.layers.ACTIVATIONS / GLU_ACTIVATIONS).
FEED_FORWARD_ACTIVATIONS = TRANSFORMERS_ACTIVATIONS
GATED_ACTIVATIONS = {"gelu": "geglu", "silu": "swiglu", "swish": "swiglu"}
SPECIAL_TOKEN_IDS = ("bos_token_id", "eos_token_id", "cls_token_id", "sep_token_id")


def import_transformers() -> Any:
    """The ``transformers`` module, or an ImportError that says how to install it."""
    try:
        import transformers
    except ImportError as error:
        raise ImportError("attention.interop needs transformers: pip install "
                          "'attention-blocks[interop]'") from error
    return transformers


# ---------------------------------------------------------------------------------------
# transformers -> ours


def from_transformers(model: Any) -> PretrainedEncoder | MaskedLanguageModel | SequenceClassifier:
    """Our module holding ``model``'s weights (see the module's table), in ``model``'s
    training mode and on its device and dtype.

    Args:
        model: a ``BertModel``, ``ModernBertModel``, or their ``...ForMaskedLM`` or
            ``...ForSequenceClassification``; or the path of a folder transformers saved one
            in (read offline, with ``from_pretrained(path, local_files_only=True)``).

    Returns:
        a :class:`PretrainedEncoder` for a base model, a :class:`MaskedLanguageModel` or a
        :class:`SequenceClassifier` for the heads: ``forward(input_ids,
        attention_mask=None)`` gives ``last_hidden_state`` (zeros at padding), the MLM logits
        or the classification logits.
    """
    if isinstance(model, (str, os.PathLike)):
        model = load_saved(model)
    name = type(model).__name__
    if not isinstance(model, nn.Module) or name not in SUPPORTED:
        raise TypeError(f"model: expected one of {', '.join(SUPPORTED)} (or the folder one was "
                        f"saved in), got {name}")
    config = model.config
    if name.startswith("ModernBert"):
        base = model if name == "ModernBertModel" else model.model
        ours = modernbert_encoder(config)
        for theirs_module, ours_module in modernbert_pairs(ours, base):
            copy_parameters(theirs_module, ours_module)
        for layer, their_layer in zip(ours.encoder.layers, base.layers, strict=True):
            split_qkv(their_layer.attn.Wqkv, layer.self_attn)
    else:
        base = model if name == "BertModel" else model.bert
        ours = bert_encoder(config)
        for theirs_module, ours_module in bert_pairs(ours, base):
            copy_parameters(theirs_module, ours_module)
    result: nn.Module = ours
    if name.endswith("ForMaskedLM"):
        result = masked_lm(ours, model, config)
    elif name.endswith("ForSequenceClassification"):
        result = sequence_classifier(ours, model, config)
    parameter = next(model.parameters())
    return result.to(device=parameter.device, dtype=parameter.dtype).train(model.training)


def load_saved(path: str | os.PathLike) -> Any:
    """The model saved in folder ``path``, as the class its configuration names (one of
    :data:`SUPPORTED`; the base model's class otherwise)."""
    transformers = import_transformers()
    if not os.path.isdir(path):
        raise FileNotFoundError(f"model: expected a model instance or the folder "
                                f"transformers saved one in, got {os.fspath(path)!r}, which is "
                                f"not a folder")
    config = transformers.AutoConfig.from_pretrained(path, local_files_only=True)
    names = [name for name in (config.architectures or []) if name in SUPPORTED]
    cls = getattr(transformers, names[0]) if names else transformers.AutoModel
    return cls.from_pretrained(path, local_files_only=True)


def bert_encoder(config: Any) -> PretrainedEncoder:
    """An empty :class:`PretrainedEncoder` of BERT's layout: post-norm, biases, learned
    positions and token types."""
    if getattr(config, "is_decoder", False) or getattr(config, "add_cross_attention", False):
        raise ValueError("model: expected a BERT encoder (config.is_decoder and "
                         "config.add_cross_attention False), got a decoder")
    position_type = getattr(config, "position_embedding_type", "absolute")
    if position_type not in (None, "absolute"):
        raise ValueError(f"model: expected config.position_embedding_type 'absolute', got "
                         f"{position_type!r}")
    embeddings = TokenEmbeddings(
        config.vocab_size, config.hidden_size, max_positions=config.max_position_embeddings,
        type_vocab_size=config.type_vocab_size, norm_eps=config.layer_norm_eps,
        dropout=config.hidden_dropout_prob, padding_idx=config.pad_token_id)
    encoder = Encoder(
        config.hidden_size, config.num_attention_heads, config.num_hidden_layers,
        d_ff=config.intermediate_size, dropout=config.hidden_dropout_prob, positional=None,
        norm_first=False, bias=True, layer_norm_eps=config.layer_norm_eps,
        activation=mapped("config.hidden_act", config.hidden_act, FEED_FORWARD_ACTIVATIONS))
    for layer in encoder.layers:  # BERT: dropout on the weights, none inside the FFN
        layer.self_attn.dropout = config.attention_probs_dropout_prob
        layer.feed_forward.dropout.p = 0.0
    return PretrainedEncoder(embeddings, encoder, "bert", config.to_dict())


def modernbert_encoder(config: Any) -> PretrainedEncoder:
    """An empty :class:`PretrainedEncoder` of ModernBERT's layout: pre-norm without biases,
    rotary with a base per layer type, GeGLU, local layers within ``local_attention // 2``
    each side, no attention norm in layer 0, a final norm."""
    biases = {key: getattr(config, key) for key in ("attention_bias", "mlp_bias", "norm_bias")}
    if len(set(biases.values())) > 1:
        raise ValueError(f"model: expected config.attention_bias, mlp_bias and norm_bias "
                         f"alike (one bias flag for the stack), got {biases}")
    global_every = global_layer_period(config.layer_types)
    bases = {}  # the rotary base of each layer type present
    for layer_type in set(config.layer_types):
        rope = config.rope_parameters[layer_type]
        if rope.get("rope_type", "default") != "default":
            raise ValueError(f"model: expected config.rope_parameters[{layer_type!r}] of "
                             f"rope_type 'default', got {rope.get('rope_type')!r}")
        bases[layer_type] = rope["rope_theta"]
    local = "sliding_attention" in bases
    embeddings = TokenEmbeddings(
        config.vocab_size, config.hidden_size, norm_eps=config.norm_eps,
        norm_bias=config.norm_bias, dropout=config.embedding_dropout,
        padding_idx=config.pad_token_id)
    encoder = Encoder(
        config.hidden_size, config.num_attention_heads, config.num_hidden_layers,
        d_ff=config.intermediate_size, dropout=config.attention_dropout, positional="rotary",
        norm_first=True, bias=config.attention_bias, layer_norm_eps=config.norm_eps,
        activation=mapped("config.hidden_activation", config.hidden_activation,
                          GATED_ACTIVATIONS),
        window=config.sliding_window if local else None, global_every=global_every,
        rotary_base=bases["sliding_attention" if local else "full_attention"],
        global_rotary_base=bases["full_attention"] if global_every else None)
    encoder.layers[0].norm1 = nn.Identity()  # the embeddings' norm serves layer 0
    for layer in encoder.layers:  # ModernBERT: dropout after Wo and inside the MLP only
        layer.dropout2.p = 0.0
        layer.feed_forward.dropout.p = config.mlp_dropout
    return PretrainedEncoder(embeddings, encoder, "modernbert", config.to_dict())


def global_layer_period(layer_types: list[str]) -> int | None:
    """``k`` such that layer ``i`` is global exactly when ``i % k == 0``
    (:class:`attention.Encoder`'s ``global_every``); ``None`` when the layers are all
    global or all local."""
    is_global = [layer_type == "full_attention" for layer_type in layer_types]
    unknown = set(layer_types) - {"full_attention", "sliding_attention"}
    if unknown:
        raise ValueError(f"model: expected config.layer_types of 'full_attention' and "
                         f"'sliding_attention', got {sorted(unknown)}")
    if all(is_global) or not any(is_global):
        return None
    period = next((i for i in range(1, len(is_global)) if is_global[i]), len(is_global))
    if is_global != [i % period == 0 for i in range(len(is_global))]:
        raise ValueError(f"model: expected config.layer_types global every k-th layer from "
                         f"layer 0 (attention.Encoder's global_every), got {layer_types}")
    return period


def mapped(name: str, value: str, names: dict[str, str]) -> str:
    if value not in names:
        raise ValueError(f"model: expected {name} one of {sorted(names)}, got {value!r}")
    return names[value]


def bert_pairs(ours: PretrainedEncoder, theirs: nn.Module) -> Iterator[tuple[nn.Module,
                                                                              nn.Module]]:
    """(transformers module, ours) pairs with the same parameters, BERT's base model."""
    embeddings = theirs.embeddings
    yield embeddings.word_embeddings, ours.embeddings.word
    yield embeddings.position_embeddings, ours.embeddings.position
    yield embeddings.token_type_embeddings, ours.embeddings.token_type
    yield embeddings.LayerNorm, ours.embeddings.norm
    for layer, their_layer in zip(ours.encoder.layers, theirs.encoder.layer, strict=True):
        attention = their_layer.attention
        yield attention.self.query, layer.self_attn.q_proj
        yield attention.self.key, layer.self_attn.k_proj
        yield attention.self.value, layer.self_attn.v_proj
        yield attention.output.dense, layer.self_attn.out_proj
        yield attention.output.LayerNorm, layer.norm1
        yield their_layer.intermediate.dense, layer.feed_forward.linear1
        yield their_layer.output.dense, layer.feed_forward.linear2
        yield their_layer.output.LayerNorm, layer.norm2


def modernbert_pairs(ours: PretrainedEncoder, theirs: nn.Module) -> Iterator[tuple[nn.Module,
                                                                                    nn.Module]]:
    """(transformers module, ours) pairs with the same parameters, ModernBERT's base model
    (``Wqkv`` aside: :func:`split_qkv`)."""
    yield theirs.embeddings.tok_embeddings, ours.embeddings.word
    yield theirs.embeddings.norm, ours.embeddings.norm
    for layer, their_layer in zip(ours.encoder.layers, theirs.layers, strict=True):
        yield their_layer.attn_norm, layer.norm1
        yield their_layer.attn.Wo, layer.self_attn.out_proj
        yield their_layer.mlp_norm, layer.norm2
        yield their_layer.mlp.Wi, layer.feed_forward.linear1
        yield their_layer.mlp.Wo, layer.feed_forward.linear2
    yield theirs.final_norm, ours.encoder.norm


@torch.no_grad()
def copy_parameters(source: nn.Module, target: nn.Module) -> None:
    """``target``'s own parameters (weight, bias) set to ``source``'s of the same name."""
    source_parameters = dict(source.named_parameters(recurse=False))
    target_parameters = dict(target.named_parameters(recurse=False))
    if source_parameters.keys() != target_parameters.keys():
        raise ValueError(f"model: {type(source).__name__} has parameters "
                         f"{sorted(source_parameters)} where {type(target).__name__} has "
                         f"{sorted(target_parameters)}")
    for name, parameter in target_parameters.items():
        if parameter.shape != source_parameters[name].shape:
            raise ValueError(f"model: {type(source).__name__}.{name} has shape "
                             f"{tuple(source_parameters[name].shape)} where "
                             f"{type(target).__name__}.{name} has {tuple(parameter.shape)}")
        parameter.copy_(source_parameters[name])


@torch.no_grad()
def split_qkv(wqkv: nn.Linear, attention: nn.Module) -> None:
    """ModernBERT's fused ``Wqkv`` (rows: queries, keys, values) into ``q/k/v_proj``."""
    projections = (attention.q_proj, attention.k_proj, attention.v_proj)
    for projection, weight in zip(projections, wqkv.weight.chunk(3), strict=True):
        projection.weight.copy_(weight)
    if wqkv.bias is not None:
        for projection, bias in zip(projections, wqkv.bias.chunk(3), strict=True):
            projection.bias.copy_(bias)


@torch.no_grad()
def join_qkv(attention: nn.Module, wqkv: nn.Linear) -> None:
    """``q/k/v_proj`` into ModernBERT's fused ``Wqkv``: :func:`split_qkv` undone."""
    wqkv.weight.copy_(torch.cat([attention.q_proj.weight, attention.k_proj.weight,
                                 attention.v_proj.weight]))
    if wqkv.bias is not None:
        wqkv.bias.copy_(torch.cat([attention.q_proj.bias, attention.k_proj.bias,
                                   attention.v_proj.bias]))


def head_pairs(ours: nn.Module, theirs: nn.Module) -> list[tuple[nn.Module, nn.Module]]:
    """(transformers module, ours) pairs of a ``...ForMaskedLM``'s or
    ``...ForSequenceClassification``'s head."""
    name = type(theirs).__name__
    if name == "BertForMaskedLM":
        transform = theirs.cls.predictions.transform
        return [(transform.dense, ours.head.dense), (transform.LayerNorm, ours.head.norm),
                (theirs.cls.predictions.decoder, ours.decoder)]
    if name == "BertForSequenceClassification":
        return [(theirs.bert.pooler.dense, ours.head.dense),
                (theirs.classifier, ours.classifier)]
    pairs = [(theirs.head.dense, ours.head.dense), (theirs.head.norm, ours.head.norm)]
    last = theirs.decoder if name == "ModernBertForMaskedLM" else theirs.classifier
    return pairs + [(last, ours.decoder if name == "ModernBertForMaskedLM"
                     else ours.classifier)]


def modernbert_head(config: Any) -> PredictionHead:
    """ModernBERT's prediction head (dense, activation, norm), before its MLM decoder or its
    classifier."""
    return PredictionHead(config.hidden_size, config.classifier_activation,
                          bias=config.classifier_bias, norm=nn.LayerNorm(
                              config.hidden_size, eps=config.norm_eps, bias=config.norm_bias))


def masked_lm(encoder: PretrainedEncoder, model: nn.Module, config: Any) -> MaskedLanguageModel:
    """The MLM head of ``model`` on ``encoder``; the decoder shares the word embedding when
    ``model``'s does."""
    d_model, vocab = config.hidden_size, config.vocab_size
    if type(model).__name__ == "BertForMaskedLM":
        head = PredictionHead(d_model, config.hidden_act, norm=nn.LayerNorm(
            d_model, eps=config.layer_norm_eps))
        decoder = nn.Linear(d_model, vocab)
        tied = model.cls.predictions.decoder.weight is model.bert.embeddings.word_embeddings.weight
    else:
        head = modernbert_head(config)
        decoder = nn.Linear(d_model, vocab, bias=config.decoder_bias)
        tied = model.decoder.weight is model.model.embeddings.tok_embeddings.weight
    ours = MaskedLanguageModel(encoder, head, decoder)
    for theirs_module, ours_module in head_pairs(ours, model):
        copy_parameters(theirs_module, ours_module)
    if tied:
        ours.decoder.weight = ours.encoder.embeddings.word.weight
    return ours


def sequence_classifier(encoder: PretrainedEncoder, model: nn.Module,
                        config: Any) -> SequenceClassifier:
    """The classification head of ``model`` on ``encoder``."""
    d_model = config.hidden_size
    if type(model).__name__ == "BertForSequenceClassification":
        if model.bert.pooler is None:
            raise ValueError("model: expected a BertForSequenceClassification with its pooler")
        head = PredictionHead(d_model, "tanh")
        dropout = config.classifier_dropout if config.classifier_dropout is not None \
            else config.hidden_dropout_prob
        pooling = "cls"
    else:
        head = modernbert_head(config)
        dropout, pooling = config.classifier_dropout, config.classifier_pooling
    ours = SequenceClassifier(encoder, head, nn.Linear(d_model, config.num_labels),
                              pooling=pooling, dropout=dropout)
    for theirs_module, ours_module in head_pairs(ours, model):
        copy_parameters(theirs_module, ours_module)
    return ours


# ---------------------------------------------------------------------------------------
# ours -> transformers


def to_transformers(module: PretrainedEncoder | MaskedLanguageModel | SequenceClassifier
                    ) -> Any:
    """The transformers model of ``module``'s layout holding its weights:
    ``BertModel`` (without pooler) or ``ModernBertModel`` for a :class:`PretrainedEncoder`,
    ``...ForMaskedLM`` for a :class:`MaskedLanguageModel`, ``...ForSequenceClassification``
    for a :class:`SequenceClassifier`; in ``module``'s training mode, device and dtype.

    The configuration is read from the modules; what they do not say (token ids, label
    names, …) comes from the one they were converted from, if any. A module the
    architecture cannot express (a variant it lacks, other biases or norms) is refused by
    name.
    """
    transformers = import_transformers()
    kinds = {PretrainedEncoder: "Model", MaskedLanguageModel: "ForMaskedLM",
             SequenceClassifier: "ForSequenceClassification"}
    if type(module) not in kinds:
        raise TypeError(f"module: expected a PretrainedEncoder, MaskedLanguageModel or "
                        f"SequenceClassifier, got {type(module).__name__}")
    encoder = module if isinstance(module, PretrainedEncoder) else module.encoder
    prefix = "Bert" if encoder.architecture == "bert" else "ModernBert"
    fields = {**encoder.transformers_config, **(bert_config(encoder) if prefix == "Bert"
                                                 else modernbert_config(encoder))}
    if isinstance(module, MaskedLanguageModel):
        fields.update(masked_lm_config(module, prefix))
    elif isinstance(module, SequenceClassifier):
        fields.update(classifier_config(module, prefix))
    for key in ("architectures", "transformers_version", "model_type", "dtype", "torch_dtype"):
        fields.pop(key, None)
    for key in SPECIAL_TOKEN_IDS:  # a model built here: its own ids, which we do not know
        fields.setdefault(key, None)  # (transformers' defaults are ids of its vocabularies)
    config = getattr(transformers, f"{prefix}Config")(**fields)
    cls = getattr(transformers, prefix + kinds[type(module)])
    theirs = cls(config, add_pooling_layer=False) if cls.__name__ == "BertModel" else cls(config)
    base = theirs if kinds[type(module)] == "Model" else getattr(
        theirs, "bert" if prefix == "Bert" else "model")
    pairs = bert_pairs(encoder, base) if prefix == "Bert" else modernbert_pairs(encoder, base)
    for theirs_module, ours_module in pairs:
        copy_parameters(ours_module, theirs_module)
    if prefix == "ModernBert":
        for layer, their_layer in zip(encoder.encoder.layers, base.layers, strict=True):
            join_qkv(layer.self_attn, their_layer.attn.Wqkv)
    if not isinstance(module, PretrainedEncoder):
        for theirs_module, ours_module in head_pairs(module, theirs):
            copy_parameters(ours_module, theirs_module)
    parameter = next(module.parameters())
    return theirs.to(device=parameter.device, dtype=parameter.dtype).train(module.training)


def check_plain_attention(encoder: Encoder, architecture: str) -> None:
    """Refuse, by name, an attention variant the architecture does not have (a window is
    checked apart: ModernBERT has one)."""
    variants = encoder.layers[0].self_attn.variants()  # MultiHeadAttention's own record
    present = [name for name in variants if name != "window"]
    if present:
        raise ValueError(f"module: {architecture} has no {', '.join(present)}; expected a "
                         f"module without them")


def check_norms_and_feed_forward(encoder: Encoder, architecture: str, gated: bool,
                                 first_norm_checked: bool = False) -> None:
    """Refuse, by name, norms other than LayerNorm and a feed-forward of the other kind
    (gated or not): their parameters can have the same names and shapes as the
    architecture's, so the copy alone would not notice. ``first_norm_checked``: the caller
    has checked the first layer's ``norm1`` (ModernBERT's, an ``nn.Identity``)."""
    norms = [norm for layer in encoder.layers for norm in (layer.norm1, layer.norm2)]
    if first_norm_checked:
        norms = norms[1:]
    others = sorted({type(norm).__name__ for norm in [*norms, encoder.norm]
                     if norm is not None and not isinstance(norm, nn.LayerNorm)})
    if others:
        raise ValueError(f"module: {architecture}'s norms are LayerNorm; expected "
                         f"norm='layernorm', got {', '.join(others)}")
    feed_forward = encoder.layers[0].feed_forward
    if feed_forward.gated != gated:
        expected = "a gated activation (geglu, swiglu)" if gated else \
            "an activation that is not gated (relu, gelu, ...)"
        raise ValueError(f"module: {architecture}'s feed-forward takes {expected}; got "
                         f"{'a gated' if feed_forward.gated else 'an ungated'} one")


def bert_config(ours: PretrainedEncoder) -> dict[str, Any]:
    encoder, embeddings = ours.encoder, ours.embeddings
    layer = encoder.layers[0]
    check_plain_attention(encoder, "BERT")
    check_norms_and_feed_forward(encoder, "BERT", gated=False)
    if layer.norm_first or encoder.positional is not None or layer.self_attn.rotary \
            is not None or encoder.window is not None or layer.self_attn.q_proj.bias is None:
        raise ValueError("module: BERT is post-norm with biases and learned positions in the "
                         "embeddings; expected norm_first=False, bias=True, positional=None, "
                         "no window")
    if embeddings.position is None or embeddings.token_type is None:
        raise ValueError("module: BERT's embeddings have positions and token types; expected "
                         "TokenEmbeddings(max_positions=..., type_vocab_size=...)")
    return {"vocab_size": embeddings.word.num_embeddings, "hidden_size": encoder.d_model,
            "num_hidden_layers": len(encoder.layers),
            "num_attention_heads": layer.self_attn.n_heads,
            "intermediate_size": layer.feed_forward.d_ff,
            "hidden_act": activation_name(layer.feed_forward, FEED_FORWARD_ACTIVATIONS,
                                          ours.transformers_config.get("hidden_act")),
            "max_position_embeddings": embeddings.position.num_embeddings,
            "type_vocab_size": embeddings.token_type.num_embeddings,
            "layer_norm_eps": layer.norm1.eps, "pad_token_id": embeddings.word.padding_idx,
            "hidden_dropout_prob": layer.dropout1.p,
            "attention_probs_dropout_prob": layer.self_attn.dropout}


def modernbert_config(ours: PretrainedEncoder) -> dict[str, Any]:
    encoder, embeddings = ours.encoder, ours.embeddings
    layers = encoder.layers
    check_plain_attention(encoder, "ModernBERT")
    check_norms_and_feed_forward(encoder, "ModernBERT", gated=True, first_norm_checked=True)
    if not layers[0].norm_first or layers[0].self_attn.rotary is None \
            or not isinstance(layers[0].norm1, nn.Identity) or encoder.norm is None:
        raise ValueError("module: ModernBERT is pre-norm with rotary positions, no attention "
                         "norm in layer 0 and a final norm; expected norm_first=True, "
                         "positional='rotary', encoder.layers[0].norm1 = nn.Identity()")
    windows = {layer.self_attn.window for layer in layers} - {None}
    if len(windows) > 1 or any(left != right for left, right in windows):
        raise ValueError(f"module: ModernBERT's local layers share one window, the same each "
                         f"side; got {sorted(windows)}")
    layer_types = ["sliding_attention" if layer.self_attn.window is not None
                   else "full_attention" for layer in layers]
    rope = {kind: {"rope_type": "default", "rope_theta": layer.self_attn.rotary.base}
            for kind, layer in zip(layer_types, layers, strict=True)}
    for kind in ("full_attention", "sliding_attention"):  # a kind no layer has: the other's
        if kind not in rope:
            rope[kind] = dict(next(iter(rope.values())))
    # (every layer global: the window is unused; keep the source's)
    window = windows.pop()[0] if windows else \
        ours.transformers_config.get("local_attention", 128) // 2
    bias = layers[0].self_attn.q_proj.bias is not None
    return {"vocab_size": embeddings.word.num_embeddings, "hidden_size": encoder.d_model,
            "num_hidden_layers": len(layers), "num_attention_heads": layers[0].self_attn.n_heads,
            "intermediate_size": layers[0].feed_forward.d_ff,
            "hidden_activation": activation_name(
                layers[0].feed_forward, GATED_ACTIVATIONS,
                ours.transformers_config.get("hidden_activation")),
            "norm_eps": layers[0].norm2.eps, "norm_bias": bias, "attention_bias": bias,
            "mlp_bias": bias, "local_attention": 2 * window, "layer_types": layer_types,
            "rope_parameters": rope, "pad_token_id": embeddings.word.padding_idx,
            "embedding_dropout": embeddings.dropout.p,
            "attention_dropout": layers[0].self_attn.dropout,
            "mlp_dropout": layers[0].feed_forward.dropout.p}


def activation_name(feed_forward: nn.Module, names: dict[str, str],
                    preferred: str | None = None) -> str:
    """transformers' name of ``feed_forward``'s activation, one of ``names``' keys
    (``preferred``, the source's name, where it means the same)."""
    ours = {**ACTIVATIONS, **GLU_ACTIVATIONS}
    candidates = [name for name, our_name in names.items()
                  if ours[our_name] is feed_forward.activation]
    if candidates:
        return preferred if preferred in candidates else candidates[0]
    raise ValueError(f"module: expected a feed-forward activation among "
                     f"{sorted(set(names.values()))}, got {feed_forward.activation!r}")


def masked_lm_config(module: MaskedLanguageModel, prefix: str) -> dict[str, Any]:
    tied = module.decoder.weight is module.encoder.embeddings.word.weight
    if module.head.norm is None:
        raise ValueError("module: the MLM head of BERT and ModernBERT ends with a LayerNorm; "
                         "expected head.norm, got None")
    if prefix == "Bert":  # its head's activation is the feed-forward's, hidden_act
        if FEED_FORWARD_ACTIVATIONS.get(module.head.activation) != FEED_FORWARD_ACTIVATIONS[
                bert_config(module.encoder)["hidden_act"]]:
            raise ValueError(f"module: BERT's MLM head has the feed-forward's activation; "
                             f"expected it, got {module.head.activation!r}")
        return {"tie_word_embeddings": tied}
    return {"classifier_activation": module.head.activation,
            "classifier_bias": module.head.dense.bias is not None,
            "decoder_bias": module.decoder.bias is not None, "tie_word_embeddings": tied}


def classifier_config(module: SequenceClassifier, prefix: str) -> dict[str, Any]:
    fields = {"num_labels": module.classifier.out_features,
              "classifier_dropout": module.dropout.p}
    if prefix == "Bert":
        if module.pooling != "cls" or module.head.activation != "tanh" \
                or module.head.norm is not None:
            raise ValueError("module: BERT's classifier pools the first token through "
                             "dense + tanh; expected pooling='cls', "
                             "PredictionHead(d_model, 'tanh')")
        return fields
    if module.head.norm is None:
        raise ValueError("module: ModernBERT's classifier head ends with a LayerNorm; "
                         "expected head.norm, got None")
    return {**fields, "classifier_pooling": module.pooling,
            "classifier_activation": module.head.activation,
            "classifier_bias": module.head.dense.bias is not None}
