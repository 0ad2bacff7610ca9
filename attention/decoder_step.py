"""A decoding step on plain tensors: one new position through a :class:`Transformer`'s
decoder and output head, for :meth:`Transformer.generate`.

A step of the general path (the decoder's modules on a :class:`DecoderCache`) checks its
inputs, builds each layer's masks and walks the module tree, about a hundred small
operations around the products that do the work. :class:`DecoderStep` runs the same
computation (its logits equal the general path's to float32 rounding: 1e-6 in the tests;
the translations are the same), with what does not change from step to step done once per
search:

- the source padding becomes one additive bias ``(b, 1, 1, Ls)`` (0 or ``-inf``), added to
  every layer's cross-attention scores: no mask is merged or checked per layer and step;
- each layer's cross-attention keys and values are projected once per *sentence*, and a
  sentence's beams read them together: the ``k`` queries of its beams meet its keys in one
  ``(k, d) @ (d, Ls)`` product per head, not ``k`` products of one row, and the memory is
  never copied to ``b * k`` rows nor reordered with the beams;
- the self-attention keys and values live in time-major buffers ``(room, rows, h, d)``: a
  step writes one contiguous ``(rows, h, d)`` slab; the products read the held positions as
  strided views (no copy), and a beam reorder gathers contiguous ``h·d`` runs into a second
  buffer of the same size (two per layer, used in turn: no allocation per step);
- inside :func:`~attention.inference.prepared_for_inference`, each sub-layer's last product
  writes the residual sum, and the feed-forward's first its ReLU/GELU (oneDNN post-ops, the
  separate operations' bits).

:func:`step_applies` says which models it covers: the decoder layers of this package with
plain attention (no window, ALiBi, softcap, q/k norm or grouped key/value heads), any norm,
activation and positional encoding, and projections that are plain, prepared, quantized or
hooked (each runs its own forward). ``generate`` takes the general path for the others.

Letter key: ``b`` sentences, ``k`` rows per sentence (beams), ``n`` rows (``b·k``), ``h``
heads, ``d`` head dimension, ``t`` positions held, ``s`` source positions.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .inference import PreparedLinear, prepared_linear
from .layers import DecoderLayer, FeedForward
from .multihead import MultiHeadAttention

__all__ = ["DecoderStep", "step_applies"]

Linear = Callable[[Tensor], Tensor]
# torch's CPU bmm multiplies matrices of fewer multiply-adds than this (the contraction
# times the output's size) in a plain loop, not a BLAS call (torch 2.13, LinearAlgebra.cpp).
SMALL_PRODUCT = 400


def step_applies(model: nn.Module, device_type: str) -> bool:
    """Whether :class:`DecoderStep` computes the decoding steps of ``model`` (a
    :class:`~attention.models.Transformer`) on a ``device_type`` device: plain attention in
    every decoder layer, and no autocast on (its products and softmax follow the weights'
    dtype)."""
    decoder = model.decoder
    if torch.is_autocast_enabled(device_type):
        return False
    for layer in decoder.layers:
        if type(layer) is not DecoderLayer:
            return False
        for attention in (layer.self_attn, layer.cross_attn):
            if type(attention) is not MultiHeadAttention or attention.window is not None \
                    or attention.alibi_slopes is not None or attention.softcap is not None \
                    or attention.q_norm is not None or attention.n_kv_heads != attention.n_heads:
                return False
    return True


def _linear(module: nn.Module) -> Linear:
    """The callable a step uses for ``module``: its prepared weights when
    :func:`~attention.inference.prepared_for_inference` patched it (no module call per
    step), else the module itself (quantized, hooked or outside a prepared block)."""
    prepared = prepared_linear(module)
    return module if prepared is None else prepared


def _norm(module: nn.Module) -> Linear:
    """``module`` as a function: ``F.layer_norm`` on its parameters for a plain
    ``nn.LayerNorm`` (what its forward runs), else the module."""
    if type(module) is nn.LayerNorm and not module._forward_hooks \
            and not module._forward_pre_hooks:
        shape, weight, bias, eps = module.normalized_shape, module.weight, module.bias, \
            module.eps
        return lambda x: F.layer_norm(x, shape, weight, bias, eps)
    return module


class _Layer:
    """One decoder layer's weights as callables, its cross-attention keys and values
    ``(b·h, s, d)`` (keys transposed for the product: ``(b·h, d, s)``) and its
    self-attention buffers."""

    def __init__(self, layer: DecoderLayer, memory: Tensor, rows: int, room: int) -> None:
        self_attn, cross_attn = layer.self_attn, layer.cross_attn
        self.self_attn = self_attn
        self.qkv = self_attn.project_qkv  # its prepared stacked weights inside the block
        self.cross_q = _linear(cross_attn.q_proj)
        # Each sub-layer's last product with the residual added: (x, residual) -> sum.
        self.self_out = _adder(_linear(self_attn.out_proj))
        self.cross_out = _adder(_linear(cross_attn.out_proj))
        self.feed_forward = _feed_forward_adder(layer.feed_forward)
        self.norms = [_norm(n) for n in (layer.norm1, layer.norm2, layer.norm3)]
        self.norm_first = layer.norm_first
        heads, d_head = self_attn.n_heads, self_attn.d_head
        self.cross_keys = _sentence_heads(cross_attn.k_proj(memory), heads).transpose(1, 2)
        self.cross_values = _sentence_heads(cross_attn.v_proj(memory), heads)
        shape = (room, rows, heads, d_head)
        self.buffers = [[memory.new_empty(shape) for _ in range(2)] for _ in range(2)]
        self.in_use = 0  # which of each pair holds the cache

    def keys_values(self) -> tuple[Tensor, Tensor]:
        """The self-attention buffers in use, ``(room, rows, h, d)`` each."""
        return self.buffers[0][self.in_use], self.buffers[1][self.in_use]

    def reorder(self, index: Tensor, held: int) -> None:
        """Keep rows ``index`` of the ``held`` positions, gathered into the spare buffers."""
        spare = 1 - self.in_use
        for pair in self.buffers:
            source, target = pair[self.in_use], pair[spare]
            torch.index_select(source[:held], 1, index, out=target[:held, : index.shape[0]])
        self.in_use = spare

    def select_sentences(self, index: Tensor) -> None:
        """Keep the cross-attention keys and values of sentences ``index``."""
        heads = self.self_attn.n_heads
        rows = (index[:, None] * heads + torch.arange(heads, device=index.device)).flatten()
        self.cross_keys = self.cross_keys.index_select(0, rows)
        self.cross_values = self.cross_values.index_select(0, rows)


def _adder(linear: Linear) -> Callable[[Tensor, Tensor], Tensor]:
    """``(x, other) -> other + linear(x)``, fused into the product for prepared weights."""
    if isinstance(linear, PreparedLinear):
        return linear.added
    return lambda x, other: other + linear(x)


def _feed_forward_adder(feed_forward: FeedForward) -> Callable[[Tensor, Tensor], Tensor]:
    """``(x, other) -> other + feed_forward(x)`` (eval mode: no dropout), the activation and
    the sum fused into the products for prepared weights; a gated one runs its forward."""
    if feed_forward.gated:
        return lambda x, other: other + feed_forward(x)
    linear1, activation = _linear(feed_forward.linear1), feed_forward.activation
    add_second = _adder(_linear(feed_forward.linear2))
    if isinstance(linear1, PreparedLinear):
        return lambda x, other: add_second(linear1.activated(x, activation), other)
    return lambda x, other: add_second(activation(linear1(x)), other)


def _sentence_heads(x: Tensor, heads: int) -> Tensor:
    """``(b, s, h·d)`` → ``(b·h, s, d)``, contiguous."""
    batch, length, features = x.shape
    return x.view(batch, length, heads, features // heads).transpose(1, 2) \
        .reshape(batch * heads, length, features // heads)


class DecoderStep:
    """``step(last_ids (n, 1)) -> logits (n, V)``: the model's decoder and output head over
    one new position of every row, on caches it keeps (see the module's text).

    ``memory`` ``(b, s, d_model)`` and ``memory_padding`` ``(b, s)`` (``True`` at padding)
    are the encoder's; ``room`` positions are preallocated (the search's
    ``max_new_tokens``); ``beam_size`` rows per sentence at most. Rows are ``b`` until
    :meth:`reorder` says otherwise. Build it inside :func:`torch.no_grad` (and, for the
    prepared weights, inside :func:`~attention.inference.prepared_for_inference`).
    """

    def __init__(self, model: nn.Module, memory: Tensor, memory_padding: Tensor, room: int,
                 beam_size: int = 1) -> None:
        decoder = model.decoder
        batch, _, d_model = memory.shape
        self.d_model = d_model
        self.embedding = model.tgt_embed.weight
        self.embed_scale = math.sqrt(d_model)
        self.positional = decoder.positional
        self.rotary_angles = decoder._rotary_cos_sin
        self.rotary = any(layer.self_attn.rotary is not None for layer in decoder.layers)
        self.final_norm = None if decoder.norm is None else _norm(decoder.norm)
        self.head = _linear(model.lm_head)
        self.room = room
        self.beam_size = beam_size
        self.layers = [_Layer(layer, memory, batch * beam_size, room) for layer in decoder.layers]
        heads = decoder.layers[0].self_attn.n_heads if decoder.layers else 1
        self.heads, self.d_head = heads, d_model // heads
        self.scale = self.d_head**-0.5
        self.softmax_dtype = torch.promote_types(memory.dtype, torch.float32)
        # 0 where a source token may be attended, -inf at padding; a source of padding only
        # attends to all of it, and its outputs are zeroed (what the general path does).
        empty = memory_padding.all(dim=-1)
        blocked = memory_padding & ~empty[:, None]
        self.source_bias = torch.zeros(blocked.shape, dtype=memory.dtype, device=memory.device) \
            .masked_fill_(blocked, float("-inf"))[:, None, None, :]  # (b, 1, 1, s)
        self.empty_sentences = empty[:, None, None, None] if bool(empty.any()) else None
        self.position = 0
        self.rows_per_sentence = 1  # k: rows of one sentence, next to each other

    def __call__(self, last_ids: Tensor) -> Tensor:
        """``(n, 1)`` ids of the newest position → ``(n, V)`` logits."""
        t = self.position
        if t >= self.room:
            raise ValueError(f"last_ids: expected at most room={self.room} steps (the "
                             f"preallocated positions), got step {t + 1}")
        rows = last_ids.shape[0]
        x = F.embedding(last_ids, self.embedding) * self.embed_scale  # (n, 1, d_model)
        if self.positional is not None:
            x = self.positional(x, t)
        angles = self.rotary_angles(1, t) if self.rotary else None
        for i, layer in enumerate(self.layers):
            x = self._layer(layer, x, rows, t, None if angles is None else angles[i])
        if self.final_norm is not None:
            x = self.final_norm(x)
        self.position = t + 1
        return self.head(x[:, 0])

    def _layer(self, layer: _Layer, x: Tensor, rows: int, t: int,
               angles: tuple[Tensor, Tensor] | None) -> Tensor:
        norm1, norm2, norm3 = layer.norms
        if layer.norm_first:  # x + sublayer(norm(x)), the sum written with the product
            x = layer.self_out(self._self_attention(layer, norm1(x), rows, t, angles), x)
            x = layer.cross_out(self._cross_attention(layer, norm2(x), rows), x)
            return layer.feed_forward(norm3(x), x)
        x = norm1(layer.self_out(self._self_attention(layer, x, rows, t, angles), x))
        x = norm2(layer.cross_out(self._cross_attention(layer, x, rows), x))
        return norm3(layer.feed_forward(x, x))

    def _self_attention(self, layer: _Layer, x: Tensor, rows: int, t: int,
                        angles: tuple[Tensor, Tensor] | None) -> Tensor:
        """``(n, 1, d_model)`` → the heads' outputs ``(n, 1, h·d)`` (before ``out_proj``),
        the new keys and values appended."""
        h, d = self.heads, self.d_head
        q, k, v = layer.qkv(x).split(self.d_model, dim=-1)  # (n, 1, h·d) each
        if angles is not None:
            q, k = layer.self_attn._rotate(q.view(rows, 1, h, d).transpose(1, 2),
                                           k.view(rows, 1, h, d).transpose(1, 2), t, angles)
        keys, values = layer.keys_values()  # (room, rows, h, d)
        keys[t, :rows] = k.reshape(rows, h, d)
        values[t, :rows] = v.reshape(rows, h, d)
        held_keys = keys[: t + 1, :rows].flatten(1, 2).permute(1, 2, 0)  # (n·h, d, t)
        held_values = values[: t + 1, :rows].flatten(1, 2).transpose(0, 1)  # (n·h, t, d)
        scores = torch.bmm(q.reshape(rows * h, 1, d), held_keys).mul_(self.scale)
        weights = scores.softmax(dim=-1, dtype=self.softmax_dtype)  # (n·h, 1, t)
        if weights.dtype != q.dtype:
            weights = weights.to(q.dtype)
        if (t + 1) * d < SMALL_PRODUCT:
            # torch's bmm takes a slow loop for products this small (4× slower at t = 7,
            # d = 32); a broadcast product and sum over the t positions does not.
            out = (weights.transpose(1, 2) * held_values).sum(dim=1)  # (n·h, d)
        else:
            out = torch.bmm(weights, held_values)  # (n·h, 1, d)
        return out.view(rows, 1, self.d_model)

    def _cross_attention(self, layer: _Layer, x: Tensor, rows: int) -> Tensor:
        """``(n, 1, d_model)`` → the heads' outputs ``(n, 1, h·d)``: each sentence's ``k``
        rows together."""
        h, d, k = self.heads, self.d_head, self.rows_per_sentence
        sentences = rows // k
        q = layer.cross_q(x).view(sentences, k, h, d).transpose(1, 2)  # (b, h, k, d)
        scores = torch.bmm(q.reshape(sentences * h, k, d), layer.cross_keys).mul_(self.scale)
        scores = scores.view(sentences, h, k, -1).add_(self.source_bias)  # (b, h, k, s)
        weights = scores.softmax(dim=-1, dtype=self.softmax_dtype)
        if weights.dtype != q.dtype:
            weights = weights.to(q.dtype)
        out = torch.bmm(weights.view(sentences * h, k, -1), layer.cross_values)
        out = out.view(sentences, h, k, d)
        if self.empty_sentences is not None:
            out = out.masked_fill(self.empty_sentences, 0.0)
        return out.transpose(1, 2).reshape(rows, 1, self.d_model)

    def keep_rows(self, index: Tensor) -> None:
        """Greedy search's dropped rows (one row a sentence): keep rows ``index``."""
        self._select_sentences(index)
        for layer in self.layers:
            layer.reorder(index, self.position)

    def reorder(self, index: Tensor) -> None:
        """Beam search's reorder: rows ``index`` of those the last step saw continue,
        ``beam_size`` per sentence from now on (the first reorder grows one row a sentence
        into its beams). Sentences with no row left (done) leave the cross-attention's keys
        and values too."""
        sentences = index.view(-1, self.beam_size)[:, 0] // self.rows_per_sentence
        if sentences.shape[0] != self.source_bias.shape[0]:
            self._select_sentences(sentences)
        for layer in self.layers:
            layer.reorder(index, self.position)
        self.rows_per_sentence = self.beam_size

    def _select_sentences(self, index: Tensor) -> None:
        self.source_bias = self.source_bias.index_select(0, index)
        if self.empty_sentences is not None:
            self.empty_sentences = self.empty_sentences.index_select(0, index)
        for layer in self.layers:
            layer.select_sentences(index)
