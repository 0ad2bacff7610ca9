"""train.precision on the CPU: the policy (setting × device → autocast dtype, loss scaling),
and training, validation and generation run under bf16 autocast as a GPU runs them, close to
float32; fp16's GradScaler path exercised with a CPU scaler."""

from __future__ import annotations

import math
from pathlib import Path
from unittest import mock

import pytest
import torch

from attention.translation import training
from attention.translation.checkpoint import load_checkpoint, save_checkpoint
from attention.translation.config import CHOICES, ConfigError, load_config
from attention.translation.data import BOS_ID
from attention.translation.evaluation import evaluate
from attention.translation.loss import target_tokens
from attention.translation.precision import (
    PRECISIONS,
    autocast,
    grad_scaler,
    precision_name,
    resolve_precision,
)
from attention.translation.training import Trainer
from attention.translation.translator import Translator

ROOT = Path(__file__).resolve().parents[2]
TINY = ROOT / "configs" / "tiny.yaml"
CPU, CUDA = torch.device("cpu"), torch.device("cuda", 0)
def one_step(trainer: Trainer) -> tuple[float, float]:
    batches = trainer.step_batches(trainer.epoch_batches())
    return trainer.train_step(batches, target_tokens(batches))


# ------------------------------------------------------------------------------ policy


def gpu(major: int):
    """A CUDA device of compute capability ``major``.0, as far as the policy asks."""
    return mock.patch("torch.cuda.get_device_capability", return_value=(major, 0))


@pytest.mark.parametrize("name, cpu, hopper, volta", [
    ("auto", None, torch.bfloat16, torch.float16),
    ("fp32", None, None, None),
    ("bf16", torch.bfloat16, torch.bfloat16, torch.bfloat16),
    ("fp16", "refused", torch.float16, torch.float16),
])
def test_the_precision_table(name, cpu, hopper, volta):
    if cpu == "refused":
        with pytest.raises(ValueError, match=r"train\.precision: fp16 needs a CUDA device, "
                                             r"got cpu .*use bf16 or fp32"):
            resolve_precision(name, CPU, key="train.precision")
    else:
        assert resolve_precision(name, CPU) is cpu
    with gpu(9):  # H100/H200 (8 for A100 answers the same)
        assert resolve_precision(name, CUDA) is hopper
    with gpu(7):  # V100 (7.0), T4 (7.5): no native bf16
        assert resolve_precision(name, CUDA) is volta


def test_auto_asks_the_training_device_itself():
    with gpu(8) as capability:
        assert resolve_precision("auto", torch.device("cuda", 1)) is torch.bfloat16
    capability.assert_called_once_with(torch.device("cuda", 1))


def test_unknown_precision_names_the_choices():
    with pytest.raises(ValueError, match=r"precision: expected one of \['auto', 'fp32', "
                                         r"'bf16', 'fp16'\], got 'fp8'"):
        resolve_precision("fp8", CPU)


def test_the_config_takes_its_choices_from_the_policy(tmp_path):
    assert CHOICES[("train", "precision")] is PRECISIONS
    assert load_config(TINY).train.precision == "auto"
    for name in PRECISIONS:
        assert load_config(TINY, [f"train.precision={name}"]).train.precision == name
    with pytest.raises(ConfigError, match=r"train\.precision: expected one of \['auto'"):
        load_config(TINY, ["train.precision=fp8"])


def test_only_fp16_scales_the_loss_and_fp32_runs_without_autocast(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # else the scaler disables
    assert grad_scaler(CUDA, torch.float16).is_enabled()
    for dtype in (None, torch.bfloat16):
        assert not grad_scaler(CUDA, dtype).is_enabled()
    with autocast(CPU, None):
        assert not torch.is_autocast_enabled("cpu")
    with autocast(CPU, torch.bfloat16):
        assert torch.is_autocast_enabled("cpu")
        assert torch.get_autocast_dtype("cpu") == torch.bfloat16
    assert [precision_name(d) for d in (None, torch.bfloat16, torch.float16)] == \
        ["fp32", "bf16", "fp16"]


def test_fp16_training_on_the_cpu_is_refused_before_any_work(make_trainer, monkeypatch):
    monkeypatch.setattr(training, "load_splits", mock.Mock(side_effect=AssertionError))
    with pytest.raises(ConfigError, match=r"train\.precision: fp16 needs a CUDA device"):
        make_trainer("train.precision=fp16")


# ------------------------------------------------------------------- bf16 on the CPU


def record_logit_dtypes(trainer: Trainer) -> list[torch.dtype]:
    dtypes = []
    forward = trainer.train_model

    def spy(*args, **kwargs):
        logits = forward(*args, **kwargs)
        dtypes.append(logits.dtype)
        return logits

    trainer.train_model = spy
    return dtypes


def test_a_bf16_training_step_is_close_to_fp32_and_updates_every_weight(make_trainer):
    # No weight decay: a weight can only move if its gradient reached it.
    fp32 = make_trainer("train.weight_decay=0.0", "train.precision=fp32", name="fp32")
    bf16 = make_trainer("train.weight_decay=0.0", "train.precision=bf16", name="bf16")
    assert (fp32.autocast_dtype, bf16.autocast_dtype) == (None, torch.bfloat16)
    assert not bf16.scaler.is_enabled()
    dtypes = record_logit_dtypes(bf16), record_logit_dtypes(fp32)
    before = {name: p.detach().clone() for name, p in bf16.model.named_parameters()}

    (loss32, norm32), (loss16, norm16) = one_step(fp32), one_step(bf16)
    assert dtypes == ([torch.bfloat16], [torch.float32])
    assert loss16 == pytest.approx(loss32, rel=2e-2)
    assert norm16 == pytest.approx(norm32, rel=5e-2)
    for name, param in bf16.model.named_parameters():
        assert param.dtype == torch.float32, name  # autocast casts; weights stay float32
        assert param.grad is not None and param.grad.dtype == torch.float32, name
        assert bool(param.grad.abs().sum() > 0), name
        assert not torch.equal(param.detach(), before[name]), name


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """configs/tiny.yaml trained 200 steps on the CPU in fp32 (seconds): confident enough
    that bf16 and fp32 search mostly agree, and where they part it is over a near tie."""
    config = load_config(TINY, [f"train.run_dir={tmp_path_factory.mktemp('runs')}",
                                "train.device=cpu", "train.threads=1", "train.precision=fp32"])
    trainer = Trainer(config, progress_bar=False)
    while trainer.progress.step < 200:
        batches = trainer.epoch_batches()
        if trainer.progress.batch_in_epoch + 1 > len(batches):
            trainer.progress.epoch, trainer.progress.batch_in_epoch = \
                trainer.progress.epoch + 1, 0
            continue
        mine = trainer.step_batches(batches)
        trainer.train_step(mine, target_tokens(mine))
    yield trainer
    trainer.close()


def translator(trainer: Trainer, precision: str) -> Translator:
    return Translator(trainer.model, trainer.src_tokenizer, trainer.tgt_tokenizer,
                      trainer.config.eval, precision=precision)


def test_validation_with_alignment_in_bf16_is_close_to_fp32(trained):
    results, dtypes = {}, {}
    decode = trained.model.decode
    for precision in ("fp32", "bf16"):
        seen = dtypes[precision] = set()

        def spy(*args, seen=seen, **kwargs):
            out = decode(*args, **kwargs)
            seen.add((out[0] if isinstance(out, tuple) else out).dtype)
            return out

        with mock.patch.object(trained.model, "decode", spy):
            results[precision] = evaluate(trained.model, trained.val_data,
                                          translator(trained, precision), label_smoothing=0.1,
                                          batch_tokens=512, alignment=True)
    assert dtypes == {"fp32": {torch.float32}, "bf16": {torch.bfloat16}}
    fp32, bf16 = results["fp32"], results["bf16"]
    assert bf16["loss"] == pytest.approx(fp32["loss"], rel=2e-2)
    assert bf16["nll"] == pytest.approx(fp32["nll"], rel=2e-2)
    words = fp32["alignment_words"]
    assert words > 100 and bf16["alignment_words"] == words
    assert bf16["alignment_hits"].shape == fp32["alignment_hits"].shape
    # The argmax over source words can flip on a near tie; a few at most.
    assert (bf16["alignment_hits"] - fp32["alignment_hits"]).abs().max() <= 0.03 * words
    assert bf16["alignment_head_mean_hits"].sum() > 0


def test_cached_generation_in_bf16_matches_fp32_up_to_near_ties(trained):
    sources = trained.val_data.sources
    fp32 = translator(trained, "fp32").generate_ids(sources, beam_size=1)
    bf16 = translator(trained, "bf16").generate_ids(sources, beam_size=1)
    same = sum(a == b for a, b in zip(fp32, bf16, strict=True))
    assert same >= 0.75 * len(sources), (same, len(sources))
    model = trained.model.eval()
    for a, b, source in zip(fp32, bf16, sources, strict=True):
        if a == b:
            continue
        # Where they part, float32 itself could hardly tell the two tokens apart.
        at = next(i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y)
        with torch.no_grad():
            log_probs = model(torch.tensor([source]), torch.tensor([[BOS_ID, *a[:at]]]))[
                0, -1].float().log_softmax(-1)
        assert float(log_probs[a[at]] - log_probs[b[at]]) < 0.05, (a, b, at)


def test_bf16_generation_keeps_the_memory_fp32_and_caches_keys_in_bf16(trained):
    """The dtype rules of cached decoding under autocast: the encoder output (after its
    final LayerNorm, which autocast runs in float32) stays float32; every layer's self- and
    cross-attention cache holds bf16 keys and values (the projections' autocast dtype);
    the step's scores are turned to float32 before log_softmax."""
    model = trained.model
    caches, memories, scores = [], [], []
    new_cache, encode, decode = model.decoder.new_cache, model._encode, model._decode

    def spy_cache(*args, **kwargs):
        caches.append(new_cache(*args, **kwargs))
        return caches[-1]

    def spy_encode(*args, **kwargs):
        memories.append(encode(*args, **kwargs))
        return memories[-1]

    def spy_decode(*args, **kwargs):
        scores.append(decode(*args, **kwargs))
        return scores[-1]

    with mock.patch.object(model.decoder, "new_cache", spy_cache), \
            mock.patch.object(model, "_encode", spy_encode), \
            mock.patch.object(model, "_decode", spy_decode):
        for beam_size in (1, 3):
            translator(trained, "bf16").generate_ids(trained.val_data.sources[:4],
                                                     beam_size=beam_size)
    assert len(caches) == 2 and memories and scores
    assert {m.dtype for m in memories} == {torch.float32}
    assert {s.dtype for s in scores} == {torch.bfloat16}
    for cache in caches:
        for self_cache, cross_cache in cache.layers:
            for kv in (self_cache.k, self_cache.v, cross_cache.k, cross_cache.v):
                assert kv.dtype == torch.bfloat16


def test_the_translator_takes_its_precision_from_the_checkpoint(trained, tmp_path):
    path = trained.save("checkpoint_precision.pt")
    assert Translator.from_checkpoint(path, "cpu").precision == "fp32"
    assert Translator.from_checkpoint(path, "cpu", precision="bf16").autocast_dtype is \
        torch.bfloat16
    checkpoint = load_checkpoint(path)
    checkpoint["config"]["train"]["precision"] = "fp16"  # as on a T4
    save_checkpoint(tmp_path / "fp16.pt", {k: v for k, v in checkpoint.items() if k != "format"})
    on_cpu = Translator.from_checkpoint(tmp_path / "fp16.pt", "cpu")
    assert on_cpu.precision == "auto" and on_cpu.autocast_dtype is None
    with pytest.raises(ValueError, match="precision: fp16 needs a CUDA device"):
        Translator.from_checkpoint(path, "cpu", precision="fp16")


# -------------------------------------------------------- fp16's loss scaling, on the CPU


# A skipped first step: the scheduler steps (the step counts) while the optimizer did not.
SKIPPED_FIRST_STEP = pytest.mark.filterwarnings(
    r"ignore:Detected call of `lr_scheduler.step\(\)` before `optimizer.step\(\)`")


@pytest.fixture
def fp16_on_cpu(monkeypatch):
    """What training does in fp16 on a GPU, on the CPU: fp16 autocast (slow on the CPU, fine
    for a few tiny steps) with torch's CPU GradScaler. ``scales`` holds each scaler's
    ``init_scale`` in the order Trainers are built (default 2**16)."""
    scales: list[float] = []
    monkeypatch.setattr(training, "_train_precision", lambda cfg, device: torch.float16)

    def scaler(device, dtype):
        assert dtype == torch.float16
        return torch.amp.GradScaler(device.type, init_scale=scales.pop(0) if scales else 2.**16)

    monkeypatch.setattr(training, "grad_scaler", scaler)
    return scales


def test_fp16_scaled_step_unscales_before_clipping(make_trainer, fp16_on_cpu, monkeypatch):
    fp16_on_cpu.extend([2.**10, 2.**10])
    scaled = make_trainer("train.precision=fp32", name="scaled")  # the config's is not read
    plain = make_trainer("train.precision=fp32", name="plain")
    plain.scaler = torch.amp.GradScaler("cpu", enabled=False)
    assert scaled.scaler.is_enabled() and scaled.autocast_dtype == torch.float16
    backward = []
    scale = scaled.scaler.scale
    monkeypatch.setattr(scaled.scaler, "scale", lambda loss: backward.append(loss) or
                        scale(loss))
    dtypes = record_logit_dtypes(scaled)

    (loss_a, norm_a), (loss_b, norm_b) = one_step(scaled), one_step(plain)
    assert dtypes == [torch.float16] and len(backward) == 1
    assert loss_a == pytest.approx(loss_b, rel=1e-5)
    # Unscaled before clipping: the norm is the true gradient's, not 1024 times it.
    assert norm_a == pytest.approx(norm_b, rel=1e-3)
    for (name, a), b in zip(scaled.model.named_parameters(), plain.model.parameters(),
                            strict=True):
        # Where fp16 alone underflows, the scaled gradient is the better one: close, not equal.
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-2, atol=5e-5, msg=name)
        assert scaled.optimizer.state[a]["step"] == 1, name  # the optimizer stepped
    assert scaled.scaler.get_scale() == 2.**10  # no overflow: kept (growth after 2000)
    assert scaled.progress.step == 1


@SKIPPED_FIRST_STEP
def test_fp16_overflow_skips_the_step_without_error_and_lowers_the_scale(make_trainer,
                                                                         fp16_on_cpu):
    fp16_on_cpu.append(2.**127)  # the scaled loss overflows float32: gradients are inf
    trainer = make_trainer("train.precision=fp32")
    before = {name: p.detach().clone() for name, p in trainer.model.named_parameters()}
    loss, grad_norm = one_step(trainer)  # no NonFiniteLossError
    assert math.isfinite(loss) and not math.isfinite(grad_norm)
    for name, param in trainer.model.named_parameters():
        assert torch.equal(param.detach(), before[name]), name  # the step was skipped
    assert trainer.scaler.get_scale() == 2.**126
    assert trainer.progress.step == 1  # it counts as a step
    loss, grad_norm = one_step(trainer)
    assert not math.isfinite(grad_norm) and trainer.scaler.get_scale() == 2.**125


def test_a_non_finite_loss_still_stops_fp16_training(make_trainer, fp16_on_cpu, monkeypatch):
    trainer = make_trainer("train.precision=fp32")
    real_loss = training.sequence_loss
    monkeypatch.setattr(training, "sequence_loss", lambda *args: (
        real_loss(*args)[0] * float("nan"), real_loss(*args)[1]))
    with pytest.raises(training.NonFiniteLossError, match="loss is nan at step 1"):
        one_step(trainer)


@SKIPPED_FIRST_STEP
def test_the_scaler_state_round_trips_through_a_checkpoint(make_trainer, fp16_on_cpu):
    fp16_on_cpu.extend([2.**127, 2.**16])
    first = make_trainer("train.precision=fp32", name="first")
    one_step(first)  # overflow: the scale halves
    one_step(first)
    saved = first.scaler.state_dict()
    assert saved["scale"] == 2.**125 and saved["_growth_tracker"] == 0
    checkpoint = load_checkpoint(first.save("checkpoint_last.pt"))
    assert checkpoint["scaler"] == saved

    second = make_trainer("train.precision=fp32", name="second")
    assert second.scaler.get_scale() == 2.**16
    second.restore(checkpoint)
    assert second.scaler.state_dict() == saved

    resumed = make_trainer("train.precision=fp32", name="first", resume=True)
    assert resumed.scaler.state_dict() == saved and resumed.progress.step == 2


def test_a_run_without_loss_scaling_saves_an_empty_scaler_state_that_fp16_resumes_from(
        make_trainer, monkeypatch):
    first = make_trainer("train.precision=bf16", name="run")
    one_step(first)
    checkpoint = load_checkpoint(first.save("checkpoint_last.pt"))
    assert checkpoint["scaler"] == {}
    monkeypatch.setattr(training, "_train_precision", lambda cfg, device: torch.float16)
    monkeypatch.setattr(training, "grad_scaler",
                        lambda device, dtype: torch.amp.GradScaler(device.type))
    resumed = make_trainer("train.precision=bf16", name="run", resume=True)
    assert resumed.scaler.is_enabled() and resumed.scaler.get_scale() == 2.**16
    # And a checkpoint from before the scaler was saved at all.
    del checkpoint["scaler"]
    resumed.restore(checkpoint)
    assert resumed.progress.step == 1
