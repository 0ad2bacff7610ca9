"""The attention math: ``softmax(q·kᵀ·scale + mask)·v``, on two paths with one result.

Letter key for the shapes in this file:
    b  batch
    h  heads
    i  query positions (Lq)
    j  key positions (Lk)
    d  head dimension (d_head)

Masks mean one thing everywhere in this package, what they mean for
``torch.nn.MultiheadAttention``: a boolean ``True`` means "may not attend", a floating-point
mask is added to the scores. ``F.scaled_dot_product_attention`` reads a boolean mask the
other way round (``True`` = may attend); the conversion happens once, in :func:`attend`.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.nn.attention import SDPBackend, sdpa_kernel

from . import features
from ._checks import check_choice, check_mask, check_probability, check_tensor, shape_of
from .alibi import alibi_bias
from .local import check_window, local_attention, local_keys, window_mask

__all__ = ["BACKENDS", "attend", "attention_backend", "causal_mask", "current_backend",
           "merge_masks", "sdpa_priority"]


def _sdpa_backends() -> dict[str, SDPBackend]:
    """The F.scaled_dot_product_attention kernels a backend name forces: those this torch
    has (``"cudnn"`` where :data:`attention.features.CUDNN_ATTENTION`)."""
    backends = {
        "math": SDPBackend.MATH,
        "flash": SDPBackend.FLASH_ATTENTION,
        "efficient": SDPBackend.EFFICIENT_ATTENTION,
    }
    if features.CUDNN_ATTENTION:
        backends["cudnn"] = SDPBackend.CUDNN_ATTENTION
    return backends


# "auto": the fused kernel in the order sdpa_priority() gives; "explicit": the textbook
# computation even without weights; the rest force one F.scaled_dot_product_attention kernel.
_SDPA_BACKENDS = _sdpa_backends()
BACKENDS = ("auto", "explicit", *_SDPA_BACKENDS)
# A context variable, not a module global: each thread and each asyncio task sees the
# choice made in its own context.
_backend: contextvars.ContextVar[str] = contextvars.ContextVar("attention_backend",
                                                               default="auto")


def current_backend() -> str:
    """The backend :func:`attend` runs on here: the innermost :func:`attention_backend`
    block's choice in this thread or task, ``"auto"`` outside any block.

    Under ``torch.compile`` it is called once while compiling and its answer kept: a compiled
    module runs on the backend chosen where it was compiled.
    """
    return _backend.get()


# torch.compile cannot trace ContextVar.get. This is what torch.compiler.assume_constant_result
# does (compile calls the getter and keeps the result), written out because the decorator
# imports torch._dynamo, which would double the time of `import attention`; the compile tests
# fail if a torch release reads another mark.
current_backend._dynamo_marked_constant = True  # type: ignore[attr-defined]


@contextlib.contextmanager
def attention_backend(backend: str) -> Iterator[None]:
    """Run every :func:`attend` inside the block on ``backend``, one of :data:`BACKENDS`.

    ``"auto"`` (the default outside any block) lets the package choose; ``"explicit"``
    computes the textbook ``softmax(q·kᵀ·scale)·v`` with PyTorch ops; ``"math"``,
    ``"flash"``, ``"efficient"`` and ``"cudnn"`` force that kernel of
    ``F.scaled_dot_product_attention`` (which raises if the kernel cannot take the inputs,
    for instance ``"cudnn"`` on the CPU); ``"cudnn"`` only where this torch has that kernel
    (:data:`attention.features.CUDNN_ATTENTION`), else ``ValueError``. Blocks nest; the
    previous choice comes back on exit.
    """
    if backend == "cudnn" and backend not in BACKENDS:
        raise ValueError(f"backend: 'cudnn' needs torch's cuDNN attention kernel "
                         f"(SDPBackend.CUDNN_ATTENTION), which torch {torch.__version__} lacks; "
                         f"expected one of {list(BACKENDS)}")
    check_choice("backend", backend, BACKENDS)
    token = _backend.set(backend)
    try:
        yield
    finally:
        _backend.reset(token)


def sdpa_priority(device: torch.device) -> list[SDPBackend] | None:
    """The kernels ``"auto"`` tries on ``device``, best first; ``None`` keeps torch's order.

    On Hopper (compute capability 9.x) cuDNN's attention comes first: it has been reported
    1.7–2.3× faster than the flash kernel there for training shapes, and slower on A100
    (a figure from the benchmark issue, not yet measured with this package).
    A kernel that cannot take the inputs (a mask, a dtype) is skipped, so the order only
    changes speed, never results. The order is applied where ``sdpa_kernel`` takes
    ``set_priority`` (:data:`attention.features.SDPA_SET_PRIORITY`); elsewhere "auto" keeps
    torch's order.
    """
    if (device.type == "cuda" and features.CUDNN_ATTENTION
            and torch.cuda.get_device_capability(device)[0] == 9):
        return [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION,
                SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
    return None


def _sdpa_context(device: torch.device) -> contextlib.AbstractContextManager:
    """The ``sdpa_kernel`` block :func:`attend`'s fused call runs in: the forced kernel, the
    :func:`sdpa_priority` order where torch can take one, or nothing (torch's order)."""
    backend = current_backend()
    if backend in _SDPA_BACKENDS:
        return sdpa_kernel(_SDPA_BACKENDS[backend])
    priority = sdpa_priority(device)
    if priority is None or not features.SDPA_SET_PRIORITY:
        return contextlib.nullcontext()
    return sdpa_kernel(priority, set_priority=True)


def causal_mask(q_len: int, k_len: int, device: torch.device | None = None) -> Tensor:
    """Boolean ``(q_len, k_len)`` mask, ``True`` where a query may not attend.

    Aligned to the last key: query ``i`` sees keys ``0 … k_len - q_len + i``, so the newest
    queries of a key/value cache see the whole prefix. With ``q_len > k_len`` the first
    ``q_len - k_len`` queries see no key at all (their output is zero).
    """
    q_pos = torch.arange(q_len, device=device).unsqueeze(-1) + (k_len - q_len)
    k_pos = torch.arange(k_len, device=device)
    return k_pos > q_pos


def merge_masks(
    batch: int,
    heads: int,
    q_len: int,
    k_len: int,
    *,
    attn_mask: Tensor | None = None,
    key_padding_mask: Tensor | None = None,
    is_causal: bool = False,
    window: tuple[int, int] | None = None,
    dtype: torch.dtype = torch.float32,
    device: torch.device | None = None,
) -> Tensor | None:
    """Combine the three ways of masking into one mask that broadcasts to ``(b, h, i, j)``.

    Returns ``None`` when nothing is masked, a boolean mask (``True`` = may not attend) when
    every input is boolean, otherwise a ``dtype`` mask to add to the scores (``-inf`` where
    a boolean input forbids attending).

    ``window`` ``(left, right)`` adds the band of :func:`attention.local.window_mask`.

    Shape:
        attn_mask: ``(i, j)`` or ``(b | 1, h | 1, i, j)``.
        key_padding_mask: ``(b, j)``.
    """
    masks: list[Tensor] = []
    if attn_mask is not None:
        masks.append(_checked_attn_mask(attn_mask, batch, heads, q_len, k_len))
    if key_padding_mask is not None:
        key_padding_mask = _checked_padding(key_padding_mask, batch, k_len)
        masks.append(key_padding_mask[:, None, None, :])  # (b, 1, 1, j)
    if is_causal:
        masks.append(causal_mask(q_len, k_len, device=device))
    if window is not None:
        masks.append(window_mask(q_len, k_len, window, device=device))

    merged: Tensor | None = None
    for mask in masks:
        if mask.dtype != torch.bool:
            mask = mask.to(dtype)
            if merged is not None and merged.dtype == torch.bool:
                merged = torch.zeros_like(merged, dtype=dtype).masked_fill(merged, float("-inf"))
        elif merged is not None and merged.dtype != torch.bool:
            mask = torch.zeros_like(mask, dtype=dtype).masked_fill(mask, float("-inf"))

        if merged is None:
            merged = mask
        elif merged.dtype == torch.bool:
            merged = merged | mask
        else:
            merged = merged + mask
    return merged


def _check_qkv(q: object, k: object, v: object) -> tuple[Tensor, Tensor, Tensor]:
    layout = "(batch, heads, length, d_head)"
    q = check_tensor("q", q, [4], layout)
    k = check_tensor("k", k, [4], layout)
    v = check_tensor("v", v, [4], layout)
    if k.shape[0] != q.shape[0] or v.shape[:2] != k.shape[:2] \
            or k.shape[1] == 0 or q.shape[1] % k.shape[1] != 0:
        raise ValueError(
            f"k, v: expected the batch of q={q.shape[0]} and the same number of heads, "
            f"dividing q's {q.shape[1]} (grouped-query attention), got k {shape_of(k)} and "
            f"v {shape_of(v)}"
        )
    if k.shape[-1] != q.shape[-1]:
        raise ValueError(
            f"k: expected d_head={q.shape[-1]} (the last dim of q), got shape {shape_of(k)}"
        )
    if v.shape[-2] != k.shape[-2]:
        raise ValueError(
            f"v: expected Lk={k.shape[-2]} positions (the length of k), got shape {shape_of(v)}"
        )
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise TypeError(f"k, v: expected dtype {q.dtype} like q, got {k.dtype} and {v.dtype}")
    return q, k, v


def check_softcap(softcap: object) -> float | None:
    """``softcap`` as a float, or ``None``: a positive number caps the scores."""
    if softcap is None:
        return None
    if isinstance(softcap, bool) or not isinstance(softcap, (int, float)) or not softcap > 0 \
            or softcap == float("inf"):  # (not math.isfinite: dynamo cannot trace it)
        raise ValueError(f"softcap: expected a positive finite number (or None), got "
                         f"{softcap!r}")
    return float(softcap)


def attend(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    attn_mask: Tensor | None = None,
    key_padding_mask: Tensor | None = None,
    is_causal: bool = False,
    dropout_p: float = 0.0,
    scale: float | None = None,
    need_weights: bool = False,
    window: int | tuple[int, int] | None = None,
    alibi_slopes: Tensor | None = None,
    softcap: float | None = None,
) -> tuple[Tensor, Tensor | None]:
    """Scaled dot-product attention: ``softmax(q·kᵀ·scale + mask)·v``.

    Three paths, one result. With ``need_weights=True`` the textbook computation runs and
    the attention weights are returned; with a ``window`` over a long self-attention the
    blocked :func:`attention.local.local_attention` runs, in time and memory linear in the
    length; otherwise ``F.scaled_dot_product_attention`` runs (its flash,
    memory-efficient or cuDNN kernel where one applies) and the weights are ``None``.
    :func:`attention_backend` forces the textbook path or one fused kernel.

    Masks follow ``torch.nn.MultiheadAttention``: a boolean ``True`` means "may not
    attend", a float mask is added to the scores. (``F.scaled_dot_product_attention`` reads
    boolean masks the opposite way; this function converts at that boundary, which is why
    it is not called ``scaled_dot_product_attention``.) ``is_causal`` aligns to the last
    key: with fewer queries than keys, query ``i`` sees keys ``0 … Lk - Lq + i``.

    A query whose keys are all masked returns zeros, and zero weights, instead of NaN, in
    the forward and the backward pass.

    Args:
        q, k, v: ``(b, h, i, d)``, ``(b, h_kv, j, d)``, ``(b, h_kv, j, d_v)``: ``h_kv``
            key/value heads, a divisor of ``h``; query head ``n`` reads key/value head
            ``n // (h // h_kv)`` (grouped-query attention, as SDPA's ``enable_gqa``).
        attn_mask: ``(i, j)`` or ``(b | 1, h | 1, i, j)``, bool or float.
        key_padding_mask: ``(b, j)``, bool or float; ``True`` marks padding.
        is_causal: forbid attending to later positions (aligned to the last key).
        dropout_p: dropout on the attention weights; pass ``0.0`` in evaluation.
        scale: multiplies the scores; ``1/√d_head`` when ``None``.
        need_weights: return the ``(b, h, i, j)`` weights (before dropout).
        window: ``w`` or ``(left, right)``: the query at position ``p`` sees keys ``p - left``
            to ``p + right`` only (``right`` is 0 with ``is_causal``); positions aligned to
            the last key, as for ``is_causal``.
        alibi_slopes: ``(h,)``: add ``-m_h · |p - p'|`` to head ``h``'s scores (ALiBi;
            :func:`attention.alibi.alibi_slopes`).
        softcap: scores become ``softcap · tanh(scores / softcap)``, after ``scale`` and
            before the masks (Gemma 2). No fused kernel caps scores: the textbook or the
            blocked path runs, and a forced SDPA kernel refuses it.

    Returns:
        ``(output (b, h, i, d_v), weights (b, h, i, j) or None)``.
    """
    q, k, v = _check_qkv(q, k, v)
    dropout_p = check_probability("dropout_p", dropout_p)
    window = check_window(window)
    softcap = check_softcap(softcap)
    batch, heads, q_len, d_head = q.shape
    k_len = k.shape[-2]
    scale = d_head**-0.5 if scale is None else scale
    if alibi_slopes is not None and (not isinstance(alibi_slopes, Tensor)
                                     or tuple(alibi_slopes.shape) != (heads,)):
        got = shape_of(alibi_slopes) if isinstance(alibi_slopes, Tensor) \
            else type(alibi_slopes).__name__
        raise ValueError(f"alibi_slopes: expected a Tensor of shape ({heads},) (one slope a "
                         f"query head), got {got}")
    if window is not None and is_causal:
        window = (window[0], 0)
    # Under torch.compile and torch.export the length may be symbolic: a branch on it would
    # tie the graph to one side (export refuses such a guard), so there the path does not
    # depend on the length. torch.compile runs every windowed self-attention blocked, which
    # is right at any length; torch.export (2.13) fails to solve the block count's shape
    # constraints, so an exported module masks the band on the full scores.
    compiling = torch.compiler.is_compiling()
    exporting = torch.compiler.is_exporting()
    if window is not None and not compiling and window[0] >= k_len - 1 \
            and window[1] >= q_len - 1:
        window = None  # the band holds every key of every query: nothing to mask

    backend = current_backend()
    if softcap is not None and backend in _SDPA_BACKENDS:
        raise ValueError(f"softcap: F.scaled_dot_product_attention cannot cap scores, so "
                         f"the forced backend {backend!r} cannot take softcap={softcap}; "
                         f"use 'auto' or 'explicit'")
    if window is not None and not need_weights and backend == "auto" and q_len == k_len \
            and not exporting and (compiling or 3 * local_keys(k_len, window) <= k_len):
        out = local_attention(
            q, k, v, window, scale=scale, key_padding_mask=_checked_padding(
                key_padding_mask, batch, k_len), attn_mask=_checked_attn_mask(
                attn_mask, batch, heads, q_len, k_len), alibi_slopes=alibi_slopes,
            softcap=softcap, dropout_p=dropout_p)
        return out, None

    # One query on the CPU (a decoding step): two small products cost less than the setup
    # of the fused CPU kernel (about 30% less at 128 rows of 4 heads over 16-24 keys).
    explicit = need_weights or backend == "explicit" or softcap is not None or (
        backend == "auto" and q_len == 1 and q.device.type == "cpu")
    # SDPA's own is_causal aligns to the first key; it is only the same thing for Lq == Lk.
    # Decided by a branch, not assigned: with dynamic shapes under torch.compile,
    # q_len == k_len is a SymBool, which SDPA's is_causal refuses; a branch on it makes the
    # graph guard on its value and pass SDPA a plain bool.
    use_sdpa_causal = False
    if is_causal and not explicit and attn_mask is None and key_padding_mask is None \
            and window is None and alibi_slopes is None and q_len == k_len:
        use_sdpa_causal = True
    # One query aligned to the last key sees every key: no mask to build (a decoding step).
    if is_causal and q_len == 1:
        is_causal = use_sdpa_causal = False
    mask = merge_masks(
        batch, heads, q_len, k_len,
        attn_mask=attn_mask, key_padding_mask=key_padding_mask,
        is_causal=is_causal and not use_sdpa_causal, window=window, dtype=q.dtype,
        device=q.device,
    )

    if attn_mask is None and key_padding_mask is None and q_len <= k_len:
        empty_rows = None  # causal and window masks keep each query's own key: no row empty
    else:
        mask, empty_rows = _open_empty_rows(mask)
    bias = None if alibi_slopes is None else alibi_bias(alibi_slopes, q_len, k_len, q.dtype)
    if explicit:
        return _explicit_attention(q, k, v, mask, bias, empty_rows, scale, dropout_p,
                                   need_weights, softcap)
    if bias is not None:  # SDPA takes one mask: the bias, with -inf where nothing may attend
        mask = bias if mask is None else (
            bias.masked_fill(mask, float("-inf")) if mask.dtype == torch.bool else bias + mask)
    return _fused_attention(q, k, v, mask, empty_rows, scale, dropout_p, use_sdpa_causal), None


def _checked_padding(key_padding_mask: Tensor | None, batch: int, k_len: int
                     ) -> Tensor | None:
    if key_padding_mask is None:
        return None
    return check_mask("key_padding_mask", key_padding_mask, [(batch, k_len)],
                      "(batch, Lk) = ({b}, {k})", b=batch, k=k_len)


def _checked_attn_mask(attn_mask: Tensor | None, batch: int, heads: int, q_len: int,
                       k_len: int) -> Tensor | None:
    if attn_mask is None:
        return None
    return check_mask(
        "attn_mask", attn_mask,
        [(q_len, k_len)] + [(b_, h_, q_len, k_len) for b_ in (batch, 1) for h_ in (heads, 1)],
        "(Lq, Lk) = ({q}, {k}) or (batch, heads, Lq, Lk) = ({b}, {h}, {q}, {k}), where "
        "batch and heads may be 1", q=q_len, k=k_len, b=batch, h=heads,
    )


def _open_empty_rows(mask: Tensor | None) -> tuple[Tensor | None, Tensor | None]:
    """Rows whose keys are all masked, ``(b|1, h|1, i|1, 1)``, and the mask with those rows
    opened: softmax then sees a finite row (no NaN in either pass), and the caller zeroes
    the row afterwards, which also zeroes its gradient."""
    if mask is None:
        return None, None
    blocked = mask if mask.dtype == torch.bool else mask == float("-inf")
    empty_rows = blocked.all(dim=-1, keepdim=True)
    mask = mask & ~empty_rows if mask.dtype == torch.bool else mask.masked_fill(empty_rows, 0)
    return mask, empty_rows


def _explicit_attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None,
                        bias: Tensor | None, empty_rows: Tensor | None, scale: float,
                        dropout_p: float, need_weights: bool, softcap: float | None
                        ) -> tuple[Tensor, Tensor | None]:
    """The textbook computation, with the weights (before dropout) when asked.

    With fewer key/value heads than query heads, each group of ``g`` query heads meets its
    key/value head in one product (``einsum`` over ``(b, k, g, i, d)``), without repeating
    the keys and values.
    """
    heads, kv_heads = q.shape[1], k.shape[1]
    groups = heads // kv_heads
    # In place on the fresh scores: the product's backward needs q and k, not its output,
    # and each out-of-place step would allocate and fill another copy.
    if groups > 1 and torch.compiler.is_exporting():
        # torch.export (2.11) cannot solve the shapes of the grouped product's reshapes (nor
        # repeat_interleave's): exported programs gather each query head's key/value head.
        heads_kv = torch.arange(heads, device=k.device) // groups  # head h reads h // g
        k, v = k.index_select(1, heads_kv), v.index_select(1, heads_kv)  # (b k j d) -> (b h j d)
        groups = 1
    if groups == 1:
        scores = (q @ k.transpose(-2, -1)).mul_(scale)  # (b h i d) @ (b h d j) -> (b h i j)
    else:  # each key/value head read once by its group of query heads
        scores = torch.einsum("bkgid,bkjd->bkgij", q.unflatten(1, (kv_heads, groups)), k)
        scores = scores.mul_(scale).flatten(1, 2)  # (b k g i j) -> (b h i j)
    if softcap is not None:
        scores = softcap * torch.tanh(scores / softcap)
    if bias is not None:
        scores = scores.add_(bias)
    if mask is not None:
        scores = scores.masked_fill_(mask, float("-inf")) if mask.dtype == torch.bool \
            else scores.add_(mask)
    # Softmax in at least float32 (half-precision scores lose the small weights).
    weights = scores.softmax(dim=-1, dtype=torch.promote_types(q.dtype, torch.float32))
    weights = weights.to(q.dtype)
    dropped = F.dropout(weights, p=dropout_p) if dropout_p > 0 else weights
    if groups == 1:
        out = dropped @ v  # (b h i j) @ (b h j d) -> (b h i d)
    else:
        out = torch.einsum("bkgij,bkjd->bkgid", dropped.unflatten(1, (kv_heads, groups)), v)
        out = out.flatten(1, 2)  # (b k g i d) -> (b h i d)
    if empty_rows is not None:  # zero rows with no key, on (b h i d), not (b h i j)
        out = out.masked_fill(empty_rows, 0.0)
        if need_weights:
            weights = weights.masked_fill(empty_rows, 0.0)
    return out, weights if need_weights else None


def _fused_attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None,
                     empty_rows: Tensor | None, scale: float, dropout_p: float,
                     is_causal: bool) -> Tensor:
    """``F.scaled_dot_product_attention`` on the kernel chosen for the device."""
    if mask is not None and mask.dtype == torch.bool:
        mask = ~mask  # the SDPA boundary: True now means "may attend"
    with _sdpa_context(q.device):
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, dropout_p=dropout_p, is_causal=is_causal, scale=scale,
            enable_gqa=bool(k.shape[1] != q.shape[1]),  # a bool under jit.trace too
        )
    if empty_rows is not None:
        out = out.masked_fill(empty_rows, 0.0)
    return out
