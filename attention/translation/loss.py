"""The training objective: label-smoothed cross-entropy summed over a batch's non-pad target
tokens, and the count of those tokens that a step's loss is divided by."""

from __future__ import annotations

from collections.abc import Sequence

import torch.nn.functional as F
from torch import Tensor

from .data import PAD_ID

__all__ = ["Batch", "sequence_loss", "target_tokens"]

Batch = tuple[Tensor, Tensor, Tensor]  # src (B, Ls), tgt_in (B, Lt), tgt_out (B, Lt)


def sequence_loss(logits: Tensor, labels: Tensor, label_smoothing: float) -> tuple[Tensor, Tensor]:
    """Summed cross-entropy over non-pad labels, and their count.

    With smoothing ``ε`` over ``V`` classes, a label ``y`` costs
    ``(1 - ε) · (-log p_y) + ε · mean_k(-log p_k)``; pad labels cost nothing.
    logits ``(B, L, V)``, labels ``(B, L)`` → ``(loss_sum, n_tokens)``, both scalars.
    """
    loss = F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=PAD_ID,
                           label_smoothing=label_smoothing, reduction="sum")
    return loss, (labels != PAD_ID).sum()


def target_tokens(batches: Sequence[Batch]) -> int:
    """The non-pad target tokens of ``batches``: what a step's loss is normalised by.

    Counted while the batches are still on the CPU, so that it needs no device synchronisation.
    """
    return sum(int((tgt_out != PAD_ID).sum()) for _, _, tgt_out in batches)
