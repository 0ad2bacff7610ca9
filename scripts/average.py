"""`python scripts/average.py --help`: the console command (attention.translation.cli)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a clone, uninstalled

from attention.translation.cli import average_main  # noqa: E402

if __name__ == "__main__":
    sys.exit(average_main())
