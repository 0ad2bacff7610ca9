"""Scoring a model on a split: the teacher-forced loss, the translations of the split decoded
and scored against its references (BLEU, chrF++, TER, exact match), and, where the split has
gold word alignments, how well each cross-attention head aligns.

:func:`evaluate` scores one split; :func:`score_test_split` makes the test results a run
reports (the alignment head chosen on validation); :func:`validation_scores` keeps the numbers
a ``val`` record of ``metrics.jsonl`` holds.
"""

from __future__ import annotations

from typing import Any

import torch

from ..models import Transformer
from .config import EvalConfig
from .data import ParallelData, token_batches
from .loss import sequence_loss
from .metrics import alignment_hits, best_alignment_head, corpus_scores, exact_match
from .precision import autocast
from .translator import Translator

__all__ = ["COMPARED", "evaluate", "results_summary", "score_test_split", "validation_scores"]

# The test scores of the best single checkpoint that results.json keeps beside an average's.
COMPARED = ("bleu", "bleu_lowercase", "chrf", "ter", "exact_match", "loss")


@torch.no_grad()
def evaluate(model: Transformer, data: ParallelData, translator: Translator, *,
             label_smoothing: float, batch_tokens: int, sentences: int | None = None,
             beam_size: int | None = None, alignment: bool = False, lowercase: bool = False
             ) -> dict[str, Any]:
    """Score ``model`` on ``data``: teacher-forced loss, then BLEU and exact match of its
    translations of the first ``sentences`` pairs (all when ``None``).

    With ``alignment`` (and gold alignments in ``data``), also the cross-attention
    alignment counts of :func:`attention.translation.metrics.alignment_hits`, summed over the
    data. ``lowercase`` compares with lowercased references (for a lowercasing tokenizer).
    """
    was_training = model.training
    model.eval()
    device = translator.device
    loss_sum = nll_sum = 0.0
    n_tokens = 0
    hits = head_mean_hits = None
    words = 0
    try:
        for indices in token_batches(data.lengths, batch_tokens, seed=0, epoch=0,
                                     shuffle=False):
            src, tgt_in, tgt_out = (t.to(device) for t in data.batch(indices))
            with autocast(device, translator.autocast_dtype):
                memory = model.encode(src)
                logits, cross = model.decode(tgt_in, memory, model.padding_mask(src),
                                             return_attention=True) if alignment else \
                    (model.decode(tgt_in, memory, model.padding_mask(src)), None)
            loss, count = sequence_loss(logits, tgt_out, label_smoothing)
            loss_sum += float(loss)
            nll_sum += float(sequence_loss(logits, tgt_out, 0.0)[0])
            n_tokens += int(count)
            if alignment:
                gold = [_word_alignment(data, i) for i in indices]
                h, m, w = alignment_hits(cross, gold)
                hits = h if hits is None else hits + h
                head_mean_hits = m if head_mean_hits is None else head_mean_hits + m
                words += w
        chosen = range(len(data)) if sentences is None else range(min(sentences, len(data)))
        hypotheses = translator.decode(translator.generate_ids(
            [data.sources[i] for i in chosen], beam_size=beam_size))
    finally:
        model.train(was_training)
    references = [data.pairs[i].target for i in chosen]
    if lowercase:  # the model can only produce what its tokenizer normalizes to
        references = [r.lower() for r in references]
    result = {"loss": loss_sum / max(n_tokens, 1), "nll": nll_sum / max(n_tokens, 1),
              "sentences": len(references), "hypotheses": hypotheses}
    if references:
        result.update(corpus_scores(hypotheses, references),
                      exact_match=exact_match(hypotheses, references))
    if alignment and words:
        result.update(alignment_hits=hits, alignment_head_mean_hits=head_mean_hits,
                      alignment_words=words)
    return result


def validation_scores(result: dict[str, Any]) -> dict[str, Any]:
    """The numbers of an :func:`evaluate` result that a ``val`` record keeps."""
    keys = ("loss", "nll", "bleu", "bleu_lowercase", "chrf", "ter", "exact_match", "sentences")
    return {key: result[key] for key in keys if key in result}


def _word_alignment(data: ParallelData, index: int) -> tuple[int, ...] | None:
    """The gold alignment of an example if its tokens are its words (one token per word)."""
    pair = data.pairs[index]
    if pair.alignment is None:
        return None
    if len(data.sources[index]) - 1 != len(pair.source.split()) or \
            len(data.targets[index]) - 2 != len(pair.alignment):
        return None
    return pair.alignment


def score_test_split(model: Transformer, test_data: ParallelData, val_data: ParallelData,
                     translator: Translator, eval_config: EvalConfig, *, label_smoothing: float,
                     batch_tokens: int, lowercase: bool) -> dict[str, Any]:
    """BLEU, exact match and loss on test, rounded for ``results.json``, with the decoding
    settings of ``eval_config`` they were made with; with gold alignments, the alignment
    accuracy of the head that aligns best on validation (``val_data``)."""
    has_alignment = any(p.alignment is not None for p in test_data.pairs)
    test = evaluate(model, test_data, translator, label_smoothing=label_smoothing,
                    batch_tokens=batch_tokens, alignment=has_alignment, lowercase=lowercase)
    results = {"bleu": round(test["bleu"], 2),
               "bleu_lowercase": round(test["bleu_lowercase"], 2),
               "chrf": round(test["chrf"], 2), "ter": round(test["ter"], 2),
               "exact_match": round(test["exact_match"], 4), "sentences": test["sentences"],
               "loss": round(test["loss"], 4), "beam_size": eval_config.beam_size,
               "length_penalty": eval_config.length_penalty,
               "signatures": test["signatures"]}
    if not (has_alignment and "alignment_hits" in test):
        return results
    val = evaluate(model, val_data, translator, label_smoothing=label_smoothing,
                   batch_tokens=batch_tokens, sentences=0, alignment=True)
    layer, head = best_alignment_head(val["alignment_hits"])
    test_accuracy = test["alignment_hits"].float() / test["alignment_words"]
    head_mean = test["alignment_head_mean_hits"].float() / test["alignment_words"]
    results.update(
        alignment_accuracy=round(float(test_accuracy[layer, head]), 4),
        alignment_layer=layer + 1, alignment_head=head + 1,
        alignment_accuracy_head_mean=round(float(head_mean[-1]), 4),
        alignment_accuracy_by_head=[[round(float(a), 4) for a in row]
                                    for row in test_accuracy],
        alignment_words=test["alignment_words"])
    return results


def results_summary(results: dict[str, Any], seconds: float) -> str:
    """The lines a run logs at its end: the test scores of ``results`` (as ``results.json``
    holds them) and the run's time, ``seconds``."""
    lines = [f"test: BLEU {results['bleu']:.2f} (lowercased {results['bleu_lowercase']:.2f}), "
             f"chrF++ {results['chrf']:.2f}, TER {results['ter']:.2f}, exact match "
             f"{results['exact_match']:.2%} on {results['sentences']} sentences"]
    if "checkpoint_best" in results:
        lines.append(f"averaged checkpoints of steps {results['averaged_steps']}; the best "
                     f"single one (step {results['best_step']}) scores BLEU "
                     f"{results['checkpoint_best']['bleu']:.2f}")
    if "alignment_accuracy" in results:
        lines.append(f"alignment accuracy {results['alignment_accuracy']:.2%} (decoder layer "
                     f"{results['alignment_layer']}, head {results['alignment_head']}); "
                     f"last layer, heads averaged: {results['alignment_accuracy_head_mean']:.2%}")
    lines.append(f"finished in {seconds / 60:.1f} min")
    return "\n".join(lines)
