"""The kit every script in ``benchmarks/`` is built on, in one import.

A benchmark script is a page: its arguments, its contenders, and calls to this kit::

    from attention.bench import kit

    result = kit.alternate({"torch": run_torch, "ours": run_ours}, rounds=args.rounds,
                           pairs={"speedup": ("torch", "ours")}, check=outputs_agree)
    kit.publish(args.out, __file__, argv, title="...", markdown=table_of, result=result)

What it holds, each from the module of its one idea:

- the clock (:mod:`.clock`): :func:`timed`, :func:`timed_call`, CUDA-synchronised;
- alternated rounds (:mod:`.rounds`): :func:`alternate`, :class:`AlternatedRounds`,
  :func:`rotated`, :func:`timing_summary`, :func:`round_ratios`;
- the run's record (:mod:`.environment`): :func:`environment` (git commit included),
  :func:`command_line`, :func:`shown_path`, :func:`package_version`;
- the result files (:mod:`.writer`): :func:`publish` (the environment record and both
  files in one call), :func:`write_report`, :func:`markdown_table`;
- child processes (:mod:`.subprocesses`): :func:`run_process` (timeout, process-group kill);
- test suites run in them (:mod:`.junit`): :func:`read_junit`, :func:`count_statuses`;
- arguments (:mod:`.arguments`): :func:`benchmark_parser` (``--rounds``, ``--out``),
  :func:`positive_int`, :func:`non_negative_int`, :func:`positive_float`,
  :func:`fraction`, :func:`check_positive`;
- :func:`say`: a progress line on stderr, so that stdout stays the script's result.
"""

from __future__ import annotations

import sys

from .arguments import (
    benchmark_parser,
    check_positive,
    fraction,
    non_negative_int,
    positive_float,
    positive_int,
)
from .clock import timed, timed_call
from .environment import command_line, environment, package_version, shown_path
from .junit import JunitCase, count_statuses, read_junit
from .rounds import AlternatedRounds, alternate, rotated, round_ratios, timing_summary
from .subprocesses import Finished, run_process
from .writer import markdown_table, publish, write_report

__all__ = ["AlternatedRounds", "Finished", "JunitCase", "alternate", "benchmark_parser",
           "check_positive", "command_line", "count_statuses", "environment", "fraction",
           "markdown_table", "non_negative_int", "package_version", "positive_float",
           "positive_int", "publish", "read_junit", "rotated", "round_ratios", "run_process",
           "say", "shown_path", "timed", "timed_call", "timing_summary", "write_report"]


def say(message: str) -> None:
    """``message`` on stderr, flushed: progress, notices."""
    print(message, file=sys.stderr, flush=True)
