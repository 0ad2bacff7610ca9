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
from datetime import date
from pathlib import Path

import torch
from torch import Tensor, nn

from attention import compat
from attention.bench import kit

RESULTS = Path(__file__).resolve().parent / "results"
SETUP = ("d_model", "n_heads", "n_layers", "d_ff", "batch", "memory", "new_tokens", "rounds")


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


def measure(args: argparse.Namespace, prefix: int) -> dict:
    """Both decoders at one prefix: their outputs compared, then alternated rounds."""
    theirs, ours = build_decoders(args)
    torch.manual_seed(1)
    tgt = torch.randn(args.batch, prefix + args.new_tokens, args.d_model)
    memory = torch.randn(args.batch, args.memory, args.d_model)

    def agree(outputs: dict[str, Tensor]) -> dict:
        difference = (outputs["ours"] - outputs["torch.nn"]).abs().max().item()
        if difference > 1e-4:
            raise RuntimeError(f"outputs differ by {difference:.2e} at prefix {prefix}")
        return {"max_abs_difference": difference}

    result = kit.alternate({"torch.nn": lambda: rerun_prefix(theirs, tgt, memory, prefix),
                            "ours": lambda: cached(ours, tgt, memory, prefix)},
                           args.rounds, pairs={"speedup": ("torch.nn", "ours")}, check=agree,
                           log=kit.say, label=f"prefix {prefix}")
    rate = {name: args.batch * args.new_tokens / (cell["median_ms"] / 1e3)
            for name, cell in result["contenders"].items()}
    # The headline figures by the names the committed results (and the README's figures,
    # attention.bench.figures) read; the rounds in full under "timing".
    return {"prefix": prefix, "max_abs_difference": result["check"]["max_abs_difference"],
            "torch_tokens_per_s": rate["torch.nn"], "ours_tokens_per_s": rate["ours"],
            "median_speedup": result["ratios"]["speedup"]["median"], "timing": result}


def markdown(report: dict) -> list[str]:
    setup = report["setup"]
    return [
        f"Decoder: d_model {setup['d_model']}, {setup['n_heads']} heads, {setup['n_layers']} "
        f"layers, d_ff {setup['d_ff']}; batch {setup['batch']}, memory {setup['memory']} "
        f"positions, {setup['new_tokens']} new positions after the prefix; fp32, eval, no grad. "
        f"Median of {setup['rounds']} alternated rounds; the prefill of ours is counted in its "
        "time.", "",
        *kit.markdown_table(
            ["prefix", "torch.nn tokens/s", "ours (cached) tokens/s", "speed-up (median ratio)",
             "max abs difference"],
            [[row["prefix"], f"{row['torch_tokens_per_s']:.1f}", f"{row['ours_tokens_per_s']:.1f}",
              f"{row['median_speedup']:.2f}×", f"{row['max_abs_difference']:.1e}"]
             for row in report["results"]],
            align="rrrrr")]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = kit.benchmark_parser(__doc__, rounds=5,
                                  out=RESULTS / f"cached-decoding-cpu-{date.today()}")
    parser.add_argument("--prefix", type=kit.positive_int, nargs="+", default=[128, 512])
    parser.add_argument("--new-tokens", type=kit.positive_int, default=16)
    parser.add_argument("--batch", type=kit.positive_int, default=4)
    parser.add_argument("--memory", type=kit.positive_int, default=64)
    parser.add_argument("--d-model", type=kit.positive_int, default=256)
    parser.add_argument("--n-heads", type=kit.positive_int, default=4)
    parser.add_argument("--n-layers", type=kit.positive_int, default=4)
    parser.add_argument("--d-ff", type=kit.positive_int, default=1024)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    results = [measure(args, prefix) for prefix in args.prefix]
    return kit.publish(args.out, __file__, argv, markdown=markdown,
                       title="Cached decoding vs torch.nn's re-run of the prefix",
                       setup={key: getattr(args, key) for key in SETUP}, results=results)


if __name__ == "__main__":
    main()
