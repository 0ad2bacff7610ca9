"""Timing: one run of a contender, a group of contenders timed in alternated rounds (with the
CUDA memory of each run), out-of-memory and other failures recorded instead of raised, and
the matmul peak that MFU is measured against.

A run is timed by :func:`.clock.timed` (``time.perf_counter`` on the CPU, CUDA events after
a synchronize on the GPU), in the rotated order of :func:`.rounds.rotated`. Shapes: ``x``
is ``(B, L, d)``.
"""

from __future__ import annotations

import gc
from typing import Any

import torch
from torch import Tensor

from .clock import timed
from .contenders import Contender
from .rounds import rotated
from .workload import Case

__all__ = [
    "MATMUL_RUNS",
    "MATMUL_SIZE",
    "MIB",
    "GroupTimer",
    "describe_error",
    "free_memory",
    "is_out_of_memory",
    "measure_matmul_peak",
    "prepare",
    "run_group",
    "run_once",
    "timed",
]

MATMUL_SIZE = {"cpu": 2048, "cuda": 8192}
MATMUL_RUNS = 5  # the peak is the best of these, after one warm-up
MIB = 2**20


def run_once(contender: Contender, x: Tensor, case: Case, training: bool) -> None:
    """One run: a forward (inference, under ``inference_mode``), or a forward and the
    backward of the mean square of the outputs at real positions (training)."""
    if training:
        out = contender.forward(x, case)
        (out.float().pow(2) * case.loss_weight).sum().backward()
    else:
        with torch.inference_mode():
            contender.forward(x, case)


def prepare(contender: Contender, x: Tensor, training: bool) -> None:
    """The mode of the pass, and no gradients left from an earlier run."""
    contender.module.train(training)
    for parameter in contender.module.parameters():
        parameter.grad = None
    x.grad = None


def is_out_of_memory(error: BaseException) -> bool:
    """Whether ``error`` is an out-of-memory, of the GPU or of the CPU allocator."""
    if isinstance(error, (MemoryError, torch.OutOfMemoryError)):
        return True
    message = str(error).lower()
    return isinstance(error, RuntimeError) and ("out of memory" in message
                                                or "can't allocate memory" in message)


def describe_error(error: BaseException) -> str:
    """``Type: first line of the message``, at most 300 characters, for the results."""
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0] if lines else ''}"[:300]


def free_memory(device: torch.device) -> None:
    """Collect garbage, and hand the CUDA cache back on the GPU."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


class GroupTimer:
    """The contenders of one (length, dtype, pass, case), timed in alternated rounds.

    ``results`` holds per contender ``status`` (``ok``, ``oom`` or ``error``), ``error`` (a
    message or ``None``), ``times`` (seconds, one per round) and ``memory`` (on CUDA, the
    largest peak a run allocated above what was allocated before it; else ``None``). A
    contender that fails drops out of the later rounds; the others go on.
    """

    def __init__(self, contenders: dict[str, Contender], x: Tensor, case: Case,
                 training: bool) -> None:
        self.contenders = contenders
        self.x = x.detach().requires_grad_(training)
        self.device = x.device
        self.case = case
        self.training = training
        self.results: dict[str, dict[str, Any]] = {
            name: {"status": "ok", "error": None, "times": [], "memory": None}
            for name in contenders}

    def warm_up(self, runs: int) -> None:
        """``runs`` untimed runs of every contender (they cover compilation)."""
        for name, contender in self.contenders.items():
            try:
                for _ in range(runs):
                    prepare(contender, self.x, self.training)
                    run_once(contender, self.x, self.case, self.training)
            except Exception as error:
                self.fail(name, error)

    def time_round(self, round_index: int) -> None:
        """One timed run of every contender still ``ok``; round ``i`` starts at the
        ``i``-th contender, so that none always follows the same neighbour."""
        for name in rotated(list(self.contenders), round_index):
            if self.results[name]["status"] == "ok":
                self.time_one(name)

    def time_one(self, name: str) -> None:
        contender = self.contenders[name]
        prepare(contender, self.x, self.training)
        cuda = self.device.type == "cuda"
        try:
            if cuda:
                torch.cuda.synchronize(self.device)
                torch.cuda.reset_peak_memory_stats(self.device)
                before = torch.cuda.memory_allocated(self.device)
            seconds = timed(lambda: run_once(contender, self.x, self.case, self.training),
                            self.device)
        except Exception as error:
            self.fail(name, error)
            return
        self.results[name]["times"].append(seconds)
        if cuda:
            self.record_cuda_memory(name, before, torch.cuda.max_memory_allocated(self.device))

    def record_cuda_memory(self, name: str, before: int, peak: int) -> None:
        """Keep the largest ``peak - before`` (bytes) of the contender's runs."""
        memory = self.results[name]["memory"]
        if memory is None or peak - before > memory["run_mib"] * MIB:
            self.results[name]["memory"] = {
                "status": "ok", "kind": "cuda_allocated", "baseline_mib": before / MIB,
                "peak_mib": peak / MIB, "run_mib": (peak - before) / MIB}

    def fail(self, name: str, error: BaseException) -> None:
        """Record ``error`` as the contender's status and free what its run left."""
        self.results[name].update(status="oom" if is_out_of_memory(error) else "error",
                                  error=describe_error(error), times=[], memory=None)
        prepare(self.contenders[name], self.x, self.training)  # drop gradients it left
        free_memory(self.device)

    def finish(self) -> dict[str, dict[str, Any]]:
        """The results, with every contender's gradients dropped."""
        for contender in self.contenders.values():
            prepare(contender, self.x, self.training)
        return self.results


def run_group(contenders: dict[str, Contender], x: Tensor, case: Case, training: bool,
              warmup: int, repeats: int) -> dict[str, dict[str, Any]]:
    """Warm every contender up, then time ``repeats`` alternated rounds of one run each.

    Returns per contender ``status`` (``ok``, ``oom`` or ``error``), ``error`` (a message
    or ``None``), ``times`` (seconds, one per round) and, on CUDA, ``memory``
    (see :class:`GroupTimer`).
    """
    timer = GroupTimer(contenders, x, case, training)
    timer.warm_up(warmup)
    for round_index in range(repeats):
        timer.time_round(round_index)
    return timer.finish()


def measure_matmul_peak(device: torch.device | str, dtype: torch.dtype,
                        size: int | None = None, runs: int = MATMUL_RUNS) -> dict[str, Any]:
    """The best FLOP/s of a ``size³`` matmul in ``dtype`` (one warm-up, best of ``runs``)."""
    device = torch.device(device)
    size = MATMUL_SIZE[device.type] if size is None else size
    generator = torch.Generator().manual_seed(0)
    a = torch.randn(size, size, generator=generator).to(device=device, dtype=dtype)
    b = torch.randn(size, size, generator=generator).to(device=device, dtype=dtype)
    a @ b
    best = min(timed(lambda: a @ b, device) for _ in range(runs))
    return {"size": size, "best_seconds": best, "flop_per_s": 2 * size**3 / best}
