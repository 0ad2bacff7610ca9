"""Training throughput with one process and with several (torchrun), on this machine.

Runs ``scripts/train.py`` for a few steps in each setting, in alternated rounds (each round
starting one setting later), and reads the target tokens per second from each run's
``metrics.jsonl`` (the first logged window, which holds the warm-up, is left out). Writes
JSON and Markdown::

    python benchmarks/ddp_throughput.py --rounds 3 --steps 60

Settings ``NAME=PROCESSES:THREADS:GRAD_ACCUM`` (``--setting`` repeats); the first is the
reference of the ratios (a setting's tokens/s ÷ the reference's, per round).
"""

from __future__ import annotations

import datetime
import os
import statistics
import sys
import tempfile
from pathlib import Path

from attention.bench import kit
from attention.translation.plotting import read_metrics
from attention.translation.runs import latest_run

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_SETTINGS = ["1 process x 2 threads=1:2:1", "1 process x 2 threads, accumulating 2=1:2:2",
                    "1 process x 1 thread=1:1:1", "2 processes x 1 thread=2:1:1"]


class Setting:
    """One way to train, run as a child process; a call trains ``steps`` steps in a fresh
    run folder and returns the seconds per target token of its logged windows (median)."""

    def __init__(self, text: str, index: int, config: str, steps: int, work: Path) -> None:
        self.name, _, numbers = text.rpartition("=")
        self.processes, self.threads, self.accum = (int(n) for n in numbers.split(":"))
        self.index, self.config, self.steps, self.work, self.runs = index, config, steps, work, 0

    def __call__(self) -> float:
        self.runs += 1
        name = f"s{self.index}r{self.runs}"
        overrides = [f"name={name}", f"train.run_dir={self.work}", f"train.max_steps={self.steps}",
                     f"train.threads={self.threads}", f"train.grad_accum_steps={self.accum}",
                     "train.log_every=10", f"train.eval_every={10 * self.steps}",
                     "train.max_minutes=null", "data.toy_val_size=50", "data.toy_test_size=50",
                     "eval.val_sentences=50"]
        script = [str(ROOT / "scripts" / "train.py"), "--config", self.config, *overrides]
        command = [sys.executable, *script] if self.processes == 1 else [
            sys.executable, "-m", "torch.distributed.run", "--standalone",
            f"--nproc_per_node={self.processes}", *script]
        done = kit.run_process(command, env={**os.environ, "OMP_NUM_THREADS": str(self.threads)})
        if done.returncode:
            raise SystemExit(f"{' '.join(command)} failed ({done.returncode}):\n"
                             f"{done.stderr[-3000:]}")
        records = read_metrics(latest_run(self.work / name) / "metrics.jsonl")
        rates = [r["tokens_per_second"] for r in records if r["kind"] == "train"][1:]
        if not rates:
            raise SystemExit(f"--steps: expected enough steps for two logged windows (20 or "
                             f"more), got {self.steps}")
        return 1 / statistics.median(rates)


def main(argv: list[str] | None = None) -> dict:
    parser = kit.benchmark_parser(__doc__, rounds=3, out=ROOT / "benchmarks" / "results" /
                                  f"ddp-cpu-{datetime.date.today()}.json")
    parser.add_argument("--config", default=str(ROOT / "configs" / "toy_translation.yaml"))
    parser.add_argument("--steps", type=kit.positive_int, default=60)
    parser.add_argument("--setting", action="append", default=None,
                        help="NAME=PROCESSES:THREADS:GRAD_ACCUM")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as work:
        try:
            settings = [Setting(text, i, args.config, args.steps, Path(work))
                        for i, text in enumerate(args.setting or DEFAULT_SETTINGS)]
        except ValueError:
            parser.error(f"--setting: expected NAME=PROCESSES:THREADS:GRAD_ACCUM, got "
                         f"{args.setting}")
        reference = settings[0].name
        # Self-timed: each run's seconds per target token, so that a ratio reference ÷
        # setting is the setting's tokens/s ÷ the reference's.
        result = kit.alternate({s.name: s for s in settings}, args.rounds, warmup=0,
                               self_timed=True, log=kit.say, label="time per target token",
                               pairs={s.name: (reference, s.name) for s in settings})
    rows = [{"setting": s.name, "processes": s.processes, "threads": s.threads,
             "grad_accum_steps": s.accum,
             "tokens_per_second": [1e3 / t for t in result["contenders"][s.name]["times_ms"]],
             "median_ratio": result["ratios"][s.name]["median"]} for s in settings]
    for row in rows:
        row["median_tokens_per_second"] = statistics.median(row["tokens_per_second"])
    table = kit.markdown_table(
        ["setting", "processes × threads, accumulation", "target tokens/s (median)",
         f"÷ {reference}"],
        [[r["setting"], f"{r['processes']} × {r['threads']}, {r['grad_accum_steps']}",
          f"{r['median_tokens_per_second']:.0f}", f"{r['median_ratio']:.2f}×"] for r in rows])
    print("\n".join(table))
    return kit.publish(args.out, __file__, argv, title="Training throughput, one process and "
                       "several", markdown=lambda report: [
                           f"`{report['config']}`, {args.steps} steps a run, {args.rounds} "
                           "alternated rounds; the first logged window left out.", "", *table],
                       config=kit.shown_path(Path(args.config).resolve()), steps=args.steps,
                       rounds=result, settings=rows)


if __name__ == "__main__":
    main()
