"""Train a translation Transformer from a :class:`~attention.translation.config.Config`.

:func:`train` builds a :class:`Trainer` and runs it. The Trainer holds the run's state as
attributes (data and tokenizers, model, optimizer and scheduler, its
:class:`~attention.translation.run_state.Progress`, this process's place among the ranks, the
metrics file, the clock) and does each stage in a method of its own: :meth:`~Trainer.run`
loops over epochs of length-bucketed token batches, :meth:`~Trainer.train_step` makes one
optimizer step (gradient accumulation, label-smoothed loss, clipping, warmup),
:meth:`~Trainer.validate` scores the validation split and writes the checkpoints,
:meth:`~Trainer.save` and :meth:`~Trainer.restore` write and read them, and
:meth:`~Trainer.final_evaluation` scores the best weights on the test split and writes
``runs/NAME/results.json``.

The Trainer is where the steps are put in order; what each step uses lives beside it:
:mod:`~attention.translation.optim` (AdamW and the learning-rate schedules),
:mod:`~attention.translation.loss` (the label-smoothed loss),
:mod:`~attention.translation.evaluation` (scoring a split) and
:mod:`~attention.translation.run_state` (progress, random state, resume checks, the stop flag,
``metrics.jsonl``).

Under ``torchrun`` the same loop runs on every rank (see
:mod:`attention.translation.distributed`): a step's batches are shared out, gradients are
averaged by ``DistributedDataParallel``, and rank 0 alone writes files while the others wait.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import json
import math
import shlex
import sys
import time
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import torch
import yaml
from tokenizers import Tokenizer
from torch import Tensor, nn
from tqdm import tqdm

from .. import features
from ..common.devices import resolve_device
from ..models import Transformer
from .averaging import average_checkpoints
from .checkpoint import (
    AVERAGE,
    config_from_checkpoint,
    load_checkpoint,
    model_from_config,
    numbered_checkpoint,
    numbered_checkpoints,
    save_checkpoint,
    write_atomic,
)
from .config import Config, ConfigError, DataConfig, TrainConfig
from .data import PAD_ID, Pair, ParallelData, load_splits, token_batches, train_tokenizer
from .distributed import (
    Distributed,
    distributed_session,
    elastic_restart,
    restarts_allowed,
    shard,
)
from .evaluation import COMPARED, evaluate, results_summary, score_test_split, validation_scores
from .loss import Batch, sequence_loss, target_tokens
from .optim import CosineSchedule, learning_rate_schedule, make_optimizer
from .precision import autocast, grad_scaler, precision_name, resolve_precision
from .run_state import (
    MetricsWriter,
    Progress,
    RngStates,
    StopFlag,
    check_resumable,
    restore_rng,
    rng_state,
)
from .runs import new_run, resumed_run, run_versions
from .translator import Translator

__all__ = ["CheckpointSaveError", "NonFiniteLossError", "Trainer", "TrainingInterrupted",
           "train", "train_data_limit"]


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite; the message names the step."""


class TrainingInterrupted(RuntimeError):
    """Ctrl-C: the run saved ``checkpoint_last.pt`` and stopped; ``--resume`` continues it."""


class CheckpointSaveError(RuntimeError):
    """A checkpoint could not be written (a full disk, …); the file it would have replaced is
    kept whole, and ``--resume`` continues from it."""


def train_data_limit(config: Config) -> int:
    """The longest training pair kept, in tokens."""
    return min(config.data.max_tokens, config.model.max_len)


def _train_precision(cfg: TrainConfig, device: torch.device) -> torch.dtype | None:
    """``train.precision``'s autocast dtype on the training device, or a ConfigError."""
    try:
        return resolve_precision(cfg.precision, device, key="train.precision")
    except ValueError as error:
        raise ConfigError(str(error)) from None


def train(config: Config, *, resume: bool | str | Path = False,
          progress_bar: bool | None = None,
          log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Run the training that ``config`` describes; return the test results (with
    ``run_dir``, the run's folder).

    Each run has a folder of its own, ``config.run_path/version_N`` (see
    :mod:`attention.translation.runs`): a new run never replaces an earlier one. ``resume``
    continues the latest run there (``True``) or the run folder given.

    Writes in the run's folder: ``config.yaml``, ``metrics.jsonl``,
    ``checkpoint_last.pt``, ``checkpoint_best.pt`` (best validation BLEU), ``curves.png``,
    attention heatmaps of one test sentence and ``results.json``. ``log`` takes the progress
    messages (default: stderr); ``progress_bar`` defaults to whether stderr is a terminal.

    Started by ``torchrun`` (see :mod:`attention.translation.distributed`), each process
    trains a :class:`~torch.nn.parallel.DistributedDataParallel` replica on its share of every
    step's batches; rank 0 alone logs, validates and writes the files, and every rank returns
    the same results.

    Raises:
        NonFiniteLossError: the loss became NaN or infinite (checkpoints are left as they were).
        TrainingInterrupted: Ctrl-C; ``checkpoint_last.pt`` holds the last finished step.
    """
    with distributed_session(config.train.device, config.train.dist_timeout_minutes) as world:
        log = (log or _write_to_stderr) if world.is_main else _quiet
        run_dir = None
        if not resume and elastic_restart():
            # torchrun restarted the run after a failure (--max-restarts): continue it, in the
            # newest run folder (the one that failed), from its checkpoint if it saved one.
            versions = run_versions(config.run_path) if world.is_main else []
            newest = world.broadcast(str(versions[-1][1]) if versions else None)
            if newest is not None and (Path(newest) / "checkpoint_last.pt").is_file():
                resume = newest
                log(f"torchrun restarted the processes: resuming {newest}")
            else:
                run_dir = newest
        trainer = Trainer(config, world, resume=resume, run_dir=run_dir,
                          progress_bar=progress_bar, log=log)
        return trainer.run()


def _write_to_stderr(message: str) -> None:
    tqdm.write(message, file=sys.stderr)


def _quiet(message: str) -> None:
    """The log of a rank other than 0, and of a Trainer given none."""


class Trainer:
    """One training run: its state on the object, each stage of it a method.

    Built from ``config`` for this process's place among the ranks (``world``; one process on
    ``train.device`` when ``None``) and, with ``resume``, from the run's
    ``checkpoint_last.pt``. Its attributes: ``train_data``, ``val_data``, ``test_data``,
    ``tokenizers``; ``model``, ``train_model`` (what the steps call: the model, wrapped in
    ``DistributedDataParallel`` under torchrun, compiled with ``train.compile``),
    ``optimizer``, ``scheduler``, ``scaler`` (fp16's loss scaling, else disabled),
    ``autocast_dtype`` (``train.precision`` on this device), ``translator``; ``progress``;
    ``metrics`` (rank 0's ``metrics.jsonl``, else ``None``); the clock (``session_start``,
    ``window_start``) and ``stop`` (Ctrl-C).

    :meth:`run` trains and then evaluates, once: it closes the metrics file and the progress
    bar, as :meth:`close` does for a Trainer whose methods are called one by one.
    """

    def __init__(self, config: Config, world: Distributed | None = None, *,
                 resume: bool | str | Path = False, run_dir: str | Path | None = None,
                 progress_bar: bool | None = None,
                 log: Callable[[str], None] | None = None) -> None:
        self.started = time.perf_counter()
        self.config = config
        self.world = world or Distributed(device=resolve_device(config.train.device))
        self.run_dir = self._run_folder(resume, run_dir)
        try:
            self._set_up(resume, progress_bar, log)
        except BaseException:
            # Bad data or settings found while setting up: no empty version_N is left behind,
            # unless torchrun may restart the job, which continues the newest folder: without
            # this one, that would be an older, finished run.
            if self.world.is_main and not resume and run_dir is None \
                    and not restarts_allowed():
                with contextlib.suppress(OSError):  # not empty: it keeps what was written
                    self.run_dir.rmdir()
            raise

    def _set_up(self, resume: bool | str | Path, progress_bar: bool | None,
                log: Callable[[str], None] | None) -> None:
        """Everything but the run folder: data, model, checkpoint, metrics."""
        config = self.config
        self.device = self.world.device
        self.autocast_dtype = _train_precision(config.train, self.device)
        self.log = log or _quiet
        if self.config.train.tensorboard and importlib.util.find_spec("tensorboard") is None:
            # Checked here, not in the config: a checkpoint of such a run loads anywhere.
            raise ConfigError("train.tensorboard: expected the tensorboard package (pip "
                              "install 'attention-blocks[tensorboard]'), got true without it "
                              "installed")
        self.batches_per_step = self.world.world_size * self.config.train.grad_accum_steps
        if self.config.train.threads:
            torch.set_num_threads(self.config.train.threads)
        checkpoint = saved = None
        if resume:
            # On the CPU first: load_state_dict then moves each tensor where it belongs (and
            # keeps AdamW's step counters on the CPU, where they cost no synchronisation).
            checkpoint = self._checkpoint_to_resume()
            saved = config_from_checkpoint(checkpoint)
            check_resumable(saved, config)
        torch.manual_seed(self.config.train.seed)
        self._build_data_and_model(checkpoint)
        self.progress = Progress()
        if checkpoint is not None:
            self.restore(checkpoint)
        elif self.world.rank:  # dropout differs between ranks; rank 0 draws as one process would
            torch.manual_seed(self.config.train.seed + self.world.rank)
        saved_batches_per_step = self.progress.ranks * saved.train.grad_accum_steps \
            if saved else None
        self.progress.ranks = self.world.world_size
        self._wrap_model()
        self.metrics = self._open_run_dir(fresh=checkpoint is None)
        self._log_start(saved_batches_per_step)
        self.stop = StopFlag()
        show_bar = self.world.is_main and (sys.stderr.isatty() if progress_bar is None
                                           else progress_bar)
        self.bar = tqdm(total=self.config.train.max_steps, initial=self.progress.step,
                        disable=not show_bar, unit="step", dynamic_ncols=True, file=sys.stderr)
        self.session_start = self.window_start = time.perf_counter()
        self._pace = (self.session_start, self.progress.step)  # (time, step) the pace is from

    # Building ------------------------------------------------------------------------------

    def _build_data_and_model(self, checkpoint: dict[str, Any] | None) -> None:
        """Tokenizers (the checkpoint's, or trained on the training split by rank 0 for all),
        the encoded splits and the model, whose position limit bounds validation and test."""
        splits = load_splits(self.config.data)
        if checkpoint is not None:
            self.tokenizers = checkpoint["tokenizers"]
        else:
            self.tokenizers = self.world.broadcast(_new_tokenizers(
                splits["train"], self.config.data) if self.world.is_main else None)
        self.src_tokenizer = Tokenizer.from_str(self.tokenizers["source"])
        self.tgt_tokenizer = Tokenizer.from_str(self.tokenizers["target"])
        limit = train_data_limit(self.config)
        self.train_data = self._encode(splits["train"], limit)
        if not len(self.train_data):
            raise ConfigError(f"data.max_tokens, model.max_len: all {self.train_data.dropped} "
                              f"training pairs are longer than {limit} tokens; raise them")
        self._build_model()
        self.eval_limit = _position_limit(self.model)
        self.val_data = self._encode(splits["val"], self.eval_limit)
        self.test_data = self._encode(splits["test"], self.eval_limit)

    def _encode(self, pairs: list[Pair], max_tokens: int | None) -> ParallelData:
        return ParallelData(pairs, self.src_tokenizer, self.tgt_tokenizer, max_tokens=max_tokens)

    def _build_model(self) -> None:
        """The model on this rank's device, its optimizer, schedule and translator."""
        vocab_sizes = self.src_tokenizer.get_vocab_size(), self.tgt_tokenizer.get_vocab_size()
        self.model = model_from_config(self.config.model, *vocab_sizes, PAD_ID).to(self.device)
        self.optimizer = make_optimizer(self.model, self.config.train)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer,
                                                           learning_rate_schedule(self.config.train))
        self.scaler = grad_scaler(self.device, self.autocast_dtype)
        self.translator = Translator(self.model, self.src_tokenizer, self.tgt_tokenizer,
                                     self.config.eval, precision=self.config.train.precision)
        self.n_params = sum(p.numel() for p in self.model.parameters())

    def _wrap_model(self) -> None:
        """``train_model``: under torchrun a replica whose gradients are averaged over the
        ranks, which all start from rank 0's weights (so: after :meth:`restore`)."""
        no_buffer_sync = ({"forward_sync_buffers": False} if features.DDP_FORWARD_SYNC_BUFFERS
                          else {"broadcast_buffers": False})
        self.replica = nn.parallel.DistributedDataParallel(
            self.model, device_ids=[self.device] if self.device.type == "cuda" else None,
            **no_buffer_sync) if self.world.enabled else self.model
        # dynamic=True: every token batch has its own batch size and length; compiling for
        # each shape would recompile on most steps until the recompile limit.
        self.train_model = torch.compile(self.replica, dynamic=True) if self.config.train.compile \
            else self.replica

    def _checkpoint_to_resume(self) -> dict[str, Any]:
        """``checkpoint_last.pt``; where it does not load (a disk that failed, a file cut
        short), the newest numbered checkpoint that does (``train.keep_last``), then
        ``checkpoint_best.pt``, each a whole training state, said in the log."""
        try:
            return load_checkpoint(self.run_dir / "checkpoint_last.pt")
        except ValueError as error:
            fallbacks = [path for _, path in reversed(numbered_checkpoints(self.run_dir))]
            for path in [*fallbacks, self.run_dir / "checkpoint_best.pt"]:
                try:
                    checkpoint = load_checkpoint(path)
                except (ValueError, FileNotFoundError):
                    continue
                self.log(f"{error}; resuming from {path.name} instead (step "
                         f"{checkpoint['progress']['step']}), the newest checkpoint that loads")
                return checkpoint
            raise ValueError(f"{error}; no numbered checkpoint (train.keep_last) or "
                             f"checkpoint_best.pt loads either: nothing to resume") from None

    def _run_folder(self, resume: bool | str | Path, run_dir: str | Path | None) -> Path:
        """This run's folder, chosen by rank 0 for every rank: ``run_dir`` if given, the run
        ``resume`` names (:func:`~attention.translation.runs.resumed_run`), or a new
        ``version_N`` in ``config.run_path``."""
        if run_dir is not None:
            return Path(run_dir)
        chosen: tuple[str | None, str | None] = (None, None)
        if self.world.is_main:
            try:
                folder = resumed_run(self.config.run_path, resume) if resume \
                    else new_run(self.config.run_path)
                chosen = (str(folder), None)
            except FileNotFoundError as error:
                chosen = (None, str(error))
        folder, error = self.world.broadcast(chosen)  # every rank raises, or none
        if error is not None:
            raise FileNotFoundError(error)
        return Path(folder)

    def _open_run_dir(self, fresh: bool) -> MetricsWriter | None:
        """Rank 0: the run's folder, its ``config.yaml`` and its metrics file (``None`` on
        the other ranks). A resumed run drops the records past its checkpoint."""
        if not self.world.is_main:
            return None
        self.run_dir.mkdir(parents=True, exist_ok=True)
        write_atomic(self.run_dir / "config.yaml", lambda f: f.write(
            yaml.safe_dump(self.config.to_dict(), sort_keys=False).encode()))
        stale = [path for step, path in numbered_checkpoints(self.run_dir)
                 if fresh or step > self.progress.step]
        self.log(f"{'a new run' if fresh else 'resuming the run'} in {self.run_dir}")
        for leftover in self.run_dir.glob(".*.tmp"):  # a write a kill cut short (write_atomic)
            leftover.unlink()
        # Numbered checkpoints this run did not write (past the step it resumes from, or a
        # restarted run's before its first checkpoint) would be averaged with its own.
        for path in stale:
            path.unlink()
        if self.config.train.average_last:
            (self.run_dir / AVERAGE).unlink(missing_ok=True)
        return MetricsWriter(self.run_dir / "metrics.jsonl", fresh=fresh,
                        keep_until_step=self.progress.step,
                        tensorboard=self.run_dir / "tensorboard" if self.config.train.tensorboard
                        else None)

    def _log_start(self, saved_batches_per_step: int | None) -> None:
        """What is trained, on what; for a resumed run, from where."""
        train, val, test = self.train_data, self.val_data, self.test_data
        dropped = f", {val.dropped + test.dropped} val/test pairs longer than " \
            f"model.max_len={self.eval_limit} left out" if val.dropped + test.dropped else ""
        self.log(f"{self.config.name}: {len(train)} training pairs ({train.dropped} longer than "
                 f"{train_data_limit(self.config)} tokens dropped), {len(val)} val, {len(test)} "
                 f"test{dropped}; vocabularies {self.src_tokenizer.get_vocab_size()} → "
                 f"{self.tgt_tokenizer.get_vocab_size()}; {self.n_params / 1e6:.2f}M parameters "
                 f"on {self.device}, {precision_name(self.autocast_dtype)}")
        if self.world.enabled:
            self.log(f"{self.world.world_size} ranks ({torch.distributed.get_backend()}), "
                     f"{self.config.train.grad_accum_steps} accumulated batch(es) each: "
                     f"{self.batches_per_step} batches of ≤{self.config.train.batch_tokens} "
                     f"tokens per step")
        if saved_batches_per_step is None:
            return
        self.log(f"resuming from step {self.progress.step} (epoch {self.progress.epoch + 1})")
        if saved_batches_per_step != self.batches_per_step:
            self.log(f"note: the checkpoint took {saved_batches_per_step} batches per step, this "
                     f"run takes {self.batches_per_step} (ranks × train.grad_accum_steps): the "
                     f"global batch changes from here on")

    # The loop: the state is consistent between steps, which is where stops and saves happen.

    def run(self) -> dict[str, Any]:
        """Train until a limit (``train.max_steps``, ``max_epochs``, ``max_minutes``) or
        Ctrl-C, validate the last step, then :meth:`final_evaluation`; return its results.

        Raises:
            NonFiniteLossError: the loss or the gradient norm became NaN or infinite.
            TrainingInterrupted: Ctrl-C, after saving ``checkpoint_last.pt``.
        """
        try:
            with self.stop.installed():
                reason = None
                while reason is None:
                    reason = self.train_epoch()
                self._finish(reason)
            if self.config.train.average_last:
                self.average()
        finally:
            self.close()
        return self.final_evaluation()

    def close(self) -> None:
        """Close the progress bar and the metrics file."""
        self.bar.close()
        if self.metrics is not None:
            self.metrics.close()

    def train_epoch(self) -> str | None:
        """Train on the rest of the current epoch; return why to stop (``None``: go on).

        Each step takes the next ``batches_per_step`` batches of the epoch; the few left at
        its end (fewer than that) are skipped, and the next epoch's shuffle deals all the
        pairs again.
        """
        batches = self.epoch_batches()
        while self.progress.batch_in_epoch + self.batches_per_step <= len(batches):
            mine = self.step_batches(batches)
            tokens, reason = self._agree_on_step(target_tokens(mine))
            if reason:
                return reason
            _, grad_norm = self.train_step(mine, tokens)
            self._log_and_validate_when_due(grad_norm)
        self.progress.epoch += 1
        self.progress.batch_in_epoch = 0
        max_epochs = self.config.train.max_epochs
        if max_epochs is not None and self.progress.epoch >= max_epochs:
            return f"max_epochs={max_epochs}"
        return None

    def epoch_batches(self) -> list[list[int]]:
        """The current epoch's batches of training-pair indices, in the epoch's seeded order
        (the same on every rank)."""
        train = self.config.train
        batches = token_batches(self.train_data.lengths, train.batch_tokens,
                                seed=train.seed, epoch=self.progress.epoch)
        if len(batches) < self.batches_per_step:
            raise ConfigError(
                f"train.grad_accum_steps: a step takes {self.batches_per_step} batches "
                f"({self.world.world_size} ranks × {train.grad_accum_steps}), but an epoch "
                f"has {len(batches)} of train.batch_tokens={train.batch_tokens}; lower "
                f"them or start fewer processes")
        return batches

    def step_batches(self, batches: list[list[int]]) -> list[Batch]:
        """This rank's share of the next step's batches of the epoch's ``batches``, as
        ``(src, tgt_in, tgt_out)`` tensors on the CPU."""
        start = self.progress.batch_in_epoch
        group = batches[start:start + self.batches_per_step]
        return [self.train_data.batch(indices)
                for indices in shard(group, self.world.rank, self.world.world_size)]

    def _agree_on_step(self, tokens_here: int) -> tuple[float, str | None]:
        """The step's target tokens over all ranks, and whether to stop, the same on every
        rank (one collective for both). Any rank's Ctrl-C stops them all; rank 0's clock
        alone decides ``max_minutes``."""
        tokens, interrupted, out_of_time = self.world.sum(
            [tokens_here, self.stop.requested, self.world.is_main and self._out_of_time()])
        return tokens, self._stop_reason(interrupted > 0, out_of_time > 0)

    def _stop_reason(self, interrupted: bool, out_of_time: bool) -> str | None:
        train = self.config.train
        if interrupted:
            return "interrupted"
        if train.max_steps is not None and self.progress.step >= train.max_steps:
            return f"max_steps={train.max_steps}"
        schedule = self._cosine()
        if schedule is not None and schedule.fitted and self.progress.step >= \
                schedule.total_steps:
            return (f"max_minutes={train.max_minutes:g}: the cosine's end, fitted to the "
                    f"time budget at step {schedule.total_steps}")
        patience = train.patience
        if patience is not None and self.progress.validations_without_improvement >= patience:
            return f"patience={patience} (no better validation since step " \
                f"{self.progress.best_step})"
        if out_of_time:
            return f"max_minutes={train.max_minutes:g}"
        return None

    def _finish(self, reason: str) -> None:
        """After the loop: an interrupted run saves and raises; any other validates its last
        step (or only saves it, when that step was just validated)."""
        if reason == "interrupted":
            self._bank_time()
            self.save_last()
            raise TrainingInterrupted(
                f"interrupted at step {self.progress.step}: saved "
                f"{self.run_dir / 'checkpoint_last.pt'}; continue with: attention-train "
                f"--resume {shlex.quote(str(self.run_dir))}")
        self.log(f"training stopped at step {self.progress.step}: {reason}")
        if self.progress.last_eval_step != self.progress.step:
            self.validate()
        else:
            self.save_last()
        if self.config.train.keep_last and self._last_numbered_step() != self.progress.step:
            self.save_numbered()

    # One step -------------------------------------------------------------------------------

    def train_step(self, batches: Sequence[Batch], tokens: float) -> tuple[float, float]:
        """One optimizer step on this rank's ``batches``, their gradients accumulated.

        ``tokens`` is the step's non-pad target tokens over all ranks (:func:`target_tokens`
        of every rank's batches): the step follows the gradient of the mean loss per target
        token of the whole step, and is counted in ``progress``. Returns the step's summed
        loss over all ranks and the gradient norm before clipping.

        In fp16 the loss is scaled (see :func:`~attention.translation.precision.grad_scaler`):
        the gradients are unscaled before clipping, and a step whose gradients overflowed is
        skipped by the scaler, which lowers its scale; it still counts as a step.

        Raises:
            NonFiniteLossError: the loss or (unless the scaler skips the step) the gradient
                norm is NaN or infinite (checked before the optimizer step: the weights stay
                as they were).
        """
        self.optimizer.zero_grad(set_to_none=True)
        loss_here = self.accumulate_gradients(batches, tokens / self.world.world_size)
        self.scaler.unscale_(self.optimizer)  # the true gradients, for clipping
        grad_norm = nn.utils.clip_grad_norm_(self.model.parameters(), self.config.train.clip_norm)
        # The step's one host synchronisation, loss and norm together: the checks below must
        # see both before optimizer.step() can spoil the weights (clipping a non-finite
        # gradient only spoils gradients, which the error discards).
        loss_here, grad_norm = torch.stack([loss_here, grad_norm.to(loss_here.dtype)]).tolist()
        loss_sum, = self.world.sum([loss_here])
        self._check_finite("loss", loss_sum / tokens)
        if not self.scaler.is_enabled():
            self._check_finite("gradient norm", grad_norm)
        self.scaler.step(self.optimizer)  # optimizer.step(), unless fp16 gradients overflowed
        self.scaler.update()
        self.scheduler.step()
        progress = self.progress
        progress.step += 1
        progress.batch_in_epoch += self.batches_per_step
        progress.window_loss += loss_sum
        progress.window_tokens += int(tokens)
        return loss_sum, grad_norm

    def accumulate_gradients(self, batches: Sequence[Batch], tokens_per_rank: float) -> Tensor:
        """Backpropagate this rank's ``batches`` of one step; return their summed loss, a
        scalar tensor on the device (not synchronised).

        Each batch's summed loss is divided by ``tokens_per_rank``, the step's target tokens
        over all ranks divided by the number of ranks (which gradient averaging divides out
        again): the step's gradient is that of the mean loss per target token of the whole
        global batch, however it is split. Gradients are all-reduced once, with the last
        batch's backward pass; ``DistributedDataParallel.no_sync`` holds them back before.
        """
        loss_here = torch.zeros((), device=self.device)
        for i, batch in enumerate(batches):
            src, tgt_in, tgt_out = (t.to(self.device, non_blocking=True) for t in batch)
            with self._no_sync() if i < len(batches) - 1 else contextlib.nullcontext():
                with autocast(self.device, self.autocast_dtype):
                    logits = self.train_model(src, tgt_in)
                loss_sum, _ = sequence_loss(logits, tgt_out, self.config.train.label_smoothing)
                self.scaler.scale(loss_sum / tokens_per_rank).backward()
            loss_here += loss_sum.detach()
        return loss_here

    def _no_sync(self) -> contextlib.AbstractContextManager:
        return self.replica.no_sync() if self.world.enabled else contextlib.nullcontext()

    def _check_finite(self, what: str, value: float) -> None:
        if math.isfinite(value):
            return
        saved = []
        if self.progress.best_step and (self.run_dir / "checkpoint_best.pt").is_file():
            saved.append(f"checkpoint_best.pt (step {self.progress.best_step})")
        if self.progress.last_saved_step >= 0 and (self.run_dir / "checkpoint_last.pt").is_file():
            saved.append(f"checkpoint_last.pt (step {self.progress.last_saved_step})")
        kept = " and ".join(saved) + " are unchanged" if saved else "no checkpoint was written"
        raise NonFiniteLossError(f"{what} is {value} at step {self.progress.step + 1}: training "
                                 f"stopped; {kept}. Try a lower train.lr or a longer "
                                 f"train.warmup_steps")

    def _log_and_validate_when_due(self, grad_norm: float) -> None:
        """After a step: the progress bar, and the training record and validation if due."""
        train = self.config.train
        self.bar.update(1)
        if self.progress.step % train.log_every == 0:
            self._log_train_record(grad_norm)
        if self.progress.step % train.eval_every == 0:
            self.validate()
            self._pace = (time.perf_counter(), self.progress.step)  # validations apart
        elif self.progress.step % train.log_every == 0:
            self._fit_horizon_to_budget()
        if train.keep_last and self.progress.step % (train.save_every or train.eval_every) == 0:
            self.save_numbered()

    def _log_train_record(self, grad_norm: float) -> None:
        """A ``train`` record of the steps since the last one; ``grad_norm`` is this step's,
        before clipping."""
        progress = self.progress
        seconds = time.perf_counter() - self.window_start
        record = {"kind": "train", "step": progress.step, "epoch": progress.epoch + 1,
                  "loss": progress.window_loss / progress.window_tokens,
                  "lr": self.scheduler.get_last_lr()[0], "grad_norm": grad_norm,
                  "tokens_per_second": progress.window_tokens / max(seconds, 1e-9)}
        if self.metrics is not None:
            self.metrics.write(record)
        self.bar.set_postfix(loss=f"{record['loss']:.3f}",
                             tok_s=f"{record['tokens_per_second']:.0f}",
                             lr=f"{record['lr']:.2e}", refresh=False)
        progress.window_loss, progress.window_tokens = 0.0, 0
        self.window_start = time.perf_counter()

    # Validation and checkpoints -------------------------------------------------------------

    def validate(self) -> None:
        """Score the validation split, write a ``val`` record, save ``checkpoint_last.pt``
        (and ``checkpoint_best.pt`` on the best BLEU, then loss) and redraw ``curves.png``.

        Called on every rank: rank 0 does the work while the others wait for its progress.
        """
        self.progress.last_eval_step = self.progress.step
        started = time.perf_counter()
        self._on_main(self._validate_on_main)
        self.progress.validation_seconds = time.perf_counter() - started

    def save_last(self) -> None:
        """Save ``checkpoint_last.pt``; called on every rank, written by rank 0."""
        self._on_main(partial(self.save, "checkpoint_last.pt"))

    def save_numbered(self) -> None:
        """Save ``checkpoint_step{N}.pt`` and delete all but the last ``train.keep_last``
        of them; called on every rank, written by rank 0."""
        def save_and_prune(rng: RngStates) -> None:
            self.save(numbered_checkpoint(self.progress.step), rng)
            for _, path in numbered_checkpoints(self.run_dir)[:-self.config.train.keep_last]:
                path.unlink(missing_ok=True)
        self._on_main(save_and_prune)

    def _last_numbered_step(self) -> int | None:
        saved = numbered_checkpoints(self.run_dir) if self.world.is_main else []
        return self.world.broadcast(saved[-1][0] if saved else None)

    def average(self) -> None:
        """Average the last ``train.average_last`` numbered checkpoints into
        ``checkpoint_average.pt`` and write its ``val_average`` record; called on every
        rank, done by rank 0 (the test evaluation then scores the average)."""
        self._on_main(lambda rng: self._average_on_main())

    def _average_on_main(self) -> None:
        average_last = self.config.train.average_last
        chosen = numbered_checkpoints(self.run_dir)[-average_last:]
        averaged = average_checkpoints([path for _, path in chosen])
        save_checkpoint(self.run_dir / AVERAGE, averaged)
        self.model.load_state_dict(averaged["model"])
        result = self._evaluate_validation()
        steps = [step for step, _ in chosen]
        self.metrics.write({"kind": "val_average", "step": self.progress.step,
                            "averaged_steps": steps, **validation_scores(result)})
        short = f" (only {len(steps)} numbered checkpoints of the {average_last} " \
            f"train.average_last asks for were written)" if len(steps) < \
            average_last else ""
        self.log(f"average of the checkpoints of steps {steps}{short}: val loss "
                 f"{result['loss']:.3f}, "
                 f"BLEU {result['bleu']:.2f} (best single checkpoint: BLEU "
                 f"{self.progress.best_bleu:.2f} at step {self.progress.best_step})")

    def save(self, name: str, rng: RngStates | None = None) -> Path:
        """Write checkpoint ``name`` in the run's folder and return its path: weights,
        optimizer, scheduler and loss scaler states (the scaler's is empty unless fp16),
        progress, config, tokenizers and each rank's random state (``rng``; this process's
        alone when ``None``).

        Writes on whatever rank calls it: in a run only rank 0 does (see :meth:`save_last`).
        """
        previous = self.progress.last_saved_step
        if name == "checkpoint_last.pt":
            self.progress.last_saved_step = self.progress.step
        rng = [rng_state(self.device)] if rng is None else rng
        path = self.run_dir / name
        try:
            return save_checkpoint(path, {
                "config": self.config.to_dict(), "model": self.model.state_dict(),
                "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(), "scaler": self.scaler.state_dict(),
                "rng": rng[0], "rng_other_ranks": rng[1:], "tokenizers": self.tokenizers,
                "progress": dataclasses.asdict(self.progress),
            })
        except OSError as error:  # write_atomic left the file it would replace as it was
            self.progress.last_saved_step = previous
            kept = f"the previous {name} is kept, whole" if path.is_file() else \
                "no earlier one was written"
            raise CheckpointSaveError(f"{path}: could not be written at step "
                                      f"{self.progress.step} ({error.strerror or error}); "
                                      f"{kept}") from error

    def restore(self, checkpoint: dict[str, Any]) -> None:
        """Continue from ``checkpoint`` (as :meth:`save` writes it): the weights, the
        optimizer's, scheduler's and loss scaler's states, the progress and this rank's random
        stream (a rank the checkpoint did not have starts a new one). A run that did not
        train in fp16 saved no scaler state: an fp16 run resuming it starts a new scaler."""
        self.model.load_state_dict(checkpoint["model"])
        self.optimizer.load_state_dict(checkpoint["optimizer"])
        self.scheduler.load_state_dict(checkpoint["scheduler"])
        if checkpoint.get("scaler"):
            self.scaler.load_state_dict(checkpoint["scaler"])
        self.progress = Progress(**checkpoint["progress"])
        restore_rng(checkpoint, self.world, self.config.train.seed + self.progress.step)

    def _on_main(self, write: Callable[[RngStates], Any]) -> None:
        """Called on every rank: rank 0 runs ``write(rng)`` with each rank's random state,
        while the others wait for its progress, which they take (every rank's stays the
        same)."""
        rng = self.world.gather(rng_state(self.device))
        if self.world.is_main:
            write(rng)
        for key, value in self.world.broadcast(dataclasses.asdict(self.progress)).items():
            setattr(self.progress, key, value)

    def _evaluate_validation(self) -> dict[str, Any]:
        """The model's validation scores, decoded greedily (``eval.val_sentences``)."""
        return evaluate(self.model, self.val_data, self.translator,
                        label_smoothing=self.config.train.label_smoothing,
                        batch_tokens=self.config.train.batch_tokens,
                        sentences=self.config.eval.val_sentences, beam_size=1,
                        lowercase=self.config.data.lowercase)

    def _validate_on_main(self, rng: RngStates) -> None:
        result = self._evaluate_validation()
        self._bank_time()
        improved = self._record_validation(result)
        self.save("checkpoint_last.pt", rng)
        if improved:
            self.save("checkpoint_best.pt", rng)
        _plot_curves(self.run_dir)

    def _record_validation(self, result: dict[str, Any]) -> bool:
        """Keep the best scores, write the ``val`` record and log it; whether it is the best."""
        progress = self.progress
        improved = (result["bleu"], -result["loss"]) > (progress.best_bleu, -progress.best_loss)
        if improved:
            progress.best_bleu, progress.best_loss, progress.best_step = \
                result["bleu"], result["loss"], progress.step
            progress.validations_without_improvement = 0
        else:
            progress.validations_without_improvement += 1
        self.metrics.write({"kind": "val", "step": progress.step, **validation_scores(result),
                            "elapsed_seconds": round(progress.wall_seconds, 2)})
        self.log(f"step {progress.step}: val loss {result['loss']:.3f}, BLEU "
                 f"{result['bleu']:.2f}, exact match {result['exact_match']:.1%}"
                 + (" (best)" if improved else ""))
        return improved

    # The clock ------------------------------------------------------------------------------

    def _horizon_record(self) -> dict[str, Any]:
        """For ``results.json``: where the cosine ended, and what set it there."""
        schedule = self._cosine()
        if schedule is None:
            return {}
        return {"schedule_horizon": schedule.total_steps,
                "schedule_horizon_from": "max_minutes" if schedule.fitted else "max_steps"}

    def _cosine(self) -> CosineSchedule | None:
        schedule = self.scheduler.lr_lambdas[0]
        return schedule if isinstance(schedule, CosineSchedule) else None

    def _fit_horizon_to_budget(self) -> None:
        """With ``train.max_minutes`` and the cosine schedule, end the cosine (and the run)
        when the time ends, so that a slower or busier machine trains fewer steps but still
        ends on an annealed model.

        From the pace of the steps since the last validation (or the start) and the time
        the last validation took, rank 0 counts the steps the budget still allows; the
        cosine's end moves there, never past ``max_steps``. Re-fitted every ``log_every``
        steps until three quarters of the way, so a machine that slows down or speeds up is
        followed; the same on every rank.
        """
        train = self.config.train
        schedule = self._cosine()
        step = self.progress.step
        if schedule is None or train.max_minutes is None \
                or step >= 0.75 * schedule.total_steps or step - self._pace[1] < 10:
            return
        horizon = None
        if self.world.is_main:
            started, from_step = self._pace
            per_step = (time.perf_counter() - started) / (step - from_step)
            left = train.max_minutes * 60 - self._wall_seconds()
            steps = int(left / per_step)
            # The validations on the way cost time the steps cannot use.
            validations = (step + steps) // train.eval_every - step // train.eval_every
            steps = int((left - validations * self.progress.validation_seconds) / per_step)
            horizon = max(step + 1, step + steps)
        horizon = self.world.broadcast(horizon)
        if horizon >= train.max_steps:  # the budget allows them all: max_steps decides
            schedule.total_steps, schedule.fitted = train.max_steps, False
            return
        if not schedule.fitted or abs(horizon - schedule.total_steps) > 0.05 * horizon:
            self.log(f"step {step}: the time budget (train.max_minutes="
                     f"{train.max_minutes:g}) allows about {horizon} of max_steps="
                     f"{train.max_steps} steps; the cosine ends there")
        schedule.total_steps, schedule.fitted = horizon, True

    def _bank_time(self) -> None:
        """Move this session's time so far into ``progress.wall_seconds`` (checkpointed)."""
        now = time.perf_counter()
        self.progress.wall_seconds += now - self.session_start
        self.session_start = now

    def _wall_seconds(self) -> float:
        """The run's training time over all its sessions."""
        return self.progress.wall_seconds + time.perf_counter() - self.session_start

    def _out_of_time(self) -> bool:
        return self.config.train.max_minutes is not None and \
            self._wall_seconds() / 60 >= self.config.train.max_minutes

    # The end --------------------------------------------------------------------------------

    def final_evaluation(self) -> dict[str, Any]:
        """Rank 0 scores the best checkpoint's weights on the test split, writes
        ``results.json`` and the attention plots of one test sentence and logs a summary;
        every rank returns its results."""
        return self.world.broadcast(self._test_on_main() if self.world.is_main else None)

    def _test_on_main(self) -> dict[str, Any]:
        best = load_checkpoint(self.run_dir / "checkpoint_best.pt")
        self.model.load_state_dict(best["model"])
        scored, compared = "checkpoint_best.pt", {}
        if self.config.train.average_last:
            # The best single checkpoint's scores too, so that each run measures averaging.
            single = self._score_test()
            compared = {"checkpoint_best": {key: single[key] for key in COMPARED
                                            if key in single}}
            averaged = load_checkpoint(self.run_dir / AVERAGE)
            self.model.load_state_dict(averaged["model"])
            scored = AVERAGE
            compared["averaged_steps"] = [entry["step"] for entry in averaged["averaged_from"]]
        results = self._score_test()
        results["wall_seconds"] = round(self._wall_seconds(), 1)
        results.update(checkpoint=scored, **compared)
        results.update(best_step=best["progress"]["step"], steps=self.progress.step,
                       parameters=self.n_params, device=str(self.device),
                       precision=precision_name(self.autocast_dtype), ranks=self.world.world_size,
                       run_dir=str(self.run_dir), **self._horizon_record())
        write_atomic(self.run_dir / "results.json",
                     lambda f: f.write((json.dumps(results, indent=2) + "\n").encode()))
        self._plot_test_attention()
        self.log(results_summary(results, time.perf_counter() - self.started))
        self.log(f"the run's files: {self.run_dir}")
        return results

    def _score_test(self) -> dict[str, Any]:
        """The test scores of the model's current weights (see
        :func:`~attention.translation.evaluation.score_test_split`)."""
        return score_test_split(self.model, self.test_data, self.val_data, self.translator,
                                self.config.eval,
                                label_smoothing=self.config.train.label_smoothing,
                                batch_tokens=self.config.train.batch_tokens,
                                lowercase=self.config.data.lowercase)

    def _plot_test_attention(self) -> None:
        from .plotting import plot_attention_grid

        # A test sentence of middling length: long enough to show reordering, short enough
        # to read.
        lengths = [len(p.source.split()) for p in self.test_data.pairs]
        target = sorted(lengths)[len(lengths) * 3 // 4]
        sentence = self.test_data.pairs[lengths.index(target)].source
        attention = self.translator.attention(sentence, beam_size=1)
        plot_attention_grid(attention["encoder"], attention["source_tokens"],
                            attention["source_tokens"], self.run_dir / "attention_encoder.png",
                            title=f"encoder self-attention: {sentence}")
        plot_attention_grid(attention["cross"], attention["target_tokens"],
                            attention["source_tokens"], self.run_dir / "attention_cross.png",
                            title=f"decoder cross-attention: {sentence}")


def _new_tokenizers(pairs: list[Pair], data: DataConfig) -> dict[str, str]:
    """The source and the target tokenizer, as JSON strings: read from
    ``data.tokenizer_files``, or trained on ``pairs`` (one on both sides' text with
    ``data.shared_vocab``)."""
    if data.tokenizer_files:
        from .data.tokenizer import load_tokenizer

        loaded = []
        for index, path in enumerate(data.tokenizer_files):
            try:
                loaded.append(load_tokenizer(path).to_str())
            except (OSError, ValueError, ImportError) as error:
                raise ConfigError(f"data.tokenizer_files[{index}]: {error}") from None
        return {"source": loaded[0], "target": loaded[-1]}
    if data.shared_vocab:
        shared = train_tokenizer((text for p in pairs for text in (p.source, p.target)),
                                 data.tokenizer, data.vocab_size, data.lowercase).to_str()
        return {"source": shared, "target": shared}
    return {side: train_tokenizer((getattr(p, side) for p in pairs), data.tokenizer,
                                  data.vocab_size, data.lowercase).to_str()
            for side in ("source", "target")}


def _position_limit(model: Transformer) -> int | None:
    """The longest sequence both stacks take: learned positions end at their ``max_len``;
    the other encodings extend to any length (``None``)."""
    limits = [n for n in (model.encoder.max_positions, model.decoder.max_positions)
              if n is not None]
    return min(limits, default=None)


def _plot_curves(run: Path) -> None:
    from .plotting import plot_curves, read_metrics

    plot_curves(read_metrics(run / "metrics.jsonl"), run / "curves.png", title=run.name)
