"""Decoding a padded batch: each sentence comes out as it does decoded alone."""

import pytest
import torch
from torch.nn.utils.rnn import pad_sequence

from attention import Transformer

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
BOS, EOS, PAD = 1, 2, 0
MAX_NEW_TOKENS = 16


def make_model(positional, device):
    torch.manual_seed(0)
    model = Transformer(20, 16, d_model=16, n_heads=2, n_encoder_layers=2, n_decoder_layers=2,
                        dropout=0.0, pad_id=PAD, positional=positional)
    with torch.no_grad():
        # EOS likelier than at random initialisation, so that some sentences end early
        # and others run on: the batch then holds finished and unfinished rows.
        model.lm_head.weight[EOS] *= 2
    return model.to(device).eval()


def until_eos(row):
    tokens = row.tolist()
    return tokens[: tokens.index(EOS) + 1] if EOS in tokens else tokens


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("positional", ["sinusoidal", "rotary"])
@pytest.mark.parametrize("beam_size", [1, 4])
def test_a_padded_batch_decodes_each_sentence_as_alone(device, positional, beam_size):
    model = make_model(positional, device)
    torch.manual_seed(1)
    sentences = [torch.randint(3, 20, (n,), device=device) for n in (7, 2, 5, 4)]
    src = pad_sequence(sentences, batch_first=True, padding_value=PAD)  # (4, 7)
    with torch.no_grad():
        batched = model.generate(src, MAX_NEW_TOKENS, BOS, EOS, beam_size=beam_size)
        alone = [model.generate(s[None], MAX_NEW_TOKENS, BOS, EOS, beam_size=beam_size)[0]
                 for s in sentences]
    outputs = [until_eos(row) for row in batched]
    assert outputs == [until_eos(row) for row in alone]
    for row, tokens in zip(batched.tolist(), outputs, strict=True):
        assert row[len(tokens):] == [PAD] * (len(row) - len(tokens))  # padded after EOS
    # Not a trivial case: no sentence ends at once, they end at different steps (or not at
    # all within MAX_NEW_TOKENS), and they are different translations.
    assert all(len(tokens) >= 3 for tokens in outputs)
    assert len({len(tokens) for tokens in outputs}) > 1
    assert any(tokens[-1] == EOS for tokens in outputs)
    assert len({tuple(tokens) for tokens in outputs}) > 1
