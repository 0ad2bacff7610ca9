"""Decoder options through Translator and attention-translate: n-best lists with scores
(printed as ``index ||| text ||| score``), seeded sampling, min_new_tokens and
no_repeat_ngram_size, batching by tokens, model folders and int8."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest

from attention.translation.cli import translate_main
from attention.translation.config import load_config
from attention.translation.export.folder import save_pretrained
from attention.translation.runs import latest_run
from attention.translation.training import train
from attention.translation.translator import Translation

TINY = Path(__file__).resolve().parents[2] / "configs" / "tiny.yaml"
SENTENCES = ["the dog sees a cat", "a cat runs", "the big dog sleeps", "now the girls sleep"]


def test_n_best_lists_come_best_first_after_the_one_best(translator):
    best = translator.translate(SENTENCES, beam_size=4)
    nbest = translator.translate(SENTENCES, beam_size=4, num_return_sequences=3)
    assert [len(group) for group in nbest] == [3] * len(SENTENCES)
    assert all(isinstance(t, Translation) for group in nbest for t in group)
    assert [group[0].text for group in nbest] == best
    for group in nbest:
        scores = [t.score for t in group]
        assert scores == sorted(scores, reverse=True) and all(s < 0 for s in scores)
    one = translator.translate(SENTENCES, beam_size=4, return_scores=True)
    assert [[t.text for t in group] for group in one] == [[text] for text in best]
    assert [g[0].score for g in one] == pytest.approx([g[0].score for g in nbest])


@pytest.mark.parametrize("beam_size", [1, 4])
def test_ids_without_scores_are_the_searchs_best(translator, beam_size):
    """generate_ids asks the model for no scores (greedy search then takes no log-softmax
    per step); its ids are those of the search that scores them."""
    ids = translator.encode(SENTENCES)
    scored = translator.search(ids, beam_size=beam_size)
    assert translator.generate_ids(ids, beam_size=beam_size) == [h[0][0] for h in scored]
    assert all(h[0][1] < 0 for h in scored)


def test_sampling_with_a_seed_is_reproducible(translator):
    def sample(seed):
        return translator.translate(SENTENCES, beam_size=1, num_return_sequences=2,
                                    do_sample=True, temperature=1.5, top_p=0.95, seed=seed)

    assert sample(1) == sample(1)
    assert sample(1) != sample(2)


def test_length_rules_reach_the_search(translator, monkeypatch):
    ids = translator.encode(SENTENCES)
    repeating = translator.generate_ids(ids, beam_size=4)
    assert any(len(set(zip(r, r[1:], strict=False))) < len(r) - 1 for r in repeating)
    unique = translator.generate_ids(ids, beam_size=4, no_repeat_ngram_size=2)
    for row in unique:
        pairs = list(zip(row, row[1:], strict=False))
        assert len(pairs) == len(set(pairs))
    calls = []
    generate = translator.model.generate
    monkeypatch.setattr(translator.model, "generate",
                        lambda *a, **kw: calls.append(kw) or generate(*a, **kw))
    translator.translate(SENTENCES, min_new_tokens=3)
    assert calls and all(kw["min_new_tokens"] == 3 for kw in calls)


def test_batches_by_tokens_hold_the_limits_and_change_no_translation(translator):
    sources = translator.encode(SENTENCES * 5)
    # A length limit that does not depend on the batch's longest source (this model never
    # ends a sentence before it).
    translator.eval_config = dataclasses.replace(translator.eval_config, max_len_a=0.0,
                                                 max_len_b=12)
    plain = translator.generate_ids(sources)
    translator.eval_config = dataclasses.replace(translator.eval_config, batch_size=6,
                                                 batch_tokens=40)
    batches = translator._batches(sources)
    assert sorted(i for batch in batches for i in batch) == list(range(len(sources)))
    for batch in batches:
        lengths = [len(sources[i]) for i in batch]
        assert len(batch) <= 6 and (len(batch) == 1 or len(batch) * max(lengths) <= 40)
    assert len({len(batch) for batch in batches}) > 1  # short sentences: fuller batches
    assert translator.generate_ids(sources) == plain


def test_the_command_prints_n_best_lines_with_scores(checkpoint, translator, capsys):
    expected = translator.translate(SENTENCES[:2], beam_size=4, num_return_sequences=3)
    assert translate_main(["--checkpoint", str(checkpoint), "--device", "cpu",
                           "--beam-size", "4", "--nbest", "3", *SENTENCES[:2]]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 6
    for line, (index, t) in zip(lines, [(i, t) for i, g in enumerate(expected) for t in g],
                                strict=True):
        match = re.fullmatch(r"(\d+) \|\|\| (.*) \|\|\| (-?\d+\.\d{4})", line)
        assert match, line
        assert (int(match[1]), match[2]) == (index, t.text)
        assert float(match[3]) == pytest.approx(t.score, abs=1e-4)
    assert translate_main(["--checkpoint", str(checkpoint), "--device", "cpu", "--scores",
                           SENTENCES[0]]) == 0
    assert re.fullmatch(r"0 \|\|\| .* \|\|\| -?\d+\.\d{4}\n", capsys.readouterr().out)


def test_the_command_samples_reproducibly_and_refuses_bad_options(checkpoint, capsys):
    command = ["--checkpoint", str(checkpoint), "--device", "cpu", "--beam-size", "1",
               "--sample", "--top-k", "5", "--seed", "3", *SENTENCES]
    assert translate_main(command) == 0
    first = capsys.readouterr().out
    assert translate_main(command) == 0
    assert capsys.readouterr().out == first
    assert translate_main(["--checkpoint", str(checkpoint), "--device", "cpu",
                           "--beam-size", "2", "--nbest", "3", SENTENCES[0]]) == 2
    assert "num_return_sequences: expected at most beam_size=2" in capsys.readouterr().err


def test_the_command_reads_model_folders_and_quantizes(checkpoint, translator, tmp_path,
                                                       capsys):
    folder = save_pretrained(translator, tmp_path / "model")
    assert translate_main(["--model", str(folder), "--device", "cpu", *SENTENCES]) == 0
    assert capsys.readouterr().out.splitlines() == translator.translate(SENTENCES)
    assert translate_main(["--checkpoint", str(checkpoint), "--device", "cpu", "--int8",
                           *SENTENCES]) == 0
    assert len(capsys.readouterr().out.splitlines()) == len(SENTENCES)


def test_min_new_tokens_above_a_batchs_length_limit_is_capped_by_it(translator):
    translator.eval_config = dataclasses.replace(translator.eval_config, max_len_a=0.0,
                                                 max_len_b=6)
    out = translator.generate_ids(translator.encode(SENTENCES), beam_size=1,
                                  min_new_tokens=50)
    assert all(len(row) == 6 for row in out)
    with pytest.raises(TypeError, match="num_return_sequences: generate_ids returns one"):
        translator.generate_ids(translator.encode(SENTENCES), num_return_sequences=2)


def test_sampling_flags_need_sample_and_sample_implies_greedy_steps(checkpoint, capsys):
    base = ["--checkpoint", str(checkpoint), "--device", "cpu", SENTENCES[0]]
    with pytest.raises(SystemExit) as exit_info:
        translate_main([*base, "--top-k", "5", "--seed", "1"])
    assert exit_info.value.code == 2
    assert "--top-k, --seed: expected only with --sample" in capsys.readouterr().err
    # The checkpoint's config decodes with beam 4; --sample alone draws one token a step.
    assert translate_main([*base, "--sample", "--seed", "1"]) == 0


def test_int8_runs_on_a_checkpoint_trained_in_bf16(tmp_path, capsys):
    config = load_config(TINY, [f"train.run_dir={tmp_path}", "train.threads=1",
                                "train.max_steps=1", "train.eval_every=1000",
                                "eval.val_sentences=2", "train.precision=bf16"])
    train(config, progress_bar=False, log=lambda message: None)
    assert translate_main(["--checkpoint", str(latest_run(config.run_path) / "checkpoint_best.pt"),
                           "--device", "cpu", "--int8", *SENTENCES[:2]]) == 0
    assert len(capsys.readouterr().out.splitlines()) == 2


def test_the_command_prints_scores_and_signatures_for_references(checkpoint, translator,
                                                                 tmp_path, monkeypatch, capsys):
    import io

    best = translator.translate(SENTENCES)
    references = tmp_path / "references.txt"
    references.write_text("\n".join(best) + "\n", encoding="utf-8")
    command = ["--checkpoint", str(checkpoint), "--device", "cpu", "--references"]
    assert translate_main([*command, str(references), *SENTENCES]) == 0
    out, err = capsys.readouterr()
    assert out.splitlines() == best  # only translations on standard output
    lines = err.splitlines()
    assert len(lines) == 5, err
    assert lines[0] == ("BLEU 100.00 (lowercased 100.00), chrF++ 100.00, TER 0.00, "
                        "exact match 100.00%")
    labels = ["BLEU", "BLEU lowercased", "chrF++", "TER"]
    signatures = dict(line.split(" signature: ") for line in lines[1:])
    assert list(signatures) == labels
    assert {"case:mixed", "tok:13a"} <= set(signatures["BLEU"].split("|"))
    assert "case:lc" in signatures["BLEU lowercased"].split("|")
    assert "nw:2" in signatures["chrF++"].split("|")
    assert "tok:tercom" in signatures["TER"].split("|")
    assert all("nrefs:1" in s for s in signatures.values())

    # a worse reference for one sentence: every score moves, still one line each
    references.write_text("\n".join(["a different sentence"] + best[1:]) + "\n",
                          encoding="utf-8")
    assert translate_main([*command, str(references), *SENTENCES]) == 0
    first = capsys.readouterr().err.splitlines()[0]
    match = re.fullmatch(r"BLEU (\d+\.\d\d) \(lowercased (\d+\.\d\d)\), chrF\+\+ (\d+\.\d\d), "
                         r"TER (\d+\.\d\d), exact match 75\.00%", first)
    assert match, first
    bleu_, _, chrf, ter = map(float, match.groups())
    assert bleu_ < 100 and chrf < 100 and ter > 0

    assert translate_main([*command, str(references), *SENTENCES[:2]]) == 2
    assert "--references: expected 2 lines (one per sentence), got 4" in capsys.readouterr().err
    references.write_text("", encoding="utf-8")
    monkeypatch.setattr("sys.stdin", io.StringIO(""))
    assert translate_main([*command, str(references)]) == 2
    out, err = capsys.readouterr()
    assert out == "" and "--references: expected sentences to score, got none" in err
