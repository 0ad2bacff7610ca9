"""CPU memory in a child process: through measure_cpu_peak_rss, and the child run as a module
from another working directory."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import attention
from attention.bench.config import load_bench_config
from attention.bench.memory import child_environment, measure_cpu_peak_rss

from .tiny import TINY


def test_cpu_peak_rss_is_measured_in_a_subprocess():
    config = load_bench_config(TINY)
    memory = measure_cpu_peak_rss(config, "ours-fused", 32, "float32", "training", "padded",
                                  threads=1)
    assert memory["status"] == "ok", memory.get("error")
    assert memory["kind"] == "cpu_rss"
    assert memory["baseline_mib"] > 0 and memory["peak_mib"] > 0
    assert memory["run_mib"] >= 0 and math.isfinite(memory["run_mib"])


def test_the_child_runs_as_a_module_from_another_directory(tmp_path):
    config = load_bench_config(TINY)
    spec = {"config": config.to_dict(), "name": config.name, "contender": "torch-nobias",
            "length": 16, "dtype": "float32", "pass": "inference", "case": "dense",
            "runs": 1, "threads": 1}
    done = subprocess.run([sys.executable, "-m", "attention.bench.memory", json.dumps(spec)],
                          cwd=tmp_path, env=child_environment(), capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["status"] == "ok", result
    assert result["peak_mib"] > 0 and result["baseline_mib"] > 0
    assert "found in sys.modules" not in done.stderr  # the module is loaded once


def test_the_child_imports_the_parent_s_attention():
    path = child_environment()["PYTHONPATH"].split(os.pathsep)[0]
    assert Path(path) == Path(attention.__file__).resolve().parent.parent
