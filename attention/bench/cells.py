"""Cells, the records of the results: a group's raw timings become one record per contender
with its statistics, tokens/s, FLOP/s, MFU and, for ours, the per-round ratios to each peer
(the statistics and ratios of :mod:`.rounds`, which every benchmark shares).
"""

from __future__ import annotations

import statistics
from typing import Any

from .config import OURS, PEERS, TORCH_PEERS, WINDOWED, BenchConfig
from .rounds import round_ratios, timing_summary
from .workload import Case, encoder_flops

__all__ = ["group_cells"]


def group_cells(config: BenchConfig, group: dict[str, dict[str, Any]], length: int,
                dtype: str, pass_: str, case: Case, peaks: dict[str, Any]
                ) -> list[dict[str, Any]]:
    """One record per contender of a group (:func:`attention.bench.timing.run_group`'s
    results), with its timings, rates and ratios; ``peaks`` is the matmul peak per dtype.
    ``torch_best`` names the faster torch.nn contender of the group."""
    training = pass_ == "training"
    flops = encoder_flops(config.d_model, config.n_layers, config.d_ff, config.batch, length,
                          case.real_tokens, training, seq_lengths=case.seq_lengths)
    window_flops = encoder_flops(config.d_model, config.n_layers, config.d_ff, config.batch,
                                 length, case.real_tokens, training,
                                 seq_lengths=case.seq_lengths, window=config.window)
    ok = {name: result for name, result in group.items() if result["status"] == "ok"}
    torch_best = min((name for name in TORCH_PEERS if name in ok),
                     key=lambda name: statistics.median(ok[name]["times"]), default=None)
    cells = []
    for name, result in group.items():
        cell: dict[str, Any] = {
            "contender": name, "pass": pass_, "case": case.name, "length": length,
            "dtype": dtype, "batch": config.batch, "real_tokens": case.real_tokens,
            "status": result["status"], "error": result["error"], "times_ms": [],
            "median_ms": None, "min_ms": None, "max_ms": None, "iqr_ms": None,
            "tokens_per_s": None, "flops": window_flops if name in WINDOWED else flops,
            "flop_per_s": None, "mfu": None,
            "memory": result["memory"], "torch_best": None, "ratios": {},
        }
        if name in ok:
            cell.update(timing_summary(result["times"]))
            seconds = cell["median_ms"] / 1e3
            cell["tokens_per_s"] = case.real_tokens / seconds
            cell["flop_per_s"] = cell["flops"] / seconds
            cell["mfu"] = cell["flop_per_s"] / peaks[dtype]["flop_per_s"]
            if name in OURS:
                cell["torch_best"] = torch_best
                cell["ratios"] = {peer: round_ratios(ok[peer]["times"], result["times"])
                                  for peer in PEERS if peer in ok}
        cells.append(cell)
    return cells
