"""The scripts of ``benchmarks/``, imported by path for their smoke tests (they are not a
package), and what every smoke test asserts of the files a script writes."""

import importlib.util
import json
import sys
from pathlib import Path
from types import ModuleType

ROOT = Path(__file__).resolve().parents[2]


def load_script(name: str) -> ModuleType:
    """``benchmarks/{name}.py`` as the module ``benchmarks_{name}`` (its dataclasses look
    their module up in ``sys.modules``)."""
    spec = importlib.util.spec_from_file_location(f"benchmarks_{name}",
                                                  ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def read_results(stem: Path, script: str) -> tuple[dict, str]:
    """``{stem}.json`` and ``{stem}.md``, checked for what the kit's writer records: the
    environment with a git commit key and the command line of ``benchmarks/{script}.py``."""
    report = json.loads(stem.with_name(stem.name + ".json").read_text(encoding="utf-8"))
    markdown = stem.with_name(stem.name + ".md").read_text(encoding="utf-8")
    env = report["environment"]
    assert "git_commit" in env and env["command"].startswith(f"python benchmarks/{script}.py")
    assert f"`{env['command']}`" in markdown and "## Environment" in markdown
    return report, markdown


def positive_ratio(ratio: dict, rounds: int) -> bool:
    """A pair's ratios as the kit records them: one positive number per round, and their
    median."""
    return (len(ratio["per_round"]) == rounds and all(r > 0 for r in ratio["per_round"])
            and ratio["median"] > 0)
