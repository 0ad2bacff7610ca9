"""benchmarks/ctranslate2_agreement.py on a real (barely trained) checkpoint and a corpus the
test writes: the float32 conversion picks ours' greedy tokens, every engine and beam is
scored, the alternated rounds give a positive ratio per peer and round, and both files are
written without this machine's paths."""

import pytest
import torch

from .scripts import load_script, positive_ratio, read_results

pytest.importorskip("ctranslate2")
agreement = load_script("ctranslate2_agreement")


def test_every_engine_is_scored_and_timed_against_ours(translation_run, tiny_corpus, tmp_path):
    source, reference = tiny_corpus
    out = tmp_path / "agreement"
    threads = torch.get_num_threads()
    try:
        agreement.main(["--checkpoint", str(translation_run / "checkpoint_best.pt"),
                        "--source", str(source), "--reference", str(reference),
                        "--beam-sizes", "1", "2", "--rounds", "2", "--threads", "1",
                        "--out", str(out)])
    finally:
        torch.set_num_threads(threads)
    report, markdown = read_results(out, "ctranslate2_agreement")
    rows = {(r["engine"], r["weights"], r["beam_size"]): r for r in report["results"]}
    assert set(rows) == {(engine, weights, beam) for beam in (1, 2) for engine, weights in
                         (("ours", "float32"), ("ctranslate2", "float32"),
                          ("ctranslate2", "int8"))}
    assert rows["ctranslate2", "float32", 1]["identical_to_ours"] == 1.0
    assert report["sentences"] == 5 and report["threads"] == 1
    assert report["checkpoint"] == f"{translation_run.name}/checkpoint_best.pt"
    assert [cell["beam_size"] for cell in report["speed"]] == [1, 2]
    for cell in report["speed"]:
        assert set(cell["ratios"]) == {"ctranslate2 float32", "ctranslate2 int8"}
        assert all(positive_ratio(ratio, rounds=2) for ratio in cell["ratios"].values())
    assert report["environment"]["packages"]["ctranslate2"]
    assert "| ctranslate2 | int8 | 2 |" in markdown and "| 2 | ctranslate2 int8 |" in markdown
    # Without --source, the checkpoint's own test split; --rounds 0: scored, not timed.
    report = agreement.main(["--checkpoint", str(translation_run / "checkpoint_best.pt"),
                             "--beam-sizes", "1", "--rounds", "0", "--out", str(out)])
    assert "test split" in report["test_set"] and report["speed"] == []
    assert {row["engine"] for row in report["results"]} == {"ours", "ctranslate2"}


@pytest.mark.parametrize(("bad", "message"), [
    (["--beam-sizes", "0"], "argument --beam-sizes: expected a positive int, got 0"),
    (["--rounds", "-1"], "argument --rounds: expected an int ≥ 0, got -1"),
    (["--source", "s"], "--source, --reference: expected both or neither, got one")])
def test_bad_arguments_are_refused_by_name(bad, message, capsys):
    with pytest.raises(SystemExit):
        agreement.parse_args(["--checkpoint", "c.pt", *bad])
    assert message in capsys.readouterr().err
