"""Translator: which search runs, and empty lines, through the Python API and the command."""

from __future__ import annotations

import dataclasses
import io
import sys

from attention.translation.cli import translate_main
from attention.translation.translator import Translator

SENTENCES = ["the dog sees a cat", "a cat runs", "the big dog sleeps", "now the girls sleep"]


def record_beam_sizes(translator, monkeypatch):
    """The ``beam_size`` of every ``model.generate`` call, in order."""
    sizes = []
    generate = translator.model.generate

    def spy(*args, beam_size=1, **kwargs):
        sizes.append(beam_size)
        return generate(*args, beam_size=beam_size, **kwargs)

    monkeypatch.setattr(translator.model, "generate", spy)
    return sizes


def test_beam_size_one_is_greedy_and_no_beam_size_is_the_checkpoints(translator, monkeypatch):
    assert translator.eval_config.beam_size == 4
    greedy_config = dataclasses.replace(translator.eval_config, beam_size=1)
    greedy_translator = Translator(translator.model, translator.src_tokenizer,
                                   translator.tgt_tokenizer, greedy_config)
    sizes = record_beam_sizes(translator, monkeypatch)

    default = translator.translate(SENTENCES)
    beam_one = translator.translate(SENTENCES, beam_size=1)
    beam_four = translator.translate(SENTENCES, beam_size=4)
    greedy = greedy_translator.translate(SENTENCES)  # the same model: its calls are recorded

    assert sizes == [4, 1, 4, 1]
    assert beam_one == greedy
    assert default == beam_four
    # The two searches give different translations here, so the checks above can fail.
    assert any(b != g for b, g in zip(default, beam_one, strict=True))


def test_empty_lines_translate_to_empty_lines(translator, monkeypatch):
    alone = translator.translate(["the dog sees a cat", "a cat runs"])
    assert all(alone)  # this model writes words for any sentence it decodes
    sources = []
    search = translator.search

    def spy(ids, **kwargs):
        sources.append(len(ids))
        return search(ids, **kwargs)

    monkeypatch.setattr(translator, "search", spy)

    mixed = ["", "the dog sees a cat", "   ", "\t", "a cat runs", ""]
    assert translator.translate(mixed) == ["", alone[0], "", "", alone[1], ""]
    assert sources == [2]  # only the two sentences were decoded
    assert translator.translate(["", " "]) == ["", ""]
    assert translator.translate("") == [""]
    assert sources == [2]


def test_translate_command_keeps_empty_lines_of_standard_input(checkpoint, translator, capsys,
                                                              monkeypatch):
    alone = translator.translate(["the dog sees a cat", "a cat runs"])
    monkeypatch.setattr(sys, "stdin", io.StringIO("\nthe dog sees a cat\n  \na cat runs\n\n"))
    assert translate_main(["--checkpoint", str(checkpoint), "--device", "cpu"]) == 0
    assert capsys.readouterr().out.split("\n") == ["", alone[0], "", alone[1], "", ""]
