"""Train a translation Transformer from a :class:`~attention.config.Config`, end to end.

:func:`train` reads top to bottom: config and device, data and tokenizers, model and
optimizer, then the loop (length-bucketed token batches, label-smoothed loss, clipping,
warmup), periodic validation with checkpoints, and a last evaluation of the best weights on
the test split written to ``runs/NAME/results.json``.

Under ``torchrun`` the same loop runs on every rank (see :mod:`attention.distributed`): a
step's batches are shared out, gradients are averaged by ``DistributedDataParallel``, and
rank 0 alone writes files while the others wait.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import signal
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
import yaml
from tokenizers import Tokenizer
from torch import Tensor, nn
from tqdm import tqdm

from ..models import Transformer
from .checkpoint import (
    config_from_checkpoint,
    load_checkpoint,
    model_from_config,
    save_checkpoint,
    write_atomic,
)
from .config import Config, ConfigError, TrainConfig
from .data import PAD_ID, ParallelData, load_splits, token_batches, train_tokenizer
from .distributed import Distributed, distributed_session, elastic_restart, shard
from .metrics import alignment_hits, best_alignment_head, bleu, exact_match
from .translator import Translator

__all__ = ["NonFiniteLossError", "TrainingInterrupted", "evaluate", "train",
           "train_data_limit"]


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite; the message names the step."""


class TrainingInterrupted(RuntimeError):
    """Ctrl-C: the run saved ``checkpoint_last.pt`` and stopped; ``--resume`` continues it."""


@dataclass
class Progress:
    """Where a run is: saved in checkpoints so that ``--resume`` continues exactly."""

    step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0  # batches of ``epoch`` already trained on
    best_bleu: float = -1.0
    best_loss: float = math.inf
    best_step: int = 0
    wall_seconds: float = 0.0  # time spent in this run so far, over all its sessions
    last_eval_step: int = -1
    last_saved_step: int = -1  # the step in checkpoint_last.pt
    window_loss: float = 0.0  # summed loss and tokens since the last logged training record
    window_tokens: int = 0
    ranks: int = 1  # processes that trained the last session (torchrun's WORLD_SIZE)


def inverse_sqrt_schedule(warmup_steps: int):
    """Learning-rate factor: linear warmup to 1 over ``warmup_steps``, then ``√(warmup/step)``."""

    def factor(step: int) -> float:
        step += 1
        return min(step / warmup_steps, math.sqrt(warmup_steps / step)) if warmup_steps else \
            1.0
    return factor


def cosine_schedule(warmup_steps: int, total_steps: int):
    """Learning-rate factor: linear warmup to 1, then a cosine down to 0 at ``total_steps``."""

    def factor(step: int) -> float:
        step += 1
        if step < warmup_steps:
            return step / warmup_steps
        progress = min((step - warmup_steps) / max(total_steps - warmup_steps, 1), 1.0)
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    return factor


def make_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices only (not on norms or biases)."""
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.98), eps=1e-9)


def sequence_loss(logits: Tensor, labels: Tensor, label_smoothing: float) -> tuple[Tensor, Tensor]:
    """Summed cross-entropy over non-pad labels, and their count.

    logits ``(B, L, V)``, labels ``(B, L)`` → ``(loss_sum, n_tokens)``, both scalars.
    """
    loss = F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=PAD_ID,
                           label_smoothing=label_smoothing, reduction="sum")
    return loss, (labels != PAD_ID).sum()


class _StopFlag:
    """Turns the first Ctrl-C (or SIGTERM, as a job scheduler sends) into a request to stop
    after the current step."""

    def __init__(self) -> None:
        self.requested = False

    @contextlib.contextmanager
    def installed(self) -> Iterator[None]:
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        signals = (signal.SIGINT, signal.SIGTERM)
        previous = {number: signal.getsignal(number) for number in signals}

        def handler(signum, frame):  # a second signal acts at once
            self.requested = True
            signal.signal(signum, previous[signum])

        for number in signals:
            signal.signal(number, handler)
        try:
            yield
        finally:
            for number in signals:
                signal.signal(number, previous[number])


class _Metrics:
    """Appends one JSON object per line to ``metrics.jsonl`` (flushed as written)."""

    def __init__(self, path: Path, fresh: bool, keep_until_step: int = 0) -> None:
        self.path = path
        if not fresh and path.is_file():
            # Records past the checkpoint (written before a hard stop) would appear twice.
            kept = [line for line in path.read_text(encoding="utf-8").splitlines(keepends=True)
                    if _record_step(line) <= keep_until_step]
            write_atomic(path, lambda f: f.write("".join(kept).encode()))
        self.file = path.open("w" if fresh else "a", encoding="utf-8")

    def write(self, record: dict[str, Any]) -> None:
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()

    def close(self) -> None:
        self.file.close()


def _record_step(line: str) -> float:
    try:
        return json.loads(line)["step"]
    except (ValueError, KeyError, TypeError):
        return math.inf  # a torn last line goes too


@torch.no_grad()
def evaluate(model: Transformer, data: ParallelData, translator: Translator, *,
             label_smoothing: float, batch_tokens: int, sentences: int | None = None,
             beam_size: int | None = None, alignment: bool = False, lowercase: bool = False
             ) -> dict[str, Any]:
    """Score ``model`` on ``data``: teacher-forced loss, then BLEU and exact match of its
    translations of the first ``sentences`` pairs (all when ``None``).

    With ``alignment`` (and gold alignments in ``data``), also the cross-attention
    alignment counts of :func:`attention.metrics.alignment_hits`, summed over the data.
    ``lowercase`` compares with lowercased references (for a lowercasing tokenizer).
    """
    was_training = model.training
    model.eval()
    device = translator.device
    loss_sum = nll_sum = 0.0
    n_tokens = 0
    hits = head_mean_hits = None
    words = 0
    try:
        for indices in token_batches(data.lengths, batch_tokens, seed=0, epoch=0,
                                     shuffle=False):
            src, tgt_in, tgt_out = (t.to(device) for t in data.batch(indices))
            with torch.autocast(device.type, dtype=torch.bfloat16,
                                enabled=device.type == "cuda"):
                memory = model.encode(src)
                logits, cross = model.decode(tgt_in, memory, model.padding_mask(src),
                                             return_attention=True) if alignment else \
                    (model.decode(tgt_in, memory, model.padding_mask(src)), None)
            loss, count = sequence_loss(logits, tgt_out, label_smoothing)
            loss_sum += float(loss)
            nll_sum += float(sequence_loss(logits, tgt_out, 0.0)[0])
            n_tokens += int(count)
            if alignment:
                gold = [_word_alignment(data, i) for i in indices]
                h, m, w = alignment_hits(cross, gold)
                hits = h if hits is None else hits + h
                head_mean_hits = m if head_mean_hits is None else head_mean_hits + m
                words += w
        chosen = range(len(data)) if sentences is None else range(min(sentences, len(data)))
        hypotheses = translator.decode(translator.generate_ids(
            [data.sources[i] for i in chosen], beam_size=beam_size))
    finally:
        model.train(was_training)
    references = [data.pairs[i].target for i in chosen]
    if lowercase:  # the model can only produce what its tokenizer normalizes to
        references = [r.lower() for r in references]
    result = {"loss": loss_sum / max(n_tokens, 1), "nll": nll_sum / max(n_tokens, 1),
              "sentences": len(references), "hypotheses": hypotheses}
    if references:
        result.update(bleu(hypotheses, references),
                      exact_match=exact_match(hypotheses, references))
    if alignment and words:
        result.update(alignment_hits=hits, alignment_head_mean_hits=head_mean_hits,
                      alignment_words=words)
    return result


def _word_alignment(data: ParallelData, index: int) -> tuple[int, ...] | None:
    """The gold alignment of an example if its tokens are its words (one token per word)."""
    pair = data.pairs[index]
    if pair.alignment is None:
        return None
    if len(data.sources[index]) - 1 != len(pair.source.split()) or \
            len(data.targets[index]) - 2 != len(pair.alignment):
        return None
    return pair.alignment


def _rng_state(device: torch.device) -> dict[str, Any]:
    state = {"torch": torch.get_rng_state()}
    if device.type == "cuda":  # the training device's only: resuming may see other GPUs
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _set_rng_state(state: dict[str, Any], device: torch.device) -> None:
    torch.set_rng_state(state["torch"].cpu())
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"].cpu(), device)


def _restore_rng(checkpoint: dict[str, Any], world: Distributed, fallback_seed: int) -> None:
    """Each rank continues its own random stream; a rank the checkpoint did not have (more
    ranks than wrote it) starts a new one from ``fallback_seed``."""
    saved = [checkpoint["rng"], *checkpoint.get("rng_other_ranks", [])]
    if world.rank < len(saved):
        _set_rng_state(saved[world.rank], world.device)
    else:
        torch.manual_seed(fallback_seed + world.rank)


# What a resumed run may not change: what it trains, its data order and its optimizer's
# settings (restored from the checkpoint, so a change would be silently ignored).
_FIXED_ON_RESUME = {"train": ("seed", "batch_tokens", "schedule", "warmup_steps", "lr",
                              "weight_decay")}


def _check_resumable(saved: Config, config: Config) -> None:
    """A resumed run may change how long it trains (and how it logs and evaluates)."""
    keys = [("model", key) for key in dataclasses.asdict(saved.model)]
    keys += [("data", key) for key in dataclasses.asdict(saved.data)]
    keys += [("train", key) for key in _FIXED_ON_RESUME["train"]]
    if saved.train.schedule == "cosine":  # the schedule is shaped by max_steps
        keys.append(("train", "max_steps"))
    for section, key in keys:
        old, new = getattr(getattr(saved, section), key), getattr(getattr(config, section), key)
        if old != new:
            raise ConfigError(f"{section}.{key}: the checkpoint was trained with {old!r}, the "
                              f"config asks for {new!r}; a resumed run keeps it (start a new "
                              f"run with another name=... to change it)")


def train(config: Config, *, resume: bool = False, progress_bar: bool | None = None,
          log=None) -> dict[str, Any]:
    """Run the training that ``config`` describes; return the test results.

    Writes under ``config.run_path``: ``config.yaml``, ``metrics.jsonl``,
    ``checkpoint_last.pt``, ``checkpoint_best.pt`` (best validation BLEU), ``curves.png``,
    attention heatmaps of one test sentence and ``results.json``.

    Started by ``torchrun`` (see :mod:`attention.distributed`), each process trains a
    :class:`~torch.nn.parallel.DistributedDataParallel` replica on its share of every step's
    batches; rank 0 alone logs, validates and writes the files, and every rank returns the
    same results.

    Raises:
        NonFiniteLossError: the loss became NaN or infinite (checkpoints are left as they were).
        TrainingInterrupted: Ctrl-C; ``checkpoint_last.pt`` holds the last finished step.
    """
    with distributed_session(config.train.device, config.train.dist_timeout_minutes) as world:
        if log is None:
            log = lambda message: tqdm.write(message, file=sys.stderr)  # noqa: E731
        log = log if world.is_main else lambda message: None
        if not resume and elastic_restart():
            # torchrun restarted the run after a failure (--max-restarts): continue it.
            resume = world.broadcast((config.run_path / "checkpoint_last.pt").is_file())
            if resume:
                log("torchrun restarted the processes: resuming from checkpoint_last.pt")
        return _train(config, world, resume=resume, progress_bar=progress_bar, log=log)


def _train(config: Config, world: Distributed, *, resume: bool, progress_bar: bool | None,
           log) -> dict[str, Any]:
    started = time.perf_counter()
    cfg = config.train
    run = config.run_path
    device = world.device
    if cfg.threads:
        torch.set_num_threads(cfg.threads)

    checkpoint = saved_config = None
    if resume:
        # On the CPU first: load_state_dict then moves each tensor where it belongs (and
        # keeps AdamW's step counters on the CPU, where they cost no synchronisation).
        checkpoint = load_checkpoint(run / "checkpoint_last.pt")
        saved_config = config_from_checkpoint(checkpoint)
        _check_resumable(saved_config, config)
    torch.manual_seed(cfg.seed)

    # Data and tokenizers: trained on the training split (by rank 0, for all), or restored
    # with the checkpoint.
    splits = load_splits(config.data)
    if checkpoint is not None:
        tokenizers = checkpoint["tokenizers"]
    else:
        tokenizers = None
        if world.is_main:
            d = config.data
            tokenizers = {side: train_tokenizer((getattr(p, side) for p in splits["train"]),
                                                d.tokenizer, d.vocab_size, d.lowercase).to_str()
                          for side in ("source", "target")}
        tokenizers = world.broadcast(tokenizers)
    src_tokenizer = Tokenizer.from_str(tokenizers["source"])
    tgt_tokenizer = Tokenizer.from_str(tokenizers["target"])
    train_data = ParallelData(splits["train"], src_tokenizer, tgt_tokenizer,
                              max_tokens=train_data_limit(config))
    if not len(train_data):
        raise ConfigError(f"data.max_tokens, model.max_len: all {train_data.dropped} training "
                          f"pairs are longer than {train_data_limit(config)} tokens; raise them")
    # Learned positions end at max_len; other encodings extend to any length.
    eval_limit = config.model.max_len if config.model.positional == "learned" else None
    val_data = ParallelData(splits["val"], src_tokenizer, tgt_tokenizer, max_tokens=eval_limit)
    test_data = ParallelData(splits["test"], src_tokenizer, tgt_tokenizer, max_tokens=eval_limit)

    model = model_from_config(config.model, src_tokenizer.get_vocab_size(),
                              tgt_tokenizer.get_vocab_size(), PAD_ID).to(device)
    optimizer = make_optimizer(model, cfg)
    schedule = cosine_schedule(cfg.warmup_steps, cfg.max_steps) if cfg.schedule == "cosine" \
        else inverse_sqrt_schedule(cfg.warmup_steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    state = Progress()
    if checkpoint is not None:
        model.load_state_dict(checkpoint["model"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        scheduler.load_state_dict(checkpoint["scheduler"])
        state = Progress(**checkpoint["progress"])
        _restore_rng(checkpoint, world, cfg.seed + state.step)
    elif world.rank:  # dropout differs between ranks; rank 0 draws as one process would
        torch.manual_seed(cfg.seed + world.rank)
    batches_per_step = world.world_size * cfg.grad_accum_steps
    previous_batches_per_step = state.ranks * (
        saved_config.train.grad_accum_steps if saved_config else 1)
    state.ranks = world.world_size
    # Gradients are averaged over the ranks, which all start from rank 0's weights.
    replica = nn.parallel.DistributedDataParallel(
        model, device_ids=[device] if device.type == "cuda" else None,
        forward_sync_buffers=False) if world.enabled else model
    forward = torch.compile(replica) if cfg.compile else replica
    translator = Translator(model, src_tokenizer, tgt_tokenizer, config.eval)
    n_params = sum(p.numel() for p in model.parameters())

    if world.is_main:
        run.mkdir(parents=True, exist_ok=True)
        write_atomic(run / "config.yaml", lambda f: f.write(
            yaml.safe_dump(config.to_dict(), sort_keys=False).encode()))
        if checkpoint is None and (run / "checkpoint_last.pt").is_file():
            log(f"starting a new run in {run}: its previous files are replaced (--resume "
                f"would have continued it)")
    metrics = _Metrics(run / "metrics.jsonl", fresh=checkpoint is None,
                       keep_until_step=state.step) if world.is_main else None
    dropped = f", {val_data.dropped + test_data.dropped} val/test pairs longer than " \
        f"model.max_len={eval_limit} left out" if val_data.dropped + test_data.dropped else ""
    log(f"{config.name}: {len(train_data)} training pairs ({train_data.dropped} longer than "
        f"{train_data_limit(config)} tokens dropped), {len(val_data)} val, {len(test_data)} "
        f"test{dropped}; vocabularies {src_tokenizer.get_vocab_size()} → "
        f"{tgt_tokenizer.get_vocab_size()}; {n_params / 1e6:.2f}M parameters on {device}")
    if world.enabled:
        log(f"{world.world_size} ranks ({torch.distributed.get_backend()}), {cfg.grad_accum_steps} "
            f"accumulated batch(es) each: {batches_per_step} batches of ≤{cfg.batch_tokens} "
            f"tokens per step")
    if checkpoint is not None:
        log(f"resuming from step {state.step} (epoch {state.epoch + 1})")
        if previous_batches_per_step != batches_per_step:
            log(f"note: the checkpoint took {previous_batches_per_step} batches per step, this "
                f"run takes {batches_per_step} (ranks × train.grad_accum_steps): the global "
                f"batch changes from here on")

    def save(name: str, rng: list[dict[str, Any]]) -> None:
        if name == "checkpoint_last.pt":
            state.last_saved_step = state.step
        save_checkpoint(run / name, {
            "config": config.to_dict(), "model": model.state_dict(),
            "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
            "rng": rng[0], "rng_other_ranks": rng[1:], "tokenizers": tokenizers,
            "progress": dataclasses.asdict(state),
        })

    def on_main(write) -> None:
        """Called on every rank: rank 0 runs ``write(rng)`` with each rank's random state,
        while the others wait for its progress, which they take (every rank's stays the
        same)."""
        rng = world.gather(_rng_state(device))
        if world.is_main:
            write(rng)
        _share_progress(world, state)

    def save_last() -> None:
        on_main(lambda rng: save("checkpoint_last.pt", rng))

    def validate() -> None:
        state.last_eval_step = state.step
        on_main(_validate)

    def _validate(rng: list[dict[str, Any]]) -> None:
        result = evaluate(model, val_data, translator, label_smoothing=cfg.label_smoothing,
                          batch_tokens=cfg.batch_tokens, sentences=config.eval.val_sentences,
                          beam_size=1, lowercase=config.data.lowercase)
        state.wall_seconds += time.perf_counter() - session_start[0]
        session_start[0] = time.perf_counter()
        improved = (result["bleu"], -result["loss"]) > (state.best_bleu, -state.best_loss)
        if improved:
            state.best_bleu, state.best_loss, state.best_step = \
                result["bleu"], result["loss"], state.step
        metrics.write({"kind": "val", "step": state.step, "loss": result["loss"],
                       "nll": result["nll"], "bleu": result["bleu"],
                       "bleu_lowercase": result["bleu_lowercase"],
                       "exact_match": result["exact_match"], "sentences": result["sentences"],
                       "elapsed_seconds": round(state.wall_seconds, 2)})
        log(f"step {state.step}: val loss {result['loss']:.3f}, BLEU {result['bleu']:.2f}, "
            f"exact match {result['exact_match']:.1%}" + (" (best)" if improved else ""))
        save("checkpoint_last.pt", rng)
        if improved:
            save("checkpoint_best.pt", rng)
        _plot_curves(run)

    # The loop. State is consistent between steps: that is where stops and saves happen.
    session_start = [time.perf_counter()]
    stop = _StopFlag()
    show_bar = world.is_main and (sys.stderr.isatty() if progress_bar is None else progress_bar)
    bar = tqdm(total=cfg.max_steps, initial=state.step, disable=not show_bar, unit="step",
               dynamic_ncols=True, file=sys.stderr)
    window_start = time.perf_counter()
    stop_reason = None
    try:
        with stop.installed():
            while stop_reason is None:
                batches = token_batches(train_data.lengths, cfg.batch_tokens, seed=cfg.seed,
                                        epoch=state.epoch)
                if len(batches) < batches_per_step:
                    raise ConfigError(
                        f"train.grad_accum_steps: a step takes {batches_per_step} batches "
                        f"({world.world_size} ranks × {cfg.grad_accum_steps}), but an epoch "
                        f"has {len(batches)} of train.batch_tokens={cfg.batch_tokens}; lower "
                        f"them or start fewer processes")
                # Each step takes the next batches_per_step batches of the epoch; the few
                # left at its end (fewer than that) are skipped, and the next epoch's
                # shuffle deals all the pairs again.
                while state.batch_in_epoch + batches_per_step <= len(batches):
                    group = batches[state.batch_in_epoch:state.batch_in_epoch + batches_per_step]
                    mine = [train_data.batch(indices)
                            for indices in shard(group, world.rank, world.world_size)]
                    tokens, stop_reason = _agree_on_step(
                        world, cfg, state, sum(int((tgt_out != PAD_ID).sum())
                                               for _, _, tgt_out in mine),
                        interrupted=stop.requested,
                        out_of_time=_out_of_time(cfg, state, session_start[0]))
                    if stop_reason:
                        break
                    optimizer.zero_grad(set_to_none=True)
                    loss_here = _accumulate_gradients(
                        forward, mine, device, tokens / world.world_size, cfg.label_smoothing,
                        replica.no_sync if world.enabled else contextlib.nullcontext)
                    loss_sum, = world.sum([loss_here])
                    loss_value = loss_sum / tokens
                    if not math.isfinite(loss_value):
                        raise NonFiniteLossError(_non_finite("loss", loss_value, state, run))
                    norm = float(nn.utils.clip_grad_norm_(model.parameters(), cfg.clip_norm))
                    if not math.isfinite(norm):  # checked before the step can spoil the weights
                        raise NonFiniteLossError(_non_finite("gradient norm", norm, state, run))
                    optimizer.step()
                    scheduler.step()
                    state.step += 1
                    state.batch_in_epoch += batches_per_step
                    state.window_loss += loss_sum
                    state.window_tokens += int(tokens)
                    bar.update(1)
                    if state.step % cfg.log_every == 0:
                        seconds = time.perf_counter() - window_start
                        record = {"kind": "train", "step": state.step, "epoch": state.epoch + 1,
                                  "loss": state.window_loss / state.window_tokens,
                                  "lr": scheduler.get_last_lr()[0],
                                  "grad_norm": norm,  # this step's, before clipping
                                  "tokens_per_second": state.window_tokens / max(seconds,
                                                                                 1e-9)}
                        if metrics is not None:
                            metrics.write(record)
                        bar.set_postfix(loss=f"{record['loss']:.3f}",
                                        tok_s=f"{record['tokens_per_second']:.0f}",
                                        lr=f"{record['lr']:.2e}", refresh=False)
                        state.window_loss, state.window_tokens = 0.0, 0
                        window_start = time.perf_counter()
                    if state.step % cfg.eval_every == 0:
                        validate()
                else:
                    state.epoch += 1
                    state.batch_in_epoch = 0
                    if cfg.max_epochs is not None and state.epoch >= cfg.max_epochs:
                        stop_reason = f"max_epochs={cfg.max_epochs}"
            if stop_reason == "interrupted":
                state.wall_seconds += time.perf_counter() - session_start[0]
                session_start[0] = time.perf_counter()
                save_last()
                raise TrainingInterrupted(
                    f"interrupted at step {state.step}: saved {run / 'checkpoint_last.pt'}; "
                    f"continue with --resume")
            log(f"training stopped at step {state.step}: {stop_reason}")
            if state.last_eval_step != state.step:
                validate()
            else:
                save_last()
    finally:
        bar.close()
        if metrics is not None:
            metrics.close()

    # Final evaluation (rank 0): the best weights on the test split.
    results = None
    if world.is_main:
        best = load_checkpoint(run / "checkpoint_best.pt")
        model.load_state_dict(best["model"])
        results = _test_results(config, model, val_data, test_data, translator)
        results["wall_seconds"] = round(
            state.wall_seconds + time.perf_counter() - session_start[0], 1)
        results.update(best_step=best["progress"]["step"], steps=state.step,
                       parameters=n_params, device=str(device), ranks=world.world_size)
        write_atomic(run / "results.json",
                     lambda f: f.write((json.dumps(results, indent=2) + "\n").encode()))
        _plot_test_attention(run, translator, test_data)
        log(_summary(results, time.perf_counter() - started))
    return world.broadcast(results)


def _accumulate_gradients(forward, batches: list[tuple[Tensor, Tensor, Tensor]],
                          device: torch.device, tokens_per_rank: float,
                          label_smoothing: float, no_sync) -> float:
    """Backpropagate this rank's ``batches`` of one step; return their summed loss.

    Each summed loss is divided by ``tokens_per_rank``, the step's target tokens over all
    ranks divided by the number of ranks (which gradient averaging divides out again): the
    step's gradient is that of the mean loss per target token of the whole global batch,
    however it is split. Gradients are all-reduced once, with the last batch's backward pass;
    ``no_sync()`` (``DistributedDataParallel.no_sync``) holds them back before that.
    """
    loss_here = torch.zeros((), device=device)
    for i, batch in enumerate(batches):
        src, tgt_in, tgt_out = (t.to(device, non_blocking=True) for t in batch)
        with contextlib.nullcontext() if i == len(batches) - 1 else no_sync():
            with torch.autocast(device.type, dtype=torch.bfloat16,
                                enabled=device.type == "cuda"):
                logits = forward(src, tgt_in)
            loss_sum, _ = sequence_loss(logits, tgt_out, label_smoothing)
            (loss_sum / tokens_per_rank).backward()
        loss_here += loss_sum.detach()
    return float(loss_here)


def _agree_on_step(world: Distributed, cfg: TrainConfig, state: Progress, tokens_here: int, *,
                   interrupted: bool, out_of_time: bool) -> tuple[float, str | None]:
    """The step's target tokens over all ranks, and whether to stop, the same on every rank.

    Any rank's Ctrl-C stops them all; rank 0's clock alone decides ``max_minutes``.
    """
    tokens, interrupted_ranks, out_of_time_on_main = world.sum(
        [tokens_here, interrupted, world.is_main and out_of_time])
    return tokens, _stop_reason(cfg, state, interrupted_ranks > 0, out_of_time_on_main > 0)


def _share_progress(world: Distributed, state: Progress) -> None:
    """Rank 0's progress (best scores, saved steps, time) on every rank; the others wait."""
    for key, value in world.broadcast(dataclasses.asdict(state)).items():
        setattr(state, key, value)


def train_data_limit(config: Config) -> int:
    """The longest training pair kept, in tokens."""
    return min(config.data.max_tokens, config.model.max_len)


def _non_finite(what: str, value: float, state: Progress, run: Path) -> str:
    saved = []
    if state.best_step and (run / "checkpoint_best.pt").is_file():
        saved.append(f"checkpoint_best.pt (step {state.best_step})")
    if state.last_saved_step >= 0 and (run / "checkpoint_last.pt").is_file():
        saved.append(f"checkpoint_last.pt (step {state.last_saved_step})")
    kept = " and ".join(saved) + " are unchanged" if saved else "no checkpoint was written"
    return (f"{what} is {value} at step {state.step + 1}: training stopped; {kept}. Try a "
            f"lower train.lr or a longer train.warmup_steps")


def _stop_reason(cfg: TrainConfig, state: Progress, interrupted: bool,
                 out_of_time: bool) -> str | None:
    if interrupted:
        return "interrupted"
    if cfg.max_steps is not None and state.step >= cfg.max_steps:
        return f"max_steps={cfg.max_steps}"
    if out_of_time:
        return f"max_minutes={cfg.max_minutes:g}"
    return None


def _out_of_time(cfg: TrainConfig, state: Progress, session_start: float) -> bool:
    minutes = (state.wall_seconds + time.perf_counter() - session_start) / 60
    return cfg.max_minutes is not None and minutes >= cfg.max_minutes


def _test_results(config: Config, model: Transformer, val_data: ParallelData,
                  test_data: ParallelData, translator: Translator) -> dict[str, Any]:
    cfg = config.train
    has_alignment = any(p.alignment is not None for p in test_data.pairs)
    test = evaluate(model, test_data, translator, label_smoothing=cfg.label_smoothing,
                    batch_tokens=cfg.batch_tokens, alignment=has_alignment,
                    lowercase=config.data.lowercase)
    results = {"bleu": round(test["bleu"], 2), "bleu_lowercase": round(test["bleu_lowercase"], 2),
               "exact_match": round(test["exact_match"], 4), "sentences": test["sentences"],
               "loss": round(test["loss"], 4), "beam_size": config.eval.beam_size}
    if has_alignment and "alignment_hits" in test:
        # The head is chosen on validation, then scored on test.
        val = evaluate(model, val_data, translator, label_smoothing=cfg.label_smoothing,
                       batch_tokens=cfg.batch_tokens, sentences=0, alignment=True)
        layer, head = best_alignment_head(val["alignment_hits"])
        test_accuracy = test["alignment_hits"].float() / test["alignment_words"]
        head_mean = test["alignment_head_mean_hits"].float() / test["alignment_words"]
        results.update(
            alignment_accuracy=round(float(test_accuracy[layer, head]), 4),
            alignment_layer=layer + 1, alignment_head=head + 1,
            alignment_accuracy_head_mean=round(float(head_mean[-1]), 4),
            alignment_accuracy_by_head=[[round(float(a), 4) for a in row]
                                        for row in test_accuracy],
            alignment_words=test["alignment_words"])
    return results


def _summary(results: dict[str, Any], seconds: float) -> str:
    lines = [f"test: BLEU {results['bleu']:.2f} (lowercased {results['bleu_lowercase']:.2f}), "
             f"exact match {results['exact_match']:.2%} on {results['sentences']} sentences"]
    if "alignment_accuracy" in results:
        lines.append(f"alignment accuracy {results['alignment_accuracy']:.2%} (decoder layer "
                     f"{results['alignment_layer']}, head {results['alignment_head']}); "
                     f"last layer, heads averaged: {results['alignment_accuracy_head_mean']:.2%}")
    lines.append(f"finished in {seconds / 60:.1f} min")
    return "\n".join(lines)


def _plot_curves(run: Path) -> None:
    from .plotting import plot_curves, read_metrics

    plot_curves(read_metrics(run / "metrics.jsonl"), run / "curves.png", title=run.name)


def _plot_test_attention(run: Path, translator: Translator, test_data: ParallelData) -> None:
    from .plotting import plot_attention_grid

    # A test sentence of middling length: long enough to show reordering, short enough to read.
    lengths = [len(p.source.split()) for p in test_data.pairs]
    target = sorted(lengths)[len(lengths) * 3 // 4]
    sentence = test_data.pairs[lengths.index(target)].source
    attention = translator.attention(sentence, beam_size=1)
    plot_attention_grid(attention["encoder"], attention["source_tokens"],
                        attention["source_tokens"], run / "attention_encoder.png",
                        title=f"encoder self-attention: {sentence}")
    plot_attention_grid(attention["cross"], attention["target_tokens"],
                        attention["source_tokens"], run / "attention_cross.png",
                        title=f"decoder cross-attention: {sentence}")
