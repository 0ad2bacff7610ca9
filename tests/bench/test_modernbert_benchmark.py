"""benchmarks/modernbert.py at tiny size: ours and transformers agree before they are timed,
the padded batch has the padding asked for, and both reports are written."""

import pytest

from .scripts import load_script, positive_ratio, read_results

pytest.importorskip("transformers")
modernbert = load_script("modernbert")

TINY = ["--d-model", "32", "--n-heads", "4", "--n-layers", "3", "--d-ff", "48", "--window",
        "4", "--vocab", "50", "--rounds", "2"]


def test_writes_both_reports_with_one_row_per_input(tmp_path):
    modernbert.main([*TINY, "--lengths", "16", "40", "--batch", "4", "--batch-length", "24",
                     "--out", str(tmp_path), "--tag=-tiny"])
    [json_file] = tmp_path.glob("modernbert-cpu-*-tiny.json")
    report, markdown = read_results(json_file.with_suffix(""), "modernbert")
    assert [row["case"] for row in report["rows"]] == ["1 x 16", "1 x 40", "4 x 24, padded"]
    for row in report["rows"]:
        assert row["check"]["max_abs_difference"] <= 1e-4
        assert positive_ratio(row["ratios"]["ratio"], rounds=2)
        assert [order[0] for order in row["order"]] == ["transformers", "ours"]  # rotated
    assert report["rows"][2]["padding"] == pytest.approx(0.25, abs=0.02)
    assert report["environment"]["packages"]["transformers"]
    assert "| 4 x 24, padded | 25% |" in markdown


@pytest.mark.parametrize(("batch", "length", "padding"), [(16, 512, 0.25), (5, 100, 0.4)])
def test_padded_lengths_pad_the_fraction_asked(batch, length, padding):
    lengths = modernbert.padded_lengths(batch, length, padding)
    assert max(lengths) == length and len(lengths) == batch
    assert 1 - sum(lengths) / (batch * length) == pytest.approx(padding, abs=0.01)


def test_bad_padding_is_refused_by_name(capsys):
    with pytest.raises(SystemExit):
        modernbert.main(["--padding", "1.5"])
    assert "argument --padding: expected a fraction in [0, 1), got 1.5" in capsys.readouterr().err
