"""benchmarks/int8_quality.py on a real (barely trained) checkpoint and a corpus the test
writes: both models translate every sentence, each beam size is timed in alternated rounds,
and both files are written without this machine's paths."""

import pytest
import torch

from .scripts import load_script, positive_ratio, read_results

int8_quality = load_script("int8_quality")


def test_both_models_are_scored_and_timed_at_each_beam(translation_run, tiny_corpus, tmp_path):
    source, reference = tiny_corpus
    out = tmp_path / "int8"
    threads = torch.get_num_threads()
    try:
        int8_quality.main(["--checkpoint", str(translation_run / "checkpoint_best.pt"),
                           "--source", str(source), "--reference", str(reference),
                           "--limit", "4", "--rounds", "2", "--threads", "1", "--beams", "1",
                           "2", "--out", str(out)])
    finally:
        torch.set_num_threads(threads)
    report, markdown = read_results(out, "int8_quality")
    assert report["sentences"] == 4 and report["threads"] == 1
    assert [row["beam_size"] for row in report["results"]] == [1, 2]
    for row in report["results"]:
        assert positive_ratio(row["timing"]["ratios"]["speedup"], rounds=2)
        assert row["speedup"] == row["timing"]["ratios"]["speedup"]["median"]
        assert [r["speedup"] for r in row["rounds"]] == \
            row["timing"]["ratios"]["speedup"]["per_round"]
        for side in ("fp32", "int8"):
            assert 0 <= row[side]["bleu"] <= 100 and row[side]["seconds"] > 0
        assert 0 <= row["identical_translations"] <= 1
    assert report["checkpoint"] == f"{translation_run.name}/checkpoint_best.pt"
    assert str(tmp_path) not in report["environment"]["command"]
    assert "| 2 |" in markdown and "int8" in markdown


@pytest.mark.parametrize("bad", [["--rounds", "0"], ["--limit", "0"], ["--beams", "0"]])
def test_bad_arguments_are_refused_by_name(bad, capsys):
    with pytest.raises(SystemExit):
        int8_quality.parse_args(["--checkpoint", "c.pt", "--source", "s", "--reference", "r",
                                 *bad])
    assert f"argument {bad[0]}: expected a positive int, got 0" in capsys.readouterr().err
