"""benchmarks/fresh_clone.py: each command runs in a clone of its own of HEAD, and the result
records its wall time, exit status and summary (here with the commands stood in for, since
the real ones take minutes)."""

import json

import pytest

from attention.bench import kit

from .scripts import load_script, read_results

fresh_clone = load_script("fresh_clone")

CI_LOG = """....
1966 passed, 6 skipped in 328.92s (0:05:28)
make[1]: Leaving directory
==== 1 failed, 1965 passed, 6 skipped in 312.10s (0:05:12) ====
"""


def test_the_summary_is_pytests_last_lines_or_the_demos_scores(tmp_path):
    assert fresh_clone.summary("bash .ci/run", tmp_path, CI_LOG) == (
        "1966 passed, 6 skipped; 1 failed, 1965 passed, 6 skipped")
    assert fresh_clone.summary("make test", tmp_path, "no tests") == "no pytest summary in the log"
    assert fresh_clone.summary("make train", tmp_path, "") == "no results.json written"
    for version, exact in ((0, 0.5), (1, 0.998)):
        run = tmp_path / "runs" / "toy_translation" / f"version_{version}"
        run.mkdir(parents=True)
        (run / "results.json").write_text(json.dumps(
            {"exact_match": exact, "bleu": 99.351, "alignment_accuracy": 0.9637, "steps": 800}))
    assert fresh_clone.summary("make train", tmp_path, "") == (
        "exact match 99.80%, BLEU 99.35, alignment 96.37%, 800 steps")


def test_each_command_runs_in_a_fresh_clone_of_head(tmp_path, monkeypatch):
    seen = []

    def stand_in(command, *, cwd, timeout, log):
        seen.append((command, sorted(p.name for p in cwd.iterdir())))
        (cwd / "marker").write_text("a previous command's file")
        log.write_text("3 passed in 0.01s\n")
        return kit.Finished(list(command), 0, 1.25)

    monkeypatch.setattr(fresh_clone.kit, "run_process", stand_in)
    report = fresh_clone.main(["--commands", "make test", "bash .ci/run", "--out",
                               str(tmp_path / "fresh"), "--logs", str(tmp_path / "logs")])
    assert [command for command, _ in seen] == [["make", "test"], ["bash", ".ci/run"]]
    assert all("Makefile" in files and "marker" not in files for _, files in seen)
    assert report["runs"] == [
        {"command": "make test", "wall_seconds": 1.2, "returncode": 0, "summary": "3 passed"},
        {"command": "bash .ci/run", "wall_seconds": 1.2, "returncode": 0,
         "summary": "3 passed"}]
    written, markdown = read_results(tmp_path / "fresh", "fresh_clone")
    assert written["environment"]["git_commit"] and "| `make test` |" in markdown
    assert (tmp_path / "logs" / "fresh-clone-bash-ci-run.log").is_file()


def test_an_unknown_command_is_refused_by_name(capsys):
    with pytest.raises(SystemExit):
        fresh_clone.main(["--commands", "make everything"])
    assert "argument --commands: invalid choice: 'make everything'" in capsys.readouterr().err
