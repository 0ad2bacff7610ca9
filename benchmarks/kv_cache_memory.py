"""The memory of a decoder's key/value cache, measured: grouped-query heads and sliding windows
against full multi-head attention.

A :class:`attention.Decoder` (16 query heads by default) decodes ``--steps`` positions one at
a time on a cache, as ``generate`` does, over a fixed source memory. After each checkpoint
step the self-attention caches' buffers are measured: the bytes allocated (``room``, what
the process holds) and the bytes of the positions held. Cross-attention caches hold the
source's keys and values once; they are reported apart, since they do not grow with the
output. The figures are the tensors' own sizes (``numel × element size``), exact on any
machine. Each layout's decoder output is checked against a full causal pass first.

    python benchmarks/kv_cache_memory.py --steps 256 1024 4096
"""

from __future__ import annotations

import argparse
from datetime import date
from pathlib import Path

import torch
from torch.testing import assert_close

from attention import Decoder
from attention.bench import kit

RESULTS = Path(__file__).resolve().parent / "results"


def layouts(n_heads: int, n_kv_heads: int, window: int) -> dict[str, dict]:
    return {
        f"MHA ({n_heads} KV heads)": {},
        f"GQA ({n_kv_heads} KV heads)": {"n_kv_heads": n_kv_heads},
        "MQA (1 KV head)": {"n_kv_heads": 1},
        f"MHA, window {window}": {"window": (window, 0)},
        f"GQA ({n_kv_heads} KV heads), window {window}": {"n_kv_heads": n_kv_heads,
                                                         "window": (window, 0)},
    }


def cache_bytes(cache) -> dict[str, int]:
    """Allocated and held bytes of the self- and cross-attention caches of every layer."""
    sizes = {"self_room": 0, "self_held": 0, "cross": 0}
    for self_cache, cross_cache in cache.layers:
        for buffer in (self_cache._k, self_cache._v):
            sizes["self_room"] += buffer.numel() * buffer.element_size()
        for held in (self_cache.k, self_cache.v):
            sizes["self_held"] += held.numel() * held.element_size()
        for held in (cross_cache.k, cross_cache.v):
            sizes["cross"] += held.numel() * held.element_size()
    return sizes


def check_against_full_pass(decoder: Decoder, memory: torch.Tensor, steps: int = 40) -> None:
    x = torch.randn(1, steps, decoder.d_model)
    full = decoder(x, memory)
    cache = decoder.new_cache()
    stepped = torch.cat([decoder(x[:, i: i + 1], memory, cache=cache) for i in range(steps)], 1)
    assert_close(stepped, full, atol=1e-4, rtol=1e-4)


def measure(args: argparse.Namespace) -> list[dict]:
    """One row per layout and checkpoint step, with its cache's bytes and its ratio to
    full multi-head attention's allocation."""
    rows = []
    checkpoints = sorted(set(args.steps))
    for name, kwargs in layouts(args.n_heads, args.n_kv_heads, args.window).items():
        torch.manual_seed(0)
        decoder = Decoder(args.d_model, args.n_heads, args.n_layers, dropout=0.0,
                          positional="rotary", **kwargs).eval()
        memory = torch.randn(1, args.source_length, args.d_model)
        with torch.no_grad():
            check_against_full_pass(decoder, memory)
            cache = decoder.new_cache(capacity=checkpoints[-1])  # what generate asks for
            x = torch.randn(1, 1, args.d_model)
            for step in range(1, checkpoints[-1] + 1):
                decoder(x, memory, cache=cache)
                if step in checkpoints:
                    rows.append({"layout": name, "steps": step, **cache_bytes(cache)})
        kit.say(f"{name}: done")
    full = {row["steps"]: row["self_room"] for row in rows
            if row["layout"] == f"MHA ({args.n_heads} KV heads)"}
    for row in rows:
        row["vs_mha"] = row["self_room"] / full[row["steps"]]
    return rows


def markdown(report: dict) -> list[str]:
    config = report["config"]
    return [
        f"A Decoder of d_model {config['d_model']}, {config['n_heads']} query heads, "
        f"{config['n_layers']} layers, float32, decoding one position a step over a "
        f"{config['source_length']}-token source; the cache is created with capacity = the "
        "last step count, as generate creates it. Bytes are the cache tensors' own sizes.", "",
        *kit.markdown_table(
            ["layout", "steps", "self-attention allocated", "held", "vs MHA", "cross-attention"],
            [[row["layout"], row["steps"], f"{row['self_room'] / 2**10:.0f} KiB",
              f"{row['self_held'] / 2**10:.0f} KiB", f"{row['vs_mha']:.3f}",
              f"{row['cross'] / 2**10:.0f} KiB"] for row in report["rows"]])]


def main(argv: list[str] | None = None) -> dict:
    parser = kit.benchmark_parser(__doc__, out=RESULTS, out_help="results folder")
    parser.add_argument("--d-model", type=kit.positive_int, default=256)
    parser.add_argument("--n-heads", type=kit.positive_int, default=16)
    parser.add_argument("--n-kv-heads", type=kit.positive_int, default=4)
    parser.add_argument("--n-layers", type=kit.positive_int, default=2)
    parser.add_argument("--window", type=kit.positive_int, default=64)
    parser.add_argument("--source-length", type=kit.positive_int, default=32)
    parser.add_argument("--steps", type=kit.positive_int, nargs="+", default=[256, 1024, 4096])
    args = parser.parse_args(argv)
    return kit.publish(args.out / f"kv-cache-memory-{date.today()}", __file__, argv,
                       title=f"Decoder KV cache memory, {date.today()}", markdown=markdown,
                       config={k: v for k, v in vars(args).items() if k != "out"},
                       rows=measure(args))


if __name__ == "__main__":
    main()
