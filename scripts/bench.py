"""`python scripts/bench.py --help`: the console command (attention.bench.cli)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a clone, uninstalled

from attention.bench.cli import main as bench_main  # noqa: E402

if __name__ == "__main__":
    sys.exit(bench_main())
