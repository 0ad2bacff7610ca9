"""Weights prepared once for decoding: the same outputs as the modules' own forward, the
modules restored afterwards, and prepared again whenever a weight changes."""

import copy

import pytest
import torch
from torch import nn

from attention import Transformer, features, inference
from attention.inference import PreparedLinear, prepared_for_inference
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


def test_weights_are_prepared_once_and_again_after_they_change(pack_every_product):
    model = small_model()
    with prepared_for_inference(model):
        first = model.lm_head.forward
    with prepared_for_inference(model):
        assert model.lm_head.forward is first  # kept from the block before
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    src, tgt = torch.randint(3, 30, (2, 6)), torch.randint(3, 30, (2, 4))
    model(src, tgt).square().mean().backward()
    optimizer.step()
    with torch.no_grad():
        expected = model(src, tgt)
    with prepared_for_inference(model):
        assert model.lm_head.forward is not first
        torch.testing.assert_close(model(src, tgt), expected, rtol=1e-5, atol=1e-5)
    model.load_state_dict(small_model().state_dict())
    with torch.no_grad():
        expected = model(src, tgt)
    with prepared_for_inference(model):
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
def test_float32_cpu_weights_are_packed_for_onednn_outside_autocast():
    linear = nn.Linear(16, 24)
    assert PreparedLinear(linear.weight, linear.bias).packed is not None
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert PreparedLinear(linear.weight, linear.bias).packed is None
    half = PreparedLinear(linear.weight.bfloat16(), None)
    assert half.packed is None


def test_without_onednn_the_weights_are_used_as_they_are(monkeypatch):
    model = small_model()
    src, tgt = torch.randint(3, 30, (3, 7)), torch.randint(3, 30, (3, 5))
    with prepared_for_inference(model):  # packed where this torch can
        pass
    monkeypatch.setattr(features, "ONEDNN_LINEAR", False)
    expected = model(src, tgt)
    with prepared_for_inference(model):  # prepared again, unpacked: F.linear's own sums
        assert model.lm_head.forward.packed is None
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
