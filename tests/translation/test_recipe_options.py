"""The training recipe's options at tiny size: numbered checkpoints and their average
(train.keep_last, save_every, average_last), early stopping (train.patience), one vocabulary
for both sides with all embeddings tied (data.shared_vocab, model.tie_embeddings: all),
tokenizers read from files (data.tokenizer_files) and TensorBoard (train.tensorboard)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from attention.translation import training
from attention.translation.checkpoint import AVERAGE, load_checkpoint, numbered_checkpoints
from attention.translation.config import Config, ConfigError, load_config
from attention.translation.data import UNK_ID, train_tokenizer
from attention.translation.translator import Translator

ROOT = Path(__file__).resolve().parents[2]
TINY = ROOT / "configs" / "tiny.yaml"


def run(make_trainer, *overrides: str, name: str = "run"):
    trainer = make_trainer(*overrides, name=name)
    results = trainer.run()
    records = [json.loads(line) for line in
               (trainer.run_dir / "metrics.jsonl").read_text().splitlines()]
    return trainer, results, records


def test_keep_last_keeps_the_last_numbered_checkpoints_and_one_of_the_last_step(make_trainer):
    trainer, _, _ = run(make_trainer, "train.max_steps=11", "train.eval_every=4",
                        "train.keep_last=3", "train.save_every=2")
    steps = [step for step, _ in numbered_checkpoints(trainer.run_dir)]
    assert steps == [8, 10, 11]
    for step, path in numbered_checkpoints(trainer.run_dir):
        assert load_checkpoint(path)["progress"]["step"] == step


def test_numbered_checkpoints_follow_validation_without_save_every(make_trainer):
    trainer, _, _ = run(make_trainer, "train.max_steps=12", "train.eval_every=4",
                        "train.keep_last=5")
    assert [step for step, _ in numbered_checkpoints(trainer.run_dir)] == [4, 8, 12]


def test_a_new_run_drops_numbered_checkpoints_it_did_not_write(make_trainer):
    first, _, _ = run(make_trainer, "train.max_steps=6", "train.eval_every=2",
                      "train.keep_last=5")
    assert len(numbered_checkpoints(first.run_dir)) == 3
    again = make_trainer("train.max_steps=6", "train.eval_every=2", "train.keep_last=5")
    assert numbered_checkpoints(again.run_dir) == []
    assert not (again.run_dir / AVERAGE).exists()


def test_average_last_scores_the_mean_of_the_last_checkpoints_on_test(make_trainer):
    trainer, results, records = run(make_trainer, "train.max_steps=8", "train.eval_every=4",
                                    "train.keep_last=3", "train.save_every=2",
                                    "train.average_last=2")
    assert results["checkpoint"] == AVERAGE
    assert results["averaged_steps"] == [6, 8]
    assert set(results["checkpoint_best"]) >= {"bleu", "chrf", "ter"}
    averaged = load_checkpoint(trainer.run_dir / AVERAGE)["model"]
    six, eight = (load_checkpoint(path)["model"] for step, path in
                  numbered_checkpoints(trainer.run_dir) if step in (6, 8))
    for key, value in averaged.items():
        if value.is_floating_point():
            torch.testing.assert_close(value, (six[key] + eight[key]) / 2)
    # The test scores are those of the average: the model holds its weights at the end.
    assert torch.equal(trainer.model.state_dict()["lm_head.weight"], averaged["lm_head.weight"])
    (val_average,) = [r for r in records if r["kind"] == "val_average"]
    assert val_average["averaged_steps"] == [6, 8]
    assert {"bleu", "chrf", "ter", "loss"} <= set(val_average)


def test_average_last_with_fewer_checkpoints_than_asked_averages_those_there(make_trainer):
    _, results, _ = run(make_trainer, "train.max_steps=3", "train.eval_every=10",
                        "train.keep_last=4", "train.average_last=4")
    assert results["averaged_steps"] == [3]


def test_patience_stops_after_validations_without_improvement(make_trainer, monkeypatch):
    scores = iter([10.0, 12.0, 11.0, 12.0, 9.0, 50.0])  # best at the second validation

    def fixed_evaluate(*args, **kwargs):
        return {"loss": 1.0, "nll": 1.0, "bleu": next(scores), "bleu_lowercase": 0.0,
                "chrf": 0.0, "ter": 0.0, "exact_match": 0.0, "sentences": 1}

    monkeypatch.setattr(training, "evaluate", fixed_evaluate)
    trainer = make_trainer("train.max_steps=100", "train.eval_every=2", "train.patience=3")
    with trainer.stop.installed():
        reason = None
        while reason is None:
            reason = trainer.train_epoch()
    assert reason.startswith("patience=3")
    assert trainer.progress.step == 10  # validations at 2, 4 (best), 6, 8, 10
    assert trainer.progress.best_step == 4
    assert trainer.progress.validations_without_improvement == 3


def test_patience_survives_a_resume(make_trainer):
    trainer = make_trainer("train.max_steps=4", "train.eval_every=2", "train.patience=5")
    trainer.progress.validations_without_improvement = 2
    trainer.save_last()
    resumed = make_trainer("train.max_steps=4", "train.eval_every=2", "train.patience=5",
                           resume=True)
    assert resumed.progress.validations_without_improvement == 2


def test_shared_vocabulary_ties_all_embeddings_and_survives_the_checkpoint(make_trainer):
    trainer, _, _ = run(make_trainer, "data.shared_vocab=true", "model.tie_embeddings=all",
                        "train.max_steps=2", "train.eval_every=2", "data.tokenizer=bpe",
                        "data.vocab_size=120")
    assert trainer.tokenizers["source"] == trainer.tokenizers["target"]
    model = trainer.model
    assert model.src_embed.weight is model.tgt_embed.weight is model.lm_head.weight
    # Both languages' text is in the one vocabulary: no unknown token on either side.
    pairs = trainer.train_data.pairs
    for text in [p.source for p in pairs] + [p.target for p in pairs]:
        assert UNK_ID not in trainer.src_tokenizer.encode(text).ids, text
    assert trainer.src_tokenizer.get_vocab_size() <= 120
    loaded = Translator.from_checkpoint(trainer.run_dir / "checkpoint_best.pt", device="cpu")
    assert loaded.model.src_embed.weight is loaded.model.lm_head.weight
    assert loaded.translate("the dog sleeps")


@pytest.mark.parametrize("overrides, key", [
    (["model.tie_embeddings=all"], "model.tie_embeddings"),
    (["model.tie_embeddings=source"], "model.tie_embeddings"),
    (["train.average_last=3"], "train.average_last"),
    (["train.keep_last=2", "train.average_last=3"], "train.average_last"),
    (["train.save_every=10"], "train.save_every"),
    (["train.keep_last=0"], "train.keep_last"),
    (["train.patience=0"], "train.patience"),
    (["data.tokenizer_files=[a, b, c]"], "data.tokenizer_files"),
])
def test_recipe_options_that_cannot_run_name_their_key(overrides, key):
    with pytest.raises(ConfigError, match=f"^{key}:"):
        load_config(TINY, overrides)


def test_tokenizer_files_must_exist_and_agree_with_shared_vocab_and_lowercase(tmp_path):
    file = tmp_path / "tokenizer.json"
    with pytest.raises(ConfigError, match="data.tokenizer_files: file not found"):
        load_config(TINY, [f"data.tokenizer_files=[{file}]"])
    file.write_text("{}")
    with pytest.raises(ConfigError, match="^data.shared_vocab:"):
        load_config(TINY, [f"data.tokenizer_files=[{file}, {file}]", "data.shared_vocab=true"])
    with pytest.raises(ConfigError, match="^data.lowercase:"):
        load_config(TINY, [f"data.tokenizer_files=[{file}]", "data.lowercase=true"])
    # One file is one vocabulary: all embeddings may be tied.
    load_config(TINY, [f"data.tokenizer_files=[{file}]", "model.tie_embeddings=all"])


def test_tensorboard_without_its_package_is_refused_before_training(make_trainer,
                                                                     monkeypatch):
    real = training.importlib.util.find_spec
    monkeypatch.setattr(training.importlib.util, "find_spec",
                        lambda name: None if name == "tensorboard" else real(name))
    # The config itself loads (a checkpoint of such a run is read on machines without it).
    assert load_config(TINY, ["train.tensorboard=true"]).train.tensorboard
    with pytest.raises(ConfigError, match="^train.tensorboard:.*attention-blocks\\[tensorboard"):
        make_trainer("train.tensorboard=true")


def test_a_tokenizer_file_that_is_not_one_names_its_key(make_trainer, tmp_path):
    garbage = tmp_path / "tokenizer.model"
    garbage.write_bytes(b"\x00\x01 not a tokenizer")
    with pytest.raises(ConfigError, match=r"^data.tokenizer_files\[0\]: .*tokenizer.model"):
        make_trainer(f"data.tokenizer_files=[{garbage}]")


def test_a_resume_drops_numbered_checkpoints_past_its_step(make_trainer):
    first, _, _ = run(make_trainer, "train.max_steps=6", "train.eval_every=2",
                      "train.keep_last=5")
    last = load_checkpoint(first.run_dir / "checkpoint_last.pt")
    last["progress"]["step"] = 4  # as if the run had stopped hard after step 4's save
    torch.save(last, first.run_dir / "checkpoint_last.pt")
    resumed = make_trainer("train.max_steps=6", "train.eval_every=2", "train.keep_last=5",
                           resume=True)
    assert [step for step, _ in numbered_checkpoints(resumed.run_dir)] == [2, 4]


@pytest.mark.parametrize("name", ["multi30k_de_en", "multi30k_en_de", "multi30k_fr_en",
                                  "multi30k_de_en_gpu"])
def test_the_multi30k_recipe_configs_are_valid(name):
    raw = yaml.safe_load((ROOT / "configs" / f"{name}.yaml").read_text())
    config = Config.from_dict(raw, check_files=False)
    assert config.data.shared_vocab and config.model.tie_embeddings == "all"
    assert config.train.average_last <= config.train.keep_last
    languages = name.split("_")[1:3]
    assert [config.data.src_lang, config.data.tgt_lang] == languages


def test_tokenizer_files_replace_training_one_for_both_sides_or_one_each(make_trainer,
                                                                         tmp_path):
    probe = make_trainer(name="probe")
    sources = [p.source for p in probe.train_data.pairs]
    targets = [p.target for p in probe.train_data.pairs]
    joint = tmp_path / "joint.json"
    train_tokenizer(sources + targets, "bpe", 90).save(str(joint))
    source, target = tmp_path / "source.json", tmp_path / "target.json"
    train_tokenizer(sources, "word", 200).save(str(source))
    train_tokenizer(targets, "word", 200).save(str(target))

    one = make_trainer(f"data.tokenizer_files=[{joint}]", "model.tie_embeddings=all",
                       name="one")
    assert one.tokenizers["source"] == one.tokenizers["target"]
    assert one.src_tokenizer.get_vocab() == train_tokenizer(
        sources + targets, "bpe", 90).get_vocab()
    two = make_trainer(f"data.tokenizer_files=[{source}, {target}]", name="two")
    specials = {"<pad>", "<bos>", "<eos>", "<unk>"}
    source_words = {w for s in sources for w in s.split()}
    target_words = {w for s in targets for w in s.split()}
    assert set(two.src_tokenizer.get_vocab()) == source_words | specials
    assert set(two.tgt_tokenizer.get_vocab()) == target_words | specials


def test_tensorboard_gets_the_records_of_metrics_jsonl(make_trainer):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    trainer, _, records = run(make_trainer, "train.tensorboard=true", "train.max_steps=4",
                              "train.eval_every=2", "train.log_every=2")
    events = EventAccumulator(str(trainer.run_dir / "tensorboard"))
    events.Reload()
    tags = events.Tags()["scalars"]
    assert {"train/loss", "val/bleu", "val/chrf", "val/ter"} <= set(tags)
    logged = [r["loss"] for r in records if r["kind"] == "train"]
    assert [e.value for e in events.Scalars("train/loss")] == pytest.approx(logged)
    assert [e.step for e in events.Scalars("val/bleu")] == [2, 4]
