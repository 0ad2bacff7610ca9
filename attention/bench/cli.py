"""``attention-bench`` (and ``python scripts/bench.py``): parse the arguments, run the harness,
print the table and write the result files."""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

import torch

from ..common.errors import ConfigError
from .config import (
    DEFAULT_CONTENDERS,
    DEVICES,
    SDPA_KERNELS,
    WINDOWED,
    load_bench_config,
    parse_contenders,
)
from .environment import available_cpus, default_threads
from .report import format_table, write_results
from .runner import run_benchmark

__all__ = ["main", "make_parser"]


def _fail(message: str, status: int) -> int:
    print(f"error: {message}", file=sys.stderr)
    return status


def make_parser() -> argparse.ArgumentParser:
    """The command line's arguments; the defaults and choices come from the package."""
    parser = argparse.ArgumentParser(
        prog="attention-bench",
        description="Time this package's Encoder (explicit, fused, compiled) against "
                    "torch.nn.TransformerEncoder and x-transformers; print a table and write "
                    "DEVICE-CONFIG-DATE.json and .md (and a .png for several lengths).",
        epilog="Example: attention-bench --device cpu --config configs/bench/small.yaml "
               "repeats=7")
    parser.add_argument("--device", required=True, choices=list(DEVICES))
    parser.add_argument("--config", required=True, help="YAML file, e.g. configs/bench/small.yaml")
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="override config values, e.g. lengths=[256] cpu_peak_rss=false")
    parser.add_argument("--threads", type=int, default=None,
                        help=f"torch CPU threads (default on cpu: the CPUs this process may "
                             f"run on, {available_cpus()} here; on cuda: torch's own)")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"),
                        help="folder for the result files (default: benchmarks/results, "
                             "relative to the current directory)")
    parser.add_argument("--repeats", type=int, default=None,
                        help="alternated rounds (at least 5); overrides the config's")
    parser.add_argument("--contenders", default=None,
                        help=f"comma-separated subset of: {', '.join(DEFAULT_CONTENDERS)} "
                             f"(the default), {', '.join(SDPA_KERNELS)} (SDPA forced to one "
                             f"kernel), {', '.join(WINDOWED)} (ours within the config's "
                             f"window)")
    return parser


def _command_line(argv: list[str] | None) -> str:
    """The command line, as the results record it: python scripts/bench.py or
    attention-bench, then the arguments."""
    program = sys.argv[0] if argv is None else "attention-bench"
    program_words = ["python", program] if program.endswith(".py") else [Path(program).name]
    return shlex.join([*program_words, *(sys.argv[1:] if argv is None else argv)])


def main(argv: list[str] | None = None) -> int:
    parser = make_parser()
    args = parser.parse_intermixed_args(argv)
    if args.threads is not None and args.threads < 1:
        parser.error(f"--threads: expected a positive integer, got {args.threads}")
    if args.device == "cuda" and not torch.cuda.is_available():
        return _fail(f"--device: cuda requested, but this machine has no CUDA device "
                     f"(torch {torch.__version__}); use --device cpu", 2)
    overrides = list(args.overrides)
    if args.repeats is not None:
        overrides.append(f"repeats={args.repeats}")
    threads = args.threads if args.threads is not None else default_threads(args.device)
    try:
        config = load_bench_config(args.config, overrides)
        contenders = parse_contenders(args.contenders)
        report = run_benchmark(config, args.device, contenders=contenders, threads=threads,
                               command=_command_line(argv))
    except ConfigError as error:
        return _fail(str(error), 2)
    except KeyboardInterrupt:
        print("interrupted: no results written", file=sys.stderr)
        return 130
    print(format_table(report))
    for path in write_results(report, args.out):
        print(f"wrote {path}", file=sys.stderr)
    return 0
