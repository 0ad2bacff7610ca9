"""A time budget (train.max_minutes) ends the cosine schedule when the time ends: a slower
machine trains fewer steps, and still ends on an annealed model."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

import attention.translation.training as training
from attention.translation.config import load_config
from attention.translation.plotting import read_metrics

ROOT = Path(__file__).resolve().parents[2]
TINY = ROOT / "configs" / "tiny.yaml"


def slow_steps(monkeypatch, seconds: float) -> None:
    """Every step takes at least ``seconds`` more: a slow or busy machine."""
    real_step = training.Trainer.train_step

    def slow_step(self, *args, **kwargs):
        time.sleep(seconds)
        return real_step(self, *args, **kwargs)

    monkeypatch.setattr(training.Trainer, "train_step", slow_step)


def test_the_cosine_ends_when_the_time_budget_does(tmp_path, monkeypatch):
    slow_steps(monkeypatch, 0.05)
    config = load_config(TINY, [
        f"train.run_dir={tmp_path}", "train.threads=1", "train.schedule=cosine",
        "train.max_steps=100000", "train.max_minutes=0.08", "train.warmup_steps=5",
        "train.log_every=5", "train.eval_every=100000", "eval.val_sentences=2"])
    messages = []
    results = training.train(config, progress_bar=False, log=messages.append)
    horizon = results["schedule_horizon"]
    assert results["schedule_horizon_from"] == "max_minutes"
    assert 20 <= horizon < 200 and results["steps"] == horizon  # ~4.8 s of 0.05 s steps
    assert any("the cosine ends there" in m for m in messages)
    assert any(f"the cosine's end, fitted to the time budget at step {horizon}" in m
               for m in messages)
    records = [r for r in read_metrics(Path(results["run_dir"]) / "metrics.jsonl")
               if r["kind"] == "train"]
    peak = config.train.lr
    assert records[-1]["lr"] < 0.05 * peak  # annealed, not cut off at full rate
    saved = json.loads((Path(results["run_dir"]) / "results.json").read_text())
    assert saved["schedule_horizon"] == horizon


def test_without_a_budget_the_cosine_ends_at_max_steps(tmp_path):
    config = load_config(TINY, [f"train.run_dir={tmp_path}", "train.threads=1",
                                "train.schedule=cosine", "train.max_steps=6",
                                "train.eval_every=100000",
                                "eval.val_sentences=2"])
    results = training.train(config, progress_bar=False, log=lambda message: None)
    assert (results["schedule_horizon"], results["schedule_horizon_from"]) == (6, "max_steps")


def test_a_resumed_run_keeps_its_fitted_horizon(tmp_path, monkeypatch):
    slow_steps(monkeypatch, 0.05)
    real_step, fitted = training.Trainer.train_step, []

    def stop_at_step_25(self, *args, **kwargs):  # Ctrl-C there
        if self.progress.step == 25:
            self.stop.requested = True
            fitted.append(self._cosine().total_steps)
        return real_step(self, *args, **kwargs)

    monkeypatch.setattr(training.Trainer, "train_step", stop_at_step_25)
    config = load_config(TINY, [
        f"train.run_dir={tmp_path}", "train.threads=1", "train.schedule=cosine",
        "train.max_steps=100000", "train.max_minutes=0.08", "train.warmup_steps=5",
        "train.log_every=5", "train.eval_every=100000", "eval.val_sentences=2"])
    with pytest.raises(training.TrainingInterrupted):
        training.train(config, progress_bar=False, log=lambda message: None)
    assert fitted and fitted[0] < 100000
    resumed = training.Trainer(config, resume=True, progress_bar=False,
                               log=lambda message: None)
    assert (resumed._cosine().total_steps, resumed._cosine().fitted) == (fitted[0], True)
    resumed.close()
