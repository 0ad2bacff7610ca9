"""The products of one decoding step: ``F.linear`` (torch's CPU default, MKL) against the
same product on a weight packed once for oneDNN (``attention.inference.PreparedLinear``).

A decoding step multiplies a few rows (sentences × beams) by every weight of the decoder
and the output head. For each weight shape of the decoding benchmark's model (d_model 256,
d_ff 1024, vocabulary 8000) and each row count, the two are timed alternately in one
process, ``--calls`` calls a run; the figure is the median of the per-round ratios
(F.linear's time ÷ packed). The outputs are compared too (largest absolute difference).

    python benchmarks/onednn_linear.py --rows 1 8 32 128 --rounds 7 --threads 1
"""

from __future__ import annotations

import argparse
import sys
from datetime import date
from pathlib import Path

import torch
import torch.nn.functional as F

from attention import features
from attention.bench import kit
from attention.inference import PreparedLinear

RESULTS = Path(__file__).resolve().parent / "results"
# (out_features, in_features): q/k/v stacked, an attention's q or output projection, the
# feed-forward's two, the output head.
SHAPES = [(768, 256), (256, 256), (1024, 256), (256, 1024), (8000, 256)]


def measure(weight: torch.Tensor, rows: int, args: argparse.Namespace) -> dict:
    """One weight and row count: both products compared, then alternated rounds."""
    prepared = PreparedLinear(weight, None)
    x = torch.randn(rows, weight.shape[1])

    def agree(outputs: dict) -> dict:
        return {"max_abs_difference": float((outputs["F.linear"] - outputs["packed"]).abs().max())}

    result = kit.alternate({"F.linear": lambda: F.linear(x, weight), "packed": lambda: prepared(x)},
                           args.rounds, calls=args.calls, check=agree, log=kit.say,
                           pairs={"ratio": ("F.linear", "packed")},
                           label=f"{weight.shape[0]}x{weight.shape[1]} rows {rows}")
    return {"weight": list(weight.shape), "rows": rows, **result}


def markdown(report: dict) -> list[str]:
    cells = report["cells"]
    return [f"{cells[0]['rounds']} alternated rounds of {cells[0]['calls']} calls; times per "
            "call.", "", *kit.markdown_table(
                ["weight", "rows", "F.linear µs", "packed µs", "F.linear ÷ packed", "max abs diff"],
                [[f"{c['weight'][0]}×{c['weight'][1]}", c["rows"],
                  f"{1e3 * c['contenders']['F.linear']['median_ms']:.1f}",
                  f"{1e3 * c['contenders']['packed']['median_ms']:.1f}",
                  f"{c['ratios']['ratio']['median']:.2f}×",
                  f"{c['check']['max_abs_difference']:.1e}"] for c in cells])]


def main(argv: list[str] | None = None) -> int:
    parser = kit.benchmark_parser(__doc__, rounds=7,
                                  out=RESULTS / f"onednn-linear-cpu-{date.today()}")
    parser.add_argument("--rows", type=kit.positive_int, nargs="+", default=[1, 8, 32, 128])
    parser.add_argument("--calls", type=kit.positive_int, default=20)
    parser.add_argument("--threads", type=kit.positive_int, default=1)
    args = parser.parse_args(argv)
    if not features.ONEDNN_LINEAR:
        kit.say("this torch has no oneDNN linear ops: nothing to compare")
        return 1
    torch.set_num_threads(args.threads)
    cells = []
    for out_features, in_features in SHAPES:
        torch.manual_seed(0)
        weight = torch.randn(out_features, in_features) * in_features**-0.5
        cells += [measure(weight, rows, args) for rows in args.rows]
    kit.publish(args.out, __file__, argv, markdown=markdown, cells=cells,
                title=f"oneDNN-packed weights vs F.linear, {date.today()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
