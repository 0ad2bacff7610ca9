"""`make gpu-check` (benchmarks/gpu_check.py): one line and nothing run without CUDA; with
``--dry-run-cpu`` the whole orchestration (four child processes, their budgets, the eight
result files and the summary) on the CPU at tiny sizes, so that only CUDA itself is new to
it on the GPU machine."""

import json
import shutil
import signal
import subprocess
import sys
import time
import xml.etree.ElementTree as ElementTree

import pytest
import torch

from attention.bench import gpu_check as check

from .scripts import ROOT, load_script

gpu_check = load_script("gpu_check")  # the script: arguments, the no-CUDA line

no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the line without CUDA")


@no_cuda
def test_without_cuda_it_says_so_in_one_line_and_runs_nothing(tmp_path, capsys):
    out = tmp_path / "results"
    assert gpu_check.main([str(out)]) == 0
    assert capsys.readouterr().out == \
        f"gpu-check: no CUDA device here (torch {torch.__version__}): nothing run\n"
    assert not out.exists()


def test_without_torch_it_says_so_in_one_line(monkeypatch):
    monkeypatch.setitem(sys.modules, "torch", None)  # import torch raises ImportError
    line = gpu_check.no_cuda_line()
    assert line.startswith("gpu-check: no CUDA device here (torch is not installed for ")
    assert "\n" not in line


@no_cuda
@pytest.mark.skipif(shutil.which("make") is None, reason="needs make")
def test_make_gpu_check_runs_the_script_with_the_python_it_is_given(tmp_path):
    done = subprocess.run(["make", "--no-print-directory", "-s", "gpu-check",
                           f"OUT={tmp_path / 'results'}", f"PYTHON={sys.executable}"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[-1] == \
        f"gpu-check: no CUDA device here (torch {torch.__version__}): nothing run"


def test_the_dry_run_on_the_cpu_runs_every_part_and_writes_eight_plain_files(tmp_path, capsys):
    out = tmp_path / "results"
    assert gpu_check.main([str(out), "--dry-run-cpu"]) == 0
    printed = capsys.readouterr().out
    files = sorted(path.name for path in out.iterdir())
    assert files == sorted(check.FILES)  # all eight, flat, and nothing else
    assert all(path.is_file() and path.stat().st_size < 16 * 2**20 for path in out.iterdir())
    summary = (out / "summary.md").read_text()
    assert printed.endswith(summary)
    for name in check.PARTS:
        assert f"| {name} | ok |" in summary
    # tests: exactly the device-parametrized variants, of the dry run's device
    cases = list(ElementTree.parse(out / "tests.xml").getroot().iter("testcase"))
    assert cases and all("cpu" in case.get("name") for case in cases)
    assert f"{len(cases)} passed, 0 failed" in summary
    # train: its metrics and results
    records = [json.loads(line) for line in (out / "train-metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["kind"] == "train"] == [1, 2]
    assert "bleu" in json.loads((out / "train-results.json").read_text())
    # the benchmarks: every contender measured or its failure recorded, and both reports
    for name, contenders in (("base", check.BASE_CONTENDERS),
                             ("long", check.LONG_CONTENDERS)):
        report = json.loads((out / f"bench-{name}.json").read_text())
        assert report["contenders"] == contenders and "stopped" not in report
        assert {c["contender"] for c in report["cells"]} == set(contenders)
        assert any(c["status"] == "ok" for c in report["cells"])
    assert (out / "bench.md").read_text().count("# Benchmark `tiny`") == 2
    # each benchmark's own table, with its cells' times and ratios to torch.nn
    assert summary.count("matmul peak:") == 2 and "| ours-sdpa-math |" in summary
    assert "| ours-fused | inference | dense |" in summary
    log = (out / "log.txt").read_text()
    assert all(f"===== {name}: ok" in log for name in check.PARTS)


def test_a_part_out_of_time_is_stopped_recorded_and_the_next_part_runs(tmp_path, monkeypatch,
                                                                       capsys):
    # 1 s: the dry run's long part takes about 2 s on the 2-core CPU (4 s before the local
    # attention and mask work of issue 28; a budget of 2 s then let it finish at times).
    monkeypatch.setitem(check.PARTS, "long", check.Part("long", 1, 1, "long, cut short"))
    out = tmp_path / "results"
    assert gpu_check.main([str(out), "--dry-run-cpu", "--parts", "long,tests"]) == 1
    summary = (out / "summary.md").read_text()
    assert "| long | out of time |" in summary and "| tests | ok |" in summary
    report = out / "bench-long.json"
    if report.exists():  # written unless the budget ran out before the first cell
        assert json.loads(report.read_text())["stopped"].startswith("out of time")
    assert not (out / "bench-base.json").exists()


@pytest.fixture
def alarm_handler():
    """The SIGALRM handler and timer as they were, back after the test."""
    previous = signal.getsignal(signal.SIGALRM)
    yield
    signal.setitimer(signal.ITIMER_REAL, 0)
    signal.signal(signal.SIGALRM, previous)


def test_a_spent_budget_interrupts_again_until_the_part_stops(monkeypatch, alarm_handler):
    monkeypatch.setattr(check, "RETRY_S", 0.05)
    budget = check.Budget(0.05)
    swallowed = 0
    budget.start()
    deadline = time.monotonic() + 2
    with pytest.raises(check.OutOfTime):
        while time.monotonic() < deadline:
            try:
                time.sleep(0.01)
            except check.OutOfTime:
                if swallowed:
                    raise
                swallowed += 1  # as a finalizer's exception: printed, and the run goes on
    budget.stop()
    time.sleep(0.15)  # stopped: no interrupt comes any more
    assert swallowed == 1 and budget.spent


def test_a_benchmark_that_ran_past_its_budget_says_it_stopped(tmp_path, monkeypatch,
                                                              alarm_handler):
    """Even when no interrupt got through: the cells ran on, and the report says so."""
    from attention.bench.runner import Runner

    def swallowing_run(self):
        deadline = time.monotonic() + 0.3
        while time.monotonic() < deadline:
            try:
                time.sleep(0.01)
            except check.OutOfTime:
                pass
        return self.report

    monkeypatch.setattr(Runner, "run", swallowing_run)
    budget = check.Budget(0.05)
    budget.start()
    assert check.part_bench("long", tmp_path, True, budget) == 1
    report = json.loads((tmp_path / "bench-long.json").read_text())
    assert report["stopped"].startswith("out of time")


def test_the_loss_comparison_reads_the_same_steps_of_both_runs():
    gpu = [{"kind": "train", "step": s, "loss": 2.0 + s / 100} for s in (10, 20, 100, 200)]
    cpu = [{"kind": "train", "step": s, "loss": 2.0} for s in (10, 20, 100, 200, 300)]
    gpu.append({"kind": "val", "step": 200, "loss": 1.1})
    cpu.append({"kind": "val", "step": 200, "loss": 1.0})
    lines = check.compare_losses(gpu, cpu, {"bleu": 99.0, "exact_match": 0.99})
    assert lines[0] == ("train loss GPU / CPU reference: step 10 2.100 / 2.000, step 100 "
                        "3.000 / 2.000, step 200 4.000 / 2.000; largest gap over the last half "
                        "of the steps 100.0%")
    assert lines[1].startswith("val loss GPU / CPU reference: step 200 1.100 / 1.000")
    assert lines[2] == "CPU reference test: BLEU 99.0, exact match 0.99"


def test_the_committed_cpu_reference_is_the_gpu_runs_config_on_the_cpu():
    """The reference's config.yaml is the training part's config and overrides, except for
    the device, compilation, the time guard and the run's name and folder."""
    import yaml

    from attention.translation.config import Config, load_config

    saved = yaml.safe_load((check.REFERENCE / "config.yaml").read_text())
    expected = load_config(ROOT / check.TRAIN_CONFIG, check.TRAIN_OVERRIDES).to_dict()
    defaults = Config().to_dict()  # keys added since the run was made are at their default
    for section in ("model", "data", "eval"):
        assert {**defaults[section], **saved[section]} == expected[section]
    saved_train = {**defaults["train"], **saved["train"]}
    differing = {key for key in expected["train"] if saved_train[key] != expected["train"][key]}
    assert differing <= {"device", "compile", "max_minutes", "run_dir", "precision"}
    records = [json.loads(line) for line in
               (check.REFERENCE / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["kind"] == "train"] == list(range(10, 801, 10))


def test_unknown_parts_are_refused_by_name(capsys):
    with pytest.raises(SystemExit):
        gpu_check.main(["--dry-run-cpu", "--parts", "tests,everything"])
    assert "--parts: expected some of tests,train,base,long, got 'tests,everything'" in \
        capsys.readouterr().err
