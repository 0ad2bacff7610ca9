"""The result files of a benchmark: ``{stem}.json``, the report itself, and ``{stem}.md``, its
title, the command line, the script's text and tables, and the environment it ran in.

Both are written atomically (:func:`attention.common.files.write_text_atomic`): a run that
is killed leaves the previous files whole. A report must carry the record of
:func:`attention.bench.environment.environment` under ``environment`` (with the git commit
and the command line), so that every result says how to make it again.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import torch

from ..common.files import write_text_atomic
from .environment import command_line, environment

__all__ = ["environment_lines", "markdown_table", "publish", "result_paths", "to_json",
           "write_report"]

REQUIRED = ("command", "git_commit", "date")


def markdown_table(header: Sequence[str], rows: Iterable[Sequence[Any]],
                   align: str | None = None) -> list[str]:
    """A Markdown table's lines. ``align``: one letter per column, ``l`` or ``r`` (default:
    the first column left, the others right, as numbers are)."""
    align = align or "l" + "r" * (len(header) - 1)
    if len(align) != len(header) or set(align) - {"l", "r"}:
        raise ValueError(f"align: expected {len(header)} letters l or r, got {align!r}")
    lines = ["| " + " | ".join(header) + " |",
             "| " + " | ".join("---" if a == "l" else "---:" for a in align) + " |"]
    for row in rows:
        if len(row) != len(header):
            raise ValueError(f"rows: expected {len(header)} cells a row, got {len(row)}: "
                             f"{list(row)}")
        lines.append("| " + " | ".join(str(cell) for cell in row) + " |")
    return lines


def environment_lines(env: dict[str, Any]) -> list[str]:
    """The ``## Environment`` section: one ``- key: value`` line per entry."""
    return ["## Environment", "", *(f"- {key}: {value}" for key, value in env.items())]


def to_json(report: dict[str, Any]) -> str:
    """The report as JSON text (strict: no NaN or infinity), UTF-8 characters kept."""
    return json.dumps(report, indent=2, ensure_ascii=False, allow_nan=False) + "\n"


def result_paths(out: str | os.PathLike) -> tuple[Path, Path]:
    """``{out}.json`` and ``{out}.md`` (a ``.json`` or ``.md`` suffix on ``out`` dropped)."""
    out = Path(out)
    if out.suffix in (".json", ".md"):
        out = out.with_suffix("")
    return out.parent / f"{out.name}.json", out.parent / f"{out.name}.md"


def write_report(out: str | os.PathLike, report: dict[str, Any], *, title: str,
                 body: Sequence[str] = ()) -> list[Path]:
    """Write ``report`` to ``{out}.json`` and the Markdown (``# title``, the command line,
    ``body``'s lines, the environment) to ``{out}.md``, atomically; return both paths."""
    env = report.get("environment")
    missing = [key for key in REQUIRED if not isinstance(env, dict) or key not in env]
    if missing:
        got = sorted(env) if isinstance(env, dict) else type(env).__name__
        raise ValueError(f"report['environment']: expected the record of "
                         f"attention.bench.environment.environment() (with "
                         f"{', '.join(REQUIRED)}), got {got}")
    json_path, markdown_path = result_paths(out)
    markdown = "\n".join([f"# {title}", "", f"`{env['command']}`", "", *body, "",
                          *environment_lines(env)]) + "\n"
    return [write_text_atomic(json_path, to_json(report)),
            write_text_atomic(markdown_path, markdown)]


def publish(out: str | os.PathLike, script: str | os.PathLike, argv: Sequence[str] | None, *,
            title: str, markdown: Callable[[dict[str, Any]], Sequence[str]],
            device: torch.device | str = "cpu", packages: Sequence[str] = (),
            **fields: Any) -> dict[str, Any]:
    """The report of a run of ``script`` with ``argv`` (``None``: ``sys.argv[1:]``): the
    :func:`~attention.bench.environment.environment` record (with ``packages``' versions)
    and ``fields``; written by :func:`write_report` with ``markdown(report)`` as the body,
    said on stderr, and returned."""
    report = {"environment": environment(device, command_line(script, argv), packages),
              **fields}
    paths = write_report(out, report, title=title, body=markdown(report))
    print(f"wrote {paths[0]} and {paths[1].name}", file=sys.stderr, flush=True)
    return report
