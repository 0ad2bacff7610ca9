"""A ModernBERT converted to our stack against transformers' own, CPU inference, fp32.

A randomly initialised ``ModernBertModel`` (8 layers, d_model 512, 8 heads, GeGLU of 768,
local layers within 64 positions each side, every third layer global) runs with
``attn_implementation="sdpa"``; :func:`attention.interop.from_transformers` converts it.
Both encode the same token ids with the same ``attention_mask``:

- one sequence of each of ``--lengths`` (no padding);
- a batch of ``--batch`` sequences of ``--batch-length`` positions whose lengths spread
  evenly so that ``--padding`` of the positions are padding.

The outputs are compared first (largest difference at real positions). Then the two run in
alternated rounds under ``torch.inference_mode``; each round's ratio is transformers' time
over ours (> 1: ours is faster), and the medians are reported. transformers' sliding layers
run SDPA over every key with a band mask; ours run blocked local attention on long inputs
(:mod:`attention.local`), and ours leaves padding out (:mod:`attention.packing`).

    python benchmarks/modernbert.py --rounds 7
"""

from __future__ import annotations

import argparse
import json
import sys
from datetime import date
from pathlib import Path

import torch

from attention.bench.cells import round_ratios, timing_summary
from attention.bench.environment import environment
from attention.bench.timing import timed
from attention.common.files import write_text_atomic
from attention.interop import from_transformers
from attention.interop.convert import import_transformers

RESULTS = Path(__file__).resolve().parent / "results"


def build_models(args: argparse.Namespace) -> tuple[torch.nn.Module, torch.nn.Module]:
    """transformers' ModernBertModel (SDPA) and ours converted from it, in eval mode."""
    transformers = import_transformers()
    torch.manual_seed(args.seed)
    config = transformers.ModernBertConfig(
        vocab_size=args.vocab, hidden_size=args.d_model, num_hidden_layers=args.n_layers,
        num_attention_heads=args.n_heads, intermediate_size=args.d_ff,
        local_attention=2 * args.window, global_attn_every_n_layers=args.global_every,
        max_position_embeddings=max(args.lengths + [args.batch_length]),
        pad_token_id=0, bos_token_id=1, eos_token_id=2, cls_token_id=1, sep_token_id=2)
    theirs = transformers.ModernBertModel._from_config(config, attn_implementation="sdpa")
    theirs.eval()
    return theirs, from_transformers(theirs).eval()


def padded_lengths(batch: int, length: int, padding: float) -> list[int]:
    """``batch`` lengths spread evenly and symmetrically around ``(1 - padding) · length``,
    the longest ``length``: ``padding`` of the batch's positions are padding."""
    mean = (1 - padding) * length
    shortest = max(1, round(2 * mean - length))
    if batch == 1:
        return [length]
    return [round(shortest + (length - shortest) * i / (batch - 1)) for i in range(batch)]


def cases(args: argparse.Namespace) -> list[dict]:
    generator = torch.Generator().manual_seed(args.seed)
    result = []
    for length in args.lengths:
        result.append({"name": f"1 x {length}", "lengths": [length], "length": length})
    if args.batch:
        lengths = padded_lengths(args.batch, args.batch_length, args.padding)
        result.append({"name": f"{args.batch} x {args.batch_length}, padded",
                       "lengths": lengths, "length": args.batch_length})
    for case in result:
        ids = torch.randint(3, args.vocab, (len(case["lengths"]), case["length"]),
                            generator=generator)
        mask = (torch.arange(case["length"]) < torch.tensor(case["lengths"])[:, None]).long()
        case["inputs"] = (ids * mask, mask)
    return result


def measure(args: argparse.Namespace, theirs: torch.nn.Module, ours: torch.nn.Module,
            case: dict) -> dict:
    ids, mask = case["inputs"]
    runs = {"transformers": lambda: theirs(input_ids=ids, attention_mask=mask),
            "ours": lambda: ours(ids, mask)}
    cpu = torch.device("cpu")
    with torch.inference_mode():
        reference = runs["transformers"]().last_hidden_state
        difference = (runs["ours"]() - reference)[mask.bool()].abs().max().item()
        times: dict[str, list[float]] = {name: [] for name in runs}
        for round_ in range(args.rounds):
            order = list(runs) if round_ % 2 == 0 else list(reversed(runs))
            for name in order:
                times[name].append(timed(runs[name], cpu))
    real = int(mask.sum())
    return {"case": case["name"], "lengths": case["lengths"],
            "padding": 1 - real / mask.numel(), "max_abs_difference": difference,
            "ratio": round_ratios(times["transformers"], times["ours"]),
            **{name: timing_summary(values) for name, values in times.items()}}


def markdown(report: dict) -> str:
    config = report["config"]
    lines = [
        f"# ModernBERT, ours converted vs transformers, CPU inference, {report['date']}",
        "",
        f"`{report['environment']['command']}`: {report['environment']['device_name']}, "
        f"{report['environment']['threads']} threads, torch {report['environment']['torch']}"
        f", transformers {report['transformers']}, commit "
        f"{report['environment']['git_commit']}. ModernBertModel of {config['n_layers']} "
        f"layers, d_model {config['d_model']}, {config['n_heads']} heads, GeGLU "
        f"{config['d_ff']}, window {config['window']} each side, layer i global when i % "
        f"{config['global_every']} == 0, float32, random weights; transformers "
        f"with attn_implementation='sdpa'. {config['rounds']} alternated rounds after a "
        f"warm-up run; ratio = transformers' time / ours per round, median (> 1: ours "
        f"faster).",
        "",
        "| input | padding | transformers (ms) | ours (ms) | ratio (median) | "
        "max abs diff |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for row in report["rows"]:
        lines.append(f"| {row['case']} | {row['padding']:.0%} | "
                     f"{row['transformers']['median_ms']:.1f} | {row['ours']['median_ms']:.1f}"
                     f" | {row['ratio']['median']:.2f}x | {row['max_abs_difference']:.1e} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[512, 2048, 8192])
    parser.add_argument("--batch", type=int, default=16, help="0: no padded batch")
    parser.add_argument("--batch-length", type=int, default=512)
    parser.add_argument("--padding", type=float, default=0.25)
    parser.add_argument("--d-model", type=int, default=512)
    parser.add_argument("--n-heads", type=int, default=8)
    parser.add_argument("--n-layers", type=int, default=8)
    parser.add_argument("--d-ff", type=int, default=768)
    parser.add_argument("--window", type=int, default=64, help="each side")
    parser.add_argument("--global-every", type=int, default=3)
    parser.add_argument("--vocab", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--tag", default="", help="appended to the results' file names")
    args = parser.parse_args(argv)
    if not 0 <= args.padding < 1:
        parser.error(f"--padding: expected a fraction in [0, 1), got {args.padding}")
    if args.threads:
        torch.set_num_threads(args.threads)
    theirs, ours = build_models(args)
    rows = []
    for case in cases(args):
        rows.append(measure(args, theirs, ours, case))
        row = rows[-1]
        print(f"{row['case']}: {row['ratio']['median']:.2f}x (transformers "
              f"{row['transformers']['median_ms']:.1f} ms, ours {row['ours']['median_ms']:.1f}"
              f" ms, max abs diff {row['max_abs_difference']:.1e})", file=sys.stderr)
    report = {"schema": 1, "date": date.today().isoformat(),
              "environment": environment(torch.device("cpu"), " ".join(sys.argv)),
              "transformers": import_transformers().__version__,
              "config": {key: value for key, value in vars(args).items() if key != "out"},
              "rows": rows}
    stem = f"modernbert-cpu-{report['date']}{args.tag}"
    write_text_atomic(args.out / f"{stem}.json", json.dumps(report, indent=2) + "\n")
    text = markdown(report)
    write_text_atomic(args.out / f"{stem}.md", text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
