"""What the decoding-time steps of a training recipe are worth, measured on one finished run:
checkpoint averaging (how many of the last numbered checkpoints), beam size and length
penalty.

The run folder must hold the numbered checkpoints that ``train.keep_last`` keeps. For each
``--average`` count N, the last N checkpoints are averaged (N=1: the last one alone) and
scored on validation and test with the run's own beam and length penalty; the best single
checkpoint (``checkpoint_best.pt``) is scored too. Then, with the average of the run's
``train.average_last`` checkpoints (the model its results.json scores), every ``--beams`` ×
``--length-penalties`` pair is scored on validation, and on test only each beam's penalty
at 1.0 and the one validation prefers: test is not used to choose.

All scores are sacreBLEU (``metrics.corpus_scores``: cased BLEU, chrF++, TER) on the
detokenized output. Writes ``effects.json`` and ``effects.md`` into ``--out`` (the run's
committed results folder).

    python benchmarks/recipe_effects.py runs/multi30k_de_en --out results/multi30k_de_en
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from attention.bench import kit
from attention.translation.averaging import average_checkpoints
from attention.translation.checkpoint import (
    config_from_checkpoint,
    load_checkpoint,
    numbered_checkpoints,
)
from attention.translation.data import load_splits
from attention.translation.metrics import corpus_scores
from attention.translation.runs import latest_run
from attention.translation.translator import Translator

SCORES = ("bleu", "chrf", "ter")


def score(translator: Translator, pairs: Sequence[Any], beam: int, penalty: float
          ) -> dict[str, float]:
    """Cased BLEU, chrF++ and TER of ``translator`` on ``pairs``, and the decoding seconds."""
    seconds, hypotheses = kit.timed_call(lambda: translator.translate(
        [p.source for p in pairs], beam_size=beam, length_penalty=penalty))
    scores = corpus_scores(hypotheses, [p.target for p in pairs])
    return {**{key: round(scores[key], 2) for key in SCORES}, "seconds": round(seconds, 1)}


def measure(run: Path, averages: list[int], beams: list[int], penalties: list[float]
            ) -> dict[str, Any]:
    run = latest_run(run) or run  # runs/NAME: its latest run (version_N)
    numbered = numbered_checkpoints(run)
    if not numbered:
        raise SystemExit(f"{run}: no numbered checkpoints (train.keep_last) to average")
    translator = Translator.from_checkpoint(run / "checkpoint_best.pt", device="cpu")
    best = load_checkpoint(run / "checkpoint_best.pt")
    config = config_from_checkpoint(best)
    splits = load_splits(config.data)
    val, test = splits["val"], splits["test"]
    beam, penalty = config.eval.beam_size, config.eval.length_penalty
    report: dict[str, Any] = {
        "run": run.name, "decoding": {"beam_size": beam, "length_penalty": penalty},
        "numbered_steps": [step for step, _ in numbered], "averaging": [], "search": []}

    report["averaging"].append({"checkpoints": "best", "steps": [best["progress"]["step"]],
                                "val": score(translator, val, beam, penalty),
                                "test": score(translator, test, beam, penalty)})
    final = config.train.average_last or 1
    final_weights = None  # the search below uses the average of the last `final`
    for count in averages:
        chosen = numbered[-count:]
        weights = average_checkpoints([path for _, path in chosen])["model"]
        translator.model.load_state_dict(weights)
        if count == final:
            final_weights = weights
        report["averaging"].append({"checkpoints": count, "steps": [s for s, _ in chosen],
                                    "val": score(translator, val, beam, penalty),
                                    "test": score(translator, test, beam, penalty)})
        kit.say(json.dumps(report["averaging"][-1]))

    if final_weights is None:
        final_weights = average_checkpoints([path for _, path in numbered[-final:]])["model"]
    translator.model.load_state_dict(final_weights)
    report["search_model"] = f"average of the last {final} checkpoints"
    for size in beams:
        rows = [{"beam_size": size, "length_penalty": lp,
                 "val": score(translator, val, size, lp)} for lp in penalties]
        chosen = max(rows, key=lambda row: row["val"]["bleu"])
        for row in rows:
            if row["length_penalty"] in (1.0, chosen["length_penalty"]):
                row["test"] = score(translator, test, size, row["length_penalty"])
            row["chosen_on_val"] = row is chosen
            kit.say(json.dumps(row))
        report["search"].extend(rows)
    return report


def markdown(report: dict[str, Any]) -> list[str]:
    def name(count: int | str) -> str:
        return {"best": "best single", 1: "last alone"}.get(count, f"last {count}")

    def test_scores(row: dict[str, Any]) -> list[str]:
        return [str(row["test"][key]) if "test" in row else "" for key in SCORES]

    decoding = report["decoding"]
    return [
        "Scores: sacreBLEU cased BLEU, chrF++, TER on detokenized output.", "",
        f"## Checkpoint averaging (beam {decoding['beam_size']}, length penalty "
        f"{decoding['length_penalty']})", "",
        *kit.markdown_table(
            ["checkpoints", "steps", "val BLEU", "test BLEU", "test chrF++", "test TER"],
            [[name(row["checkpoints"]), ", ".join(map(str, row["steps"])), row["val"]["bleu"],
              *test_scores(row)] for row in report["averaging"]], align="llrrrr"),
        "", f"## Beam size and length penalty ({report['search_model']})", "",
        "Test is scored for length penalty 1.0 and for the one validation chose (*).", "",
        *kit.markdown_table(
            ["beam", "length penalty", "val BLEU", "test BLEU", "test chrF++", "test TER",
             "val seconds"],
            [[row["beam_size"], f"{row['length_penalty']}{' *' if row['chosen_on_val'] else ''}",
              row["val"]["bleu"], *test_scores(row), row["val"]["seconds"]]
             for row in report["search"]], align="r" * 7)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run", type=Path, help="the run folder (runs/NAME)")
    parser.add_argument("--out", type=Path, required=True, help="folder for effects.json/.md")
    parser.add_argument("--average", type=kit.positive_int, nargs="+", default=[1, 2, 3, 5, 8])
    parser.add_argument("--beams", type=kit.positive_int, nargs="+", default=[1, 4, 8])
    parser.add_argument("--length-penalties", type=float, nargs="+",
                        default=[0.6, 0.8, 1.0, 1.2, 1.5])
    parser.add_argument("--threads", type=kit.positive_int, default=None)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    report = measure(args.run, args.average, args.beams, args.length_penalties)
    kit.publish(args.out / "effects", __file__, argv, title=f"Recipe effects: {report['run']}",
                markdown=markdown, **report)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
