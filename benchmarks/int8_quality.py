"""BLEU and speed of a translation checkpoint on the CPU, float32 against its int8 copy
(``attention.quantization.quantize_dynamic``: every ``nn.Linear`` in dynamic int8).

Both translators share the checkpoint's tokenizers and decoding settings (batch size,
length penalty, length limits) and run without autocast (``precision="fp32"``); only the
Linear layers differ. Each round translates all the sentences with each model, greedy and
with beam search, alternating which model goes first so that drifts in the machine hit both;
the times are medians over rounds, and the speed-up is the median of the per-round ratios.
The translations of the first round are scored with sacreBLEU (``metrics.bleu``).

    python benchmarks/int8_quality.py --checkpoint runs/multi30k_de_en/checkpoint_best.pt \\
        --source test_2016_flickr.de.gz --reference test_2016_flickr.en.gz --out results/x
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import statistics
import time
from collections.abc import Sequence
from datetime import date
from pathlib import Path

import torch
from torch import nn

from attention.common.files import write_text_atomic
from attention.quantization import quantize_dynamic
from attention.translation.data.corpus import read_lines
from attention.translation.metrics import bleu
from attention.translation.translator import Translator

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
MODELS = ("fp32", "int8")


def display_path(path: Path) -> str:
    """``path`` relative to the clone when inside it, else its last two parts: the report
    names its inputs without this machine's absolute paths."""
    resolved = Path(path).resolve()
    try:
        return str(resolved.relative_to(ROOT))
    except ValueError:
        return str(Path(*resolved.parts[-2:]))


def load_translators(checkpoint: Path) -> dict[str, Translator]:
    """The checkpoint's float32 translator and an int8 copy of it, on the CPU."""
    fp32 = Translator.from_checkpoint(checkpoint, device="cpu", precision="fp32")
    int8 = Translator(quantize_dynamic(fp32.model), fp32.src_tokenizer, fp32.tgt_tokenizer,
                      fp32.eval_config, precision="fp32")
    return {"fp32": fp32, "int8": int8}


def read_test_set(source: Path, reference: Path, limit: int | None
                  ) -> tuple[list[str], list[str]]:
    """The first ``limit`` (all when ``None``) line-aligned source and reference sentences."""
    sources, references = read_lines(source), read_lines(reference)
    if len(sources) != len(references):
        raise ValueError(f"reference: expected {len(sources)} lines (as in {source}), got "
                         f"{len(references)} in {reference}")
    return sources[:limit], references[:limit]


def serialized_megabytes(model: nn.Module) -> float:
    """Size of ``torch.save(model.state_dict())``, in MB (int8 weights are packed)."""
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    return buffer.getbuffer().nbytes / 1e6


def timed_translation(translator: Translator, sentences: Sequence[str], beam_size: int
                      ) -> tuple[float, list[str]]:
    start = time.perf_counter()
    translations = translator.translate(sentences, beam_size=beam_size)
    return time.perf_counter() - start, translations


def measure(translators: dict[str, Translator], sources: list[str], references: list[str],
            beam_size: int, rounds: int) -> dict:
    """Alternated timings and BLEU of both translators at one beam size."""
    for translator in translators.values():  # warm-up: first-call allocations, not timed
        translator.translate(sources[:8], beam_size=beam_size)
    seconds: dict[str, list[float]] = {name: [] for name in MODELS}
    translations: dict[str, list[str]] = {}
    for round_index in range(rounds):
        order = MODELS if round_index % 2 == 0 else MODELS[::-1]
        for name in order:
            elapsed, output = timed_translation(translators[name], sources, beam_size)
            seconds[name].append(elapsed)
            translations.setdefault(name, output)
    ratios = [fp32 / int8 for fp32, int8 in zip(seconds["fp32"], seconds["int8"], strict=True)]
    row: dict = {"beam_size": beam_size}
    for name in MODELS:
        median = statistics.median(seconds[name])
        row[name] = {**bleu(translations[name], references), "seconds": median,
                     "sentences_per_s": len(sources) / median}
    row["bleu_difference"] = row["int8"]["bleu"] - row["fp32"]["bleu"]
    row["speedup"] = statistics.median(ratios)
    row["identical_translations"] = sum(
        a == b for a, b in zip(translations["fp32"], translations["int8"], strict=True)
    ) / max(len(sources), 1)
    row["rounds"] = [{"fp32_s": a, "int8_s": b, "speedup": r}
                     for a, b, r in zip(seconds["fp32"], seconds["int8"], ratios, strict=True)]
    row["examples"] = [{"source": s, "reference": r, "fp32": a, "int8": b}
                       for s, r, a, b in zip(sources[:3], references[:3], translations["fp32"],
                                             translations["int8"], strict=False)]
    return row


def markdown(report: dict) -> str:
    lines = [
        f"# int8 dynamic quantization against float32 on the CPU ({report['date']})",
        "",
        f"`{report['command']}`",
        "",
        f"{report['machine']}, torch {report['torch']}, {report['threads']} threads. "
        f"Checkpoint `{report['checkpoint']}` ({report['parameters'] / 1e6:.2f}M parameters; "
        f"state dict {report['megabytes']['fp32']:.1f} MB in fp32, "
        f"{report['megabytes']['int8']:.1f} MB with int8 Linear layers), "
        f"{report['sentences']} sentences of `{report['source']}` against "
        f"`{report['reference']}`; decoding batch {report['eval']['batch_size']}, length "
        f"penalty {report['eval']['length_penalty']}. Times are medians of "
        f"{report['rounds']} alternated rounds; speed-up is the median per-round ratio "
        "fp32 time / int8 time. BLEU is sacreBLEU's (13a), cased and lowercased.",
        "",
        "| beam | fp32 BLEU | int8 BLEU | Δ BLEU | fp32 BLEU (lc) | int8 BLEU (lc) | "
        "fp32 s | int8 s | speed-up | identical translations |",
        "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for row in report["results"]:
        fp32, int8 = row["fp32"], row["int8"]
        lines.append(
            f"| {row['beam_size']} | {fp32['bleu']:.2f} | {int8['bleu']:.2f} | "
            f"{row['bleu_difference']:+.2f} | {fp32['bleu_lowercase']:.2f} | "
            f"{int8['bleu_lowercase']:.2f} | {fp32['seconds']:.2f} | {int8['seconds']:.2f} | "
            f"{row['speedup']:.2f}× | {row['identical_translations']:.1%} |")
    return "\n".join(lines) + "\n"



def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive int, got {value}")
    return value


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", type=Path, required=True)
    parser.add_argument("--source", type=Path, required=True, help="plain or .gz text")
    parser.add_argument("--reference", type=Path, required=True, help="plain or .gz text")
    parser.add_argument("--limit", type=positive_int, help="the first N sentences only")
    parser.add_argument("--beams", type=positive_int, nargs="+", default=[1, 4],
                        help="beam sizes (1: greedy)")
    parser.add_argument("--rounds", type=positive_int, default=3)
    parser.add_argument("--threads", type=positive_int, default=2)
    parser.add_argument("--out", type=Path, help="results path, without suffix",
                        default=RESULTS / f"int8-cpu-{date.today()}")
    return parser.parse_args(argv)


def command(args: argparse.Namespace) -> str:
    """The command line of this run, with its paths as :func:`display_path` writes them."""
    parts = ["python benchmarks/int8_quality.py", "--checkpoint", display_path(args.checkpoint),
             "--source", display_path(args.source), "--reference", display_path(args.reference)]
    if args.limit is not None:
        parts += ["--limit", str(args.limit)]
    parts += ["--beams", *map(str, args.beams), "--rounds", str(args.rounds), "--threads",
              str(args.threads), "--out", display_path(args.out)]
    return " ".join(parts)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    sources, references = read_test_set(args.source, args.reference, args.limit)
    translators = load_translators(args.checkpoint)
    results = []
    for beam_size in args.beams:
        results.append(measure(translators, sources, references, beam_size, args.rounds))
        row = results[-1]
        print(f"beam {beam_size}: BLEU fp32 {row['fp32']['bleu']:.2f}, int8 "
              f"{row['int8']['bleu']:.2f}; {row['fp32']['seconds']:.1f} s vs "
              f"{row['int8']['seconds']:.1f} s, {row['speedup']:.2f}x", flush=True)
    fp32 = translators["fp32"]
    report = {
        "date": str(date.today()),
        "command": command(args),
        "machine": f"{platform.machine()} CPU, {os.cpu_count()} cores",
        "torch": torch.__version__,
        "quantized_engine": torch.backends.quantized.engine,
        "threads": torch.get_num_threads(),
        "checkpoint": display_path(args.checkpoint),
        "source": display_path(args.source),
        "reference": display_path(args.reference),
        "sentences": len(sources),
        "rounds": args.rounds,
        "parameters": sum(p.numel() for p in fp32.model.parameters()),
        "megabytes": {name: serialized_megabytes(t.model) for name, t in translators.items()},
        "eval": {key: getattr(fp32.eval_config, key)
                 for key in ("batch_size", "length_penalty", "max_len_a", "max_len_b")},
        "results": results,
    }
    write_text_atomic(args.out.with_suffix(".json"),
                      json.dumps(report, indent=2, ensure_ascii=False) + "\n")
    write_text_atomic(args.out.with_suffix(".md"), markdown(report))
    print(f"wrote {args.out}.json and .md")


if __name__ == "__main__":
    main()
