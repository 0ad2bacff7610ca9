"""The run: every cell of a config on one device, dtype by dtype, length by length, pass by
pass and case by case, into one report (a JSON-ready dict; see :mod:`attention.bench`).

The contenders of one (length, dtype, pass, case) are timed together, in one process
(:func:`~attention.bench.timing.run_group`); CPU memory is measured after them, one
subprocess per cell (:mod:`attention.bench.memory`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from ..common.errors import ConfigError
from .cells import group_cells
from .config import DEFAULT_CONTENDERS, DTYPES, BenchConfig, check_contenders, check_device
from .contenders import Contender, build_contenders, x_transformers_status
from .correctness import check_against_torch, checked_encoder
from .environment import environment
from .kit import say as log_to_stderr
from .memory import measure_cpu_peak_rss
from .timing import free_memory, measure_matmul_peak, run_group
from .workload import Case, make_case, make_input

__all__ = ["Runner", "log_to_stderr", "run_benchmark"]

Log = Callable[[str], None]


def run_benchmark(config: BenchConfig, device: str = "cpu", *,
                  contenders: Sequence[str] | None = None, threads: int | None = None,
                  command: str = "", log: Log = log_to_stderr) -> dict[str, Any]:
    """Measure every cell of ``config`` on ``device`` and return the report (see
    :mod:`attention.bench`; :func:`~attention.bench.report.write_results` writes it).

    ``contenders``: names from :data:`~attention.bench.config.CONTENDERS` (default: the
    :data:`~attention.bench.config.DEFAULT_CONTENDERS`); x-transformers is skipped with a
    notice when it does not import. ``threads`` sets torch's CPU threads for the run
    (``None``: leave them as they are; the command line's default is
    :func:`~attention.bench.environment.default_threads`). ``log`` receives progress lines
    and notices.
    """
    names = list(DEFAULT_CONTENDERS if contenders is None else contenders)
    check_contenders(names, config)
    check_device(device)
    skipped = _skip_x_transformers(names, log)
    if not names:
        raise ConfigError("contenders: none left to run")
    previous_threads = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        return Runner(config, torch.device(device), names, skipped, command, log).run()
    finally:
        torch.set_num_threads(previous_threads)


def _skip_x_transformers(names: list[str], log: Log) -> dict[str, str]:
    """Remove x-transformers from ``names`` if it does not import: ``{name: why}``."""
    if "x-transformers" not in names:
        return {}
    reason = x_transformers_status()
    if reason is None:
        return {}
    log(f"notice: x-transformers skipped, it does not import ({reason}); "
        f"pip install 'attention-blocks[bench]' to include it")
    names.remove("x-transformers")
    return {"x-transformers": reason}


class Runner:
    """One benchmark run: the config, the device, the contenders' names, and the report it
    fills (``report``), with ``log`` for progress lines."""

    def __init__(self, config: BenchConfig, device: torch.device, names: list[str],
                 skipped: dict[str, str], command: str, log: Log) -> None:
        self.config = config
        self.device = device
        self.names = names
        self.log = log
        self.measure_rss = device.type == "cpu" and config.cpu_peak_rss
        self.report: dict[str, Any] = {
            "schema": 1, "name": config.name, "device": device.type,
            "config": config.to_dict(), "lengths": config.lengths_for(device.type),
            "dtypes": config.dtypes_for(device.type), "contenders": names, "skipped": skipped,
            "environment": environment(device, command),
            "matmul_peak": {}, "correctness": [], "cells": [],
        }

    def run(self) -> dict[str, Any]:
        """Measure the matmul peaks, then every dtype's cells; return the report."""
        self.log(f"{self.config.name} on {self.report['environment']['device_name']}, "
                 f"{torch.get_num_threads()} threads: {', '.join(self.names)}")
        for dtype in self.report["dtypes"]:
            self.measure_peak(dtype)
        import torch._dynamo as dynamo

        # A graph per shape, mode and mask: more than dynamo's default limit of 8.
        with dynamo.config.patch(recompile_limit=256):
            for dtype in self.report["dtypes"]:
                self.run_dtype(dtype)
                dynamo.reset()  # the compiled graphs of this dtype are not needed again
                free_memory(self.device)
        return self.report

    def measure_peak(self, dtype: str) -> None:
        peak = measure_matmul_peak(self.device, DTYPES[dtype])
        self.report["matmul_peak"][dtype] = peak
        self.log(f"matmul peak {dtype}: {peak['flop_per_s'] / 1e9:.1f} GFLOP/s "
                 f"({peak['size']}³)")

    def run_dtype(self, dtype: str) -> None:
        """Every cell of one dtype, and the correctness check of each length and case."""
        config = self.config
        contenders = build_contenders(config, self.names, self.device, DTYPES[dtype])
        ours = checked_encoder(config, contenders, self.device, DTYPES[dtype])
        for length in self.report["lengths"]:
            x = make_input(config, length, self.device, DTYPES[dtype])
            cases = [make_case(name, config.batch, length, config.d_model, config.padding,
                               self.device) for name in config.cases]
            if ours is not None:
                for case in cases:
                    self.report["correctness"].append({
                        "length": length, "dtype": dtype, "case": case.name,
                        "reference": "torch-nobias",
                        "max_abs_diff": check_against_torch(
                            ours, contenders["torch-nobias"].module, x, case)})
            for pass_ in config.passes:
                for case in cases:
                    self.run_cell_group(contenders, x, case, length, dtype, pass_)

    def run_cell_group(self, contenders: dict[str, Contender], x: Tensor, case: Case, length: int,
                       dtype: str, pass_: str) -> None:
        """Time the contenders of one (length, dtype, pass, case), measure their CPU memory
        if asked, and add their cells to the report."""
        group = run_group(contenders, x, case, pass_ == "training", self.config.warmup,
                          self.config.repeats)
        if self.measure_rss:
            for name in self.names:
                if group[name]["status"] == "ok":
                    group[name]["memory"] = measure_cpu_peak_rss(
                        self.config, name, length, dtype, pass_, case.name)
        cells = group_cells(self.config, group, length, dtype, pass_, case,
                            self.report["matmul_peak"])
        self.report["cells"].extend(cells)
        self.log(f"{dtype} L={length} {pass_} {case.name}: " + ", ".join(
            f"{c['contender']} " + (f"{c['median_ms']:.2f} ms" if c["status"] == "ok"
                                    else c["status"])
            for c in cells))
        for cell in cells:
            if cell["status"] == "error":
                self.log(f"notice: {cell['contender']} failed: {cell['error']}")
