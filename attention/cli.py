"""Command-line entry points: ``attention-train``, ``attention-translate``,
``attention-plot-attention``, ``attention-bench`` (and the same as ``python scripts/NAME.py``).

Each parses its arguments and calls the library; errors a user can fix are printed as one
line with the exit status 2 (bad arguments or config), 1 (the run failed) or 130 (Ctrl-C).
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

__all__ = ["bench_main", "plot_attention_main", "train_main", "translate_main"]


def _fail(message: str, status: int) -> int:
    print(f"error: {message}", file=sys.stderr)
    return status


def train_main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="attention-train", description="Train a translation Transformer from a YAML config.",
        epilog="Example: attention-train --config configs/toy_translation.yaml train.lr=1e-3")
    parser.add_argument("--config", required=True, help="YAML file with model/data/train/eval")
    parser.add_argument("overrides", nargs="*", metavar="section.key=value",
                        help="override config values, e.g. train.max_minutes=5")
    parser.add_argument("--resume", action="store_true",
                        help="continue from checkpoint_last.pt in the run's folder "
                             "(train.run_dir/NAME)")
    args = parser.parse_intermixed_args(argv)
    from .distributed import environment_world_size

    if environment_world_size() > 1:
        # Under torchrun: an error that escapes a rank is recorded for torchrun's summary.
        from torch.distributed.elastic.multiprocessing.errors import record

        return record(_train)(args)
    return _train(args)


def _train(args: argparse.Namespace) -> int:
    from .config import ConfigError, load_config
    from .distributed import environment_rank
    from .training import NonFiniteLossError, TrainingInterrupted, train

    try:
        config = load_config(args.config, args.overrides)
        train(config, resume=args.resume)
    except (ConfigError, FileNotFoundError) as error:
        return _fail_rank(error, str(error), 2)
    except (ValueError, UnicodeDecodeError) as error:  # bad data or settings found on the way
        return _fail_rank(error, f"{type(error).__name__}: {error}", 2)
    except NonFiniteLossError as error:
        return _fail_rank(error, str(error), 1)
    except TrainingInterrupted as error:
        if environment_rank() == 0:  # every rank stops; one says so
            print(str(error), file=sys.stderr)
        return 130
    return 0


def _fail_rank(error: BaseException, message: str, status: int) -> int:
    """One line, and under torchrun the rank's name in it and the error in torchrun's summary
    of failed ranks (which otherwise shows only an exit code)."""
    from .distributed import environment_rank, environment_world_size

    if environment_world_size() == 1:
        return _fail(message, status)
    from torch.distributed.elastic.multiprocessing.errors import ErrorHandler

    ErrorHandler().record_exception(error)
    return _fail(f"[rank {environment_rank()}] {message}", status)


def translate_main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="attention-translate",
        description="Translate sentences (arguments, or standard input one per line) with a "
                    "trained checkpoint; writes one translation per line.")
    parser.add_argument("--checkpoint", required=True, help="checkpoint_best.pt of a run")
    parser.add_argument("sentences", nargs="*", help="sentences; none: read standard input")
    parser.add_argument("--beam-size", type=int, default=None, help="1 is greedy search")
    parser.add_argument("--length-penalty", type=float, default=None)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--references", type=Path, default=None,
                        help="file of reference translations: print BLEU and exact match")
    args = parser.parse_args(argv)
    if args.beam_size is not None and args.beam_size < 1:
        parser.error(f"--beam-size: expected a positive integer, got {args.beam_size}")

    from .translator import Translator

    try:
        translator = Translator.from_checkpoint(args.checkpoint, device=args.device)
    except (FileNotFoundError, ValueError) as error:
        return _fail(str(error), 2)
    sentences = args.sentences or [line.rstrip("\n") for line in sys.stdin]
    translations = translator.translate(sentences, beam_size=args.beam_size,
                                        length_penalty=args.length_penalty)
    sys.stdout.write("".join(t + "\n" for t in translations))
    if args.references is not None:
        from .data.corpus import read_lines
        from .metrics import bleu, exact_match

        references = read_lines(args.references)
        if len(references) != len(translations):
            return _fail(f"--references: expected {len(translations)} lines (one per "
                         f"sentence), got {len(references)}", 2)
        scores = bleu(translations, references)
        print(f"BLEU {scores['bleu']:.2f} (lowercased {scores['bleu_lowercase']:.2f}), exact "
              f"match {exact_match(translations, references):.2%}", file=sys.stderr)
    return 0


def plot_attention_main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="attention-plot-attention",
        description="Translate a sentence and draw its encoder self-attention and decoder "
                    "cross-attention, one panel per layer and head.")
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("sentence")
    parser.add_argument("--out", type=Path, default=Path("attention_plots"),
                        help="folder for attention_encoder.png and attention_cross.png")
    parser.add_argument("--device", default="auto")
    args = parser.parse_args(argv)

    from .plotting import plot_attention_grid
    from .translator import Translator

    try:
        translator = Translator.from_checkpoint(args.checkpoint, device=args.device)
    except (FileNotFoundError, ValueError) as error:
        return _fail(str(error), 2)
    attention = translator.attention(args.sentence)
    translation = translator.tgt_tokenizer.decode(
        [translator.tgt_tokenizer.token_to_id(t) for t in attention["target_tokens"]])
    paths = [
        plot_attention_grid(attention["encoder"], attention["source_tokens"],
                            attention["source_tokens"], args.out / "attention_encoder.png",
                            title=f"encoder self-attention: {args.sentence}"),
        plot_attention_grid(attention["cross"], attention["target_tokens"],
                            attention["source_tokens"], args.out / "attention_cross.png",
                            title=f"cross-attention: {args.sentence} → {translation}"),
    ]
    print(translation)
    for path in paths:
        print(f"wrote {path}", file=sys.stderr)
    return 0


def bench_main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="attention-bench",
        description="Time this package's Encoder (explicit, fused, compiled) against "
                    "torch.nn.TransformerEncoder and x-transformers; print a table and write "
                    "DEVICE-CONFIG-DATE.json and .md (and a .png for several lengths).",
        epilog="Example: attention-bench --device cpu --config configs/bench/small.yaml "
               "repeats=7")
    parser.add_argument("--device", required=True, choices=["cpu", "cuda"])
    parser.add_argument("--config", required=True, help="YAML file, e.g. configs/bench/small.yaml")
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="override config values, e.g. lengths=[256] cpu_peak_rss=false")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default: 2 on cpu, torch's own on cuda)")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"),
                        help="folder for the result files")
    parser.add_argument("--repeats", type=int, default=None,
                        help="alternated rounds (at least 5); overrides the config's")
    parser.add_argument("--contenders", default=None,
                        help="comma-separated subset of: ours-explicit, ours-fused, "
                             "ours-compiled, torch-nobias, torch-bias, x-transformers (the "
                             "default), ours-sdpa-math, ours-sdpa-flash, ours-sdpa-efficient, "
                             "ours-sdpa-cudnn (SDPA forced to one kernel)")
    args = parser.parse_intermixed_args(argv)
    if args.threads is not None and args.threads < 1:
        parser.error(f"--threads: expected a positive integer, got {args.threads}")
    # The command line, as the results record it: python scripts/bench.py or attention-bench.
    program = sys.argv[0] if argv is None else "attention-bench"
    program_words = ["python", program] if program.endswith(".py") else [Path(program).name]
    command = shlex.join([*program_words, *(sys.argv[1:] if argv is None else argv)])

    import torch

    from .bench import (
        format_table,
        load_bench_config,
        parse_contenders,
        run_benchmark,
        write_results,
    )
    from .config import ConfigError

    if args.device == "cuda" and not torch.cuda.is_available():
        return _fail(f"--device: cuda requested, but this machine has no CUDA device "
                     f"(torch {torch.__version__}); use --device cpu", 2)
    overrides = list(args.overrides)
    if args.repeats is not None:
        overrides.append(f"repeats={args.repeats}")
    threads = args.threads if args.threads is not None else (
        2 if args.device == "cpu" else None)
    try:
        config = load_bench_config(args.config, overrides)
        contenders = parse_contenders(args.contenders)
        report = run_benchmark(config, args.device, contenders=contenders, threads=threads,
                               command=command)
    except ConfigError as error:
        return _fail(str(error), 2)
    except KeyboardInterrupt:
        print("interrupted: no results written", file=sys.stderr)
        return 130
    print(format_table(report))
    for path in write_results(report, args.out):
        print(f"wrote {path}", file=sys.stderr)
    return 0
