"""Search over a step function: greedy decoding and beam search.

Both drive ``step(last_ids (N, 1)) -> log_probs (N, V)``, a function that advances a
decoder by one position (on its key/value cache) and returns the log-probabilities of the
next token. Beam search also needs ``reorder(index)`` to keep the cache rows of the
hypotheses it continues.

On an accelerator, reading a device value on the host (``bool(t)``, ``t.tolist()``,
``t.item()``) waits for all the work queued before it, and the device then idles while the
host prepares the next step. So both searches keep their state in device tensors; the host
learns only whether to stop, through :class:`_StopFlag` (a copy that does not block, read a
step or a few late), and reads the result's width once at the end.

Shapes: ``b`` sentences, ``k`` beams, ``T`` ``max_new_tokens``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from .next_token import Sampler, TokenRules

__all__ = ["beam_search", "best_extensions", "first_maximum", "greedy_search", "log_softmax_",
           "sequence_score"]

StepFn = Callable[[Tensor], Tensor]
NEG_INF = float("-inf")


def sequence_score(log_prob: float, length: int, length_penalty: float) -> float:
    """Beam search's ranking: ``log_prob / length ** length_penalty``."""
    return log_prob / (length**length_penalty)


def greedy_search(
    step: StepFn,
    batch: int,
    bos_id: int,
    eos_id: int,
    pad_id: int,
    max_new_tokens: int,
    *,
    device: torch.device | str = "cpu",
    rules: TokenRules | None = None,
    sampler: Sampler | None = None,
    return_scores: bool = False,
    length_penalty: float = 1.0,
    drop_rows: Callable[[Tensor], None] | None = None,
) -> Tensor | tuple[Tensor, Tensor]:
    """Pick the most probable token at every step (or draw it with a ``sampler``) until
    each row has produced ``eos_id``.

    ``step`` may return logits rather than log-probabilities: only their order counts,
    unless ``return_scores``, which normalises them. The search may write into the tensor
    ``step`` returns (``rules`` set forbidden tokens to ``-inf``). ``rules`` forbid tokens
    (:class:`~attention.next_token.TokenRules`). ``drop_rows(index)``, when given, lets the
    search drop finished rows from the batch on the CPU, once they are
    :data:`DROP_FRACTION` of its rows: it is called with the rows to keep (of those
    ``step`` saw last), and must make ``step`` see only those from then on.

    Returns ``(batch, T)`` ids, ``T ≤ max_new_tokens``, ``pad_id`` after each row's eos;
    with ``return_scores`` also ``(batch,)`` scores, the :func:`sequence_score` of each row's
    log-probability (of the scores after the rules, before the sampler's changes).
    """
    rules = rules if rules is not None else TokenRules(eos_id)
    history = torch.full((batch, max_new_tokens), pad_id, dtype=torch.long, device=device)
    last = torch.full((batch, 1), bos_id, dtype=torch.long, device=device)
    finished = torch.zeros(batch, dtype=torch.bool, device=device)  # of the rows step sees
    all_finished = torch.zeros((), dtype=torch.bool, device=device)
    log_prob = torch.zeros(batch, device=device)
    # The rows step sees, as rows of the batch: all of them until finished ones are dropped
    # (only on the CPU, where knowing which rows finished costs no wait for the device).
    rows: Tensor | None = None
    can_drop = drop_rows is not None and torch.device(device).type == "cpu"
    # The steps taken while some row was unfinished: the output's width. Steps taken after
    # that (the stop flag may be read late) only add padding, trimmed at the end.
    width = torch.zeros((), dtype=torch.long, device=device)
    stop = _StopFlag(device)
    for t in range(max_new_tokens):
        width += ~all_finished
        scores = step(last)  # (N, V)
        if rules.active:
            rules.apply(scores, history if rows is None else history[rows], t)
        next_ids = first_maximum(scores) if sampler is None else sampler(scores)  # (N,)
        if return_scores:
            chosen = log_softmax_(scores.float()).gather(-1, next_ids[:, None])[:, 0]
            chosen = chosen.masked_fill(finished, 0.0)
            if rows is None:
                log_prob += chosen
            else:
                log_prob[rows] += chosen
        next_ids = next_ids.masked_fill(finished, pad_id)
        if rows is None:
            history[:, t] = next_ids
        else:
            history[rows, t] = next_ids
        finished = finished | (next_ids == eos_id)
        all_finished = finished.all()
        last = next_ids.unsqueeze(-1)
        if stop(all_finished):
            break
        if can_drop and _worth_dropping(finished):
            keep = (~finished).nonzero()[:, 0]
            drop_rows(keep)
            rows = keep if rows is None else rows[keep]
            finished, last = finished[keep], last[keep]
    out = history[:, : int(width)]
    if not return_scores:
        return out
    lengths = (out != pad_id).sum(dim=-1).clamp(min=1)
    return out, log_prob.double().div(lengths.double() ** length_penalty).float()


# Greedy search drops finished rows once they are this share of the rows it decodes: each
# drop copies every row's cache, and a finished row kept costs only its share of a step's
# products. Multi30k test2016, 1 thread: dropping at the first finished row took 3.38 s,
# at 1/16, 1/8 or 1/4 of the rows 3.08-3.13 s (the drops' copies cost more than the rows).
DROP_FRACTION = 1 / 8


def _worth_dropping(finished: Tensor) -> bool:
    """Whether greedy search drops its finished rows now (see :data:`DROP_FRACTION`)."""
    done = int(finished.sum())
    return done > 0 and done >= DROP_FRACTION * finished.shape[0]


def beam_search(
    step: StepFn,
    reorder: Callable[[Tensor], None],
    batch: int,
    bos_id: int,
    eos_id: int,
    pad_id: int,
    max_new_tokens: int,
    beam_size: int,
    length_penalty: float = 1.0,
    *,
    device: torch.device | str = "cpu",
    rules: TokenRules | None = None,
    num_return_sequences: int = 1,
    return_scores: bool = False,
    expand_after_first_step: bool = False,
    drop_finished: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """Keep the ``beam_size`` most probable prefixes per sentence at every step.

    ``step`` sees ``batch * beam_size`` rows, hypothesis ``k`` of sentence ``b`` in row
    ``b * beam_size + k``. Each step ranks the ``2 * beam_size`` best extensions: an
    extension ending in ``eos_id`` among the first ``beam_size`` is a finished hypothesis,
    the best ``beam_size`` others continue. A sentence is done once it has ``beam_size``
    finished hypotheses and the best live one, scored at its current length, does not beat
    the worst of them (so ``beam_size=1`` is exactly greedy decoding); at
    ``max_new_tokens`` the unfinished ones are finished as they are. The result is the
    finished hypothesis with the best :func:`sequence_score`. Like any beam search it
    prunes, so it can, rarely, end below greedy decoding's score.

    With ``expand_after_first_step``, the first step sees one row per sentence (its beams
    would all be the same: the empty prefix), and the first ``reorder`` grows the rows to
    ``batch * beam_size`` (its index repeats each sentence's row), as CTranslate2 does: the
    first step costs one row per sentence, not ``beam_size``. With ``drop_finished``, on
    the CPU, the rows of sentences that are done leave the batch: ``reorder`` is then called
    with fewer rows than ``step`` saw, and ``step`` must see only those from then on.

    ``rules`` forbid tokens (:class:`~attention.next_token.TokenRules`), as ``-inf``
    log-probabilities. The search writes into the tensor ``step`` returns (a fresh one
    each call, as a model's output is).

    Returns ``(batch * num_return_sequences, T)`` ids, ``T ≤ max_new_tokens``, padded with
    ``pad_id``: each sentence's ``num_return_sequences`` best hypotheses (at most
    ``beam_size``), best first, sentence ``b``'s ``i``-th in row ``b * n + i``. With
    ``return_scores`` also their :func:`sequence_score` s, ``(batch * n,)``.
    """
    k = beam_size
    rules = rules if rules is not None else TokenRules(eos_id)
    # The sentences still searched, once done ones have left the batch (None: all). Rows of
    # step, history and scores are those sentences' in that order.
    live: Tensor | None = None
    can_drop = drop_finished and torch.device(device).type == "cpu"
    last = torch.full((batch * (1 if expand_after_first_step else k), 1), bos_id,
                      dtype=torch.long, device=device)
    # Each row's tokens so far, pad_id after them: step t writes column t.
    history = torch.full((batch * k, max_new_tokens), pad_id, dtype=torch.long, device=device)
    # Identical beams at the start: only the first may be extended, or they'd repeat.
    scores = torch.full((batch, k), NEG_INF, device=device)
    scores[:, 0] = 0.0
    hypotheses = _Finished(batch, k, max_new_tokens, length_penalty, pad_id, device)
    stop = _StopFlag(device)
    sentences = torch.arange(batch, device=device).unsqueeze(-1)  # (b, 1), b searched now
    rows = sentences * k  # (b, 1) each sentence's first row

    for t in range(max_new_tokens):
        beams = 1 if expand_after_first_step and t == 0 else k  # rows per sentence now
        log_probs = step(last).float()  # (b*beams, V)
        if rules.active:
            rules.apply(log_probs, history, t)
        vocab = log_probs.shape[-1]
        searched = scores.shape[0]
        if vocab >= CHUNKED_MIN_VOCAB:  # the candidates' k·V sums are never all formed
            top_scores, top_index = best_extensions(log_probs, scores[:, :beams], 2 * k)
        else:
            if beams == k:
                # In place: a fresh (b*k, V) sum costs several times the addition itself.
                candidates = log_probs.add_(scores.reshape(-1, 1)).reshape(searched, k * vocab)
            else:  # laid out as k beams, the others -inf: topk then breaks ties as it would
                candidates = log_probs.new_full((searched, k * vocab), NEG_INF)
                candidates[:, :vocab] = log_probs
            top_scores, top_index = candidates.topk(min(2 * k, k * vocab), dim=-1)  # (b, 2k)
        top_beam, top_token = top_index // vocab, top_index % vocab
        # Continue with the best k extensions that do not end the sentence.
        continuing = top_scores.masked_fill(top_token == eos_id, NEG_INF)
        keep = continuing.topk(k, dim=-1).indices  # (b, k) positions among the 2k
        scores = continuing.gather(-1, keep)
        hypotheses.add_ended(history, top_scores, rows + top_beam, top_token, eos_id, t + 1,
                             live)
        hypotheses.update_done(scores, t + 1, live)
        done = hypotheses.done if live is None else hypotheses.done[live]  # (b,)
        if stop(done.all()):
            break
        kept_beam = top_beam.gather(-1, keep)  # (b, k)
        source_rows = rows + kept_beam  # (b, k) rows of history
        # The rows step saw: one per sentence on an expanded first step (a kept candidate
        # of another beam there is a -inf one, from a vocabulary smaller than the beam).
        step_rows = source_rows if beams == k else sentences.expand(-1, k)
        last = top_token.gather(-1, keep)
        if can_drop and bool(done.any()):  # done sentences leave the batch
            still = (~done).nonzero()[:, 0]
            source_rows, step_rows, last = source_rows[still], step_rows[still], last[still]
            scores = scores[still]
            live = still if live is None else live[still]
            sentences, rows = sentences[: still.shape[0]], rows[: still.shape[0]]
        last = last.reshape(-1, 1)
        history = history.index_select(0, source_rows.reshape(-1))
        history[:, t] = last[:, 0]
        reorder(step_rows.reshape(-1))
    else:
        hypotheses.add_live(history, scores, max_new_tokens, live)
    tokens, best_scores = hypotheses.best(num_return_sequences)
    return (tokens, best_scores.float()) if return_scores else tokens


# Vocabulary positions per chunk in first_maximum and best_extensions: a multiple of the
# CPU's vector width, and few enough chunks that ranking them costs little.
CHUNK = 64
# Below this many tokens, one plain reduction over the vocabulary is as cheap.
CHUNKED_MIN_VOCAB = 8 * CHUNK


def _chunk_maxima(x: Tensor) -> Tensor:
    """``(r, V)`` → ``(r, ⌈V / CHUNK⌉)``: the maximum of each run of :data:`CHUNK` positions
    (the last run may be shorter)."""
    vocab = x.shape[-1]
    whole = vocab // CHUNK * CHUNK
    maxima = x[:, :whole].unflatten(1, (vocab // CHUNK, CHUNK)).amax(dim=-1)
    if whole < vocab:
        maxima = torch.cat((maxima, x[:, whole:].amax(dim=-1, keepdim=True)), dim=1)
    return maxima


def _chunk_positions(chunks: Tensor, vocab: int) -> tuple[Tensor, Tensor]:
    """Positions ``(…, n·CHUNK)`` of chunks ``(…, n)`` of a row of ``vocab``, clamped
    inside it, and where they ran past its end (a shorter last chunk)."""
    positions = (chunks.unsqueeze(-1) * CHUNK
                 + torch.arange(CHUNK, device=chunks.device)).flatten(-2)
    past_end = positions >= vocab
    return positions.clamp_(max=vocab - 1), past_end


def log_softmax_(scores: Tensor) -> Tensor:
    """``scores.log_softmax(dim=-1)`` written over ``scores`` (float32 or wider, contiguous
    rows), for a search that owns them: the same values, without a fresh ``(N, V)`` output
    per step (torch 2.13, one thread, 512 × 8,000: 1.9 ms against 3.8 ms)."""
    return torch.log_softmax(scores, dim=-1, out=scores)


def first_maximum(scores: Tensor) -> Tensor:
    """``(N, V)`` → ``(N,)``: the index of each row's first maximum, as
    ``scores.max(dim=-1).indices`` gives it (``argmax`` takes 3× longer on the CPU).

    Over a large vocabulary it finds the first chunk holding the maximum, then the first
    maximum in that chunk: the same index, but a reduction that vectorises (``amax``)
    reads the whole row, and ``max(dim)``, which also tracks indices, reads only one chunk
    (torch 2.13, one thread, 128 × 8,000: 0.37 ms against 0.55 ms).
    """
    vocab = scores.shape[-1]
    if vocab < CHUNKED_MIN_VOCAB:
        return scores.max(dim=-1).indices
    chunk = _chunk_maxima(scores).max(dim=-1).indices  # (N,) the first chunk with the max
    positions, past_end = _chunk_positions(chunk.unsqueeze(-1), vocab)  # (N, CHUNK)
    values = scores.gather(1, positions).masked_fill_(past_end, NEG_INF)
    return positions.gather(1, values.max(dim=-1, keepdim=True).indices)[:, 0]


def best_extensions(log_probs: Tensor, beam_scores: Tensor, n: int) -> tuple[Tensor, Tensor]:
    """Beam search's ``n`` best extensions of each sentence, without forming all ``k·V``.

    ``log_probs`` ``(b·k, V)``: the next token's log-probabilities of each of the ``k``
    beams of ``b`` sentences; ``beam_scores`` ``(b, k)``. Returns ``(b, n)`` scores
    ``beam_score + log_prob``, best first, and their positions in the ``k·V`` candidates
    (``beam · V + token``), what ``(log_probs + beam_scores).view(b, k·V).topk(n)`` returns
    (up to the order of equal scores), for ``n ≤ V``.

    A beam's score is the same for all its tokens, so the best chunk of :data:`CHUNK`
    tokens by ``beam_score + chunk maximum`` ranks chunks as their best candidates do: the
    ``n`` best candidates lie in the ``n`` best chunks. Only those chunks are gathered and
    ranked. On one thread, 128 sentences × 4 beams × 8,000 tokens: 2.2 ms against 6.5 ms
    for the in-place sum and ``topk`` over ``(b, k·V)``.
    """
    batch, beams = beam_scores.shape
    vocab = log_probs.shape[-1]
    maxima = _chunk_maxima(log_probs)  # (b*k, c)
    per_beam = maxima.shape[-1]
    ranked = (maxima.view(batch, beams, per_beam) + beam_scores.unsqueeze(-1)).view(batch, -1)
    chunks = ranked.topk(min(n, beams * per_beam), dim=-1, sorted=False).indices
    chunks = chunks.sort(dim=-1).values  # in the candidates' order, as topk would scan them
    beam, chunk = chunks // per_beam, chunks % per_beam  # (b, n)
    tokens, past_end = _chunk_positions(chunk, vocab)  # (b, n·CHUNK)
    beam = beam.repeat_interleave(CHUNK, dim=-1)
    rows = beam + torch.arange(batch, device=beam.device).unsqueeze(-1) * beams
    values = log_probs[rows, tokens].add_(beam_scores.gather(1, beam))
    values.masked_fill_(past_end, NEG_INF)
    top_scores, best = values.topk(n, dim=-1)  # (b, n)
    return top_scores, (beam * vocab + tokens).gather(1, best)


class _StopFlag:
    """Whether a search may stop, read from a 0-d boolean device tensor without stalling
    the device.

    On the CPU the flag is read at once: nothing is queued there, so reading waits for
    nothing. On CUDA each flag is copied to pinned host memory by a copy that does not
    block, behind an event; a later call reads it once the event has passed, and starts the
    copy of the flag it is given then. So the search stops a step or a few after it could
    have, and the steps taken meanwhile change nothing in its result (greedy search pads
    them and trims them off, beam search adds nothing to a sentence that is done). When a
    copy is still in flight after ``max_lag`` calls (the device is that far behind the
    host), the call waits for it, which bounds the extra steps.
    """

    def __init__(self, device: torch.device | str, max_lag: int = 8) -> None:
        self.device = torch.device(device)
        self.max_lag = max_lag
        self.deferred = self.device.type == "cuda"
        self.in_flight = False
        self.calls_waiting = 0
        if self.deferred:
            self.host = torch.zeros((), dtype=torch.bool, pin_memory=True)
            self.event = torch.cuda.Event()

    def __call__(self, flag: Tensor) -> bool:
        """``True`` when a flag given now or earlier says stop."""
        if not self.deferred:
            return bool(flag)
        if self.in_flight:
            self.calls_waiting += 1
            if self.event.query() or self.calls_waiting >= self.max_lag:
                self.event.synchronize()
                self.in_flight = False
                if bool(self.host):
                    return True
        if not self.in_flight:
            self.host.copy_(flag, non_blocking=True)
            self.event.record(torch.cuda.current_stream(self.device))
            self.in_flight, self.calls_waiting = True, 0
        return False


class _Finished:
    """Beam search's finished hypotheses, on the device: the ``k`` best per sentence, best
    first, with which sentences are done.

    ``scores`` ``(b, k)`` float64 (:func:`sequence_score`, ``-inf`` for an empty slot),
    ``tokens`` ``(b, k, T)`` (``pad_id`` after each hypothesis), ``lengths`` ``(b, k)``,
    ``done`` ``(b,)``. Scores are float64 and orders are stable sorts, so the ranking and
    its ties come out as Python's sort of the same floats would give them.
    """

    def __init__(self, batch: int, k: int, max_new_tokens: int, length_penalty: float,
                 pad_id: int, device: torch.device | str) -> None:
        self.k = k
        self.length_penalty = length_penalty
        self.pad_id = pad_id
        self.scores = torch.full((batch, k), NEG_INF, dtype=torch.float64, device=device)
        self.tokens = torch.full((batch, k, max_new_tokens), pad_id, dtype=torch.long,
                                 device=device)
        self.lengths = torch.zeros((batch, k), dtype=torch.long, device=device)
        self.done = torch.zeros(batch, dtype=torch.bool, device=device)

    def _score(self, log_probs: Tensor, length: int) -> Tensor:
        """:func:`sequence_score` of float32 ``log_probs``, in float64 as Python computes it."""
        return log_probs.double() / (length**self.length_penalty)

    def add_ended(self, history: Tensor, top_scores: Tensor, top_rows: Tensor,
                  top_token: Tensor, eos_id: int, length: int, live: Tensor | None) -> None:
        """Extensions ending in ``eos_id`` among each sentence's first ``k`` finish.

        ``live`` ``(a,)``: the sentences still searched (``None``: all ``b``); the other
        arguments are theirs. ``history`` ``(a*k, T)``; ``top_scores``, ``top_rows`` (the
        history row each extends) and ``top_token``: ``(a, 2k)``, best first; ``length``:
        the hypotheses' length.
        """
        k = self.k
        ends = (top_token[:, :k] == eos_id) & (top_scores[:, :k] > NEG_INF) \
            & ~self._of(self.done, live).unsqueeze(-1)  # (a, k)
        if ends.device.type == "cpu" and not bool(ends.any()):
            # Nothing finishes (43% of beam 4's steps on Multi30k): the k best stay as they
            # are. Known without waiting on the CPU only; on a GPU the search never asks.
            return
        scores = self._score(top_scores[:, :k], length).masked_fill(~ends, NEG_INF)
        tokens = history[top_rows[:, :k]]  # (a, k, T)
        tokens[:, :, length - 1] = top_token[:, :k]
        lengths = self._of(self.lengths, live)
        best = self._keep_best(torch.cat((self._of(self.scores, live), scores), dim=1),
                               torch.cat((self._of(self.tokens, live), tokens), dim=1),
                               torch.cat((lengths, torch.full_like(lengths, length)), dim=1))
        if live is None:
            self.scores, self.tokens, self.lengths = best
        else:
            self.scores[live], self.tokens[live], self.lengths[live] = best

    @staticmethod
    def _of(state: Tensor, live: Tensor | None) -> Tensor:
        """The rows of a ``(b, …)`` state for the sentences still searched."""
        return state if live is None else state[live]

    def _keep_best(self, scores: Tensor, tokens: Tensor, lengths: Tensor
                   ) -> tuple[Tensor, Tensor, Tensor]:
        """The ``k`` best of ``(a, n)`` candidates, old ones first among equal scores."""
        order = scores.sort(dim=1, descending=True, stable=True).indices[:, : self.k]
        return (scores.gather(1, order),
                tokens.gather(1, order.unsqueeze(-1).expand(-1, -1, tokens.shape[-1])),
                lengths.gather(1, order))

    def update_done(self, live_scores: Tensor, length: int, live: Tensor | None) -> None:
        """A sentence is done with ``k`` finished hypotheses none of its live ones beats."""
        worst = self._of(self.scores, live)[:, -1]  # -inf unless all k slots are filled
        best_alive = self._score(live_scores.max(dim=-1).values, length)
        done = (worst > NEG_INF) & (worst >= best_alive)
        if live is None:
            self.done |= done
        else:
            self.done[live] |= done

    def add_live(self, history: Tensor, live_scores: Tensor, length: int,
                 live: Tensor | None) -> None:
        """At the length limit, the live hypotheses of unfinished sentences finish as they
        are (all of them: :meth:`best` then chooses among up to ``2k``)."""
        alive = (live_scores > NEG_INF) & ~self._of(self.done, live).unsqueeze(-1)  # (a, k)
        scores = self._score(live_scores, length).masked_fill(~alive, NEG_INF)
        tokens = history.view(scores.shape[0], self.k, -1)
        if live is not None:  # the sentences dropped before add nothing
            scores = torch.full_like(self.scores, NEG_INF).index_copy_(0, live, scores)
            tokens = torch.full_like(self.tokens, self.pad_id).index_copy_(0, live, tokens)
        self.scores = torch.cat((self.scores, scores), dim=1)
        self.tokens = torch.cat((self.tokens, tokens), dim=1)
        self.lengths = torch.cat((self.lengths, torch.full_like(self.lengths, length)), dim=1)

    def best(self, n: int = 1) -> tuple[Tensor, Tensor]:
        """``(batch * n, T)`` tokens and ``(batch * n,)`` scores: each sentence's ``n`` best
        hypotheses, best first (the first of equal scores first), padded with ``pad_id``;
        ``T`` is the longest of them."""
        order = self.scores.sort(dim=1, descending=True, stable=True).indices[:, :n]  # (b, n)
        tokens = self.tokens.gather(
            1, order.unsqueeze(-1).expand(-1, -1, self.tokens.shape[-1]))  # (b, n, T)
        width = int(self.lengths.gather(1, order).max())  # the one read-back of the result
        return tokens[:, :, :width].flatten(0, 1), self.scores.gather(1, order).flatten()
