"""Alternated rounds: the way every benchmark here compares contenders.

The contenders run in one process, after a warm-up. Each round runs every contender once,
and round ``i`` starts at the ``i``-th contender (:func:`rotated`), so that none always
runs first or always follows the same neighbour, and a drift of the machine (another job,
the clock's boost) hits them all alike. Per contender: every round's time, the median, min,
max and interquartile range (:func:`timing_summary`). Per named pair: the ratio of their
times within each round and the median of those ratios (:func:`round_ratios`), steadier
than the ratio of the medians on a noisy machine.

    result = alternate({"torch": run_torch, "ours": run_ours}, rounds=7,
                       pairs={"speedup": ("torch", "ours")})
    result["ratios"]["speedup"]["median"]   # > 1: ours is faster
"""

from __future__ import annotations

import statistics
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

from .arguments import check_positive
from .clock import timed_call

__all__ = ["AlternatedRounds", "alternate", "round_ratios", "rotated", "timing_summary"]

Log = Callable[[str], None]


def rotated(names: Sequence[str], round_index: int) -> list[str]:
    """The order of round ``round_index``: ``names`` started at its ``round_index``-th
    (modulo their number)."""
    start = round_index % len(names)
    return [*names[start:], *names[:start]]


def timing_summary(times: Sequence[float]) -> dict[str, Any]:
    """Every run's time (seconds in, milliseconds out), median, min, max and interquartile
    range."""
    if not times:
        raise ValueError("times: expected at least one time, got none")
    q1, q3 = times[0], times[0]  # one run: no spread
    if len(times) > 1:
        q1, _, q3 = statistics.quantiles(times, n=4, method="inclusive")
    return {"times_ms": [t * 1e3 for t in times], "median_ms": statistics.median(times) * 1e3,
            "min_ms": min(times) * 1e3, "max_ms": max(times) * 1e3, "iqr_ms": (q3 - q1) * 1e3}


def round_ratios(numerator: Sequence[float], denominator: Sequence[float]) -> dict[str, Any]:
    """``numerator`` time ÷ ``denominator`` time per round (peer ÷ ours: > 1, ours is
    faster), and their median."""
    per_round = [a / b for a, b in zip(numerator, denominator, strict=True)]
    return {"median": statistics.median(per_round), "per_round": per_round}


class AlternatedRounds:
    """Contenders (name → a callable of no arguments) timed in alternated rounds.

    ``calls``: calls of a contender per timed run, the run's time divided by them (for calls
    too short for the clock). ``self_timed``: each contender returns its own measure of the
    run in seconds (a child process's, read from its metrics) instead of being timed by the
    clock. ``log`` receives a line per round, and one of the medians and ratios from
    :meth:`summary`, each starting with ``label``.
    """

    def __init__(self, contenders: Mapping[str, Callable[[], Any]], *,
                 device: torch.device | str = "cpu", calls: int = 1,
                 self_timed: bool = False, log: Log | None = None, label: str = "") -> None:
        if not contenders:
            raise ValueError("contenders: expected at least one name → callable, got none")
        check_positive("calls", calls)
        self.contenders = dict(contenders)
        self.device = torch.device(device)
        self.calls = calls
        self.self_timed = self_timed
        self.log = log
        self.label = label
        self.times: dict[str, list[float]] = {name: [] for name in self.contenders}
        self.order: list[list[str]] = []
        self.warmup = 0

    def run_once(self, name: str) -> tuple[float, Any]:
        """One run of ``name``: seconds per call, and what its last call returned."""
        contender = self.contenders[name]
        if self.self_timed:
            seconds = contender()
            if not isinstance(seconds, (int, float)) or seconds <= 0:
                raise ValueError(f"{name}: expected its run's seconds (self_timed), got "
                                 f"{seconds!r}")
            return seconds, seconds
        if self.calls == 1:
            return timed_call(contender, self.device)

        def repeated() -> Any:
            for _ in range(self.calls - 1):
                contender()
            return contender()

        seconds, result = timed_call(repeated, self.device)
        return seconds / self.calls, result

    def warm_up(self, runs: int = 1) -> dict[str, Any]:
        """``runs`` untimed runs of every contender, in order; what each returned last
        (``{}`` for no runs)."""
        if runs < 0:
            raise ValueError(f"warmup: expected a non-negative int, got {runs}")
        outputs = {}
        for name, contender in self.contenders.items():
            for _ in range(runs):
                outputs[name] = contender()
        self.warmup += runs
        return outputs

    def run_round(self) -> dict[str, Any]:
        """One timed run of every contender in this round's order; what each returned."""
        order = rotated(list(self.contenders), len(self.order))
        outputs = {}
        for name in order:
            seconds, outputs[name] = self.run_once(name)
            self.times[name].append(seconds)
        self.order.append(order)
        self.say(f"round {len(self.order)}: " + ", ".join(
            f"{name} {self.times[name][-1] * 1e3:.3g} ms" for name in self.contenders))
        return outputs

    def say(self, message: str) -> None:
        if self.log is not None:
            self.log(f"{self.label}, {message}" if self.label else message)

    def summary(self, pairs: Mapping[str, tuple[str, str]] | None = None) -> dict[str, Any]:
        """The rounds as a JSON-ready record: ``rounds``, ``warmup``, ``calls``, ``order``
        (each round's), ``contenders`` (:func:`timing_summary` of each) and ``ratios``
        (:func:`round_ratios` of each named pair ``(numerator, denominator)``)."""
        if not self.order:
            raise ValueError("rounds: expected at least one timed round, got none")
        ratios = {}
        for pair, (numerator, denominator) in (pairs or {}).items():
            for name in (numerator, denominator):
                if name not in self.times:
                    raise ValueError(f"pairs[{pair!r}]: expected contenders of "
                                     f"{list(self.times)}, got {name!r}")
            ratios[pair] = {"of": [numerator, denominator],
                            **round_ratios(self.times[numerator], self.times[denominator])}
        summary = {"rounds": len(self.order), "warmup": self.warmup, "calls": self.calls,
                   "order": self.order,
                   "contenders": {name: timing_summary(t) for name, t in self.times.items()},
                   "ratios": ratios}
        self.say("medians " + "; ".join(
            [", ".join(f"{name} {c['median_ms']:.3g} ms"
                       for name, c in summary["contenders"].items()),
             *(f"{pair} {ratio['median']:.2f}×" for pair, ratio in ratios.items())]))
        return summary


def alternate(contenders: Mapping[str, Callable[[], Any]], rounds: int, *, warmup: int = 1,
              pairs: Mapping[str, tuple[str, str]] | None = None,
              check: Callable[[dict[str, Any]], dict[str, Any] | None] | None = None,
              device: torch.device | str = "cpu", calls: int = 1, self_timed: bool = False,
              log: Log | None = None, label: str = "") -> dict[str, Any]:
    """Warm every contender up ``warmup`` times, then time ``rounds`` alternated rounds.

    ``check``, when given, receives what each contender's last warm-up run returned and
    raises if they must not be compared (unequal work, different outputs), before anything
    is timed; a dict it returns is recorded under ``check``.

    Returns :meth:`AlternatedRounds.summary`'s record (with ``check`` when there is one).
    """
    check_positive("rounds", rounds)
    if check is not None and warmup < 1:
        raise ValueError(f"warmup: expected at least 1 with a check (it checks the warm-up's "
                         f"outputs), got {warmup}")
    timer = AlternatedRounds(contenders, device=device, calls=calls, self_timed=self_timed,
                             log=log, label=label)
    outputs = timer.warm_up(warmup)
    checked = check(outputs) if check is not None else None
    for _ in range(rounds):
        timer.run_round()
    result = timer.summary(pairs)
    if checked is not None:
        result["check"] = checked
    return result
