"""Run configs: the shipped YAML files load, overrides are typed, and every mistake is a
ConfigError naming the key (or path) before any work starts, also through attention-train."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest
import torch

from attention.translation.cli import train_main
from attention.translation.config import (
    Config,
    ConfigError,
    DataConfig,
    EvalConfig,
    ModelConfig,
    TrainConfig,
    load_config,
    multi30k_files,
)

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
TINY = CONFIGS / "tiny.yaml"


def config_error(key: str):
    return pytest.raises(ConfigError, match=re.escape(key))


def write_yaml(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


# ------------------------------------------------------------------------- loading


def test_tiny_loads():
    config = load_config(TINY)
    assert config.name == "tiny"
    assert isinstance(config.model, ModelConfig) and isinstance(config.data, DataConfig)
    assert isinstance(config.train, TrainConfig) and isinstance(config.eval, EvalConfig)
    assert (config.model.d_model, config.model.n_heads, config.model.d_ff) == (32, 2, 64)
    assert config.data.corpus == "toy" and config.data.toy_train_size == 400
    assert config.train.max_steps == 40 and config.train.lr == 0.003
    assert config.model.activation == ModelConfig().activation  # absent keys: defaults
    assert config.run_path == Path("runs") / "tiny"


def test_toy_translation_loads():
    config = load_config(CONFIGS / "toy_translation.yaml")
    assert config.name == "toy_translation"
    assert config.model.d_model == 128 and config.data.toy_train_size == 20000
    assert config.train.max_steps == 800 and config.train.schedule == "cosine"


def _multi30k_root() -> Path | None:
    for root in (Path("../shared/data/multi30k"), CONFIGS / "../shared/data/multi30k"):
        if all(p.is_file() for split in ("train", "val", "test")
               for p in multi30k_files(root, split, "de", "en")):
            return root
    return None


@pytest.mark.skipif(_multi30k_root() is None, reason="Multi30k data (../shared) not present")
def test_multi30k_loads():
    config = load_config(CONFIGS / "multi30k_de_en.yaml")
    assert config.name == "multi30k_de_en"
    assert (config.data.corpus, config.data.src_lang, config.data.tgt_lang) == \
        ("multi30k", "de", "en")
    assert config.data.tokenizer == "bpe" and config.eval.beam_size == 4


def test_name_defaults_to_file_stem_unless_given(tmp_path):
    body = "train:\n  max_steps: 3\n"
    assert load_config(write_yaml(tmp_path / "my_run.yaml", body)).name == "my_run"
    named = write_yaml(tmp_path / "other.yaml", "name: chosen\n" + body)
    assert load_config(named).name == "chosen"
    assert load_config(named, ["name=cli"]).name == "cli"


def test_overrides_are_typed():
    config = load_config(TINY, ["train.lr=0.01", "model.n_heads=4", "data.lowercase=true"])
    assert config.train.lr == 0.01
    assert config.model.n_heads == 4 and config.data.lowercase is True
    whole = load_config(TINY, ["train.lr=1"])
    assert whole.train.lr == 1.0 and isinstance(whole.train.lr, float)  # int accepted for float
    unbounded = load_config(TINY, ["train.max_steps=null", "train.max_minutes=1"])
    assert unbounded.train.max_steps is None
    # later overrides win
    assert load_config(TINY, ["train.lr=0.1", "train.lr=0.2"]).train.lr == 0.2


def test_override_leaves_the_original_untouched():
    config = load_config(TINY)
    changed = config.override(["train.lr=0.5"])
    assert changed.train.lr == 0.5 and config.train.lr == 0.003


def test_parallel_corpus_paths_resolve_beside_the_config(tmp_path, monkeypatch):
    folder = tmp_path / "project"
    folder.mkdir()
    for name in ("train.tsv", "val.tsv", "test.tsv"):
        (folder / name).write_text("a\tb\n", encoding="utf-8")
    path = write_yaml(folder / "mine.yaml", "data:\n  corpus: parallel\n  train: [train.tsv]\n"
                      "  val: [val.tsv]\n  test: [test.tsv]\ntrain:\n  max_steps: 3\n")
    monkeypatch.chdir(tmp_path)  # the files are not relative to the working directory
    config = load_config(path)
    assert [Path(p).resolve() for p in config.data.train] == [(folder / "train.tsv").resolve()]


# -------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    ("overrides", "key"),
    [
        (["train.lrr=0.1"], "train.lrr"),  # unknown key
        (["optimizer.lr=0.1"], "optimizer.lr"),  # unknown section
        (["train.lr=abc"], "train.lr"),
        (["model.d_model=1.5"], "model.d_model"),
        (["model.norm_first=3"], "model.norm_first"),
        (["model.n_heads=true"], "model.n_heads"),  # bool where int expected
        (["train.max_steps=true"], "train.max_steps"),  # bool where int-or-null expected
        (["data.train=a.tsv"], "data.train"),  # a string where a list is expected
        (["model.positional=foo"], "model.positional"),
        (["data.corpus=wmt"], "data.corpus"),
        (["model.n_heads=3"], "model.d_model"),  # 32 is not a multiple of 3
        (["train.max_steps=null"], "train.max_steps"),  # tiny has no other stopping criterion
        (["train.max_steps=0"], "train.max_steps"),
        (["model.dropout=1.0"], "model.dropout"),
        (["train.lr"], "train.lr"),  # no "="
        (["lr=0.1"], "lr=0.1"),  # no section
        (["model.n_kv_heads=3"], "model.n_kv_heads"),  # not a divisor of n_heads
        (["model.window=-1"], "model.window"),
        (["model.global_every=2"], "model.global_every"),  # no window
        (["model.window=4", "model.global_every=0"], "model.global_every"),
        (["model.softcap=0"], "model.softcap"),
        (["model.alibi=true", "model.positional=rotary"], "model.alibi"),
        (["model.norm=batchnorm"], "model.norm"),
        (["model.activation=reglu"], "model.activation"),
    ],
)
def test_bad_override_names_the_key(overrides, key):
    with config_error(key):
        load_config(TINY, overrides)


def test_error_messages_say_what_was_expected():
    with pytest.raises(ConfigError, match=r"model\.d_model: expected int, got float 1\.5"):
        load_config(TINY, ["model.d_model=1.5"])
    with pytest.raises(ConfigError, match=r"model\.positional: expected one of \['sinusoidal', "
                       r"'learned', 'rotary', None\], got 'foo'"):
        load_config(TINY, ["model.positional=foo"])
    with pytest.raises(ConfigError, match=r"multiple of model\.n_heads=3, got 32"):
        load_config(TINY, ["model.n_heads=3"])
    with pytest.raises(ConfigError, match=r"train\.max_steps, train\.max_epochs, "
                       r"train\.max_minutes: expected at least one"):
        load_config(TINY, ["train.max_steps=null"])
    with pytest.raises(ConfigError, match=r"expected section\.key=value"):
        load_config(TINY, ["train.lr"])


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ("train:\n  max_steps: 3\n  lrr: 0.1\n", "train.lrr"),
        ("optimizer:\n  lr: 0.1\ntrain:\n  max_steps: 3\n", "optimizer"),
        ("model:\n  d_model: big\ntrain:\n  max_steps: 3\n", "model.d_model"),
        ("model:\n  d_model: 30\n  n_heads: 4\ntrain:\n  max_steps: 3\n", "model.d_model"),
        ("model:\n  n_heads: 2.0\ntrain:\n  max_steps: 3\n", "model.n_heads"),
        ("model:\n  positional: absolute\ntrain:\n  max_steps: 3\n", "model.positional"),
        ("model:\n  d_model: 32\n", "train.max_steps"),  # nothing ends the run
        ("train: [1, 2]\n", "train"),
        ("- a list\n", "config"),
        ("train: {max_steps: 3\n", "is not valid YAML"),
    ],
)
def test_bad_yaml_names_the_key(tmp_path, text, key):
    with config_error(key):
        load_config(write_yaml(tmp_path / "bad.yaml", text))


def test_missing_config_file_names_the_path(tmp_path):
    missing = tmp_path / "nope.yaml"
    with config_error(str(missing)):
        load_config(missing)


def test_parallel_corpus_missing_file_names_the_path(tmp_path):
    (tmp_path / "train.tsv").write_text("a\tb\n", encoding="utf-8")
    (tmp_path / "test.tsv").write_text("a\tb\n", encoding="utf-8")
    missing = tmp_path / "val.tsv"
    path = write_yaml(tmp_path / "p.yaml", f"data:\n  corpus: parallel\n  train: "
                      f"[{tmp_path / 'train.tsv'}]\n  val: [{missing}]\n  test: "
                      f"[{tmp_path / 'test.tsv'}]\ntrain:\n  max_steps: 3\n")
    with pytest.raises(ConfigError, match=re.escape(f"data.val: file not found: {missing}")):
        load_config(path)
    # the same config checked without files (a checkpoint away from its data) loads
    raw = Config.from_dict({"data": {"corpus": "parallel", "val": [str(missing)]},
                            "train": {"max_steps": 3}}, check_files=False)
    assert raw.data.val == [str(missing)]


def test_multi30k_missing_root_names_the_file(tmp_path):
    path = write_yaml(tmp_path / "m.yaml", f"data:\n  corpus: multi30k\n  root: {tmp_path}\n"
                      "train:\n  max_steps: 3\n")
    with config_error(f"data.root: missing file {tmp_path / 'train.de.gz'}"):
        load_config(path)


# ------------------------------------------------ number notation, check order, overrides


def test_exponent_notation_is_a_float(tmp_path):
    assert load_config(TINY, ["train.lr=1e-3"]).train.lr == 1e-3
    path = write_yaml(tmp_path / "e.yaml", "train:\n  lr: 5e-4\n  max_steps: 3\n")
    assert load_config(path).train.lr == 5e-4


def test_zero_heads_is_a_config_error():
    with config_error("model.n_heads"):
        load_config(TINY, ["model.n_heads=0"])


@pytest.mark.parametrize("case", ["stopping", "data_root"])
def test_overrides_apply_before_the_checks(tmp_path, case):
    data = tmp_path / "data"
    data.mkdir()
    for split in ("train", "val", "test"):
        for file in multi30k_files(data, split, "de", "en"):
            file.write_bytes(b"")
    if case == "stopping":
        path = write_yaml(tmp_path / "s.yaml", "model:\n  d_model: 32\n")
        assert load_config(path, ["train.max_steps=5"]).train.max_steps == 5
    else:
        path = write_yaml(tmp_path / "r.yaml", f"data:\n  corpus: multi30k\n  root: "
                          f"{tmp_path / 'absent'}\ntrain:\n  max_steps: 3\n")
        assert load_config(path, [f"data.root={data}"]).data.root == str(data)


# ------------------------------------------------------------- through attention-train


@pytest.mark.parametrize(
    ("args", "key"),
    [
        (["train.lrr=0.1"], "train.lrr"),
        (["train.lr=abc"], "train.lr"),
        (["model.positional=foo"], "model.positional"),
        (["train.max_steps=null"], "train.max_steps"),
        (["model.n_heads=3"], "model.d_model"),
        (["train.lr"], "train.lr"),
    ],
)
def test_train_cli_reports_config_errors_before_creating_the_run(tmp_path, capsys, args, key):
    run_dir = tmp_path / "runs"
    status = train_main(["--config", str(TINY), f"train.run_dir={run_dir}", *args])
    err = capsys.readouterr().err
    assert status == 2
    assert err.startswith("error:") and key in err
    assert len(err.strip().splitlines()) == 1  # one line, no traceback
    assert not run_dir.exists()


def test_train_cli_missing_config_file(tmp_path, capsys):
    missing = tmp_path / "nope.yaml"
    assert train_main(["--config", str(missing)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and str(missing) in err


def test_train_cli_bad_yaml_before_creating_the_run(tmp_path, capsys):
    run_dir = tmp_path / "runs"
    path = write_yaml(tmp_path / "bad.yaml", f"train:\n  run_dir: {run_dir}\n  max_steps: 3\n"
                      "model:\n  norm_first: 3\n")
    assert train_main(["--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and "model.norm_first" in err
    assert not run_dir.exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a CPU machine")
def test_a_cuda_device_on_a_machine_without_one_is_a_config_error():
    with config_error("train.device"):
        load_config(TINY, ["train.device=cuda"])
    with config_error("train.device"):
        load_config(TINY, ["train.device=tpu0"])


def test_an_alibi_model_without_positions_is_a_config_and_rebuilds_from_its_model():
    """ALiBi's own setting: no position encoding beside it (``model.positional=null``)."""
    from attention.translation.checkpoint import model_from_config
    from attention.translation.export import model_config_of

    config = load_config(TINY, ["model.alibi=true", "model.positional=null"])
    assert config.model.positional is None
    model = model_from_config(config.model, 9, 9, 0)
    assert model.encoder.positional is None and model.decoder.positional is None
    assert model.encoder.layers[0].self_attn.alibi_slopes is not None
    # max_len bounds only a position table, and this model has none
    assert model_config_of(model) == dataclasses.replace(config.model, max_len=ModelConfig.max_len)
    with config_error("model.positional: expected one of ['sinusoidal', 'learned', 'rotary', "
                      "None], got 'nope'"):
        load_config(TINY, ["model.positional=nope"])
