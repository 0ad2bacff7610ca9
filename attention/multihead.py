"""Multi-head attention: project, split into heads, attend, merge the heads, project.

Letter key for the einops patterns: ``b`` batch, ``h`` heads, ``n`` length, ``d`` head
dimension (``d_head = d_model // n_heads``).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from . import functional
from ._checks import (
    check_divisible,
    check_flag,
    check_positive_int,
    check_positive_number,
    check_probability,
    check_size,
    check_tensor,
    shape_of,
)
from .alibi import alibi_slopes
from .functional import attend, check_softcap
from .local import check_window
from .packing import Packing
from .positional import RotaryEmbedding, apply_rotary, refill_

__all__ = ["SEQUENCE_BY_SEQUENCE_MIN_TOKENS", "KVCache", "MultiHeadAttention", "can_use_varlen"]

# A packed batch on the CPU attends one sequence at a time when its sequences average at least
# this many real tokens (see MultiHeadAttention._attends_sequence_by_sequence): a call costs
# tens of microseconds, which short sequences do not win back.
SEQUENCE_BY_SEQUENCE_MIN_TOKENS = 128

# torch's variable-length flash kernel (torch >= 2.10, CUDA only), imported on first use on a
# GPU: its module imports torch._dynamo, which would add about a second to `import attention`.
_varlen: dict[str, tuple[Callable[..., Tensor], str] | None] = {}


def _load_varlen() -> tuple[Callable[..., Tensor], str] | None:
    """torch's ``varlen_attn`` and the keyword that takes its causal window, or ``None``
    where this torch has no such kernel; imported and inspected once, on first use."""
    if "kernel" not in _varlen:
        try:
            from torch.nn.attention.varlen import varlen_attn
        except ImportError:
            _varlen["kernel"] = None
        else:
            _varlen["kernel"] = (varlen_attn, _causal_window_keyword(varlen_attn))
    # Not marked constant for torch.compile (as current_backend is): dynamo cannot hold a
    # function as a constant result, and traces this lookup as it is.
    return _varlen["kernel"]


def _causal_window_keyword(varlen_attn: Callable[..., Tensor]) -> str:
    """How ``varlen_attn`` is told to attend causally: ``window_size`` (torch 2.11 and
    later: ``(-1, 0)`` causal, ``(-1, -1)`` full) or ``is_causal`` (torch 2.10)."""
    parameters = inspect.signature(varlen_attn).parameters
    for keyword in ("window_size", "is_causal"):
        if keyword in parameters:
            return keyword
    raise RuntimeError(f"torch {torch.__version__}: torch.nn.attention.varlen.varlen_attn takes "
                       f"neither window_size= (torch >= 2.11) nor is_causal= (torch 2.10), so "
                       f"this package cannot ask it for causal attention; its parameters are "
                       f"{list(parameters)}")


def _causal_window(keyword: str, is_causal: bool,
                   window: tuple[int, int] | None = None) -> dict[str, Any]:
    """The keyword argument that makes ``varlen_attn`` causal or not, and windowed, in its
    release's form (a window needs ``window_size``: :func:`can_use_varlen` checks)."""
    if keyword == "window_size":
        # A tuple: varlen_attn picks its causal kernel by `window_size == (-1, 0)`, which a
        # list would fail.
        if window is not None:
            return {"window_size": (window[0], 0 if is_causal else window[1])}
        return {"window_size": (-1, 0) if is_causal else (-1, -1)}
    return {"is_causal": is_causal}


def can_use_varlen(device: torch.device, dtype: torch.dtype, d_head: int, *, masked: bool,
                   dropout_p: float, rotary: bool, window: bool = False,
                   grouped: bool = False, scores_changed: bool = False) -> bool:
    """Whether packed self-attention runs on torch's variable-length flash kernel.

    It needs a CUDA GPU of compute capability 8.0 or newer, 16-bit floats and a head size
    that is a multiple of 8 up to 256 (the flash kernel's limits), and takes no attention
    mask, dropout, position offsets (rotary) or changed scores (ALiBi, softcap); a
    ``window`` needs a kernel that takes ``window_size`` and grouped key/value heads one
    that takes ``enable_gqa``. ``attention_backend`` other than ``"auto"`` also turns it
    off. Otherwise the packed tokens attend on the padded layout.
    """
    # The kernel is looked up last: on the CPU it is never imported.
    if not (device.type == "cuda"
            and dtype in (torch.float16, torch.bfloat16)
            and d_head % 8 == 0 and d_head <= 256
            and not masked and dropout_p == 0.0 and not rotary and not scores_changed
            and functional.current_backend() == "auto"
            and torch.cuda.get_device_capability(device)[0] >= 8):
        return False
    loaded = _load_varlen()
    if loaded is None:
        return False
    kernel, keyword = loaded
    return (not window or keyword == "window_size") and \
        (not grouped or "enable_gqa" in inspect.signature(kernel).parameters)


class KVCache:
    """Keys and values a :class:`MultiHeadAttention` has already projected.

    Passed as ``cache=`` to the module, it is updated in place:

    - in self-attention (``key`` omitted) each call appends the new positions' keys and
      values, so a decoding step costs one position, not a re-run of the prefix;
    - in cross-attention (``key`` given) the first call projects the memory and later calls
      reuse it, since the encoder output does not change while decoding.

    The positions live in preallocated buffers that appends write into, so a step copies
    only its own positions, not the whole prefix as a concatenation would. ``capacity``
    (optional) sizes the buffers for the positions a search will take at most (``generate``
    knows them); otherwise, or once exceeded, they grow by doubling.

    A module with a ``window`` appends with ``keep=left``: the positions no later query can
    see are dropped first, so the cache holds at most ``left`` + the new positions, and its
    memory stays flat however long the generation runs. ``len(cache)`` still counts every
    position seen (the next position's index); ``dropped`` counts those let go.

    Shape:
        k, v: ``(batch, kv_heads, held, d_head)``: views of the positions held.
    """

    def __init__(self, capacity: int | None = None) -> None:
        self.capacity = None if capacity is None else check_positive_int("capacity", capacity)
        self.length = 0  # positions held
        self.dropped = 0  # positions let go from the front (a window's cache)
        self._start = 0  # where the held positions begin in the buffers
        self._k: Tensor | None = None  # (b, h, room, d) buffers, room >= _start + length
        self._v: Tensor | None = None

    def __len__(self) -> int:
        return self.dropped + self.length

    @property
    def k(self) -> Tensor | None:
        return None if self._k is None else self._k[:, :, self._start: self._start + self.length]

    @property
    def v(self) -> Tensor | None:
        return None if self._v is None else self._v[:, :, self._start: self._start + self.length]

    def append(self, k: Tensor, v: Tensor, keep: int | None = None) -> tuple[Tensor, Tensor]:
        """Add new positions after the cached ones; return all keys and values held.

        ``keep``: first let go of all but the newest ``keep`` cached positions (a sliding
        window's; ``None`` keeps them all).

        When autograd records them (grad enabled and ``k`` or ``v`` requiring grad), they
        are concatenated instead: writing into the buffer would overwrite what earlier
        steps saved for the backward pass.
        """
        if self._k is not None and k.shape[0] != self._k.shape[0]:
            raise ValueError(f"cache: expected new keys for batch={self._k.shape[0]} (as "
                             f"cached), got shape {shape_of(k)}")
        if keep is not None and self.length > keep:
            self.dropped += self.length - keep
            self._start += self.length - keep
            self.length = keep
        if torch.is_grad_enabled() and (k.requires_grad or v.requires_grad):
            return self._concatenate(k, v)
        new = k.shape[-2]
        if self._k is None or self._v is None or self._start + self.length + new > \
                self._k.shape[-2]:
            needed = self.length + new
            if keep is not None:  # a window's cache: room for two windows, then move back
                room = 2 * (keep + new)
            else:
                room = max(needed, self.capacity or 0)
                if self._k is not None:
                    room = max(room, 2 * self._k.shape[-2])  # doubling: amortised O(1)
            self._k = self._moved(self._k, k, room)
            self._v = self._moved(self._v, v, room)
            self._start = 0
        start = self._start + self.length
        self._k[:, :, start: start + new] = k
        self._v[:, :, start: start + new] = v
        self.length += new
        return self.k, self.v

    def _concatenate(self, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """The differentiable append: new tensors holding the cached positions and ``k``,
        ``v`` (own copies: they may be views into a fused q/k/v output)."""
        if self._k is not None and self._v is not None and self.length:
            k = torch.cat((self.k, k), dim=-2)  # (b h n d) ++ (b h m d) -> (b h n+m d)
            v = torch.cat((self.v, v), dim=-2)
        else:
            k, v = k.contiguous(), v.contiguous()
        self._k, self._v, self._start, self.length = k, v, 0, k.shape[-2]
        return k, v

    def _moved(self, old: Tensor | None, new: Tensor, room: int) -> Tensor:
        """A buffer of ``room`` positions for rows like ``new``, holding ``old``'s held
        positions at its start."""
        batch, heads, _, d_head = new.shape
        buffer = new.new_empty((batch, heads, room, d_head))
        if old is not None and self.length:
            buffer[:, :, : self.length] = old[:, :, self._start: self._start + self.length]
        return buffer

    def reorder(self, index: Tensor) -> None:
        """Keep batch rows ``index``, in that order (beam search reorders hypotheses)."""
        if self._k is None or self._v is None:
            return
        if torch.is_grad_enabled() and (self._k.requires_grad or self._v.requires_grad):
            self._k = self.k.index_select(0, index)  # differentiable, as in append
            self._v = self.v.index_select(0, index)
            self._start = 0
            return
        self._k = self._select_rows(self._k, index)
        self._v = self._select_rows(self._v, index)

    def _select_rows(self, buffer: Tensor, index: Tensor) -> Tensor:
        """Rows ``index`` of ``buffer``'s held positions, in a buffer of the same room."""
        selected = buffer.new_empty((index.shape[0], *buffer.shape[1:]))
        held = slice(self._start, self._start + self.length)
        torch.index_select(buffer[:, :, held], 0, index, out=selected[:, :, held])
        return selected


class MultiHeadAttention(nn.Module):
    """Multi-head scaled dot-product attention, batch first.

    Four trainable projections, without bias unless ``bias=True``: ``q_proj``, ``k_proj``
    and ``v_proj`` make queries, keys and values; the heads attend in parallel; their
    outputs are concatenated and mixed by ``out_proj``.

    Args:
        d_model: model width, a multiple of ``n_heads``.
        n_heads: number of heads; each has ``d_head = d_model // n_heads`` features.
        dropout: dropout on the attention weights (training only).
        bias: add a bias to the four projections.
        kdim, vdim: feature sizes of ``key`` and ``value`` when they differ from ``d_model``.
        rotary: rotate queries and keys by their positions (self-attention only).
        rotary_base: the base of the rotary angles, ``position · base^(-2k/d_head)``
            (10,000 in RoFormer; ModernBERT's global layers use 160,000).
        n_kv_heads: key/value heads, a divisor of ``n_heads`` (``None``: ``n_heads``).
            Grouped-query attention, multi-query at 1: ``k_proj`` and ``v_proj`` make
            ``n_kv_heads * d_head`` features, query head ``h`` reads key/value head
            ``h // (n_heads // n_kv_heads)``, and a :class:`KVCache` holds ``n_kv_heads``
            heads.
        window: ``w`` or ``(left, right)``: the query at position ``i`` attends keys
            ``i - left`` to ``i + right`` only (``right`` is 0 with ``is_causal``). Long
            self-attention then costs time and memory linear in the length
            (:mod:`attention.local`); a cache keeps only the last ``left`` positions.
        alibi: add ``-m_h · |i - j|`` to head ``h``'s scores (ALiBi; the slopes of
            :func:`attention.alibi.alibi_slopes`, kept in the buffer ``alibi_slopes``).
            Not with ``rotary``.
        softcap: scores become ``softcap · tanh(scores / softcap)`` after the
            ``1/√d_head`` scaling and before the masks (Gemma 2).
        qk_norm: RMSNorm over ``d_head`` of queries and keys, with a learned ``(d_head,)``
            weight each (``q_norm``, ``k_norm``, eps 1e-6), before rotary (OLMo 2, Gemma 3).

    Positions for ``window`` and ``alibi`` are aligned to the last key, as ``is_causal``
    is: with a cache, the new queries are the newest positions.
    """

    # q/k/v_proj stacked once for a loop of inference calls (attention.inference); a class
    # default too, for modules pickled before the attribute existed.
    _qkv_projection: Callable[[Tensor], Tensor] | None = None

    def __init__(
        self,
        d_model: int,
        n_heads: int,
        dropout: float = 0.0,
        bias: bool = False,
        *,
        kdim: int | None = None,
        vdim: int | None = None,
        rotary: bool = False,
        rotary_base: float = 10000.0,
        n_kv_heads: int | None = None,
        window: int | tuple[int, int] | None = None,
        alibi: bool = False,
        softcap: float | None = None,
        qk_norm: bool = False,
    ) -> None:
        super().__init__()
        self.d_model = check_positive_int("d_model", d_model)
        self.n_heads = check_positive_int("n_heads", n_heads)
        self.d_head = check_divisible(d_model, n_heads)
        self.n_kv_heads = check_kv_heads(n_kv_heads, n_heads)
        self.kdim = d_model if kdim is None else check_positive_int("kdim", kdim)
        self.vdim = d_model if vdim is None else check_positive_int("vdim", vdim)
        self.dropout = check_probability("dropout", dropout)
        self.window = check_window(window)
        self.softcap = check_softcap(softcap)
        check_flag("alibi", alibi)
        check_flag("qk_norm", qk_norm)
        if alibi and rotary:
            raise ValueError("alibi: expected False with rotary=True (ALiBi replaces position "
                             "encodings; rotary is one), got alibi=True")

        kv_features = self.n_kv_heads * self.d_head
        self.q_proj = nn.Linear(d_model, d_model, bias=bias)
        self.k_proj = nn.Linear(self.kdim, kv_features, bias=bias)
        self.v_proj = nn.Linear(self.vdim, kv_features, bias=bias)
        self.out_proj = nn.Linear(d_model, d_model, bias=bias)
        self.rotary = RotaryEmbedding(self.d_head, check_positive_number(
            "rotary_base", rotary_base)) if rotary else None
        self.q_norm = nn.RMSNorm(self.d_head, eps=1e-6) if qk_norm else None
        self.k_norm = nn.RMSNorm(self.d_head, eps=1e-6) if qk_norm else None
        if alibi:
            self.register_buffer("alibi_slopes", alibi_slopes(n_heads), persistent=False)
        else:
            self.alibi_slopes = None
        self._qkv_projection = None

    def reset_parameters(self) -> None:
        """Draw the projections again and reset the norms, as when built; the computed
        buffers (ALiBi slopes, rotary frequencies) are computed again."""
        for module in (self.q_proj, self.k_proj, self.v_proj, self.out_proj, self.q_norm,
                       self.k_norm, self.rotary):
            if module is not None:
                module.reset_parameters()
        self._reset_slopes()

    def _reset_slopes(self) -> None:
        if self.alibi_slopes is not None:
            refill_(self.alibi_slopes, lambda: alibi_slopes(self.n_heads))

    def _apply(self, fn: Callable[[Tensor], Tensor], recurse: bool = True) -> MultiHeadAttention:
        """After ``.to()`` and the like, and ``to_empty()``, the ALiBi slopes are computed
        again where they now live: no state dict carries them."""
        super()._apply(fn, recurse)
        self._reset_slopes()
        return self

    def forward(
        self,
        query: Tensor,
        key: Tensor | None = None,
        value: Tensor | None = None,
        *,
        key_padding_mask: Tensor | None = None,
        attn_mask: Tensor | None = None,
        is_causal: bool = False,
        need_weights: bool = False,
        average_attn_weights: bool = True,
        cache: KVCache | None = None,
        packing: Packing | None = None,
        rotary_cos_sin: tuple[Tensor, Tensor] | None = None,
    ) -> tuple[Tensor, Tensor | None]:
        """Attend from ``query`` to ``key``/``value`` (to ``query`` itself when omitted).

        Self-attention (key omitted, or the very tensor ``query``) applies rotary positions
        and appends to a ``cache``; cross-attention (another key) projects the memory once
        into the ``cache`` and reuses it.

        Masks: a boolean ``True`` means "may not attend"; a float mask is added to the
        scores. With a ``cache`` in self-attention, ``Lk`` counts the cached positions too
        (masks over them all are cut to the positions a window's cache still holds, and the
        weights of ``need_weights`` cover those held positions only).

        ``window`` and ``alibi`` are for self-attention: cross-attention (another ``key``)
        with either is refused.

        With a ``packing`` (see :mod:`attention.packing`), ``query`` holds only the real
        tokens ``(t, d_model)`` of the padded batch the packing describes, and so does the
        output; the packing's mask is the key padding mask. Self-attention only.

        ``rotary_cos_sin``: the ``(cos, sin)`` of :meth:`RotaryEmbedding.cos_sin` for these
        positions, ``(Lq, d_head)`` each, when the caller computed them once for a stack of
        layers; the module computes them itself when omitted.

        Shape:
            query: ``(B, Lq, d_model)``; key: ``(B, Lk, kdim)``; value: ``(B, Lk, vdim)``.
            key_padding_mask: ``(B, Lk)``, ``True`` at padding.
            attn_mask: ``(Lq, Lk)``, ``(B * n_heads, Lq, Lk)`` or ``(B, n_heads, Lq, Lk)``.
            output: ``(B, Lq, d_model)``.
            weights: ``(B, Lq, Lk)`` averaged over heads, ``(B, n_heads, Lq, Lk)`` if not
            ``average_attn_weights``, ``None`` unless ``need_weights``.
        """
        if packing is not None:
            return self._packed_self_attention(query, packing, attn_mask, is_causal, key, value,
                                               key_padding_mask, need_weights, cache,
                                               rotary_cos_sin)
        query, key, value, self_attention = self._check_inputs(query, key, value)
        if not self_attention and (self.window is not None or self.alibi_slopes is not None):
            name = "window" if self.window is not None else "alibi"
            raise ValueError(f"{name}: expected self-attention (key omitted or query itself): "
                             f"a distance between target and source positions means nothing, "
                             f"got a key of shape {shape_of(key)}; build cross-attention "
                             f"without {name}")
        if self._dense_window_on_varlen(query, self_attention, cache, key_padding_mask,
                                        attn_mask, need_weights):
            return self._dense_varlen_attention(query, is_causal), None
        q, k, v = self._project(query, key, value, self_attention, cache, rotary_cos_sin)
        attn_mask = self._heads_mask(attn_mask, q.shape[0])
        if cache is not None and self_attention and cache.dropped:
            # Masks over every position seen: the window's cache holds only the newest.
            key_padding_mask = _newest_keys(key_padding_mask, len(cache), k.shape[-2])
            attn_mask = _newest_keys(attn_mask, len(cache), k.shape[-2])
        out, weights = attend(
            q, k, v,
            attn_mask=attn_mask,
            key_padding_mask=key_padding_mask,
            is_causal=is_causal,
            dropout_p=self.dropout if self.training else 0.0,
            need_weights=need_weights,
            **self._variants(),
        )
        out = self.out_proj(rearrange(out, "b h n d -> b n (h d)"))
        if weights is not None and average_attn_weights:
            weights = weights.mean(dim=1)  # (b h i j) -> (b i j)
        return out, weights

    def _dense_window_on_varlen(self, query: Tensor, self_attention: bool,
                                cache: KVCache | None, key_padding_mask: Tensor | None,
                                attn_mask: Tensor | None, need_weights: bool) -> bool:
        """Whether an unpadded windowed self-attention runs on torch's variable-length
        kernel (a GPU that has it: :func:`can_use_varlen`). Not under torch.compile or
        torch.export, which take the blocked path (traced and tested)."""
        return (self.window is not None and self_attention and cache is None
                and not torch.compiler.is_compiling()
                and key_padding_mask is None and attn_mask is None and not need_weights
                and self.kdim == self.d_model and self.vdim == self.d_model
                and self._varlen_applies(query, masked=False))

    def _dense_varlen_attention(self, query: Tensor, is_causal: bool) -> Tensor:
        """Windowed self-attention of ``(b, n, d_model)`` on ``varlen_attn``'s
        ``window_size``, each row a sequence of its own: the kernel skips what lies outside
        the window, where blocked attention computes the blocks around it. Its boundaries
        are known without reading the device (no host sync)."""
        batch, length = query.shape[:2]
        cu_seqlens = torch.arange(0, (batch + 1) * length, length, dtype=torch.int32,
                                  device=query.device)
        out = self._varlen_attention(self.project_qkv(query.flatten(0, 1)), cu_seqlens, length,
                                     is_causal)  # (t, d_model)
        return out.unflatten(0, (batch, length))

    def _varlen_applies(self, x: Tensor, *, masked: bool) -> bool:
        """:func:`can_use_varlen` for this module's settings and ``x``'s device and dtype."""
        return can_use_varlen(x.device, x.dtype, self.d_head, masked=masked,
                              dropout_p=self.dropout if self.training else 0.0,
                              rotary=self.rotary is not None, window=self.window is not None,
                              grouped=self.n_kv_heads != self.n_heads,
                              scores_changed=self.alibi_slopes is not None
                              or self.softcap is not None)

    def _varlen_attention(self, qkv: Tensor, cu_seqlens: Tensor, max_len: int,
                          is_causal: bool) -> Tensor:
        """``varlen_attn`` over the sequences ``cu_seqlens`` marks in the packed ``qkv``
        (:meth:`project_qkv`'s ``(t, ·)``), then ``out_proj``: ``(t, d_model)``."""
        q, k, v = self._split_heads(qkv, "t (h d) -> t h d")
        q, k = self._normalize(q, k)
        varlen_attn, causal_keyword = _load_varlen()
        extra = {"enable_gqa": True} if self.n_kv_heads != self.n_heads else {}
        out = varlen_attn(q, k, v, cu_seqlens, cu_seqlens, max_len, max_len,
                          **_causal_window(causal_keyword, is_causal, self.window),
                          **extra)  # (t h d)
        return self.out_proj(rearrange(out, "t h d -> t (h d)"))

    def variants(self) -> dict[str, Any]:
        """The attention variants this module was built with, by keyword: those of
        ``n_kv_heads``, ``window``, ``alibi``, ``softcap`` and ``qk_norm`` that are not the
        plain multi-head attention's (empty for it). For converters that refuse what their
        target cannot express."""
        variants: dict[str, Any] = {
            "n_kv_heads": self.n_kv_heads if self.n_kv_heads != self.n_heads else None,
            "window": self.window, "alibi": self.alibi_slopes is not None or None,
            "softcap": self.softcap, "qk_norm": self.q_norm is not None or None}
        return {name: value for name, value in variants.items() if value is not None}

    def _variants(self) -> dict[str, Any]:
        """The keywords :func:`attend` takes for this module's window, ALiBi and softcap."""
        return {"window": self.window, "alibi_slopes": self.alibi_slopes,
                "softcap": self.softcap}

    def _check_inputs(self, query: Tensor, key: Tensor | None, value: Tensor | None
                      ) -> tuple[Tensor, Tensor, Tensor, bool]:
        """``query``, ``key``, ``value`` checked (key and value filled in for
        self-attention), and whether this is self-attention."""
        query = check_tensor("query", query, [3], f"(batch, Lq, d_model={self.d_model})")
        check_size("query", query, -1, self.d_model, "d_model")
        # Self-attention when key is omitted, or is query itself (torch.nn's mha(x, x, x)):
        # rotary positions and the appending cache apply to it, not to cross-attention.
        self_attention = key is None or (key is query and (value is None or value is query))
        if key is None:
            if value is not None:
                raise ValueError("value: expected None when key is None (self-attention), "
                                 f"got a tensor of shape {shape_of(value)}")
            key = value = query
        elif value is None:
            value = key
        key = check_tensor("key", key, [3], f"(batch, Lk, kdim={self.kdim})")
        value = check_tensor("value", value, [3], f"(batch, Lk, vdim={self.vdim})")
        check_size("key", key, -1, self.kdim, "kdim")
        check_size("value", value, -1, self.vdim, "vdim")
        for name, x in (("key", key), ("value", value)):
            check_size(name, x, 0, query.shape[0], "batch (as in query)")
        check_size("value", value, 1, key.shape[1], "Lk (as in key)")
        return query, key, value, self_attention

    def _project(self, query: Tensor, key: Tensor, value: Tensor, self_attention: bool,
                 cache: KVCache | None, rotary_cos_sin: tuple[Tensor, Tensor] | None
                 ) -> tuple[Tensor, Tensor, Tensor]:
        """q ``(b, h, Lq, d)``, and k, v ``(b, h, Lk, d)`` with the cache's positions."""
        if self_attention:
            offset = len(cache) if cache is not None else 0
            q, k, v = self._qkv_heads(query)
            q, k = self._normalize(q, k)
            if self.rotary is not None:
                q, k = self._rotate(q, k, offset, rotary_cos_sin)
            if cache is not None:
                k, v = cache.append(k, v, keep=self.window[0] if self.window else None)
            return q, k, v
        q = rearrange(self.q_proj(query), "b n (h d) -> b h n d", h=self.n_heads)
        if self.q_norm is not None:
            q = self.q_norm(q)
        if cache is not None and cache.k is not None:
            return q, cache.k, cache.v  # the memory was projected on the first step
        k = rearrange(self.k_proj(key), "b n (h d) -> b h n d", h=self.n_kv_heads)
        v = rearrange(self.v_proj(value), "b n (h d) -> b h n d", h=self.n_kv_heads)
        if self.k_norm is not None:
            k = self.k_norm(k)
        if cache is not None:
            k, v = cache.append(k, v)
        return q, k, v

    def _qkv_heads(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """q, k, v ``(b, h, n, d)`` of ``x`` ``(b, n, d_model)``.

        One matmul for the three (:meth:`project_qkv`; the heads are views of its output),
        except without autograd on at least ``d_model`` rows: there three products cost what
        the stacked one does, and stacking the three weights for it, a copy of them at every
        call, is saved (112 µs a layer at d_model 512 on the 2-core CPU, 1.4 ms of an 8-layer
        encoder's forward). Compiled graphs keep the one product (the length is symbolic).
        """
        pattern = "b n (h d) -> b h n d"
        if self._qkv_projection is None and not torch.is_grad_enabled() \
                and not torch.compiler.is_compiling() and x.numel() >= self.d_model ** 2:
            return (rearrange(self.q_proj(x), pattern, h=self.n_heads),
                    rearrange(self.k_proj(x), pattern, h=self.n_kv_heads),
                    rearrange(self.v_proj(x), pattern, h=self.n_kv_heads))
        return self._split_heads(self.project_qkv(x), pattern)

    def _split_heads(self, qkv: Tensor, pattern: str) -> tuple[Tensor, Tensor, Tensor]:
        """The output of :meth:`project_qkv` as q, k, v heads (views), each rearranged by
        ``pattern`` (from ``(h d)`` features)."""
        kv_features = self.n_kv_heads * self.d_head
        q, k, v = qkv.split((self.d_model, kv_features, kv_features), dim=-1)
        return (rearrange(q, pattern, h=self.n_heads), rearrange(k, pattern, h=self.n_kv_heads),
                rearrange(v, pattern, h=self.n_kv_heads))

    def _normalize(self, q: Tensor, k: Tensor) -> tuple[Tensor, Tensor]:
        """``qk_norm``: queries and keys RMS-normalised over ``d_head``."""
        if self.q_norm is None or self.k_norm is None:
            return q, k
        return self.q_norm(q), self.k_norm(k)

    def project_qkv(self, x: Tensor) -> Tensor:
        """``q_proj``, ``k_proj`` and ``v_proj`` of ``x`` in one matmul, ``(..., d_model + 2 ·
        n_kv_heads · d_head)``.

        The three weights stay separate parameters (each trained, saved and loaded by its
        own name); they are concatenated for the product, which costs a copy of the weights,
        not of the activations. A projection that is not a plain ``nn.Linear`` without hooks
        (quantized, pruned, wrapped, hooked) runs its own forward instead, so what it adds
        is kept.
        """
        if self._qkv_projection is not None:
            return self._qkv_projection(x)
        if not self._plain_projections():
            return torch.cat((self.q_proj(x), self.k_proj(x), self.v_proj(x)), dim=-1)
        return F.linear(x, *self._concatenated_qkv())

    def _concatenated_qkv(self) -> tuple[Tensor, Tensor | None]:
        """The weight and bias of ``q_proj``, ``k_proj`` and ``v_proj`` stacked."""
        weight = torch.cat((self.q_proj.weight, self.k_proj.weight, self.v_proj.weight))
        bias = None
        if self.q_proj.bias is not None:
            bias = torch.cat((self.q_proj.bias, self.k_proj.bias, self.v_proj.bias))
        return weight, bias

    def _plain_projections(self) -> bool:
        """Whether q/k/v_proj may be read as bare weights: exactly ``nn.Linear``, no hooks."""
        projections = (self.q_proj, self.k_proj, self.v_proj)
        return (all(type(p) is nn.Linear and not p._forward_hooks and not p._forward_pre_hooks
                    for p in projections)
                and not nn.modules.module._global_forward_hooks
                and not nn.modules.module._global_forward_pre_hooks)

    def _packed_self_attention(
        self,
        query: Tensor,
        packing: Packing,
        attn_mask: Tensor | None,
        is_causal: bool,
        key: Tensor | None,
        value: Tensor | None,
        key_padding_mask: Tensor | None,
        need_weights: bool,
        cache: KVCache | None,
        rotary_cos_sin: tuple[Tensor, Tensor] | None,
    ) -> tuple[Tensor, None]:
        """Self-attention over the real tokens ``(t, d_model)`` of a packed batch."""
        for name, given in (("key", key), ("value", value), ("key_padding_mask",
                            key_padding_mask), ("cache", cache)):
            if given is not None:
                raise ValueError(f"{name}: expected None with packing= (packed self-attention "
                                 f"takes its padding from the packing), got {type(given).__name__}")
        if need_weights:
            raise ValueError("need_weights: expected False with packing= (weights need the "
                             "padded layout), got True")
        if self.kdim != self.d_model or self.vdim != self.d_model:
            raise ValueError(f"packing: expected kdim = vdim = d_model={self.d_model} for "
                             f"self-attention, got kdim={self.kdim}, vdim={self.vdim}")
        query = check_tensor("query", query, [2], f"(real tokens, d_model={self.d_model})")
        check_size("query", query, -1, self.d_model, "d_model")
        check_size("query", query, 0, packing.tokens, "real tokens (as in packing)")
        dropout_p = self.dropout if self.training else 0.0
        qkv = self.project_qkv(query)  # (t, d_model + 2·n_kv_heads·d_head)

        if self._varlen_applies(qkv, masked=attn_mask is not None) and packing.tokens \
                and (self.window is None or packing.contiguous):
            # A batch of padding only has nothing to attend. The kernel counts a window's
            # positions among the real tokens: with padding inside a sequence, the padded
            # layout's positions differ, so that batch attends there.
            return self._varlen_attention(qkv, packing.cu_seqlens, packing.max_seqlen(),
                                          is_causal), None

        if self._attends_sequence_by_sequence(qkv, packing, attn_mask):
            return self._sequence_by_sequence_attention(qkv, packing, is_causal, dropout_p,
                                                        rotary_cos_sin), None

        # Attention needs the sequences: scatter q, k, v to the padded layout, attend over
        # the real keys, and gather the real queries' outputs back.
        if attn_mask is not None and packing.sequence_index is not None:
            raise ValueError("attn_mask: expected None with packed documents (a mask over a "
                             "row's positions does not carry over to its documents), got a "
                             "tensor of shape " + shape_of(attn_mask))
        out = self._attend_rows(packing.to_sequences(qkv), is_causal, dropout_p,
                                rotary_cos_sin, attn_mask=self._heads_mask(
                                    attn_mask, packing.sequences),
                                key_padding_mask=packing.attention_padding_mask)
        return self.out_proj(packing.from_sequences(out)), None

    def _attend_rows(self, qkv: Tensor, is_causal: bool, dropout_p: float,
                     rotary_cos_sin: tuple[Tensor, Tensor] | None,
                     **masks: Tensor | None) -> Tensor:
        """Self-attention over rows of :meth:`project_qkv`'s output, ``(b, n, ·)`` →
        ``(b, n, d_model)`` before ``out_proj``: heads split, QK-norm, rotary from position
        0, :func:`attend` with ``masks`` and this module's variants."""
        q, k, v = self._split_heads(qkv, "b n (h d) -> b h n d")
        q, k = self._normalize(q, k)
        if self.rotary is not None:
            angles = None if rotary_cos_sin is None else (
                rotary_cos_sin[0][: q.shape[-2]], rotary_cos_sin[1][: q.shape[-2]])
            q, k = self._rotate(q, k, 0, angles)
        out, _ = attend(q, k, v, is_causal=is_causal, dropout_p=dropout_p, **masks,
                        **self._variants())
        return rearrange(out, "b h n d -> b n (h d)")

    def _attends_sequence_by_sequence(self, qkv: Tensor, packing: Packing,
                                      attn_mask: Tensor | None) -> bool:
        """Whether a packed batch attends one sequence at a time (the CPU's variable-length
        attention): on the CPU, eagerly, without ``attn_mask``, for sequences whose real
        tokens are contiguous and average :data:`SEQUENCE_BY_SEQUENCE_MIN_TOKENS` or more
        (below that the calls cost more than the padding they save)."""
        return (qkv.device.type == "cpu" and attn_mask is None
                and not torch.compiler.is_compiling() and not torch.compiler.is_exporting()
                and packing.tokens >= SEQUENCE_BY_SEQUENCE_MIN_TOKENS * packing.sequences > 0
                and packing.contiguous)

    def _sequence_by_sequence_attention(self, qkv: Tensor, packing: Packing, is_causal: bool,
                                        dropout_p: float,
                                        rotary_cos_sin: tuple[Tensor, Tensor] | None
                                        ) -> Tensor:
        """Attention over each sequence of the packed ``qkv`` ``(t, ·)`` alone: no padded
        keys to compute and no padding mask for the kernel to read, so the cost is Σ lᵢ²
        instead of s·m². Positions count from each sequence's first real token; rotary
        angles, windows and ALiBi depend only on distances, so this equals the padded
        layout's result. Then ``out_proj``: ``(t, d_model)``."""
        lengths = (packing.cu_seqlens[1:] - packing.cu_seqlens[:-1]).tolist()
        outputs = [self._attend_rows(part[None], is_causal, dropout_p, rotary_cos_sin)[0]
                   for part in qkv.split(lengths) if part.shape[0]]
        return self.out_proj(torch.cat(outputs) if outputs else qkv.new_zeros(
            0, self.d_model))

    def _rotate(self, q: Tensor, k: Tensor, offset: int,
                cos_sin: tuple[Tensor, Tensor] | None) -> tuple[Tensor, Tensor]:
        """Queries and keys ``(b, h, n, d)`` rotated by their positions from ``offset``."""
        length = q.shape[-2]
        if cos_sin is None:
            cos_sin = self.rotary.cos_sin(length, offset)
        else:  # size by size, as under torch.compile the sizes may be symbolic
            check_size("rotary_cos_sin", cos_sin[0], 0, length, "Lq")
            check_size("rotary_cos_sin", cos_sin[0], -1, self.d_head, "d_head")
        return apply_rotary(q, *cos_sin), apply_rotary(k, *cos_sin)

    def _heads_mask(self, attn_mask: Tensor | None, batch: int) -> Tensor | None:
        """Accept torch.nn's ``(B * n_heads, Lq, Lk)`` mask layout as well as ``attend``'s."""
        if isinstance(attn_mask, Tensor) and attn_mask.dim() == 3:
            if attn_mask.shape[0] != batch * self.n_heads:
                raise ValueError(
                    f"attn_mask: expected a 3-D mask of shape (batch * n_heads = "
                    f"{batch * self.n_heads}, Lq, Lk), got {shape_of(attn_mask)}"
                )
            return rearrange(attn_mask, "(b h) i j -> b h i j", h=self.n_heads)
        return attn_mask

    def extra_repr(self) -> str:
        extra = "" if self.kdim == self.vdim == self.d_model else \
            f", kdim={self.kdim}, vdim={self.vdim}"
        variants = "".join(f", {name}={value}" for name, value in self.variants().items())
        return (f"d_model={self.d_model}, n_heads={self.n_heads}, dropout={self.dropout}"
                f"{extra}, rotary={self.rotary is not None}{variants}")


def check_kv_heads(n_kv_heads: object, n_heads: int) -> int:
    """``n_kv_heads`` (``n_heads`` when ``None``): a divisor of ``n_heads``."""
    if n_kv_heads is None:
        return n_heads
    check_positive_int("n_kv_heads", n_kv_heads)
    if n_kv_heads > n_heads or n_heads % n_kv_heads:
        raise ValueError(f"n_kv_heads: expected a divisor of n_heads={n_heads} (at most "
                         f"n_heads), got {n_kv_heads}")
    return n_kv_heads


def _newest_keys(mask: Tensor | None, seen: int, held: int) -> Tensor | None:
    """A mask over all ``seen`` key positions cut to the ``held`` newest (a window's cache
    holds only those); a mask of another length is left for :func:`attend` to check."""
    if mask is None or mask.shape[-1] != seen:
        return mask
    return mask[..., seen - held:]

