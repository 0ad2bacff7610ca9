"""The decoder options users expect from ``generate``: n-best lists with their scores,
``min_new_tokens``, ``no_repeat_ngram_size``, and seeded sampling with temperature, top-k
and top-p; and greedy search dropping finished rows without changing its output."""

import math

import pytest
import torch

from attention import Transformer, greedy_search
from attention.decoder_step import DecoderStep
from attention.next_token import Sampler, TokenRules, repeated_ngram_bans

BOS, EOS, PAD = 1, 2, 0
SRC_VOCAB, TGT_VOCAB = 24, 20


def make_model(seed=0, eos_scale=1.15, **kwargs):
    torch.manual_seed(seed)
    model = Transformer(SRC_VOCAB, TGT_VOCAB, d_model=32, n_heads=4, n_encoder_layers=2,
                        n_decoder_layers=2, dropout=0.0, pad_id=PAD, **kwargs).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(2.5)
        model.lm_head.weight[EOS] *= eos_scale
    src = torch.randint(3, SRC_VOCAB, (5, 9))
    for row, length in enumerate((9, 3, 6, 1, 7)):
        src[row, length:] = PAD
    return model, src


def until_eos(tokens):
    tokens = list(tokens)
    return tokens[: tokens.index(EOS) + 1] if EOS in tokens else \
        [t for t in tokens if t != PAD]


def rescore(model, src, outputs, length_penalty):
    """Each output's ``sum log p / length ** length_penalty`` from one teacher-forced pass,
    with the tokens generation never picks (pad, bos) removed from the distribution."""
    scores = []
    for source, tokens in zip(src, outputs, strict=True):
        tokens = until_eos(tokens)
        tgt_in = torch.tensor([[BOS, *tokens[:-1]]])
        with torch.no_grad():
            logits = model(source[None], tgt_in)[0].float()
        logits[:, [PAD, BOS]] = float("-inf")
        log_probs = logits.log_softmax(-1).gather(-1, torch.tensor(tokens)[:, None])
        scores.append(float(log_probs.sum()) / len(tokens) ** length_penalty)
    return scores


@pytest.mark.parametrize("beam_size,length_penalty", [(1, 1.0), (4, 1.0), (4, 0.6)])
def test_scores_are_the_length_normalised_log_probabilities_of_the_outputs(beam_size,
                                                                           length_penalty):
    model, src = make_model()
    n = 1 if beam_size == 1 else 3
    out, scores = model.generate(src, 14, BOS, EOS, beam_size=beam_size,
                                 length_penalty=length_penalty, num_return_sequences=n,
                                 return_scores=True)
    assert out.shape[0] == scores.shape[0] == src.shape[0] * n
    assert scores.dtype == torch.float32
    expected = rescore(model, src.repeat_interleave(n, dim=0), out.tolist(), length_penalty)
    assert scores.tolist() == pytest.approx(expected, abs=1e-4)


def test_an_n_best_list_starts_with_the_one_best_and_is_sorted():
    model, src = make_model()
    best = model.generate(src, 14, BOS, EOS, beam_size=4)
    out, scores = model.generate(src, 14, BOS, EOS, beam_size=4, num_return_sequences=4,
                                 return_scores=True)
    groups = out.view(src.shape[0], 4, -1)
    assert [until_eos(g[0]) for g in groups.tolist()] == [until_eos(r) for r in best.tolist()]
    for group_scores, group in zip(scores.view(-1, 4).tolist(), groups.tolist(), strict=True):
        assert group_scores == sorted(group_scores, reverse=True)
        assert len({tuple(until_eos(h)) for h in group}) == 4  # four different hypotheses


def test_min_new_tokens_holds_back_the_end_of_sentence():
    model, src = make_model(eos_scale=2.0)  # EOS likely from the first step
    plain = [until_eos(r) for r in model.generate(src, 14, BOS, EOS).tolist()]
    assert min(len(t) for t in plain) < 6
    for beam_size in (1, 3):
        out = model.generate(src, 14, BOS, EOS, beam_size=beam_size, min_new_tokens=6)
        for row in out.tolist():
            tokens = until_eos(row)
            assert EOS not in tokens[:5] and len(tokens) >= 6


def has_repeated_ngram(tokens, n):
    grams = [tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1)]
    return len(grams) != len(set(grams))


@pytest.mark.parametrize("beam_size", [1, 4])
def test_no_repeat_ngram_size_keeps_every_n_gram_unique(beam_size):
    model, src = make_model(seed=12, norm_first=False, activation="relu", tie_embeddings=True)
    plain = [until_eos(r) for r in
             model.generate(src, 14, BOS, EOS, beam_size=beam_size).tolist()]
    assert any(has_repeated_ngram(t, 2) for t in plain)  # this model repeats itself
    for n in (2, 3):
        out = model.generate(src, 14, BOS, EOS, beam_size=beam_size, no_repeat_ngram_size=n)
        assert not any(has_repeated_ngram(until_eos(r), n) for r in out.tolist())


def test_repeated_ngram_bans_match_a_plain_python_count():
    torch.manual_seed(0)
    history = torch.randint(0, 4, (50, 9))
    for n in (1, 2, 3):
        bans = repeated_ngram_bans(history, n)
        for row, tokens in zip(bans.tolist(), history.tolist(), strict=True):
            prefix = tuple(tokens[len(tokens) - n + 1:]) if n > 1 else ()
            expected = {tokens[i + n - 1] for i in range(len(tokens) - n + 1)
                        if tuple(tokens[i:i + n - 1]) == prefix}
            assert {t for t, count in enumerate(row) if count > 0} == expected


def test_sampling_is_reproducible_with_a_seed_and_varies_without():
    model, src = make_model()

    def sample(seed, **options):
        generator = torch.Generator().manual_seed(seed)
        return model.generate(src, 14, BOS, EOS, do_sample=True, generator=generator,
                              num_return_sequences=3, **options).tolist()

    assert sample(7) == sample(7)
    assert sample(7) != sample(8)
    # top_k=1 and a vanishing temperature leave only the best token: greedy search.
    greedy = model.generate(src, 14, BOS, EOS).repeat_interleave(3, dim=0)
    greedy = [until_eos(r) for r in greedy.tolist()]
    for options in ({"top_k": 1}, {"temperature": 1e-4}, {"top_p": 1e-6}):
        assert [until_eos(r) for r in sample(3, **options)] == greedy


def test_samples_follow_the_filtered_distribution():
    logits = torch.tensor([[2.0, 1.0, 0.5, 0.0, -1.0, -3.0]]).repeat(20000, 1)
    probs = logits[0].softmax(-1)
    generator = torch.Generator().manual_seed(0)
    for sampler, allowed in [
        (Sampler(generator=generator), range(6)),
        (Sampler(top_k=3, generator=generator), range(3)),
        # p = 0.56, 0.21, 0.13, …: the third token completes the nucleus of 0.8
        (Sampler(top_p=0.8, generator=generator), range(3)),
        (Sampler(temperature=2.0, generator=generator), range(6)),
    ]:
        counts = torch.bincount(sampler(logits), minlength=6).float() / logits.shape[0]
        target = torch.zeros(6)
        scaled = (logits[0] / sampler.temperature).softmax(-1)
        target[list(allowed)] = scaled[list(allowed)] / scaled[list(allowed)].sum()
        assert set(counts.nonzero()[:, 0].tolist()) == set(allowed)
        assert torch.allclose(counts, target, atol=0.015), (sampler, counts, target)
    assert probs[:2].sum() < 0.8 < probs[:3].sum()


def test_greedy_search_drops_finished_rows_and_gives_the_same_tokens():
    class Step:  # row r says EOS at step r, token 3 + r before it; counts the rows it sees
        def __init__(self):
            self.rows = torch.arange(5)
            self.t = 0
            self.seen = []

        def __call__(self, last):
            self.seen.append(last.shape[0])
            scores = torch.zeros(last.shape[0], 9)
            scores[torch.arange(last.shape[0]), 3 + self.rows] = 1.0
            scores[self.rows == self.t, EOS] = 2.0
            self.t += 1
            return scores

        def drop(self, keep):
            self.rows = self.rows[keep]

    kept, full = Step(), Step()
    dropped = greedy_search(kept, 5, BOS, EOS, PAD, 8, drop_rows=kept.drop)
    plain = greedy_search(full, 5, BOS, EOS, PAD, 8)
    assert dropped.tolist() == plain.tolist()
    assert kept.seen == [5, 4, 3, 2, 1] and full.seen == [5] * 5


def test_beam_search_decodes_one_row_per_sentence_first_and_drops_done_sentences(
        monkeypatch, decoding_path):
    model, src = make_model()
    rows = []
    decode, step = model._decode, DecoderStep.__call__
    monkeypatch.setattr(model, "_decode",
                        lambda ids, *a, **kw: rows.append(ids.shape[0]) or decode(ids, *a, **kw))
    monkeypatch.setattr(DecoderStep, "__call__",
                        lambda self, ids: rows.append(ids.shape[0]) or step(self, ids))
    out = model.generate(src, 14, BOS, EOS, beam_size=4)
    lengths = [len(until_eos(r)) for r in out.tolist()]
    assert len(set(lengths)) > 1  # sentences end at different steps
    assert rows[0] == 5 and rows[1] == 20  # the empty prefix once per sentence, then beams
    assert rows[-1] < 20  # done sentences left the batch
    assert all(later <= earlier for earlier, later in zip(rows[1:], rows[2:], strict=False))


@pytest.mark.parametrize("options,match", [
    ({"num_return_sequences": 2}, "num_return_sequences: expected 1 for greedy"),
    ({"num_return_sequences": 5, "beam_size": 4}, "at most beam_size=4"),
    ({"do_sample": True, "beam_size": 2}, "beam_size: expected 1 with do_sample"),
    ({"do_sample": True, "temperature": 0.0}, "temperature: expected a float > 0"),
    ({"do_sample": True, "top_p": 1.5}, r"top_p: expected a float in \(0, 1\]"),
    ({"do_sample": True, "top_k": -1}, "top_k: expected an int >= 0"),
    ({"min_new_tokens": 20}, "min_new_tokens: expected at most max_new_tokens=14"),
    ({"min_new_tokens": -1}, "min_new_tokens: expected an int >= 0"),
    ({"no_repeat_ngram_size": 1.5}, "no_repeat_ngram_size: expected an int >= 0"),
    ({"do_sample": True, "generator": 3}, "generator: expected a torch.Generator"),
])
def test_bad_options_name_the_argument(options, match):
    model, src = make_model()
    with pytest.raises((ValueError, TypeError), match=match):
        model.generate(src, 14, BOS, EOS, **options)


def test_token_rules_forbid_only_what_they_say():
    rules = TokenRules(EOS, min_new_tokens=2, no_repeat_ngram_size=2)
    history = torch.tensor([[5, 6, 5, 0]])
    for step, banned in ((1, {EOS}), (2, set()), (3, {6})):
        scores = rules.apply(torch.zeros(1, 8), history, step)
        assert {i for i, s in enumerate(scores[0].tolist()) if math.isinf(s)} == banned
    assert not TokenRules(EOS).active


@pytest.mark.parametrize("vocab,beam_size", [(5, 3), (6, 4), (4, 2)])
def test_beam_search_with_fewer_tokens_than_beams_decodes(vocab, beam_size):
    """pad, bos and eos banned leave fewer candidates than beams on the first step."""
    torch.manual_seed(0)
    model = Transformer(vocab, vocab, d_model=16, n_heads=2, n_encoder_layers=1,
                        n_decoder_layers=1, dropout=0.0).eval()
    src = torch.randint(3, vocab, (3, 4))
    out = model.generate(src, 5, BOS, EOS, beam_size=beam_size)
    assert out.shape[0] == 3 and out.shape[1] <= 5


def test_greedy_search_drops_finished_rows_in_groups_of_an_eighth():
    class Step:  # row r ends at step r + 1
        def __init__(self):
            self.seen, self.alive = [], torch.arange(16)

        def __call__(self, last):
            self.seen.append(last.shape[0])
            scores = torch.zeros(last.shape[0], 4)
            scores[:, 3] = 1.0
            scores[self.alive == len(self.seen) - 1, EOS] = 2.0
            return scores

        def drop(self, keep):
            self.alive = self.alive[keep]

    step = Step()
    out = greedy_search(step, 16, BOS, EOS, PAD, 20, drop_rows=step.drop)
    assert [len(until_eos(row)) for row in out.tolist()] == list(range(1, 17))
    # 2 of 16 finished rows make an eighth: dropped in pairs while 9 or more are left
    assert step.seen[:5] == [16, 16, 14, 14, 12]
