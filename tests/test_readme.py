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
