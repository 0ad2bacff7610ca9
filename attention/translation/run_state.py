"""What a training run keeps between its steps and its sessions, apart from the model: where
it is (:class:`Progress`), each rank's random state, the check that a resumed run's config
may continue the checkpoint's, the stop requested by Ctrl-C or SIGTERM (:class:`StopFlag`) and
the run's ``metrics.jsonl`` (:class:`MetricsWriter`)."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import shutil
import signal
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .checkpoint import write_atomic
from .config import Config, ConfigError
from .distributed import Distributed

__all__ = ["FIXED_ON_RESUME", "MetricsWriter", "Progress", "RngStates", "StopFlag",
           "check_resumable", "restore_rng", "rng_state", "set_rng_state"]

RngStates = list[dict[str, Any]]  # each rank's random-number states, in rank order


@dataclass
class Progress:
    """Where a run is: saved in checkpoints so that ``--resume`` continues exactly."""

    step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0  # batches of ``epoch`` already trained on
    best_bleu: float = -1.0
    best_loss: float = math.inf
    best_step: int = 0
    wall_seconds: float = 0.0  # time spent in this run so far, over all its sessions
    validation_seconds: float = 0.0  # the last validation's (rank 0's) time: for the budget
    last_eval_step: int = -1
    last_saved_step: int = -1  # the step in checkpoint_last.pt
    validations_without_improvement: int = 0  # in a row, for train.patience
    window_loss: float = 0.0  # summed loss and tokens since the last logged training record
    window_tokens: int = 0
    ranks: int = 1  # processes that trained the last session (torchrun's WORLD_SIZE)


# Random state ------------------------------------------------------------------------------

def rng_state(device: torch.device) -> dict[str, Any]:
    """This process's random state: torch's CPU generator and, on CUDA, ``device``'s."""
    state = {"torch": torch.get_rng_state()}
    if device.type == "cuda":  # the training device's only: resuming may see other GPUs
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict[str, Any], device: torch.device) -> None:
    """Set the random state :func:`rng_state` returned (its CUDA part on ``device``)."""
    torch.set_rng_state(state["torch"].cpu())
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"].cpu(), device)


def restore_rng(checkpoint: dict[str, Any], world: Distributed, fallback_seed: int) -> None:
    """Each rank continues its own random stream; a rank the checkpoint did not have (more
    ranks than wrote it) starts a new one from ``fallback_seed``."""
    saved = [checkpoint["rng"], *checkpoint.get("rng_other_ranks", [])]
    if world.rank < len(saved):
        set_rng_state(saved[world.rank], world.device)
    else:
        torch.manual_seed(fallback_seed + world.rank)


# Resuming ----------------------------------------------------------------------------------

# What a resumed run may not change: what it trains, its data order and its optimizer's
# settings (restored from the checkpoint, so a change would be silently ignored).
FIXED_ON_RESUME = {"train": ("seed", "batch_tokens", "schedule", "warmup_steps", "lr",
                             "weight_decay")}


def check_resumable(saved: Config, config: Config) -> None:
    """A resumed run may change how long it trains (and how it logs and evaluates).

    Raises:
        ConfigError: ``config`` changes a model or data setting of ``saved`` (the
            checkpoint's), or one of :data:`FIXED_ON_RESUME`, or ``max_steps`` under the
            cosine schedule.
    """
    keys = [("model", key) for key in dataclasses.asdict(saved.model)]
    keys += [("data", key) for key in dataclasses.asdict(saved.data)]
    keys += [("train", key) for key in FIXED_ON_RESUME["train"]]
    if saved.train.schedule == "cosine":  # the schedule is shaped by max_steps
        keys.append(("train", "max_steps"))
    for section, key in keys:
        old, new = getattr(getattr(saved, section), key), getattr(getattr(config, section), key)
        if old != new:
            raise ConfigError(f"{section}.{key}: the checkpoint was trained with {old!r}, the "
                              f"config asks for {new!r}; a resumed run keeps it (start a new "
                              f"run with another name=... to change it)")


# Stopping ----------------------------------------------------------------------------------

class StopFlag:
    """Turns the first Ctrl-C (or SIGTERM, as a job scheduler sends) into a request to stop
    after the current step; a second signal acts at once."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self.requested = False
        self.previous: dict[int, Any] = {}

    @contextlib.contextmanager
    def installed(self) -> Iterator[None]:
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        self.previous = {number: signal.getsignal(number) for number in self.SIGNALS}
        for number in self.SIGNALS:
            signal.signal(number, self._handle)
        try:
            yield
        finally:
            for number, handler in self.previous.items():
                signal.signal(number, handler)

    def _handle(self, signum: int, frame: Any) -> None:
        self.requested = True
        signal.signal(signum, self.previous[signum])


# The metrics file --------------------------------------------------------------------------

class MetricsWriter:
    """Appends one JSON object per line to ``metrics.jsonl`` (flushed as written) and, given
    ``tensorboard`` (a folder), each record's numbers as TensorBoard scalars ``kind/key``."""

    def __init__(self, path: Path, fresh: bool, keep_until_step: int = 0,
                 tensorboard: Path | None = None) -> None:
        self.path = path
        if not fresh and path.is_file():
            # Records past the checkpoint (written before a hard stop) would appear twice.
            # A val_average record (the end of a finished run) is written again at its end.
            kept = [line for line in path.read_text(encoding="utf-8").splitlines(keepends=True)
                    if _record_step(line) <= keep_until_step and '"val_average"' not in line]
            write_atomic(path, lambda f: f.write("".join(kept).encode()))
        self.file = path.open("w" if fresh else "a", encoding="utf-8")
        self.board = None
        if tensorboard is not None:
            from torch.utils.tensorboard import SummaryWriter

            if fresh:
                shutil.rmtree(tensorboard, ignore_errors=True)  # the previous run's events
            # purge_step: TensorBoard drops a resumed run's events past its checkpoint.
            self.board = SummaryWriter(str(tensorboard),
                                       purge_step=None if fresh else keep_until_step + 1)

    def write(self, record: dict[str, Any]) -> None:
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        if self.board is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, int | float) and \
                        not isinstance(value, bool):
                    self.board.add_scalar(f"{record['kind']}/{key}", value, record["step"])
            self.board.flush()

    def close(self) -> None:
        self.file.close()
        if self.board is not None:
            self.board.close()


def _record_step(line: str) -> float:
    try:
        return json.loads(line)["step"]
    except (ValueError, KeyError, TypeError):
        return math.inf  # a torn last line goes too
