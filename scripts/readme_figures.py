"""`python scripts/readme_figures.py [--readme PATH] [--check]`: the README's table of current
figures, generated from the committed results (attention.bench.figures).

Without --check it rewrites the README's block between the figures markers; with --check it
changes nothing and exits 1, printing a unified diff, when the block differs from the one the
results give."""

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a clone, uninstalled

from attention.bench.figures import (  # noqa: E402
    FigureError,
    readme_diff,
    render_table,
    replace_block,
)
from attention.common.files import write_text_atomic  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--readme", type=Path, default=ROOT / "README.md",
                        help="the README to check or rewrite (default: the clone's README.md)")
    parser.add_argument("--check", action="store_true",
                        help="change nothing; exit 1 with a diff if the block is out of date")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        text = args.readme.read_text(encoding="utf-8")
        table = render_table(ROOT)
        replace_block(text, table)  # the README's markers, checked before anything is said
    except (FigureError, OSError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if args.check:
        diff = readme_diff(text, table, args.readme.name)
        print(diff or f"{args.readme}: the figures are current", end="" if diff else "\n")
        return 1 if diff else 0
    new = replace_block(text, table)
    if new != text:
        write_text_atomic(args.readme, new)
    print(f"{args.readme}: figures {'rewritten' if new != text else 'already current'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
