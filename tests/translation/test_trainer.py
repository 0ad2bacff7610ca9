"""The Trainer's steps one at a time, at tiny sizes: gradient accumulation, the weight-decay
groups, the label-smoothed loss, validation and checkpoints, backpropagation to every weight."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from attention.translation.checkpoint import load_checkpoint
from attention.translation.data import PAD_ID
from attention.translation.loss import sequence_loss, target_tokens
from attention.translation.training import Trainer

ROOT = Path(__file__).resolve().parents[2]
TINY = ROOT / "configs" / "tiny.yaml"
def one_step(trainer: Trainer) -> tuple[float, float]:
    batches = trainer.step_batches(trainer.epoch_batches())
    return trainer.train_step(batches, target_tokens(batches))


def assert_same_state(a, b, where: str = "state") -> None:
    """Nested state dicts equal exactly, tensors included."""
    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for key in a:
            assert_same_state(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_same_state(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


def test_accumulated_batches_give_the_loss_and_gradients_of_one_concatenated_batch(
        make_trainer):
    accumulating = make_trainer("train.grad_accum_steps=3", "train.clip_norm=1e9",
                                name="accumulating")
    whole = make_trainer(name="whole")  # the same seed: the same initial weights
    indices = accumulating.epoch_batches()[:3]
    batches = accumulating.step_batches(accumulating.epoch_batches())
    counts = [target_tokens([batch]) for batch in batches]
    assert len(batches) == 3 and len(set(counts)) == 3, counts
    loss_sum, _ = accumulating.train_step(batches, sum(counts))

    # The mean loss per target token of the three batches as one, by autograd.
    src, tgt_in, tgt_out = whole.train_data.batch([i for batch in indices for i in batch])
    loss, count = sequence_loss(whole.model(src, tgt_in), tgt_out,
                                whole.config.train.label_smoothing)
    assert int(count) == sum(counts)
    mean = loss / count
    mean.backward()

    assert loss_sum / sum(counts) == pytest.approx(mean.detach().item(), rel=1e-6)
    grads = dict(whole.model.named_parameters())
    for name, param in accumulating.model.named_parameters():
        torch.testing.assert_close(param.grad, grads[name].grad, msg=name)


def expected_groups(tied: bool, learned: bool) -> tuple[list[str], list[str]]:
    """The decayed and the not decayed parameter names of the 1-layer model, in order."""
    attention = [f"{kind}.{proj}.weight" for kind in ("self_attn", "cross_attn")
                 for proj in ("q_proj", "k_proj", "v_proj", "out_proj")]
    feed_forward = ["feed_forward.linear1.weight", "feed_forward.linear2.weight"]
    decay = ["src_embed.weight", "tgt_embed.weight"]
    decay += ["encoder.positional.weight"] * learned
    decay += [f"encoder.layers.0.{n}" for n in attention[:4] + feed_forward]
    decay += ["decoder.positional.weight"] * learned
    decay += [f"decoder.layers.0.{n}" for n in attention + feed_forward]
    decay += [] if tied else ["lm_head.weight"]
    no_decay = ["encoder.layers.0.norm1.weight", "encoder.layers.0.norm2.weight",
                "encoder.norm.weight", "decoder.layers.0.norm1.weight",
                "decoder.layers.0.norm2.weight", "decoder.layers.0.norm3.weight",
                "decoder.norm.weight"]
    return decay, no_decay


@pytest.mark.parametrize("tied, positional", [(True, "sinusoidal"), (False, "learned")])
def test_weight_decay_applies_to_the_matrices_and_to_a_tied_weight_once(make_trainer, tied,
                                                                       positional):
    trainer = make_trainer(f"model.tie_embeddings={str(tied).lower()}",
                           f"model.positional={positional}", "train.weight_decay=0.05")
    model, groups = trainer.model, trainer.optimizer.param_groups
    names = {id(param): name for name, param in model.named_parameters()}
    decayed, not_decayed = ([names[id(p)] for p in group["params"]] for group in groups)
    assert [group["weight_decay"] for group in groups] == [0.05, 0.0]
    assert (decayed, not_decayed) == expected_groups(tied, positional == "learned")
    assert (model.lm_head.weight is model.tgt_embed.weight) == tied
    every_name = [name for name, _ in model.named_parameters(remove_duplicate=False)]
    assert len(every_name) == len(decayed) + len(not_decayed) + tied  # lm_head.weight


def test_label_smoothing_matches_the_formula_on_a_hand_computed_case():
    # Position 0: p = (1, 2, 3, 4) / 10, label 2; position 1: a pad label, whose logits must
    # not count; position 2: uniform p, label 1. Per label, with ε over V classes:
    # (1 - ε) · (-log p_y) + ε · mean_k(-log p_k).
    logits = torch.tensor([[[0.0, math.log(2), math.log(3), math.log(4)],
                            [50.0, -50.0, 3.0, 0.0],
                            [0.0, 0.0, 0.0, 0.0]]])
    labels = torch.tensor([[2, PAD_ID, 1]])
    p = [0.1, 0.2, 0.3, 0.4]
    eps = 0.1
    first = (1 - eps) * -math.log(0.3) + eps * sum(-math.log(q) for q in p) / 4
    uniform = math.log(4)  # every class costs log V: smoothing changes nothing
    loss, count = sequence_loss(logits, labels, eps)
    assert int(count) == 2
    assert float(loss) == pytest.approx(first + uniform, rel=1e-6)
    assert float(loss) == pytest.approx(2.620677, abs=2e-6)  # the same, worked on paper
    unsmoothed, _ = sequence_loss(logits, labels, 0.0)
    assert float(unsmoothed) == pytest.approx(-math.log(0.3) + math.log(4), rel=1e-6)


def test_validate_writes_a_val_record_and_saves_the_last_and_best_checkpoints(make_trainer):
    trainer = make_trainer()
    one_step(trainer)
    trainer.validate()
    run = trainer.run_dir
    record = json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])
    assert record["kind"] == "val" and record["step"] == 1
    assert record["sentences"] == 8 and {"loss", "nll", "bleu", "exact_match"} <= record.keys()
    for name in ("checkpoint_last.pt", "checkpoint_best.pt"):
        progress = load_checkpoint(run / name)["progress"]
        assert (progress["step"], progress["last_eval_step"], progress["best_step"]) == \
            (1, 1, 1), name
    assert trainer.progress.last_saved_step == 1
    assert (run / "curves.png").is_file()


def test_save_then_restore_on_a_fresh_trainer_gives_the_same_state(make_trainer):
    # Dropout on, so that the next step depends on the restored random stream too.
    first = make_trainer("model.dropout=0.1", name="first")
    one_step(first)
    one_step(first)
    checkpoint = load_checkpoint(first.save("checkpoint_last.pt"))
    second = make_trainer("model.dropout=0.1", name="second")
    assert second.progress.step == 0
    second.restore(checkpoint)

    assert second.progress == first.progress and second.progress.step == 2
    assert_same_state(second.model.state_dict(), first.model.state_dict(), "model")
    assert_same_state(second.optimizer.state_dict(), first.optimizer.state_dict(), "optimizer")
    assert_same_state(second.scheduler.state_dict(), first.scheduler.state_dict(), "scheduler")
    # The same next step: the second continues from the restored random state, the first
    # from the same state set again.
    second_step = one_step(second)
    torch.set_rng_state(checkpoint["rng"]["torch"])
    assert one_step(first) == second_step
    assert_same_state(second.model.state_dict(), first.model.state_dict(), "next step")


@pytest.mark.parametrize("tied", [True, False])
def test_one_train_step_reaches_and_changes_every_parameter(make_trainer, tied):
    # No weight decay: a weight can only move if its gradient reached it.
    trainer = make_trainer("train.weight_decay=0.0", "model.positional=learned",
                           f"model.tie_embeddings={str(tied).lower()}")
    before = {name: param.detach().clone() for name, param in trainer.model.named_parameters()}
    one_step(trainer)
    for name, param in trainer.model.named_parameters():
        assert param.grad is not None and bool(param.grad.abs().sum() > 0), name
        assert not torch.equal(param.detach(), before[name]), name


def test_a_run_trains_and_resumes_with_the_attention_variants(make_trainer):
    """Issue 27's keys in a run's config: the model is built with them, trains, and comes
    back from its checkpoint with them."""
    from attention import MultiHeadAttention
    from attention.translation.translator import Translator

    variants = ["model.n_kv_heads=1", "model.window=3", "model.global_every=2",
                "model.alibi=true", "model.softcap=10.0", "model.qk_norm=true",
                "model.norm=rmsnorm", "model.activation=swiglu", "train.max_steps=2",
                "model.n_encoder_layers=3", "model.n_decoder_layers=2"]
    trainer = make_trainer(*variants)
    trainer.run()
    attentions = [m for m in trainer.model.modules() if isinstance(m, MultiHeadAttention)]
    assert all(m.n_kv_heads == 1 and m.q_norm is not None for m in attentions)
    assert [layer.self_attn.window for layer in trainer.model.encoder.layers] == \
        [None, (3, 3), None]
    translator = Translator.from_checkpoint(trainer.run_dir / "checkpoint_last.pt",
                                            device="cpu")
    for loaded, trained in zip(translator.model.state_dict().items(),
                               trainer.model.state_dict().items(), strict=True):
        assert loaded[0] == trained[0]
        torch.testing.assert_close(loaded[1], trained[1])
    assert translator.translate(["a b c"])  # decodes on the windowed, grouped caches
