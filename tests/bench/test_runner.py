"""The run of the tiny config: every cell present and well formed, the environment, the
matmul peak and the correctness check recorded, and a missing x-transformers skipped.
Timings are never asserted."""

import itertools
import sys

import pytest
import torch

from attention.bench.config import (
    DEFAULT_CONTENDERS,
    OURS,
    PEERS,
    TORCH_PEERS,
    load_bench_config,
)
from attention.bench.report import write_results
from attention.bench.runner import run_benchmark

from .tiny import HAS_X_TRANSFORMERS, TINY, one_cell


def test_tiny_run_has_every_cell_well_formed(tiny_run):
    config, report, _, _ = tiny_run
    contenders = [c for c in DEFAULT_CONTENDERS if HAS_X_TRANSFORMERS or c != "x-transformers"]
    assert report["contenders"] == contenders
    expected = set(itertools.product(contenders, config.passes, config.cases, [16, 32],
                                     ["float32"]))
    cells = {(c["contender"], c["pass"], c["case"], c["length"], c["dtype"]): c
             for c in report["cells"]}
    assert set(cells) == expected and len(report["cells"]) == len(expected)
    for (name, _, case, length, _), cell in cells.items():
        assert cell["status"] == "ok", cell["error"]
        assert len(cell["times_ms"]) == config.repeats
        assert all(t > 0 for t in cell["times_ms"])
        assert 0 < cell["min_ms"] <= cell["median_ms"] <= cell["max_ms"]
        assert cell["iqr_ms"] >= 0
        real = config.batch * length * (3 if case == "padded" else 4) // 4
        assert cell["real_tokens"] == real
        assert cell["tokens_per_s"] == pytest.approx(real / (cell["median_ms"] / 1e3))
        assert cell["flops"] > 0 and cell["flop_per_s"] > 0 and 0 < cell["mfu"]
        assert cell["memory"] is None  # cpu_peak_rss off
        if name in OURS:
            assert cell["torch_best"] in TORCH_PEERS
            assert set(cell["ratios"]) == {p for p in PEERS if p in contenders}
            for ratio in cell["ratios"].values():
                assert len(ratio["per_round"]) == config.repeats
                assert all(r > 0 for r in ratio["per_round"])
                assert ratio["median"] > 0
        else:
            assert cell["ratios"] == {} and cell["torch_best"] is None
    # the same shape counts the same work for every contender
    for key in {(c["pass"], c["case"], c["length"]) for c in report["cells"]}:
        assert len({c["flops"] for c in report["cells"]
                    if (c["pass"], c["case"], c["length"]) == key}) == 1


def test_tiny_run_records_environment_peak_and_correctness(tiny_run):
    _, report, _, _ = tiny_run
    env = report["environment"]
    assert env["torch"] == torch.__version__ and env["threads"] == torch.get_num_threads()
    assert env["device"] == "cpu" and env["device_name"] and env["date"]
    assert env["command"] == "attention-bench test"
    assert report["matmul_peak"]["float32"]["size"] == 2048
    assert report["matmul_peak"]["float32"]["flop_per_s"] > 0
    # torch-nobias carries our weights: same outputs on real positions, in both cases
    assert {(r["length"], r["case"]) for r in report["correctness"]} == {
        (16, "dense"), (16, "padded"), (32, "dense"), (32, "padded")}
    for row in report["correctness"]:
        assert set(row["max_abs_diff"]) == {"ours-explicit", "ours-fused"}
        assert all(0 <= d < 1e-4 for d in row["max_abs_diff"].values())


def test_missing_x_transformers_is_skipped_with_a_notice(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "x_transformers", None)  # import x_transformers fails
    config = load_bench_config(TINY, one_cell())
    notices = []
    report = run_benchmark(config, "cpu", contenders=["ours-fused", "x-transformers"],
                           log=notices.append)
    skipped = [n for n in notices if "x-transformers" in n and n.startswith("notice")]
    assert len(skipped) == 1
    assert report["contenders"] == ["ours-fused"] and "x-transformers" in report["skipped"]
    assert [c["contender"] for c in report["cells"]] == ["ours-fused"]
    assert report["cells"][0]["ratios"] == {}
    paths = write_results(report, tmp_path)
    assert all(p.is_file() for p in paths) and len(paths) == 2  # one length: no plot
