"""What a new user waits for: `make train`, `make test` and CI's `.ci/run`, each in a fresh
clone of this repository's HEAD, install included, timed one after the other.

Each command gets a clone of its own (nothing installed by a previous one), its output goes
to a log in ``--logs``, and the result records its wall time, exit status and summary:
pytest's last line for the test commands (both of them for `.ci/run`, which runs the suite
on two torches), the test scores of `results.json` for `make train`.

    python benchmarks/fresh_clone.py                       # the three, about 25 minutes
    python benchmarks/fresh_clone.py --commands "make test"
"""

from __future__ import annotations

import json
import re
import subprocess
import tempfile
from pathlib import Path

from attention.bench import kit

ROOT = Path(__file__).resolve().parents[1]
COMMANDS = ("make train", "make test", "bash .ci/run")
PYTEST_SUMMARY = re.compile(r"^=*\s*(\d+ (?:passed|failed).*?) in [\d.]+s", re.MULTILINE)


def summary(command: str, clone: Path, log: str) -> str:
    """The test counts pytest printed last (each run of the suite), or the demo's scores."""
    if command == "make train":
        [results] = sorted(clone.glob("runs/toy_translation/version_*/results.json"))[-1:] or [None]
        if results is None:
            return "no results.json written"
        r = json.loads(results.read_text())
        return (f"exact match {r['exact_match']:.2%}, BLEU {r['bleu']:.2f}, alignment "
                f"{r['alignment_accuracy']:.2%}, {r['steps']} steps")
    return "; ".join(PYTEST_SUMMARY.findall(log)) or "no pytest summary in the log"


def run_in_fresh_clone(command: str, logs: Path, timeout: float) -> dict:
    with tempfile.TemporaryDirectory(prefix="fresh-clone-") as folder:
        clone = Path(folder) / "attention"
        subprocess.run(["git", "clone", "--quiet", str(ROOT), str(clone)], check=True)
        log = logs / f"fresh-clone-{re.sub('[^a-z]+', '-', command).strip('-')}.log"
        kit.say(f"{command}: running in {clone} (log: {log})")
        finished = kit.run_process(command.split(), cwd=clone, timeout=timeout, log=log)
        text = log.read_text(errors="replace")
        return {"command": command, "wall_seconds": round(finished.seconds, 1),
                "returncode": finished.returncode, "summary": summary(command, clone, text)}


def markdown(report: dict) -> list[str]:
    return kit.markdown_table(
        ["command", "wall", "exit", "summary"],
        [[f"`{run['command']}`", f"{run['wall_seconds'] / 60:.1f} min", run["returncode"],
          run["summary"]] for run in report["runs"]])


def main(argv: list[str] | None = None) -> dict:
    parser = kit.benchmark_parser(__doc__, out=ROOT / "benchmarks" / "results" / "fresh-clone",
                                  out_help="results path, without suffix")
    parser.add_argument("--logs", type=Path, default=Path(tempfile.gettempdir()),
                        help="folder for each command's output (default: %(default)s)")
    parser.add_argument("--commands", nargs="+", choices=COMMANDS, default=list(COMMANDS))
    parser.add_argument("--timeout", type=kit.positive_float, default=3600.0,
                        help="seconds each command may run")
    args = parser.parse_args(argv)
    args.logs.mkdir(parents=True, exist_ok=True)
    runs = [run_in_fresh_clone(command, args.logs, args.timeout) for command in args.commands]
    return kit.publish(args.out, __file__, argv,
                       title="A fresh clone's commands, install included", markdown=markdown,
                       runs=runs)


if __name__ == "__main__":
    main()
