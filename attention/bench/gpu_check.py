"""The GPU check's parts, each run in a child process under a time budget, and its summary.

``benchmarks/gpu_check.py`` (``make gpu-check``) parses the arguments and calls
:func:`run_check`; each part runs as ``python -m attention.bench.gpu_check --part NAME``, so
that a part that hangs or outlives its budget is killed with its whole process group
(:func:`~attention.bench.subprocesses.run_process`) and the next part still runs:

    tests  every test parametrized on a CUDA device, on cuda         -> tests.xml
    train  the toy translation run (800 steps, dropout 0) with bf16
           autocast and torch.compile                                -> train-metrics.jsonl,
                                                                        train-results.json
    base   the `base` benchmark in bf16, ours against torch.nn       -> bench-base.json
    long   `long` to 16k tokens in bf16, ours against SDPA's kernels -> bench-long.json

then ``bench.md`` (both benchmarks' Markdown reports), ``log.txt`` (every part's output) and
``summary.md`` (each part's status and time, the tests' counts, the training's losses
against the committed CPU reference, the benchmarks' own tables; also printed last): eight
files, flat in the results folder, as many as the device tool brings back. ``dry_run``
runs the same orchestration on the CPU at tiny sizes (for the tests).

It needs the repository (``configs/``, ``tests/``, the CPU reference in
``benchmarks/results``), not only the package.
"""

from __future__ import annotations

import argparse
import json
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]  # the repository this package was run from
REFERENCE = ROOT / "benchmarks" / "results" / "gpu-check-train-cpu"  # the CPU run to compare
FILES = ("summary.md", "log.txt", "tests.xml", "train-metrics.jsonl", "train-results.json",
         "bench-base.json", "bench-long.json", "bench.md")
LOG_BYTES_PER_PART = 3 * 2**20  # what log.txt keeps of one part's output (its head and tail)
OUT_OF_TIME = "gpu-check: the part's budget is spent, stopping it"
GRACE_S = 15  # past its budget, a part that has not stopped by itself is killed
RETRY_S = 1.0  # a spent budget's interrupt is raised again this often until the part stops

# The toy run, the same on the GPU and in the committed CPU reference (REFERENCE), so that
# their loss curves can be compared step by step: without dropout the two differ only by
# arithmetic (bf16 autocast, the kernels, compilation), not by random masks.
TRAIN_CONFIG = "configs/toy_translation.yaml"
# The committed CPU reference's recipe (the demo's before issue 29 changed its learning rate,
# warm-up and threads), so that the GPU run's losses compare with it step by step.
TRAIN_OVERRIDES = ["model.dropout=0.0", "train.log_every=10", "train.lr=0.0015",
                   "train.warmup_steps=200", "train.threads=null"]
# base.yaml and long.yaml as gpu-check runs them: bf16 only, and the rounds its budget allows.
BENCH_OVERRIDES = {"base": ["dtypes={cuda: [bfloat16]}", "repeats=20"],
                   "long": ["dtypes={cuda: [bfloat16]}", "repeats=7"]}
TRAIN_EVALUATION_S = 50  # of the train budget, kept for the final evaluation after max_minutes

BASE_CONTENDERS = ["ours-explicit", "ours-fused", "ours-compiled", "torch-nobias", "torch-bias"]
SDPA_KERNELS = ["ours-sdpa-math", "ours-sdpa-flash", "ours-sdpa-efficient", "ours-sdpa-cudnn"]
LONG_CONTENDERS = ["ours-explicit", "ours-fused", *SDPA_KERNELS]


@dataclass(frozen=True)
class Part:
    """A part of the check: its budget (it is told to stop then) and the time planned for
    it on an H200 (benchmarks/NOTES.md, "The GPU check", says how each was estimated)."""

    name: str
    budget_s: int
    planned_s: int
    what: str


PARTS = {part.name: part for part in (
    Part("tests", 60, 40, "every test parametrized on a CUDA device, on cuda"),
    Part("train", 165, 120, "toy translation, 800 steps, bf16 autocast, torch.compile"),
    Part("base", 135, 95, "`base` in bf16: ours explicit/fused/compiled vs torch.nn bias off/on"),
    Part("long", 60, 35, "`long` in bf16 to 16k tokens: ours vs SDPA's kernels"),
)}


class OutOfTime(KeyboardInterrupt):
    """Raised in a part when its budget is spent. A KeyboardInterrupt, so that pytest ends
    as on Ctrl-C (writing its report) and the benchmark's failure handling, which records
    an ``Exception`` as a contender's error, lets it through."""


class Budget:
    """A part's time budget, in its child process: once ``seconds`` are spent, SIGALRM
    raises :class:`OutOfTime`, and again every :data:`RETRY_S` until the part calls
    :meth:`stop`. One interrupt is not enough: raised inside a finalizer that
    ``gc.collect`` runs, say, Python prints it and goes on, and the benchmark then ran to its
    end past its budget with no word of it in its report. ``spent`` stays true once the
    budget is gone, whatever became of the interrupts."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.spent = False

    def start(self) -> None:
        signal.signal(signal.SIGALRM, self._expire)
        signal.setitimer(signal.ITIMER_REAL, self.seconds, RETRY_S)

    def stop(self) -> None:
        """No more interrupts: the part has stopped, or is writing what it has."""
        signal.setitimer(signal.ITIMER_REAL, 0)

    def _expire(self, signum: int, frame: Any) -> None:
        if not self.spent:
            print(OUT_OF_TIME, file=sys.stderr, flush=True)
        self.spent = True
        raise OutOfTime(f"the part's budget of {self.seconds} s is spent")


class StopOnInterrupt:
    """A pytest plugin: when the budget's interrupt ends the session, no more of them while
    pytest writes its report."""

    def __init__(self, budget: Budget) -> None:
        self.budget = budget

    def pytest_keyboard_interrupt(self, excinfo: Any) -> None:
        self.budget.stop()


# The parts, each run in a child process (``--part NAME``) ----------------------------------


class DeviceVariants:
    """A pytest plugin keeping the tests parametrized with ``device`` on ``device_type``
    (``cuda`` or ``cuda:N`` for cuda), and nothing else."""

    def __init__(self, device_type: str) -> None:
        self.device_type = device_type
        self.kept: list[str] = []

    def pytest_collection_modifyitems(self, config: Any, items: list[Any]) -> None:
        keep, drop = [], []
        for item in items:
            params = getattr(getattr(item, "callspec", None), "params", {})
            device = str(params.get("device", "")).split(":")[0]
            (keep if device == self.device_type else drop).append(item)
        items[:] = keep
        self.kept = [item.nodeid for item in keep]
        if drop:
            config.hook.pytest_deselected(items=drop)


def part_tests(out: Path, dry_run: bool, budget: Budget) -> int:
    import pytest

    plugin = DeviceVariants("cpu" if dry_run else "cuda")
    paths = ["tests/test_decoding.py"] if dry_run else ["tests"]
    code = int(pytest.main([*paths, "-v", "-p", "no:cacheprovider", "-rfE",
                            "--continue-on-collection-errors", f"--junitxml={out / 'tests.xml'}"],
                           plugins=[plugin, StopOnInterrupt(budget)]))
    print(f"gpu-check: {len(plugin.kept)} tests selected (device {plugin.device_type})")
    return code if plugin.kept else 1


def train_overrides(work: Path, dry_run: bool, seconds: int) -> tuple[str, list[str]]:
    """The config file and overrides of the training part."""
    if dry_run:
        return "configs/tiny.yaml", ["name=gpu-check-train", f"train.run_dir={work}",
                                     "train.device=cpu", "train.max_steps=2",
                                     "train.log_every=1", "train.eval_every=2"]
    minutes = max(seconds - TRAIN_EVALUATION_S, 30) / 60
    return TRAIN_CONFIG, [*TRAIN_OVERRIDES, "name=gpu-check-train", f"train.run_dir={work}",
                          "train.device=cuda", "train.compile=true",
                          f"train.max_minutes={minutes:.2f}", "train.precision=bf16"]


def part_train(out: Path, work: Path, dry_run: bool, budget: Budget) -> int:
    """The training command as a user runs it (``scripts/train.py``: the harness does not
    import the application), then its metrics and results copied out of its run folder
    (``work/gpu-check-train/version_0``, the work folder being new), also when it failed."""
    path, overrides = train_overrides(work, dry_run, budget.seconds)
    print(f"gpu-check: {path} " + " ".join(overrides), flush=True)
    try:
        return subprocess.run([sys.executable, str(ROOT / "scripts" / "train.py"), "--config",
                               str(ROOT / path), *overrides], cwd=ROOT).returncode
    finally:
        budget.stop()  # the run has ended (or been killed): copy what it left, uninterrupted
        run = work / "gpu-check-train" / "version_0"
        for name in ("metrics.jsonl", "results.json"):
            if (run / name).is_file():
                shutil.copyfile(run / name, out / f"train-{name}")


def bench_config(name: str, dry_run: bool) -> tuple[str, list[str], list[str]]:
    """The config file, overrides and contenders of a benchmark part."""
    contenders = BASE_CONTENDERS if name == "base" else LONG_CONTENDERS
    if dry_run:
        lengths = "[16]" if name == "base" else "[16, 32]"
        return "configs/bench/tiny.yaml", [f"lengths={lengths}", "cpu_peak_rss=false"], contenders
    return f"configs/bench/{name}.yaml", BENCH_OVERRIDES[name], contenders


def part_bench(name: str, out: Path, dry_run: bool, budget: Budget) -> int:
    import torch

    from attention.bench import kit
    from attention.bench.config import check_contenders, check_device, load_bench_config
    from attention.bench.runner import Runner
    from attention.bench.writer import to_json
    from attention.common.files import write_text_atomic

    path, overrides, contenders = bench_config(name, dry_run)
    device = "cpu" if dry_run else "cuda"
    config = load_bench_config(ROOT / path, overrides)
    check_contenders(contenders, config)
    check_device(device)
    if dry_run:  # tiny tensors: more threads only wait on each other (on CUDA: torch's own)
        torch.set_num_threads(1)
    command = f"python3 benchmarks/gpu_check.py --parts {name} ({path})"
    runner = Runner(config, torch.device(device), list(contenders), {}, command, kit.say)
    try:
        runner.run()
    except OutOfTime:
        pass  # the report keeps the cells measured so far
    budget.stop()
    code = 0
    if budget.spent:  # also when an interrupt was swallowed and the cells ran on
        runner.report["stopped"] = "out of time: the budget ran out while the cells were measured"
        code = 1
    # Atomic: a part past its grace period is killed, and a torn report must not pass.
    write_text_atomic(out / f"bench-{name}.json", to_json(runner.report))
    return code


def run_part(name: str, out: Path, work: Path, dry_run: bool, seconds: int) -> int:
    """In the child: run the part under a :class:`Budget` of ``seconds``."""
    budget = Budget(seconds)
    budget.start()
    try:
        if name == "tests":
            return part_tests(out, dry_run, budget)
        if name == "train":
            return part_train(out, work, dry_run, budget)
        return part_bench(name, out, dry_run, budget)
    finally:
        # A part done just inside its budget must not meet the alarm while the interpreter
        # exits, its handler gone: that killed finished parts with SIGALRM (exit -14).
        budget.stop()


# The orchestration, in the parent -----------------------------------------------------------


@dataclass
class Outcome:
    part: Part
    status: str  # ok, failed (exit N), out of time
    seconds: float
    log: str


def run_child(part: Part, out: Path, work: Path, dry_run: bool) -> Outcome:
    """Run one part in a child process of its own session, its output in a file; kill its
    process group if it outlives its budget by :data:`GRACE_S`, and what it left when it
    ends (compile workers)."""
    from attention.bench import kit
    from attention.bench.memory import child_environment

    log_path = work / f"{part.name}.log"
    command = [sys.executable, "-m", "attention.bench.gpu_check", "--part", part.name,
               "--out", str(out), "--work", str(work), "--seconds", str(part.budget_s)]
    if dry_run:
        command.append("--dry-run-cpu")
    print(f"gpu-check: {part.name} ({part.what}; planned {part.planned_s} s, budget "
          f"{part.budget_s} s)", flush=True)
    done = kit.run_process(command, cwd=ROOT, log=log_path, timeout=part.budget_s + GRACE_S,
                           env={**child_environment(), "PYTHONUNBUFFERED": "1"})
    text = log_path.read_text(encoding="utf-8", errors="replace")
    # A part that its own alarm ends outright (no handler: while it starts or exits) has
    # spent its budget all the same.
    if done.timed_out or done.returncode == -signal.SIGALRM or OUT_OF_TIME in text:
        status = "out of time"
    else:
        status = "ok" if done.returncode == 0 else f"failed (exit {done.returncode})"
    print(f"gpu-check: {part.name} {status} in {done.seconds:.0f} s", flush=True)
    return Outcome(part, status, done.seconds, text)


def clipped(text: str, limit: int = LOG_BYTES_PER_PART) -> str:
    if len(text) <= limit:
        return text
    head = limit // 5
    return (text[:head] + f"\n[... {len(text) - limit} characters left out ...]\n"
            + text[-(limit - head):])


def read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError:
        return []
    return [json.loads(line) for line in lines if line.strip()]


def summarize_tests(out: Path) -> list[str]:
    from attention.bench import kit

    cases = kit.read_junit(out / "tests.xml")
    if cases is None:
        return ["no tests.xml"]
    counts = kit.count_statuses(cases)
    return [f"{counts['passed']} passed, {counts['failed']} failed, {counts['errors']} errors, "
            f"{counts['skipped']} skipped of {len(cases)}"] + [
        f"failed: `{case.classname}::{case.name}`" for case in cases if case.failing][:16]


def summarize_train(out: Path) -> list[str]:
    results = read_json(out / "train-results.json")
    records = read_jsonl(out / "train-metrics.jsonl")
    train = [r for r in records if r.get("kind") == "train"]
    if not train:
        return ["no training records"]
    rates = [r["tokens_per_second"] for r in train[1:]] or [train[0]["tokens_per_second"]]
    lines = [f"{train[-1]['step']} steps; target tokens/s: median {statistics.median(rates):,.0f}"
             f" (first window, with compilation: {train[0]['tokens_per_second']:,.0f})"]
    if results:
        lines.append(f"test: BLEU {results.get('bleu')}, exact match "
                     f"{results.get('exact_match')}, alignment "
                     f"{results.get('alignment_accuracy')}; wall {results.get('wall_seconds')} s")
    return lines + compare_losses(records, read_jsonl(REFERENCE / "metrics.jsonl"),
                                  read_json(REFERENCE / "results.json"))


def compare_losses(gpu: list[dict[str, Any]], cpu: list[dict[str, Any]],
                   cpu_results: dict[str, Any] | None) -> list[str]:
    """The GPU run's losses against the CPU reference's at the same steps."""
    if not cpu:
        return [f"no CPU reference at {REFERENCE.relative_to(ROOT)}"]
    lines = []
    for kind in ("train", "val"):
        ours = {r["step"]: r["loss"] for r in gpu if r.get("kind") == kind}
        theirs = {r["step"]: r["loss"] for r in cpu if r.get("kind") == kind}
        steps = sorted(set(ours) & set(theirs))
        if not steps:
            continue
        shown = [s for s in steps if s in (10, 50, 100, 200, 400, 800)] or steps[-1:]
        late = [abs(ours[s] / theirs[s] - 1) for s in steps if s >= steps[-1] // 2]
        lines.append(f"{kind} loss GPU / CPU reference: " + ", ".join(
            f"step {s} {ours[s]:.3f} / {theirs[s]:.3f}" for s in shown)
            + f"; largest gap over the last half of the steps {max(late):.1%}")
    if cpu_results:
        lines.append(f"CPU reference test: BLEU {cpu_results.get('bleu')}, exact match "
                     f"{cpu_results.get('exact_match')}")
    return lines


def summarize_bench(report: dict[str, Any] | None, name: str) -> list[str]:
    """The harness's own table of a benchmark part (ours ÷ torch.nn per cell, MFU, memory),
    with the matmul peak it measured and whether the part was stopped early."""
    if not report:
        return [f"no bench-{name}.json"]
    from attention.bench.report import format_table

    peaks = ", ".join(f"{d} {p['flop_per_s'] / 1e12:.1f} TFLOP/s"
                      for d, p in report["matmul_peak"].items())
    return [f"matmul peak: {peaks}", "", format_table(report, markdown=True)] \
        + ([f"stopped: {report['stopped']}"] if report.get("stopped") else [])


def environment_line() -> str:
    import torch

    from attention.bench import kit

    cuda = torch.cuda.is_available()
    env = kit.environment("cuda" if cuda else "cpu", "")
    device = "CPU (dry run)" if not cuda else (
        f"{env['device_name']} (CUDA {env['cuda']}, capability "
        f"{'.'.join(map(str, torch.cuda.get_device_capability()))})")
    commit = "unknown (no git here)" if env["git_commit"] is None else \
        env["git_commit"] + (" with uncommitted changes" if env["git_dirty"] else "")
    return f"{device}; torch {env['torch']}, Python {env['python']}; commit {commit}"


def write_summary(out: Path, outcomes: list[Outcome], started: float,
                  reports: dict[str, dict[str, Any] | None]) -> str:
    from attention.bench import kit
    from attention.common.files import write_text_atomic

    total = time.monotonic() - started
    lines = ["# GPU check", "", environment_line(), "",
             f"{sum(o.status == 'ok' for o in outcomes)} of {len(outcomes)} parts ok in "
             f"{total:.0f} s (planned {sum(o.part.planned_s for o in outcomes)} s, budgets "
             f"{sum(o.part.budget_s for o in outcomes)} s).", "", *kit.markdown_table(
                 ["part", "status", "seconds", "planned", "budget"],
                 [[o.part.name, o.status, f"{o.seconds:.0f}", o.part.planned_s, o.part.budget_s]
                  for o in outcomes], "llrrr")]
    names = {o.part.name for o in outcomes}
    sections = [("tests", "Tests with a CUDA variant", lambda: summarize_tests(out)),
                ("train", "Training (toy, bf16 autocast, compiled)", lambda: summarize_train(out)),
                ("base", "Benchmark base (bf16): ours against torch.nn, > 1: ours faster",
                 lambda: summarize_bench(reports["base"], "base")),
                ("long", "Benchmark long (bf16): ours against SDPA's kernels",
                 lambda: summarize_bench(reports["long"], "long"))]
    for name, title, summarize in sections:
        if name in names:
            try:
                body = summarize()
            except Exception as error:  # a partial file: say so, keep the rest
                body = [f"summary failed: {type(error).__name__}: {error}"]
            lines += ["", f"## {title}", "", *body]
    text = "\n".join(lines) + "\n"
    write_text_atomic(out / "summary.md", text)
    return text


def write_bench_markdown(out: Path, reports: dict[str, dict[str, Any] | None]) -> None:
    from attention.bench.report import format_markdown
    from attention.common.files import write_text_atomic

    texts = []
    for report in reports.values():
        if report:
            stopped = f"\n**Stopped early**: {report['stopped']}\n" if report.get("stopped") else ""
            texts.append(format_markdown(report) + stopped)
    if texts:
        write_text_atomic(out / "bench.md", "\n".join(texts))


def parse_parts(text: str) -> list[str]:
    """``--parts``: comma-separated part names, in the order to run them."""
    names = [name.strip() for name in text.split(",") if name.strip()]
    if not names or any(name not in PARTS for name in names):
        raise ValueError(f"--parts: expected some of {','.join(PARTS)}, got {text!r}")
    return names


def run_check(names: list[str], out: Path, dry_run: bool = False) -> int:
    """Run the parts ``names`` in order, results in ``out``; 0 if every part was ok."""
    started = time.monotonic()
    out = out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    for name in FILES:  # an earlier run's results must not pass for this one's
        (out / name).unlink(missing_ok=True)
    work = Path(tempfile.mkdtemp(prefix="gpu-check-"))
    outcomes = []
    try:
        for name in names:
            outcome = run_child(PARTS[name], out, work, dry_run)
            outcomes.append(outcome)
            with open(out / "log.txt", "a", encoding="utf-8") as log:
                log.write(f"===== {name}: {outcome.status} in {outcome.seconds:.0f} s =====\n"
                          f"{clipped(outcome.log)}\n")
        reports = {name: read_json(out / f"bench-{name}.json") for name in ("base", "long")}
        write_bench_markdown(out, reports)
        print(write_summary(out, outcomes, started, reports), end="")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0 if all(o.status == "ok" for o in outcomes) else 1


def child_main(argv: list[str] | None = None) -> int:
    """A part, in its child process (``python -m attention.bench.gpu_check --part NAME``)."""
    parser = argparse.ArgumentParser(description="one part of the GPU check")
    parser.add_argument("--part", choices=list(PARTS), required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--seconds", type=int, required=True)
    parser.add_argument("--dry-run-cpu", action="store_true")
    args = parser.parse_args(argv)
    return run_part(args.part, args.out, args.work, args.dry_run_cpu, args.seconds)


if __name__ == "__main__":
    sys.exit(child_main())
