"""Several processes training one model, as ``torchrun`` starts them.

``torchrun --nproc_per_node N scripts/train.py ...`` starts N copies of the script with
``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE``, ``MASTER_ADDR`` and ``MASTER_PORT`` set.
:func:`distributed_session` reads them, joins the processes into one process group (``nccl``
when training on CUDA, ``gloo`` on the CPU) and gives each process its device: CUDA process
``LOCAL_RANK`` takes ``cuda:LOCAL_RANK``. Without that environment (a plain ``python`` run)
it yields a one-process :class:`Distributed` whose collectives return their input, so the
training code has one path.

How the work is split is :func:`shard`: every optimizer step takes ``world_size ×
grad_accum_steps`` consecutive batches of the epoch's (seeded, identical on every rank)
order, and each rank trains on its own slice of them.
"""

from __future__ import annotations

import contextlib
import datetime
import gc
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from ..common.devices import resolve_device
from ..common.errors import ConfigError

__all__ = ["Distributed", "distributed_session", "environment_rank", "environment_world_size",
           "peer_lost",
           "shard"]

T = TypeVar("T")


def shard(group: Sequence[T], rank: int, world_size: int) -> list[T]:
    """Rank ``rank``'s share of one step's batches: every ``world_size``-th, from ``rank``.

    ``group`` holds ``world_size × grad_accum_steps`` batches; the shares are disjoint and
    together are the whole group.
    """
    if not 0 <= rank < world_size:
        raise ValueError(f"rank: expected 0 ≤ rank < world_size={world_size}, got {rank}")
    return list(group[rank::world_size])


@dataclass(frozen=True)
class Distributed:
    """This process's place among the ranks, and the few collectives training needs.

    With ``world_size == 1`` there is no process group and every collective is the identity.
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0: the one that logs, validates and writes the run's files."""
        return self.rank == 0

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    def sum(self, values: Sequence[float]) -> list[float]:
        """Each value summed over the ranks (in float64: token counts stay exact)."""
        if not self.enabled:
            return [float(v) for v in values]
        tensor = torch.tensor([float(v) for v in values], dtype=torch.float64,
                              device=self._collective_device)
        dist.all_reduce(tensor)
        return tensor.tolist()

    def broadcast(self, value: Any) -> Any:
        """Rank 0's ``value`` (any picklable object), on every rank."""
        if not self.enabled:
            return value
        box = [value if self.is_main else None]
        dist.broadcast_object_list(box, src=0, device=self._collective_device)
        return box[0]

    def gather(self, value: Any) -> list[Any] | None:
        """Every rank's ``value`` in rank order on rank 0; ``None`` on the others."""
        if not self.enabled:
            return [value]
        box = [None] * self.world_size if self.is_main else None
        dist.gather_object(value, box, dst=0)
        return box

    @property
    def _collective_device(self) -> torch.device:
        """Where collectives' tensors live: the GPU for nccl, the CPU for gloo."""
        return self.device if self.device.type == "cuda" else torch.device("cpu")


def environment_world_size() -> int:
    """``WORLD_SIZE`` as ``torchrun`` sets it (1 when it does not)."""
    return _env_int("WORLD_SIZE", 1)


def environment_rank() -> int:
    """``RANK`` as ``torchrun`` sets it (0 when it does not)."""
    return _env_int("RANK", 0)


# What a collective raises on a rank whose peer died (gloo's RuntimeError, NCCL's
# DistBackendError): the process group cannot go on.
_PEER_LOST = ("Connection closed by peer", "Connection reset by peer", "remote worker",
              "NCCL communicator was aborted", "Broken pipe")


def peer_lost(error: BaseException) -> bool:
    """Whether ``error`` is a collective failing because another rank stopped."""
    if isinstance(error, (dist.DistNetworkError, dist.DistBackendError)):
        return True
    return isinstance(error, RuntimeError) and any(text in str(error) for text in _PEER_LOST)


def elastic_restart() -> bool:
    """Whether ``torchrun --max-restarts`` has restarted the processes after a failure."""
    return _env_int("TORCHELASTIC_RESTART_COUNT", 0) > 0


def restarts_allowed() -> bool:
    """Whether ``torchrun --max-restarts`` may restart the processes after a failure (they
    then continue the newest run folder)."""
    return _env_int("TORCHELASTIC_MAX_RESTARTS", 0) > 0


@contextlib.contextmanager
def distributed_session(device_name: str, timeout_minutes: float = 60.0
                        ) -> Iterator[Distributed]:
    """Join the process group ``torchrun`` describes (if any) and pick this rank's device.

    ``device_name`` is the config's ``train.device``. Under ``torchrun``, ``auto`` and
    ``cuda`` mean ``cuda:LOCAL_RANK``; naming one GPU (``cuda:1``) for all ranks is an error.
    ``timeout_minutes`` bounds every wait in a collective, rank 0's validation and final
    evaluation included. A process group set up by the caller is used as it is and left open;
    one set up here is destroyed when training ends normally. A failing rank leaves it as it
    is and exits: its peers' collectives then fail (``gloo``) or ``torchrun`` stops them.
    """
    world_size = dist.get_world_size() if dist.is_initialized() else environment_world_size()
    if world_size == 1:
        yield Distributed(device=resolve_device(device_name))
        return
    rank = dist.get_rank() if dist.is_initialized() else _env_int("RANK", None)
    local_rank = _env_int("LOCAL_RANK", rank)
    device = _rank_device(device_name, local_rank)
    owned = not dist.is_initialized()
    if owned:
        timeout = datetime.timedelta(minutes=timeout_minutes)
        if device.type == "cuda":
            dist.init_process_group("nccl", timeout=timeout, device_id=device)
        else:
            dist.init_process_group("gloo", timeout=timeout)
    # Not in a ``finally``: tearing down a group with collectives its peers never matched can
    # block (nccl), and the failing process must exit for the others to stop.
    yield Distributed(rank=rank, world_size=world_size, local_rank=local_rank, device=device)
    if owned:
        # DistributedDataParallel sits in reference cycles and holds the group: left to the
        # garbage collector, it could tear the group down during interpreter shutdown, which
        # aborts the process (seen on gloo as "terminate called without an active exception"
        # after a finished run). Collect it now, let every rank get here, then destroy.
        gc.collect()
        dist.barrier()
        dist.destroy_process_group()


def _rank_device(device_name: str, local_rank: int) -> torch.device:
    device = resolve_device(device_name)
    if device.type != "cuda":
        return device
    if device.index is not None:
        raise ConfigError(f"train.device: under torchrun each process takes "
                          f"cuda:LOCAL_RANK; expected auto or cuda, got {device_name!r}")
    count = torch.cuda.device_count()
    if local_rank >= count:
        raise ConfigError(f"train.device: LOCAL_RANK={local_rank} needs GPU {local_rank}, "
                          f"but this machine has {count}; start at most {count} processes "
                          f"per node (torchrun --nproc_per_node)")
    device = torch.device("cuda", local_rank)
    torch.cuda.set_device(device)
    return device


def _env_int(name: str, default: int | None) -> int:
    raw = os.environ.get(name)
    if raw is None:
        if default is None:
            raise ConfigError(f"{name}: WORLD_SIZE is set, so {name} must be too (start the "
                              f"processes with torchrun)")
        return default
    try:
        return int(raw)
    except ValueError:
        raise ConfigError(f"{name}: expected an integer in the environment, got "
                          f"{raw!r}") from None
