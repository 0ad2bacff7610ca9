"""Translation scores: BLEU (cased and lowercased), chrF++, TER and their sacreBLEU
signatures, exact match, cross-attention alignment."""

from __future__ import annotations

import pytest
import sacrebleu
import torch

from attention.translation.metrics import (
    alignment_hits,
    best_alignment_head,
    bleu,
    corpus_scores,
    exact_match,
)

REFERENCES = [
    "A man in a blue shirt is riding a bike down the street .",
    "Two dogs are playing in the snow near a fence .",
    "The children are laughing at the clown in the park .",
]


def test_identical_hypotheses_score_perfectly():
    scores = bleu(REFERENCES, REFERENCES)
    assert scores["bleu"] == pytest.approx(100.0)
    assert scores["bleu_lowercase"] == pytest.approx(100.0)
    assert exact_match(REFERENCES, REFERENCES) == 1.0


def test_lowercase_bleu_ignores_case_only_differences():
    hypotheses = [s.upper() if i == 0 else s.lower() for i, s in enumerate(REFERENCES)]
    scores = bleu(hypotheses, REFERENCES)
    assert scores["bleu"] < 100.0
    assert scores["bleu_lowercase"] == pytest.approx(100.0)
    assert scores["bleu_lowercase"] >= scores["bleu"]


def test_bleu_falls_with_worse_hypotheses():
    close = [s.replace("blue", "red") for s in REFERENCES]
    far = ["a cat sleeps .", "nothing here .", "the end ."]
    assert 0 < bleu(close, REFERENCES)["bleu"] < 100
    assert bleu(far, REFERENCES)["bleu"] < bleu(close, REFERENCES)["bleu"]


def test_exact_match_counts_whole_sentences():
    hypotheses = ["  " + REFERENCES[0] + " ", REFERENCES[1].lower(), "something else"]
    assert exact_match(hypotheses, REFERENCES) == pytest.approx(1 / 3)
    assert exact_match([], []) == 0.0


@pytest.mark.parametrize("score", [bleu, exact_match, corpus_scores])
def test_mismatched_lengths_raise(score):
    with pytest.raises(ValueError, match="hypotheses: expected 3 .*got 2"):
        score(REFERENCES[:2], REFERENCES)


CLOSE = [s.replace("blue", "red").replace("snow", "rain") for s in REFERENCES]
FAR = ["a cat sleeps .", "nothing here .", "the end ."]


def test_corpus_scores_of_identical_text_are_perfect():
    scores = corpus_scores(REFERENCES, REFERENCES)
    assert set(scores) == {"bleu", "bleu_lowercase", "chrf", "ter", "signatures"}
    assert scores["bleu"] == pytest.approx(100.0)
    assert scores["bleu_lowercase"] == pytest.approx(100.0)
    assert scores["chrf"] == pytest.approx(100.0)
    assert scores["ter"] == pytest.approx(0.0)
    assert all(type(scores[key]) is float for key in ("bleu", "bleu_lowercase", "chrf", "ter"))


def test_corpus_scores_move_the_right_way_for_worse_hypotheses():
    perfect, close, far = (corpus_scores(h, REFERENCES) for h in (REFERENCES, CLOSE, FAR))
    for key in ("bleu", "bleu_lowercase", "chrf"):
        assert perfect[key] > close[key] > far[key], key
    assert perfect["ter"] < close["ter"] < far["ter"]


def test_corpus_scores_equal_sacrebleus_own():
    scores = corpus_scores(CLOSE, REFERENCES)
    assert scores["bleu"] == sacrebleu.corpus_bleu(CLOSE, [REFERENCES]).score
    assert scores["bleu_lowercase"] == sacrebleu.corpus_bleu(CLOSE, [REFERENCES],
                                                             lowercase=True).score
    assert scores["chrf"] == sacrebleu.corpus_chrf(CLOSE, [REFERENCES], word_order=2).score
    assert scores["ter"] == sacrebleu.corpus_ter(CLOSE, [REFERENCES]).score
    # and the BLEU of bleu(), which training reports, is the same figure
    assert {key: scores[key] for key in ("bleu", "bleu_lowercase")} == bleu(CLOSE, REFERENCES)


def test_corpus_scores_are_case_sensitive_where_sacrebleu_is():
    upper = [s.upper() for s in REFERENCES]
    scores = corpus_scores(upper, REFERENCES)
    assert scores["bleu"] < 100.0 and scores["chrf"] < 100.0
    assert scores["bleu_lowercase"] == pytest.approx(100.0)
    assert scores["ter"] == pytest.approx(0.0)  # TER ignores case by default


def test_signatures_name_each_metrics_settings():
    signatures = corpus_scores(CLOSE, REFERENCES)["signatures"]
    assert set(signatures) == {"bleu", "bleu_lowercase", "chrf", "ter"}
    version = f"version:{sacrebleu.__version__}"
    for signature in signatures.values():
        fields = signature.split("|")
        assert "nrefs:1" in fields and version in fields, signature
    assert {"case:mixed", "tok:13a", "smooth:exp"} <= set(signatures["bleu"].split("|"))
    assert {"case:lc", "tok:13a"} <= set(signatures["bleu_lowercase"].split("|"))
    assert {"nc:6", "nw:2", "case:mixed"} <= set(signatures["chrf"].split("|"))
    assert {"tok:tercom", "case:lc"} <= set(signatures["ter"].split("|"))
    # the whole string, in sacreBLEU's order, as papers quote it
    assert signatures["bleu"] == f"nrefs:1|case:mixed|eff:no|tok:13a|smooth:exp|{version}"


def test_corpus_scores_of_nothing_raise_a_clear_error():
    with pytest.raises(ValueError, match="expected at least one sentence to score, got none"):
        corpus_scores([], [])


def test_corpus_scores_accept_empty_sentences():
    scores = corpus_scores(["", REFERENCES[1]], ["", REFERENCES[1]])
    assert 0.0 <= scores["chrf"] <= 100.0 and scores["ter"] >= 0.0


def peaked(argmaxes: list[int], peak: float, n_source: int) -> torch.Tensor:
    """(len(argmaxes), n_source) attention rows: ``peak`` on the argmax, the rest spread evenly."""
    rows = torch.full((len(argmaxes), n_source), (1 - peak) / (n_source - 1))
    rows[torch.arange(len(argmaxes)), torch.tensor(argmaxes)] = peak
    return rows


def test_alignment_hits_on_known_argmaxes():
    n_source, batch = 5, 4
    # (heads, target rows, source): row 3 is padding beyond the 3-word alignment below
    layer0 = torch.stack([peaked([0, 2, 1, 3], 0.9, n_source),
                          peaked([0, 0, 0, 0], 0.6, n_source)])
    layer1 = torch.stack([peaked([0, 2, 1, 3], 0.6, n_source),
                          peaked([4, 4, 1, 4], 0.9, n_source)])
    # every example sees the same weights: (B, H, Lt, Ls)
    cross = [layer.expand(batch, -1, -1, -1) for layer in (layer0, layer1)]
    gold = [[0, 2, 1], None, [0], []]  # None and [] are skipped

    hits, head_mean_hits, words = alignment_hits(cross, gold)

    assert words == 4
    assert hits.shape == (2, 2) and head_mean_hits.shape == (2,)
    # example 0 (gold 0, 2, 1) then example 2 (gold 0, first row only):
    # layer 0: head 0 hits 3 + 1, head 1 (always 0) hits 1 + 1
    # layer 1: head 0 hits 3 + 1, head 1 (4, 4, 1) hits 1 + 0
    assert hits.tolist() == [[4, 2], [4, 1]]
    # head means: layer 0 follows the 0.9 head everywhere (3 + 1); in layer 1 the 0.9 head
    # wins rows 0 and 1 (source 4) and both agree on row 2 (1 + 0)
    assert head_mean_hits.tolist() == [4, 1]


def test_head_mean_averages_weights_before_the_argmax():
    # neither head's argmax is source 1, and neither is the strongest single weight's,
    # but the heads' mean peaks there: (0.275, 0.425, 0.29, 0.01, 0)
    heads = torch.tensor([[[0.50, 0.40, 0.10, 0.00, 0.00]],
                          [[0.05, 0.45, 0.48, 0.02, 0.00]]])  # (H, Lt, Ls)
    hits, head_mean_hits, words = alignment_hits([heads[None]], [[1]])
    assert hits.tolist() == [[0, 0]]
    assert head_mean_hits.tolist() == [1]
    assert words == 1


def test_alignment_hits_checks_the_batch():
    cross = [torch.rand(2, 1, 3, 4).softmax(-1)]
    with pytest.raises(ValueError, match="gold: expected 2 alignments"):
        alignment_hits(cross, [[0, 1, 2]])


def test_best_alignment_head_is_the_layer_and_head_with_most_hits():
    from attention.translation.metrics import best_alignment_head

    hits = torch.tensor([[3, 9, 1], [9, 2, 10]])
    assert best_alignment_head(hits) == (1, 2)
    assert best_alignment_head(hits[:1]) == (0, 1)


def test_alignment_accuracy_of_hand_built_heads_on_two_different_sentences():
    """Two sentences, each head attending its own way, so every count is known.

    Sentence 0: 3 target words aligned to source words (2, 0, 1); 4 source positions (3
    words and eos), 4 target rows (3 words and eos). Sentence 1: 2 words aligned to (0, 1),
    padded to the same sizes. Hits per head (layer, head), sentence 0 + sentence 1:
    (0, 0) diagonal, row i on source i            0 + 2
    (0, 1) each sentence's gold alignment         3 + 2
    (1, 0) always source 0                        1 + 1
    (1, 1) sentence 0's alignment for both        3 + 0
    """
    diagonal = peaked([0, 1, 2, 3], 0.9, 4)
    gold0 = peaked([2, 0, 1, 3], 0.6, 4)
    gold1 = peaked([0, 1, 3, 3], 0.6, 4)  # rows 2 and 3 (eos, padding) are not scored
    first = peaked([0, 0, 0, 0], 0.6, 4)
    strong0 = peaked([2, 0, 1, 3], 0.9, 4)
    # (B, H, Lt, Ls) per layer
    layer0 = torch.stack([torch.stack([diagonal, gold0]), torch.stack([diagonal, gold1])])
    layer1 = torch.stack([torch.stack([first, strong0]), torch.stack([first, strong0])])
    gold = [[2, 0, 1], [0, 1]]

    hits, head_mean_hits, words = alignment_hits([layer0, layer1], gold)

    assert words == 5
    assert hits.tolist() == [[2, 5], [2, 3]]
    assert best_alignment_head(hits) == (0, 1)
    accuracy = hits.float() / words  # what training reports, at the best head
    torch.testing.assert_close(accuracy, torch.tensor([[0.4, 1.0], [0.4, 0.6]]))
    # averaged over heads, each layer follows its 0.9 head: the diagonal (0 + 2), then
    # sentence 0's alignment (3 + 0)
    assert head_mean_hits.tolist() == [2, 3]
