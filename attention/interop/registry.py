"""Our attention inside transformers models: ``attn_implementation="attention_blocks"``.

transformers looks up a model's attention function, and the function that builds its masks,
by the name in ``config._attn_implementation`` (``AttentionInterface``,
``AttentionMaskInterface``). :func:`register_with_transformers` registers both under
:data:`ATTENTION_IMPLEMENTATION`; then any model that takes a registered attention (BERT,
ModernBERT, Llama, Qwen, Mistral, …) runs its attention through :func:`attention.attend`:

    register_with_transformers()
    model = AutoModel.from_pretrained(path, attn_implementation="attention_blocks")

The masks arrive as :func:`attend` reads them: the pattern transformers would give SDPA
(padding, causal, sliding windows, packed documents), as a boolean mask where ``True``
means "may not attend"; ``None`` where none is needed (a causal mask then becomes
``is_causal``). Grouped-query heads are read in place (no repeated keys), a softcap is
applied, and a query with no key left gets zeros, not NaN.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from ..functional import attend
from .convert import import_transformers

__all__ = ["ATTENTION_IMPLEMENTATION", "attention_forward", "attention_mask",
           "register_with_transformers"]

ATTENTION_IMPLEMENTATION = "attention_blocks"


def register_with_transformers(name: str = ATTENTION_IMPLEMENTATION) -> str:
    """Register our attention and its mask function with transformers under ``name``, and
    return ``name``: pass it as ``attn_implementation=`` to ``from_pretrained`` or
    ``from_config``, or to ``model.set_attn_implementation``. Registering again is
    harmless."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"name: expected a non-empty string, got {name!r}")
    transformers = import_transformers()
    from transformers.masking_utils import AttentionMaskInterface

    transformers.AttentionInterface.register(name, attention_forward)
    AttentionMaskInterface.register(name, attention_mask)
    return name


def attention_mask(*args: Any, **kwargs: Any) -> Tensor | None:
    """transformers' mask function for ``attention_blocks``: SDPA's boolean mask (``True`` =
    attend), or ``None`` where SDPA needs none, turned into ours (``True`` = may not
    attend)."""
    from transformers.masking_utils import sdpa_mask

    mask = sdpa_mask(*args, **kwargs)
    return None if mask is None else ~mask


def attention_forward(
    module: nn.Module,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attention_mask: Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    is_causal: bool | None = None,
    position_bias: Tensor | None = None,
    softcap: float | None = None,
    **kwargs: Any,
) -> tuple[Tensor, None]:
    """transformers' attention function for ``attention_blocks``, on :func:`attend`.

    Shapes:
        query ``(b, h, i, d)``; key, value ``(b, h_kv, j, d)``; attention_mask ``(b | 1,
        1 | h, i, j)`` (a boolean from :func:`attention_mask`, ``True`` = may not attend, or
        a float added to the scores) → ``((b, i, h, d), None)``.
    """
    if kwargs.get("s_aux") is not None:
        raise NotImplementedError("s_aux: attention sinks are not supported by "
                                  "attn_implementation='attention_blocks'")
    if attention_mask is not None:
        attention_mask = attention_mask[..., : key.shape[-2]]
    is_causal = getattr(module, "is_causal", True) if is_causal is None else is_causal
    is_causal = query.shape[2] > 1 and attention_mask is None and bool(is_causal)
    if is_causal and key.shape[-2] > query.shape[2]:
        # An empty static cache's prefill: the keys past the queries are unfilled slots.
        key, value = key[:, :, : query.shape[2]], value[:, :, : query.shape[2]]
    if position_bias is not None:  # T5's relative bias, added to the scores
        position_bias = position_bias[..., : key.shape[-2]]
        attention_mask = position_bias if attention_mask is None else (
            position_bias.masked_fill(attention_mask, float("-inf"))
            if attention_mask.dtype == torch.bool else position_bias + attention_mask)
    out, _ = attend(query, key, value, attn_mask=attention_mask, is_causal=is_causal,
                    dropout_p=dropout if module.training else 0.0, scale=scaling,
                    softcap=softcap)
    return out.transpose(1, 2).contiguous(), None
