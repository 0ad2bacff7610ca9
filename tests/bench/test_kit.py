"""The benchmarks' kit (attention.bench.kit): the clock, alternated rounds (rotation, medians,
per-round ratios, the check before timing), the run's record, the atomic writer of both
files, the child process killed with its whole group, and the argument checks."""

import argparse
import json
import os
import sys
import time
from pathlib import Path

import pytest
import torch

from attention.bench import kit, rounds
from attention.common import files

ROOT = Path(__file__).resolve().parents[2]


def test_the_clock_times_a_call_and_returns_its_value():
    seconds, value = kit.timed_call(lambda: time.sleep(0.02) or 7)
    assert value == 7 and 0.015 < seconds < 1
    assert 0.015 < kit.timed(lambda: time.sleep(0.02), torch.device("cpu")) < 1


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_the_clock_waits_for_queued_cuda_work():
    x = torch.randn(2048, 2048, device="cuda")
    seconds, out = kit.timed_call(lambda: x @ x, "cuda")
    assert seconds > 0 and out.shape == (2048, 2048)


class FakeClock:
    """Stands in for the clock: each call runs the contender and takes the next time."""

    def __init__(self, times):
        self.times = list(times)

    def __call__(self, fn, device):
        return self.times.pop(0), fn()


def test_rounds_rotate_the_order_and_report_medians_and_per_round_ratios(monkeypatch):
    ran = []
    contenders = {name: (lambda name=name: ran.append(name) or name) for name in "abc"}
    # Per round, in its rotated order: a b c / b c a / c a b / a b c
    times = [1, 2, 4, 2, 4, 1, 4, 1, 2, 3, 2, 4]
    monkeypatch.setattr(rounds, "timed_call", FakeClock(times))
    checked = []
    result = kit.alternate(contenders, 4, warmup=2, pairs={"c/a": ("c", "a")},
                           check=lambda outputs: checked.append(dict(outputs)) or {"ok": 1})
    assert ran[:6] == ["a", "a", "b", "b", "c", "c"]  # the warm-up, before any timed run
    assert checked == [{"a": "a", "b": "b", "c": "c"}]
    assert result["order"] == [list("abc"), list("bca"), list("cab"), list("abc")]
    assert ran[6:] == [name for order in result["order"] for name in order]
    assert result["contenders"]["a"]["times_ms"] == [1000, 1000, 1000, 3000]
    assert result["contenders"]["a"]["median_ms"] == 1000
    assert result["contenders"]["c"]["min_ms"] == 4000 == result["contenders"]["c"]["max_ms"]
    assert result["ratios"]["c/a"] == {"of": ["c", "a"], "median": 4.0,
                                       "per_round": [4.0, 4.0, 4.0, 4 / 3]}
    assert result["check"] == {"ok": 1} and result["warmup"] == 2 and result["rounds"] == 4


def test_rounds_log_each_round_and_the_medians_under_their_label(monkeypatch):
    monkeypatch.setattr(rounds, "timed_call", FakeClock([0.002, 0.001, 0.001, 0.003]))
    lines = []
    kit.alternate({"a": int, "b": int}, 2, pairs={"a/b": ("a", "b")}, log=lines.append,
                  label="beam 4")
    assert lines == ["beam 4, round 1: a 2 ms, b 1 ms", "beam 4, round 2: a 3 ms, b 1 ms",
                     "beam 4, medians a 2.5 ms, b 1 ms; a/b 2.50×"]


def test_a_failed_check_stops_before_anything_is_timed(monkeypatch):
    monkeypatch.setattr(rounds, "timed_call", lambda fn, device: pytest.fail("timed"))

    def differ(outputs):
        raise RuntimeError("outputs differ")

    with pytest.raises(RuntimeError, match="outputs differ"):
        kit.alternate({"a": lambda: 1, "b": lambda: 2}, 3, check=differ)


def test_self_timed_contenders_report_their_own_seconds():
    measures = {"a": iter([2.0, 4.0, 6.0]), "b": iter([1.0, 1.0, 2.0])}
    result = kit.alternate({name: lambda n=name: next(measures[n]) for name in "ab"}, 3,
                           warmup=0, self_timed=True, pairs={"a/b": ("a", "b")})
    assert result["contenders"]["a"]["times_ms"] == [2000, 4000, 6000]
    assert result["ratios"]["a/b"]["per_round"] == [2.0, 4.0, 3.0]
    with pytest.raises(ValueError, match="a: expected its run's seconds"):
        kit.alternate({"a": lambda: "fast"}, 1, warmup=0, self_timed=True)


def test_calls_per_run_divide_the_time():
    calls = []
    result = kit.alternate({"a": lambda: calls.append(1)}, 2, warmup=0, calls=5)
    assert len(calls) == 10 and result["calls"] == 5
    assert all(t >= 0 for t in result["contenders"]["a"]["times_ms"])


@pytest.mark.parametrize(("call", "message"), [
    (lambda: kit.alternate({"a": int}, 0), "rounds: expected a positive int, got 0"),
    (lambda: kit.alternate({}, 1), "contenders: expected at least one"),
    (lambda: kit.alternate({"a": int}, 1, calls=0), "calls: expected a positive int, got 0"),
    (lambda: kit.alternate({"a": int}, 1, pairs={"x": ("a", "b")}),
     r"pairs\['x'\]: expected contenders of \['a'\], got 'b'"),
    (lambda: kit.alternate({"a": int}, 1, warmup=0, check=dict),
     "warmup: expected at least 1 with a check"),
])
def test_bad_rounds_are_refused_by_name(call, message):
    with pytest.raises(ValueError, match=message):
        call()


def test_one_round_has_no_spread():
    summary = kit.timing_summary([0.5])
    assert summary["median_ms"] == 500 and summary["iqr_ms"] == 0


def test_the_command_line_names_paths_without_this_machines_folders(tmp_path):
    script = ROOT / "benchmarks" / "any.py"
    command = kit.command_line(script, ["--out", str(ROOT / "benchmarks" / "results" / "x"),
                                        f"--checkpoint={tmp_path / 'run' / 'best.pt'}",
                                        "--setting", "two words=1:2:1", "relative/path"])
    assert command == ("python benchmarks/any.py --out benchmarks/results/x "
                       "--checkpoint=run/best.pt --setting 'two words=1:2:1' relative/path")


def test_the_environment_records_the_commit_the_command_and_packages():
    env = kit.environment("cpu", "python benchmarks/x.py", packages=["torch", "no-such-dist"])
    assert {"git_commit", "git_dirty", "command", "date", "torch", "threads"} <= set(env)
    assert env["command"] == "python benchmarks/x.py"
    assert env["packages"] == {"torch": kit.package_version("torch"), "no-such-dist": None}


def report(**extra):
    return {"environment": kit.environment("cpu", "python benchmarks/x.py --rounds 2"),
            "figure": 1.5, **extra}


def test_the_writer_writes_both_files_with_the_environment_and_the_command(tmp_path):
    paths = kit.write_report(tmp_path / "sub" / "x-2026.json", report(name="é"), title="T",
                             body=kit.markdown_table(["a", "b"], [["x", "1.0"]]))
    assert [p.name for p in paths] == ["x-2026.json", "x-2026.md"]
    assert json.loads(paths[0].read_text(encoding="utf-8"))["name"] == "é"
    markdown = paths[1].read_text(encoding="utf-8")
    assert markdown.startswith("# T\n\n`python benchmarks/x.py --rounds 2`\n\n| a | b |\n"
                               "| --- | ---: |\n| x | 1.0 |\n")
    assert "## Environment" in markdown and "- git_commit: " in markdown


def test_the_writer_leaves_the_old_files_whole_when_a_write_fails(tmp_path, monkeypatch):
    kit.write_report(tmp_path / "x", report(), title="old")
    before = (tmp_path / "x.json").read_text()

    def fails(source, target):
        raise OSError("disk full")

    monkeypatch.setattr(files.os, "replace", fails)
    with pytest.raises(OSError, match="disk full"):
        kit.write_report(tmp_path / "x", report(figure=2.5), title="new")
    assert (tmp_path / "x.json").read_text() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.json", "x.md"]  # no temporaries


def test_publish_records_the_run_writes_both_files_and_says_where(tmp_path, capsys):
    script = ROOT / "benchmarks" / "any.py"
    report = kit.publish(tmp_path / "r", script, ["--rounds", "2"], title="T", figure=3,
                         markdown=lambda report: [f"figure {report['figure']}"])
    assert report["figure"] == 3
    assert report["environment"]["command"] == "python benchmarks/any.py --rounds 2"
    assert json.loads((tmp_path / "r.json").read_text()) == report
    assert "\nfigure 3\n" in (tmp_path / "r.md").read_text()
    assert capsys.readouterr().err == f"wrote {tmp_path / 'r.json'} and r.md\n"


@pytest.mark.parametrize("bad", [{}, {"environment": {"command": "c"}}])
def test_the_writer_refuses_a_report_without_its_environment(tmp_path, bad):
    with pytest.raises(ValueError, match=r"report\['environment'\]: expected the record"):
        kit.write_report(tmp_path / "x", bad, title="T")
    assert not list(tmp_path.iterdir())


def test_a_table_refuses_rows_of_the_wrong_width():
    with pytest.raises(ValueError, match="rows: expected 2 cells a row, got 1"):
        kit.markdown_table(["a", "b"], [["x"]])


def alive(pid):
    """Whether ``pid`` runs (a zombie waiting for its reaper counts as gone)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ")[1][0] != "Z"
    except (FileNotFoundError, IndexError):
        return False


def wait_gone(pid, seconds=5.0):
    deadline = time.monotonic() + seconds
    while alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    return not alive(pid)


# A child that starts a grandchild in its own process group and waits for it.
FAMILY = ("import subprocess, sys, time; "
          "worker = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']); "
          "print(worker.pid, flush=True); {then}")


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="reads /proc")
def test_a_timeout_kills_the_whole_process_group(tmp_path):
    log = tmp_path / "log.txt"
    command = [sys.executable, "-c", FAMILY.format(then="time.sleep(60)")]
    done = kit.run_process(command, timeout=1.5, log=log)
    assert done.timed_out and done.returncode is None and done.seconds < 30
    worker = int(log.read_text().split()[0])
    assert wait_gone(worker)


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="reads /proc")
def test_what_a_finished_child_left_running_is_killed_and_its_output_captured():
    command = [sys.executable, "-c", FAMILY.format(then="print('done'); sys.exit(3)")]
    done = kit.run_process(command, timeout=30, env={**os.environ, "X": "1"})
    assert done.returncode == 3 and not done.timed_out
    worker, said = done.stdout.split()
    assert said == "done" and wait_gone(int(worker))


def test_a_bad_timeout_is_refused_by_name():
    with pytest.raises(ValueError, match="timeout: expected seconds > 0 or None, got 0"):
        kit.run_process(["true"], timeout=0)


def test_argument_checks_name_the_flag_and_show_what_came(capsys):
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=kit.positive_int)
    parser.add_argument("--padding", type=kit.fraction)
    assert parser.parse_args(["--rounds", "3", "--padding", "0.25"]).rounds == 3
    for bad, message in ((["--rounds", "0"], "argument --rounds: expected a positive int, got 0"),
                         (["--rounds", "x"], "expected a positive int, got 'x'"),
                         (["--padding", "1.5"], "expected a fraction in [0, 1), got 1.5")):
        with pytest.raises(SystemExit):
            parser.parse_args(bad)
        assert message in capsys.readouterr().err
    with pytest.raises(ValueError, match="rounds: expected a positive int, got True"):
        kit.check_positive("rounds", True)


def test_junit_outcomes_are_read_with_their_first_message_line(tmp_path):
    xml = tmp_path / "tests.xml"
    xml.write_text('<testsuites><testsuite name="pytest">'
                   '<testcase classname="t.TestA" name="ok"/>'
                   '<testcase classname="t.TestA" name="bad">'
                   '<failure message="&#10;E boom&#10;more"/>'
                   '</testcase><testcase classname="t" name="err"><error>trace</error></testcase>'
                   '<testcase classname="t" name="skip"><skipped message="later"/></testcase>'
                   '</testsuite></testsuites>')
    cases = kit.read_junit(xml)
    assert [(c.name, c.status, c.message, c.failing) for c in cases] == [
        ("ok", "passed", "", False), ("bad", "failed", "E boom", True),
        ("err", "error", "trace", True), ("skip", "skipped", "later", False)]
    assert kit.count_statuses(cases) == {"passed": 1, "failed": 1, "skipped": 1, "errors": 1}
    assert kit.read_junit(tmp_path / "none.xml") is None
    (tmp_path / "cut.xml").write_text("<testsuites><testsu")
    assert kit.read_junit(tmp_path / "cut.xml") is None


def test_a_benchmark_parser_has_the_shared_flags_asked_for(capsys):
    parser = kit.benchmark_parser("What it measures,\non two lines.\n\nMore.", rounds=7,
                                  out="results/x")
    args = parser.parse_args([])
    assert (args.rounds, args.out) == (7, Path("results/x"))
    assert parser.description == "What it measures, on two lines."
    with pytest.raises(SystemExit):
        parser.parse_args(["--rounds", "0"])
    assert "argument --rounds: expected a positive int, got 0" in capsys.readouterr().err
    assert not hasattr(kit.benchmark_parser("Doc.").parse_args([]), "rounds")
