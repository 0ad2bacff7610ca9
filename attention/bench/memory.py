"""CPU memory of one cell: a fresh Python process builds only that cell's contender and input,
reads its resident set (``VmRSS``), warms up, resets the peak (``/proc/self/clear_refs``)
where Linux allows it, runs, and reads the peak (``VmHWM``). Not ``ru_maxrss``: a child of
``subprocess`` inherits its parent's peak in it (it is the fallback off Linux only).

The child is this module run as ``python -m attention.bench.memory SPEC_JSON``; it prints one
JSON line. It imports the same ``attention`` as its parent, installed or from a clone.
"""

from __future__ import annotations

import gc
import json
import os
import sys
from pathlib import Path
from typing import Any

import torch

from .config import DTYPES, BenchConfig
from .contenders import build_contenders
from .environment import package_dir
from .subprocesses import run_process
from .timing import MIB, describe_error, is_out_of_memory, prepare, run_once
from .workload import make_case, make_input

__all__ = ["MEMORY_RUNS", "child_environment", "main", "measure_cpu_peak_rss",
           "measure_in_process", "rss_bytes", "reset_peak_rss"]

MEMORY_RUNS = 2  # runs after the warm-up in a CPU memory subprocess


def measure_cpu_peak_rss(config: BenchConfig, name: str, length: int, dtype: str,
                         pass_: str, case: str, threads: int | None = None,
                         runs: int = MEMORY_RUNS, timeout: float | None = None
                         ) -> dict[str, Any]:
    """Run one CPU cell in a fresh Python process and return its memory: ``status``, and
    when ``ok``: ``baseline_mib`` (RSS after building the contender and input),
    ``peak_mib`` (peak RSS of the measured runs), ``run_mib`` (their difference)."""
    spec = {"config": config.to_dict(), "name": config.name, "contender": name,
            "length": length, "dtype": dtype, "pass": pass_, "case": case, "runs": runs,
            "threads": threads or torch.get_num_threads()}
    command = [sys.executable, "-m", __spec__.name, json.dumps(spec)]
    done = run_process(command, env=child_environment(), timeout=timeout)
    if done.timed_out:
        return {"status": "error", "error": f"memory subprocess: over {timeout} s"}
    lines = done.stdout.strip().splitlines()
    if done.returncode or not lines:
        tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
        return {"status": "error", "error": f"memory subprocess exited with status "
                                            f"{done.returncode}: {tail}"[:300]}
    return json.loads(lines[-1])


def child_environment() -> dict[str, str]:
    """This process's environment, with the folder that holds the ``attention`` package it
    imported first on ``PYTHONPATH``: the child imports the same code, installed or not."""
    paths = [str(package_dir().parent), *filter(None, [os.environ.get("PYTHONPATH")])]
    return {**os.environ, "PYTHONPATH": os.pathsep.join(paths)}


def main(argv: list[str]) -> int:
    """The child: measure the cell ``argv[0]`` (a JSON spec) describes and print one JSON
    line, ``status`` ``oom`` or ``error`` with its message when the cell fails."""
    if len(argv) != 1:
        print(f"usage: python -m {__spec__.name} SPEC_JSON (got {len(argv)} arguments)",
              file=sys.stderr)
        return 2
    spec = json.loads(argv[0])
    torch.set_num_threads(spec["threads"])
    try:
        result = measure_in_process(spec)
    except Exception as error:
        result = {"status": "oom" if is_out_of_memory(error) else "error",
                  "error": describe_error(error)}
    print(json.dumps(result), flush=True)
    return 0


def measure_in_process(spec: dict[str, Any]) -> dict[str, Any]:
    """Build the spec's contender and input in this process, warm up, and measure the peak
    RSS of ``spec["runs"]`` runs above the RSS before the warm-up."""
    config = BenchConfig.from_dict(spec["config"], name=spec["name"])
    training = spec["pass"] == "training"
    dtype = DTYPES[spec["dtype"]]
    contender = build_contenders(config, [spec["contender"]], "cpu", dtype)[spec["contender"]]
    x = make_input(config, spec["length"], "cpu", dtype)
    x.requires_grad_(training)
    case = make_case(spec["case"], config.batch, spec["length"], config.d_model,
                     config.padding, "cpu")
    gc.collect()
    baseline = rss_bytes("VmRSS")
    for _ in range(config.warmup):
        prepare(contender, x, training)
        run_once(contender, x, case, training)
    reset = reset_peak_rss()
    for _ in range(spec["runs"]):
        prepare(contender, x, training)
        run_once(contender, x, case, training)
    peak = rss_bytes("VmHWM")
    source = "VmHWM"
    if baseline is None or peak is None:  # not Linux: the whole process's peak
        import resource

        scale = 1 if sys.platform == "darwin" else 1024
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale
        baseline, source = baseline or 0, "ru_maxrss"
    return {"status": "ok", "error": None, "kind": "cpu_rss", "baseline_mib": baseline / MIB,
            "peak_mib": peak / MIB, "run_mib": max(0, peak - baseline) / MIB,
            "peak_source": source, "peak_reset_after_warmup": reset}


def rss_bytes(field_name: str) -> int | None:
    """``VmRSS`` (now) or ``VmHWM`` (peak) of this process from /proc, in bytes; ``None``
    where /proc is not there."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field_name + ":"):
                return int(line.split()[1]) * 1024  # reported in kB
    except OSError:
        return None
    return None


def reset_peak_rss() -> bool:
    """Reset ``VmHWM`` to the current RSS (Linux ≥ 4.0), so that the peak excludes the
    warm-up (a compilation)."""
    try:
        with open("/proc/self/clear_refs", "w") as file:
            file.write("5")
    except OSError:
        return False
    return True


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
