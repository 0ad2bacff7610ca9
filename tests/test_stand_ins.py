"""The library's CUDA-only paths run on the CPU through faithful stand-ins, so that the first
GPU run is not the first time they run.

- Packed attention on torch's variable-length flash kernel: ``varlen_attn`` is replaced by a
  per-segment reference that also checks every argument it is given, the branch is forced on,
  and the result (and gradients) must equal the padded path's on ragged masks.
- The kernel's causal window is passed in the form the installed release takes
  (``window_size=`` from torch 2.11, ``is_causal=`` in 2.10), found by its signature.
- The Hopper kernel priority (cuDNN first) is entered on the CPU and gives the explicit
  path's result.
"""

from __future__ import annotations

import inspect
import subprocess
import sys
from itertools import pairwise
from unittest import mock

import pytest
import torch
import torch._dynamo
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.testing import assert_close

from attention import Encoder, EncoderLayer, MultiHeadAttention, functional, multihead
from attention.functional import attend, attention_backend, sdpa_priority
from attention.multihead import can_use_varlen
from attention.packing import Packing

D, H = 16, 2

# ------------------------------------------------------------------ the varlen stand-in


class ReferenceVarlen:
    """``torch.nn.attention.varlen.varlen_attn`` computed segment by segment with plain ops.

    Checks what the flash kernel needs of its arguments (and would otherwise fail on, or
    silently misread, on a GPU): ``(t, h, d)`` q/k/v, int32 ``cu_seqlens`` on q's device,
    starting at 0, non-decreasing, ending at the token count, the same for q and k; the max
    lengths equal to the longest segment, as Python ints; the causal window as a tuple
    ``(-1, 0)`` or ``(-1, -1)`` (varlen_attn compares it with ``==``, which a list fails).
    ``calls`` records each call's causal flag, ``windows`` its ``(left, right)`` window
    (``-1``: no limit); grouped key/value heads are read with ``enable_gqa`` (2.13 only).

    ``style`` picks the signature: ``"2.13"`` and ``"2.11"`` take ``window_size=``
    (2.13 adds ``enable_gqa`` and paging arguments), ``"2.10"`` takes ``is_causal=``.
    """

    def __init__(self, style: str = "2.13") -> None:
        self.style = style
        self.calls: list[bool] = []
        self.windows: list[tuple[int, int]] = []
        self.dtypes: list[torch.dtype] = []
        self.function = {"2.13": self._v213, "2.11": self._v211, "2.10": self._v210}[style]

    # The three signatures, as those releases' torch/nn/attention/varlen.py declare them.
    def _v213(self, query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, return_aux=None,
              scale=None, window_size=(-1, -1), enable_gqa=False, seqused_k=None,
              block_table=None, num_splits=None):
        assert seqused_k is None and block_table is None and num_splits is None
        return self._attend(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k,
                            return_aux, scale, self._window(window_size), enable_gqa)

    def _v211(self, query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, return_aux=None,
              scale=None, window_size=(-1, -1)):
        return self._attend(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k,
                            return_aux, scale, self._window(window_size), False)

    def _v210(self, query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, return_aux=None,
              is_causal=False):
        assert isinstance(is_causal, bool), f"is_causal: expected a bool, got {is_causal!r}"
        return self._attend(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k,
                            return_aux, None, (-1, 0) if is_causal else (-1, -1), False)

    @staticmethod
    def _window(window_size) -> tuple[int, int]:
        """flash-attention's ``(left, right)``, ``-1`` for no limit: ``(-1, 0)`` causal."""
        assert isinstance(window_size, tuple), \
            f"window_size: expected a tuple (varlen_attn compares with (-1, 0)), got " \
            f"{window_size!r}"
        assert len(window_size) == 2 and all(type(s) is int and s >= -1 for s in window_size), \
            f"window_size: got {window_size!r}"
        return window_size

    def _attend(self, query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, return_aux,
                scale, window, enable_gqa):
        assert return_aux is None
        for name, x in (("key", key), ("value", value)):
            assert x.dim() == 3 and x.shape[0] == query.shape[0] and \
                x.shape[2] == query.shape[2], \
                f"{name}: expected (t, h, d) like query {tuple(query.shape)}, got {x.shape}"
            if enable_gqa:
                assert query.shape[1] % x.shape[1] == 0, (query.shape, x.shape)
            else:
                assert x.shape == query.shape, f"{name}: {x.shape} without enable_gqa"
        for name, cu in (("cu_seq_q", cu_seq_q), ("cu_seq_k", cu_seq_k)):
            assert cu.dtype == torch.int32, f"{name}: expected int32, got {cu.dtype}"
            assert cu.device == query.device, f"{name}: on {cu.device}, query on {query.device}"
            assert cu.dim() == 1 and len(cu) >= 2
        offsets = cu_seq_q.tolist()
        assert cu_seq_k.tolist() == offsets, "self-attention: cu_seq_k must equal cu_seq_q"
        assert offsets[0] == 0 and offsets[-1] == query.shape[0], offsets
        lengths = [b - a for a, b in pairwise(offsets)]
        assert min(lengths) >= 0, f"cu_seqlens: not monotone: {offsets}"
        for name, given in (("max_q", max_q), ("max_k", max_k)):
            assert type(given) is int and given == max(lengths), \
                f"{name}: expected the longest segment {max(lengths)}, got {given!r}"
        left, right = window
        self.calls.append(right == 0)
        self.windows.append(window)
        self.dtypes.append(query.dtype)

        scale = query.shape[-1] ** -0.5 if scale is None else scale
        outs = []
        for a, b in pairwise(offsets):
            if a == b:
                continue
            q, k, v = (x[a:b].transpose(0, 1) for x in (query, key, value))  # (h, n, d)
            k = k.repeat_interleave(q.shape[0] // k.shape[0], dim=0)
            v = v.repeat_interleave(q.shape[0] // v.shape[0], dim=0)
            scores = (q @ k.transpose(-2, -1)).float() * scale
            offset = torch.arange(b - a)[None, :] - torch.arange(b - a)[:, None]  # key - query
            outside = torch.zeros_like(offset, dtype=torch.bool)
            if left >= 0:
                outside |= offset < -left
            if right >= 0:
                outside |= offset > right
            scores = scores.masked_fill(outside, float("-inf"))
            outs.append((scores.softmax(-1).to(v.dtype) @ v).transpose(0, 1))  # (n, h, d)
        return torch.cat(outs) if outs else query.new_zeros(query.shape)


@pytest.fixture
def varlen(monkeypatch):
    """``varlen(style)``: the reference installed as torch's varlen_attn (looked up afresh by
    the module's loader) and the varlen branch forced on; returns the reference."""

    def install(style: str = "2.13") -> ReferenceVarlen:
        reference = ReferenceVarlen(style)
        torch_varlen = pytest.importorskip("torch.nn.attention.varlen")
        monkeypatch.setattr(torch_varlen, "varlen_attn", reference.function)
        monkeypatch.setattr(multihead, "_varlen", {})  # forget the real kernel
        monkeypatch.setattr(multihead, "can_use_varlen", lambda *args, **kwargs: True)
        return reference

    return install


def masks() -> dict[str, torch.Tensor]:
    """(4, 7) padding masks, True at padding."""
    right = torch.zeros(4, 7, dtype=torch.bool)
    right[0, 5:] = right[1, 3:] = right[3, 1:] = True
    left = torch.zeros(4, 7, dtype=torch.bool)
    left[0, :2] = left[1, :5] = left[2, :1] = True
    ragged = torch.zeros(4, 7, dtype=torch.bool)  # right, left, a hole, an empty row
    ragged[0, 5:] = True
    ragged[1, :2] = True
    ragged[2, 3] = True
    ragged[3] = True
    return {"right": right, "left": left, "ragged": ragged,
            "all_empty": torch.ones(4, 7, dtype=torch.bool)}


MASKS = list(masks())
STYLES = ["2.13", "2.11", "2.10"]


def forward_backward(module, x, run):
    """``run(module, x)``'s output and the gradients of x and every parameter (seeded
    upstream gradient, so padding positions count as zero there)."""
    module.zero_grad(set_to_none=True)
    x = x.detach().requires_grad_()
    out = run(module, x)
    out.backward(torch.linspace(-1, 1, out.numel()).reshape(out.shape))
    grads = {"x": x.grad.clone()}
    grads.update({name: p.grad.clone() if p.grad is not None else torch.zeros_like(p)
                  for name, p in module.named_parameters()})
    return out.detach(), grads


def packed_mha(is_causal):
    def run(module, x):
        packing = run.packing
        out, _ = module(packing.pack(x), packing=packing, is_causal=is_causal)
        return out
    return run


def check_varlen_equals_padded(varlen, style, module, mask, run, is_causal):
    torch.manual_seed(0)
    x = torch.randn(*mask.shape, D)
    padded_out, padded_grads = forward_backward(module, x, run)
    reference = varlen(style)
    varlen_out, varlen_grads = forward_backward(module, x, run)
    assert_close(varlen_out, padded_out)
    for name in padded_grads:
        assert_close(varlen_grads[name], padded_grads[name], msg=name)
    return reference


@pytest.mark.parametrize("style", STYLES)
@pytest.mark.parametrize("is_causal", [False, True])
@pytest.mark.parametrize("mask_name", MASKS)
def test_multihead_on_the_varlen_branch_equals_the_padded_path(varlen, style, is_causal,
                                                               mask_name):
    mask = masks()[mask_name]
    torch.manual_seed(1)
    module = MultiHeadAttention(D, H, bias=True)
    run = packed_mha(is_causal)
    run.packing = Packing.from_mask(mask)
    reference = check_varlen_equals_padded(varlen, style, module, mask, run, is_causal)
    # Forward once; a batch of padding only has nothing to attend and skips the kernel.
    assert reference.calls == ([] if mask_name == "all_empty" else [is_causal])


@pytest.mark.parametrize("kind, layers", [("layer", 1), ("encoder", 2)])
@pytest.mark.parametrize("is_causal", [False, True])
@pytest.mark.parametrize("mask_name", MASKS)
def test_encoder_layer_and_encoder_on_the_varlen_branch_equal_the_padded_path(
        varlen, kind, layers, is_causal, mask_name):
    mask = masks()[mask_name]
    torch.manual_seed(2)
    module = EncoderLayer(D, H, 32, dropout=0.0) if kind == "layer" else \
        Encoder(D, H, layers, d_ff=32, dropout=0.0)

    def run(module, x):
        return module(x, key_padding_mask=mask, is_causal=is_causal)

    reference = check_varlen_equals_padded(varlen, "2.13", module, mask, run, is_causal)
    assert reference.calls == ([] if mask_name == "all_empty" else [is_causal] * layers)


def test_varlen_branch_in_bfloat16_is_close_to_the_padded_path(varlen):
    """The dtype the kernel really runs in: q/k/v reach it in bf16 and come back in bf16."""
    mask = masks()["ragged"]
    torch.manual_seed(3)
    module = MultiHeadAttention(D, H).to(torch.bfloat16)
    x = torch.randn(*mask.shape, D, dtype=torch.bfloat16)
    packing = Packing.from_mask(mask)
    padded, _ = module(packing.pack(x), packing=packing, is_causal=True)
    reference = varlen()
    got, _ = module(packing.pack(x), packing=packing, is_causal=True)
    assert reference.dtypes == [torch.bfloat16] and got.dtype == torch.bfloat16
    assert_close(got, padded, atol=2e-2, rtol=2e-2)


# ---------------------------------------------------------- the release's causal keyword


@pytest.mark.parametrize("style, keyword", [("2.13", "window_size"), ("2.11", "window_size"),
                                            ("2.10", "is_causal")])
def test_the_causal_window_takes_the_keyword_the_signature_has(style, keyword):
    fake = ReferenceVarlen(style).function
    assert multihead._causal_window_keyword(fake) == keyword
    assert multihead._causal_window(keyword, True) == \
        ({"window_size": (-1, 0)} if keyword == "window_size" else {"is_causal": True})
    assert multihead._causal_window(keyword, False) == \
        ({"window_size": (-1, -1)} if keyword == "window_size" else {"is_causal": False})


def test_the_installed_torch_takes_window_size():
    """torch 2.11 and 2.13 (the GPU machine's and this one's) both declare window_size."""
    torch_varlen = pytest.importorskip("torch.nn.attention.varlen")
    assert "window_size" in inspect.signature(torch_varlen.varlen_attn).parameters
    assert multihead._causal_window_keyword(torch_varlen.varlen_attn) == "window_size"


def test_a_varlen_without_either_keyword_is_a_clear_error(monkeypatch):
    def future_varlen(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, mask_mod=None):
        raise AssertionError("not to be called")

    torch_varlen = pytest.importorskip("torch.nn.attention.varlen")
    monkeypatch.setattr(torch_varlen, "varlen_attn", future_varlen)
    monkeypatch.setattr(multihead, "_varlen", {})
    with pytest.raises(RuntimeError, match=r"takes neither window_size= .* nor is_causal= .*"
                                           r"'mask_mod'"):
        multihead._load_varlen()
    mask = masks()["ragged"]
    packing = Packing.from_mask(mask)
    monkeypatch.setattr(multihead, "can_use_varlen", lambda *args, **kwargs: True)
    with pytest.raises(RuntimeError, match="takes neither"):
        MultiHeadAttention(D, H)(packing.pack(torch.randn(4, 7, D)), packing=packing)


def test_a_torch_without_varlen_keeps_the_padded_path(monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.nn.attention.varlen", None)  # import fails
    monkeypatch.setattr(multihead, "_varlen", {})
    cuda, bf16 = torch.device("cuda"), torch.bfloat16
    with mock.patch("torch.cuda.get_device_capability", return_value=(9, 0)):
        assert not can_use_varlen(cuda, bf16, 64, masked=False, dropout_p=0.0, rotary=False)
    assert multihead._varlen == {"kernel": None}


# ------------------------------------------------------------- when the branch is taken


def test_can_use_varlen_conditions(monkeypatch):
    monkeypatch.setattr(multihead, "_varlen", {})
    cuda, bf16, fp16 = torch.device("cuda", 0), torch.bfloat16, torch.float16
    plain = dict(masked=False, dropout_p=0.0, rotary=False)
    with mock.patch("torch.cuda.get_device_capability", return_value=(9, 0)) as capability:
        assert can_use_varlen(cuda, bf16, 64, **plain)
        assert can_use_varlen(cuda, fp16, 256, **plain)
        assert capability.call_args.args == (cuda,)  # asked of this device
        for device, dtype, d_head, extra in [
                (torch.device("cpu"), bf16, 64, {}), (cuda, torch.float32, 64, {}),
                (cuda, bf16, 12, {}), (cuda, bf16, 264, {}), (cuda, bf16, 64, {"masked": True}),
                (cuda, bf16, 64, {"dropout_p": 0.1}), (cuda, bf16, 64, {"rotary": True})]:
            assert not can_use_varlen(device, dtype, d_head, **{**plain, **extra}), \
                (device, dtype, d_head, extra)
        for backend in ("explicit", "math", "flash"):
            with attention_backend(backend):
                assert not can_use_varlen(cuda, bf16, 64, **plain)
    for major, expected in ((7, False), (8, True), (10, True)):  # T4/V100, A100, Blackwell
        with mock.patch("torch.cuda.get_device_capability", return_value=(major, 0)):
            assert can_use_varlen(cuda, bf16, 64, **plain) is expected


@pytest.fixture
def fresh_dynamo():
    """torch.compile's caches emptied before and after: compiled frames of the same code
    (Encoder.forward) would otherwise carry over between tests and change how later
    compilations specialise."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def test_the_cpu_path_never_loads_the_kernel(monkeypatch, fresh_dynamo):
    """On the CPU, eager and compiled, can_use_varlen answers before the loader is asked."""
    def refuse():
        raise AssertionError("the varlen kernel was looked up on the CPU")

    monkeypatch.setattr(multihead, "_load_varlen", refuse)
    torch.manual_seed(4)
    mask = masks()["ragged"]
    for dtype in (torch.float32, torch.bfloat16):
        encoder = Encoder(D, H, 1, d_ff=32, dropout=0.0).to(dtype)
        x = torch.randn(*mask.shape, D, dtype=dtype)
        expected = encoder(x, key_padding_mask=mask)
        got = torch.compile(encoder, fullgraph=True, backend="eager")(x, key_padding_mask=mask)
        assert_close(got, expected)


def test_the_varlen_branch_compiles(varlen, fresh_dynamo):
    """Compiled (graph breaks allowed: the packing's sizes are data-dependent), the branch
    looks the kernel up as eager code does, the first time included, with the same result."""
    mask = masks()["ragged"]
    torch.manual_seed(6)
    encoder = Encoder(D, H, 1, d_ff=32, dropout=0.0)
    x = torch.randn(*mask.shape, D)
    reference = varlen()
    expected = encoder(x, key_padding_mask=mask, is_causal=True)
    multihead._varlen.clear()  # the compiled call looks it up first
    got = torch.compile(encoder, backend="aot_eager")(x, key_padding_mask=mask, is_causal=True)
    assert_close(got, expected)
    assert reference.calls == [True, True]


def test_import_attention_does_not_import_the_varlen_module_or_dynamo():
    code = ("import sys, attention; "
            "print(sorted(m for m in ('torch.nn.attention.varlen', 'torch._dynamo') "
            "if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=True)
    assert done.stdout.strip() == "[]", done.stdout + done.stderr


# --------------------------------------------------------------- Hopper kernel priority


def hopper_priority() -> list[SDPBackend]:
    with mock.patch("torch.cuda.get_device_capability", return_value=(9, 0)):
        priority = sdpa_priority(torch.device("cuda", 0))
    assert priority is not None and priority[0] == SDPBackend.CUDNN_ATTENTION
    return priority


def attend_cases():
    torch.manual_seed(5)
    q, k, v = (torch.randn(2, H, 5, 8) for _ in range(3))
    padding = torch.tensor([[False] * 5, [False] * 3 + [True] * 2])
    return q, k, v, [{}, {"is_causal": True}, {"key_padding_mask": padding},
                     {"key_padding_mask": padding, "is_causal": True}]


def test_hopper_priority_context_on_the_cpu_gives_the_explicit_result():
    """torch's context, as functional.py enters it on Hopper, around attend on the CPU."""
    priority = hopper_priority()
    q, k, v, cases = attend_cases()
    before = torch._C._get_sdp_priority_order()
    for kwargs in cases:
        with attention_backend("explicit"):
            expected, _ = attend(q, k, v, **kwargs)
        with sdpa_kernel(priority, set_priority=True):
            assert torch._C._get_sdp_priority_order()[0] == int(SDPBackend.CUDNN_ATTENTION)
            got, _ = attend(q, k, v, **kwargs)
        assert_close(got, expected)
    assert torch._C._get_sdp_priority_order() == before


def test_attend_enters_the_hopper_priority_and_gives_the_explicit_result(monkeypatch):
    """attend's own context choice, told that this (CPU) device is a Hopper GPU: the fused
    call runs with cuDNN first in torch's priority and gives the explicit path's result."""
    priority = hopper_priority()
    monkeypatch.setattr(functional, "sdpa_priority", lambda device: priority)
    seen = []
    sdpa = F.scaled_dot_product_attention

    def spy(*args, **kwargs):
        seen.append(torch._C._get_sdp_priority_order()[0])
        return sdpa(*args, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", spy)
    q, k, v, cases = attend_cases()
    for kwargs in cases:
        with attention_backend("explicit"):
            expected, _ = attend(q, k, v, **kwargs)
        got, _ = attend(q, k, v, **kwargs)
        assert_close(got, expected)
    assert seen == [int(SDPBackend.CUDNN_ATTENTION)] * len(cases)


# ------------------------------------------------- windows, grouped heads, documents


@pytest.mark.parametrize("is_causal", [False, True])
@pytest.mark.parametrize("style, kwargs", [
    ("2.13", dict(window=(2, 1))), ("2.11", dict(window=2)),
    ("2.13", dict(n_kv_heads=1)), ("2.13", dict(n_kv_heads=1, window=(1, 3), qk_norm=True)),
])
@pytest.mark.parametrize("mask_name", ["right", "left", "ragged"])
def test_windows_and_grouped_heads_on_the_varlen_branch_equal_the_padded_path(
        varlen, style, kwargs, is_causal, mask_name):
    """The kernel counts a window's positions among the real tokens; with padding inside a
    sequence (the ragged mask's hole) those are not the row's, so a windowed module keeps
    the padded layout there."""
    mask = masks()[mask_name]
    torch.manual_seed(5)
    module = MultiHeadAttention(D, H, **kwargs)
    run = packed_mha(is_causal)
    run.packing = Packing.from_mask(mask)
    reference = check_varlen_equals_padded(varlen, style, module, mask, run, is_causal)
    window = module.window
    expected = (-1, 0 if is_causal else -1) if window is None else \
        (window[0], 0 if is_causal else window[1])
    hole = mask_name == "ragged"
    assert reference.windows == ([] if hole and window is not None else [expected])
    assert run.packing.contiguous is not hole


@pytest.mark.parametrize("is_causal", [False, True])
def test_documents_on_the_varlen_branch_pass_their_boundaries(varlen, is_causal):
    """Packed documents reach the kernel as cu_seqlens and give the padded path's result."""
    torch.manual_seed(6)
    encoder = Encoder(D, H, 2, d_ff=32, dropout=0.0, positional="sinusoidal", n_kv_heads=1,
                      window=3)
    ids = torch.tensor([[0, 0, 0, 1, 1, 2, 2], [4, 4, 4, 4, 4, 5, 5], [3, 3, 3, 3, 3, 3, 3],
                        [1, 2, 3, 4, 5, 6, 7]])
    padding = masks()["right"]

    def run(module, x):
        return module(x, key_padding_mask=padding, document_ids=ids, is_causal=is_causal)

    reference = check_varlen_equals_padded(varlen, "2.13", encoder, padding, run, is_causal)
    assert len(reference.calls) == 2


def test_can_use_varlen_asks_what_the_kernel_takes(monkeypatch):
    """A window needs window_size (2.11+), grouped heads enable_gqa (2.13); ALiBi and a
    softcap never run on the kernel."""
    torch_varlen = pytest.importorskip("torch.nn.attention.varlen")
    cuda, bf16 = torch.device("cuda", 0), torch.bfloat16
    plain = dict(masked=False, dropout_p=0.0, rotary=False)
    expected = {"2.13": (True, True), "2.11": (True, False), "2.10": (False, False)}
    with mock.patch("torch.cuda.get_device_capability", return_value=(9, 0)):
        for style, (window, grouped) in expected.items():
            monkeypatch.setattr(torch_varlen, "varlen_attn", ReferenceVarlen(style).function)
            monkeypatch.setattr(multihead, "_varlen", {})
            assert can_use_varlen(cuda, bf16, 64, **plain, window=True) is window, style
            assert can_use_varlen(cuda, bf16, 64, **plain, grouped=True) is grouped, style
            assert not can_use_varlen(cuda, bf16, 64, **plain, scores_changed=True)


@pytest.mark.parametrize("is_causal", [False, True])
def test_an_unpadded_windowed_batch_runs_on_the_varlen_kernel(varlen, is_causal):
    """On a GPU with the kernel, a dense windowed self-attention is handed to varlen_attn's
    window_size, each row a sequence; the result is the blocked/padded path's."""
    torch.manual_seed(7)
    module = MultiHeadAttention(D, H, window=(3, 2), n_kv_heads=1)

    def run(module, x):
        return module(x, is_causal=is_causal)[0]

    mask = torch.zeros(3, 9, dtype=torch.bool)
    reference = check_varlen_equals_padded(varlen, "2.13", module, mask, run, is_causal)
    assert reference.windows == [(3, 0 if is_causal else 2)]


def test_the_dense_varlen_route_stays_out_of_compiled_and_exported_graphs(varlen, fresh_dynamo):
    """Under torch.compile and torch.export a windowed module takes the blocked path (traced
    and tested) even where the kernel would serve it eagerly: fullgraph holds."""
    torch.manual_seed(8)
    module = MultiHeadAttention(D, H, window=3).eval()
    x = torch.randn(2, 20, D)
    with torch.no_grad():
        expected = module(x)[0]  # the CPU's path, before the stand-in is installed
        reference = varlen()
        compiled = torch.compile(module, fullgraph=True, backend="eager")(x)[0]
        exported = torch.export.export(module, (x,)).module()(x)[0]
        assert reference.calls == []  # neither graph called the kernel
        eager = module(x)[0]
    assert reference.calls == [False]  # eagerly, the kernel serves it
    for got in (compiled, exported, eager):
        assert_close(got, expected)
