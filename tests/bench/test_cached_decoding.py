"""benchmarks/cached_decoding.py: both decoders do the same work and agree before they are
timed, and the results are written as JSON and Markdown."""

import pytest
import torch

from .scripts import load_script, positive_ratio, read_results

cached_decoding = load_script("cached_decoding")

TINY = ["--d-model", "16", "--n-heads", "2", "--n-layers", "2", "--d-ff", "32", "--batch", "2",
        "--memory", "5", "--new-tokens", "3", "--rounds", "2"]


def test_writes_both_reports_with_one_row_per_prefix(tmp_path):
    out = tmp_path / "cached"
    cached_decoding.main([*TINY, "--prefix", "4", "9", "--out", str(out)])
    report, markdown = read_results(out, "cached_decoding")
    assert [row["prefix"] for row in report["results"]] == [4, 9]
    for row in report["results"]:
        assert row["max_abs_difference"] <= 1e-5
        assert positive_ratio(row["timing"]["ratios"]["speedup"], rounds=2)
        assert row["median_speedup"] == row["timing"]["ratios"]["speedup"]["median"]
        assert set(row["timing"]["contenders"]) == {"torch.nn", "ours"}
        assert row["torch_tokens_per_s"] > 0 and row["ours_tokens_per_s"] > 0
    assert "--prefix 4 9" in report["environment"]["command"]
    assert "| 9 |" in markdown


def test_the_two_decoders_produce_the_same_outputs():
    args = cached_decoding.parse_args([*TINY, "--prefix", "6"])
    theirs, ours = cached_decoding.build_decoders(args)
    tgt, memory = torch.randn(2, 9, 16), torch.randn(2, 5, 16)
    torch.testing.assert_close(cached_decoding.cached(ours, tgt, memory, 6),
                               cached_decoding.rerun_prefix(theirs, tgt, memory, 6),
                               atol=1e-5, rtol=0)


@pytest.mark.parametrize("bad", [["--rounds", "0"], ["--prefix", "0"]])
def test_bad_arguments_are_refused_by_name(bad, capsys):
    with pytest.raises(SystemExit):
        cached_decoding.parse_args(bad)
    assert f"argument {bad[0]}: expected a positive int, got 0" in capsys.readouterr().err
