"""Pictures of a model and its training: attention heatmaps and loss/BLEU curves.

Everything renders through matplotlib's object API (``Figure``, never ``pyplot``), so it
works headless and leaves no global figures behind. Every PNG is written atomically: drawn
into a temporary file beside the target, then moved onto it, so a reader never sees half
an image.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable, Sequence
from pathlib import Path

import torch
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter

from ..common.pictures import save_png

__all__ = ["plot_attention_grid", "plot_curves", "read_metrics"]

INCH_PER_TOKEN = 0.28
MIN_PANEL_INCHES = 2.5
MAX_FIGURE_INCHES = 60.0
INCH_PER_LABEL_CHAR = 0.06  # at TICK_FONTSIZE
TICK_FONTSIZE = 7


def _check_labels(name: str, labels: Sequence[str], expected: int, dim: int) -> None:
    if len(labels) != expected:
        raise ValueError(
            f"{name}: expected {expected} labels (weights.shape[{dim}]), got {len(labels)}"
        )


def _panel_inches(n_tokens: int, labels_across: Sequence[str]) -> float:
    """One panel's extent along an axis of ``n_tokens`` cells, plus room for the tick labels
    of the other axis (``labels_across``), which sit beside it."""
    longest = max((len(s) for s in labels_across), default=0)
    return max(MIN_PANEL_INCHES, INCH_PER_TOKEN * n_tokens) + INCH_PER_LABEL_CHAR * longest


def plot_attention_grid(
    weights,
    query_tokens: Sequence[str],
    key_tokens: Sequence[str],
    path: str | os.PathLike,
    *,
    title: str = "",
    row_label: str = "layer",
    col_label: str = "head",
) -> Path:
    """Draw one heatmap per (row, column), e.g. per layer and head, and save it as a PNG.

    Shape:
        weights: ``(n_rows, n_cols, n_queries, n_keys)``, probabilities in [0, 1].
        query_tokens: ``n_queries`` labels, the y axis, top to bottom.
        key_tokens: ``n_keys`` labels, the x axis, left to right.
    """
    weights = torch.as_tensor(weights).detach().float().cpu()
    if weights.dim() != 4 or weights.numel() == 0:
        raise ValueError(
            "weights: expected 4 non-empty dims (n_rows, n_cols, n_queries, n_keys), "
            f"got shape {tuple(weights.shape)}"
        )
    n_rows, n_cols, n_queries, n_keys = weights.shape
    _check_labels("query_tokens", query_tokens, n_queries, 2)
    _check_labels("key_tokens", key_tokens, n_keys, 3)

    width = min(MAX_FIGURE_INCHES, n_cols * _panel_inches(n_keys, query_tokens) + 1.0)
    height = min(MAX_FIGURE_INCHES, n_rows * _panel_inches(n_queries, key_tokens) + 0.5)
    fig = Figure(figsize=(width, height), layout="constrained")
    axes = fig.subplots(n_rows, n_cols, squeeze=False)
    for r in range(n_rows):
        for c in range(n_cols):
            ax = axes[r, c]
            image = ax.imshow(
                weights[r, c].numpy(), cmap="viridis", vmin=0.0, vmax=1.0, aspect="auto"
            )
            ax.set_title(f"{row_label} {r + 1} · {col_label} {c + 1}", fontsize=8)
            ax.set_xticks(range(n_keys), key_tokens, rotation=90, fontsize=TICK_FONTSIZE)
            ax.set_yticks(range(n_queries), query_tokens, fontsize=TICK_FONTSIZE)
            ax.tick_params(length=2, pad=1)
    colorbar = fig.colorbar(image, ax=axes, shrink=min(1.0, 4.0 / height), aspect=30)
    colorbar.set_label("attention weight", fontsize=8)
    if title:
        fig.suptitle(title)
    return save_png(fig, path)


def _series(records: list[dict], kind: str, key: str) -> tuple[list[float], list[float]]:
    """Steps and values of ``key`` in the records of one ``kind``, in file order."""
    points = [(r["step"], r[key]) for r in records if r.get("kind") == kind and key in r]
    return [step for step, _ in points], [value for _, value in points]


def _say(ax, message: str) -> None:
    """An empty panel that shows ``message`` in its middle instead of meaningless ticks."""
    ax.set(xticks=[], yticks=[])
    ax.text(0.5, 0.5, message, ha="center", va="center", transform=ax.transAxes, color="0.4")


def _log_tick_formatter(decades: float) -> FuncFormatter:
    """Plain-number labels for a log axis spanning ``decades``: every tick within one decade,
    else only 1-2-5, so a loss from 1.9 to 0.7 still gets more than one label."""
    keep = range(1, 10) if decades < 1 else (1, 2, 5)

    def label(x: float, _position: int) -> str:
        return f"{x:g}" if x > 0 and int(f"{x:.0e}"[0]) in keep else ""

    return FuncFormatter(label)


def plot_curves(records: Iterable[dict], path: str | os.PathLike, *, title: str = "") -> Path:
    """Plot training/validation loss (left) and validation BLEU (right) against step.

    ``records`` are dicts as read from ``metrics.jsonl``: ``kind`` ``"train"`` with
    ``step`` and ``loss``, ``kind`` ``"val"`` with ``step``, ``loss`` and ``bleu``. Other
    kinds and keys are ignored.
    """
    records = list(records)
    if not any(r.get("kind") in ("train", "val") for r in records):
        fig = Figure(figsize=(6, 3), layout="constrained")
        _say(fig.subplots(), "no metrics yet")
        if title:
            fig.suptitle(title)
        return save_png(fig, path)

    fig = Figure(figsize=(11, 4), layout="constrained")
    loss_ax, bleu_ax = fig.subplots(1, 2)
    losses = {"train": _series(records, "train", "loss"), "val": _series(records, "val", "loss")}
    for kind, (steps, values) in losses.items():
        if steps:
            marker = "o" if kind == "val" else None
            loss_ax.plot(steps, values, marker=marker, markersize=3, label=f"{kind} loss")
    all_losses = [v for _, values in losses.values() for v in values]
    if all_losses and min(all_losses) > 0:
        loss_ax.set_yscale("log")
        labels = _log_tick_formatter(math.log10(max(all_losses) / min(all_losses)))
        loss_ax.yaxis.set_major_formatter(labels)
        loss_ax.yaxis.set_minor_formatter(labels)
    loss_ax.set(xlabel="step", ylabel="loss")
    loss_ax.grid(True, which="both", alpha=0.3)
    loss_ax.legend()

    steps, bleu = _series(records, "val", "bleu")
    if steps:
        bleu_ax.plot(steps, bleu, marker="o", markersize=4, color="tab:green")
        bleu_ax.grid(True, alpha=0.3)
    else:
        _say(bleu_ax, "no validation yet")
    bleu_ax.set(xlabel="step", ylabel="BLEU")
    if title:
        fig.suptitle(title)
    return save_png(fig, path)


def read_metrics(path: str | os.PathLike) -> list[dict]:
    """Read a ``metrics.jsonl`` file, one JSON object per line, skipping blank lines.

    A corrupt line raises ``ValueError`` naming the file and line, except a last line with no
    newline yet: a run may still be writing it, so it is skipped.
    """
    text = Path(path).read_text(encoding="utf-8")
    lines = text.split("\n")
    records = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            if number == len(lines):  # no newline after it: still being written
                continue
            raise ValueError(f"{path}:{number}: not valid JSON ({error.msg})") from error
        if not isinstance(record, dict):
            raise ValueError(f"{path}:{number}: expected a JSON object, got {line.strip()!r}")
        records.append(record)
    return records
