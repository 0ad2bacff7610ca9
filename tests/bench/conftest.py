import pytest

from attention.bench.config import load_bench_config
from attention.bench.report import write_results
from attention.bench.runner import run_benchmark

from .tiny import TINY


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
    """The whole tiny config on the CPU (no memory subprocesses), and its result files."""
    config = load_bench_config(TINY, ["cpu_peak_rss=false"])
    notices = []
    report = run_benchmark(config, "cpu", command="attention-bench test", log=notices.append)
    out = tmp_path_factory.mktemp("bench")
    return config, report, write_results(report, out), notices
