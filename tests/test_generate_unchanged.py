"""Greedy and beam search give the tokens they gave before decoding was made fast.

``tests/data/generate_golden.json`` holds the outputs of ``Transformer.generate`` at commit
6b87049, before the preallocated cache and the rest of issue 19's speed work, for the
models :func:`make_model` builds: five architectures × greedy and beam 2/4 with two length
penalties, on a padded batch whose sentences end at different steps (or run to the limit).
"""

import json
from pathlib import Path

import pytest
import torch

from attention import Transformer

BOS, EOS, PAD = 1, 2, 0
GOLDEN = json.loads((Path(__file__).parent / "data" / "generate_golden.json").read_text())
ARCHITECTURES = {
    "sinusoidal": {},
    "rotary": {"positional": "rotary"},
    "learned": {"positional": "learned", "max_len": 32},
    "post_norm_relu_tied": {"norm_first": False, "activation": "relu", "tie_embeddings": True},
    "bias": {"bias": True},
}
SEARCHES = [(1, 1.0), (2, 0.6), (4, 1.0), (4, 0.0)]


def make_model(index: int, architecture: dict) -> tuple[Transformer, torch.Tensor]:
    """The model and padded source batch of the ``index``-th architecture (the seeds and
    order are the golden file's)."""
    torch.manual_seed(index * len(SEARCHES))
    model = Transformer(24, 20, d_model=32, n_heads=4, n_encoder_layers=2, n_decoder_layers=2,
                        dropout=0.0, pad_id=PAD, **architecture).eval()
    with torch.no_grad():  # sharper, with EOS likelier: sentences end at different steps
        model.lm_head.weight.mul_(2.5)
        model.lm_head.weight[EOS] *= 1.15
    src = torch.randint(3, 24, (5, 9))
    for row, length in enumerate((9, 3, 6, 1, 7)):
        src[row, length:] = PAD
    return model, src


@pytest.mark.parametrize("index,name", list(enumerate(ARCHITECTURES)))
def test_generate_gives_the_tokens_it_gave_before(index, name):
    model, src = make_model(index, ARCHITECTURES[name])
    expected = [case for case in GOLDEN["cases"] if case["model"] == name]
    assert len(expected) == len(SEARCHES)
    for case, (beam_size, length_penalty) in zip(expected, SEARCHES, strict=True):
        assert (case["beam_size"], case["length_penalty"]) == (beam_size, length_penalty)
        out = model.generate(src, 14, BOS, EOS, beam_size=beam_size,
                             length_penalty=length_penalty)
        assert out.tolist() == case["out"], (name, beam_size, length_penalty)
