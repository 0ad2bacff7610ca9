"""Cells, the records of the results: a group's raw timings become one record per contender
with its statistics, tokens/s, FLOP/s, MFU and, for ours, the per-round ratios to each peer.
"""

from __future__ import annotations

import statistics
from typing import Any

from .config import OURS, PEERS, TORCH_PEERS, WINDOWED, BenchConfig
from .workload import Case, encoder_flops

__all__ = ["group_cells", "round_ratios", "timing_summary"]


def timing_summary(times: list[float]) -> dict[str, Any]:
    """Every run's time (seconds in, milliseconds out), median, min, max and interquartile
    range."""
    q1, _, q3 = statistics.quantiles(times, n=4, method="inclusive")
    return {"times_ms": [t * 1e3 for t in times], "median_ms": statistics.median(times) * 1e3,
            "min_ms": min(times) * 1e3, "max_ms": max(times) * 1e3, "iqr_ms": (q3 - q1) * 1e3}


def round_ratios(peer: list[float], ours: list[float]) -> dict[str, Any]:
    """Peer time ÷ ours time per round (> 1: ours is faster), and their median."""
    per_round = [p / o for p, o in zip(peer, ours, strict=True)]
    return {"median": statistics.median(per_round), "per_round": per_round}


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
