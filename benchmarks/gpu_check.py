"""`make gpu-check`: the one command a session lent a GPU runs (README, "Benchmarks").

    python3 benchmarks/gpu_check.py [OUT]        (OUT defaults to gpu-results)

Where torch sees no CUDA device (or python3 has no torch) it prints one line and exits 0,
having run nothing. With CUDA it runs the parts of :mod:`attention.bench.gpu_check` in
order (tests on cuda, a compiled bf16 training run, the `base` and `long` benchmarks), each
in a child process under its own time budget, with the repository root on PYTHONPATH:
nothing is installed, nothing downloaded. ``--parts`` runs some of them; ``--dry-run-cpu``
(for the tests) runs the same orchestration on the CPU at tiny sizes.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def no_cuda_line() -> str | None:
    """The one line for a machine without CUDA (or without torch), else ``None``."""
    try:
        import torch
    except ImportError:
        return f"gpu-check: no CUDA device here (torch is not installed for {sys.executable}): " \
               "nothing run"
    if not torch.cuda.is_available():
        return f"gpu-check: no CUDA device here (torch {torch.__version__}): nothing run"
    return None


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", nargs="?", type=Path, default=Path("gpu-results"),
                        help="folder for the results (default: gpu-results)")
    parser.add_argument("--parts", default="tests,train,base,long",
                        help="comma-separated, in order (default: %(default)s)")
    parser.add_argument("--dry-run-cpu", action="store_true", help=argparse.SUPPRESS)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = make_parser()
    args = parser.parse_args(argv)
    line = None if args.dry_run_cpu else no_cuda_line()
    if line:
        print(line)
        return 0
    sys.path.insert(0, str(ROOT))
    from attention.bench.gpu_check import parse_parts, run_check

    try:
        names = parse_parts(args.parts)
    except ValueError as error:
        parser.error(str(error))
    return run_check(names, args.out, args.dry_run_cpu)


if __name__ == "__main__":
    sys.exit(main())
