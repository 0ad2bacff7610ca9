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


def test_generate_on_onednn_packed_weights_gives_the_tokens_it_gave_before():
    """At d_model 256 with 12 sentences every decoder product is big enough to run on the
    weights attention.inference packs for oneDNN (on a torch that has it), whose sums are
    accumulated in another order than F.linear's."""
    torch.manual_seed(100)
    model = Transformer(500, 400, d_model=256, n_heads=4, n_encoder_layers=2,
                        n_decoder_layers=2, d_ff=1024, dropout=0.0, pad_id=PAD).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(4.0)
        model.lm_head.weight[EOS] *= 2.0
    src = torch.randint(3, 500, (12, 10))
    for row, length in enumerate((10, 4, 7, 2, 9, 10, 5, 3, 8, 6, 10, 1)):
        src[row, length:] = PAD
    expected = [case for case in GOLDEN["cases"] if case["model"] == "d256_packed"]
    assert [(c["beam_size"], c["length_penalty"]) for c in expected] == \
        [(1, 1.0), (4, 1.0), (4, 0.6)]
    for case in expected:
        out = model.generate(src, 20, BOS, EOS, beam_size=case["beam_size"],
                             length_penalty=case["length_penalty"])
        assert out.tolist() == case["out"], (case["beam_size"], case["length_penalty"])
