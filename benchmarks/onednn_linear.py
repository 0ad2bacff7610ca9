"""The products of one decoding step: ``F.linear`` (torch's CPU default, MKL) against the
same product on a weight packed once for oneDNN (``attention.inference.PreparedLinear``).

A decoding step multiplies a few rows (sentences × beams) by every weight of the decoder
and the output head. For each weight shape of the decoding benchmark's model (d_model 256,
d_ff 1024, vocabulary 8000) and each row count, the two are timed alternately in one
process; the figure is the median of the per-round ratios (F.linear's time ÷ packed).
The outputs are compared too (largest absolute difference).

    python benchmarks/onednn_linear.py --rows 1 8 32 128 --rounds 7 --threads 1
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from datetime import date
from pathlib import Path

import torch
import torch.nn.functional as F

from attention import features
from attention.bench.environment import environment
from attention.common.files import write_text_atomic
from attention.inference import PreparedLinear

RESULTS = Path(__file__).resolve().parent / "results"
# (out_features, in_features): q/k/v stacked, an attention's q or output projection, the
# feed-forward's two, the output head.
SHAPES = [(768, 256), (256, 256), (1024, 256), (256, 1024), (8000, 256)]


def per_call(function, x: torch.Tensor, calls: int) -> float:
    """Seconds per call, over ``calls`` calls after one warm-up."""
    function(x)
    start = time.perf_counter()
    for _ in range(calls):
        function(x)
    return (time.perf_counter() - start) / calls


def measure(rows: list[int], rounds: int, calls: int) -> list[dict]:
    cells = []
    for out_features, in_features in SHAPES:
        torch.manual_seed(0)
        weight = torch.randn(out_features, in_features) * in_features**-0.5
        prepared = PreparedLinear(weight, None)
        for n in rows:
            x = torch.randn(n, in_features)
            difference = float((F.linear(x, weight) - prepared(x)).abs().max())
            plain, packed = [], []
            for _ in range(rounds):
                plain.append(per_call(lambda v, w=weight: F.linear(v, w), x, calls))
                packed.append(per_call(prepared, x, calls))
            ratios = [p / q for p, q in zip(plain, packed, strict=True)]
            cells.append({"weight": [out_features, in_features], "rows": n,
                          "f_linear_us": statistics.median(plain) * 1e6,
                          "packed_us": statistics.median(packed) * 1e6,
                          "ratio": statistics.median(ratios), "ratios": ratios,
                          "max_abs_difference": difference})
            print(f"{out_features}x{in_features} rows {n}: F.linear "
                  f"{cells[-1]['f_linear_us']:.1f} us, packed {cells[-1]['packed_us']:.1f} us, "
                  f"{cells[-1]['ratio']:.2f}x", file=sys.stderr)
    return cells


def markdown(result: dict) -> str:
    lines = [f"# oneDNN-packed weights vs F.linear, {result['date']}", "",
             f"torch {result['torch']}, {result['threads']} thread(s), {result['cpu']}, "
             f"{result['rounds']} alternated rounds of {result['calls']} calls.", "",
             "| weight | rows | F.linear µs | packed µs | F.linear ÷ packed | max abs diff |",
             "| --- | ---: | ---: | ---: | ---: | ---: |"]
    for c in result["cells"]:
        lines.append(f"| {c['weight'][0]}×{c['weight'][1]} | {c['rows']} | "
                     f"{c['f_linear_us']:.1f} | {c['packed_us']:.1f} | {c['ratio']:.2f}× | "
                     f"{c['max_abs_difference']:.1e} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 8, 32, 128])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--calls", type=int, default=20)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path,
                        default=RESULTS / f"onednn-linear-cpu-{date.today().isoformat()}")
    args = parser.parse_args(argv)
    if not features.ONEDNN_LINEAR:
        print("this torch has no oneDNN linear ops: nothing to compare", file=sys.stderr)
        return 1
    torch.set_num_threads(args.threads)
    machine = environment(torch.device("cpu"), " ".join(sys.argv))
    result = {"date": date.today().isoformat(), "torch": torch.__version__,
              "threads": args.threads, "cpu": machine.get("device_name", "cpu"),
              "environment": machine, "rounds": args.rounds, "calls": args.calls,
              "cells": measure(args.rows, args.rounds, args.calls)}
    write_text_atomic(args.out.with_suffix(".json"), json.dumps(result, indent=2))
    write_text_atomic(args.out.with_suffix(".md"), markdown(result))
    print(f"wrote {args.out}.json and .md", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
