"""Does a model exported to CTranslate2 translate as ours does? Token agreement and BLEU.

The checkpoint is converted (``attention.translation.export.export_ctranslate2``) to a
float32 and an int8 CTranslate2 model; the test sentences are translated by ours (float32)
and by both conversions, greedily and with beam search, each search given the same length
limit as ours (``eval.max_len_a * source length + eval.max_len_b`` over the same batches).
Reported: the fraction of sentences whose output tokens are identical to ours, and sacreBLEU
of each against the references.

    python benchmarks/ctranslate2_agreement.py --checkpoint RUN/checkpoint_best.pt \\
        [--source test.de.gz --reference test.en.gz] --out benchmarks/results/NAME

Without ``--source``/``--reference`` the test split of the checkpoint's own data config is
used (the toy corpus regenerated from its seed, or its Multi30k/parallel files).
"""

from __future__ import annotations

import argparse
import dataclasses
import tempfile
from collections.abc import Sequence
from datetime import date
from pathlib import Path

import ctranslate2
import torch

from attention.bench import kit
from attention.translation.checkpoint import config_from_checkpoint, load_checkpoint
from attention.translation.config import Config
from attention.translation.data.corpus import read_lines
from attention.translation.data.dataset import load_splits
from attention.translation.data.tokenizer import BOS_ID, PAD_ID, SPECIAL_TOKENS
from attention.translation.export import export_ctranslate2
from attention.translation.metrics import bleu
from attention.translation.translator import Translator

RESULTS = Path(__file__).resolve().parent / "results"
QUANTIZATIONS = ("float32", "int8")
# Our searches never write padding or BOS; CTranslate2 is told the same.
SUPPRESSED = [[SPECIAL_TOKENS[PAD_ID]], [SPECIAL_TOKENS[BOS_ID]]]


def read_test_set(args: argparse.Namespace, config: Config
                   ) -> tuple[list[str], list[str], str]:
    """Sources, references and a description of where they come from."""
    if args.source is not None:
        sources, references = read_lines(args.source), read_lines(args.reference)
        if len(sources) != len(references):
            raise SystemExit(f"error: --reference: expected {len(sources)} lines (as "
                             f"--source), got {len(references)}")
        described = f"{Path(args.source).name} / {Path(args.reference).name}"
    else:
        pairs = load_splits(config.data)["test"]
        sources, references = [p.source for p in pairs], [p.target for p in pairs]
        described = f"the checkpoint's {config.data.corpus} test split"
    if args.limit is not None:
        sources, references = sources[:args.limit], references[:args.limit]
    return sources, references, described


def batches_like_ours(sources: Sequence[Sequence[int]], translator: Translator
                      ) -> list[tuple[list[int], int]]:
    """The batches :meth:`Translator.search` makes (longest first, by ``eval.batch_size``
    and ``eval.batch_tokens``) and the length limit of each: ``(indices, max_new_tokens)``."""
    return [(chunk, translator.length_limit(max(len(sources[i]) for i in chunk)))
            for chunk in translator._batches(sources)]


def ctranslate2_ids(model: ctranslate2.Translator, translator: Translator,
                    sources: Sequence[Sequence[int]], beam_size: int) -> list[list[int]]:
    """CTranslate2's output ids (up to and with ``<eos>``), searched as ours searches."""
    src, tgt = translator.src_tokenizer, translator.tgt_tokenizer
    results: list[list[int]] = [[] for _ in sources]
    for chunk, max_new in batches_like_ours(sources, translator):
        # The model appends <eos> itself (add_source_eos), as Translator.encode did.
        tokens = [[src.id_to_token(i) for i in sources[index][:-1]] for index in chunk]
        outputs = model.translate_batch(
            tokens, beam_size=beam_size, length_penalty=translator.eval_config.length_penalty,
            max_decoding_length=max_new, min_decoding_length=0, max_input_length=0,
            suppress_sequences=SUPPRESSED, return_end_token=True)
        for index, output in zip(chunk, outputs, strict=True):
            results[index] = [tgt.token_to_id(t) for t in output.hypotheses[0]]
    return results


def with_empty(sentences: Sequence[str], real: list[int], texts: list[str]) -> list[str]:
    """Translations of all ``sentences``: ``texts`` for the ``real`` ones, "" for the others
    (as :meth:`Translator.translate` does)."""
    out = [""] * len(sentences)
    for index, text in zip(real, texts, strict=True):
        out[index] = text
    return out


def measure(args: argparse.Namespace) -> dict:
    checkpoint = load_checkpoint(args.checkpoint)
    config = config_from_checkpoint(checkpoint)
    sources, references, described = read_test_set(args, config)
    translator = Translator.from_checkpoint(args.checkpoint, "cpu", precision="fp32")
    real = [i for i, sentence in enumerate(sources) if sentence.strip()]
    ids = translator.encode([sources[i] for i in real])
    engines = {("ours", "float32"): lambda beam: translator.generate_ids(ids, beam_size=beam)}
    rows, ours, sizes, models = [], {}, {}, {}
    with tempfile.TemporaryDirectory() as scratch:
        for quantization in QUANTIZATIONS:
            folder = export_ctranslate2(translator, Path(scratch) / quantization,
                                        quantization=quantization)
            sizes[quantization] = (folder / "model.bin").stat().st_size
            models[quantization] = ctranslate2.Translator(
                str(folder), device="cpu", inter_threads=1,
                intra_threads=torch.get_num_threads())
            engines["ctranslate2", quantization] = \
                lambda beam, m=models[quantization]: ctranslate2_ids(m, translator, ids, beam)
        for (engine, weights), translate in engines.items():
            for beam in args.beam_sizes:
                seconds, found = kit.timed_call(lambda t=translate, b=beam: t(b))
                ours.setdefault(beam, found)
                rows.append(row(engine, weights, beam, found, ours[beam], seconds, translator,
                                sources, real, references))
                kit.say(f"{engine} {weights} beam {beam}: identical "
                        f"{rows[-1]['identical_to_ours']:.2%}, BLEU {rows[-1]['bleu']:.2f}")
        speed = [alternated(translator, models, ids, beam, args.rounds)
                 for beam in args.beam_sizes] if args.rounds else []
    return {"checkpoint_step": checkpoint["progress"]["step"],
            "test_set": described, "sentences": len(sources),
            "model": dataclasses.asdict(config.model), "eval": dataclasses.asdict(config.eval),
            "model_bin_bytes": sizes, "results": rows, "speed": speed}


def alternated(translator: Translator, models: dict[str, ctranslate2.Translator],
               ids: Sequence[Sequence[int]], beam: int, rounds: int) -> dict:
    """The whole test set translated by ours and each CTranslate2 model in turn, ``rounds``
    rotated rounds after a warm-up: medians, and each peer's time ÷ ours per round (above 1,
    ours is faster)."""
    runs = {"ours": lambda: translator.generate_ids(ids, beam_size=beam)}
    for name, model in models.items():
        runs[f"ctranslate2 {name}"] = lambda m=model: ctranslate2_ids(m, translator, ids, beam)
    result = kit.alternate(runs, rounds, log=kit.say, label=f"beam {beam}",
                           pairs={name: (name, "ours") for name in runs if name != "ours"})
    return {"beam_size": beam, **result}


def row(engine: str, weights: str, beam: int, ids: list[list[int]], ours: list[list[int]],
        seconds: float, translator: Translator, sources: Sequence[str], real: list[int],
        references: Sequence[str]) -> dict:
    translations = with_empty(sources, real, translator.decode(ids))
    scores = bleu(translations, references)
    identical = sum(a == b for a, b in zip(ids, ours, strict=True))
    return {"engine": engine, "weights": weights, "beam_size": beam,
            "identical_to_ours": identical / max(len(ids), 1),
            "identical_sentences": identical,
            "bleu": round(scores["bleu"], 2), "bleu_lowercase": round(scores["bleu_lowercase"], 2),
            "seconds": round(seconds, 3)}


def markdown(report: dict) -> list[str]:
    model, env = report["model"], report["environment"]
    lines = [
        f"{env['device_name']}, torch {env['torch']}, ctranslate2 "
        f"{env['packages']['ctranslate2']}, {report['threads']} thread"
        f"{'s' if report['threads'] != 1 else ''}. Checkpoint `{report['checkpoint']}` of "
        f"step {report['checkpoint_step']} (d_model {model['d_model']}, {model['n_heads']} heads, "
        f"{model['n_encoder_layers']}+{model['n_decoder_layers']} layers, "
        f"{model['positional']} positions, {'pre' if model['norm_first'] else 'post'}-norm, "
        f"{model['activation']}); {report['sentences']} sentences of {report['test_set']}. "
        "Each search gets our length limit over our batches; CTranslate2 with "
        "`suppress_sequences=[['<pad>'], ['<bos>']]`, `min_decoding_length=0`. "
        "Identical: the output tokens equal ours at the same beam size. Seconds: wall time "
        "of the whole test set on a machine shared with other work (indicative only).", "",
        *kit.markdown_table(
            ["engine", "weights", "beam", "identical to ours", "BLEU", "BLEU (lowercased)",
             "seconds"],
            [[r["engine"], r["weights"], r["beam_size"], "(reference)" if r["engine"] == "ours"
              else f"{r['identical_to_ours']:.2%} ({r['identical_sentences']})",
              f"{r['bleu']:.2f}", f"{r['bleu_lowercase']:.2f}", f"{r['seconds']:.2f}"]
             for r in report["results"]], align="llrrrrr"), "",
        "model.bin: " + ", ".join(f"{name} {size / 1e6:.2f} MB"
                                  for name, size in report["model_bin_bytes"].items())]
    if report["speed"]:
        lines += ["", "Speed, alternated: the whole test set translated by each in turn, "
                  f"{report['speed'][0]['rounds']} rounds; medians, and each peer's median "
                  "per-round ratio, its time ÷ ours (above 1: ours faster).", "",
                  *kit.markdown_table(["beam", "engine", "seconds", "time ÷ ours"], [
                      [cell["beam_size"], name, f"{entry['median_ms'] / 1e3:.2f}",
                       f"{cell['ratios'][name]['median']:.2f}×" if name in cell["ratios"]
                       else "-"]
                      for cell in report["speed"] for name, entry in cell["contenders"].items()],
                      align="rlrr")]
    return lines


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = kit.benchmark_parser(__doc__,
                                  out=RESULTS / f"ctranslate2-agreement-{date.today()}")
    parser.add_argument("--checkpoint", type=Path, required=True)
    parser.add_argument("--source", type=Path, help="source sentences, one a line (.gz too)")
    parser.add_argument("--reference", type=Path, help="their reference translations")
    parser.add_argument("--beam-sizes", type=kit.positive_int, nargs="+", default=[1, 4])
    parser.add_argument("--limit", type=kit.positive_int, help="only the first N sentences")
    parser.add_argument("--rounds", type=kit.non_negative_int, default=0,
                        help="also time ours and CTranslate2 alternately this many rounds")
    parser.add_argument("--threads", type=kit.positive_int,
                        help="CPU threads of torch and CTranslate2 (default: torch's); on a "
                             "machine shared with other work, 1 avoids threads that spin "
                             "waiting for a busy core")
    args = parser.parse_args(argv)
    if (args.source is None) != (args.reference is None):
        parser.error("--source, --reference: expected both or neither, got one")
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    return kit.publish(args.out, __file__, argv, markdown=markdown, packages=["ctranslate2"],
                       title=f"CTranslate2 export: agreement with ours ({date.today()})",
                       threads=torch.get_num_threads(),
                       checkpoint=kit.shown_path(args.checkpoint.resolve()), **measure(args))


if __name__ == "__main__":
    main()
