"""The scaling plot: time and memory against length, log-log, from a report's cells.

matplotlib is imported when a plot is drawn, not with this module.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from .config import CONTENDERS

__all__ = ["plot_scaling"]

COLORS = {name: f"C{i}" for i, name in enumerate(CONTENDERS)}
LINE_STYLES = {"inference": "-", "training": "--"}


def plot_scaling(report: dict[str, Any], path: str | os.PathLike) -> Path:
    """Time and memory against length, log-log: a row of two panels per dtype, a line per
    contender and pass (inference solid, training dashed), in the dense case if run."""
    from matplotlib.figure import Figure

    from ..common.pictures import save_png

    cases = report["config"]["cases"]
    case = "dense" if "dense" in cases else cases[0]
    dtypes = report["dtypes"]
    fig = Figure(figsize=(12, 4.2 * len(dtypes)), layout="constrained")
    axes = fig.subplots(len(dtypes), 2, squeeze=False)
    for row, dtype in enumerate(dtypes):
        time_ax, memory_ax = axes[row]
        any_memory = _plot_lines(report, case, dtype, time_ax, memory_ax)
        time_ax.set(ylabel="median ms per run", title=f"time, {dtype}, {case}")
        memory_ax.set(ylabel="MiB above model and input",
                      title=f"peak memory of a run, {dtype}, {case}")
        for ax in (time_ax, memory_ax) if any_memory else (time_ax,):
            _log_axes(ax, report["lengths"])
        if not any_memory:
            memory_ax.set(xticks=[], yticks=[])
            memory_ax.text(0.5, 0.5, "memory not measured", ha="center", va="center",
                           transform=memory_ax.transAxes, color="0.4")
    handles, labels = axes[0][0].get_legend_handles_labels()
    if handles:
        fig.legend(handles, labels, loc="outside right upper", fontsize=8)
    fig.suptitle(f"{report['name']} on {report['environment']['device_name']}")
    return save_png(fig, path)


def _plot_lines(report: dict[str, Any], case: str, dtype: str, time_ax: Any,
                memory_ax: Any) -> bool:
    """A line per contender and pass on both panels; whether any memory was plotted."""
    any_memory = False
    for name in report["contenders"]:
        for pass_ in report["config"]["passes"]:
            cells = sorted((c for c in report["cells"]
                            if c["contender"] == name and c["pass"] == pass_
                            and c["case"] == case and c["dtype"] == dtype
                            and c["status"] == "ok"), key=lambda c: c["length"])
            style = dict(color=COLORS[name], linestyle=LINE_STYLES[pass_], marker="o",
                         markersize=3, label=f"{name}, {pass_}")
            if cells:
                time_ax.plot([c["length"] for c in cells],
                             [c["median_ms"] for c in cells], **style)
            points = [(c["length"], c["memory"]["run_mib"]) for c in cells
                      if c["memory"] and c["memory"].get("status", "ok") == "ok"
                      and c["memory"]["run_mib"] > 0]
            if points:
                any_memory = True
                memory_ax.plot(*zip(*points, strict=True), **style)
    return any_memory


def _log_axes(ax: Any, lengths: list[int]) -> None:
    """Log-log axes with the lengths as ticks and plain numbers on the log scale."""
    from matplotlib.ticker import LogFormatter, NullFormatter

    ax.set(xscale="log", yscale="log", xlabel="length")
    ax.set_xticks(lengths, labels=[str(n) for n in lengths])
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.yaxis.set_major_formatter(LogFormatter(labelOnlyBase=False))
    ax.yaxis.set_minor_formatter(LogFormatter(labelOnlyBase=False))
    ax.grid(True, which="both", alpha=0.3)
