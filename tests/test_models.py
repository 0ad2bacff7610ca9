"""Encoder, Decoder and Transformer: shapes, training, saving, compiling, generating."""

import io

import pytest
import torch
import torch.nn.functional as F

from attention import Encoder, Transformer, beam_search, greedy_search
from attention.decoding import sequence_score

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
BOS, EOS, PAD = 1, 2, 0


def padding_mask(batch, length, lengths):
    return torch.arange(length).expand(batch, length) >= torch.tensor(lengths).unsqueeze(1)


# ------------------------------------------------------------------------------ Encoder


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("positional", ["sinusoidal", "learned", "rotary", None])
@pytest.mark.parametrize("norm_first", [True, False])
def test_encoder_shapes_and_attention_maps(device, positional, norm_first):
    torch.manual_seed(0)
    encoder = Encoder(16, 2, 3, positional=positional, norm_first=norm_first).to(device)
    x = torch.randn(2, 7, 16, device=device)
    out, maps = encoder(x, key_padding_mask=padding_mask(2, 7, [7, 4]).to(device),
                        return_attention=True)
    assert out.shape == (2, 7, 16)
    assert len(maps) == 3 and all(m.shape == (2, 2, 7, 7) for m in maps)
    assert (encoder.norm is not None) == norm_first
    assert encoder.layers[0].feed_forward.d_ff == 64  # 4 * d_model by default
    # Padded keys get no weight in any layer or head.
    assert all(m[1, :, :, 4:].abs().max() == 0 for m in maps)


def test_encoder_has_no_bias_by_default_and_bias_on_request():
    names = [n for n, _ in Encoder(16, 2, 1).named_parameters()]
    assert not any(n.endswith("bias") for n in names)
    names = [n for n, _ in Encoder(16, 2, 1, bias=True).named_parameters()]
    assert "layers.0.self_attn.q_proj.bias" in names


def test_padding_does_not_change_real_positions():
    torch.manual_seed(0)
    encoder = Encoder(16, 2, 2, dropout=0.0).eval()
    x = torch.randn(1, 5, 16)
    padded = torch.cat([x, torch.randn(1, 3, 16)], dim=1)
    expected = encoder(x)
    got = encoder(padded, key_padding_mask=padding_mask(1, 8, [5]))
    torch.testing.assert_close(got[:, :5], expected, atol=1e-5, rtol=1e-5)


def test_encoder_trains_every_weight():
    """Every parameter gets a gradient, and a few steps fit a small copy task."""
    torch.manual_seed(0)
    encoder = Encoder(16, 2, 2, dropout=0.0, positional="learned", max_len=8)
    head = torch.nn.Linear(16, 5)
    embed = torch.nn.Embedding(5, 16)
    params = [*encoder.parameters(), *head.parameters(), *embed.parameters()]
    optimizer = torch.optim.Adam(params, lr=1e-2)
    ids = torch.randint(0, 5, (16, 8))
    target = ids.flip(1)  # reversing needs attention across positions

    def loss_fn():
        return F.cross_entropy(head(encoder(embed(ids))).transpose(1, 2), target)

    first = loss_fn()
    first.backward()
    missing = [n for n, p in encoder.named_parameters()
               if p.grad is None or p.grad.abs().sum() == 0]
    assert missing == []
    for _ in range(60):
        optimizer.zero_grad()
        loss = loss_fn()
        loss.backward()
        optimizer.step()
    assert loss.item() < 0.3 * first.item()


@pytest.mark.parametrize("positional", ["sinusoidal", "learned", "rotary"])
def test_state_dict_round_trips_exactly_and_loads_weights_only(positional):
    torch.manual_seed(0)
    model = Transformer(11, 13, 16, 2, 2, 2, positional=positional)
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)
    torch.manual_seed(1)
    clone = Transformer(11, 13, 16, 2, 2, 2, positional=positional)
    clone.load_state_dict(state)
    for (name, a), (_, b) in zip(model.state_dict().items(), clone.state_dict().items(),
                                 strict=True):
        assert torch.equal(a, b), name
    model.eval(), clone.eval()
    src, tgt = torch.randint(1, 11, (2, 5)), torch.randint(1, 13, (2, 4))
    assert torch.equal(model(src, tgt), clone(src, tgt))


def test_constants_are_not_saved():
    state = Encoder(16, 2, 1, positional="sinusoidal").state_dict()
    assert not any(k.endswith(".pe") or k.endswith("inv_freq") for k in state)


# ------------------------------------------------------------------------ torch.compile


@pytest.mark.parametrize("positional", ["sinusoidal", "rotary"])
def test_compile_fullgraph_matches_eager_forward_and_backward(positional):
    torch.manual_seed(0)
    encoder = Encoder(16, 2, 2, dropout=0.0, positional=positional)
    compiled = torch.compile(encoder, fullgraph=True, backend="aot_eager")
    x = torch.randn(2, 6, 16, requires_grad=True)
    mask = padding_mask(2, 6, [6, 3])
    for kwargs in ({}, {"key_padding_mask": mask}, {"is_causal": True}):
        expected = encoder(x, **kwargs)
        (grad_expected,) = torch.autograd.grad(expected.sum(), x)
        got = compiled(x, **kwargs)
        (grad_got,) = torch.autograd.grad(got.sum(), x)
        torch.testing.assert_close(got, expected)
        torch.testing.assert_close(grad_got, grad_expected)


def test_compile_with_inductor_matches_eager():
    torch.manual_seed(0)
    encoder = Encoder(16, 2, 1, dropout=0.0).eval()
    x = torch.randn(2, 6, 16)
    mask = padding_mask(2, 6, [6, 0])  # includes a fully padded row
    got = torch.compile(encoder, fullgraph=True)(x, key_padding_mask=mask)
    torch.testing.assert_close(got, encoder(x, key_padding_mask=mask), atol=1e-5, rtol=1e-5)
    assert not got.isnan().any()


# -------------------------------------------------------------------------- Transformer


def make_model(seed=0, **kwargs):
    torch.manual_seed(seed)
    options = dict(d_model=16, n_heads=2, n_encoder_layers=2, n_decoder_layers=2, dropout=0.0)
    options.update(kwargs)
    return Transformer(12, 10, **options).eval()


def test_transformer_logits_ignore_source_padding():
    model = make_model()
    src = torch.randint(3, 12, (1, 5))
    tgt = torch.randint(3, 10, (1, 4))
    padded = torch.cat([src, torch.zeros(1, 3, dtype=torch.long)], dim=1)
    torch.testing.assert_close(model(padded, tgt), model(src, tgt), atol=1e-5, rtol=1e-5)
    assert model(src, tgt).shape == (1, 4, 10)


def test_decode_returns_cross_attention_per_layer_and_head():
    model = make_model()
    src = torch.tensor([[5, 6, 7, 0, 0]])
    memory = model.encode(src)
    logits, cross = model.decode(torch.tensor([[BOS, 4, 5]]), memory, model.padding_mask(src),
                                 return_attention=True)
    assert logits.shape == (1, 3, 10)
    assert len(cross) == 2 and all(c.shape == (1, 2, 3, 5) for c in cross)
    for c in cross:
        torch.testing.assert_close(c.sum(-1), torch.ones(1, 2, 3))
        assert c[..., 3:].abs().max() == 0  # padding gets no attention


def test_tie_embeddings_shares_the_output_head():
    model = make_model(tie_embeddings=True)
    assert model.lm_head.weight is model.tgt_embed.weight
    assert len(list(model.parameters())) == len(list(make_model().parameters())) - 1


def test_tie_embeddings_all_shares_one_matrix_for_both_embeddings_and_the_head():
    torch.manual_seed(0)
    model = Transformer(12, 12, d_model=16, n_heads=2, n_encoder_layers=1, n_decoder_layers=1,
                        tie_embeddings="all")
    assert model.src_embed.weight is model.tgt_embed.weight is model.lm_head.weight
    untied = Transformer(12, 12, d_model=16, n_heads=2, n_encoder_layers=1, n_decoder_layers=1)
    assert len(list(model.parameters())) == len(list(untied.parameters())) - 2
    src, tgt = torch.randint(3, 12, (2, 5)), torch.randint(3, 12, (2, 4))
    model(src, tgt).sum().backward()  # both embeddings' and the head's gradients meet
    grad = model.src_embed.weight.grad
    assert grad is not None and grad[src.unique()].abs().sum() > 0


@pytest.mark.parametrize("kwargs, message", [
    (dict(tie_embeddings="all"), "tie_embeddings: 'all' needs one vocabulary.*12.*10"),
    (dict(tie_embeddings="source"), "tie_embeddings: expected False, True .* or 'all', got"),
])
def test_tie_embeddings_refuses_what_it_cannot_tie(kwargs, message):
    with pytest.raises(ValueError, match=message):
        make_model(**kwargs)


def full_forward_greedy(model, src, steps):
    """The reference: re-run the whole model on the growing prefix and take the argmax."""
    tgt = torch.full((src.shape[0], 1), BOS)
    for _ in range(steps):
        logits = model(src, tgt)[:, -1]
        logits[:, [PAD, BOS]] = float("-inf")  # never generated
        next_ids = logits.argmax(-1, keepdim=True)
        tgt = torch.cat([tgt, next_ids], dim=1)
    return tgt[:, 1:]


@pytest.mark.parametrize("positional", ["sinusoidal", "learned", "rotary"])
def test_greedy_generation_equals_argmax_over_full_forward_passes(positional):
    model = make_model(positional=positional)
    src = torch.randint(3, 12, (3, 6))
    src[1, 4:] = PAD
    out = model.generate(src, max_new_tokens=8, bos_id=BOS, eos_id=EOS)
    reference = full_forward_greedy(model, src, out.shape[1])
    for row, ref in zip(out, reference, strict=True):
        eos = (row == EOS).nonzero()
        end = int(eos[0]) + 1 if len(eos) else len(row)
        assert torch.equal(row[:end], ref[:end])
        assert (row[end:] == PAD).all()  # padded after its end of sentence


def test_greedy_search_stops_each_row_at_eos_and_pads_after_it():
    ends = torch.tensor([2, 4])  # row 0 ends at its 2nd token, row 1 at its 4th
    calls = []

    def step(last):
        calls.append(last)
        log_probs = torch.full((2, 6), -5.0)
        log_probs[:, 5] = -1.0
        log_probs[ends == len(calls), EOS] = 0.0
        return log_probs

    out = greedy_search(step, 2, BOS, EOS, PAD, max_new_tokens=10)
    assert out.tolist() == [[5, EOS, PAD, PAD], [5, 5, 5, EOS]]
    assert len(calls) == 4  # stopped once every row had ended
    assert calls[0].tolist() == [[BOS], [BOS]]


def test_generate_decodes_without_dropout_and_keeps_the_mode():
    model = make_model(dropout=0.5).train()
    src = torch.randint(3, 12, (3, 6))
    first = model.generate(src, 8, BOS, EOS)
    assert model.training
    assert torch.equal(model.generate(src, 8, BOS, EOS), first)
    assert torch.equal(model.eval().generate(src, 8, BOS, EOS), first)


def model_step(model, src, beams):
    memory = model.encode(src).repeat_interleave(beams, 0)
    mask = model.padding_mask(src).repeat_interleave(beams, 0)
    cache = model.decoder.new_cache()

    def step(last):
        return model.decode(last, memory, mask, cache=cache)[:, -1].log_softmax(-1)

    return step, cache


def test_beam_size_one_is_greedy():
    model = make_model(1)
    src = torch.randint(3, 12, (4, 6))
    with torch.no_grad():
        step, _ = model_step(model, src, 1)
        greedy = greedy_search(step, 4, BOS, EOS, PAD, 12)
        step, cache = model_step(model, src, 1)
        beam = beam_search(step, cache.reorder, 4, BOS, EOS, PAD, 12, beam_size=1)
    assert torch.equal(beam, greedy)


def sentence_log_prob(model, src, tokens):
    """Teacher-forced sum of log-probabilities of ``tokens`` (ending at EOS)."""
    tgt = torch.tensor([[BOS, *tokens]])
    logits = model(src, tgt[:, :-1])
    logits[..., [PAD, BOS]] = float("-inf")  # as generate scores them
    log_probs = logits.log_softmax(-1)
    return log_probs.gather(-1, tgt[:, 1:].unsqueeze(-1)).sum().item()


def strip(row):
    tokens = row.tolist()
    return tokens[: tokens.index(EOS) + 1] if EOS in tokens else tokens


def test_beam_search_finds_a_better_translation_than_greedy():
    """On some sources the best beam is not the greedy one, and it scores higher."""
    found = 0
    for seed in range(20):
        model = make_model(seed, d_model=8, n_heads=1, n_encoder_layers=1, n_decoder_layers=1)
        with torch.no_grad():
            model.lm_head.weight.mul_(4)  # peakier, more decisive distributions
        src = torch.randint(3, 12, (1, 5))
        greedy = strip(model.generate(src, 6, BOS, EOS)[0])
        beam = strip(model.generate(src, 6, BOS, EOS, beam_size=4, length_penalty=0.0)[0])
        if beam != greedy and greedy[-1] == EOS and beam[-1] == EOS:
            with torch.no_grad():
                assert sentence_log_prob(model, src, beam) > sentence_log_prob(model, src, greedy)
            found += 1
    assert found > 0


def test_beam_search_on_a_known_distribution():
    """Greedy takes 'a' (0.6), then 'a' (0.35), then EOS: 0.21. Beam search finds 'b'
    (0.4) then EOS (0.9): 0.36."""
    a, b = 3, 4
    table = {
        (): {a: 0.6, b: 0.4},
        (a,): {EOS: 0.3, a: 0.35, b: 0.35},
        (b,): {EOS: 0.9, a: 0.05, b: 0.05},
    }

    class Step:
        """Rows are prefixes; like a KV cache, a row holds every token fed so far."""

        def __init__(self, rows):
            self.prefixes = [()] * rows

        def __call__(self, last):
            self.prefixes = [p if t == BOS else p + (t,)
                             for p, t in zip(self.prefixes, last[:, 0].tolist(), strict=True)]
            rows = []
            for prefix in self.prefixes:
                probs = torch.full((5,), 1e-9)
                for token, p in table.get(prefix, {EOS: 1.0}).items():
                    probs[token] = p
                rows.append(probs.log())
            return torch.stack(rows)

        def reorder(self, index):
            self.prefixes = [self.prefixes[i] for i in index.tolist()]

    step = Step(2)
    out = beam_search(step, step.reorder, 1, BOS, EOS, PAD, 4, beam_size=2, length_penalty=0.0)
    assert out[0].tolist() == [b, EOS]
    greedy = greedy_search(Step(1), 1, BOS, EOS, PAD, 4)
    assert greedy[0].tolist() == [a, a, EOS]  # probability 0.6 * 0.35 = 0.21
    assert sequence_score(-1.0, 4, 1.0) == -0.25


def test_beam_search_keeps_going_while_a_live_beam_beats_the_finished_ones():
    """After two steps three hypotheses have ended, but the live prefix A A still scores
    better than all of them; stopping there would return a worse result than greedy."""
    a, b = 3, 4
    table = torch.full((5, 5), -1e9)
    table[BOS, [EOS, a, b]] = torch.tensor([-5.5, -0.04, -3.3])
    table[a, [EOS, a, b]] = torch.tensor([-3.0, -0.05, -4.0])
    table[b, [EOS, a, b]] = torch.tensor([-0.1, -2.6, -3.9])

    def step(last):  # a first-order model: the next token depends on the last one only
        return table[last[:, 0]]

    greedy = greedy_search(step, 1, BOS, EOS, PAD, 4)
    beam = beam_search(step, lambda index: None, 1, BOS, EOS, PAD, 4, beam_size=3,
                       length_penalty=1.0)
    assert greedy[0].tolist() == [a, a, a, a]
    assert beam[0].tolist() == [a, a, a, a]
