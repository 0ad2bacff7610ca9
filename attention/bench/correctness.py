"""The correctness check beside the timings: ours and ``torch-nobias`` carry the same weights,
so their outputs on real positions must agree (up to rounding).

Shapes: ``x`` and the outputs are ``(B, L, d)``.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from ..functional import attention_backend
from ..models import Encoder
from .config import OURS, WINDOWED, BenchConfig
from .contenders import Contender, build_ours
from .timing import free_memory, is_out_of_memory
from .workload import Case

__all__ = ["check_against_torch", "checked_encoder"]


def check_against_torch(ours: Encoder, theirs: nn.Module, x: Tensor,
                        case: Case) -> dict[str, float | str]:
    """Largest ``|ours - torch|`` on real positions, explicit and fused, in eval mode:
    a number, or ``"oom"``, or ``"nan"``/``"inf"`` (JSON has no such numbers)."""
    names = ("ours-explicit", "ours-fused")
    ours.eval()
    theirs.eval()
    with torch.inference_mode():
        try:
            reference = theirs(x, src_key_padding_mask=case.key_padding_mask).float()
        except Exception as error:
            if not is_out_of_memory(error):
                raise
            free_memory(x.device)
            return dict.fromkeys(names, "oom")
        differences: dict[str, float | str] = {}
        for name, backend in zip(names, ("explicit", "auto"), strict=True):
            try:
                with attention_backend(backend):
                    out = ours(x, key_padding_mask=case.key_padding_mask).float()
            except Exception as error:
                if not is_out_of_memory(error):
                    raise
                differences[name] = "oom"
                free_memory(x.device)
                continue
            gap = (out - reference).abs()  # (B, L, d)
            if case.key_padding_mask is not None:
                gap = gap[case.keep_mask]  # (real tokens, d)
            largest = gap.max().item()
            differences[name] = largest if math.isfinite(largest) else str(largest)
    return differences


def checked_encoder(config: BenchConfig, contenders: dict[str, Contender],
                    device: torch.device, dtype: torch.dtype) -> Encoder | None:
    """The Encoder whose weights ``torch-nobias`` carries, to check against it: one of ours
    from ``contenders``, or built again from the seed (``None`` without torch-nobias)."""
    if "torch-nobias" not in contenders:
        return None
    for name in OURS:
        if name in contenders and name not in WINDOWED:  # a window computes another function
            return contenders[name].module
    torch.manual_seed(config.seed)  # the seed build_contenders built it with
    return build_ours(config).to(device=device, dtype=dtype)
