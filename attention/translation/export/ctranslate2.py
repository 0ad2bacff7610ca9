"""A trained translator as a CTranslate2 model folder, through CTranslate2's own spec API.

``export_ctranslate2(translator, "model_ct2", quantization="int8")`` fills a
``ctranslate2.specs.TransformerSpec`` with the model's weights (as CTranslate2's OpenNMT-py
and fairseq converters do) and lets CTranslate2's ``Converter`` quantize and write it. The
folder also holds the two tokenizers, so that it is all a user needs::

    import ctranslate2
    from tokenizers import Tokenizer

    translator = ctranslate2.Translator("model_ct2", device="cpu")
    source = Tokenizer.from_file("model_ct2/source_tokenizer.json")
    target = Tokenizer.from_file("model_ct2/target_tokenizer.json")
    tokens = [source.encode(sentence).tokens for sentence in sentences]
    results = translator.translate_batch(
        tokens, beam_size=1, suppress_sequences=[["<pad>"], ["<bos>"]],
        min_decoding_length=0, max_decoding_length=64)
    texts = [target.decode([target.token_to_id(t) for t in r.hypotheses[0]]) for r in results]

The model's config asks CTranslate2 to append ``<eos>`` to each source
(``add_source_eos``), as :meth:`Translator.encode` does: pass the tokens without it. Our
searches never generate ``<pad>`` or ``<bos>`` (``suppress_sequences`` above) and may end a
translation at once (``min_decoding_length=0``; CTranslate2's default is 1). With those,
greedy search gives our tokens (the tests check it in float32). Beam search ranks finished
hypotheses as ours does (log-probability over length, ``<eos>`` counted), but a sentence
that reaches ``max_decoding_length`` ends differently: ours ranks its unfinished hypotheses
with the finished ones, CTranslate2 returns a finished one if it has any, so beam outputs can
differ there.

How the weights map:

- token embeddings (scaled by √d_model in both), and the positions written as a table:
  our sinusoid interleaves sin and cos (``pe[p, 2i] = sin``, ``pe[p, 2i+1] = cos``) where
  CTranslate2's built-in one does not, so the table is given explicitly, ``max(max_len,
  1024)`` positions for sinusoidal ones and the ``max_len`` learned ones (CTranslate2 then
  needs ``max_input_length`` and ``max_decoding_length`` at most ``max_len``);
- self-attention's ``q_proj``, ``k_proj``, ``v_proj`` fused into one linear layer,
  cross-attention's ``q_proj`` alone and ``k_proj``, ``v_proj`` fused;
- no biases in linear layers (ours have none); LayerNorms get a zero ``beta``;
- pre-norm or post-norm, the final LayerNorms of a pre-norm stack, relu/gelu/gelu_tanh/silu;
- the output head (a tied one is stored once, CTranslate2 aliases equal weights).

Rotary positions have no CTranslate2 encoder-decoder counterpart here and are refused.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from tokenizers import Tokenizer
from torch import Tensor, nn

from ...models import Transformer
from ...positional import sinusoid_table
from ..config import ModelConfig
from ..data.tokenizer import BOS_ID, EOS_ID, SPECIAL_TOKENS, UNK_ID
from .atomic_folder import write_folder_atomic
from .model_config import model_config_of

if TYPE_CHECKING:
    from ..translator import Translator

__all__ = ["MIN_SINUSOID_POSITIONS", "ctranslate2_spec", "export_ctranslate2",
           "tokens_by_id"]

# CTranslate2 truncates sources to max_input_length=1024 by default: the sinusoid table
# covers at least that many positions.
MIN_SINUSOID_POSITIONS = 1024
_ACTIVATIONS = {"relu": "RELU", "gelu": "GELU", "gelu_tanh": "GELUTanh", "silu": "SWISH"}


def _ctranslate2() -> Any:
    try:
        import ctranslate2
    except ImportError:
        raise ImportError("export_ctranslate2 needs the ctranslate2 package: pip install "
                          "'attention-blocks[ctranslate2]'") from None
    return ctranslate2


def tokens_by_id(tokenizer: Tokenizer, vocab_size: int, name: str) -> list[str]:
    """The tokenizer's tokens in id order: ``vocab_size`` of them, the special ones first."""
    vocabulary = tokenizer.get_vocab(with_added_tokens=True)
    tokens = sorted(vocabulary, key=vocabulary.__getitem__)
    if [vocabulary[t] for t in tokens] != list(range(vocab_size)):
        raise ValueError(f"{name}: expected ids 0-{vocab_size - 1} (the model's vocabulary), "
                         f"got {len(tokens)} tokens with ids {min(vocabulary.values())}-"
                         f"{max(vocabulary.values())}")
    if tokens[:len(SPECIAL_TOKENS)] != SPECIAL_TOKENS:
        raise ValueError(f"{name}: expected the special tokens {SPECIAL_TOKENS} first, got "
                         f"{tokens[:len(SPECIAL_TOKENS)]}")
    return tokens


def _weight(tensor: Tensor) -> Tensor:
    """A copy of ``tensor`` for the spec: CTranslate2 quantizes the spec's arrays in place,
    which must not reach the model's own weights."""
    return tensor.detach().cpu().clone(memory_format=torch.contiguous_format)


def _linear(spec: Any, *linears: nn.Linear) -> None:
    """``spec`` gets the weights of ``linears`` stacked on the output dimension (no bias)."""
    spec.weight = _weight(torch.cat([linear.weight for linear in linears]))


def _layer_norm(spec: Any, norm: nn.LayerNorm) -> None:
    spec.gamma = _weight(norm.weight)
    spec.beta = torch.zeros_like(spec.gamma)  # ours have no bias; CTranslate2 needs one


def _attention(spec: Any, attention: nn.Module, norm: nn.LayerNorm, *, self_attention: bool
               ) -> None:
    """Self-attention: one fused q/k/v linear; cross-attention: q, then fused k/v."""
    if self_attention:
        _linear(spec.linear[0], attention.q_proj, attention.k_proj, attention.v_proj)
    else:
        _linear(spec.linear[0], attention.q_proj)
        _linear(spec.linear[1], attention.k_proj, attention.v_proj)
    _linear(spec.linear[-1], attention.out_proj)
    _layer_norm(spec.layer_norm, norm)


def _feed_forward(spec: Any, feed_forward: nn.Module, norm: nn.LayerNorm) -> None:
    _linear(spec.linear_0, feed_forward.linear1)
    _linear(spec.linear_1, feed_forward.linear2)
    _layer_norm(spec.layer_norm, norm)


def _positions(stack: nn.Module) -> Tensor:
    """The ``(positions, d_model)`` table the stack adds to its embeddings."""
    encoding = stack.positional
    if hasattr(encoding, "weight"):  # learned
        return _weight(encoding.weight)
    return sinusoid_table(max(encoding.max_len, MIN_SINUSOID_POSITIONS), encoding.d_model)


def ctranslate2_spec(model: Transformer, source_tokens: Sequence[str],
                     target_tokens: Sequence[str]) -> Any:
    """A ``ctranslate2.specs.TransformerSpec`` holding ``model``'s weights and vocabularies.

    Raises ``ValueError`` for what CTranslate2 cannot run as ours (rotary positions) and
    what a config cannot describe (see :func:`model_config_of`).
    """
    _ctranslate2()
    from ctranslate2.specs import common_spec, transformer_spec

    config = model_config_of(model)
    for key in ("n_kv_heads", "window", "global_every", "alibi", "softcap", "qk_norm", "norm"):
        value, plain = getattr(config, key), getattr(ModelConfig, key)
        if value != plain:
            raise ValueError(f"{key}: expected {plain!r} (this export writes CTranslate2's "
                             f"plain Transformer), got {value!r}")
    if config.activation not in _ACTIVATIONS:
        raise ValueError(f"activation: expected one of {list(_ACTIVATIONS)} (the ones this "
                         f"export maps to CTranslate2's), got {config.activation!r}")
    if config.positional not in ("sinusoidal", "learned"):
        raise ValueError(f"positional: expected sinusoidal or learned positions (the ones "
                         f"CTranslate2's Transformer adds to the embeddings), got "
                         f"{config.positional!r}")
    spec = transformer_spec.TransformerSpec.from_config(
        (config.n_encoder_layers, config.n_decoder_layers), config.n_heads,
        pre_norm=config.norm_first,
        activation=getattr(common_spec.Activation, _ACTIVATIONS[config.activation]))
    encoder, decoder = spec.encoder, spec.decoder
    encoder.embeddings[0].weight = _weight(model.src_embed.weight)
    encoder.position_encodings.encodings = _positions(model.encoder)
    for layer_spec, layer in zip(encoder.layer, model.encoder.layers, strict=True):
        _attention(layer_spec.self_attention, layer.self_attn, layer.norm1, self_attention=True)
        _feed_forward(layer_spec.ffn, layer.feed_forward, layer.norm2)
    decoder.embeddings.weight = _weight(model.tgt_embed.weight)
    decoder.position_encodings.encodings = _positions(model.decoder)
    for layer_spec, layer in zip(decoder.layer, model.decoder.layers, strict=True):
        _attention(layer_spec.self_attention, layer.self_attn, layer.norm1, self_attention=True)
        _attention(layer_spec.attention, layer.cross_attn, layer.norm2, self_attention=False)
        _feed_forward(layer_spec.ffn, layer.feed_forward, layer.norm3)
    if config.norm_first:
        _layer_norm(encoder.layer_norm, model.encoder.norm)
        _layer_norm(decoder.layer_norm, model.decoder.norm)
    decoder.projection.weight = _weight(model.lm_head.weight)

    spec.register_source_vocabulary(list(source_tokens))
    spec.register_target_vocabulary(list(target_tokens))
    spec.config.layer_norm_epsilon = model.encoder.layers[0].norm1.eps
    spec.config.unk_token = SPECIAL_TOKENS[UNK_ID]
    spec.config.bos_token = spec.config.decoder_start_token = SPECIAL_TOKENS[BOS_ID]
    spec.config.eos_token = SPECIAL_TOKENS[EOS_ID]
    spec.config.add_source_eos = True  # as Translator.encode appends EOS_ID to the source
    return spec


def _parts(translator: Translator | tuple[Transformer, Tokenizer, Tokenizer]
           ) -> tuple[Transformer, Tokenizer, Tokenizer]:
    if isinstance(translator, tuple) and len(translator) == 3:
        return translator
    # A Translator, or anything holding the same three parts (this module does not import
    # the Translator class, which builds on the export modules).
    if all(hasattr(translator, name) for name in ("model", "src_tokenizer", "tgt_tokenizer")):
        return translator.model, translator.src_tokenizer, translator.tgt_tokenizer
    raise TypeError(f"translator: expected a Translator or a (model, source tokenizer, target "
                    f"tokenizer) tuple, got {type(translator).__name__}")


def export_ctranslate2(translator: Translator | tuple[Transformer, Tokenizer, Tokenizer],
                       out_dir: str | os.PathLike, quantization: str | None = None, *,
                       overwrite: bool = False) -> Path:
    """Write a CTranslate2 model folder of ``translator`` at ``out_dir`` (atomically).

    ``quantization``: ``None`` keeps the weights' type (float32), or one of CTranslate2's
    types (``int8``, ``int8_float32``, ``int8_float16``, ``int8_bfloat16``, ``int16``,
    ``float16``, ``bfloat16``, ``float32``). The folder holds CTranslate2's ``model.bin``,
    ``config.json`` and ``shared_vocabulary.json`` (or source and target vocabularies), and
    our ``source_tokenizer.json`` and ``target_tokenizer.json``. An existing non-empty
    ``out_dir`` raises ``FileExistsError`` unless ``overwrite``.
    """
    ctranslate2 = _ctranslate2()
    from ctranslate2.converters.converter import Converter
    from ctranslate2.specs.model_spec import ACCEPTED_MODEL_TYPES

    if quantization is not None and quantization not in ACCEPTED_MODEL_TYPES:
        raise ValueError(f"quantization: expected None or one of {list(ACCEPTED_MODEL_TYPES)} "
                         f"(ctranslate2 {ctranslate2.__version__}), got {quantization!r}")
    model, src_tokenizer, tgt_tokenizer = _parts(translator)
    spec = ctranslate2_spec(
        model, tokens_by_id(src_tokenizer, model.src_vocab_size, "source tokenizer"),
        tokens_by_id(tgt_tokenizer, model.tgt_vocab_size, "target tokenizer"))

    class SpecConverter(Converter):  # CTranslate2's converter API: _load returns the spec
        def _load(self) -> Any:
            return spec

    def fill(folder: Path) -> None:
        with tempfile.TemporaryDirectory() as scratch:
            for name, tokenizer in (("source_tokenizer.json", src_tokenizer),
                                    ("target_tokenizer.json", tgt_tokenizer)):
                tokenizer.save(str(Path(scratch) / name))
                spec.register_file(str(Path(scratch) / name))
            SpecConverter().convert(str(folder), quantization=quantization, force=True)

    return write_folder_atomic(out_dir, fill, overwrite=overwrite)
