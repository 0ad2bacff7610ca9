"""benchmarks/recipe_effects.py on a real run of three steps (numbered checkpoints, toy data
regenerated from its seed): averaging and every beam × length penalty pair are scored, test
only where validation chose, and effects.json and effects.md are written."""

import pytest

from .scripts import load_script, read_results

recipe_effects = load_script("recipe_effects")


def test_averaging_and_search_are_scored_and_written(translation_run, tmp_path):
    assert recipe_effects.main([str(translation_run), "--out", str(tmp_path), "--average",
                                "1", "2", "--beams", "1", "2", "--length-penalties", "0.8",
                                "1.0", "--threads", "1"]) == 0
    report, markdown = read_results(tmp_path / "effects", "recipe_effects")
    assert report["numbered_steps"] == [1, 2, 3]
    assert [(row["checkpoints"], row["steps"]) for row in report["averaging"]] == [
        ("best", [3]), (1, [3]), (2, [2, 3])]
    assert report["search_model"] == "average of the last 2 checkpoints"
    assert [(row["beam_size"], row["length_penalty"]) for row in report["search"]] == [
        (1, 0.8), (1, 1.0), (2, 0.8), (2, 1.0)]
    for row in report["search"]:
        assert ("test" in row) == (row["length_penalty"] == 1.0 or row["chosen_on_val"])
        assert 0 <= row["val"]["bleu"] <= 100 and row["val"]["seconds"] >= 0
    assert sum(row["chosen_on_val"] for row in report["search"]) == 2  # one per beam
    assert "| last 2 | 2, 3 |" in markdown and "## Beam size and length penalty" in markdown


def test_a_run_without_numbered_checkpoints_is_refused(tmp_path):
    with pytest.raises(SystemExit, match="no numbered checkpoints"):
        recipe_effects.main([str(tmp_path), "--out", str(tmp_path / "out")])


def test_bad_arguments_are_refused_by_name(capsys):
    with pytest.raises(SystemExit):
        recipe_effects.main(["run", "--out", "x", "--average", "0"])
    assert "argument --average: expected a positive int, got 0" in capsys.readouterr().err
