"""Optional torch APIs found by feature: each detector against this torch's real API and
against a stand-in of an older one, and each fallback run with its detector set to "absent"."""

from __future__ import annotations

import contextlib
import enum
import inspect
import subprocess
import sys
from unittest import mock

import pytest
import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.testing import assert_close

from attention import EncoderLayer, features, functional
from attention.functional import BACKENDS, attend, attention_backend, sdpa_priority
from attention.layers import layer_norm

D, H = 16, 2


def old_sdpa_kernel(backends):
    """``sdpa_kernel`` as a torch without ``set_priority`` has it."""
    return sdpa_kernel(backends)


class OldLayerNorm(nn.LayerNorm):
    """``nn.LayerNorm`` as a torch without its ``bias`` argument has it."""

    def __init__(self, normalized_shape, eps=1e-5, elementwise_affine=True, device=None,
                 dtype=None):
        super().__init__(normalized_shape, eps, elementwise_affine, device=device, dtype=dtype)


class OldBackend(enum.Enum):
    MATH = 0
    FLASH_ATTENTION = 1


# ------------------------------------------------------------------------ the detectors


def test_accepts_keyword_reads_the_signature():
    assert features.accepts_keyword(sdpa_kernel, "backends")
    assert not features.accepts_keyword(old_sdpa_kernel, "set_priority")
    assert features.accepts_keyword(nn.Linear, "bias")  # a class: its constructor
    assert not features.accepts_keyword(OldLayerNorm, "bias")
    assert not features.accepts_keyword(torch.add, "alpha")  # a builtin with no signature


def test_has_member_on_python_and_torch_enums():
    assert features.has_member(OldBackend, "MATH")
    assert not features.has_member(OldBackend, "CUDNN_ATTENTION")
    assert features.has_member(SDPBackend, "MATH")  # a pybind11 enum
    assert not features.has_member(SDPBackend, "NO_SUCH_KERNEL")


def test_set_priority_detector_matches_what_sdpa_kernel_takes():
    if features.SDPA_SET_PRIORITY:
        with sdpa_kernel([SDPBackend.MATH, SDPBackend.FLASH_ATTENTION], set_priority=True):
            pass
    else:
        with pytest.raises(TypeError):
            sdpa_kernel([SDPBackend.MATH], set_priority=True)


def test_cudnn_detector_matches_sdpbackend():
    assert features.CUDNN_ATTENTION == hasattr(SDPBackend, "CUDNN_ATTENTION")
    assert ("cudnn" in BACKENDS) == features.CUDNN_ATTENTION


def test_layer_norm_bias_detector_matches_layer_norm():
    if features.LAYER_NORM_BIAS:
        assert nn.LayerNorm(4, bias=False).bias is None
    else:
        with pytest.raises(TypeError):
            nn.LayerNorm(4, bias=False)


def test_ddp_detector_matches_its_constructor():
    parameters = inspect.signature(nn.parallel.DistributedDataParallel).parameters
    assert features.DDP_FORWARD_SYNC_BUFFERS == ("forward_sync_buffers" in parameters)


def test_the_detectors_import_neither_dynamo_nor_the_varlen_module():
    # features.py alone, by its path: what the rest of the package imports is not its doing.
    code = ("import importlib.util, sys; "
            f"spec = importlib.util.spec_from_file_location('features', {features.__file__!r}); "
            "spec.loader.exec_module(importlib.util.module_from_spec(spec)); "
            "print(sorted(m for m in ('torch._dynamo', 'torch.nn.attention.varlen') "
            "if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=True)
    assert done.stdout.strip() == "[]", done.stdout + done.stderr


# ----------------------------------------------------------------- kernel order, kernels


def qkv() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    return torch.randn(2, H, 5, 8), torch.randn(2, H, 7, 8), torch.randn(2, H, 7, 8)


def explicit(q, k, v) -> torch.Tensor:
    with attention_backend("explicit"):
        return attend(q, k, v)[0]


def hopper_like_priority(device):
    """An order for every device, as sdpa_priority gives on Hopper, so the CPU runs it."""
    return [SDPBackend.MATH, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION]


@pytest.mark.skipif(not features.SDPA_SET_PRIORITY, reason="this torch has no set_priority")
def test_a_priority_is_applied_where_torch_takes_one(monkeypatch):
    monkeypatch.setattr(functional, "sdpa_priority", hopper_like_priority)
    spy = mock.Mock(wraps=sdpa_kernel)
    monkeypatch.setattr(functional, "sdpa_kernel", spy)
    q, k, v = qkv()
    assert_close(attend(q, k, v)[0], explicit(q, k, v))
    spy.assert_called_once_with(hopper_like_priority(None), set_priority=True)


def test_without_set_priority_auto_keeps_torchs_order(monkeypatch):
    monkeypatch.setattr(features, "SDPA_SET_PRIORITY", False)
    monkeypatch.setattr(functional, "sdpa_priority", hopper_like_priority)
    monkeypatch.setattr(functional, "sdpa_kernel", old_sdpa_kernel)
    context = functional._sdpa_context(torch.device("cpu"))
    assert isinstance(context, contextlib.nullcontext)
    q, k, v = qkv()
    assert_close(attend(q, k, v)[0], explicit(q, k, v))
    with attention_backend("math"):  # forcing one kernel needs no priority
        assert_close(attend(q, k, v)[0], explicit(q, k, v))


def test_without_cudnn_hopper_keeps_torchs_order(monkeypatch):
    with mock.patch("torch.cuda.get_device_capability", return_value=(9, 0)):
        if features.CUDNN_ATTENTION:
            assert sdpa_priority(torch.device("cuda"))[0] == SDPBackend.CUDNN_ATTENTION
        monkeypatch.setattr(features, "CUDNN_ATTENTION", False)
        assert sdpa_priority(torch.device("cuda")) is None


def test_without_cudnn_the_cudnn_backend_is_refused_by_name(monkeypatch):
    monkeypatch.setattr(features, "CUDNN_ATTENTION", False)
    backends = functional._sdpa_backends()
    assert list(backends) == ["math", "flash", "efficient"]
    monkeypatch.setattr(functional, "_SDPA_BACKENDS", backends)
    monkeypatch.setattr(functional, "BACKENDS", ("auto", "explicit", *backends))
    with pytest.raises(ValueError, match=r"^backend: 'cudnn' needs torch's cuDNN attention "
                                         r"kernel \(SDPBackend.CUDNN_ATTENTION\)"):
        with attention_backend("cudnn"):
            pass
    with pytest.raises(ValueError, match=r"backend: expected one of"):  # other names as before
        with attention_backend("fast"):
            pass
    with attention_backend("math"):
        q, k, v = qkv()
        assert_close(attend(q, k, v)[0], explicit(q, k, v))


# ------------------------------------------------------------------------------ LayerNorm


@pytest.mark.parametrize("bias", [True, False])
def test_layer_norm_is_torchs_with_or_without_the_bias_argument(monkeypatch, bias):
    torch.manual_seed(1)
    reference = nn.LayerNorm(D, eps=1e-6, bias=bias)
    with torch.no_grad():
        for parameter in reference.parameters():
            parameter.normal_()
    x = torch.randn(3, D)
    for has_bias_argument in (True, False):
        with monkeypatch.context() as patch:
            if not has_bias_argument:
                patch.setattr(features, "LAYER_NORM_BIAS", False)
                patch.setattr(nn, "LayerNorm", OldLayerNorm)  # would refuse bias=
            norm = layer_norm(D, 1e-6, bias)
        assert norm.eps == 1e-6
        assert (norm.bias is None) == (not bias)
        assert list(norm.state_dict()) == list(reference.state_dict())
        norm.load_state_dict(reference.state_dict())
        assert_close(norm(x), reference(x))


def test_layers_build_on_a_layer_norm_without_the_bias_argument(monkeypatch):
    torch.manual_seed(2)
    reference = EncoderLayer(D, H, d_ff=32, dropout=0.0).eval()  # bias=False: the default
    with monkeypatch.context() as patch:
        patch.setattr(features, "LAYER_NORM_BIAS", False)
        patch.setattr(nn, "LayerNorm", OldLayerNorm)
        layer = EncoderLayer(D, H, d_ff=32, dropout=0.0).eval()
    assert isinstance(layer.norm1, OldLayerNorm) and layer.norm1.bias is None
    layer.load_state_dict(reference.state_dict())  # strict: the same parameters
    x = torch.randn(2, 5, D)
    assert_close(layer(x), reference(x))
