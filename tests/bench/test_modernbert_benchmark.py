"""benchmarks/modernbert.py at tiny size: ours and transformers agree before they are timed,
the padded batch has the padding asked for, and both reports are written."""

import importlib.util
import json
import sys
from pathlib import Path

import pytest

pytest.importorskip("transformers")

ROOT = Path(__file__).resolve().parents[2]
SPEC = importlib.util.spec_from_file_location("benchmarks_modernbert",
                                              ROOT / "benchmarks" / "modernbert.py")
modernbert = importlib.util.module_from_spec(SPEC)
sys.modules[SPEC.name] = modernbert
SPEC.loader.exec_module(modernbert)

TINY = ["--d-model", "32", "--n-heads", "4", "--n-layers", "3", "--d-ff", "48", "--window",
        "4", "--vocab", "50", "--rounds", "2"]


def test_writes_both_reports_with_one_row_per_input(tmp_path):
    modernbert.main([*TINY, "--lengths", "16", "40", "--batch", "4", "--batch-length", "24",
                     "--out", str(tmp_path), "--tag=-tiny"])
    [json_file] = tmp_path.glob("modernbert-cpu-*-tiny.json")
    report = json.loads(json_file.read_text())
    assert [row["case"] for row in report["rows"]] == ["1 x 16", "1 x 40", "4 x 24, padded"]
    for row in report["rows"]:
        assert row["max_abs_difference"] <= 1e-4
        assert len(row["ratio"]["per_round"]) == 2 and row["ratio"]["median"] > 0
    assert report["rows"][2]["padding"] == pytest.approx(0.25, abs=0.02)
    assert report["environment"]["command"] and report["transformers"]
    assert "| 4 x 24, padded | 25% |" in json_file.with_suffix(".md").read_text()


@pytest.mark.parametrize(("batch", "length", "padding"), [(16, 512, 0.25), (5, 100, 0.4)])
def test_padded_lengths_pad_the_fraction_asked(batch, length, padding):
    lengths = modernbert.padded_lengths(batch, length, padding)
    assert max(lengths) == length and len(lengths) == batch
    assert 1 - sum(lengths) / (batch * length) == pytest.approx(padding, abs=0.01)


def test_bad_padding_is_refused_by_name(capsys):
    with pytest.raises(SystemExit):
        modernbert.main(["--padding", "1.5"])
    assert "--padding" in capsys.readouterr().err
