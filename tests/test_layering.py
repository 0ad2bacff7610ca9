"""The library layer stands alone: importing every core module pulls in torch and einops,
never the application's dependencies or modules."""

import json
import pkgutil
import subprocess
import sys
from pathlib import Path

import attention

APPLICATION_PACKAGES = ("attention.translation", "attention.bench", "attention.common")
APPLICATION_DEPENDENCIES = ("tokenizers", "sacrebleu", "matplotlib", "yaml", "tqdm")


def core_modules() -> list[str]:
    names = ["attention"]
    for module in pkgutil.iter_modules(attention.__path__, "attention."):
        if not module.name.startswith(APPLICATION_PACKAGES):
            names.append(module.name)
    return names


def test_core_modules_are_found():
    names = core_modules()
    for expected in ("attention.functional", "attention.multihead", "attention.models",
                     "attention.compat", "attention.decoding", "attention.positional"):
        assert expected in names
    assert not any(name.startswith(APPLICATION_PACKAGES) for name in names)


# Runs in a fresh interpreter: a finder refuses the application's dependencies and records
# which module asked for each (torch itself tries tqdm, behind a guard, and may keep trying).
PROBE = """
import importlib, importlib.abc, json, sys

BLOCKED = {blocked!r}
asked = []

class Refuse(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name.split(".")[0] in BLOCKED:
            frame = sys._getframe(1)
            while frame is not None and frame.f_globals.get("__name__", "").startswith(
                    ("importlib", "_frozen_importlib")):
                frame = frame.f_back
            asked.append([name, frame.f_globals.get("__name__", "?") if frame else "?"])
            raise ImportError(f"{{name}} is blocked")
        return None

sys.meta_path.insert(0, Refuse())
for name in {modules!r}:
    importlib.import_module(name)
print(json.dumps({{"asked": asked, "loaded": sorted(sys.modules)}}))
"""


def probe(modules: list[str]) -> dict:
    code = PROBE.format(blocked=APPLICATION_DEPENDENCIES, modules=modules)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          cwd=Path(attention.__file__).parents[1])
    assert done.returncode == 0 or "blocked" in done.stderr, done.stderr
    return json.loads(done.stdout) if done.returncode == 0 else {"failed": done.stderr}


def test_core_imports_no_application_module_or_dependency():
    result = probe(core_modules())
    assert "failed" not in result, result.get("failed")
    asked_by_us = [(name, importer) for name, importer in result["asked"]
                   if importer.startswith("attention")]
    assert asked_by_us == []
    assert [name for name in result["loaded"] if name.startswith(APPLICATION_PACKAGES)] == []
    assert "einops" in result["loaded"] and "torch" in result["loaded"]


def test_the_check_sees_an_application_import():
    """The check above can fail: the application imports what the library must not."""
    result = probe(["attention.translation.training"])
    assert "failed" in result and "blocked" in result["failed"]
