"""The command line: results written into --out, errors that exit 2 with the key, the CPU
thread default (the machine's, --threads overriding it), and a run from another directory."""

import json
import os

import torch

from attention.bench.cli import main as bench_main
from attention.bench.environment import git_commit

from .tiny import TINY, one_cell

TWO_CONTENDERS = ["--contenders", "ours-fused,torch-nobias"]


def read_report(out) -> dict:
    (json_path,) = out.glob("cpu-tiny-*.json")
    assert json_path.with_suffix(".md").is_file()
    return json.loads(json_path.read_text())


def test_cli_writes_results_into_out(tmp_path, capsys):
    threads = torch.get_num_threads()
    status = bench_main(["--device", "cpu", "--config", str(TINY), "--out", str(tmp_path),
                         "--threads", "1", "--repeats", "5", *TWO_CONTENDERS, *one_cell()])
    assert status == 0
    assert torch.get_num_threads() == threads
    report = read_report(tmp_path)
    assert report["environment"]["command"].startswith("attention-bench --device cpu")
    assert {c["contender"] for c in report["cells"]} == {"ours-fused", "torch-nobias"}
    assert "median ms" in capsys.readouterr().out


def test_cli_errors_exit_2_with_the_key(tmp_path, capsys):
    assert bench_main(["--device", "cpu", "--config", str(TINY), "repeats=3"]) == 2
    assert "repeats" in capsys.readouterr().err
    assert bench_main(["--device", "cpu", "--config", str(TINY), "--contenders", "mine"]) == 2
    assert "contenders" in capsys.readouterr().err
    assert bench_main(["--device", "cpu", "--config", str(TINY), "--contenders", "ours-window",
                       "window=null"]) == 2  # before any work: no matmul peak measured
    assert capsys.readouterr().err.startswith("error: window: the ours-window contender needs")
    if not torch.cuda.is_available():
        assert bench_main(["--device", "cuda", "--config", str(TINY)]) == 2
        assert "--device: cuda requested" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_cli_threads_default_to_the_machine_s_cpus(monkeypatch, tmp_path):
    # three CPUs available: not the old hard-coded 2, and not torch's own count here
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2}, raising=False)
    args = ["--device", "cpu", "--config", str(TINY), *TWO_CONTENDERS, *one_cell()]
    assert bench_main([*args, "--out", str(tmp_path / "default")]) == 0
    assert read_report(tmp_path / "default")["environment"]["threads"] == 3
    assert bench_main([*args, "--out", str(tmp_path / "one"), "--threads", "1"]) == 0
    assert read_report(tmp_path / "one")["environment"]["threads"] == 1


def test_cli_runs_from_another_directory(monkeypatch, tmp_path):
    commit = git_commit()[0]  # of the package's source, asked from here
    monkeypatch.chdir(tmp_path)  # not the clone: no configs/, no .git here
    status = bench_main(["--device", "cpu", "--config", str(TINY.resolve()), "--out",
                         "results", "--threads", "1", "--contenders", "torch-nobias",
                         *one_cell(), "cpu_peak_rss=true"])
    assert status == 0
    assert [p.name for p in tmp_path.iterdir()] == ["results"]
    report = read_report(tmp_path / "results")
    (cell,) = report["cells"]
    assert cell["memory"]["status"] == "ok" and cell["memory"]["peak_mib"] > 0
    # git is asked where the package's source is, not in the working directory
    assert report["environment"]["git_commit"] == commit
