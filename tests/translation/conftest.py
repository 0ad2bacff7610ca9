"""Fixtures shared by the application's tests."""

from pathlib import Path

import pytest

from attention.translation.config import load_config
from attention.translation.runs import latest_run
from attention.translation.training import Trainer, train
from attention.translation.translator import Translator

TINY = Path(__file__).resolve().parents[2] / "configs" / "tiny.yaml"
# configs/tiny.yaml at d_model=16 on a hundred toy pairs, seeded, one thread, no dropout.
SMALL = ["train.device=cpu", "train.threads=1", "model.d_model=16", "model.n_heads=2",
         "model.d_ff=32", "model.dropout=0.0", "data.toy_train_size=100",
         "data.toy_val_size=8", "data.toy_test_size=8", "eval.val_sentences=8",
         "train.batch_tokens=128"]


@pytest.fixture
def make_trainer(tmp_path):
    """``make_trainer(*overrides, name=..., resume=...)``: a seeded Trainer of the small
    tiny config in its own run folder under ``tmp_path``; closed after the test."""
    made = []

    def make(*overrides: str, name: str = "run", resume: bool = False) -> Trainer:
        config = load_config(TINY, [f"train.run_dir={tmp_path}", f"name={name}", *SMALL,
                                    *overrides])
        made.append(Trainer(config, progress_bar=False, resume=resume))
        return made[-1]

    yield make
    for trainer in made:
        trainer.close()


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory):
    """A run of two steps whose config decodes with beam 4: seconds, and the checkpoint is a
    real one. Barely trained, the model writes long sentences, and greedy and beam search
    write different ones."""
    config = load_config(TINY, [f"train.run_dir={tmp_path_factory.mktemp('runs')}",
                                "train.threads=1", "train.max_steps=2", "train.eval_every=1000",
                                "eval.val_sentences=2", "eval.beam_size=4"])
    train(config, progress_bar=False, log=lambda message: None)
    return latest_run(config.run_path) / "checkpoint_best.pt"


@pytest.fixture
def translator(checkpoint):
    return Translator.from_checkpoint(checkpoint, device="cpu")
