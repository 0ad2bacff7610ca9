"""benchmarks/ddp_throughput.py at tiny size: a setting trains in a child process (configs/
tiny.yaml, toy data from its seed), its target tokens/s is read from the run's metrics, and
the ratio to the reference and both files are written."""

import pytest

from .scripts import ROOT, load_script, read_results

ddp_throughput = load_script("ddp_throughput")


def test_a_setting_is_trained_measured_and_written(tmp_path):
    out = tmp_path / "ddp.json"
    ddp_throughput.main(["--config", str(ROOT / "configs" / "tiny.yaml"), "--steps", "20",
                         "--rounds", "1", "--setting", "one process=1:1:1", "--out", str(out)])
    report, markdown = read_results(tmp_path / "ddp", "ddp_throughput")
    [row] = report["settings"]
    assert (row["setting"], row["processes"], row["threads"], row["grad_accum_steps"]) == \
        ("one process", 1, 1, 1)
    assert len(row["tokens_per_second"]) == 1 and row["median_tokens_per_second"] > 0
    assert row["median_ratio"] == 1.0  # the reference against itself
    assert report["config"] == "configs/tiny.yaml" and report["rounds"]["rounds"] == 1
    assert "'one process=1:1:1'" in report["environment"]["command"]
    assert "| one process | 1 × 1, 1 |" in markdown


@pytest.mark.parametrize(("bad", "message"), [
    (["--setting", "x=1:2"], "--setting: expected NAME=PROCESSES:THREADS:GRAD_ACCUM"),
    (["--rounds", "0"], "argument --rounds: expected a positive int, got 0")])
def test_bad_arguments_are_refused_by_name(bad, message, capsys):
    with pytest.raises(SystemExit):
        ddp_throughput.main(bad)
    assert message in capsys.readouterr().err
