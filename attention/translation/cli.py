"""Command-line entry points: ``attention-train``, ``attention-translate``,
``attention-plot-attention`` (and the same as ``python scripts/NAME.py``).

Each parses its arguments and calls the library; errors a user can fix are printed as one
line with the exit status 2 (bad arguments or config), 1 (the run failed) or 130 (Ctrl-C).
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

__all__ = ["average_main", "export_main", "plot_attention_main", "train_main",
           "translate_main"]


def _fail(message: str, status: int) -> int:
    print(f"error: {message}", file=sys.stderr)
    return status


def train_main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="attention-train", description="Train a translation Transformer from a YAML config.",
        epilog="Example: attention-train --config configs/toy_translation.yaml train.lr=1e-3")
    parser.add_argument("--config", help="YAML file with model/data/train/eval (with --resume "
                                          "RUN_FOLDER: the run's own config, from its "
                                          "checkpoint, when left out)")
    parser.add_argument("overrides", nargs="*", metavar="section.key=value",
                        help="override config values, e.g. train.max_minutes=5")
    parser.add_argument("--resume", nargs="?", const=True, default=False, metavar="RUN_FOLDER",
                        help="continue the latest run in train.run_dir/NAME (each run has a "
                             "folder version_N there; a new run never replaces one), or the "
                             "run folder given (runs/NAME: its latest run), from its "
                             "checkpoint_last.pt")
    args = parser.parse_intermixed_args(_bare_resume_last(
        sys.argv[1:] if argv is None else list(argv)))
    if args.config is None and not isinstance(args.resume, str):
        parser.error("--config: expected a YAML config, or --resume RUN_FOLDER to continue a "
                     "run with its own config")
    from .distributed import environment_world_size

    if environment_world_size() > 1:
        # Under torchrun: an error that escapes a rank is recorded for torchrun's summary.
        from torch.distributed.elastic.multiprocessing.errors import record

        return record(_train)(args)
    return _train(args)


_OVERRIDE = re.compile(r"(name|(model|data|train|eval)\.\w+)=")


def _bare_resume_last(argv: list[str]) -> list[str]:
    """``--config C --resume train.lr=1e-4``: a bare ``--resume`` followed by an override
    (which argparse would take for its folder) moves to the end, the overrides keeping
    their order."""
    for index, word in enumerate(argv[:-1]):
        if word == "--resume" and _OVERRIDE.match(argv[index + 1]):
            return [*argv[:index], *argv[index + 1:], "--resume"]
    return argv


def _train(args: argparse.Namespace) -> int:
    from .config import ConfigError, load_config
    from .distributed import environment_rank, peer_lost
    from .runs import config_of_run
    from .training import CheckpointSaveError, NonFiniteLossError, TrainingInterrupted, train

    try:
        if args.config is None:  # --resume RUN_FOLDER alone: the run's own config
            config = config_of_run(args.resume, args.overrides)
        else:  # a resumed run's tokenizers come from its checkpoint, not from their files
            config = load_config(args.config, args.overrides, tokenizers_saved=bool(args.resume))
        train(config, resume=args.resume)
    except (ConfigError, FileNotFoundError) as error:
        return _fail_rank(error, str(error), 2)
    except (ValueError, UnicodeDecodeError) as error:  # bad data or settings found on the way
        return _fail_rank(error, f"{type(error).__name__}: {error}", 2)
    except (NonFiniteLossError, CheckpointSaveError) as error:
        return _fail_rank(error, str(error), 1)
    except TrainingInterrupted as error:
        if environment_rank() == 0:  # every rank stops; one says so
            print(str(error), file=sys.stderr)
        return 130
    except RuntimeError as error:
        if not peer_lost(error):
            raise
        # Another rank died (killed, out of memory): torchrun's summary names it, with its
        # exit code; this rank says in one line why it stops, not in a collective's traceback.
        first = str(error).strip().splitlines()[0][:200] if str(error).strip() else ""
        return _fail_rank(error, f"another rank stopped, so this one cannot go on ({first}); "
                                 f"torchrun's summary names the rank that failed first", 1)
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
                    "trained checkpoint or model folder; writes one translation per line, or "
                    "with --nbest/--scores the lines 'index ||| translation ||| score' "
                    "(fairseq's and Marian's n-best layout; index counts sentences from 0).")
    model = parser.add_mutually_exclusive_group(required=True)
    model.add_argument("--checkpoint", help="a checkpoint, or a run folder: runs/NAME means its "
                                            "latest run's averaged (else best) checkpoint")
    model.add_argument("--model", help="a model folder written by attention-export")
    parser.add_argument("sentences", nargs="*", help="sentences; none: read standard input")
    parser.add_argument("--beam-size", type=int, default=None, help="1 is greedy search")
    parser.add_argument("--length-penalty", type=float, default=None)
    parser.add_argument("--nbest", type=int, default=1,
                        help="translations per sentence: beam search's n best, or n samples")
    parser.add_argument("--scores", action="store_true",
                        help="print each translation's score (sum log p / length ** lp)")
    parser.add_argument("--min-new-tokens", type=int, default=0)
    parser.add_argument("--no-repeat-ngram-size", type=int, default=0)
    parser.add_argument("--sample", action="store_true",
                        help="draw each token (with --temperature, --top-k, --top-p)")
    parser.add_argument("--temperature", type=float, default=None, help="with --sample")
    parser.add_argument("--top-k", type=int, default=None, help="with --sample; 0: no cut")
    parser.add_argument("--top-p", type=float, default=None, help="with --sample; 1: no cut")
    parser.add_argument("--seed", type=int, default=None, help="makes --sample reproducible")
    parser.add_argument("--int8", action="store_true",
                        help="CPU only: int8 dynamic quantization of the Linear layers")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--references", type=Path, default=None,
                        help="file of reference translations, one per line: print to standard "
                             "error BLEU (cased and lowercased), chrF++, TER and exact match "
                             "of each sentence's first translation, then each metric's "
                             "sacreBLEU signature")
    args = parser.parse_args(argv)
    if args.beam_size is not None and args.beam_size < 1:
        parser.error(f"--beam-size: expected a positive integer, got {args.beam_size}")
    if args.nbest < 1:
        parser.error(f"--nbest: expected a positive integer, got {args.nbest}")
    sampling_flags = {"--temperature": args.temperature, "--top-k": args.top_k,
                      "--top-p": args.top_p, "--seed": args.seed}
    given = [flag for flag, value in sampling_flags.items() if value is not None]
    if given and not args.sample:
        parser.error(f"{', '.join(given)}: expected only with --sample (they shape sampling), "
                     f"got them without it")
    sampling: dict[str, object] = {}
    if args.sample:
        if args.beam_size is None:
            args.beam_size = 1  # sampling draws one token per step: not the config's beam
        given_options = {"temperature": args.temperature, "top_k": args.top_k,
                         "top_p": args.top_p}  # the others keep generate's defaults
        sampling = {"do_sample": True, **{key: value for key, value in given_options.items()
                                          if value is not None}}

    from .runs import model_checkpoint
    from .translator import Translator

    try:
        if args.checkpoint is not None:
            translator = Translator.from_checkpoint(
                model_checkpoint(args.checkpoint), device=args.device)
        else:
            translator = Translator.from_pretrained(args.model, device=args.device)
        if args.int8:
            from .quantization import quantize_dynamic

            translator.model = quantize_dynamic(translator.model)
            translator.precision = "fp32"  # int8 layers take float32 inputs, no autocast
    except (OSError, ValueError) as error:  # missing, unreadable, or not a whole model
        return _fail(str(error), 2)
    sentences = args.sentences or [line.rstrip("\n") for line in sys.stdin]
    try:
        translations = translator.translate(
            sentences, beam_size=args.beam_size, length_penalty=args.length_penalty,
            num_return_sequences=args.nbest, return_scores=True, seed=args.seed,
            min_new_tokens=args.min_new_tokens, no_repeat_ngram_size=args.no_repeat_ngram_size,
            **sampling)
    except (ValueError, TypeError) as error:  # an option the search refuses, by name
        return _fail(str(error), 2)
    if args.nbest > 1 or args.scores:
        sys.stdout.write("".join(f"{index} ||| {t.text} ||| {t.score:.4f}\n"
                                 for index, group in enumerate(translations) for t in group))
    else:
        sys.stdout.write("".join(group[0].text + "\n" for group in translations))
    if args.references is not None:
        from .data.corpus import read_lines
        from .metrics import corpus_scores, exact_match

        references = read_lines(args.references)
        best = [group[0].text for group in translations]
        if len(references) != len(best):
            return _fail(f"--references: expected {len(best)} lines (one per "
                         f"sentence), got {len(references)}", 2)
        if not best:
            return _fail("--references: expected sentences to score, got none", 2)
        scores = corpus_scores(best, references)
        print(f"BLEU {scores['bleu']:.2f} (lowercased {scores['bleu_lowercase']:.2f}), "
              f"chrF++ {scores['chrf']:.2f}, TER {scores['ter']:.2f}, exact match "
              f"{exact_match(best, references):.2%}", file=sys.stderr)
        for name, label in (("bleu", "BLEU"), ("bleu_lowercase", "BLEU lowercased"),
                            ("chrf", "chrF++"), ("ter", "TER")):
            print(f"{label} signature: {scores['signatures'][name]}", file=sys.stderr)
    return 0


def plot_attention_main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="attention-plot-attention",
        description="Translate a sentence and draw its encoder self-attention and decoder "
                    "cross-attention, one panel per layer and head.")
    parser.add_argument("--checkpoint", required=True,
                        help="a checkpoint, or a run folder: runs/NAME means its latest run's "
                             "averaged (else best) checkpoint")
    parser.add_argument("sentence")
    parser.add_argument("--out", type=Path, default=Path("attention_plots"),
                        help="folder for attention_encoder.png and attention_cross.png")
    parser.add_argument("--device", default="auto")
    args = parser.parse_args(argv)
    if not args.sentence.strip():
        parser.error("sentence: expected a sentence to translate, got an empty one")

    from .plotting import plot_attention_grid
    from .runs import model_checkpoint
    from .translator import Translator

    try:
        translator = Translator.from_checkpoint(model_checkpoint(args.checkpoint),
                                                device=args.device)
    except (OSError, ValueError) as error:  # missing, unreadable, or not a whole checkpoint
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


def export_main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="attention-export",
        description="Write a trained checkpoint as a model folder (safetensors weights, JSON "
                    "config and tokenizers; load with Translator.from_pretrained) or as a "
                    "CTranslate2 model folder.",
        epilog="Example: attention-export --checkpoint runs/toy_translation "
               "--out toy_ct2 --format ctranslate2 --quantization int8")
    parser.add_argument("--checkpoint", required=True,
                        help="a checkpoint, or a run folder: runs/NAME means its latest run's "
                             "averaged (else best) checkpoint")
    parser.add_argument("--out", required=True, type=Path, help="the folder to write")
    parser.add_argument("--format", choices=("folder", "ctranslate2"), default="folder")
    parser.add_argument("--quantization", default=None,
                        help="ctranslate2 only: int8, int8_float32, int16, float16, ...")
    parser.add_argument("--force", action="store_true", help="replace an existing folder")
    args = parser.parse_args(argv)
    if args.quantization is not None and args.format != "ctranslate2":
        parser.error("--quantization: expected only with --format ctranslate2, got "
                     f"--format {args.format}")

    from .runs import model_checkpoint
    from .translator import Translator

    try:
        translator = Translator.from_checkpoint(model_checkpoint(args.checkpoint), device="cpu")
        if args.format == "folder":
            from .export.folder import save_pretrained

            out = save_pretrained(translator, args.out, overwrite=args.force)
        else:
            from .export.ctranslate2 import export_ctranslate2

            out = export_ctranslate2(translator, args.out, args.quantization,
                                     overwrite=args.force)
    except (OSError, ValueError, ImportError) as error:  # the checkpoint, the folder, a choice
        return _fail(str(error), 2)
    print(f"wrote {out}", file=sys.stderr)
    return 0


def average_main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="attention-average",
        description="Average the weights of checkpoints of one run (often a little better "
                    "than any one of them) into a new checkpoint: the last one given, with "
                    "the averaged weights; translate with it or export it like any other.",
        epilog="Example: attention-average runs/wmt/checkpoint_step*.pt "
               "--output runs/wmt/averaged.pt")
    parser.add_argument("checkpoints", nargs="+", type=Path, metavar="CHECKPOINT",
                        help="checkpoints of the same model (its settings and tokenizers)")
    parser.add_argument("--output", required=True, type=Path, help="the checkpoint to write")
    parser.add_argument("--force", action="store_true", help="replace an existing --output")
    args = parser.parse_args(argv)
    output = args.output.resolve()
    for path in args.checkpoints:
        if path.resolve() == output:
            return _fail(f"--output: {args.output} is one of the checkpoints to average; "
                         f"write the average to another file", 2)
    if args.output.exists() and not args.force:
        return _fail(f"--output: {args.output} exists; pass --force to replace it", 2)

    from .averaging import average_checkpoints
    from .checkpoint import save_checkpoint

    try:
        average = average_checkpoints(args.checkpoints)
        out = save_checkpoint(args.output, average)
    except (OSError, ValueError) as error:  # missing, unreadable, or of another model
        return _fail(str(error), 2)
    steps = ", ".join(str(source["step"]) for source in average["averaged_from"])
    count = len(average["averaged_from"])
    print(f"averaged {count} checkpoint{'s' if count > 1 else ''} (step{'s' if count > 1 else ''} "
          f"{steps}) into {out}", file=sys.stderr)
    return 0
