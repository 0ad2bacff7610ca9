"""The README's table of current figures: generated from the committed results, it fails
when the two disagree; each row follows its results file; missing files and keys are named."""

import json
import runpy
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from attention.bench.figures import (
    END,
    FIGURES,
    START,
    FigureError,
    figure_rows,
    readme_diff,
    render_table,
    replace_block,
    resolve,
)

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "readme_figures.py"
INT8 = "benchmarks/results/int8-multi30k-cpu-2026-11-30.json"
DE_EN = "results/multi30k_de_en/results.json"


@pytest.fixture(scope="module")
def table() -> str:
    """The block the committed results give."""
    return render_table(ROOT)


@pytest.fixture
def results(tmp_path) -> Path:
    """A root holding a copy of every results file the table reads (the newest of a ``*``)."""
    for spec in FIGURES:
        for name in spec.files:
            name = resolve(ROOT, name)
            (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(ROOT / name, tmp_path / name)
    return tmp_path


def edit(root: Path, name: str, change) -> None:
    """Apply ``change`` to the JSON of ``root / name`` and write it back."""
    data = json.loads((root / name).read_text(encoding="utf-8"))
    change(data)
    (root / name).write_text(json.dumps(data), encoding="utf-8")


def row(root: Path, what: str):
    [found] = [r for r in figure_rows(root) if r.what.startswith(what)]
    return found


# --- (a) the README and the committed results agree --------------------------------------

def test_the_readmes_figures_are_those_of_the_committed_results(table):
    diff = readme_diff((ROOT / "README.md").read_text(encoding="utf-8"), table)
    assert diff == "", ("README.md's figures differ from the committed results; run `make "
                        f"figures` (python scripts/readme_figures.py):\n{diff}")


def test_every_row_names_its_files_and_says_where_they_come_from(table):
    rows = figure_rows(ROOT)
    assert len(rows) == len(FIGURES) == len(table.splitlines()) - 4  # markers and header
    for spec, made in zip(FIGURES, rows, strict=True):
        assert made.figure and made.source, spec.what
        for name in spec.files:
            assert Path(resolve(ROOT, name)).name in made.source, (spec.what, name)


# --- (b) a row follows its results file ------------------------------------------------------

def test_a_changed_figure_changes_its_row_and_the_table(results, table):
    assert render_table(results) == table
    edit(results, INT8, lambda data: data["results"][0]["int8"].update(bleu=12.3456))
    assert "BLEU 12.35 vs 31.38 greedy" in row(results, "our int8").figure
    assert render_table(results) != table


def test_a_median_over_runs_follows_the_runs(results):
    before = row(results, "length scaling").figure
    assert "L^1.08" in before and "4.49× at 8,192" in before and "7.71× at 16,384" in before

    def slower_window(data):
        for cell in data["cells"]:
            if cell["contender"] == "ours-window" and cell["pass"] == "training":
                cell["median_ms"] *= 2 if cell["length"] == 16384 else 1

    for run in ("", "-run2"):
        edit(results, f"benchmarks/results/cpu-scaling-2026-12-06{run}.json", slower_window)
    after = row(results, "length scaling").figure
    assert "L^1.08" not in after and "4.49× at 8,192" in after


def test_the_int8_row_follows_the_newest_file(results):
    newer = "benchmarks/results/int8-multi30k-cpu-2026-12-31.json"
    shutil.copyfile(results / INT8, results / newer)
    edit(results, newer, lambda data: data["megabytes"].update(int8=9.87))
    made = row(results, "our int8")
    assert "state dict 9.9 MB" in made.figure and "2026-12-31" in made.source
    assert "2026-11-30.json" not in made.source


def test_a_newer_run_of_the_same_date_is_newer(tmp_path):
    for name in ("x-2026-01-02.json", "x-2026-01-02-run2.json", "x-2026-01-02-run10.json",
                 "x-2026-01-01-run3.json"):
        (tmp_path / name).write_text("{}")
    assert resolve(tmp_path, "x-*.json") == "x-2026-01-02-run10.json"


# --- (c) what is missing is named ----------------------------------------------------------

def test_a_missing_results_file_is_named(results):
    (results / DE_EN).unlink()
    with pytest.raises(FigureError, match=f"{DE_EN}: results file not found"):
        figure_rows(results)


def test_no_file_matching_a_pattern_is_named(results):
    (results / INT8).unlink()
    with pytest.raises(FigureError, match=r"int8-multi30k-cpu-\*\.json: no results file"):
        figure_rows(results)


def test_a_missing_key_is_named_with_its_file_and_what_is_there(results):
    edit(results, DE_EN, lambda data: data.pop("bleu_lowercase"))
    with pytest.raises(FigureError) as error:
        figure_rows(results)
    assert str(error.value).startswith(f"{DE_EN}: no key 'bleu_lowercase'")
    assert "at the top level, which has: bleu, chrf" in str(error.value)


def test_a_missing_nested_key_is_named_by_its_path(results):
    edit(results, INT8, lambda data: data["results"][1]["fp32"].pop("bleu"))
    with pytest.raises(FigureError, match=rf"{INT8}: no key 'results\[1\]\.fp32\.bleu'; "
                                          r"expected 'bleu' in results\[1\]\.fp32"):
        figure_rows(results)


def test_a_value_of_the_wrong_kind_names_the_file(results):
    edit(results, INT8, lambda data: data.update(sentences="many"))
    with pytest.raises(FigureError, match=f"{INT8}: the row 'our int8.*ValueError"):
        figure_rows(results)


# --- (d) only the block between the markers changes ----------------------------------------

def test_replace_block_keeps_the_text_outside_the_markers():
    before, after = "# Title\n\nText | with a pipe.\n", "\n## Next\nmore\n"
    text = f"{before}{START}\n| old | table | rows |\n{END}{after}"
    table = f"{START}\n| new |\n{END}"
    assert replace_block(text, table) == f"{before}{table}{after}"
    assert replace_block(replace_block(text, table), table) == f"{before}{table}{after}"
    assert replace_block(f"{START}\n{END}", table) == table  # at the file's ends


@pytest.mark.parametrize("text, expected", [
    ("# README\nno markers\n", "received 0 and 0"),
    (f"{START}\nrows\n", "received 1 and 0"),
    (f"rows\n{END}\n", "received 0 and 1"),
    (f"{START}\n{END}\n{START}\n{END}\n", "received 2 and 2"),
    (f"{END}\nrows\n{START}\n", "comes before"),
])
def test_replace_block_refuses_missing_or_misplaced_markers(text, expected):
    with pytest.raises(ValueError, match=f"^README: .*{expected}"):
        replace_block(text, f"{START}\n{END}")


# --- (e) the script ---------------------------------------------------------------------------

def run_script(monkeypatch, *args: str) -> int:
    """``python scripts/readme_figures.py ARGS`` in this process (torch is imported once for
    the whole session): its exit status."""
    monkeypatch.setattr(sys, "argv", [str(SCRIPT), *args])
    monkeypatch.setattr(sys, "path", list(sys.path))  # the script puts the clone first
    with pytest.raises(SystemExit) as done:
        runpy.run_path(str(SCRIPT), run_name="__main__")
    return done.value.code


def test_the_script_check_fails_with_a_diff_on_a_stale_readme(tmp_path, table):
    stale = table.replace("| `make train`", "| a stale row |\n| `make train`", 1)
    readme = tmp_path / "README.md"
    readme.write_text(f"# Title\n\n{stale}\n\n## After\n", encoding="utf-8")
    done = subprocess.run([sys.executable, str(SCRIPT), "--check", "--readme", str(readme)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 1, done.stderr
    assert "--- README.md (committed)\n+++ README.md (generated)\n" in done.stdout
    assert "\n-| a stale row |\n" in done.stdout
    assert readme.read_text(encoding="utf-8") == f"# Title\n\n{stale}\n\n## After\n"


def test_the_script_check_passes_a_fresh_readme(tmp_path, table, monkeypatch, capsys):
    readme = tmp_path / "README.md"
    readme.write_text(f"# Title\n\n{table}\n\n## After\n", encoding="utf-8")
    assert run_script(monkeypatch, "--check", "--readme", str(readme)) == 0
    assert "the figures are current" in capsys.readouterr().out


def test_the_script_rewrites_only_the_block(tmp_path, table, monkeypatch, capsys):
    readme = tmp_path / "README.md"
    readme.write_text(f"# Title\n\n{START}\n| old |\n{END}\n\n## After\n", encoding="utf-8")
    assert run_script(monkeypatch, "--readme", str(readme)) == 0
    assert readme.read_text(encoding="utf-8") == f"# Title\n\n{table}\n\n## After\n"
    assert run_script(monkeypatch, "--readme", str(readme)) == 0
    assert "already current" in capsys.readouterr().out
    readme.write_text("# no markers\n", encoding="utf-8")
    assert run_script(monkeypatch, "--readme", str(readme)) == 2
    assert "error: README: expected one line" in capsys.readouterr().err
    assert readme.read_text(encoding="utf-8") == "# no markers\n"
