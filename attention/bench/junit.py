"""pytest's JUnit XML (``--junitxml``) read back: one record per test case, and the counts.

The benchmarks that run test suites in child processes (PyTorch's own tests in
``benchmarks/conformance.py``, the CUDA tests in ``benchmarks/gpu_check.py``) read their
outcomes here rather than from pytest's text output.
"""

from __future__ import annotations

import os
import xml.etree.ElementTree as ElementTree
from collections.abc import Iterable
from dataclasses import dataclass

__all__ = ["STATUSES", "JunitCase", "count_statuses", "first_line", "read_junit"]

STATUSES = ("passed", "failed", "error", "skipped")


@dataclass(frozen=True)
class JunitCase:
    """One test case: pytest's ``classname`` (dotted) and ``name``, its ``status`` (one of
    :data:`STATUSES`) and the first line of its failure, error or skip message."""

    classname: str
    name: str
    status: str
    message: str = ""

    @property
    def failing(self) -> bool:
        return self.status in ("failed", "error")


def first_line(text: str | None) -> str:
    """The first line of ``text`` that is not blank, stripped; ``""`` if none."""
    return next((line.strip() for line in (text or "").splitlines() if line.strip()), "")


def _case(element: ElementTree.Element) -> JunitCase:
    status, message = "passed", ""
    for tag, found_status in (("failure", "failed"), ("error", "error"), ("skipped", "skipped")):
        found = element.find(tag)
        if found is not None:
            status = found_status
            message = first_line(found.get("message")) or first_line(found.text)
            break
    return JunitCase(element.get("classname", ""), element.get("name", ""), status, message)


def read_junit(path: str | os.PathLike) -> list[JunitCase] | None:
    """Every test case of the file, in its order; ``None`` if the file is missing or not
    whole XML (a run killed before pytest wrote it)."""
    try:
        root = ElementTree.parse(path).getroot()
    except (OSError, ElementTree.ParseError):
        return None
    return [_case(element) for element in root.iter("testcase")]


def count_statuses(cases: Iterable[JunitCase]) -> dict[str, int]:
    """How many cases have each status: ``passed``, ``failed``, ``skipped``, ``errors``."""
    statuses = [case.status for case in cases]
    return {"passed": statuses.count("passed"), "failed": statuses.count("failed"),
            "skipped": statuses.count("skipped"), "errors": statuses.count("error")}
