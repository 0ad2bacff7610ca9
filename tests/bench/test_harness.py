"""The benchmark harness at tiny size: every cell present and well formed, the FLOP count, the
padding mask, config errors, a missing contender, CPU memory in a subprocess, and the CLI.
Timings are never asserted."""

import itertools
import json
import math
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from attention.bench import harness as bench
from attention.bench.cli import main as bench_main
from attention.bench.harness import (
    DEFAULT_CONTENDERS,
    OURS,
    PEERS,
    TORCH_PEERS,
    Contender,
    encoder_flops,
    format_table,
    load_bench_config,
    make_case,
    measure_cpu_peak_rss,
    padding_lengths,
    padding_mask,
    run_benchmark,
    run_group,
    write_results,
)
from attention.translation.config import ConfigError

TINY = Path(__file__).resolve().parents[2] / "configs" / "bench" / "tiny.yaml"
HAS_X_TRANSFORMERS = bench.x_transformers_status() is None


def one_cell(*extra: str) -> list[str]:
    """Overrides that shrink the tiny config to one cell per contender."""
    return ["lengths=[16]", "passes=[inference]", "cases=[padded]", "cpu_peak_rss=false",
            *extra]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    config = load_bench_config(TINY, ["cpu_peak_rss=false"])
    notices = []
    report = run_benchmark(config, "cpu", command="attention-bench test", log=notices.append)
    out = tmp_path_factory.mktemp("bench")
    return config, report, write_results(report, out), notices


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


def test_tiny_run_writes_json_markdown_and_png(tiny_run):
    _, report, paths, _ = tiny_run
    date = report["environment"]["date"][:10]
    assert [p.name for p in paths] == [f"cpu-tiny-{date}.{ext}" for ext in ("json", "md", "png")]
    assert json.loads(paths[0].read_text()) == report
    markdown = paths[1].read_text()
    assert "| contender | pass | case | length |" in markdown
    assert "`attention-bench test`" in markdown and torch.__version__ in markdown
    assert markdown.count("\n| ours-fused |") == 8  # 2 lengths × 2 passes × 2 cases
    assert paths[2].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = format_table(report).splitlines()
    assert len(table) == 1 + len(report["cells"]) and "GFLOP/s" in table[0]


def test_encoder_flops_matches_a_hand_count():
    # d=4, d_ff=8, B=2, L=3: projections and FFN 2·6·(4·16 + 2·4·8) = 1536, attention
    # 4·4·(3² + 3²) = 288 per layer
    assert encoder_flops(4, 1, 8, 2, 3, None, False) == 1536 + 288
    assert encoder_flops(4, 2, 8, 2, 3, 6, False) == 2 * (1536 + 288)
    assert encoder_flops(4, 1, 8, 2, 3, 6, True) == 3 * (1536 + 288)
    # padded, lengths 3 and 1: only real work, 2·4·128 = 1024 and 4·4·(9 + 1) = 160
    assert encoder_flops(4, 1, 8, 2, 3, 4, False, seq_lengths=[3, 1]) == 1024 + 160
    with pytest.raises(ValueError, match="seq_lengths"):
        encoder_flops(4, 1, 8, 2, 3, 4, False, seq_lengths=[3, 4])


@pytest.mark.parametrize("batch,length", [(4, 16), (8, 128), (32, 128), (5, 10)])
def test_padding_mask_pads_a_quarter_from_half_to_full_length(batch, length):
    mask, lengths = padding_mask(batch, length, 0.25)
    assert mask.shape == (batch, length) and mask.dtype == torch.bool
    assert int(mask.sum()) == round(0.25 * batch * length)  # True at padding
    assert min(lengths) == length // 2 and max(lengths) == length
    assert lengths == sorted(lengths)
    steps = [b - a for a, b in zip(lengths, lengths[1:], strict=False)]
    assert max(steps) - min(steps) <= 2  # evenly spread, up to rounding
    for row, n in zip(mask, lengths, strict=True):  # right padding
        assert not row[:n].any() and row[n:].all()


def test_padding_lengths_of_one_sequence_and_the_loss_weights():
    assert padding_lengths(1, 1024, 0.25) == [768]
    assert padding_lengths(3, 8, 0.0) == [8, 8, 8]
    case = make_case("padded", 4, 16, 32, 0.25, "cpu")
    assert case.real_tokens == 48
    assert case.keep_mask.equal(~case.key_padding_mask)
    assert case.loss_weight.sum().item() * 32 == pytest.approx(1.0)
    assert (case.loss_weight.squeeze(-1)[case.key_padding_mask] == 0).all()
    dense = make_case("dense", 4, 16, 32, 0.25, "cpu")
    assert dense.key_padding_mask is None and dense.real_tokens == 64


@pytest.mark.parametrize("override,key", [
    ("colour=red", "colour"),
    ("repeats=4", "repeats"),
    ("d_model=big", "d_model"),
    ("d_model=30", "d_model"),  # not a multiple of n_heads
    ("lengths={gpu: [16]}", "lengths.gpu"),
    ("lengths=[16, x]", r"lengths\[1\]"),
    ("dtypes=[float64]", "dtypes"),
    ("padding=0.6", "padding"),
    ("passes=[inference, inference]", "passes"),
    ("cases=[sparse]", "cases"),
    ("cpu_peak_rss=maybe", "cpu_peak_rss"),
    ("warmup=0", "warmup"),
])
def test_config_errors_name_the_key(override, key):
    with pytest.raises(ConfigError, match=rf"^{key}:"):
        load_bench_config(TINY, [override])


def test_config_file_errors(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text(TINY.read_text() + "heads: 4\n")
    with pytest.raises(ConfigError, match="^heads: unknown key"):
        load_bench_config(path)
    path.write_text("d_model: 32\n")
    with pytest.raises(ConfigError, match="^n_heads: missing"):
        load_bench_config(path)
    with pytest.raises(ConfigError, match="file not found"):
        load_bench_config(tmp_path / "absent.yaml")
    config = load_bench_config(TINY, ["lengths={cpu: [16]}"])
    with pytest.raises(ConfigError, match="^lengths: no list for device 'cuda'"):
        config.lengths_for("cuda")


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


def test_forced_sdpa_kernels_run_where_the_device_has_them():
    config = load_bench_config(TINY, one_cell())
    names = ["ours-fused", "ours-sdpa-math", "ours-sdpa-flash", "ours-sdpa-cudnn", "torch-bias"]
    report = run_benchmark(config, "cpu", contenders=names, log=lambda _: None)
    cells = {c["contender"]: c for c in report["cells"]}
    for name in ("ours-sdpa-math", "ours-sdpa-flash"):  # the CPU has these two
        assert cells[name]["status"] == "ok" and "torch-bias" in cells[name]["ratios"]
    assert cells["ours-sdpa-cudnn"]["status"] == "error"  # and not this one
    assert "No viable backend" in cells["ours-sdpa-cudnn"]["error"]
    assert "ours-sdpa-math" not in DEFAULT_CONTENDERS


def test_a_failing_compile_is_recorded_not_raised():
    config = load_bench_config(TINY, one_cell("compile_backend=no-such-backend"))
    report = run_benchmark(config, "cpu", contenders=["ours-compiled", "torch-bias"],
                           log=lambda _: None)
    cells = {c["contender"]: c for c in report["cells"]}
    assert cells["ours-compiled"]["status"] == "error"
    assert cells["ours-compiled"]["error"] and cells["ours-compiled"]["median_ms"] is None
    assert cells["torch-bias"]["status"] == "ok"
    assert "error" in format_table(report)


def test_out_of_memory_is_recorded_and_the_others_go_on():
    layer = nn.Linear(8, 8)
    calls = {"n": 0}

    def runs_out(x, case):
        calls["n"] += 1
        if calls["n"] == 3:  # in the timed rounds, after the warm-up
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2 GiB")
        return layer(x)

    contenders = {"big": Contender("big", layer, runs_out),
                  "small": Contender("small", layer, lambda x, case: layer(x))}
    case = make_case("dense", 2, 4, 8, 0.25, "cpu")
    results = run_group(contenders, torch.randn(2, 4, 8), case, True, warmup=1, repeats=5)
    assert results["big"]["status"] == "oom" and results["big"]["times"] == []
    assert results["small"]["status"] == "ok" and len(results["small"]["times"]) == 5
    assert bench.is_out_of_memory(RuntimeError("DefaultCPUAllocator: can't allocate memory"))
    assert not bench.is_out_of_memory(RuntimeError("shape mismatch"))


def test_cpu_peak_rss_is_measured_in_a_subprocess():
    config = load_bench_config(TINY)
    memory = measure_cpu_peak_rss(config, "ours-fused", 32, "float32", "training", "padded",
                                  threads=1)
    assert memory["status"] == "ok", memory.get("error")
    assert memory["kind"] == "cpu_rss"
    assert memory["baseline_mib"] > 0 and memory["peak_mib"] > 0
    assert memory["run_mib"] >= 0 and math.isfinite(memory["run_mib"])


def test_cli_writes_results_into_out(tmp_path, capsys):
    threads = torch.get_num_threads()
    status = bench_main(["--device", "cpu", "--config", str(TINY), "--out", str(tmp_path),
                         "--threads", "1", "--repeats", "5",
                         "--contenders", "ours-fused,torch-nobias", *one_cell()])
    assert status == 0
    assert torch.get_num_threads() == threads
    (json_path,) = tmp_path.glob("cpu-tiny-*.json")
    assert json_path.with_suffix(".md").is_file()
    report = json.loads(json_path.read_text())
    assert report["environment"]["command"].startswith("attention-bench --device cpu")
    assert {c["contender"] for c in report["cells"]} == {"ours-fused", "torch-nobias"}
    assert "median ms" in capsys.readouterr().out


def test_cli_errors_exit_2_with_the_key(tmp_path, capsys):
    assert bench_main(["--device", "cpu", "--config", str(TINY), "repeats=3"]) == 2
    assert "repeats" in capsys.readouterr().err
    assert bench_main(["--device", "cpu", "--config", str(TINY), "--contenders", "mine"]) == 2
    assert "contenders" in capsys.readouterr().err
    if not torch.cuda.is_available():
        assert bench_main(["--device", "cuda", "--config", str(TINY)]) == 2
        assert "--device: cuda requested" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []
