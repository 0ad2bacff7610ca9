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
    assert resumed_run(tmp_path, root) == second  # runs/NAME: its latest run, as elsewhere
    for missing in (root / "version_7", tmp_path / "nowhere"):
        with pytest.raises(FileNotFoundError, match="--resume: expected a run folder holding"):
            resumed_run(root, missing)


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
    assert train_main([*common, "--resume", "train.max_steps=3"]) == 0  # an override, last
    assert train_main(["--resume", str(run.parent), "train.max_steps=4"]) == 0  # runs/NAME
    assert load_checkpoint(run / "checkpoint_last.pt")["progress"]["step"] == 4
    capsys.readouterr()
    with pytest.raises(SystemExit):  # neither a config nor a run folder
        train_main(["train.max_steps=4"])
    assert "--config: expected a YAML config, or --resume RUN_FOLDER" in capsys.readouterr().err


# Faults ------------------------------------------------------------------------------------

# Dropout on, so that the restored random state matters; a checkpoint every 3 steps.
FAULTY = ["model.dropout=0.1", "train.log_every=1", "train.eval_every=3",
          "train.max_steps=10", "eval.val_sentences=2"]

# Trains in a child process that dies (os._exit, as a kill does: no cleanup) at a chosen
# point: inside the n-th checkpoint write, half of it on disk, or at the start of a step.
KILLED_CHILD = """
import os, sys, torch
import attention.translation.checkpoint as checkpoint
import attention.translation.training as training
from attention.translation.config import load_config

where, count = sys.argv[1], int(sys.argv[2])
calls = []
if where == "write":
    real_save = torch.save
    def dying_save(obj, file, *args, **kwargs):
        calls.append(1)
        if len(calls) == count:
            file.write(b"half of a checkpoint")
            file.flush()
            os._exit(137)
        return real_save(obj, file, *args, **kwargs)
    checkpoint.torch.save = dying_save
else:
    real_step = training.Trainer.train_step
    def dying_step(self, *args, **kwargs):
        if self.progress.step == count:
            os._exit(137)
        return real_step(self, *args, **kwargs)
    training.Trainer.train_step = dying_step
config = load_config(sys.argv[3], sys.argv[4:])
training.train(config, progress_bar=False, log=lambda message: None)
"""


def train_losses(run: Path) -> dict[int, float]:
    from attention.translation.plotting import read_metrics

    return {r["step"]: r["loss"] for r in read_metrics(run / "metrics.jsonl")
            if r["kind"] == "train"}


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    root = tmp_path_factory.mktemp("whole")
    config = load_config(TINY, [f"train.run_dir={root}", "train.threads=1", *FAULTY])
    return train_losses(Path(train(config, progress_bar=False,
                                   log=lambda message: None)["run_dir"]))


@pytest.mark.parametrize(("where", "count"), [("write", 2), ("write", 3), ("step", 7)],
                         ids=["inside-2nd-write", "inside-3rd-write", "at-step-7"])
def test_a_kill_anywhere_loses_only_the_steps_since_the_last_checkpoint(
        where, count, uninterrupted, tmp_path):
    import subprocess
    import sys

    overrides = [f"train.run_dir={tmp_path}", "train.threads=1", *FAULTY]
    done = subprocess.run([sys.executable, "-c", KILLED_CHILD, where, str(count), str(TINY),
                           *overrides], capture_output=True, text=True, timeout=300)
    assert done.returncode == 137, done.stderr[-2000:]
    run = latest_run(tmp_path / "tiny")
    saved = load_checkpoint(run / "checkpoint_last.pt")["progress"]["step"]  # loads: whole
    assert saved in (3, 6) and saved < 10
    config = load_config(TINY, overrides)
    train(config, resume=True, progress_bar=False, log=lambda message: None)
    assert train_losses(run) == uninterrupted  # every step, as if never killed
    assert not list(run.glob(".*.tmp"))


def test_a_full_disk_fails_the_save_in_one_line_and_keeps_the_previous_checkpoint(
        tmp_path, monkeypatch, capsys):
    import errno

    import attention.translation.checkpoint as checkpoint_module

    overrides = ["--config", str(TINY), f"train.run_dir={tmp_path}", "train.threads=1",
                 *FAULTY]
    assert train_main([*overrides[:-2], "train.max_steps=3", "eval.val_sentences=2"]) == 0
    run = latest_run(tmp_path / "tiny")
    before = digest(run / "checkpoint_last.pt")
    real_save, calls = checkpoint_module.torch.save, []

    def full_disk(obj, file, *args, **kwargs):
        calls.append(1)
        file.write(b"x" * 1000)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(checkpoint_module.torch, "save", full_disk)
    capsys.readouterr()
    assert train_main([*overrides, "--resume"]) == 1
    error = capsys.readouterr().err.strip().splitlines()
    assert error[-1].startswith("error: ") and "No space left on device" in error[-1]
    assert "checkpoint_last.pt is kept, whole" in error[-1]
    assert calls and digest(run / "checkpoint_last.pt") == before
    assert load_checkpoint(run / "checkpoint_last.pt")["progress"]["step"] == 3
    assert not list(run.glob(".*.tmp"))
    monkeypatch.setattr(checkpoint_module.torch, "save", real_save)
    assert train_main([*overrides, "--resume"]) == 0  # room again: it goes on


def test_a_checkpoint_last_that_does_not_load_resumes_from_the_newest_that_does(
        tmp_path, uninterrupted):
    overrides = [f"train.run_dir={tmp_path}", "train.threads=1", *FAULTY]
    first = load_config(TINY, [*overrides, "train.max_steps=7", "train.keep_last=5"])
    run = Path(train(first, progress_bar=False, log=lambda message: None)["run_dir"])
    (run / "checkpoint_last.pt").write_bytes(b"cut short by a failing disk")
    messages = []
    train(load_config(TINY, [*overrides, "train.keep_last=5"]), resume=True,
          progress_bar=False, log=messages.append)
    # The run saved numbered checkpoints at steps 3, 6 and 7 (its last): the newest loads.
    assert any("not a complete checkpoint" in m and "resuming from checkpoint_step7.pt" in m
               for m in messages)
    assert train_losses(run) == uninterrupted


def test_data_refused_while_setting_up_leaves_no_empty_run_folder(tmp_path, capsys,
                                                                   monkeypatch):
    source, target = tmp_path / "train.src", tmp_path / "train.tgt"
    source.write_text("a b\nc d\ne f\n")
    target.write_text("x y\nz w\n")  # a line short
    files = f"[{source}, {target}]"
    command = ["--config", str(TINY), f"train.run_dir={tmp_path / 'runs'}", *QUICK,
               "data.corpus=parallel", f"data.train={files}", f"data.val={files}",
               f"data.test={files}"]
    assert train_main(command) == 2
    assert f"data.train: {source} has 3 lines but" in capsys.readouterr().err
    assert run_versions(tmp_path / "runs" / "tiny") == []
    # Under torchrun --max-restarts a restart continues the newest folder: it stays, so that
    # the restart does not take an older, finished run for this one.
    monkeypatch.setenv("TORCHELASTIC_MAX_RESTARTS", "1")
    assert train_main(command) == 2
    assert [path.name for _, path in run_versions(tmp_path / "runs" / "tiny")] == ["version_0"]


def test_a_bare_resume_before_an_override_keeps_the_overrides_in_order():
    from attention.translation.cli import _bare_resume_last

    assert _bare_resume_last(["--config", "c.yaml", "train.lr=2", "--resume", "train.lr=5"]) \
        == ["--config", "c.yaml", "train.lr=2", "train.lr=5", "--resume"]
    for folder in (["--resume", "runs/lr=1e-3"], ["--resume", "runs/x", "train.lr=5"]):
        assert _bare_resume_last(folder) == folder  # a folder, even with '=' in its name
