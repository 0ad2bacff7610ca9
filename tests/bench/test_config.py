"""The bench config: every key checked with a message that names it, the file's errors, the
activation names from the library, and --contenders parsing."""

import pytest

from attention.bench.config import (
    CONTENDERS,
    DEFAULT_CONTENDERS,
    load_bench_config,
    parse_contenders,
)
from attention.layers import ACTIVATIONS
from attention.translation.config import ConfigError

from .tiny import TINY


@pytest.mark.parametrize("override,key", [
    ("colour=red", "colour"),
    ("repeats=4", "repeats"),
    ("d_model=big", "d_model"),
    ("d_model=30", "d_model"),  # not a multiple of n_heads
    ("lengths={gpu: [16]}", "lengths.gpu"),
    ("lengths=[16, x]", r"lengths\[1\]"),
    ("dtypes=[float64]", "dtypes"),
    ("padding=0.6", "padding"),
    ("passes=[inference, inference]", "passes"),
    ("cases=[sparse]", "cases"),
    ("cpu_peak_rss=maybe", "cpu_peak_rss"),
    ("warmup=0", "warmup"),
])
def test_config_errors_name_the_key(override, key):
    with pytest.raises(ConfigError, match=rf"^{key}:"):
        load_bench_config(TINY, [override])


def test_config_file_errors(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text(TINY.read_text() + "heads: 4\n")
    with pytest.raises(ConfigError, match="^heads: unknown key"):
        load_bench_config(path)
    path.write_text("d_model: 32\n")
    with pytest.raises(ConfigError, match="^n_heads: missing"):
        load_bench_config(path)
    with pytest.raises(ConfigError, match="file not found"):
        load_bench_config(tmp_path / "absent.yaml")
    config = load_bench_config(TINY, ["lengths={cpu: [16]}"])
    with pytest.raises(ConfigError, match="^lengths: no list for device 'cuda'"):
        config.lengths_for("cuda")


def test_activation_names_are_the_library_s(monkeypatch):
    for name in ACTIVATIONS:
        assert load_bench_config(TINY, [f"activation={name}"]).activation == name
    with pytest.raises(ConfigError, match=r"^activation: expected one of \['relu'"):
        load_bench_config(TINY, ["activation=square"])
    # a name the library gains is a name the bench takes: no list of its own
    monkeypatch.setitem(ACTIVATIONS, "square", lambda x: x * x)
    assert load_bench_config(TINY, ["activation=square"]).activation == "square"


def test_contenders_are_parsed_in_their_order_and_checked():
    assert parse_contenders(None) == list(DEFAULT_CONTENDERS)
    assert parse_contenders(" torch-bias, ours-fused ,") == ["ours-fused", "torch-bias"]
    with pytest.raises(ConfigError, match="^contenders: unknown 'mine'"):
        parse_contenders("ours-fused,mine")
    with pytest.raises(ConfigError, match="^contenders: expected some of"):
        parse_contenders(" , ")
    assert set(DEFAULT_CONTENDERS) < set(CONTENDERS)
