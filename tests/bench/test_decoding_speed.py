"""benchmarks/decoding_speed.py: every system generates the same number of tokens (end of
sentence suppressed even where it is the likeliest token), CTranslate2 in float32 picks our
greedy tokens, missing peers are skipped with a notice, and the results are written."""

import importlib.util
import sys

import pytest
import torch

from .scripts import load_script, positive_ratio, read_results

decoding = load_script("decoding_speed")

TINY = ["--d-model", "16", "--n-heads", "2", "--n-layers", "1", "--d-ff", "32", "--vocab", "48",
        "--batch", "2", "--src-len", "5", "--new-tokens", "4", "--rounds", "1", "--threads", "1",
        "--beams", "1", "2"]
EOS = decoding.EOS_ID


def installed(name):
    return importlib.util.find_spec(name) is not None


def test_every_system_generates_the_same_tokens(tmp_path):
    out = tmp_path / "decoding"
    report = decoding.main([*TINY, "--out", str(out)])
    expected = {decoding.OURS, decoding.OursPrepared.name}
    expected |= {"transformers"} if installed("transformers") else set()
    expected |= set(decoding.PEERS[:2]) if installed("ctranslate2") else set()
    assert [(c["threads"], c["beam"]) for c in report["cells"]] == [(1, 1), (1, 2)]
    for cell in report["cells"]:
        assert set(cell["contenders"]) == expected == set(cell["tokens_per_s"])
        assert set(cell["check"]["generated_tokens"].values()) == {2 * 4}
        assert all(entry["median_ms"] > 0 for entry in cell["contenders"].values())
        assert set(cell["ratios"]) == expected - {decoding.OURS}
        assert all(positive_ratio(ratio, rounds=1) for ratio in cell["ratios"].values())
    if installed("ctranslate2"):  # the same weights and the same math: the same greedy tokens
        greedy = report["cells"][0]["check"]["agreement_with_ours"]["ctranslate2"]
        assert greedy == {"tokens_percent": 100.0, "sentences_percent": 100.0}
    written, markdown = read_results(out, "decoding_speed")
    assert written["cells"] == report["cells"] and written["setup"]["threads"] == [1]
    assert set(written["environment"]["packages"]) == {"ctranslate2", "transformers"}
    assert "## 1 thread(s), beam 2" in markdown


def eos_first(lm_head, first_tokens):
    """Swap the output rows of EOS and of the token each sentence starts with, so that
    an unconstrained search would end every sentence at once."""
    (first,) = set(first_tokens)  # tiny random models start all sentences alike
    with torch.no_grad():
        lm_head.weight[[first, EOS]] = lm_head.weight[[EOS, first]].clone()


@pytest.fixture
def workload():
    args = decoding.parse_args(TINY)
    model, src = decoding.build_model(args), decoding.build_sources(args)
    first = model.generate(src, 1, decoding.BOS_ID, EOS)[:, 0].tolist()
    eos_first(model.lm_head, first)
    assert model.generate(src, 4, decoding.BOS_ID, EOS).shape[1] == 1  # EOS is the first pick
    return args, model, src


@pytest.mark.parametrize("beam", [1, 2])
def test_ours_suppresses_eos(workload, beam):
    args, model, src = workload
    ours = decoding.Ours(model, src, args.new_tokens)
    assert decoding.lengths_until_eos(ours.ids(ours.run(beam))) == [4, 4]


@pytest.mark.parametrize("beam", [1, 2])
def test_transformers_suppresses_eos(workload, beam):
    args, _, src = workload
    peer = decoding.HuggingFace(pytest.importorskip("transformers"), args, src)
    first = peer.model.generate(input_ids=src, attention_mask=peer.mask, max_new_tokens=1,
                                do_sample=False, suppress_tokens=[0, 1])[:, 1].tolist()
    eos_first(peer.model.lm_head, first)
    assert decoding.lengths_until_eos(peer.ids(peer.run(beam))) == [4, 4]


@pytest.mark.parametrize("beam", [1, 2])
def test_ctranslate2_suppresses_eos(workload, tmp_path, beam):
    ctranslate2 = pytest.importorskip("ctranslate2")
    args, model, src = workload
    path = decoding.convert(model, tmp_path, "float32")
    peer = decoding.CTranslate2(ctranslate2, "ctranslate2", path, "float32", 1, src, 4)
    greedy = peer.translator.translate_batch(peer.source, beam_size=1, min_decoding_length=0,
                                             suppress_sequences=peer.banned,
                                             return_end_token=True)
    assert [r.hypotheses[0] for r in greedy] == [["<eos>"]] * 2  # EOS is the first pick
    assert decoding.lengths_until_eos(peer.ids(peer.run(beam))) == [4, 4]


def test_unequal_work_is_refused_before_anything_is_timed(monkeypatch):
    args = decoding.parse_args(TINY)
    ours = decoding.Ours(decoding.build_model(args), decoding.build_sources(args), 4)
    monkeypatch.setattr(ours, "ids", lambda output: [[5, EOS], [5, 6, 7, 8]])
    with pytest.raises(RuntimeError, match="unequal work"):
        decoding.measure_cell([ours], 1, 1, args)


def test_missing_peers_are_skipped_with_a_notice(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "transformers", None)  # import raises ImportError
    monkeypatch.setitem(sys.modules, "ctranslate2", None)
    report = decoding.main([*TINY, "--beams", "1", "--out", str(tmp_path / "d")])
    assert set(report["skipped"]) == {"transformers", "ctranslate2", "ctranslate2-int8"}
    assert all(set(cell["contenders"]) == {decoding.OURS, decoding.OursPrepared.name}
               for cell in report["cells"])
    err = capsys.readouterr().err
    assert "transformers skipped: transformers is not installed" in err
    assert "ctranslate2 skipped: ctranslate2 is not installed" in err


@pytest.mark.parametrize("bad", [["--rounds", "0"], ["--threads", "0"], ["--src-len", "1"],
                                 ["--vocab", "4"]])
def test_bad_arguments_are_refused_by_name(bad, capsys):
    with pytest.raises(SystemExit):
        decoding.parse_args(bad)
    assert bad[0] in capsys.readouterr().err
