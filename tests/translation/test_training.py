"""End-to-end training at tiny size: the run's files, resume, interrupts, NaN stops, commands."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from attention.decoding import beam_search, greedy_search
from attention.translation.checkpoint import load_checkpoint, save_checkpoint
from attention.translation.cli import plot_attention_main, translate_main
from attention.translation.config import load_config
from attention.translation.plotting import read_metrics
from attention.translation.runs import latest_run
from attention.translation.training import NonFiniteLossError, train
from attention.translation.translator import Translator

ROOT = Path(__file__).resolve().parents[2]
TINY = ROOT / "configs" / "tiny.yaml"


def tiny_config(run_dir: Path, *overrides: str):
    return load_config(TINY, [f"train.run_dir={run_dir}", "train.threads=1", *overrides])


def train_losses(run: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(run / "metrics.jsonl")
            if r["kind"] == "train"}


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """One tiny run shared by the tests that only read its output."""
    run_dir = tmp_path_factory.mktemp("runs")
    config = tiny_config(run_dir, "train.max_steps=60", "train.eval_every=30")
    results = train(config, progress_bar=False, log=lambda message: None)
    return Path(results["run_dir"]), results


def test_a_tiny_run_lowers_the_loss_and_writes_every_file(tiny_run):
    run, results = tiny_run
    for name in ("config.yaml", "metrics.jsonl", "checkpoint_last.pt", "checkpoint_best.pt",
                 "results.json", "curves.png", "attention_encoder.png", "attention_cross.png"):
        assert (run / name).is_file(), name
    assert not [p.name for p in run.iterdir() if p.name.endswith(".tmp")]
    losses = train_losses(run)
    assert losses[max(losses)] < losses[min(losses)] - 0.5
    saved = json.loads((run / "results.json").read_text())
    assert saved == results
    for key in ("bleu", "bleu_lowercase", "exact_match", "sentences", "wall_seconds",
                "alignment_accuracy", "alignment_layer", "alignment_head",
                "alignment_accuracy_head_mean"):
        assert key in saved, key
    assert saved["sentences"] == 20
    assert 0.0 <= saved["exact_match"] <= 1.0 and 0.0 <= saved["alignment_accuracy"] <= 1.0
    assert saved["steps"] == 60
    vals = [r for r in read_metrics(run / "metrics.jsonl") if r["kind"] == "val"]
    assert [r["step"] for r in vals] == [30, 60]


def test_checkpoints_load_with_weights_only_and_carry_what_resuming_needs(tiny_run):
    run, _ = tiny_run
    checkpoint = torch.load(run / "checkpoint_last.pt", weights_only=True)
    for key in ("model", "optimizer", "scheduler", "rng", "config", "tokenizers", "progress"):
        assert key in checkpoint, key
    assert checkpoint["progress"]["step"] == 60
    assert checkpoint["config"]["model"]["d_model"] == 32


def test_a_resumed_run_gives_the_losses_of_an_uninterrupted_one(tmp_path):
    # Dropout on, so that the restored random-number state matters; a stop between two
    # logged records, so that the half-filled logging window must carry over.
    common = ("model.dropout=0.1", "train.log_every=2", "train.eval_every=100")
    whole = tiny_config(tmp_path / "whole", *common, "train.max_steps=14")
    train(whole, progress_bar=False, log=lambda message: None)
    first = tiny_config(tmp_path / "split", *common, "train.max_steps=7")
    train(first, progress_bar=False, log=lambda message: None)
    # A record written after the checkpoint (a run killed hard) must not survive the resume.
    with (latest_run(first.run_path) / "metrics.jsonl").open("a") as file:
        file.write(json.dumps({"kind": "train", "step": 9, "loss": -1.0}) + "\n")
    second = tiny_config(tmp_path / "split", *common, "train.max_steps=14")
    train(second, resume=True, progress_bar=False, log=lambda message: None)
    expected = train_losses(latest_run(whole.run_path))
    resumed = train_losses(latest_run(second.run_path))
    assert sorted(resumed) == list(range(2, 15, 2))
    assert resumed == expected


def test_resume_refuses_a_different_model(tmp_path):
    config = tiny_config(tmp_path, "train.max_steps=2", "train.eval_every=2")
    train(config, progress_bar=False, log=lambda message: None)
    changed = tiny_config(tmp_path, "train.max_steps=4", "model.d_model=64")
    with pytest.raises(ValueError, match="model.d_model"):
        train(changed, resume=True, progress_bar=False, log=lambda message: None)


def test_a_non_finite_loss_stops_the_run_naming_the_step_and_keeps_the_best_checkpoint(
        tmp_path, monkeypatch):
    config = tiny_config(tmp_path, "train.max_steps=10", "train.eval_every=5")
    train(config, progress_bar=False, log=lambda message: None)
    best = latest_run(config.run_path) / "checkpoint_best.pt"
    before = digest(best)

    import attention.translation.training as training

    real_loss, calls = training.sequence_loss, []

    def loss_that_explodes(logits, labels, label_smoothing):
        loss, count = real_loss(logits, labels, label_smoothing)
        calls.append(1)
        return (loss * float("nan") if len(calls) == 3 else loss), count

    monkeypatch.setattr(training, "sequence_loss", loss_that_explodes)
    longer = tiny_config(tmp_path, "train.max_steps=20", "train.eval_every=5")
    with pytest.raises(NonFiniteLossError, match="at step 13"):
        train(longer, resume=True, progress_bar=False, log=lambda message: None)
    assert digest(best) == before
    assert load_checkpoint(latest_run(config.run_path) / "checkpoint_last.pt")[
        "progress"]["step"] == 10


def test_a_failed_checkpoint_write_leaves_the_previous_file_whole(tmp_path, monkeypatch):
    path = tmp_path / "checkpoint_last.pt"
    save_checkpoint(path, {"progress": {"step": 1}})
    before = digest(path)

    def partial_save(obj, file):
        file.write(b"half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", partial_save)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(path, {"progress": {"step": 2}})
    assert digest(path) == before
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint_last.pt"]


def test_a_checkpoint_of_another_kind_is_refused_with_its_path(tmp_path):
    path = tmp_path / "other.pt"
    torch.save({"state_dict": {}}, path)
    with pytest.raises(ValueError, match="other.pt"):
        load_checkpoint(path)


@pytest.mark.parametrize("signal_number", [signal.SIGINT, signal.SIGTERM])
def test_ctrl_c_or_sigterm_saves_a_checkpoint_and_exits_cleanly(tmp_path, signal_number):
    run_dir = tmp_path / "runs"
    command = [sys.executable, str(ROOT / "scripts" / "train.py"), "--config", str(TINY),
               f"train.run_dir={run_dir}", "train.max_steps=100000", "train.log_every=1",
               "train.eval_every=100000"]
    process = subprocess.Popen(command, stderr=subprocess.PIPE, text=True,
                               env={**os.environ, "PYTHONUNBUFFERED": "1"})
    metrics = run_dir / "tiny" / "version_0" / "metrics.jsonl"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and process.poll() is None:
        if metrics.is_file() and len(read_metrics(metrics)) >= 3:
            break
        time.sleep(0.2)
    process.send_signal(signal_number)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 130, stderr
    assert "Traceback" not in stderr
    assert "interrupted at step" in stderr
    assert f"continue with: attention-train --resume {run_dir / 'tiny' / 'version_0'}" in stderr
    checkpoint = load_checkpoint(run_dir / "tiny" / "version_0" / "checkpoint_last.pt")
    assert checkpoint["progress"]["step"] >= 3


def test_beam_search_of_one_is_greedy_search_on_a_trained_model(tiny_run):
    run, _ = tiny_run
    translator = Translator.from_checkpoint(run / "checkpoint_best.pt", device="cpu")
    model = translator.model
    src = torch.tensor([translator.encode(["the dog sees a cat"])[0]])
    memory, mask = model.encode(src), model.padding_mask(src)

    def searches(search, *args):
        cache = model.decoder.new_cache()

        def step(last):
            logits = model.decode(last, memory, mask, cache=cache)[:, -1]
            logits[:, [0, 1]] = float("-inf")
            return logits.log_softmax(-1)

        return search(step, *args) if search is greedy_search else \
            search(step, cache.reorder, *args)

    with torch.no_grad():
        greedy = searches(greedy_search, 1, 1, 2, 0, 20)
        beam = searches(beam_search, 1, 1, 2, 0, 20, 1, 1.0)
    assert greedy.tolist() == beam.tolist()
    # Translator's beam_size argument against its config: tests/translation/test_translator.py


def test_translate_command_writes_one_line_per_sentence(tiny_run, capsys, monkeypatch):
    run, _ = tiny_run
    checkpoint = str(run / "checkpoint_best.pt")
    assert translate_main(["--checkpoint", checkpoint, "the dog sleeps", "a cat runs"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2
    expected = Translator.from_checkpoint(checkpoint, device="cpu").translate(
        ["the dog sleeps", "a cat runs"], beam_size=2)
    import io

    monkeypatch.setattr(sys, "stdin", io.StringIO("the dog sleeps\na cat runs\n"))
    assert translate_main(["--checkpoint", checkpoint, "--beam-size", "2"]) == 0
    assert capsys.readouterr().out.splitlines() == expected


def test_translate_command_reports_a_missing_checkpoint(tmp_path, capsys):
    assert translate_main(["--checkpoint", str(tmp_path / "nope.pt"), "x"]) == 2
    assert "nope.pt" in capsys.readouterr().err


def test_plot_command_writes_both_heatmaps(tiny_run, tmp_path, capsys):
    run, _ = tiny_run
    out = tmp_path / "plots"
    assert plot_attention_main(["--checkpoint", str(run / "checkpoint_best.pt"),
                                "the big dog sees a cat", "--out", str(out)]) == 0
    for name in ("attention_encoder.png", "attention_cross.png"):
        assert (out / name).read_bytes()[:4] == b"\x89PNG", name


def test_learning_rate_schedules_warm_up_then_decay():
    from attention.translation.optim import cosine_schedule, inverse_sqrt_schedule

    cosine, inverse_sqrt = cosine_schedule(10, 100), inverse_sqrt_schedule(10)
    assert [round(cosine(s), 6) for s in (0, 4, 9)] == [0.1, 0.5, 1.0]
    assert cosine(54) == pytest.approx(0.5, abs=0.02) and cosine(99) == pytest.approx(0.0)
    assert cosine(500) == pytest.approx(0.0)
    assert inverse_sqrt(9) == 1.0 and inverse_sqrt(39) == pytest.approx(0.5)


def test_cosine_schedule_needs_max_steps(tmp_path):
    from attention.translation.config import ConfigError

    with pytest.raises(ConfigError, match="train.max_steps"):
        tiny_config(tmp_path, "train.schedule=cosine", "train.max_steps=null",
                    "train.max_minutes=1")


def test_a_training_set_emptied_by_the_length_limit_is_an_error_not_a_hang(tmp_path):
    from attention.translation.config import ConfigError

    config = tiny_config(tmp_path, "model.max_len=3")
    with pytest.raises(ConfigError, match="model.max_len"):
        train(config, progress_bar=False, log=lambda message: None)


def test_resume_refuses_a_changed_learning_rate(tmp_path):
    from attention.translation.config import ConfigError

    train(tiny_config(tmp_path, "train.max_steps=2", "train.eval_every=2"),
          progress_bar=False, log=lambda message: None)
    with pytest.raises(ConfigError, match="train.lr"):
        train(tiny_config(tmp_path, "train.max_steps=4", "train.lr=0.1"), resume=True,
              progress_bar=False, log=lambda message: None)


def test_written_files_are_readable_by_others(tiny_run):
    run, _ = tiny_run
    umask = os.umask(0)
    os.umask(umask)
    for name in ("checkpoint_best.pt", "results.json", "curves.png"):
        assert (run / name).stat().st_mode & 0o777 == 0o666 & ~umask, name


def test_a_user_corpus_trains_with_bpe_and_translates(tmp_path):
    """Two line-aligned files for training, tab-separated files for val and test."""
    from attention.translation.data import generate_pairs

    pairs = generate_pairs(260, seed=7)
    train_pairs, val_pairs, test_pairs = pairs[:200], pairs[200:230], pairs[230:]
    (tmp_path / "train.src").write_text("".join(p.source.capitalize() + ".\n"
                                                for p in train_pairs))
    (tmp_path / "train.tgt").write_text("".join(p.target + "\n" for p in train_pairs))
    for name, split in (("val.tsv", val_pairs), ("test.tsv", test_pairs)):
        (tmp_path / name).write_text("".join(f"{p.source.capitalize()}.\t{p.target}\n"
                                             for p in split))
    config = tiny_config(
        tmp_path / "runs", "name=mine", "data.corpus=parallel", "data.tokenizer=bpe",
        "data.vocab_size=120", f"data.train=[{tmp_path}/train.src, {tmp_path}/train.tgt]",
        f"data.val=[{tmp_path}/val.tsv]", f"data.test=[{tmp_path}/test.tsv]",
        "train.max_steps=10", "train.eval_every=10")
    results = train(config, progress_bar=False, log=lambda message: None)
    assert results["sentences"] == 30 and "alignment_accuracy" not in results
    checkpoint = torch.load(latest_run(config.run_path) / "checkpoint_best.pt",
                            weights_only=True)
    assert '"BPE"' in checkpoint["tokenizers"]["source"]
    translator = Translator.from_checkpoint(latest_run(config.run_path) / "checkpoint_best.pt",
                                            "cpu")
    assert len(translator.translate(["The dog sleeps.", "", "A cat runs."])) == 3
