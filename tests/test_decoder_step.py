"""DecoderStep: the same decoding as the general path (the decoder's modules on a
DecoderCache), on every model it applies to, and the general path for those it does not."""

import pytest
import torch

import attention.models
from attention import Transformer
from attention.decoder_step import DecoderStep, step_applies
from attention.inference import prepared_for_inference

BOS, EOS, PAD = 1, 2, 0

CONFIGS = {
    "pre-norm": {},
    "post-norm, relu, bias": {"norm_first": False, "activation": "relu", "bias": True},
    "rmsnorm, swiglu, rotary": {"norm": "rmsnorm", "activation": "swiglu",
                                "positional": "rotary"},
    "learned positions": {"positional": "learned", "max_len": 32},
    "no positions": {"positional": None},
}


def make_model(seed: int = 0, **options) -> tuple[Transformer, torch.Tensor]:
    torch.manual_seed(seed)
    model = Transformer(40, 36, d_model=32, n_heads=4, n_encoder_layers=2,
                        n_decoder_layers=2, d_ff=64, dropout=0.0, **options).eval()
    src = torch.randint(3, 40, (5, 9))
    src[1, 6:] = PAD
    src[3, 2:] = PAD
    return model, src


def generate_both(model, src, monkeypatch, **options):
    """generate's output on DecoderStep, then on the general path."""
    assert step_applies(model, "cpu")
    on_step = model.generate(src, 12, BOS, EOS, **options)
    with monkeypatch.context() as patch:
        patch.setattr(attention.models, "step_applies", lambda model, device_type: False)
        general = model.generate(src, 12, BOS, EOS, **options)
    return on_step, general


@pytest.mark.parametrize("config", CONFIGS)
@pytest.mark.parametrize("options", [
    {}, {"beam_size": 3}, {"beam_size": 4, "num_return_sequences": 2, "length_penalty": 0.6},
    {"min_new_tokens": 4, "no_repeat_ngram_size": 2},
    {"beam_size": 3, "no_repeat_ngram_size": 2},
], ids=["greedy", "beam 3", "n-best", "rules", "beam rules"])
def test_generate_finds_what_the_general_path_finds(config, options, monkeypatch):
    model, src = make_model(**CONFIGS[config])
    (ids, scores), (general_ids, general_scores) = generate_both(
        model, src, monkeypatch, return_scores=True, **options)
    assert ids.tolist() == general_ids.tolist()
    torch.testing.assert_close(scores, general_scores, rtol=1e-5, atol=1e-5)


def test_sampling_draws_what_the_general_path_draws(monkeypatch):
    model, src = make_model()
    on_step, general = generate_both(
        model, src, monkeypatch, do_sample=True, top_k=8, num_return_sequences=3,
        generator=torch.Generator().manual_seed(3))
    # The generators advance alike: seeded again for the second run.
    with monkeypatch.context() as patch:
        patch.setattr(attention.models, "step_applies", lambda model, device_type: False)
        general = model.generate(src, 12, BOS, EOS, do_sample=True, top_k=8,
                                 num_return_sequences=3,
                                 generator=torch.Generator().manual_seed(3))
    assert on_step.tolist() == general.tolist()


def test_step_logits_are_the_general_paths_within_rounding():
    model, src = make_model()
    ids = torch.randint(3, 36, (src.shape[0], 6))
    with torch.no_grad(), prepared_for_inference(model):
        padding = model.padding_mask(src)
        memory = model.encode(src)
        cache = model.decoder.new_cache(capacity=6)
        step = DecoderStep(model, memory, padding, room=6)
        for t in range(6):
            expected = model.decode(ids[:, t:t + 1], memory, padding, cache=cache)[:, -1]
            # The same operations, but for the sum over few positions (see SMALL_PRODUCT).
            torch.testing.assert_close(step(ids[:, t:t + 1]), expected, rtol=1e-6, atol=1e-6)


def test_a_source_of_padding_only_decodes_as_on_the_general_path(monkeypatch):
    model, src = make_model()
    src[2] = PAD
    for options in ({}, {"beam_size": 3}):
        on_step, general = generate_both(model, src, monkeypatch, **options)
        assert on_step.tolist() == general.tolist()
        assert not torch.isnan(model.generate(src, 12, BOS, EOS, return_scores=True,
                                              **options)[1]).any()


def test_quantized_and_hooked_layers_run_their_own_forward(monkeypatch):
    model, src = make_model()
    calls = []
    model.decoder.layers[0].feed_forward.linear1.register_forward_hook(
        lambda module, args, out: calls.append(out.shape[0]))
    on_step, general = generate_both(model, src, monkeypatch, beam_size=2)
    assert on_step.tolist() == general.tolist()
    assert calls  # the hook saw the steps' rows
    quantized = torch.ao.quantization.quantize_dynamic(model, {torch.nn.Linear},
                                                       dtype=torch.qint8)
    on_step, general = generate_both(quantized, src, monkeypatch)
    assert on_step.tolist() == general.tolist()


@pytest.mark.parametrize("options", [
    {"window": 4}, {"alibi": True, "positional": None}, {"n_kv_heads": 2}, {"softcap": 30.0},
    {"qk_norm": True},
])
def test_attention_variants_take_the_general_path(options):
    model, src = make_model(**options)
    assert not step_applies(model, "cpu")
    assert model.generate(src, 6, BOS, EOS).shape[0] == src.shape[0]


def test_autocast_takes_the_general_path():
    model, _ = make_model()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not step_applies(model, "cpu")
    assert step_applies(model, "cpu")


def test_a_step_past_its_room_is_refused():
    model, src = make_model()
    with torch.no_grad():
        step = DecoderStep(model, model.encode(src), model.padding_mask(src), room=2)
        last = torch.full((src.shape[0], 1), BOS)
        step(last)
        step(last)
        with pytest.raises(ValueError, match=r"last_ids: expected at most room=2 steps"):
            step(last)
