"""The optimizer and its learning-rate schedules: AdamW over two parameter groups (matrices
decayed, the rest not) and the factor of ``train.lr`` at each step (``inverse_sqrt`` or
``cosine``, both after a linear warmup), for ``torch.optim.lr_scheduler.LambdaLR``."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn

from .config import TrainConfig

__all__ = ["CosineSchedule", "cosine_schedule", "inverse_sqrt_schedule",
           "learning_rate_schedule", "make_optimizer"]


def inverse_sqrt_schedule(warmup_steps: int):
    """Learning-rate factor: linear warmup to 1 over ``warmup_steps``, then ``√(warmup/step)``."""

    def factor(step: int) -> float:
        step += 1
        return min(step / warmup_steps, math.sqrt(warmup_steps / step)) if warmup_steps else \
            1.0
    return factor


class CosineSchedule:
    """Learning-rate factor: linear warmup to 1, then a cosine down to 0 at ``total_steps``.

    An object, not a closure, so that ``total_steps`` can move (a time budget fits it to the
    steps the budget allows, see
    :meth:`attention.translation.training.Trainer._fit_horizon_to_budget`) and so that
    ``LambdaLR``'s state dict saves it: a resumed run keeps its horizon.
    """

    def __init__(self, warmup_steps: int, total_steps: int) -> None:
        self.warmup_steps = warmup_steps
        self.total_steps = total_steps
        self.fitted = False  # whether total_steps was fitted to a time budget

    def __call__(self, step: int) -> float:
        step += 1
        if step < self.warmup_steps:
            return step / self.warmup_steps
        progress = min((step - self.warmup_steps)
                       / max(self.total_steps - self.warmup_steps, 1), 1.0)
        return 0.5 * (1.0 + math.cos(math.pi * progress))


def cosine_schedule(warmup_steps: int, total_steps: int) -> CosineSchedule:
    """Linear warmup to 1, then a cosine down to 0 at ``total_steps``."""
    return CosineSchedule(warmup_steps, total_steps)


def learning_rate_schedule(cfg: TrainConfig) -> Callable[[int], float]:
    """The factor of ``cfg.lr`` at each step, as ``cfg.schedule`` names it."""
    if cfg.schedule == "cosine":
        return cosine_schedule(cfg.warmup_steps, cfg.max_steps)
    return inverse_sqrt_schedule(cfg.warmup_steps)


def make_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW (betas 0.9, 0.98; eps 1e-9) with ``cfg.weight_decay`` on the matrices only.

    Group 0 (decayed) holds every trainable parameter with two or more dimensions: the
    attention projections, the feed-forward weights, both embeddings (a tied output head *is*
    the target embedding, one parameter, listed once) and learned positions. Group 1 (no
    decay) holds the rest: LayerNorm weights, biases, any 1-D parameter. Embeddings are decayed
    with the other matrices because, tied, the target embedding is the output projection whose
    logit scale decay is there to hold down (nanoGPT draws the same line, and moving it would
    leave existing checkpoints' optimizer states unloadable).
    """
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.98), eps=1e-9)
