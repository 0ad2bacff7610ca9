"""Translation scores: sacreBLEU (BLEU, chrF++, TER), exact match, and how well
cross-attention aligns words."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import sacrebleu
import torch
from sacrebleu.metrics import BLEU, CHRF, TER
from torch import Tensor

__all__ = ["alignment_hits", "best_alignment_head", "bleu", "corpus_scores", "exact_match"]


def _check_lengths(hypotheses: Sequence[str], references: Sequence[str]) -> None:
    if len(hypotheses) != len(references):
        raise ValueError(f"hypotheses: expected {len(references)} (one per reference), got "
                         f"{len(hypotheses)}")


def bleu(hypotheses: Sequence[str], references: Sequence[str]) -> dict[str, float]:
    """Corpus BLEU on detokenized text with sacreBLEU's default ``13a`` tokenizer.

    Returns ``{"bleu": cased, "bleu_lowercase": lowercased}``; published Multi30k tables
    use the lowercased figure.
    """
    _check_lengths(hypotheses, references)
    cased = sacrebleu.corpus_bleu(list(hypotheses), [list(references)])
    lower = sacrebleu.corpus_bleu(list(hypotheses), [list(references)], lowercase=True)
    return {"bleu": cased.score, "bleu_lowercase": lower.score}


def exact_match(hypotheses: Sequence[str], references: Sequence[str]) -> float:
    """The fraction of hypotheses equal to their reference (surrounding spaces ignored)."""
    _check_lengths(hypotheses, references)
    if not references:
        return 0.0
    same = sum(h.strip() == r.strip() for h, r in zip(hypotheses, references, strict=True))
    return same / len(references)


def corpus_scores(hypotheses: Sequence[str], references: Sequence[str]) -> dict[str, Any]:
    """BLEU (cased and lowercased), chrF++ and TER of detokenized text, one reference each,
    with each metric's sacreBLEU signature, so that a figure can be reproduced.

    The metrics are sacreBLEU's defaults: BLEU with the ``13a`` tokenizer and exponential
    smoothing, chrF++ (``CHRF(word_order=2)``: character 6-grams and word 2-grams), and TER,
    which by default ignores case. Returns ``{"bleu", "bleu_lowercase", "chrf", "ter"}`` as
    floats (0 to 100; TER is an edit rate, lower is better, and can exceed 100) and
    ``"signatures"``: the same keys mapped to strings such as
    ``"nrefs:1|case:mixed|eff:no|tok:13a|smooth:exp|version:2.6.0"``.

    Raises ``ValueError`` when the lengths differ or there is nothing to score (a corpus
    score of no sentences is undefined, and sacreBLEU cannot sign it).
    """
    _check_lengths(hypotheses, references)
    if not references:
        raise ValueError("hypotheses: expected at least one sentence to score, got none")
    metrics = {"bleu": BLEU(), "bleu_lowercase": BLEU(lowercase=True),
               "chrf": CHRF(word_order=2), "ter": TER()}
    hyps, refs = list(hypotheses), [list(references)]
    scores: dict[str, Any] = {name: float(metric.corpus_score(hyps, refs).score)
                              for name, metric in metrics.items()}
    # a signature names the number of references, known only once a metric has scored
    scores["signatures"] = {name: metric.get_signature().format()
                            for name, metric in metrics.items()}
    return scores


def alignment_hits(cross_attention: Sequence[Tensor], gold: Sequence[Sequence[int] | None]
                   ) -> tuple[Tensor, Tensor, int]:
    """Count target words whose strongest cross-attention falls on their gold source word.

    ``cross_attention[l]`` is layer ``l``'s ``(B, H, Lt, Ls)`` weights under teacher forcing,
    where row ``i`` is the decoder step that predicts target word ``i`` (the decoder reads
    ``[bos] + words``). ``gold[b][i]`` is the source position of word ``i`` of example ``b``
    (``None`` skips the example).

    Returns ``(hits (layers, heads), head_mean_hits (layers,), words)``: per head, and with
    each layer's weights averaged over its heads first.
    """
    weights = torch.stack([w.detach().float() for w in cross_attention])  # (l, b, h, t, s)
    n_layers, batch, n_heads = weights.shape[:3]
    if len(gold) != batch:
        raise ValueError(f"gold: expected {batch} alignments (the batch), got {len(gold)}")
    hits = torch.zeros(n_layers, n_heads, dtype=torch.long)
    head_mean_hits = torch.zeros(n_layers, dtype=torch.long)
    words = 0
    for b, alignment in enumerate(gold):
        if not alignment:
            continue
        n = len(alignment)
        target = torch.tensor(alignment, device=weights.device)  # (t,)
        rows = weights[:, b, :, :n]  # (l, h, t, s)
        hits += (rows.argmax(dim=-1) == target).sum(dim=-1).cpu()
        head_mean_hits += (rows.mean(dim=1).argmax(dim=-1) == target).sum(dim=-1).cpu()
        words += n
    return hits, head_mean_hits, words


def best_alignment_head(hits: Tensor) -> tuple[int, int]:
    """The ``(layer, head)`` (0-based) with the most hits in a ``(layers, heads)`` count."""
    layer, head = divmod(int(hits.argmax()), hits.shape[1])
    return layer, head
