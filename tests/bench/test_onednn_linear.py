"""benchmarks/onednn_linear.py at tiny size: F.linear and the oneDNN-packed weight give the
same products, and the per-call times, ratios and both files are written."""

import pytest
import torch

from attention import features

from .scripts import load_script, positive_ratio, read_results

onednn_linear = load_script("onednn_linear")


@pytest.mark.skipif(not features.ONEDNN_LINEAR, reason="this torch has no oneDNN linear ops")
def test_every_shape_and_row_count_is_compared_and_written(tmp_path, monkeypatch):
    monkeypatch.setattr(onednn_linear, "SHAPES", [(24, 16), (16, 24)])
    threads = torch.get_num_threads()
    try:
        assert onednn_linear.main(["--rows", "1", "3", "--rounds", "2", "--calls", "3",
                                   "--out", str(tmp_path / "linear")]) == 0
    finally:
        torch.set_num_threads(threads)
    report, markdown = read_results(tmp_path / "linear", "onednn_linear")
    assert [(c["weight"], c["rows"]) for c in report["cells"]] == [
        ([24, 16], 1), ([24, 16], 3), ([16, 24], 1), ([16, 24], 3)]
    for cell in report["cells"]:
        assert cell["check"]["max_abs_difference"] < 1e-4 and cell["calls"] == 3
        assert positive_ratio(cell["ratios"]["ratio"], rounds=2)
    assert "| 16×24 | 3 |" in markdown


def test_a_torch_without_onednn_linear_is_said_in_one_line(monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(onednn_linear.features, "ONEDNN_LINEAR", False)
    assert onednn_linear.main(["--out", str(tmp_path / "x")]) == 1
    assert capsys.readouterr().err == "this torch has no oneDNN linear ops: nothing to compare\n"
    assert not list(tmp_path.iterdir())


def test_bad_arguments_are_refused_by_name(capsys):
    with pytest.raises(SystemExit):
        onednn_linear.main(["--calls", "0"])
    assert "argument --calls: expected a positive int, got 0" in capsys.readouterr().err
