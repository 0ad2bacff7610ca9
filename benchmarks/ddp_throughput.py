"""Training throughput with one process and with several (torchrun), on this machine.

Runs ``scripts/train.py`` for a few steps in each setting, alternating the settings round by
round, and reads the target tokens per second from each run's ``metrics.jsonl`` (the first
logged window, which holds the warm-up, is left out). Prints a table and writes JSON::

    python benchmarks/ddp_throughput.py --rounds 3 --steps 60

Settings ``NAME=PROCESSES:THREADS:GRAD_ACCUM`` (``--setting`` repeats); the first is the
reference of the ratios.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from attention.translation.plotting import read_metrics

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_SETTINGS = ["1 process x 2 threads=1:2:1", "1 process x 2 threads, accumulating 2=1:2:2",
                    "1 process x 1 thread=1:1:1", "2 processes x 1 thread=2:1:1"]


def run_once(config: str, processes: int, threads: int, accum: int, steps: int,
             run_dir: Path, name: str) -> dict:
    overrides = [f"name={name}", f"train.run_dir={run_dir}", f"train.max_steps={steps}",
                 f"train.threads={threads}", f"train.grad_accum_steps={accum}",
                 "train.log_every=10", f"train.eval_every={10 * steps}",
                 "train.max_minutes=null", "data.toy_val_size=50", "data.toy_test_size=50",
                 "eval.val_sentences=50"]
    script = [str(ROOT / "scripts" / "train.py"), "--config", config, *overrides]
    command = [sys.executable, *script] if processes == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--standalone",
        f"--nproc_per_node={processes}", *script]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    if done.returncode:
        raise SystemExit(f"{' '.join(command)} failed:\n{done.stderr[-3000:]}")
    records = read_metrics(run_dir / name / "metrics.jsonl")
    rates = [r["tokens_per_second"] for r in records if r["kind"] == "train"][1:]
    return {"tokens_per_second": statistics.median(rates), "windows": len(rates)}


def _as_recorded(path: str) -> str:
    """A path inside the clone relative to it: results carry no path of the machine."""
    resolved = Path(path).resolve()
    return str(resolved.relative_to(ROOT)) if resolved.is_relative_to(ROOT) else path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default=str(ROOT / "configs" / "toy_translation.yaml"))
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--setting", action="append", default=None,
                        help="NAME=PROCESSES:THREADS:GRAD_ACCUM")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" /
                        f"ddp-cpu-{datetime.date.today()}.json")
    args = parser.parse_args(argv)
    settings = []
    for text in args.setting or DEFAULT_SETTINGS:
        name, _, numbers = text.rpartition("=")
        try:
            processes, threads, accum = (int(n) for n in numbers.split(":"))
        except ValueError:
            parser.error(f"--setting: expected NAME=PROCESSES:THREADS:GRAD_ACCUM, got {text!r}")
        settings.append((name, processes, threads, accum))

    rates: dict[str, list[float]] = {name: [] for name, *_ in settings}
    with tempfile.TemporaryDirectory() as tmp:
        for round_index in range(args.rounds):
            for i, (name, processes, threads, accum) in enumerate(settings):
                result = run_once(args.config, processes, threads, accum, args.steps,
                                  Path(tmp), f"r{round_index}s{i}")
                rates[name].append(result["tokens_per_second"])
                print(f"round {round_index + 1}: {name}: {result['tokens_per_second']:.0f} "
                      f"target tok/s", file=sys.stderr)
    reference = settings[0][0]
    rows = []
    for name, processes, threads, accum in settings:
        ratios = [a / b for a, b in zip(rates[name], rates[reference], strict=True)]
        rows.append({"setting": name, "processes": processes, "threads": threads,
                     "grad_accum_steps": accum, "tokens_per_second": rates[name],
                     "median_tokens_per_second": statistics.median(rates[name]),
                     "median_ratio": statistics.median(ratios)})
    report = {"config": _as_recorded(args.config), "steps": args.steps, "rounds": args.rounds,
              "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
              "command": " ".join(["python", "benchmarks/ddp_throughput.py",
                                   *(argv if argv is not None else sys.argv[1:])]),
              "date": str(datetime.date.today()), "settings": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"{'setting':45} {'target tok/s':>12} {'vs ' + reference:>28}")
    for row in rows:
        print(f"{row['setting']:45} {row['median_tokens_per_second']:12.0f} "
              f"{row['median_ratio']:27.2f}×")
    print(f"wrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
