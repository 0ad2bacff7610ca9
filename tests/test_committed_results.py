"""The run folders and benchmark results committed with the project carry no absolute path
of the machine they ran on: a reader's clone sits elsewhere."""

import json
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
RUN_CONFIGS = sorted((ROOT / "results").glob("*/config.yaml"))
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


def test_there_are_committed_results_to_check():
    assert RUN_CONFIGS and BENCH_RESULTS


@pytest.mark.parametrize("path", RUN_CONFIGS, ids=lambda p: p.parent.name)
def test_run_configs_hold_no_absolute_path(path):
    config = yaml.safe_load(path.read_text(encoding="utf-8"))
    assert [s for s in strings(config) if s.startswith("/")] == []


@pytest.mark.parametrize("path", BENCH_RESULTS, ids=lambda p: p.name)
def test_benchmark_results_name_their_config_relative_to_the_clone(path):
    config = json.loads(path.read_text(encoding="utf-8")).get("config")
    if isinstance(config, str):
        assert not config.startswith("/")
