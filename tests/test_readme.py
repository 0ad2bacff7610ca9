"""The README's code examples run as written."""

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
EXAMPLES = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.DOTALL)


def test_readme_has_an_example_for_each_way_to_use_the_package():
    text = README.read_text()
    assert len(EXAMPLES) >= 3
    for heading in ("Drop-in for torch.nn", "The Encoder in your own model",
                    "The sequence-to-sequence Transformer"):
        assert heading in text
    assert "make test" in text and "make train" in text


@pytest.mark.parametrize("index", range(len(EXAMPLES)))
def test_readme_example_runs(index):
    exec(compile(EXAMPLES[index], f"README.md example {index}", "exec"), {})


@pytest.mark.parametrize("index", range(len(EXAMPLES)))
def test_readme_example_checks_its_result(index):
    """An example that only runs proves little: each states what it gives."""
    assert re.search(r"\bassert", EXAMPLES[index]), (
        f"README.md example {index}: expected at least one assert or assert_close, got none")


def _section(title: str) -> str:
    text = README.read_text()
    start = text.index(f"## {title}\n")
    end = text.find("\n## ", start + 1)
    return text[start:end if end != -1 else len(text)]


def test_the_layout_section_names_every_module_and_only_what_exists():
    """The layout's tree matches the package: each module of each package it shows is named,
    and every file or folder it names exists."""
    layout = _section("Layout")
    tree = re.search(r"```\n(.*?)```", layout, flags=re.DOTALL).group(1)
    files = set(re.findall(r"\b([\w]+\.py)\b", tree))
    folders = set(re.findall(r"\b([\w]+)/", tree))
    root = README.parent
    package = root / "attention"
    for folder in [package, *(package / name for name in
                              ("compat", "interop", "common", "translation", "bench"))]:
        modules = {p.name for p in folder.glob("*.py")} - {"__init__.py"}
        assert modules <= files, f"{folder.name}/: not in the layout: {sorted(modules - files)}"
        assert f"{folder.name}/" in tree
    existing = {p.name for p in package.rglob("*.py")}
    assert files - {"__init__.py"} <= existing, sorted(files - existing)
    dirs = {p.name for p in root.iterdir() if p.is_dir()} | {
        p.name for p in package.rglob("*") if p.is_dir()}
    assert folders <= dirs, sorted(folders - dirs)


def test_figures_stand_only_in_the_generated_table():
    """Measured figures (ratios, wall times, BLEU) appear once, in the table that
    scripts/readme_figures.py writes, so that no two can contradict each other."""
    text = README.read_text()
    start, end = text.index("<!-- figures:start"), text.index("<!-- figures:end -->")
    outside = text[:start] + text[end:]
    for pattern in (r"\d\s*×", r"\d+ min \d+ s", r"\bBLEU \d", r"\d+(\.\d+)?% (exact|faster)"):
        assert not re.search(pattern, outside), re.search(pattern, outside).group(0)
