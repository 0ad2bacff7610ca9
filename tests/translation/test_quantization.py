"""attention.translation.quantization: int8 copies of a Transformer's Linear layers that
decode as the float32 model does, leave it untouched, and refuse what they cannot quantize by
name."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.ao.nn.quantized import dynamic as quantized_dynamic

from attention.inference import prepared_for_inference
from attention.models import Transformer
from attention.multihead import MultiHeadAttention
from attention.translation import quantization
from attention.translation.quantization import quantize_dynamic

ROOT = Path(__file__).resolve().parents[2]
VOCAB = 32
BOS, EOS = 1, 2


def tiny_transformer(*, tie_embeddings: bool = False, head_scale: float = 1.0) -> Transformer:
    """Seeded, no dropout; ``head_scale`` widens the gaps between the logits, so that int8
    rounding rarely changes which token is the most likely."""
    torch.manual_seed(0)
    model = Transformer(VOCAB, VOCAB, d_model=16, n_heads=2, n_encoder_layers=2,
                        n_decoder_layers=2, d_ff=32, dropout=0.0,
                        tie_embeddings=tie_embeddings).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(head_scale)
    return model


def ids(batch: int, length: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(3, VOCAB, (batch, length), generator=generator)


def linear_types(model: nn.Module) -> dict[str, type]:
    return {name: type(module) for name, module in model.named_modules()
            if isinstance(module, (nn.Linear, quantized_dynamic.Linear))}


def test_every_linear_layer_becomes_a_dynamic_int8_one():
    quantized = quantize_dynamic(tiny_transformer())
    types = linear_types(quantized)
    # 2 encoder layers x 6, 2 decoder layers x 10 (self- and cross-attention), the head.
    assert len(types) == 2 * 6 + 2 * 10 + 1
    assert set(types.values()) == {quantized_dynamic.Linear}
    assert quantized.lm_head.weight().dtype == torch.qint8
    assert quantized.src_embed.weight.dtype == torch.float32  # only Linear layers change


def test_logits_stay_within_int8_rounding_of_float32():
    model = tiny_transformer()
    src, tgt = ids(4, 7, seed=1), ids(4, 6, seed=2)
    expected = model(src, tgt)
    got = quantize_dynamic(model)(src, tgt)
    assert not torch.equal(got, expected)  # it did quantize
    torch.testing.assert_close(got, expected, atol=0.05 * expected.abs().max().item(), rtol=0)


@pytest.mark.parametrize("beam_size", [1, 3])
def test_generation_agrees_with_float32_on_a_model_with_clear_margins(beam_size):
    model = tiny_transformer(head_scale=4.0)
    src = torch.cat((ids(6, 7, seed=3), torch.full((6, 1), EOS)), dim=1)
    expected = model.generate(src, 10, BOS, EOS, beam_size=beam_size)
    got = quantize_dynamic(model).generate(src, 10, BOS, EOS, beam_size=beam_size)
    assert got.shape == expected.shape
    assert (got == expected).float().mean().item() >= 0.9


def test_the_model_given_is_untouched_and_its_mode_kept():
    model = tiny_transformer().train()
    state = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    quantized = quantize_dynamic(model)
    assert quantized is not model
    assert set(linear_types(model).values()) == {nn.Linear}
    assert model.training and not quantized.training
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, state[name]), name


def test_inplace_quantizes_the_model_itself_into_eval_mode():
    model = tiny_transformer().train()
    quantized = quantize_dynamic(model, inplace=True)
    assert quantized is model
    assert set(linear_types(model).values()) == {quantized_dynamic.Linear}
    assert not any(module.training for module in model.modules())


def test_tied_embeddings_are_untied_by_quantizing_the_head():
    model = tiny_transformer(tie_embeddings=True)
    assert model.lm_head.weight is model.tgt_embed.weight
    quantized = quantize_dynamic(model)
    assert model.lm_head.weight is model.tgt_embed.weight  # the original keeps its tie
    assert quantized.tgt_embed.weight.dtype == torch.float32
    assert quantized.lm_head.weight().dtype == torch.qint8
    src, tgt = ids(2, 5, seed=4), ids(2, 4, seed=5)
    torch.testing.assert_close(quantized(src, tgt), model(src, tgt),
                               atol=0.05 * model(src, tgt).abs().max().item(), rtol=0)


def test_quantized_projections_run_their_own_forward_instead_of_the_fused_matmul():
    torch.manual_seed(0)
    attention = MultiHeadAttention(16, 2).eval()
    quantized = quantize_dynamic(attention)
    assert attention._plain_projections() and not quantized._plain_projections()
    x = torch.randn(2, 5, 16)
    torch.testing.assert_close(
        quantized.project_qkv(x),
        torch.cat((quantized.q_proj(x), quantized.k_proj(x), quantized.v_proj(x)), dim=-1),
        atol=0, rtol=0)
    expected, _ = attention(x)
    got, _ = quantized(x)
    torch.testing.assert_close(got, expected, atol=0.05 * expected.abs().max().item(), rtol=0)


def test_inference_preparation_leaves_quantized_layers_to_their_own_forward():
    quantized = quantize_dynamic(tiny_transformer())
    src, tgt = ids(2, 5, seed=7), ids(2, 4, seed=8)
    expected = quantized(src, tgt)
    with torch.no_grad(), prepared_for_inference(quantized):
        got = quantized(src, tgt)
    torch.testing.assert_close(got, expected, atol=0, rtol=0)


def test_runs_eagerly_without_torch_compile(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("torch.compile was called")

    monkeypatch.setattr(torch, "compile", refuse)
    quantized = quantize_dynamic(tiny_transformer())
    out = quantized.generate(ids(2, 5, seed=6), 4, BOS, EOS)
    assert out.shape[0] == 2


def test_torchs_deprecation_warnings_reach_the_caller(monkeypatch):
    """torch.ao.quantization's deprecation is torch's to say: nothing here silences it."""
    real = torch.ao.quantization.quantize_dynamic

    def noisy(*args, **kwargs):
        warnings.warn("torch.ao.quantization is deprecated and will be removed",
                      DeprecationWarning, stacklevel=2)
        warnings.warn("torch.quantize_per_tensor, torch.quantize_per_channel and other "
                      "quantized tensor creation functions ... are deprecated", UserWarning,
                      stacklevel=2)
        return real(*args, **kwargs)

    monkeypatch.setattr(torch.ao.quantization, "quantize_dynamic", noisy)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        quantize_dynamic(tiny_transformer())
    messages = [str(w.message) for w in caught]
    assert "torch.ao.quantization is deprecated and will be removed" in messages
    assert any(m.startswith("torch.quantize_per_tensor") for m in messages)


def test_a_model_off_the_cpu_is_refused_by_name_with_its_device():
    with torch.device("meta"):
        model = nn.Sequential(nn.Linear(4, 4))
    with pytest.raises(ValueError, match=r"^model: expected a model on the CPU .* on meta"):
        quantize_dynamic(model)


def test_linear_weights_that_are_not_float32_are_refused_by_name():
    model = nn.Sequential(nn.Linear(4, 4)).to(torch.bfloat16)
    with pytest.raises(ValueError, match=r"^model: expected float32 .* got torch\.bfloat16 "
                                         r"in '0'"):
        quantize_dynamic(model)


def test_an_unknown_dtype_and_a_non_module_are_refused_by_name():
    with pytest.raises(ValueError, match=r"^dtype: expected one of \['int8'\], got 'int4'"):
        quantize_dynamic(nn.Linear(4, 4), dtype="int4")
    with pytest.raises(TypeError, match=r"^model: expected an nn.Module, got dict"):
        quantize_dynamic({"weight": torch.zeros(4, 4)})


def test_the_choices_are_listed_once():
    assert list(quantization.DTYPES) == ["int8"]
