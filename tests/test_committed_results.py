"""The run folders and benchmark results committed with the project carry no absolute path
of the machine they ran on: a reader's clone sits elsewhere."""

import json
import shlex
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
# Run folders: the translation runs in results/ and those a benchmark trained, whose folder
# it keeps beside its results (gpu-check-train-cpu, int8-multi30k-model).
RUN_CONFIGS = sorted([*(ROOT / "results").glob("*/config.yaml"),
                      *(ROOT / "benchmarks" / "results").glob("*/config.yaml")])
BENCH_RESULTS = sorted((ROOT / "benchmarks" / "results").glob("*.json"))


def strings(value):
    if isinstance(value, dict):
        for item in value.values():
            yield from strings(item)
    elif isinstance(value, list):
        for item in value:
            yield from strings(item)
    elif isinstance(value, str):
        yield value


def absolute_paths(value) -> list[str]:
    """The strings of ``value`` that are absolute paths, or hold one as a word (a command's
    argument) or after ``=`` (an override ``key=/path``)."""
    found = []
    for text in strings(value):
        try:
            words = shlex.split(text)
        except ValueError:  # not a command line: the words as they are
            words = text.split()
        if text.startswith("/") or any(word.partition("=")[2].startswith("/")
                                       or word.startswith("/") for word in words):
            found.append(text)
    return found


def test_there_are_committed_results_to_check():
    assert RUN_CONFIGS and BENCH_RESULTS


def test_the_absolute_path_check_can_fail():
    assert absolute_paths({"a": ["x", {"b": "/home/me/runs"}]}) == ["/home/me/runs"]
    assert absolute_paths("python scripts/bench.py --out /tmp/runs") == [
        "python scripts/bench.py --out /tmp/runs"]
    assert absolute_paths("python scripts/train.py train.run_dir=/tmp/runs") != []
    assert absolute_paths({"config": "configs/tiny.yaml", "note": "1/2 of the rows"}) == []


@pytest.mark.parametrize("path", RUN_CONFIGS, ids=lambda p: p.parent.name)
def test_run_configs_hold_no_absolute_path(path):
    config = yaml.safe_load(path.read_text(encoding="utf-8"))
    assert config and absolute_paths(config) == []


def _command(result: dict) -> str | None:
    """The command line that made a benchmark result, where it records one."""
    environment = result.get("environment")
    return result.get("command") or (environment.get("command")
                                     if isinstance(environment, dict) else None)


@pytest.mark.parametrize("path", BENCH_RESULTS, ids=lambda p: p.name)
def test_benchmark_results_name_their_config_relative_to_the_clone(path):
    """A benchmark result gives its settings in one of three shapes, each checked:

    - ``config`` a string (``ddp_throughput.py``): the config file it trained, named from the
      clone's root, and a file of the clone;
    - ``config`` a mapping (``attention-bench``, ``kv_cache_memory.py``, ``modernbert.py``):
      the settings themselves, none of them an absolute path;
    - no ``config``: the script's own settings, as its command line sets them; the command is
      recorded and names no absolute path.
    """
    result = json.loads(path.read_text(encoding="utf-8"))
    if isinstance(config := result.get("config"), str):
        assert not Path(config).is_absolute() and (ROOT / config).is_file(), config
    elif isinstance(config, dict):
        assert config and absolute_paths(config) == []
    else:
        assert "config" not in result, f"config: {config!r} is neither a file nor settings"
        command = _command(result)
        assert command and absolute_paths(command) == [], command
