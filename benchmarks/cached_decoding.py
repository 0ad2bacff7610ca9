"""Tokens per second of incremental decoding: ``attention.compat.TransformerDecoder`` with a
key/value cache against ``torch.nn.TransformerDecoder``, which re-runs the whole prefix for
every new token.

Both decoders carry the same weights (``compat.from_torch``). Given a prefix of ``P``
positions, each produces the outputs of the next ``--new-tokens`` positions: ours runs the
prefix once into the cache and then one position per step; torch.nn runs positions
``0 … P + i`` with a causal mask at step ``i`` and keeps the last. The new positions' inputs
are fixed random vectors (the same work for both, whatever the outputs), and the two
decoders' outputs are checked equal before timing. Rounds alternate the two in one process;
the figure is the median of the per-round ratios.

    python benchmarks/cached_decoding.py --prefix 128 512 --rounds 5
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from datetime import date
from pathlib import Path

import torch
from torch import Tensor, nn

from attention import compat
from attention.common.files import write_text_atomic

RESULTS = Path(__file__).resolve().parent / "results"


def build_decoders(args: argparse.Namespace) -> tuple[nn.TransformerDecoder,
                                                      compat.TransformerDecoder]:
    torch.manual_seed(0)
    layer = nn.TransformerDecoderLayer(args.d_model, args.n_heads, args.d_ff, dropout=0.0,
                                       batch_first=True)
    theirs = nn.TransformerDecoder(layer, args.n_layers, nn.LayerNorm(args.d_model)).eval()
    return theirs, compat.from_torch(theirs).eval()


@torch.no_grad()
def rerun_prefix(decoder: nn.TransformerDecoder, tgt: Tensor, memory: Tensor, prefix: int
                 ) -> Tensor:
    """torch.nn's way: the whole prefix again for each new position; ``(batch, new, d)``."""
    outputs = []
    for end in range(prefix + 1, tgt.shape[1] + 1):
        mask = nn.Transformer.generate_square_subsequent_mask(end)
        outputs.append(decoder(tgt[:, :end], memory, tgt_mask=mask, tgt_is_causal=True)[:, -1:])
    return torch.cat(outputs, dim=1)


@torch.no_grad()
def cached(decoder: compat.TransformerDecoder, tgt: Tensor, memory: Tensor, prefix: int
           ) -> Tensor:
    """Ours: the prefix once into the cache, then one position per call."""
    cache = decoder.new_cache()
    decoder(tgt[:, :prefix], memory, cache=cache)
    outputs = [decoder(tgt[:, end:end + 1], memory, cache=cache)
               for end in range(prefix, tgt.shape[1])]
    return torch.cat(outputs, dim=1)


def timed(run, *args) -> float:
    start = time.perf_counter()
    run(*args)
    return time.perf_counter() - start


def measure(args: argparse.Namespace, prefix: int) -> dict:
    theirs, ours = build_decoders(args)
    torch.manual_seed(1)
    tgt = torch.randn(args.batch, prefix + args.new_tokens, args.d_model)
    memory = torch.randn(args.batch, args.memory, args.d_model)
    difference = (cached(ours, tgt, memory, prefix)
                  - rerun_prefix(theirs, tgt, memory, prefix)).abs().max().item()
    if difference > 1e-4:
        raise RuntimeError(f"outputs differ by {difference:.2e} at prefix {prefix}")
    rounds = []
    for _ in range(args.rounds):  # alternated, so that drifts in the machine hit both
        torch_seconds = timed(rerun_prefix, theirs, tgt, memory, prefix)
        ours_seconds = timed(cached, ours, tgt, memory, prefix)
        rounds.append({"torch_s": torch_seconds, "ours_s": ours_seconds,
                       "speedup": torch_seconds / ours_seconds})
    tokens = args.batch * args.new_tokens
    return {
        "prefix": prefix,
        "max_abs_difference": difference,
        "rounds": rounds,
        "torch_tokens_per_s": tokens / statistics.median(r["torch_s"] for r in rounds),
        "ours_tokens_per_s": tokens / statistics.median(r["ours_s"] for r in rounds),
        "median_speedup": statistics.median(r["speedup"] for r in rounds),
    }


def markdown(report: dict) -> str:
    setup = report["setup"]
    lines = [
        f"# Cached decoding vs torch.nn's re-run of the prefix ({report['date']})",
        "",
        f"`{report['command']}` on {report['machine']}, torch {report['torch']}, "
        f"{report['threads']} threads. Decoder: d_model {setup['d_model']}, "
        f"{setup['n_heads']} heads, {setup['n_layers']} layers, d_ff {setup['d_ff']}; batch "
        f"{setup['batch']}, memory {setup['memory']} positions, {setup['new_tokens']} new "
        f"positions after the prefix; fp32, eval, no grad. Median of {setup['rounds']} "
        "alternated rounds; the prefill of ours is counted in its time.",
        "",
        "| prefix | torch.nn tokens/s | ours (cached) tokens/s | speed-up (median ratio) | "
        "max abs difference |",
        "| ---: | ---: | ---: | ---: | ---: |",
    ]
    for row in report["results"]:
        lines.append(f"| {row['prefix']} | {row['torch_tokens_per_s']:.1f} | "
                     f"{row['ours_tokens_per_s']:.1f} | {row['median_speedup']:.2f}× | "
                     f"{row['max_abs_difference']:.1e} |")
    return "\n".join(lines) + "\n"



def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prefix", type=int, nargs="+", default=[128, 512])
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--memory", type=int, default=64)
    parser.add_argument("--d-model", type=int, default=256)
    parser.add_argument("--n-heads", type=int, default=4)
    parser.add_argument("--n-layers", type=int, default=4)
    parser.add_argument("--d-ff", type=int, default=1024)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--out", type=Path, help="results path, without suffix",
                        default=RESULTS / f"cached-decoding-cpu-{date.today()}")
    args = parser.parse_args(argv)
    for name in ("new_tokens", "batch", "memory", "rounds"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')}: expected a positive int, got "
                         f"{getattr(args, name)}")
    if any(p < 1 for p in args.prefix):
        parser.error(f"--prefix: expected positive lengths, got {args.prefix}")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    results = []
    for prefix in args.prefix:
        results.append(measure(args, prefix))
        row = results[-1]
        print(f"prefix {prefix}: torch.nn {row['torch_tokens_per_s']:.1f} tokens/s, ours "
              f"{row['ours_tokens_per_s']:.1f} tokens/s, {row['median_speedup']:.2f}×",
              flush=True)
    report = {
        "date": str(date.today()),
        "command": " ".join(["python benchmarks/cached_decoding.py", *(argv or sys.argv[1:])]),
        "machine": f"{platform.machine()} CPU, {os.cpu_count()} cores",
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "setup": {k: getattr(args, k) for k in ("d_model", "n_heads", "n_layers", "d_ff",
                                                "batch", "memory", "new_tokens", "rounds")},
        "results": results,
    }
    write_text_atomic(args.out.with_suffix(".json"), json.dumps(report, indent=2) + "\n")
    write_text_atomic(args.out.with_suffix(".md"), markdown(report))
    print(f"wrote {args.out}.json and .md")


if __name__ == "__main__":
    main()
