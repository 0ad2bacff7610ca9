"""Each run keeps a folder of its own: a second run never replaces the first, --resume
continues the latest (or the folder named), and the commands that read a model take a run
folder."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from attention.translation.checkpoint import AVERAGE, load_checkpoint
from attention.translation.cli import export_main, train_main, translate_main
from attention.translation.config import load_config
from attention.translation.runs import (
    latest_run,
    model_checkpoint,
    new_run,
    resumed_run,
    run_versions,
)
from attention.translation.training import train

ROOT = Path(__file__).resolve().parents[2]
TINY = ROOT / "configs" / "tiny.yaml"
QUICK = ["train.threads=1", "train.max_steps=2", "train.eval_every=1000",
         "eval.val_sentences=2"]


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_new_runs_take_the_next_version_and_latest_finds_the_newest_that_saved(tmp_path):
    root = tmp_path / "runs" / "name"
    assert latest_run(root) is None and run_versions(root) == []
    first, second = new_run(root), new_run(root)
    assert (first.name, second.name) == ("version_0", "version_1")
    (first / "checkpoint_last.pt").write_bytes(b"x")
    assert latest_run(root) == first  # version_1 saved nothing yet
    (second / "checkpoint_last.pt").write_bytes(b"x")
    assert latest_run(root) == second
    (root / "version_7").mkdir()
    assert new_run(root).name == "version_8"
    assert resumed_run(root, True) == second
    assert resumed_run(root, first) == first
    with pytest.raises(FileNotFoundError, match="--resume: expected a run folder holding"):
        resumed_run(root, root / "version_7")


def test_a_folder_from_before_versions_is_a_run_of_its_own(tmp_path):
    (tmp_path / "checkpoint_last.pt").write_bytes(b"x")
    (tmp_path / "checkpoint_best.pt").write_bytes(b"x")
    assert latest_run(tmp_path) == tmp_path
    assert model_checkpoint(tmp_path) == tmp_path / "checkpoint_best.pt"


def test_model_checkpoint_prefers_the_average_and_names_what_is_missing(tmp_path):
    run = new_run(tmp_path)
    (run / "checkpoint_last.pt").write_bytes(b"x")
    with pytest.raises(FileNotFoundError, match="has no checkpoint_average.pt or "
                                                "checkpoint_best.pt"):
        model_checkpoint(tmp_path)
    (run / "checkpoint_best.pt").write_bytes(b"x")
    assert model_checkpoint(tmp_path) == run / "checkpoint_best.pt"
    (run / AVERAGE).write_bytes(b"x")
    assert model_checkpoint(tmp_path) == run / AVERAGE
    assert model_checkpoint(run / "checkpoint_best.pt") == run / "checkpoint_best.pt"
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="--checkpoint: expected a checkpoint file or "
                                                "a run folder"):
        model_checkpoint(empty)


def test_a_second_run_keeps_the_first_and_resume_continues_the_latest(tmp_path, capsys):
    overrides = [f"train.run_dir={tmp_path}", *QUICK]
    config = load_config(TINY, overrides)
    first = Path(train(config, progress_bar=False, log=lambda message: None)["run_dir"])
    before = digest(first / "checkpoint_best.pt")
    second = Path(train(config, progress_bar=False, log=lambda message: None)["run_dir"])
    assert (first.name, second.name) == ("version_0", "version_1")
    assert digest(first / "checkpoint_best.pt") == before  # the first run is as it was

    def step_of(run: Path) -> int:
        return load_checkpoint(run / "checkpoint_last.pt")["progress"]["step"]

    # --resume: the latest run, continued in its own folder; no new folder.
    longer = ["--config", str(TINY), f"train.run_dir={tmp_path}", "train.threads=1",
              "train.max_steps=3", "train.eval_every=1000", "eval.val_sentences=2"]
    assert train_main([*longer, "--resume"]) == 0
    assert [path.name for _, path in run_versions(config.run_path)] == ["version_0",
                                                                         "version_1"]
    assert (step_of(first), step_of(second)) == (2, 3)
    # --resume FOLDER: that run.
    assert train_main([*longer, "--resume", str(first)]) == 0
    assert (step_of(first), step_of(second)) == (3, 3)

    # The commands that read a model take runs/NAME: its latest run.
    capsys.readouterr()
    assert translate_main(["--checkpoint", str(config.run_path), "a cat"]) == 0
    assert capsys.readouterr().out.strip()
    assert export_main(["--checkpoint", str(config.run_path), "--out",
                        str(tmp_path / "model")]) == 0
    assert (tmp_path / "model" / "model.safetensors").is_file()


def test_resume_without_a_run_says_so(tmp_path, capsys):
    assert train_main(["--config", str(TINY), f"train.run_dir={tmp_path}", *QUICK,
                       "--resume"]) == 2
    assert "--resume: expected a run with checkpoint_last.pt" in capsys.readouterr().err


def test_a_run_resumes_from_its_folder_alone_without_its_tokenizer_files(tmp_path, capsys):
    """Its tokenizers are in the checkpoint: the files it was trained with may be gone, and
    the run folder alone says what to continue."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer.train_from_iterator(["the dog sees a cat", "now the girls sleep"],
                                  trainers.WordLevelTrainer(special_tokens=["[UNK]"]))
    tokenizer_file = tmp_path / "tokenizer.json"
    tokenizer.save(str(tokenizer_file))
    common = ["--config", str(TINY), f"train.run_dir={tmp_path / 'runs'}",
              f"data.tokenizer_files=[{tokenizer_file}]", "train.threads=1",
              "train.eval_every=1000", "eval.val_sentences=2"]
    assert train_main([*common, "train.max_steps=2"]) == 0
    run = latest_run(tmp_path / "runs" / "tiny")
    tokenizer_file.unlink()
    assert train_main([*common, "train.max_steps=3", "--resume"]) == 0
    assert train_main(["--resume", str(run), "train.max_steps=4"]) == 0
    assert load_checkpoint(run / "checkpoint_last.pt")["progress"]["step"] == 4
    capsys.readouterr()
    with pytest.raises(SystemExit):  # neither a config nor a run folder
        train_main(["train.max_steps=4"])
    assert "--config: expected a YAML config, or --resume RUN_FOLDER" in capsys.readouterr().err
