"""Checkpoint averaging: the element-wise mean of the weights of a run's last checkpoints
(as fairseq's ``scripts/average_checkpoints.py`` does), which often translates a little
better than any one of them.

The mean is a running sum in float64, one checkpoint loaded at a time, cast back to each
weight's own dtype at the end. Integer buffers (counters, indices) are not averaged: they
are the last checkpoint's. Weights that share one tensor in the checkpoints (a tied embedding
and output head) share one in the average too.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from .checkpoint import load_checkpoint, shared_entries

__all__ = ["average_checkpoints", "average_state_dicts"]


def average_state_dicts(state_dicts: Sequence[Mapping[str, Tensor]]) -> dict[str, Tensor]:
    """The element-wise mean of ``state_dicts``' floating-point tensors (summed in float64,
    returned in each tensor's dtype); other tensors (integer buffers) are the last's.

    Raises ``ValueError`` when ``state_dicts`` is empty, or when one of them differs from the
    first in its keys or in a tensor's shape or dtype (the message names the key, the index
    and what was expected).
    """
    if not state_dicts:
        raise ValueError("average_state_dicts: expected at least one state dict, got none")
    mean = RunningMean()
    for index, state_dict in enumerate(state_dicts):
        mean.add(state_dict, f"state dict {index}")
    return mean.result()


def average_checkpoints(paths: Sequence[str | Path]) -> dict[str, Any]:
    """Average the weights of the checkpoints at ``paths`` (written by training, of one model).

    Returns a whole checkpoint, ready for
    :func:`~attention.translation.checkpoint.save_checkpoint`: the latest one's (the highest
    training step, whatever the order of ``paths``: a shell sorts ``checkpoint_step900.pt``
    after ``checkpoint_step1000.pt``) config, tokenizers, optimizer, scheduler, random states
    and progress, with its ``"model"`` replaced by the average, and ``"averaged_from"``: a
    list of ``{"file": name, "step": step}``, one per path, by step.

    The checkpoints are read one at a time, onto the CPU: memory holds the running sum, the
    latest checkpoint so far and the one being read.

    Raises:
        ValueError: ``paths`` is empty or names a file twice; a file is not a checkpoint (see
            :func:`~attention.translation.checkpoint.load_checkpoint`); or it is of another
            model than the first path's (its config's ``model`` section, its tokenizers, or
            its weights' names, shapes or dtypes differ): the message names the file and what
            differs.
        FileNotFoundError: a path is not a file.
    """
    paths = [Path(path) for path in paths]
    if not paths:
        raise ValueError("average_checkpoints: expected at least one checkpoint, got none")
    seen: dict[Path, Path] = {}
    for path in paths:
        if path.resolve() in seen:
            raise ValueError(f"{path}: given twice (also as {seen[path.resolve()]}); each "
                             f"checkpoint is averaged once")
        seen[path.resolve()] = path

    mean = RunningMean()
    averaged_from = []
    first = latest = None
    for path in paths:
        checkpoint = load_checkpoint(path, map_location="cpu")
        if first is None:
            first = (path, checkpoint["config"]["model"], checkpoint["tokenizers"])
        else:
            _check_same_model(path, checkpoint, *first)
        mean.add(checkpoint["model"], str(path))
        step = int(checkpoint["progress"]["step"])
        averaged_from.append({"file": path.name, "step": step})
        if latest is None or step >= int(latest["progress"]["step"]):
            latest = checkpoint
        del checkpoint  # the latest is kept; any other goes before the next is read
    averaged_from.sort(key=lambda entry: entry["step"])
    return {**latest, "model": mean.result(), "averaged_from": averaged_from}


def _check_same_model(path: Path, checkpoint: dict[str, Any], first_path: Path,
                      model: dict[str, Any], tokenizers: dict[str, str]) -> None:
    """Raise ``ValueError`` unless ``checkpoint`` (read from ``path``) has the config
    ``model`` section and the ``tokenizers`` of the first checkpoint, ``first_path``."""
    theirs = checkpoint["config"]["model"]
    for key in sorted(model.keys() | theirs.keys()):
        if model.get(key) != theirs.get(key):
            raise ValueError(f"{path}: not the same model as {first_path}: its config's "
                             f"model.{key} is {theirs.get(key)!r}, expected "
                             f"{model.get(key)!r}")
    for side in sorted(tokenizers.keys() | checkpoint["tokenizers"].keys()):
        if tokenizers.get(side) != checkpoint["tokenizers"].get(side):
            raise ValueError(f"{path}: not the same model as {first_path}: its {side} "
                             f"tokenizer differs ({_describe(checkpoint['tokenizers'], side)}, "
                             f"expected {_describe(tokenizers, side)})")


def _describe(tokenizers: dict[str, str], side: str) -> str:
    """A tokenizer in a few words: its vocabulary's size, when it reads."""
    if side not in tokenizers:
        return "none"
    from tokenizers import Tokenizer

    try:
        return f"{Tokenizer.from_str(tokenizers[side]).get_vocab_size()} tokens"
    except Exception:  # tokenizers raises a bare Exception for a bad JSON
        return "unreadable"


class RunningMean:
    """The mean of state dicts added one at a time with :meth:`add`; :meth:`result` reads it.

    Keeps a float64 sum of each floating-point tensor (one per shared tensor: keys whose
    tensors share memory in every state dict added share one sum), and the last state dict's
    other values. Holds no reference to the tensors it was given.
    """

    def __init__(self) -> None:
        self.count = 0
        self.first_name = ""
        self.expected: dict[str, tuple[torch.Size, torch.dtype]] = {}
        self.sums: dict[str, Tensor] = {}
        self.others: dict[str, Any] = {}  # non-floating values: the last state dict's
        self.shared: dict[str, str] = {}  # key -> the earlier key whose tensor it is, so far
        self.order: list[str] = []  # the first state dict's keys
        self.expected_keys: set[str] = set()

    def add(self, state_dict: Mapping[str, Tensor], name: str) -> None:
        """Add ``state_dict`` (called ``name`` in errors) to the mean."""
        if self.count == 0:
            self.first_name = name
            self.expected = {key: (value.shape, value.dtype) for key, value in state_dict.items()
                             if isinstance(value, Tensor)}
            self.shared = _shared_keys(state_dict)
            self.order = list(state_dict)
            self.expected_keys = set(self.order)
        else:
            self._check(state_dict, name)
            now_shared = _shared_keys(state_dict)
            for key, earlier in list(self.shared.items()):
                if now_shared.get(key) != earlier:  # no longer one tensor: a sum of its own
                    del self.shared[key]
                    self.sums[key] = self.sums[earlier].clone()
        for key, value in state_dict.items():
            if not (isinstance(value, Tensor) and value.is_floating_point()):
                self.others[key] = value
            elif key in self.shared:
                continue
            elif self.count == 0:
                self.sums[key] = value.detach().to(torch.float64, copy=True)
            else:
                self.sums[key] += value.detach().to(self.sums[key].device, torch.float64)
        self.count += 1

    def _check(self, state_dict: Mapping[str, Tensor], name: str) -> None:
        missing = [key for key in self.order if key not in state_dict]
        unexpected = [key for key in state_dict if key not in self.expected_keys]
        if missing or unexpected:
            parts = [f"{label} {', '.join(map(repr, found[:5]))}"
                     + (f" and {len(found) - 5} more" if len(found) > 5 else "")
                     for label, found in (("missing", missing), ("unexpected", unexpected))
                     if found]
            raise ValueError(f"{name}: expected the keys of {self.first_name}, got others: "
                             f"{'; '.join(parts)}")
        for key, (shape, dtype) in self.expected.items():
            value = state_dict[key]
            if not isinstance(value, Tensor):
                raise ValueError(f"{name}: {key!r} is a {type(value).__name__}, expected a "
                                 f"tensor (as in {self.first_name})")
            if value.shape != shape:
                raise ValueError(f"{name}: {key!r} has shape {tuple(value.shape)}, expected "
                                 f"{tuple(shape)} (as in {self.first_name})")
            if value.dtype != dtype:
                raise ValueError(f"{name}: {key!r} is {value.dtype}, expected {dtype} (as in "
                                 f"{self.first_name})")

    def result(self) -> dict[str, Any]:
        """The mean so far, in the first state dict's order of keys."""
        if self.count == 0:
            raise ValueError("RunningMean: expected at least one state dict, got none")
        means = {key: (total / self.count).to(self.expected[key][1])
                 for key, total in self.sums.items()}
        result = {}
        for key in self.order:
            if key in self.shared:
                result[key] = means[self.shared[key]]
            elif key in means:
                result[key] = means[key]
            else:
                result[key] = self.others[key]
        return result


def _shared_keys(state_dict: Mapping[str, Any]) -> dict[str, str]:
    """The floating-point entries of ``state_dict`` that hold an earlier entry's tensor."""
    return {key: earlier for key, earlier in shared_entries(state_dict).items()
            if state_dict[key].is_floating_point()}
