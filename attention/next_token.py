"""How a search may pick the next token: rules that forbid tokens, and seeded sampling.

The searches of :mod:`attention.decoding` apply these to the ``(N, V)`` next-token scores
of each step (logits or log-probabilities; a forbidden token gets ``-inf``):

- :class:`TokenRules`: ``min_new_tokens`` (no end of sentence before it) and
  ``no_repeat_ngram_size`` (no n-gram twice in one output), as in fairseq and Hugging Face
  ``generate``;
- :class:`Sampler`: draw the token instead of taking the best, from the distribution
  sharpened or flattened by ``temperature`` and cut to the ``top_k`` tokens and to the
  ``top_p`` nucleus, with a ``torch.Generator`` so that a seed gives the same draws.

Shapes: ``N`` rows (sentences, or hypotheses), ``V`` vocabulary, ``t`` tokens so far.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ._checks import check_positive_int

__all__ = ["Sampler", "TokenRules", "repeated_ngram_bans"]

NEG_INF = float("-inf")


def _check_count(name: str, value: object) -> int:
    """A non-negative int (0 turns the rule off)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{name}: expected an int >= 0 (0: off), got {value!r}")
    return value


def repeated_ngram_bans(history: Tensor, n: int) -> Tensor:
    """``(N, V')`` counts, ``> 0`` at each token that would repeat an n-gram of ``history``.

    ``history`` ``(N, t)`` are each row's tokens so far. A token is banned when the last
    ``n - 1`` tokens followed by it already occur in the row. The counts are indexed by
    token id up to the largest id in ``history`` (``V' = max + 1``, or 0 with too few
    tokens): callers compare against their own vocabulary.
    """
    rows, length = history.shape
    if length < n:
        return history.new_zeros((rows, 0))
    windows = history.unfold(1, n, 1)  # (N, t - n + 1, n): every n-gram so far
    prefix = history[:, length - n + 1:]  # (N, n - 1): what the next token would extend
    repeats = (windows[:, :, :-1] == prefix[:, None, :]).all(dim=-1)  # (N, t - n + 1)
    counts = history.new_zeros((rows, int(history.max()) + 1))
    # scatter_add, not a boolean scatter: several windows may name the same token.
    return counts.scatter_add_(1, windows[:, :, -1], repeats.long())


@dataclass(frozen=True)
class TokenRules:
    """Tokens a search may not pick at a step: end of sentence before ``min_new_tokens``
    tokens, and any token that would repeat an n-gram of ``no_repeat_ngram_size`` tokens
    (0: either rule off)."""

    eos_id: int
    min_new_tokens: int = 0
    no_repeat_ngram_size: int = 0

    def __post_init__(self) -> None:
        _check_count("min_new_tokens", self.min_new_tokens)
        _check_count("no_repeat_ngram_size", self.no_repeat_ngram_size)

    @property
    def active(self) -> bool:
        return bool(self.min_new_tokens or self.no_repeat_ngram_size)

    def apply(self, scores: Tensor, history: Tensor, step: int) -> Tensor:
        """``scores`` ``(N, V)`` with the forbidden tokens at ``-inf`` (in place); ``history``
        ``(N, ≥ step)`` holds each row's tokens, of which the first ``step`` are so far."""
        if step < self.min_new_tokens:
            scores[:, self.eos_id] = NEG_INF
        n = self.no_repeat_ngram_size
        if n and step >= n:
            bans = repeated_ngram_bans(history[:, :step], n)[:, : scores.shape[-1]]
            scores[:, : bans.shape[-1]].masked_fill_(bans > 0, NEG_INF)
        return scores


@dataclass(frozen=True)
class Sampler:
    """Draw the next token from the model's distribution.

    ``temperature`` divides the logits (below 1 sharper, above 1 flatter); ``top_k`` keeps
    the ``k`` likeliest tokens (0: all); ``top_p`` keeps the smallest set of likeliest
    tokens whose probability reaches ``p`` (1.0: all; the likeliest token always stays).
    They apply in that order, as in Hugging Face ``generate``. ``generator`` (on the
    scores' device) makes the draws reproducible: the same seed, the same tokens.
    """

    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    generator: torch.Generator | None = None

    def __post_init__(self) -> None:
        for name, value in (("temperature", self.temperature), ("top_p", self.top_p)):
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise TypeError(f"{name}: expected a float, got {type(value).__name__} "
                                f"{value!r}")
        if not self.temperature > 0:
            raise ValueError(f"temperature: expected a float > 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p: expected a float in (0, 1], got {self.top_p}")
        _check_count("top_k", self.top_k)
        if self.generator is not None and not isinstance(self.generator, torch.Generator):
            raise TypeError(f"generator: expected a torch.Generator, got "
                            f"{type(self.generator).__name__}")

    def filtered_logits(self, scores: Tensor) -> Tensor:
        """``(N, V)`` logits after temperature, top-k and top-p (cut tokens at ``-inf``)."""
        logits = scores.float() / self.temperature
        if self.top_k and self.top_k < logits.shape[-1]:
            kth_best = logits.topk(self.top_k, dim=-1).values[:, -1:]  # (N, 1)
            logits = logits.masked_fill(logits < kth_best, NEG_INF)
        if self.top_p < 1.0:
            sorted_logits, order = logits.sort(dim=-1, descending=True)
            cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
            # Cut a token once the likelier ones before it already reach top_p.
            cut = (cumulative - sorted_logits.softmax(dim=-1)) >= self.top_p
            cut[:, 0] = False
            logits = logits.masked_fill(cut.scatter(-1, order, cut), NEG_INF)
        return logits

    def __call__(self, scores: Tensor) -> Tensor:
        """``(N,)`` drawn token ids."""
        probs = self.filtered_logits(scores).softmax(dim=-1)
        return torch.multinomial(probs, 1, generator=self.generator)[:, 0]


def check_return_sequences(num_return_sequences: int, beam_size: int, sampling: bool) -> int:
    """``num_return_sequences`` checked against the search: at most ``beam_size`` for beam
    search, any number for sampling, 1 for greedy search (its outputs would be copies)."""
    check_positive_int("num_return_sequences", num_return_sequences)
    if sampling or num_return_sequences == 1:
        return num_return_sequences
    if beam_size == 1:
        raise ValueError(f"num_return_sequences: expected 1 for greedy search (beam_size=1, "
                         f"no sampling: every output would be the same), got "
                         f"{num_return_sequences}")
    if num_return_sequences > beam_size:
        raise ValueError(f"num_return_sequences: expected at most beam_size={beam_size} (the "
                         f"hypotheses beam search keeps), got {num_return_sequences}")
    return num_return_sequences
