"""BLEU and speed of a translation checkpoint on the CPU, float32 against its int8 copy
(``attention.translation.quantization.quantize_dynamic``: every ``nn.Linear`` in dynamic int8).

Both translators share the checkpoint's tokenizers and decoding settings (batch size,
length penalty, length limits) and run without autocast (``precision="fp32"``); only the
Linear layers differ. After a warm-up that translates all the sentences once with each model
(whose translations are scored with sacreBLEU, ``metrics.bleu``), each round translates them
all with each model, greedy and with beam search, alternating which model goes first so that
drifts in the machine hit both; the times are medians over rounds, and the speed-up is the
median of the per-round ratios.

    python benchmarks/int8_quality.py --checkpoint runs/multi30k_de_en/checkpoint_best.pt \\
        --source test_2016_flickr.de.gz --reference test_2016_flickr.en.gz --out results/x
"""

from __future__ import annotations

import argparse
import io
from datetime import date
from pathlib import Path

import torch
from torch import nn

from attention.bench import kit
from attention.translation.data.corpus import read_lines
from attention.translation.metrics import bleu
from attention.translation.quantization import quantize_dynamic
from attention.translation.translator import Translator

RESULTS = Path(__file__).resolve().parent / "results"
MODELS = ("fp32", "int8")


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


def measure(translators: dict[str, Translator], sources: list[str], references: list[str],
            beam_size: int, rounds: int) -> dict:
    """Alternated timings and BLEU of both translators at one beam size."""
    translations: dict[str, list[str]] = {}

    def keep(outputs: dict[str, list[str]]) -> None:
        translations.update(outputs)

    timing = kit.alternate(
        {name: lambda t=translator: t.translate(sources, beam_size=beam_size)
         for name, translator in translators.items()}, rounds, check=keep,
        pairs={"speedup": ("fp32", "int8")}, log=kit.say, label=f"beam {beam_size}")
    ratios = timing["ratios"]["speedup"]["per_round"]
    row: dict = {"beam_size": beam_size}
    for name in MODELS:
        seconds = timing["contenders"][name]["median_ms"] / 1e3
        row[name] = {**bleu(translations[name], references), "seconds": seconds,
                     "sentences_per_s": len(sources) / seconds}
    row["bleu_difference"] = row["int8"]["bleu"] - row["fp32"]["bleu"]
    row["speedup"] = timing["ratios"]["speedup"]["median"]
    row["identical_translations"] = sum(
        a == b for a, b in zip(translations["fp32"], translations["int8"], strict=True)
    ) / max(len(sources), 1)
    row["rounds"] = [{"fp32_s": a / 1e3, "int8_s": b / 1e3, "speedup": r} for a, b, r in zip(
        *(timing["contenders"][name]["times_ms"] for name in MODELS), ratios, strict=True)]
    row["timing"] = timing
    row["examples"] = [{"source": s, "reference": r, "fp32": a, "int8": b}
                       for s, r, a, b in zip(sources[:3], references[:3], translations["fp32"],
                                             translations["int8"], strict=False)]
    return row


def markdown(report: dict) -> list[str]:
    return [
        f"torch {report['environment']['torch']}, {report['threads']} threads, quantized "
        f"engine {report['quantized_engine']}. Checkpoint `{report['checkpoint']}` "
        f"({report['parameters'] / 1e6:.2f}M parameters; state dict "
        f"{report['megabytes']['fp32']:.1f} MB in fp32, {report['megabytes']['int8']:.1f} MB "
        f"with int8 Linear layers), {report['sentences']} sentences of `{report['source']}` "
        f"against `{report['reference']}`; decoding batch {report['eval']['batch_size']}, "
        f"length penalty {report['eval']['length_penalty']}. Times are medians of "
        f"{report['rounds']} alternated rounds; speed-up is the median per-round ratio "
        "fp32 time / int8 time. BLEU is sacreBLEU's (13a), cased and lowercased.", "",
        *kit.markdown_table(
            ["beam", "fp32 BLEU", "int8 BLEU", "Δ BLEU", "fp32 BLEU (lc)", "int8 BLEU (lc)",
             "fp32 s", "int8 s", "speed-up", "identical translations"],
            [[row["beam_size"], f"{row['fp32']['bleu']:.2f}", f"{row['int8']['bleu']:.2f}",
              f"{row['bleu_difference']:+.2f}", f"{row['fp32']['bleu_lowercase']:.2f}",
              f"{row['int8']['bleu_lowercase']:.2f}", f"{row['fp32']['seconds']:.2f}",
              f"{row['int8']['seconds']:.2f}", f"{row['speedup']:.2f}×",
              f"{row['identical_translations']:.1%}"] for row in report["results"]],
            align="r" * 10)]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = kit.benchmark_parser(__doc__, rounds=3, out=RESULTS / f"int8-cpu-{date.today()}")
    parser.add_argument("--checkpoint", type=Path, required=True)
    parser.add_argument("--source", type=Path, required=True, help="plain or .gz text")
    parser.add_argument("--reference", type=Path, required=True, help="plain or .gz text")
    parser.add_argument("--limit", type=kit.positive_int, help="the first N sentences only")
    parser.add_argument("--beams", type=kit.positive_int, nargs="+", default=[1, 4],
                        help="beam sizes (1: greedy)")
    parser.add_argument("--threads", type=kit.positive_int, default=2)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    sources, references = read_test_set(args.source, args.reference, args.limit)
    translators = load_translators(args.checkpoint)
    results = []
    for beam_size in args.beams:
        results.append(row := measure(translators, sources, references, beam_size, args.rounds))
        kit.say(f"beam {beam_size}: BLEU fp32 {row['fp32']['bleu']:.2f}, int8 "
                f"{row['int8']['bleu']:.2f}; {row['fp32']['seconds']:.1f} s vs "
                f"{row['int8']['seconds']:.1f} s, {row['speedup']:.2f}x")
    fp32 = translators["fp32"]
    return kit.publish(
        args.out, __file__, argv, markdown=markdown,
        title=f"int8 dynamic quantization against float32 on the CPU ({date.today()})",
        command=kit.command_line(__file__, argv), threads=torch.get_num_threads(),
        quantized_engine=torch.backends.quantized.engine,
        checkpoint=kit.shown_path(args.checkpoint.resolve()),
        source=kit.shown_path(args.source.resolve()),
        reference=kit.shown_path(args.reference.resolve()),
        sentences=len(sources), rounds=args.rounds,
        parameters=sum(p.numel() for p in fp32.model.parameters()),
        megabytes={name: serialized_megabytes(t.model) for name, t in translators.items()},
        eval={key: getattr(fp32.eval_config, key)
              for key in ("batch_size", "length_penalty", "max_len_a", "max_len_b")},
        results=results)


if __name__ == "__main__":
    main()
