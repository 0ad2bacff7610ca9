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
from datetime import date
from pathlib import Path

import torch

from attention.bench import kit
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
    """Each input: its name, lengths, ``(ids, attention_mask)`` of ``(batch, length)``."""
    generator = torch.Generator().manual_seed(args.seed)
    result = [{"name": f"1 x {length}", "lengths": [length], "length": length}
              for length in args.lengths]
    if args.batch:
        result.append({"name": f"{args.batch} x {args.batch_length}, padded", "length":
                       args.batch_length,
                       "lengths": padded_lengths(args.batch, args.batch_length, args.padding)})
    for case in result:
        ids = torch.randint(3, args.vocab, (len(case["lengths"]), case["length"]),
                            generator=generator)
        mask = (torch.arange(case["length"]) < torch.tensor(case["lengths"])[:, None]).long()
        case["inputs"] = (ids * mask, mask)
    return result


def measure(args: argparse.Namespace, theirs: torch.nn.Module, ours: torch.nn.Module,
            case: dict) -> dict:
    """One input: the outputs compared at real positions, then alternated rounds."""
    ids, mask = case["inputs"]

    def agree(outputs: dict) -> dict:
        difference = outputs["ours"] - outputs["transformers"].last_hidden_state
        return {"max_abs_difference": difference[mask.bool()].abs().max().item()}

    with torch.inference_mode():
        result = kit.alternate({"transformers": lambda: theirs(input_ids=ids, attention_mask=mask),
                                "ours": lambda: ours(ids, mask)}, args.rounds, check=agree,
                               pairs={"ratio": ("transformers", "ours")}, log=kit.say,
                               label=case["name"])
    return {"case": case["name"], "lengths": case["lengths"],
            "padding": 1 - int(mask.sum()) / mask.numel(), **result}


def markdown(report: dict) -> list[str]:
    config, env = report["config"], report["environment"]
    return [
        f"{env['device_name']}, {env['threads']} threads, torch {env['torch']}, transformers "
        f"{env['packages']['transformers']}, commit {env['git_commit']}. ModernBertModel of "
        f"{config['n_layers']} layers, d_model {config['d_model']}, {config['n_heads']} heads, "
        f"GeGLU {config['d_ff']}, window {config['window']} each side, layer i global when i % "
        f"{config['global_every']} == 0, float32, random weights; transformers with "
        f"attn_implementation='sdpa'. {config['rounds']} alternated rounds after a warm-up run; "
        "ratio = transformers' time / ours per round, median (> 1: ours faster).", "",
        *kit.markdown_table(
            ["input", "padding", "transformers (ms)", "ours (ms)", "ratio (median)",
             "max abs diff"],
            [[row["case"], f"{row['padding']:.0%}",
              f"{row['contenders']['transformers']['median_ms']:.1f}",
              f"{row['contenders']['ours']['median_ms']:.1f}",
              f"{row['ratios']['ratio']['median']:.2f}x",
              f"{row['check']['max_abs_difference']:.1e}"] for row in report["rows"]])]


def main(argv: list[str] | None = None) -> dict:
    parser = kit.benchmark_parser(__doc__, rounds=7, out=RESULTS, out_help="results folder")
    parser.add_argument("--lengths", type=kit.positive_int, nargs="+", default=[512, 2048, 8192])
    parser.add_argument("--batch", type=kit.non_negative_int, default=16,
                        help="0: no padded batch")
    parser.add_argument("--batch-length", type=kit.positive_int, default=512)
    parser.add_argument("--padding", type=kit.fraction, default=0.25)
    parser.add_argument("--d-model", type=kit.positive_int, default=512)
    parser.add_argument("--n-heads", type=kit.positive_int, default=8)
    parser.add_argument("--n-layers", type=kit.positive_int, default=8)
    parser.add_argument("--d-ff", type=kit.positive_int, default=768)
    parser.add_argument("--window", type=kit.positive_int, default=64, help="each side")
    parser.add_argument("--global-every", type=kit.positive_int, default=3)
    parser.add_argument("--vocab", type=kit.positive_int, default=1000)
    parser.add_argument("--threads", type=kit.positive_int, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tag", default="", help="appended to the results' file names")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    theirs, ours = build_models(args)
    rows = [measure(args, theirs, ours, case) for case in cases(args)]
    return kit.publish(args.out / f"modernbert-cpu-{date.today()}{args.tag}", __file__, argv,
                       title=f"ModernBERT, ours converted vs transformers, CPU inference, "
                             f"{date.today()}", markdown=markdown, packages=["transformers"],
                       config={k: v for k, v in vars(args).items() if k != "out"}, rows=rows)


if __name__ == "__main__":
    main()
