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
import sys
from pathlib import Path

from attention.bench import kit
from attention.bench.environment import git_commit

ROOT = Path(__file__).resolve().parent.parent
BENCHMARKS = Path(__file__).resolve().parent
TEST_FILES = ("test_transformers.py", "nn/test_multihead_attention.py")
MODES = ("baseline", "swap")
SWAP_PLUGIN = "conformance_swap"
# test_transformers.py (3360 tests) took 927 s on torch.nn's classes and 671 s swapped, on
# the 2-core development machine; test_multihead_attention.py about 10 s.
DEFAULT_TIMEOUT_S = 3600


def check_tests_folder(text: str) -> Path:
    missing = [name for name in TEST_FILES if not (Path(text) / name).is_file()]
    if missing:
        raise argparse.ArgumentTypeError(
            f"expected a folder holding {' and '.join(TEST_FILES)}, received {text} "
            f"(missing: {', '.join(missing)})")
    return Path(text).resolve()


def check_package_root(text: str) -> Path:
    compat = Path(text) / "attention" / "compat"
    if not (compat.with_suffix(".py").is_file() or (compat / "__init__.py").is_file()):
        raise argparse.ArgumentTypeError(
            f"expected a folder holding attention/compat.py or attention/compat/__init__.py, "
            f"received {text}")
    return Path(text).resolve()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tests", type=check_tests_folder, required=True,
                        help=f"folder holding PyTorch's {' and '.join(TEST_FILES)}")
    parser.add_argument("--ref", required=True,
                        help="the PyTorch commit or tag the test files came from (recorded)")
    parser.add_argument("--out", type=Path, default=BENCHMARKS / "results" / "conformance",
                        help="where results.json, results.md and the runs' junit XML and "
                             "logs go (default: %(default)s)")
    parser.add_argument("--package-root", type=check_package_root, default=ROOT,
                        help="folder whose attention package is tested (default: this "
                             "checkout)")
    parser.add_argument("--timeout", type=kit.positive_float, default=DEFAULT_TIMEOUT_S,
                        help="seconds one pytest run may take (default: %(default)s)")
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES),
                        help="which runs to make (default: both)")
    return parser.parse_args(argv)


def child_environment(package_root: Path, swap_record: Path) -> dict[str, str]:
    """This environment, with the plugin and ``package_root``'s ``attention`` importable first."""
    paths = [str(BENCHMARKS), str(package_root), os.environ.get("PYTHONPATH", "")]
    return {**os.environ, "PYTHONPATH": os.pathsep.join(path for path in paths if path),
            "CONFORMANCE_SWAP_RECORD": str(swap_record)}


def run_one(args: argparse.Namespace, test_file: str, mode: str, env: dict[str, str]
            ) -> dict:
    """One pytest run of ``test_file`` in a child process (its workers killed with it at the
    timeout); its outcomes from the junit XML: test id → case."""
    runs = args.out / "runs"
    junit, log = (runs / f"{Path(test_file).stem}.{mode}.{suffix}" for suffix in ("xml", "log"))
    junit.unlink(missing_ok=True)
    # -c os.devnull: no ini file found above the tests (this repository's, say) applies.
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-c", os.devnull,
               f"--junitxml={junit}", *(["-p", SWAP_PLUGIN] if mode == "swap" else []),
               test_file]
    kit.say(f"{test_file} ({mode}) ...")
    done = kit.run_process(command, cwd=args.tests, env=env, log=log, timeout=args.timeout)
    kit.say(f"{test_file} ({mode}): exit {done.returncode}, {done.seconds:.0f} s")
    cases = {f"{test_file}::{case.classname.rsplit('.', 1)[-1]}::{case.name}": case
             for case in kit.read_junit(junit) or []}
    return {"file": test_file, "mode": mode, "returncode": done.returncode,
            "timed_out": done.timed_out, "seconds": round(done.seconds, 1),
            "junit": kit.shown_path(junit), "log": kit.shown_path(log),
            "counts": kit.count_statuses(cases.values()), "cases": cases}


def build_report(args: argparse.Namespace, runs: list[dict], swapped: list[str] | None
                 ) -> dict:
    """The counts of each run; per file, the tests that fail on torch.nn's own classes and
    those that pass on them but fail, or do not run, on ours."""
    cases = {(run["file"], run["mode"]): run.pop("cases") for run in runs}
    commit, dirty = git_commit(args.package_root / "attention")
    report = {"pytorch_ref": args.ref,
              "tests_folder": kit.shown_path(args.tests),
              "package_root": kit.shown_path(args.package_root),
              "attention_commit": commit, "attention_uncommitted_changes": dirty,
              "swapped": swapped, "runs": runs, "regressions": {}, "baseline_failures": {}}
    not_run = kit.JunitCase("", "", "error", "not run with the swap (see the run's log)")
    for test_file in TEST_FILES:
        baseline, swap = cases.get((test_file, "baseline")), cases.get((test_file, "swap"))
        if baseline is not None:
            report["baseline_failures"][test_file] = [
                {"test": test, "message": case.message} for test, case in baseline.items()
                if case.failing]
        if baseline is not None and swap is not None:
            report["regressions"][test_file] = [
                {"test": test, "message": swap.get(test, not_run).message}
                for test, case in baseline.items()
                if case.status == "passed" and swap.get(test, not_run).failing]
    return report


def markdown(report: dict) -> list[str]:
    swapped, commit = report["swapped"], report["attention_commit"]
    source = "not a git checkout" if commit is None else f"commit {commit}" + (
        ", with uncommitted changes" if report["attention_uncommitted_changes"] else "")
    lines = [
        f"torch {report['environment']['torch']}; PyTorch test files at "
        f"{report['pytorch_ref']}; attention from {report['package_root']} ({source}).",
        f"Swapped in: {', '.join(swapped) if swapped else 'no record (no swap run)'}.", "",
        *kit.markdown_table(
            ["file", "run", "passed", "failed", "skipped", "errors", "exit", "seconds"],
            [[run["file"], run["mode"], *run["counts"].values(),
              "timeout" if run["timed_out"] else run["returncode"], f"{run['seconds']:.0f}"]
             for run in report["runs"]], align="llrrrrrr"), ""]
    for title, by_file in (("Pass on torch.nn's classes, fail on ours", report["regressions"]),
                           ("Fail on torch.nn's own classes", report["baseline_failures"])):
        lines += [f"## {title}: {sum(len(found) for found in by_file.values())}", ""]
        for test_file, found in by_file.items():
            lines += [f"### {test_file}: {len(found)}", ""]
            lines += [f"- `{item['test']}`: {item['message'] or '(no message)'}"
                      for item in found] + ([""] if found else [])
    return lines


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    (args.out / "runs").mkdir(parents=True, exist_ok=True)
    swap_record = args.out / "runs" / "swapped.json"
    swap_record.unlink(missing_ok=True)
    env = child_environment(args.package_root, swap_record)
    runs = [run_one(args, test_file, mode, env) for test_file in TEST_FILES
            for mode in args.modes]
    swapped = json.loads(swap_record.read_text()) if swap_record.is_file() else None
    report = kit.publish(args.out / "results", __file__, argv, markdown=markdown,
                         title="PyTorch's attention tests on torch.nn's classes and on "
                               "attention.compat's", **build_report(args, runs, swapped))
    found = sum(len(items) for items in report["regressions"].values())
    print(f"{found} tests pass on torch.nn's classes and fail on ours; "
          f"see {args.out / 'results.md'}")
    return report


if __name__ == "__main__":
    main()
