"""The report's text forms and files: the table (terminal and Markdown), the Markdown report
with its notes, correctness and environment, and the result files
``{device}-{config}-{date}.json``, ``.md`` and, for several lengths, ``.png``."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from ..common.files import write_text_atomic
from .memory import MEMORY_RUNS
from .plot import plot_scaling
from .writer import environment_lines, markdown_table, to_json

__all__ = ["format_markdown", "format_table", "result_stem", "table_rows", "write_results"]

HEADER = ["contender", "pass", "case", "length", "dtype", "median ms", "tokens/s", "FLOP/s",
          "MFU %", "mem MiB", "vs torch", "vs x-t"]
LEFT_ALIGNED = {"contender", "pass", "case", "dtype"}


def _flop_unit(device: str) -> tuple[str, float]:
    return ("TFLOP/s", 1e12) if device == "cuda" else ("GFLOP/s", 1e9)


def table_rows(report: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """The header and one row of strings per cell."""
    unit, scale = _flop_unit(report["device"])
    header = [unit if h == "FLOP/s" else h for h in HEADER]
    return header, [_row(cell, scale) for cell in report["cells"]]


def _row(cell: dict[str, Any], scale: float) -> list[str]:
    row = [cell["contender"], cell["pass"], cell["case"], str(cell["length"]), cell["dtype"]]
    if cell["status"] != "ok":
        return row + [cell["status"]] + ["-"] * 6
    ratios, best = cell["ratios"], cell["torch_best"]
    versus_torch = (f"{ratios[best]['median']:.2f}× ({best.removeprefix('torch-')})"
                    if best in ratios else "-")
    versus_x = (f"{ratios['x-transformers']['median']:.2f}×"
                if "x-transformers" in ratios else "-")
    return row + [f"{cell['median_ms']:.2f}", f"{cell['tokens_per_s']:.0f}",
                  f"{cell['flop_per_s'] / scale:.2f}", f"{100 * cell['mfu']:.1f}",
                  _memory_text(cell["memory"]), versus_torch, versus_x]


def _memory_text(memory: dict[str, Any] | None) -> str:
    if memory is None:
        return "-"
    if memory.get("status", "ok") != "ok":
        return memory["status"]
    return f"{memory['run_mib']:.0f}"


def format_table(report: dict[str, Any], markdown: bool = False) -> str:
    """The cells as a table: aligned columns for a terminal, or Markdown."""
    header, rows = table_rows(report)
    if markdown:
        align = "".join("l" if h in LEFT_ALIGNED else "r" for h in header)
        return "\n".join(markdown_table(header, rows, align))
    widths = [max(len(h), *(len(row[i]) for row in rows)) if rows else len(h)
              for i, h in enumerate(header)]
    return "\n".join(_aligned(cells, widths, header) for cells in [header, *rows])


def _aligned(cells: list[str], widths: list[int], header: list[str]) -> str:
    return "  ".join(c.ljust(w) if h in LEFT_ALIGNED else c.rjust(w)
                     for c, w, h in zip(cells, widths, header, strict=True)).rstrip()


def result_stem(report: dict[str, Any]) -> str:
    """``{device}-{config name}-{YYYY-MM-DD}``: the name of the result files."""
    return f"{report['device']}-{report['name']}-{report['environment']['date'][:10]}"


def format_markdown(report: dict[str, Any]) -> str:
    """The Markdown report: title, run line, command, table, notes on what the columns
    mean, skipped contenders, correctness, environment and config."""
    env = report["environment"]
    commit = env["git_commit"] or "unknown"
    if env["git_dirty"]:
        commit += " (with uncommitted changes)"
    lines = [
        f"# Benchmark `{report['name']}` on {env['device_name']} ({report['device']})", "",
        f"{env['date']}, torch {env['torch']}, threads: {env['threads']}, commit {commit}.", "",
        f"Command: `{env['command']}`", "",
        format_table(report, markdown=True), "",
        *_notes(report),
    ]
    if report["skipped"]:
        lines += ["", "Skipped: " + "; ".join(f"{name} ({why})"
                                              for name, why in report["skipped"].items())]
    lines += _correctness_lines(report)
    lines += ["", *environment_lines(env)]
    lines += ["", "## Config", "", "```json", json.dumps(report["config"], indent=2), "```"]
    return "\n".join(lines) + "\n"


def _notes(report: dict[str, Any]) -> list[str]:
    """What the times, rates, memory and ratios of the table mean."""
    unit, _ = _flop_unit(report["device"])
    peaks = ", ".join(f"{dtype} {p['flop_per_s'] / 1e9:.1f} GFLOP/s ({p['size']}³)"
                      for dtype, p in report["matmul_peak"].items())
    return [
        f"- times: median of {report['config']['repeats']} alternated rounds, after "
        f"warm-up runs ({report['config']['warmup']} per contender and cell); tokens/s "
        f"counts real tokens only;",
        f"- {unit} and MFU: FLOPs counted from the shape (useful work only), against the "
        f"matmul peak measured in the run: {peaks};",
        f"- mem MiB: {_memory_note(report)};",
        "- vs torch, vs x-t: peer time ÷ ours time per round, median (> 1: ours is "
        "faster); vs torch is against the faster of torch-nobias and torch-bias in the "
        "cell, named in brackets.",
    ]


def _memory_note(report: dict[str, Any]) -> str:
    if report["device"] == "cuda":
        return "peak allocated during a timed run, above what was allocated before it"
    if report["config"]["cpu_peak_rss"]:
        return (f"peak RSS of {MEMORY_RUNS} runs after the warm-up, in a subprocess per "
                "cell, above the RSS after building the contender and its input (for "
                "ours-compiled it includes what compilation keeps)")
    return "not measured (cpu_peak_rss: false)"


def _correctness_lines(report: dict[str, Any]) -> list[str]:
    if not report["correctness"]:
        return []
    lines = ["", "## Correctness: max |ours - torch-nobias| on real positions, same "
             "weights, eval", "", "| length | dtype | case | ours-explicit | ours-fused |",
             "| ---: | --- | --- | ---: | ---: |"]
    for row in report["correctness"]:
        diffs = [row["max_abs_diff"][name] for name in ("ours-explicit", "ours-fused")]
        lines.append(f"| {row['length']} | {row['dtype']} | {row['case']} | " + " | ".join(
            d if isinstance(d, str) else f"{d:.2e}" for d in diffs) + " |")
    return lines


def write_results(report: dict[str, Any], out_dir: str | os.PathLike) -> list[Path]:
    """Write ``{stem}.json`` and ``{stem}.md`` (and ``{stem}.png`` for several lengths)
    into ``out_dir`` atomically; return their paths."""
    out_dir = Path(out_dir)
    stem = result_stem(report)
    paths = [write_text_atomic(out_dir / f"{stem}.json", to_json(report)),
             write_text_atomic(out_dir / f"{stem}.md", format_markdown(report))]
    if len(report["lengths"]) > 1:
        paths.append(plot_scaling(report, out_dir / f"{stem}.png"))
    return paths
