"""Search over a step function: greedy decoding and beam search.

Both drive ``step(last_ids (N, 1)) -> log_probs (N, V)``, a function that advances a
decoder by one position (on its key/value cache) and returns the log-probabilities of the
next token. Beam search also needs ``reorder(index)`` to keep the cache rows of the
hypotheses it continues.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

__all__ = ["beam_search", "greedy_search", "sequence_score"]

StepFn = Callable[[Tensor], Tensor]


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
) -> Tensor:
    """Pick the most probable token at every step until each row has produced ``eos_id``.

    Returns ``(batch, T)`` ids, ``T ≤ max_new_tokens``, ``pad_id`` after each row's eos.
    """
    last = torch.full((batch, 1), bos_id, dtype=torch.long, device=device)
    finished = torch.zeros(batch, dtype=torch.bool, device=device)
    generated: list[Tensor] = []
    for _ in range(max_new_tokens):
        next_ids = step(last).argmax(dim=-1)  # (N,)
        next_ids = next_ids.masked_fill(finished, pad_id)
        generated.append(next_ids)
        finished = finished | (next_ids == eos_id)
        last = next_ids.unsqueeze(-1)
        if bool(finished.all()):
            break
    return torch.stack(generated, dim=1)


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
) -> Tensor:
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

    Returns ``(batch, T)`` ids, ``T ≤ max_new_tokens``, padded with ``pad_id``.
    """
    k = beam_size
    rows = torch.arange(batch, device=device).unsqueeze(-1) * k  # (b, 1) first row per sentence
    last = torch.full((batch * k, 1), bos_id, dtype=torch.long, device=device)
    history = torch.empty((batch * k, 0), dtype=torch.long, device=device)
    # Identical beams at the start: only the first may be extended, or they'd repeat.
    scores = torch.full((batch, k), float("-inf"), device=device)
    scores[:, 0] = 0.0
    hypotheses = _Finished(batch, k, length_penalty)

    for t in range(max_new_tokens):
        log_probs = step(last).float()  # (b*k, V)
        vocab = log_probs.shape[-1]
        candidates = (scores.reshape(-1, 1) + log_probs).reshape(batch, k * vocab)
        top_scores, top_index = candidates.topk(min(2 * k, k * vocab), dim=-1)  # (b, 2k)
        top_beam, top_token = top_index // vocab, top_index % vocab
        # Continue with the best k extensions that do not end the sentence.
        continuing = top_scores.masked_fill(top_token == eos_id, float("-inf"))
        keep = continuing.topk(k, dim=-1).indices  # (b, k) positions among the 2k
        scores = continuing.gather(-1, keep)
        hypotheses.add_ended(history, top_scores, top_beam, top_token, eos_id, t + 1)
        hypotheses.update_done(scores, t + 1)
        if all(hypotheses.done):
            break
        source_rows = (rows + top_beam.gather(-1, keep)).reshape(-1)  # (b*k,)
        last = top_token.gather(-1, keep).reshape(-1, 1)
        history = torch.cat((history.index_select(0, source_rows), last), dim=1)
        reorder(source_rows)
    else:
        hypotheses.add_live(history, scores, max_new_tokens)
    return hypotheses.best(pad_id, device)


class _Finished:
    """Beam search's finished hypotheses: the ``k`` best ``(score, tokens)`` per sentence,
    and which sentences are done."""

    def __init__(self, batch: int, k: int, length_penalty: float) -> None:
        self.k = k
        self.length_penalty = length_penalty
        self.hypotheses: list[list[tuple[float, list[int]]]] = [[] for _ in range(batch)]
        self.done = [False] * batch

    def add_ended(self, history: Tensor, top_scores: Tensor, top_beam: Tensor,
                  top_token: Tensor, eos_id: int, length: int) -> None:
        """Extensions ending in ``eos_id`` among each sentence's first ``k`` finish."""
        k = self.k
        top_scores_list, top_beam_list = top_scores.tolist(), top_beam.tolist()
        top_token_list, is_eos = top_token.tolist(), (top_token == eos_id).tolist()
        for b, hypotheses in enumerate(self.hypotheses):
            if self.done[b]:
                continue
            for rank in range(k):
                if is_eos[b][rank] and top_scores_list[b][rank] > float("-inf"):
                    prefix = history[b * k + top_beam_list[b][rank]].tolist()
                    score = sequence_score(top_scores_list[b][rank], length, self.length_penalty)
                    hypotheses.append((score, prefix + [top_token_list[b][rank]]))
            self.hypotheses[b] = sorted(hypotheses, key=lambda h: h[0], reverse=True)[:k]

    def update_done(self, live_scores: Tensor, length: int) -> None:
        """A sentence is done with ``k`` finished hypotheses none of its live ones beats."""
        best_alive = live_scores.max(dim=-1).values.tolist()
        for b, hypotheses in enumerate(self.hypotheses):
            if not self.done[b]:
                self.done[b] = len(hypotheses) == self.k and hypotheses[-1][0] >= \
                    sequence_score(best_alive[b], length, self.length_penalty)

    def add_live(self, history: Tensor, live_scores: Tensor, length: int) -> None:
        """At the length limit, the live hypotheses of unfinished sentences finish as they are."""
        for b, hypotheses in enumerate(self.hypotheses):
            if self.done[b]:
                continue
            for beam in range(self.k):
                if live_scores[b, beam] > float("-inf"):
                    score = sequence_score(float(live_scores[b, beam]), length,
                                           self.length_penalty)
                    hypotheses.append((score, history[b * self.k + beam].tolist()))

    def best(self, pad_id: int, device: torch.device | str) -> Tensor:
        """``(batch, T)``: each sentence's best hypothesis, padded with ``pad_id``."""
        best = [max(hypotheses, key=lambda h: h[0])[1] for hypotheses in self.hypotheses]
        out = torch.full((len(best), max(len(h) for h in best)), pad_id, dtype=torch.long,
                         device=device)
        for b, tokens in enumerate(best):
            out[b, : len(tokens)] = torch.tensor(tokens, dtype=torch.long, device=device)
        return out
