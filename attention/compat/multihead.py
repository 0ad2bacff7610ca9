"""``torch.nn.MultiheadAttention`` with torch.nn's parameters, computed by :func:`attend`.

Letter key for the einops patterns: ``b`` batch, ``h`` heads, ``n`` length, ``d`` head
dimension, ``e`` embedding (``h d``).
"""

from __future__ import annotations

import operator
from typing import Any

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn
from torch.nn.modules.linear import NonDynamicallyQuantizableLinear

from .._checks import check_divisible, check_positive_int, check_size, check_tensor, shape_of
from ..functional import attend, causal_mask
from ..multihead import KVCache
from .errors import InvalidInputError, torch_errors
from .twins import TORCH_CLASSES, attention_args, check_exact_type, copy_into, twin_of

__all__ = ["MultiheadAttention", "load_separate_projections"]


def _to_batch_first(x: Tensor, batch_first: bool, batched: bool) -> Tensor:
    """torch.nn's layouts (``(L, N, E)``, ``(N, L, E)`` or unbatched ``(L, E)``) →
    ``(N, L, E)``."""
    if not batched:
        return x.unsqueeze(0)
    return x if batch_first else x.transpose(0, 1)


def _as_int(value: Any) -> Any:
    """An integer of another type (``numpy.int64``) as an ``int``, as torch.nn takes it."""
    if value is None or isinstance(value, (bool, int)):
        return value
    try:
        return operator.index(value)
    except TypeError:
        return value  # refused, by name, by the checks that follow


def _first_key_causal_mask(q_len: int, k_len: int, device: torch.device) -> Tensor:
    """Boolean ``(q_len, k_len)``, ``True`` = masked, query ``i`` seeing keys ``0 … i``:
    torch.nn's causal hint, aligned to the first key (:func:`causal_mask` aligns to the
    last, as a cache needs)."""
    return torch.ones(q_len, k_len, dtype=torch.bool, device=device).triu(1)


def _pad_keys(mask: Tensor | None) -> Tensor | None:
    """One more key column that may be attended (``False``, or ``0.0`` added)."""
    return None if mask is None else F.pad(mask, (0, 1))


def load_separate_projections(module: MultiheadAttention, state_dict: dict[str, Tensor],
                              prefix: str, *args: object) -> None:
    """Load-state-dict pre-hook: ``q_proj``/``k_proj``/``v_proj`` Linear weights (this
    package's :class:`attention.MultiHeadAttention`, and ``attention.compat`` before it held
    torch.nn's parameters) become ``in_proj_weight``/``in_proj_bias``, or the separate
    ``q_proj_weight``… when ``kdim``/``vdim`` differ, so those state dicts load too."""
    names = [f"{prefix}{p}_proj.weight" for p in "qkv"]
    if names[0] not in state_dict:
        return
    weights = [state_dict.pop(name) for name in names]
    if module.in_proj_weight is not None:
        state_dict[prefix + "in_proj_weight"] = torch.cat(weights)
    else:
        for p, weight in zip("qkv", weights, strict=True):
            state_dict[f"{prefix}{p}_proj_weight"] = weight
    biases = [state_dict.pop(f"{prefix}{p}_proj.bias", None) for p in "qkv"]
    if biases[0] is not None:
        state_dict[prefix + "in_proj_bias"] = torch.cat(biases)


@twin_of(TORCH_CLASSES["MultiheadAttention"])
class MultiheadAttention(nn.Module):
    """``torch.nn.MultiheadAttention``: same arguments, defaults, parameters and forward.

    The parameters are torch.nn's, with its names, shapes, order and initialisation:
    ``in_proj_weight`` ``(3E, E)`` and ``in_proj_bias`` ``(3E,)`` (``q_proj_weight``,
    ``k_proj_weight``, ``v_proj_weight`` when ``kdim``/``vdim`` differ from ``embed_dim``),
    ``bias_k``/``bias_v`` ``(1, 1, E)`` with ``add_bias_kv``, and ``out_proj``. A torch.nn
    state dict, or an optimizer's, loads as it is, and the same seed gives the same weights.

    The attention itself is this package's :func:`attention.functional.attend`.
    Sequence first unless ``batch_first``; masks: boolean ``True`` = may not attend, float =
    added to the scores. Weights are averaged over heads by default, as in torch.nn.
    """

    __constants__ = ["batch_first"]

    @torch_errors
    def __init__(
        self,
        embed_dim: int,
        num_heads: int,
        dropout: float = 0.0,
        bias: bool = True,
        add_bias_kv: bool = False,
        add_zero_attn: bool = False,
        kdim: int | None = None,
        vdim: int | None = None,
        batch_first: bool = False,
        device: Any = None,
        dtype: Any = None,
    ) -> None:
        factory = {"device": device, "dtype": dtype}
        super().__init__()
        embed_dim, num_heads, kdim, vdim = (_as_int(x) for x in (embed_dim, num_heads, kdim, vdim))
        self.embed_dim = check_positive_int("embed_dim", embed_dim)
        self.kdim = embed_dim if kdim is None else check_positive_int("kdim", kdim)
        self.vdim = embed_dim if vdim is None else check_positive_int("vdim", vdim)
        self._qkv_same_embed_dim = self.kdim == embed_dim and self.vdim == embed_dim
        self.num_heads = check_positive_int("num_heads", num_heads)
        self.dropout = dropout
        self.batch_first = batch_first
        self.head_dim = check_divisible(embed_dim, num_heads)

        # Registered in torch.nn's order, so parameters() and optimizer states line up.
        if self._qkv_same_embed_dim:
            self.in_proj_weight = nn.Parameter(torch.empty(3 * embed_dim, embed_dim, **factory))
            self.register_parameter("q_proj_weight", None)
            self.register_parameter("k_proj_weight", None)
            self.register_parameter("v_proj_weight", None)
        else:
            self.q_proj_weight = nn.Parameter(torch.empty(embed_dim, embed_dim, **factory))
            self.k_proj_weight = nn.Parameter(torch.empty(embed_dim, self.kdim, **factory))
            self.v_proj_weight = nn.Parameter(torch.empty(embed_dim, self.vdim, **factory))
            self.register_parameter("in_proj_weight", None)
        if bias:
            self.in_proj_bias = nn.Parameter(torch.empty(3 * embed_dim, **factory))
        else:
            self.register_parameter("in_proj_bias", None)
        self.out_proj = NonDynamicallyQuantizableLinear(embed_dim, embed_dim, bias=bias,
                                                        **factory)
        if add_bias_kv:
            self.bias_k = nn.Parameter(torch.empty(1, 1, embed_dim, **factory))
            self.bias_v = nn.Parameter(torch.empty(1, 1, embed_dim, **factory))
        else:
            self.bias_k = self.bias_v = None
        self.add_zero_attn = add_zero_attn
        self._reset_parameters()
        self.register_load_state_dict_pre_hook(load_separate_projections)

    def _reset_parameters(self) -> None:
        """torch.nn's initialisation, in its order (the same seed gives the same weights)."""
        if self._qkv_same_embed_dim:
            nn.init.xavier_uniform_(self.in_proj_weight)
        else:
            nn.init.xavier_uniform_(self.q_proj_weight)
            nn.init.xavier_uniform_(self.k_proj_weight)
            nn.init.xavier_uniform_(self.v_proj_weight)
        if self.in_proj_bias is not None:
            nn.init.constant_(self.in_proj_bias, 0.0)
            nn.init.constant_(self.out_proj.bias, 0.0)
        if self.bias_k is not None:
            nn.init.xavier_normal_(self.bias_k)
        if self.bias_v is not None:
            nn.init.xavier_normal_(self.bias_v)

    @classmethod
    def from_torch(cls, module: nn.MultiheadAttention) -> MultiheadAttention:
        """This class with the weights, layout, mode and ``requires_grad`` of ``module``, a
        ``torch.nn.MultiheadAttention`` (exactly: a subclass's own forward would be lost)."""
        check_exact_type("module", module, cls.torch_class)
        return copy_into(module, cls(**attention_args(module)))

    def to_torch(self) -> nn.MultiheadAttention:
        """The ``torch.nn.MultiheadAttention`` with this module's weights, layout and mode."""
        return copy_into(self, self.torch_class(**attention_args(self)))

    @torch_errors
    def forward(
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        key_padding_mask: Tensor | None = None,
        need_weights: bool = True,
        attn_mask: Tensor | None = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
        *,
        cache: KVCache | None = None,
    ) -> tuple[Tensor, Tensor | None]:
        """Shape: query ``(L, N, E)`` (``(N, L, E)`` if batch_first, ``(L, E)`` unbatched);
        key/value likewise with ``S``; key_padding_mask ``(N, S)``; attn_mask ``(L, S)`` or
        ``(N * num_heads, L, S)``. Returns ``(L, N, E)`` and ``(N, L, S)`` weights (or
        ``(N, num_heads, L, S)`` when not ``average_attn_weights``).

        ``is_causal`` is torch.nn's hint that ``attn_mask`` is causal; as in torch.nn it
        needs the mask, except with a ``cache``, where it stands for the causal mask of the
        new positions over all positions so far.

        ``cache`` (not in torch.nn): a :class:`attention.KVCache` for incremental decoding.
        In self-attention (``query``, ``key`` and ``value`` the same tensor) each call
        appends its keys and values, and ``S`` (masks) counts the cached positions; in
        cross-attention the first call projects the memory and later calls reuse it.
        """
        batched = self._check_inputs(query, key, value, key_padding_mask, attn_mask)
        self_attention = key is query and value is query
        if is_causal and attn_mask is None and not (cache is not None and self_attention):
            raise InvalidInputError(
                "is_causal: Need attn_mask if specifying the is_causal hint. You may use the "
                "Transformer module method `generate_square_subsequent_mask` to create this "
                "mask (with a self-attention cache=, is_causal=True needs no mask)")
        query, key, value = (_to_batch_first(x, self.batch_first, batched)
                             for x in (query, key, value))
        if key_padding_mask is not None and not batched and key_padding_mask.dim() == 1:
            key_padding_mask = key_padding_mask.unsqueeze(0)  # torch.nn's unbatched (S,)
        top_left = False
        if is_causal and attn_mask is not None:
            if cache is None and key_padding_mask is None and not need_weights:
                # torch.nn trusts the hint here: the mask is replaced, unread, by the causal
                # one aligned to the first key (over the extra keys too).
                attn_mask, top_left = None, True
            else:
                is_causal = False  # the mask as given, as torch.nn does
        cached = len(cache) if cache is not None and self_attention else 0
        self._check_attn_mask(attn_mask, query.shape[0], query.shape[1], cached + key.shape[1])
        attn_mask = self._heads_mask(attn_mask)

        q, k, v = self._project(query, key, value, self_attention, cache)
        if is_causal and not top_left and (self.bias_k is not None or self.add_zero_attn):
            # A cache's causal mask (aligned to the last cached key) spelled out before the
            # extra keys are added, so that they stay visible.
            attn_mask, is_causal = causal_mask(q.shape[-2], k.shape[-2], q.device), False
        k, v, attn_mask, key_padding_mask = self._extra_keys(k, v, attn_mask, key_padding_mask)
        if top_left and q.shape[-2] != k.shape[-2]:
            attn_mask = _first_key_causal_mask(q.shape[-2], k.shape[-2], q.device)
            is_causal = False

        out, weights = attend(
            q, k, v,
            attn_mask=attn_mask,
            key_padding_mask=key_padding_mask,
            is_causal=is_causal,
            dropout_p=self.dropout if self.training else 0.0,
            need_weights=need_weights,
        )
        # Built sequence first, (L, N, E) in memory, whatever the layout, as torch.nn does:
        # a dropout after this module then draws its mask over the same elements.
        out = self.out_proj(rearrange(out, "b h n d -> n b (h d)"))
        if not batched:
            out = out.squeeze(1)
        elif self.batch_first:
            out = out.transpose(0, 1)
        if weights is not None:
            if average_attn_weights:
                weights = weights.mean(dim=1)  # (b h i j) -> (b i j)
            if not batched:
                weights = weights.squeeze(0)
        return out, weights

    def _check_inputs(self, query: Tensor, key: Tensor, value: Tensor,
                      key_padding_mask: Tensor | None, attn_mask: Tensor | None) -> bool:
        """Shapes checked in the caller's layout; whether the input is batched. The
        messages name the argument, then say what torch.nn's say for the same mistake."""
        layout = "(N, L, E) if batch_first" if self.batch_first else "(L, N, E)"
        for name, x in (("query", query), ("key", key), ("value", value)):
            if not isinstance(x, Tensor):
                raise TypeError(f"{name}: expected a Tensor of shape {layout} or unbatched "
                                f"(L, E), got {type(x).__name__}")
        if query.dim() not in (2, 3):
            raise ValueError(f"query: query should be unbatched 2D or batched 3D tensor but "
                             f"received {query.dim()}-D query tensor (shape {shape_of(query)})")
        batched = query.dim() == 3
        kind = "batched (3-D)" if batched else "unbatched (2-D)"
        if key.dim() != query.dim() or value.dim() != query.dim():
            raise ValueError(f"key, value: for {kind} `query`, expected `key` and `value` to be "
                             f"{query.dim()}-D but found {key.dim()}-D and {value.dim()}-D "
                             f"tensors respectively (shapes {shape_of(key)}, {shape_of(value)})")
        for name, mask in (("key_padding_mask", key_padding_mask), ("attn_mask", attn_mask)):
            if mask is not None and not isinstance(mask, Tensor):
                raise TypeError(f"{name}: expected None or a bool or float Tensor, got "
                                f"{type(mask).__name__}")
        padding_dims = 2 if batched else 1
        if key_padding_mask is not None and key_padding_mask.dim() != padding_dims:
            raise ValueError(f"key_padding_mask: for {kind} `query`, expected `key_padding_mask` "
                             f"to be `None` or {padding_dims}-D but found "
                             f"{key_padding_mask.dim()}-D tensor instead")
        if attn_mask is not None and attn_mask.dim() not in (2, 3):
            raise ValueError(f"attn_mask: for {kind} `query`, expected `attn_mask` to be "
                             f"`None`, 2-D or 3-D but found {attn_mask.dim()}-D tensor instead")
        if attn_mask is not None and attn_mask.dim() == 3 and not batched:
            expected = (self.num_heads, query.shape[0], key.shape[0])
            if tuple(attn_mask.shape) != expected:
                raise ValueError(f"attn_mask: for unbatched (2-D) `query`, Expected `attn_mask` "
                                 f"shape to be {expected} but got {shape_of(attn_mask)}")
        for name, x, size in (("query", query, "embed_dim"), ("key", key, "kdim"),
                              ("value", value, "vdim")):
            check_tensor(name, x, [query.dim()], f"{layout} or unbatched (L, E)")
            check_size(name, x, -1, getattr(self, size), size)
        if batched:
            batch_dim = 0 if self.batch_first else 1
            for name, x in (("key", key), ("value", value)):
                check_size(name, x, batch_dim, query.shape[batch_dim], "N (as in query)")
        length_dim = 1 if batched and self.batch_first else 0
        check_size("value", value, length_dim, key.shape[length_dim], "S (as in key)")
        return batched

    def _check_attn_mask(self, attn_mask: Tensor | None, batch: int, q_len: int,
                         k_len: int) -> None:
        """torch.nn's mask shapes, ``(L, S)`` or ``(N * num_heads, L, S)``, ``S`` counting a
        self-attention cache's positions; torch.nn's wording."""
        if attn_mask is None:
            return
        expected = (q_len, k_len) if attn_mask.dim() == 2 else \
            (batch * self.num_heads, q_len, k_len)
        if tuple(attn_mask.shape) != expected:
            raise ValueError(f"attn_mask: The shape of the {attn_mask.dim()}D attn_mask is "
                             f"{shape_of(attn_mask)}, but should be {expected}.")

    def _heads_mask(self, attn_mask: Tensor | None) -> Tensor | None:
        """torch.nn's ``(N * num_heads, L, S)`` mask → ``(N, num_heads, L, S)``."""
        if attn_mask is not None and attn_mask.dim() == 3:
            return rearrange(attn_mask, "(b h) i j -> b h i j", h=self.num_heads)
        return attn_mask

    def _project(self, query: Tensor, key: Tensor, value: Tensor, self_attention: bool,
                 cache: KVCache | None) -> tuple[Tensor, Tensor, Tensor]:
        """q ``(b, h, L, d)``, and k, v ``(b, h, S, d)`` with the cache's positions."""
        if self_attention and self.in_proj_weight is not None:  # one matmul for q, k and v
            q, k, v = F.linear(query, self.in_proj_weight, self.in_proj_bias).chunk(3, dim=-1)
        else:
            w_q, w_k, w_v = self._in_proj_weights()
            b_q, b_k, b_v = (None,) * 3 if self.in_proj_bias is None else \
                self.in_proj_bias.chunk(3)
            q = F.linear(query, w_q, b_q)
            if cache is not None and not self_attention and cache.k is not None:
                # cross-attention: the memory was projected on the first step
                return rearrange(q, "b n (h d) -> b h n d", h=self.num_heads), cache.k, cache.v
            k, v = F.linear(key, w_k, b_k), F.linear(value, w_v, b_v)
        q = rearrange(q, "b n (h d) -> b h n d", h=self.num_heads)
        k = rearrange(k, "b n (h d) -> b h n d", h=self.num_heads)
        v = rearrange(v, "b n (h d) -> b h n d", h=self.num_heads)
        if cache is not None:
            k, v = cache.append(k, v)
        return q, k, v

    def _in_proj_weights(self) -> tuple[Tensor, Tensor, Tensor]:
        """The query, key and value projection weights, views of ``in_proj_weight`` when
        packed."""
        if self.in_proj_weight is not None:
            return self.in_proj_weight.chunk(3)
        return self.q_proj_weight, self.k_proj_weight, self.v_proj_weight

    def _extra_keys(self, k: Tensor, v: Tensor, attn_mask: Tensor | None,
                    key_padding_mask: Tensor | None
                    ) -> tuple[Tensor, Tensor, Tensor | None, Tensor | None]:
        """``add_bias_kv``'s learned key and value, then ``add_zero_attn``'s zeros, appended
        as one more key each, with one more column in each mask, as torch.nn does."""
        batch = k.shape[0]
        if self.bias_k is not None and self.bias_v is not None:
            k = torch.cat((k, rearrange(self.bias_k, "1 1 (h d) -> 1 h 1 d", h=self.num_heads)
                           .expand(batch, -1, -1, -1)), dim=-2)
            v = torch.cat((v, rearrange(self.bias_v, "1 1 (h d) -> 1 h 1 d", h=self.num_heads)
                           .expand(batch, -1, -1, -1)), dim=-2)
            attn_mask, key_padding_mask = _pad_keys(attn_mask), _pad_keys(key_padding_mask)
        if self.add_zero_attn:
            k = torch.cat((k, k.new_zeros(*k.shape[:2], 1, k.shape[-1])), dim=-2)
            v = torch.cat((v, v.new_zeros(*v.shape[:2], 1, v.shape[-1])), dim=-2)
            attn_mask, key_padding_mask = _pad_keys(attn_mask), _pad_keys(key_padding_mask)
        return k, v, attn_mask, key_padding_mask

    def new_cache(self) -> KVCache:
        """An empty :class:`attention.KVCache` for ``forward(…, cache=)``."""
        return KVCache()

    def __setstate__(self, state: dict[str, Any]) -> None:
        # torch.nn's pickles from before _qkv_same_embed_dim existed, as torch.nn reads them
        state.setdefault("_qkv_same_embed_dim", True)
        super().__setstate__(state)

