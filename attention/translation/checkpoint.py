"""Checkpoints that carry everything needed to use or continue a run, written atomically.

A checkpoint is a plain dictionary of tensors, numbers, strings and lists, so that
``torch.load(path, weights_only=True)`` reads it: the model's weights, the optimizer's and
scheduler's states, the random-number generators' states, the run's config, both tokenizers
(as JSON strings) and the training progress.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ..models import Transformer
from .config import Config, ModelConfig
from .files import write_atomic

__all__ = [
    "FORMAT",
    "config_from_checkpoint",
    "load_checkpoint",
    "model_from_config",
    "save_checkpoint",
    "write_atomic",
]

FORMAT = "attention-translation/1"


def save_checkpoint(path: str | Path, checkpoint: dict[str, Any]) -> Path:
    """``torch.save`` ``checkpoint`` to ``path`` atomically."""
    return write_atomic(path, lambda file: torch.save({"format": FORMAT, **checkpoint}, file))


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a checkpoint with ``weights_only=True`` and check that it is one of ours."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint: file not found: {path}")
    checkpoint = torch.load(path, map_location=map_location, weights_only=True)
    if not isinstance(checkpoint, dict) or checkpoint.get("format") != FORMAT:
        found = checkpoint.get("format") if isinstance(checkpoint, dict) else type(checkpoint)
        raise ValueError(f"checkpoint: expected a {FORMAT!r} checkpoint written by "
                         f"attention-train, got format {found!r} in {path}")
    return checkpoint


def model_from_config(model: ModelConfig, src_vocab_size: int, tgt_vocab_size: int,
                      pad_id: int) -> Transformer:
    """The :class:`Transformer` that a config's ``model`` section describes."""
    return Transformer(
        src_vocab_size, tgt_vocab_size, d_model=model.d_model, n_heads=model.n_heads,
        n_encoder_layers=model.n_encoder_layers, n_decoder_layers=model.n_decoder_layers,
        d_ff=model.d_ff, dropout=model.dropout, pad_id=pad_id,
        tie_embeddings=model.tie_embeddings, positional=model.positional,
        max_len=model.max_len, norm_first=model.norm_first, activation=model.activation,
    )


def config_from_checkpoint(checkpoint: dict[str, Any]) -> Config:
    """The run's config, checked like a config file."""
    return Config.from_dict(checkpoint["config"], check_files=False)
