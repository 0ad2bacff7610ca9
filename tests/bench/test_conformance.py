"""benchmarks/conformance.py (and its pytest plugin, conformance_swap.py) on a stand-in for
PyTorch's test files that the test writes: one pytest child per mode, outcomes read from
junit XML, and a test that passes on torch.nn's classes but fails once ours are swapped in
is reported as a regression, while one that fails on both is torch.nn's own failure."""

import pytest

from .scripts import load_script, read_results

conformance = load_script("conformance")

# Without importing torch (so that the baseline child starts in a second): torch.nn, when
# loaded, must hold torch's own MultiheadAttention; the swap run loads it with ours.
STAND_IN = '''
import sys

import pytest


def test_torch_nn_holds_torchs_class():
    nn = sys.modules.get("torch.nn")
    assert nn is None or nn.MultiheadAttention.__module__.startswith("torch."), "swapped"


def test_passes():
    pass


def test_fails_everywhere():
    assert 1 == 2, "always"


@pytest.mark.skip(reason="not here")
def test_skipped():
    pass
'''


@pytest.fixture
def tests_folder(tmp_path):
    folder = tmp_path / "pytorch-test"
    (folder / "nn").mkdir(parents=True)
    (folder / "test_transformers.py").write_text(STAND_IN)
    (folder / "nn" / "test_multihead_attention.py").write_text("def test_one():\n    pass\n")
    return folder


def test_a_swap_regression_and_a_baseline_failure_are_told_apart(tests_folder, tmp_path,
                                                                 monkeypatch):
    # One of the two files: each pytest child that swaps in our classes imports torch.
    monkeypatch.setattr(conformance, "TEST_FILES", ("test_transformers.py",))
    out = tmp_path / "out"
    report = conformance.main(["--tests", str(tests_folder), "--ref", "v0-test", "--out",
                               str(out), "--timeout", "120"])
    written, markdown = read_results(out / "results", "conformance")
    assert written == report and report["pytorch_ref"] == "v0-test"
    assert [(run["mode"], run["counts"]) for run in report["runs"]] == [
        ("baseline", {"passed": 2, "failed": 1, "skipped": 1, "errors": 0}),
        ("swap", {"passed": 1, "failed": 2, "skipped": 1, "errors": 0})]
    assert not any(run["timed_out"] for run in report["runs"])
    assert "MultiheadAttention" in report["swapped"]
    [regression] = report["regressions"]["test_transformers.py"]
    assert regression["test"].endswith("::test_torch_nn_holds_torchs_class")
    assert regression["message"].startswith("AssertionError: swapped")
    [failure] = report["baseline_failures"]["test_transformers.py"]
    assert failure["test"].endswith("::test_fails_everywhere")
    assert "## Pass on torch.nn's classes, fail on ours: 1" in markdown
    assert (out / "runs" / "test_transformers.swap.xml").is_file()


def test_a_folder_without_the_test_files_is_refused_by_name(tmp_path, capsys):
    with pytest.raises(SystemExit):
        conformance.parse_args(["--tests", str(tmp_path), "--ref", "x"])
    error = capsys.readouterr().err
    assert "argument --tests: expected a folder holding test_transformers.py and " in error
    assert "missing: test_transformers.py, nn/test_multihead_attention.py" in error
