"""Checkpoints that carry everything needed to use or continue a run, written atomically.

A checkpoint is a plain dictionary of tensors, numbers, strings and lists, so that
``torch.load(path, weights_only=True)`` reads it: the model's weights, the optimizer's and
scheduler's states, the random-number generators' states, the run's config, both tokenizers
(as JSON strings) and the training progress.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from ..common.files import write_atomic
from ..models import Transformer
from .config import Config, ModelConfig

__all__ = [
    "AVERAGE",
    "FORMAT",
    "config_from_checkpoint",
    "load_checkpoint",
    "model_from_config",
    "numbered_checkpoint",
    "numbered_checkpoints",
    "save_checkpoint",
    "shared_entries",
    "write_atomic",
]

FORMAT = "attention-translation/1"
AVERAGE = "checkpoint_average.pt"  # train.average_last's average of the numbered checkpoints
_NUMBERED = re.compile(r"checkpoint_step(\d+)\.pt")


def numbered_checkpoint(step: int) -> str:
    """The file name of a run's numbered checkpoint of ``step`` (``train.keep_last``)."""
    return f"checkpoint_step{step}.pt"


def numbered_checkpoints(run_dir: str | Path) -> list[tuple[int, Path]]:
    """The numbered checkpoints in ``run_dir``, as ``(step, path)`` from the earliest step."""
    found = []
    for path in Path(run_dir).glob("checkpoint_step*.pt"):
        match = _NUMBERED.fullmatch(path.name)
        if match:
            found.append((int(match.group(1)), path))
    return sorted(found)


def shared_entries(state_dict: Mapping[str, Any]) -> dict[str, str]:
    """``{key: earlier key}`` for each tensor entry of ``state_dict`` that is the very tensor
    of an earlier one (the same memory, dtype, shape and strides; a tied output head's
    ``lm_head.weight`` → ``tgt_embed.weight``), mapped to the first key holding it. Empty
    tensors are never counted as shared."""
    first_of: dict[tuple, str] = {}
    shared = {}
    for key, value in state_dict.items():
        if not isinstance(value, torch.Tensor) or value.numel() == 0:
            continue
        identity = (value.device, value.data_ptr(), value.dtype, value.shape, value.stride())
        if identity in first_of:
            shared[key] = first_of[identity]
        else:
            first_of[identity] = key
    return shared


def save_checkpoint(path: str | Path, checkpoint: dict[str, Any]) -> Path:
    """``torch.save`` ``checkpoint`` to ``path`` atomically."""
    return write_atomic(path, lambda file: torch.save({"format": FORMAT, **checkpoint}, file))


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a checkpoint with ``weights_only=True`` and check that it is one of ours.

    Raises ``FileNotFoundError`` when ``path`` is not a file, and ``ValueError`` (one line,
    naming the file) when it is not a whole checkpoint written by this package: truncated,
    not a ``torch.save`` file, holding objects a weights-only load refuses, of another
    format, or missing one of the keys training writes.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint: file not found: {path}")

    def incomplete(reason: str) -> ValueError:
        return ValueError(f"{path}: not a complete checkpoint of this package ({reason})")

    def first_sentence(message: str) -> str:  # of an error message, on one line and short
        line = message.strip().splitlines()[0] if message.strip() else ""
        return line.split(". ")[0][:120]

    try:
        checkpoint = torch.load(path, map_location=map_location, weights_only=True)
    except PermissionError:
        raise
    except Exception as error:  # torch.load raises many kinds on a truncated or foreign file
        message = str(error).strip()
        if path.stat().st_size == 0:
            reason = "the file is empty"
        elif "weights_only" in message or "WeightsUnpickler" in message:
            # Only what was refused, not torch's advice to retry with weights_only=False,
            # which would run whatever code the file holds.
            detail = message.partition("WeightsUnpickler error:")[2].strip()
            reason = "a weights-only load refuses it" + (f": {first_sentence(detail)}"
                                                         if detail else "")
        else:
            reason = (f"unreadable, truncated or not written by torch.save: "
                      f"{type(error).__name__}: {first_sentence(message)}")
        raise incomplete(reason) from None
    if not isinstance(checkpoint, dict):
        raise incomplete(f"it holds a {type(checkpoint).__name__}, not a dict")
    if "format" in checkpoint and checkpoint["format"] != FORMAT:
        raise incomplete(f"format {checkpoint['format']!r}, expected {FORMAT!r}")
    keys = ("format", "config", "model", "tokenizers", "optimizer", "scheduler", "rng",
            "progress")  # what training's save writes, and what loading it reads
    missing = [key for key in keys if key not in checkpoint]
    if missing:
        raise incomplete(f"missing key{'s' if len(missing) > 1 else ''} "
                         f"{', '.join(map(repr, missing))}")
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
        norm=model.norm, n_kv_heads=model.n_kv_heads, window=model.window,
        global_every=model.global_every, alibi=model.alibi, softcap=model.softcap,
        qk_norm=model.qk_norm,
    )


def config_from_checkpoint(checkpoint: dict[str, Any]) -> Config:
    """The run's config, checked like a config file."""
    return Config.from_dict(checkpoint["config"], check_files=False)
