"""Weights prepared once for decoding: the same outputs as the modules' own forward, the
modules restored afterwards, and prepared again whenever a weight changes."""

import copy

import pytest
import torch
from torch import nn

from attention import Transformer, features, inference
from attention.inference import PreparedLinear, prepared_for_inference
from attention.layers import FeedForward
from attention.multihead import MultiHeadAttention

BOS, EOS = 1, 2


@pytest.fixture
def pack_every_product(monkeypatch):
    """The tests' tiny products are below PACKED_MIN_MACS: pack them all the same."""
    monkeypatch.setattr(inference, "PACKED_MIN_MACS", 0)


def small_model(**kwargs):
    torch.manual_seed(0)
    return Transformer(30, 30, d_model=32, n_heads=4, n_encoder_layers=1, n_decoder_layers=2,
                       dropout=0.0, **kwargs).eval()


def test_outputs_match_the_modules_own_forward_and_the_modules_are_restored(
        pack_every_product):
    model = small_model(bias=True)
    src, tgt = torch.randint(3, 30, (3, 7)), torch.randint(3, 30, (3, 5))
    expected = model(src, tgt)
    with prepared_for_inference(model):
        assert isinstance(model.lm_head.forward, PreparedLinear)
        inside = model(src, tgt)
    torch.testing.assert_close(inside, expected, rtol=1e-5, atol=1e-5)
    assert "forward" not in model.lm_head.__dict__
    assert all(m._qkv_projection is None for m in model.modules()
               if isinstance(m, MultiHeadAttention))
    assert torch.equal(model(src, tgt), expected)  # back to the plain path


def test_each_block_prepares_the_weights_it_finds_on_entry(pack_every_product):
    model = small_model()
    with prepared_for_inference(model):
        first = model.lm_head.forward
        with prepared_for_inference(model):  # nested: the enclosing block's weights
            assert model.lm_head.forward is first
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    src, tgt = torch.randint(3, 30, (2, 6)), torch.randint(3, 30, (2, 4))
    model(src, tgt).square().mean().backward()
    optimizer.step()
    with torch.no_grad():
        expected = model(src, tgt)
    with prepared_for_inference(model):
        assert model.lm_head.forward is not first
        torch.testing.assert_close(model(src, tgt), expected, rtol=1e-5, atol=1e-5)


def test_hooked_layers_keep_their_own_forward():
    model = small_model()
    calls = []
    model.lm_head.register_forward_hook(lambda *args: calls.append(1))
    with prepared_for_inference(model):
        assert "forward" not in model.lm_head.__dict__
        assert isinstance(model.decoder.layers[0].feed_forward.linear1.forward, PreparedLinear)
        model.generate(torch.randint(3, 30, (2, 5)), 4, BOS, EOS)
    assert calls


@pytest.mark.skipif(not features.ONEDNN_LINEAR, reason="this torch has no oneDNN linear ops")
def test_float32_cpu_weights_are_packed_on_their_first_big_product_outside_autocast():
    linear = nn.Linear(256, 512)
    prepared = PreparedLinear(linear.weight, linear.bias)
    assert prepared.packs and prepared.packed is None  # nothing packed before it is needed
    prepared(torch.randn(1, 256))  # 131k multiply-adds: F.linear
    assert prepared.packed is None
    x = torch.randn(16, 256)
    out = prepared(x)  # 2.1M: packed, and kept
    assert prepared.packed is not None
    torch.testing.assert_close(out, linear(x), rtol=1e-5, atol=1e-5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not PreparedLinear(linear.weight, linear.bias).packs
    assert not PreparedLinear(linear.weight.bfloat16(), None).packs


def test_without_onednn_the_weights_are_used_as_they_are(monkeypatch):
    model = small_model()
    src, tgt = torch.randint(3, 30, (3, 7)), torch.randint(3, 30, (3, 5))
    with prepared_for_inference(model):  # packed where this torch can
        pass
    monkeypatch.setattr(features, "ONEDNN_LINEAR", False)
    expected = model(src, tgt)
    with prepared_for_inference(model):  # prepared again, unpacked: F.linear's own sums
        assert not model.lm_head.forward.packs
        assert torch.equal(model(src, tgt), expected)


def test_a_model_that_has_decoded_can_be_copied_and_saved(tmp_path):
    model = small_model()
    model.generate(torch.randint(3, 30, (2, 5)), 4, BOS, EOS)
    twin = copy.deepcopy(model)
    torch.save(model, tmp_path / "model.pt")
    assert torch.equal(twin.lm_head.weight, model.lm_head.weight)


def test_small_products_keep_f_linear():
    """Below PACKED_MIN_MACS (one row of a small weight) oneDNN is slower: F.linear runs,
    with its own sums."""
    model = small_model()
    src, tgt = torch.randint(3, 30, (1, 7)), torch.randint(3, 30, (1, 1))
    expected = model(src, tgt)
    with prepared_for_inference(model):
        assert torch.equal(model(src, tgt), expected)


def test_a_weight_changed_between_calls_is_seen_however_it_was_changed():
    """Each generate prepares the weights afresh: updates that leave a tensor's version
    counter alone (writes through .data, fused optimizers) are seen too."""
    model = small_model()
    src = torch.randint(3, 30, (4, 6))
    before = model.generate(src, 6, BOS, EOS, return_scores=True)[1]
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.data.mul_(1.5)  # no version bump
    after = model.generate(src, 6, BOS, EOS, return_scores=True)[1]
    assert not torch.equal(before, after)
    assert torch.equal(after, copy.deepcopy(model).generate(src, 6, BOS, EOS,
                                                           return_scores=True)[1])


def test_a_model_made_under_inference_mode_decodes():
    with torch.inference_mode():
        model = small_model()
        src = torch.randint(3, 30, (2, 5))
    assert model.generate(src, 4, BOS, EOS).shape[0] == 2
    with torch.inference_mode():
        assert model.generate(src, 4, BOS, EOS, beam_size=2).shape[0] == 2


def test_a_failure_while_preparing_restores_every_module(monkeypatch):
    model = small_model()
    made = []
    real_init = PreparedLinear.__init__

    def failing(self, weight, bias):
        made.append(1)
        if len(made) == 4:
            raise MemoryError("while packing")
        real_init(self, weight, bias)

    monkeypatch.setattr(PreparedLinear, "__init__", failing)
    with pytest.raises(MemoryError), prepared_for_inference(model):
        pass
    assert not any("forward" in m.__dict__ for m in model.modules())
    assert all(m._qkv_projection is None for m in model.modules()
               if isinstance(m, MultiHeadAttention))


def test_modules_pickled_before_the_prepared_projection_existed_still_run():
    model = small_model()
    for module in model.modules():
        module.__dict__.pop("_qkv_projection", None)  # as unpickled from an older release
    assert model.generate(torch.randint(3, 30, (2, 5)), 4, BOS, EOS).shape[0] == 2


@pytest.mark.skipif(not features.ONEDNN_LINEAR, reason="needs the oneDNN linear ops")
@pytest.mark.parametrize("activation", ["gelu", "relu"])
def test_fused_activation_and_residual_sum_give_the_separate_operations_bits(activation):
    torch.manual_seed(0)
    layer = FeedForward(64, 256, activation=activation).eval()
    x, residual = torch.randn(64, 64) * 4, torch.randn(64, 64)
    expected = layer(x)
    with torch.no_grad(), prepared_for_inference(layer):
        assert torch.equal(layer(x), expected)  # linear1's activation fused
        assert layer.linear1.forward.packed is not None  # on the packed product
        linear = layer.linear2.forward
        hidden = torch.randn(64, 256)
        assert torch.equal(linear.added(hidden, residual), residual + linear(hidden))
