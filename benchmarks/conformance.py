"""PyTorch's own tests of its attention modules, run on torch.nn's classes and on ours.

Runs pytest on PyTorch's ``test/test_transformers.py`` and ``test/nn/test_multihead_attention.py``
(fetched by hand; they are not part of this repository) twice each, one run at a time, in
subprocesses: once as they are (the baseline, torch.nn's classes) and once with the pytest
plugin ``benchmarks/conformance_swap.py``, which puts ``attention.compat``'s
``MultiheadAttention``, encoder and decoder classes and ``Transformer`` (those it defines) in
place of torch.nn's. Per-test outcomes come from pytest's junit XML. ``results.json`` and
``results.md`` in ``--out`` hold the counts per file and run, how long each run took, and the
tests that pass on torch.nn's classes but fail on ours, each with the first line of its
failure. Tests that need CUDA skip by themselves on a CPU-only machine.

    python benchmarks/conformance.py --tests /tmp/pytorch-tests/test --ref <commit>

``--ref`` is recorded as given (the PyTorch commit or tag the files came from).
``--package-root`` runs another copy of ``attention`` (say ``git archive HEAD attention``
unpacked elsewhere) instead of this checkout's. The test files need ``expecttest``
(``pip install -e '.[conformance]'``).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
import xml.etree.ElementTree as ElementTree
from dataclasses import dataclass
from pathlib import Path

import torch

from attention.common.files import write_text_atomic

ROOT = Path(__file__).resolve().parent.parent
BENCHMARKS = Path(__file__).resolve().parent
TEST_FILES = ("test_transformers.py", "nn/test_multihead_attention.py")
MODES = ("baseline", "swap")
SWAP_PLUGIN = "conformance_swap"
# test_transformers.py (3360 tests) took 927 s on torch.nn's classes and 671 s swapped, on
# the 2-core development machine; test_multihead_attention.py about 10 s.
DEFAULT_TIMEOUT_S = 3600
FAILING = ("failed", "error")


@dataclass(frozen=True)
class Outcome:
    status: str  # passed, failed, error or skipped
    message: str = ""


@dataclass(frozen=True)
class Run:
    test_file: str
    mode: str
    returncode: int | None  # None: killed at the timeout
    seconds: float
    junit: Path
    log: Path


# --------------------------------------------------------------------------- arguments


def missing_test_files(tests: Path) -> list[str]:
    return [name for name in TEST_FILES if not (tests / name).is_file()]


def check_tests_folder(tests: Path) -> Path:
    missing = missing_test_files(tests)
    if missing:
        raise argparse.ArgumentTypeError(
            f"expected a folder holding {' and '.join(TEST_FILES)}, received {tests} "
            f"(missing: {', '.join(missing)})")
    return tests.resolve()


def check_package_root(root: Path) -> Path:
    compat = root / "attention" / "compat"
    if not (compat.with_suffix(".py").is_file() or (compat / "__init__.py").is_file()):
        raise argparse.ArgumentTypeError(
            f"expected a folder holding attention/compat.py or attention/compat/__init__.py, "
            f"received {root}")
    return root.resolve()


def positive_seconds(text: str) -> float:
    seconds = float(text)
    if seconds <= 0:
        raise argparse.ArgumentTypeError(f"expected seconds > 0, received {text}")
    return seconds


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tests", type=lambda text: check_tests_folder(Path(text)),
                        required=True,
                        help=f"folder holding PyTorch's {' and '.join(TEST_FILES)}")
    parser.add_argument("--ref", required=True,
                        help="the PyTorch commit or tag the test files came from (recorded)")
    parser.add_argument("--out", type=Path, default=BENCHMARKS / "results" / "conformance",
                        help="where results.json, results.md and the runs' junit XML and "
                             "logs go (default: %(default)s)")
    parser.add_argument("--package-root", type=lambda text: check_package_root(Path(text)),
                        default=ROOT,
                        help="folder whose attention package is tested (default: this "
                             "checkout)")
    parser.add_argument("--timeout", type=positive_seconds, default=DEFAULT_TIMEOUT_S,
                        help="seconds one pytest run may take (default: %(default)s)")
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES),
                        help="which runs to make (default: both)")
    return parser.parse_args(argv)


# --------------------------------------------------------------------------- running


def child_environment(package_root: Path, swap_record: Path) -> dict[str, str]:
    """This environment, with the plugin and ``package_root``'s ``attention`` importable first."""
    env = dict(os.environ)
    paths = [str(BENCHMARKS), str(package_root), env.get("PYTHONPATH", "")]
    env["PYTHONPATH"] = os.pathsep.join(path for path in paths if path)
    env["CONFORMANCE_SWAP_RECORD"] = str(swap_record)
    return env


def pytest_command(test_file: str, mode: str, junit: Path) -> list[str]:
    # -c os.devnull: no ini file found above the tests (this repository's, say) applies.
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-c", os.devnull,
               f"--junitxml={junit}"]
    if mode == "swap":
        command += ["-p", SWAP_PLUGIN]
    return command + [test_file]


def run_logged(command: list[str], cwd: Path, env: dict[str, str], log: Path,
               timeout: float) -> int | None:
    """Run ``command`` with its output in ``log``; its exit status, or None if it timed out.

    The child leads its own process group, so workers it started (torch.compile's) go with it
    at the timeout.
    """
    with log.open("w") as output:
        process = subprocess.Popen(command, cwd=cwd, env=env, stdout=output,
                                   stderr=subprocess.STDOUT, start_new_session=True)
        try:
            return process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
            return None


def run_one(tests: Path, test_file: str, mode: str, runs_dir: Path, env: dict[str, str],
            timeout: float) -> Run:
    stem = f"{Path(test_file).stem}.{mode}"
    junit, log = runs_dir / f"{stem}.xml", runs_dir / f"{stem}.log"
    junit.unlink(missing_ok=True)
    print(f"{test_file} ({mode}) ...", flush=True)
    start = time.perf_counter()
    returncode = run_logged(pytest_command(test_file, mode, junit), tests, env, log, timeout)
    seconds = time.perf_counter() - start
    print(f"{test_file} ({mode}): exit {returncode}, {seconds:.0f} s", flush=True)
    return Run(test_file, mode, returncode, seconds, junit, log)


# --------------------------------------------------------------------------- results


def first_line(text: str | None) -> str:
    for line in (text or "").splitlines():
        if line.strip():
            return line.strip()
    return ""


def testcase_outcome(case: ElementTree.Element) -> Outcome:
    for status, tag in (("failed", "failure"), ("error", "error"), ("skipped", "skipped")):
        found = case.find(tag)
        if found is not None:
            return Outcome(status, first_line(found.get("message")) or first_line(found.text))
    return Outcome("passed")


def testcase_id(test_file: str, case: ElementTree.Element) -> str:
    test_class = case.get("classname", "").rsplit(".", 1)[-1]
    return f"{test_file}::{test_class}::{case.get('name')}"


def read_outcomes(test_file: str, junit: Path) -> dict[str, Outcome]:
    """Test id → outcome, from pytest's junit XML; empty if the run wrote none."""
    if not junit.is_file():
        return {}
    cases = ElementTree.parse(junit).getroot().iter("testcase")
    return {testcase_id(test_file, case): testcase_outcome(case) for case in cases}


def count(outcomes: dict[str, Outcome]) -> dict[str, int]:
    statuses = [outcome.status for outcome in outcomes.values()]
    return {"passed": statuses.count("passed"), "failed": statuses.count("failed"),
            "skipped": statuses.count("skipped"), "errors": statuses.count("error")}


def regressions(baseline: dict[str, Outcome], swap: dict[str, Outcome]) -> list[dict[str, str]]:
    """Tests that pass on torch.nn's classes and fail, or do not run, on ours."""
    found = []
    for test, outcome in baseline.items():
        if outcome.status != "passed":
            continue
        ours = swap.get(test, Outcome("error", "not run with the swap (see the run's log)"))
        if ours.status in FAILING:
            found.append({"test": test, "message": ours.message})
    return found


def failures(outcomes: dict[str, Outcome]) -> list[dict[str, str]]:
    return [{"test": test, "message": outcome.message}
            for test, outcome in outcomes.items() if outcome.status in FAILING]


def read_swapped(swap_record: Path) -> list[str] | None:
    return json.loads(swap_record.read_text()) if swap_record.is_file() else None


def git_output(folder: Path, *arguments: str) -> str | None:
    """``git arguments`` run in ``folder``; None where that is no git checkout."""
    result = subprocess.run(["git", *arguments], cwd=folder, capture_output=True, text=True)
    return result.stdout.strip() if result.returncode == 0 else None


def package_source(package_root: Path) -> dict:
    """The commit ``package_root``'s attention comes from, and whether it has changes on top."""
    commit = git_output(package_root, "rev-parse", "HEAD")
    changes = git_output(package_root, "status", "--porcelain", "--", "attention")
    return {"package_root": str(package_root), "attention_commit": commit,
            "attention_uncommitted_changes": bool(changes) if commit else None}


def run_summary(run: Run, outcomes: dict[str, Outcome]) -> dict:
    return {"file": run.test_file, "mode": run.mode, "returncode": run.returncode,
            "timed_out": run.returncode is None, "seconds": round(run.seconds, 1),
            "junit": str(run.junit), "log": str(run.log), "counts": count(outcomes)}


def build_report(args: argparse.Namespace, runs: list[Run], swapped: list[str] | None) -> dict:
    outcomes = {(run.test_file, run.mode): read_outcomes(run.test_file, run.junit)
                for run in runs}
    report = {
        "torch": torch.__version__,
        "pytorch_ref": args.ref,
        "tests_folder": str(args.tests),
        **package_source(args.package_root),
        "swapped": swapped,
        "runs": [run_summary(run, outcomes[run.test_file, run.mode]) for run in runs],
        "regressions": {},
        "baseline_failures": {},
    }
    for test_file in TEST_FILES:
        baseline = outcomes.get((test_file, "baseline"))
        swap = outcomes.get((test_file, "swap"))
        if baseline is not None:
            report["baseline_failures"][test_file] = failures(baseline)
        if baseline is not None and swap is not None:
            report["regressions"][test_file] = regressions(baseline, swap)
    return report


def markdown_failure_list(title: str, by_file: dict[str, list[dict[str, str]]]) -> list[str]:
    total = sum(len(found) for found in by_file.values())
    lines = [f"## {title}: {total}", ""]
    for test_file, found in by_file.items():
        lines += [f"### {test_file}: {len(found)}", ""]
        if found:
            lines += [f"- `{item['test']}`: {item['message'] or '(no message)'}"
                      for item in found] + [""]
    return lines


def source_description(report: dict) -> str:
    commit = report["attention_commit"]
    if commit is None:
        return "not a git checkout"
    return f"commit {commit}" + (", with uncommitted changes"
                                 if report["attention_uncommitted_changes"] else "")


def render_markdown(report: dict) -> str:
    swapped = report["swapped"]
    lines = [
        "# PyTorch's attention tests on torch.nn's classes and on attention.compat's",
        "",
        f"torch {report['torch']}; PyTorch test files at {report['pytorch_ref']}; "
        f"attention from {report['package_root']} ({source_description(report)}).",
        f"Swapped in: {', '.join(swapped) if swapped else 'no record (no swap run)'}.",
        "",
        "| file | run | passed | failed | skipped | errors | exit | seconds |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for run in report["runs"]:
        counts = run["counts"]
        exit_status = "timeout" if run["timed_out"] else run["returncode"]
        lines.append(f"| {run['file']} | {run['mode']} | {counts['passed']} | "
                     f"{counts['failed']} | {counts['skipped']} | {counts['errors']} | "
                     f"{exit_status} | {run['seconds']:.0f} |")
    lines.append("")
    lines += markdown_failure_list("Pass on torch.nn's classes, fail on ours",
                                   report["regressions"])
    lines += markdown_failure_list("Fail on torch.nn's own classes", report["baseline_failures"])
    return "\n".join(lines)



def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    runs_dir = args.out / "runs"
    runs_dir.mkdir(parents=True, exist_ok=True)
    swap_record = runs_dir / "swapped.json"
    swap_record.unlink(missing_ok=True)
    env = child_environment(args.package_root, swap_record)
    runs = [run_one(args.tests, test_file, mode, runs_dir, env, args.timeout)
            for test_file in TEST_FILES for mode in args.modes]
    report = build_report(args, runs, read_swapped(swap_record))
    write_text_atomic(args.out / "results.json", json.dumps(report, indent=2) + "\n")
    write_text_atomic(args.out / "results.md", render_markdown(report))
    found = sum(len(items) for items in report["regressions"].values())
    print(f"{found} tests pass on torch.nn's classes and fail on ours; "
          f"see {args.out / 'results.md'}")


if __name__ == "__main__":
    main()
