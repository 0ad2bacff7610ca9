"""Our attention inside transformers models: ``attn_implementation="attention_blocks"``.

transformers looks up a model's attention function, and the function that builds its masks,
by the name in ``config._attn_implementation`` (``AttentionInterface``,
``AttentionMaskInterface``). :func:`register_with_transformers` registers both under
:data:`ATTENTION_IMPLEMENTATION`; then any model that takes a registered attention (BERT,
ModernBERT, Llama, Qwen, Mistral, …) runs its attention through :func:`attention.attend`:

    register_with_transformers()
    model = AutoModel.from_pretrained(path, attn_implementation="attention_blocks")

The masks are the ones transformers builds for SDPA (padding, causal, sliding windows,
packed documents: a boolean mask, ``True`` where a query may attend, or ``None`` where none
is needed, a causal one then becoming ``is_causal``); a 4-D mask a user passes arrives as
given, in the same convention. :func:`attention_forward` turns a boolean mask into ours
(``True`` = may not attend) at that boundary, as :func:`attend` does for SDPA, and adds a
float mask to the scores. Grouped-query heads are read in place (no repeated keys), a
softcap is applied, and a query with no key left gets zeros, not NaN.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from ..functional import attend
from .convert import import_transformers

__all__ = ["ATTENTION_IMPLEMENTATION", "attention_forward", "register_with_transformers"]

ATTENTION_IMPLEMENTATION = "attention_blocks"


def register_with_transformers(name: str = ATTENTION_IMPLEMENTATION) -> str:
    """Register our attention, and SDPA's mask function for it, with transformers under
    ``name``, and return ``name``: pass it as ``attn_implementation=`` to
    ``from_pretrained`` or ``from_config``, or to ``model.set_attn_implementation``.
    Registering again is harmless.

    The mask function must be registered too: for a name it does not know, transformers
    builds no mask at all, and padding would be attended."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"name: expected a non-empty string, got {name!r}")
    transformers = import_transformers()
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    transformers.AttentionInterface.register(name, attention_forward)
    AttentionMaskInterface.register(name, sdpa_mask)
    return name


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
        1 | h, i, j)``, boolean (SDPA's: ``True`` = may attend) or float (added to the
        scores) → ``((b, i, h, d), None)``.
    """
    if kwargs.get("s_aux") is not None:
        raise NotImplementedError("s_aux: attention sinks are not supported by "
                                  "attn_implementation='attention_blocks'")
    if attention_mask is not None:
        attention_mask = attention_mask[..., : key.shape[-2]]
        if attention_mask.dtype == torch.bool:
            attention_mask = ~attention_mask  # SDPA's convention to ours: True = may not
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
