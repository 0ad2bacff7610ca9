"""Stacks of layers: :class:`Encoder`, :class:`Decoder` and the seq2seq :class:`Transformer`."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, Literal

import torch
from torch import Tensor, nn

from ._checks import (
    check_positive_int,
    check_positive_number,
    check_size,
    check_tensor,
    shape_of,
)
from .decoder_step import DecoderStep, step_applies
from .decoding import beam_search, greedy_search, log_softmax_
from .inference import prepared_for_inference
from .layers import DecoderLayer, EncoderLayer, build_norm, pack_padding
from .local import check_window
from .multihead import KVCache
from .next_token import Sampler, TokenRules, check_return_sequences
from .positional import LearnedPositionalEncoding, build_positional_encoding

__all__ = ["Decoder", "DecoderCache", "Encoder", "Transformer"]

Activation = str | Callable[[Tensor], Tensor]


class _LayerStack(nn.Module):
    """What :class:`Encoder` and :class:`Decoder` share: the positional encoding, ``n_layers``
    layers of ``layer_type``, the final LayerNorm of a pre-norm stack, and the rotary angles,
    computed once per forward for all the layers."""

    layer_type: type[nn.Module]

    def __init__(
        self,
        d_model: int,
        n_heads: int,
        n_layers: int,
        d_ff: int | None = None,
        dropout: float = 0.1,
        positional: str | None = "sinusoidal",
        max_len: int = 1024,
        norm_first: bool = True,
        activation: Activation = "gelu",
        bias: bool = False,
        layer_norm_eps: float = 1e-5,
        *,
        norm: str = "layernorm",
        n_kv_heads: int | None = None,
        window: int | tuple[int, int] | None = None,
        global_every: int | None = None,
        rotary_base: float = 10000.0,
        global_rotary_base: float | None = None,
        alibi: bool = False,
        softcap: float | None = None,
        qk_norm: bool = False,
    ) -> None:
        super().__init__()
        self.d_model = d_model
        self.positional = build_positional_encoding(positional, d_model, max_len, dropout)
        n_layers = check_positive_int("n_layers", n_layers)
        if global_every is not None:
            check_positive_int("global_every", global_every)
            if window is None:
                raise ValueError(f"global_every: expected None without a window (the other "
                                 f"layers attend within it), got {global_every}")
        if global_rotary_base is not None:
            check_positive_number("global_rotary_base", global_rotary_base)
            if global_every is None or positional != "rotary":
                raise ValueError(f"global_rotary_base: expected None without global_every "
                                 f"and positional='rotary' (it is the rotary base of the "
                                 f"global layers), got {global_rotary_base}")
        self.global_every = global_every
        self.window = check_window(window)  # what the windowed layers have (introspection)

        def is_global(i: int) -> bool:
            return global_every is not None and i % global_every == 0

        self.layers = nn.ModuleList(
            self.layer_type(d_model, n_heads, d_ff, dropout, activation, norm_first, bias,
                            layer_norm_eps, rotary=positional == "rotary", norm=norm,
                            n_kv_heads=n_kv_heads, alibi=alibi, softcap=softcap,
                            qk_norm=qk_norm, window=None if is_global(i) else window,
                            rotary_base=global_rotary_base
                            if is_global(i) and global_rotary_base is not None else rotary_base)
            for i in range(n_layers)
        )
        self.norm = build_norm(norm, d_model, layer_norm_eps, bias) if norm_first else None

    @property
    def max_positions(self) -> int | None:
        """The most positions this stack takes: ``max_len`` with learned positions, ``None``
        (no limit) with the others, which extend to any length."""
        if isinstance(self.positional, LearnedPositionalEncoding):
            return self.positional.max_len
        return None

    def _rotary_cos_sin(self, length: int, offset: int = 0
                        ) -> list[tuple[Tensor, Tensor] | None]:
        """Each layer's rotary angles, computed once per rotary base (ModernBERT's and Gemma
        3's global and local layers have one each); ``None`` for a layer without rotary."""
        angles: dict[float, tuple[Tensor, Tensor]] = {}
        per_layer: list[tuple[Tensor, Tensor] | None] = []
        for layer in self.layers:
            rotary = layer.self_attn.rotary
            if rotary is not None and rotary.base not in angles:
                angles[rotary.base] = rotary.cos_sin(length, offset)
            per_layer.append(None if rotary is None else angles[rotary.base])
        return per_layer

    def _run_layers(self, x: Tensor, call: Callable[[nn.Module, Tensor, Any], Any],
                    return_attention: bool, cos_sin: list[tuple[Tensor, Tensor] | None]
                    ) -> Tensor | tuple[Tensor, list[Tensor]]:
        """``x`` through every layer as ``call(layer, x, its rotary angles)``, then the final
        norm; with ``return_attention`` each call returns ``(x, weights)`` and the weights
        are kept."""
        attention: list[Tensor] = []
        for layer, layer_cos_sin in zip(self.layers, cos_sin, strict=True):
            out = call(layer, x, layer_cos_sin)
            if return_attention:
                x, weights = out
                attention.append(weights)
            else:
                x = out
        if self.norm is not None:
            x = self.norm(x)
        return (x, attention) if return_attention else x


class Encoder(_LayerStack):
    """A stack of ``n_layers`` :class:`EncoderLayer` blocks, batch first.

    Adds the positional encoding to the input, runs the layers, and ends with a LayerNorm
    when the layers are pre-norm (their output is otherwise un-normalised).

    Args:
        d_model, n_heads, n_layers: width, heads per layer, depth.
        d_ff: feed-forward width, ``4 * d_model`` when ``None``.
        dropout: on attention weights, sub-layer outputs and the positional encoding.
        positional: one of :data:`attention.positional.POSITIONAL_ENCODINGS`
            (``"sinusoidal"``, ``"learned"``, ``"rotary"``, ``None``).
        max_len: positions the learned encoding has (the sinusoid table extends itself).
        norm_first: pre-norm (default) or post-norm.
        activation: a name in :data:`attention.layers.ACTIVATIONS` or
            :data:`~attention.layers.GLU_ACTIVATIONS` (``"swiglu"``, ``"geglu"``), or a
            callable.
        bias: biases in linear layers and LayerNorms.
        norm: ``"layernorm"`` or ``"rmsnorm"``, in every layer and at the end.
        n_kv_heads, window, alibi, softcap, qk_norm: the attention variants of
            :class:`~attention.multihead.MultiHeadAttention`, in every layer.
        global_every: with a ``window``, layer ``i`` attends globally when
            ``i % global_every == 0`` and within the window otherwise (ModernBERT's layout).
        rotary_base: the base of the rotary angles (``positional="rotary"``), 10,000 in
            RoFormer.
        global_rotary_base: with ``global_every``, the global layers' rotary base, when it
            differs (ModernBERT: 160,000 global, 10,000 local).

    Shape:
        x: ``(batch, length, d_model)`` → same shape.
    """

    layer_type = EncoderLayer

    def forward(
        self,
        x: Tensor,
        *,
        key_padding_mask: Tensor | None = None,
        attn_mask: Tensor | None = None,
        is_causal: bool = False,
        return_attention: bool = False,
        document_ids: Tensor | None = None,
    ) -> Tensor | tuple[Tensor, list[Tensor]]:
        """Encode ``x``; with ``return_attention`` also each layer's ``(B, H, L, L)`` weights.

        Masks: boolean ``True`` = may not attend, float = added to the scores.
        key_padding_mask: ``(B, L)``, ``True`` at padding; attn_mask: ``(L, L)``,
        ``(B * n_heads, L, L)`` or ``(B, n_heads, L, L)``.

        With a boolean ``key_padding_mask`` (and no ``return_attention``) only the real
        tokens are computed: projections, feed-forward and norms run on them alone and
        attention sees real keys only (:mod:`attention.packing`). Real positions get the
        values the padded computation gives; padded positions get zeros, as in torch.nn's
        nested-tensor fast path.

        ``document_ids`` ``(B, L)`` integers: several documents packed back to back in a row
        (each maximal run of one id) attend only within themselves, and positions start
        again at 0 in each, as if each document were a row of its own; no compute is spent
        on padding (:meth:`attention.packing.Packing.from_documents`). Not with
        ``attn_mask`` or ``return_attention``.
        """
        x = check_tensor("x", x, [3], f"(batch, length, d_model={self.d_model})")
        check_size("x", x, -1, self.d_model, "d_model")
        if isinstance(key_padding_mask, Tensor) and key_padding_mask.dtype == torch.bool \
                and document_ids is None and not torch.compiler.is_compiling() \
                and key_padding_mask.shape == x.shape[:2] and not key_padding_mask.any():
            # Nothing is padded (a tokenizer's mask of a batch of equal lengths): no packing
            # to gather and scatter, no mask to build.
            key_padding_mask = None
        packing = pack_padding(key_padding_mask, x, return_attention, document_ids)
        if packing is not None:
            # Gather the real tokens once, run the whole stack on them, scatter back once.
            if document_ids is None:
                tokens = packing.pack(x if self.positional is None else self.positional(x))
            else:  # positions count from each document's start: add them in its own row
                tokens = packing.pack(x)
                if self.positional is not None:
                    tokens = packing.from_sequences(
                        self.positional(packing.to_sequences(tokens)))
            cos_sin = self._rotary_cos_sin(packing.sequence_length)  # rows: the length
            x = self._run_layers(tokens, lambda layer, h, angles: layer(
                h, attn_mask=attn_mask, is_causal=is_causal, packing=packing,
                rotary_cos_sin=angles), return_attention=False, cos_sin=cos_sin)
            return packing.unpack(x)
        if self.positional is not None:
            x = self.positional(x)
        cos_sin = self._rotary_cos_sin(x.shape[1])
        return self._run_layers(x, lambda layer, h, angles: layer(
            h, key_padding_mask=key_padding_mask, attn_mask=attn_mask, is_causal=is_causal,
            return_attention=return_attention, rotary_cos_sin=angles), return_attention,
            cos_sin)


class DecoderCache:
    """Per-layer key/value caches of a :class:`Decoder`, for incremental decoding."""

    def __init__(self, n_layers: int, capacity: int | None = None) -> None:
        # capacity: the target positions to preallocate (self-attention; the memory's
        # cross-attention keys are projected once, at their own length).
        self.layers = [(KVCache(capacity), KVCache()) for _ in range(n_layers)]

    def __len__(self) -> int:
        """Number of target positions decoded so far."""
        return len(self.layers[0][0])

    def reorder(self, index: Tensor, *, cross_attention: bool = True) -> None:
        """Keep batch rows ``index``, in that order (beam search, dropped rows).

        ``cross_attention=False`` leaves the memory's keys and values where they are: for
        an ``index`` that maps each row to one with the same memory (beam search's
        hypotheses of one sentence), it saves copying them every step.
        """
        for self_cache, cross_cache in self.layers:
            self_cache.reorder(index)
            if cross_attention:
                cross_cache.reorder(index)


class Decoder(_LayerStack):
    """A stack of ``n_layers`` :class:`DecoderLayer` blocks, batch first.

    Arguments as for :class:`Encoder`. ``forward`` is causal by default.

    Shape:
        x: ``(batch, Lt, d_model)``; memory: ``(batch, Ls, d_model)`` → ``(batch, Lt,
        d_model)``.
    """

    layer_type = DecoderLayer

    def new_cache(self, capacity: int | None = None) -> DecoderCache:
        """An empty cache for incremental decoding; ``capacity`` preallocates room for
        that many target positions (it grows past them if needed)."""
        return DecoderCache(len(self.layers), capacity)

    def forward(
        self,
        x: Tensor,
        memory: Tensor,
        *,
        tgt_key_padding_mask: Tensor | None = None,
        memory_key_padding_mask: Tensor | None = None,
        tgt_mask: Tensor | None = None,
        is_causal: bool = True,
        cache: DecoderCache | None = None,
        return_attention: bool = False,
    ) -> Tensor | tuple[Tensor, list[Tensor]]:
        """Decode ``x`` against ``memory``; with ``return_attention`` also each layer's
        ``(B, H, Lt, Ls)`` cross-attention weights.

        With a ``cache``, ``x`` holds only the new positions; they are placed after the
        cached ones and attend to them. Masks: boolean ``True`` = may not attend.
        """
        x = check_tensor("x", x, [3], f"(batch, Lt, d_model={self.d_model})")
        offset = len(cache) if cache is not None else 0
        if self.positional is not None:
            x = self.positional(x, offset)
        cos_sin = self._rotary_cos_sin(x.shape[1], offset)
        caches = iter(cache.layers) if cache is not None else None
        return self._run_layers(x, lambda layer, h, angles: layer(
            h, memory, tgt_key_padding_mask=tgt_key_padding_mask,
            memory_key_padding_mask=memory_key_padding_mask, tgt_mask=tgt_mask,
            is_causal=is_causal, cache=next(caches) if caches is not None else None,
            return_attention=return_attention, rotary_cos_sin=angles), return_attention,
            cos_sin)


def _check_ids(name: str, ids: object, vocab_size: int) -> Tensor:
    if not isinstance(ids, Tensor):
        raise TypeError(f"{name}: expected a LongTensor (batch, length), got {type(ids).__name__}")
    if ids.dim() != 2:
        raise ValueError(f"{name}: expected a 2-D tensor (batch, length), got shape "
                         f"{shape_of(ids)}")
    if ids.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"{name}: expected dtype torch.int64 token ids, got {ids.dtype}")
    if ids.numel() and not torch.compiler.is_compiling():
        _check_id_range(name, ids, vocab_size)
    return ids


def _check_id_range(name: str, ids: Tensor, vocab_size: int) -> None:
    """Ids outside the vocabulary raise. Reading ``ids.min()`` on the host costs nothing on
    the CPU but waits for the whole queue of work on an accelerator: there the check is a
    device-side assert that fails asynchronously, as an out-of-range embedding lookup would."""
    expected = f"{name}: expected ids in [0, {vocab_size}) (the vocabulary size)"
    if ids.device.type != "cpu":
        torch._assert_async(((ids >= 0) & (ids < vocab_size)).all(), expected)
        return
    low, high = int(ids.min()), int(ids.max())
    if low < 0 or high >= vocab_size:
        raise ValueError(f"{expected}, got ids from {low} to {high}")


class Transformer(nn.Module):
    """The encoder-decoder Transformer for sequence-to-sequence tasks such as translation.

    Token embeddings (scaled by ``√d_model``), an :class:`Encoder`, a :class:`Decoder` and
    a linear output head. Padding masks come from ``pad_id``. ``tie_embeddings``: ``True``
    shares the target embedding with the output head; ``"all"`` shares the source embedding
    too, one matrix for all three (a joint vocabulary: the two sizes must be equal).

    ``norm``, ``n_kv_heads``, ``window``, ``global_every``, ``alibi``, ``softcap`` and
    ``qk_norm`` are passed to the :class:`Encoder` and the :class:`Decoder` (the decoder's
    cross-attention takes only ``n_kv_heads``, ``softcap`` and ``qk_norm``). A windowed
    decoder's caches keep only their window while generating.

    Shape:
        src_ids: ``(B, Ls)``; tgt_ids: ``(B, Lt)`` → logits ``(B, Lt, tgt_vocab_size)``.
    """

    def __init__(
        self,
        src_vocab_size: int,
        tgt_vocab_size: int,
        d_model: int = 512,
        n_heads: int = 8,
        n_encoder_layers: int = 6,
        n_decoder_layers: int = 6,
        d_ff: int | None = None,
        dropout: float = 0.1,
        pad_id: int = 0,
        tie_embeddings: bool | Literal["all"] = False,
        positional: str | None = "sinusoidal",
        max_len: int = 1024,
        norm_first: bool = True,
        activation: Activation = "gelu",
        bias: bool = False,
        *,
        norm: str = "layernorm",
        n_kv_heads: int | None = None,
        window: int | tuple[int, int] | None = None,
        global_every: int | None = None,
        alibi: bool = False,
        softcap: float | None = None,
        qk_norm: bool = False,
    ) -> None:
        super().__init__()
        self.src_vocab_size = check_positive_int("src_vocab_size", src_vocab_size)
        self.tgt_vocab_size = check_positive_int("tgt_vocab_size", tgt_vocab_size)
        self.d_model = check_positive_int("d_model", d_model)
        if not 0 <= pad_id < min(src_vocab_size, tgt_vocab_size):
            raise ValueError(f"pad_id: expected an id in [0, {min(src_vocab_size, tgt_vocab_size)})"
                             f" (inside both vocabularies), got {pad_id}")
        if tie_embeddings not in (False, True, "all"):
            raise ValueError(f"tie_embeddings: expected False, True (target embedding and "
                             f"output head) or 'all', got {tie_embeddings!r}")
        if tie_embeddings == "all" and src_vocab_size != tgt_vocab_size:
            raise ValueError(f"tie_embeddings: 'all' needs one vocabulary for both sides, got "
                             f"src_vocab_size={src_vocab_size} and "
                             f"tgt_vocab_size={tgt_vocab_size}")
        self.pad_id = pad_id
        common = dict(d_ff=d_ff, dropout=dropout, positional=positional, max_len=max_len,
                      norm_first=norm_first, activation=activation, bias=bias, norm=norm,
                      n_kv_heads=n_kv_heads, window=window, global_every=global_every,
                      alibi=alibi, softcap=softcap, qk_norm=qk_norm)
        self.src_embed = nn.Embedding(src_vocab_size, d_model, padding_idx=pad_id)
        self.tgt_embed = nn.Embedding(tgt_vocab_size, d_model, padding_idx=pad_id)
        self.encoder = Encoder(d_model, n_heads, n_encoder_layers, **common)
        self.decoder = Decoder(d_model, n_heads, n_decoder_layers, **common)
        self.lm_head = nn.Linear(d_model, tgt_vocab_size, bias=False)
        # N(0, 1/d_model) so that the √d_model scaling gives unit-variance embeddings.
        for embedding in (self.src_embed, self.tgt_embed):
            nn.init.normal_(embedding.weight, std=d_model**-0.5)
            with torch.no_grad():
                embedding.weight[pad_id].zero_()
        if tie_embeddings:
            self.lm_head.weight = self.tgt_embed.weight
        if tie_embeddings == "all":
            self.src_embed.weight = self.tgt_embed.weight

    def padding_mask(self, ids: Tensor) -> Tensor:
        """``(B, L)`` boolean mask, ``True`` where ``ids`` is ``pad_id``."""
        return ids == self.pad_id

    def encode(self, src_ids: Tensor, *, return_attention: bool = False
               ) -> Tensor | tuple[Tensor, list[Tensor]]:
        """``(B, Ls)`` ids → memory ``(B, Ls, d_model)`` (and encoder self-attention)."""
        src_ids = _check_ids("src_ids", src_ids, self.src_vocab_size)
        return self._encode(src_ids, self.padding_mask(src_ids), return_attention)

    def _encode(self, src_ids: Tensor, src_padding: Tensor, return_attention: bool
                ) -> Tensor | tuple[Tensor, list[Tensor]]:
        x = self.src_embed(src_ids) * math.sqrt(self.d_model)
        return self.encoder(x, key_padding_mask=src_padding, return_attention=return_attention)

    def decode(
        self,
        tgt_ids: Tensor,
        memory: Tensor,
        memory_key_padding_mask: Tensor | None = None,
        *,
        cache: DecoderCache | None = None,
        return_attention: bool = False,
    ) -> Tensor | tuple[Tensor, list[Tensor]]:
        """``(B, Lt)`` target ids and memory → logits ``(B, Lt, tgt_vocab_size)``.

        With ``return_attention``, also the cross-attention weights of every layer,
        ``(B, n_heads, Lt, Ls)`` each. With a ``cache``, ``tgt_ids`` holds only the new
        positions (target padding is then not masked: decoding has none).
        """
        tgt_ids = _check_ids("tgt_ids", tgt_ids, self.tgt_vocab_size)
        return self._decode(tgt_ids, memory, memory_key_padding_mask, cache=cache,
                            return_attention=return_attention)

    def _decode(self, tgt_ids: Tensor, memory: Tensor, memory_key_padding_mask: Tensor | None,
                *, cache: DecoderCache | None, return_attention: bool
                ) -> Tensor | tuple[Tensor, list[Tensor]]:
        x = self.tgt_embed(tgt_ids) * math.sqrt(self.d_model)
        out = self.decoder(
            x, memory,
            tgt_key_padding_mask=None if cache is not None else self.padding_mask(tgt_ids),
            memory_key_padding_mask=memory_key_padding_mask, is_causal=True, cache=cache,
            return_attention=return_attention,
        )
        if return_attention:
            hidden, attention = out
            return self.lm_head(hidden), attention
        return self.lm_head(out)

    def forward(self, src_ids: Tensor, tgt_ids: Tensor) -> Tensor:
        """Teacher-forced logits ``(B, Lt, tgt_vocab_size)`` for ``tgt_ids``."""
        src_ids = _check_ids("src_ids", src_ids, self.src_vocab_size)
        tgt_ids = _check_ids("tgt_ids", tgt_ids, self.tgt_vocab_size)
        if src_ids.shape[0] != tgt_ids.shape[0]:
            raise ValueError(f"tgt_ids: expected batch={src_ids.shape[0]} (as in src_ids), "
                             f"got shape {shape_of(tgt_ids)}")
        src_padding = self.padding_mask(src_ids)
        memory = self._encode(src_ids, src_padding, return_attention=False)
        return self._decode(tgt_ids, memory, src_padding, cache=None, return_attention=False)

    @torch.no_grad()
    def generate(
        self,
        src_ids: Tensor,
        max_new_tokens: int,
        bos_id: int,
        eos_id: int,
        beam_size: int = 1,
        length_penalty: float = 1.0,
        *,
        min_new_tokens: int = 0,
        no_repeat_ngram_size: int = 0,
        num_return_sequences: int = 1,
        return_scores: bool = False,
        do_sample: bool = False,
        temperature: float = 1.0,
        top_k: int = 0,
        top_p: float = 1.0,
        generator: torch.Generator | None = None,
    ) -> Tensor | tuple[Tensor, Tensor]:
        """Translate ``src_ids`` by greedy search (``beam_size=1``), beam search or sampling,
        on a key/value cache.

        Runs in evaluation mode (no dropout) and restores the module's mode afterwards.
        Each step runs the decoder over the newest position only; earlier positions' keys
        and values come from the cache. ``pad_id`` and ``bos_id`` are never generated.
        Beam search ranks finished hypotheses by ``sum log p / length ** length_penalty``.

        Options, as in Hugging Face ``generate``:

        - ``min_new_tokens``: no ``eos_id`` before that many tokens;
        - ``no_repeat_ngram_size``: no n-gram of that size twice in an output (0: off);
        - ``num_return_sequences``: outputs per sentence, the n best of beam search (at most
          ``beam_size``) or n independent samples;
        - ``return_scores``: also each output's ``sum log p / length ** length_penalty``;
        - ``do_sample`` with ``temperature``, ``top_k`` (0: off) and ``top_p`` (1.0: off):
          draw each token (``beam_size`` must be 1); ``generator`` seeds the draws.

        Returns:
            ``(B * num_return_sequences, T)`` generated ids, sentence ``b``'s ``i``-th
            output in row ``b * num_return_sequences + i`` (beam search: best first),
            without ``bos_id``, each row ending at its ``eos_id`` (included) and padded with
            ``pad_id`` after it, ``T ≤ max_new_tokens``; with ``return_scores``, also the
            ``(B * num_return_sequences,)`` float32 scores.
        """
        src_ids = _check_ids("src_ids", src_ids, self.src_vocab_size)
        check_positive_int("max_new_tokens", max_new_tokens)
        check_positive_int("beam_size", beam_size)
        for name, token in (("bos_id", bos_id), ("eos_id", eos_id)):
            if not 0 <= token < self.tgt_vocab_size:
                raise ValueError(f"{name}: expected an id in [0, {self.tgt_vocab_size}), "
                                 f"got {token}")
        # Padding is masked out of the keys and never generated, so none may be BOS or EOS.
        if bos_id == self.pad_id or eos_id in (self.pad_id, bos_id):
            raise ValueError(f"bos_id, eos_id: expected ids distinct from each other and from "
                             f"pad_id={self.pad_id}, got bos_id={bos_id}, eos_id={eos_id}")
        if isinstance(length_penalty, bool) or not isinstance(length_penalty, (int, float)):
            raise TypeError(f"length_penalty: expected a float, got "
                            f"{type(length_penalty).__name__} {length_penalty!r}")
        max_len = getattr(self.decoder.positional, "max_len", None)
        if isinstance(self.decoder.positional, LearnedPositionalEncoding) and \
                max_new_tokens > max_len:
            raise ValueError(f"max_new_tokens: expected at most max_len={max_len} (the learned "
                             f"positions of the decoder), got {max_new_tokens}")
        rules = TokenRules(eos_id, min_new_tokens, no_repeat_ngram_size)
        if min_new_tokens > max_new_tokens:
            raise ValueError(f"min_new_tokens: expected at most max_new_tokens="
                             f"{max_new_tokens}, got {min_new_tokens}")
        sampler = None
        if do_sample:
            if beam_size != 1:
                raise ValueError(f"beam_size: expected 1 with do_sample=True (sampling draws "
                                 f"one token per step), got {beam_size}")
            sampler = Sampler(temperature, top_k, top_p, generator)
        n = check_return_sequences(num_return_sequences, beam_size, do_sample)
        was_training = self.training
        self.eval()  # no dropout while decoding
        try:
            with prepared_for_inference(self):
                return self._generate(src_ids, max_new_tokens, bos_id, eos_id, beam_size,
                                      length_penalty, rules, sampler, n, return_scores)
        finally:
            self.train(was_training)

    def _generate(self, src_ids: Tensor, max_new_tokens: int, bos_id: int, eos_id: int,
                  beam_size: int, length_penalty: float, rules: TokenRules,
                  sampler: Sampler | None, num_return_sequences: int, return_scores: bool
                  ) -> Tensor | tuple[Tensor, Tensor]:
        memory_mask = self.padding_mask(src_ids)
        memory = self._encode(src_ids, memory_mask, return_attention=False)  # ids checked
        if beam_size == 1 and num_return_sequences > 1:  # one row per sample
            memory = memory.repeat_interleave(num_return_sequences, dim=0)
            memory_mask = memory_mask.repeat_interleave(num_return_sequences, dim=0)
        # Padding and BOS are never outputs; padding also fills rows after their EOS. Their
        # ids go to the device once: a Python list as an index would be copied there, and
        # waited for, at every step.
        device = src_ids.device
        banned = torch.tensor([self.pad_id, bos_id], device=device)
        if step_applies(self, device.type):  # the same computation, with fewer operations a step
            step = DecoderStep(self, memory, memory_mask, max_new_tokens, beam_size)
            select_rows: Callable[[Tensor], None] = step.keep_rows
            reorder_beams: Callable[[Tensor], None] = step.reorder
        else:
            step, select_rows, reorder_beams = self._cached_step(memory, memory_mask,
                                                                 max_new_tokens)

        def logits(last_ids: Tensor) -> Tensor:  # (N, 1) -> (N, V) float32
            return step(last_ids).float().index_fill_(-1, banned, float("-inf"))

        if beam_size == 1:
            return greedy_search(
                logits, memory.shape[0], bos_id, eos_id, self.pad_id, max_new_tokens,
                device=device, rules=rules, sampler=sampler, return_scores=return_scores,
                length_penalty=length_penalty, drop_rows=select_rows)
        return beam_search(
            lambda last_ids: log_softmax_(logits(last_ids)), reorder_beams,
            src_ids.shape[0], bos_id, eos_id, self.pad_id, max_new_tokens, beam_size,
            length_penalty, device=device, rules=rules,
            num_return_sequences=num_return_sequences, return_scores=return_scores,
            expand_after_first_step=True, drop_finished=True)

    def _cached_step(self, memory: Tensor, memory_mask: Tensor, max_new_tokens: int
                     ) -> tuple[Callable[[Tensor], Tensor], Callable[[Tensor], None],
                                Callable[[Tensor], None]]:
        """The general path's decoding step, on the decoder's modules and a
        :class:`DecoderCache`: ``(step, select_rows, reorder_beams)`` as
        :class:`~attention.decoder_step.DecoderStep`'s ``(__call__, keep_rows, reorder)``."""
        cache = self.decoder.new_cache(capacity=max_new_tokens)

        def step(last_ids: Tensor) -> Tensor:  # (N, 1) -> (N, V)
            # The ids are the search's own picks: no range check needed.
            return self._decode(last_ids, memory, memory_mask, cache=cache,
                                return_attention=False)[:, -1]

        def select_rows(index: Tensor) -> None:  # rows dropped, or grown into beams
            nonlocal memory, memory_mask
            memory, memory_mask = memory[index], memory_mask[index]
            cache.reorder(index)

        expanded = False

        def reorder_beams(index: Tensor) -> None:
            nonlocal expanded
            # After the first step (one row per sentence, grown into beams), or when done
            # sentences leave the batch, the memory's rows change too.
            if not expanded or index.shape[0] != memory.shape[0]:
                expanded = True
                select_rows(index)
            else:  # a sentence's hypotheses share its memory: only their own keys move
                cache.reorder(index, cross_attention=False)

        return step, select_rows, reorder_beams
