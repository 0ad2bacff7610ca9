"""The README's claim that ``torch.export`` works, checked, and an ONNX export run.

Each module is exported once, at ``EXPORT_SHAPE``, with the batch and the lengths dynamic,
then the exported program runs on ``NEW_SHAPES`` (every size different from the traced
one) and must give the eager module's outputs (eval mode, ``atol=1e-5``).

Batch and length dimensions have ``min=2``: export specialises sizes 0 and 1, so a
dimension allowed to be 1 would be fixed at the traced size. Lengths have no maximum: the
sinusoidal encoding computes its table on the fly while exporting, so an exported Encoder
takes lengths past ``max_len`` as eager does.

A boolean ``key_padding_mask`` makes the Encoder pack the real tokens
(:mod:`attention.packing`): the number of real tokens is data-dependent, an unbacked size
in the exported graph, which export handles; the tests run it on new padding patterns.

The ONNX test (``torch.onnx.export(..., dynamo=True)`` run with onnxruntime) needs the
``export`` extra (onnx, onnxscript, onnxruntime) and is skipped where it is absent.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest
import torch
from torch import Tensor, nn
from torch.export import Dim
from torch.testing import assert_close

from attention import Decoder, Encoder, compat

D, HEADS, FF, LAYERS, MAX_LEN = 32, 4, 64, 2, 64
EXPORT_SHAPE = (3, 7)  # (batch, length) the programs are traced at
NEW_SHAPES = [(5, 11), (2, 3)]  # and run at: larger and smaller, batch and length
MEMORY_EXTRA = 3  # decoders: memory is this much longer than the target, a dimension apart

Inputs = tuple[tuple[Tensor, ...], dict[str, Any]]


@dataclass
class Case:
    """A module in eval mode, its inputs at a ``(batch, length)`` and the ``dynamic_shapes``
    of those inputs (by argument name, as ``torch.export.export`` takes them)."""

    module: nn.Module
    inputs: Callable[[int, int], Inputs]
    dynamic_shapes: dict[str, Any]


def batch_dim() -> Dim:
    return Dim("batch", min=2)


def length_dim(name: str = "length") -> Dim:
    return Dim(name, min=2)


def padding(batch: int, length: int) -> Tensor:
    """``(batch, length)`` bool, ``True`` at padding: row ``i`` ends in ``i % 3`` padded
    positions, so rows differ and every row keeps a real first token."""
    mask = torch.zeros(batch, length, dtype=torch.bool)
    for row in range(batch):
        mask[row, length - row % 3:] = True
    return mask


def float_padding(batch: int, length: int) -> Tensor:
    return torch.zeros(batch, length).masked_fill(padding(batch, length), float("-inf"))


def sequence(batch: int, length: int, batch_first: bool) -> Tensor:
    return torch.randn(batch, length, D) if batch_first else torch.randn(length, batch, D)


# ------------------------------------------------------------------ the modules exported


def encoder(mask: str | None = None, positional: str = "sinusoidal") -> Case:
    torch.manual_seed(0)
    module = Encoder(D, HEADS, LAYERS, d_ff=FF, positional=positional, max_len=MAX_LEN).eval()
    batch, length = batch_dim(), length_dim()
    make_mask = {None: None, "bool": padding, "float": float_padding}[mask]

    def inputs(b: int, n: int) -> Inputs:
        kwargs = {} if make_mask is None else {"key_padding_mask": make_mask(b, n)}
        return (torch.randn(b, n, D),), kwargs

    shapes = {"x": {0: batch, 1: length}}
    if mask is not None:
        shapes["key_padding_mask"] = {0: batch, 1: length}
    return Case(module, inputs, shapes)


def compat_encoder(batch_first: bool, masked: bool) -> Case:
    torch.manual_seed(0)
    layer = compat.TransformerEncoderLayer(D, HEADS, FF, batch_first=batch_first)
    module = compat.TransformerEncoder(layer, num_layers=LAYERS).eval()
    batch, length = batch_dim(), length_dim()
    batch_axis, length_axis = (0, 1) if batch_first else (1, 0)

    def inputs(b: int, n: int) -> Inputs:
        kwargs = {"src_key_padding_mask": padding(b, n)} if masked else {}
        return (sequence(b, n, batch_first),), kwargs

    shapes = {"src": {batch_axis: batch, length_axis: length}}
    if masked:
        shapes["src_key_padding_mask"] = {0: batch, 1: length}
    return Case(module, inputs, shapes)


def compat_decoder(batch_first: bool, padded: bool, causal_hint: bool) -> Case:
    """torch.nn's decoder call: a causal ``tgt_mask`` from
    ``nn.Transformer.generate_square_subsequent_mask`` (float, ``-inf`` above the diagonal),
    with or without ``tgt_is_causal=True`` and the two padding masks. Without the hint
    torch.nn's own decoder does not export: it compares the mask with a causal one
    (``torch.equal``, a data-dependent branch)."""
    torch.manual_seed(0)
    layer = compat.TransformerDecoderLayer(D, HEADS, FF, batch_first=batch_first)
    module = compat.TransformerDecoder(layer, num_layers=LAYERS).eval()
    batch, tgt_length, memory_length = batch_dim(), length_dim("tgt"), length_dim("memory")
    batch_axis, length_axis = (0, 1) if batch_first else (1, 0)

    def inputs(b: int, n: int) -> Inputs:
        s = n + MEMORY_EXTRA
        kwargs: dict[str, Any] = {"tgt_mask": nn.Transformer.generate_square_subsequent_mask(n)}
        if padded:
            kwargs["tgt_key_padding_mask"] = padding(b, n)
            kwargs["memory_key_padding_mask"] = padding(b, s)
        if causal_hint:
            kwargs["tgt_is_causal"] = True
        return (sequence(b, n, batch_first), sequence(b, s, batch_first)), kwargs

    shapes: dict[str, Any] = {
        "tgt": {batch_axis: batch, length_axis: tgt_length},
        "memory": {batch_axis: batch, length_axis: memory_length},
        "tgt_mask": {0: tgt_length, 1: tgt_length},
    }
    if padded:
        shapes["tgt_key_padding_mask"] = {0: batch, 1: tgt_length}
        shapes["memory_key_padding_mask"] = {0: batch, 1: memory_length}
    if causal_hint:
        shapes["tgt_is_causal"] = None
    return Case(module, inputs, shapes)


def decoder(padded: bool) -> Case:
    """The core Decoder (causal by default) against an encoder's memory."""
    torch.manual_seed(0)
    module = Decoder(D, HEADS, LAYERS, d_ff=FF, max_len=MAX_LEN).eval()
    batch = batch_dim()
    tgt_length, memory_length = length_dim("tgt"), length_dim("memory")

    def inputs(b: int, n: int) -> Inputs:
        s = n + MEMORY_EXTRA
        kwargs = ({"tgt_key_padding_mask": padding(b, n),
                   "memory_key_padding_mask": padding(b, s)} if padded else {})
        return (torch.randn(b, n, D), torch.randn(b, s, D)), kwargs

    shapes: dict[str, Any] = {"x": {0: batch, 1: tgt_length},
                              "memory": {0: batch, 1: memory_length}}
    if padded:
        shapes["tgt_key_padding_mask"] = {0: batch, 1: tgt_length}
        shapes["memory_key_padding_mask"] = {0: batch, 1: memory_length}
    return Case(module, inputs, shapes)


CASES = [
    pytest.param(lambda: encoder(), id="Encoder"),
    pytest.param(lambda: encoder("bool"), id="Encoder-bool-padding-packed"),
    pytest.param(lambda: encoder("float", "rotary"), id="Encoder-rotary-float-padding"),
    pytest.param(lambda: decoder(padded=False), id="Decoder"),
    pytest.param(lambda: decoder(padded=True), id="Decoder-padding"),
    pytest.param(lambda: compat_encoder(False, False), id="compat-encoder-seq-first"),
    pytest.param(lambda: compat_encoder(False, True), id="compat-encoder-seq-first-padding"),
    pytest.param(lambda: compat_encoder(True, False), id="compat-encoder-batch-first"),
    pytest.param(lambda: compat_encoder(True, True), id="compat-encoder-batch-first-padding"),
    pytest.param(lambda: compat_decoder(False, True, True),
                 id="compat-decoder-seq-first-padding"),
    pytest.param(lambda: compat_decoder(True, False, False),
                 id="compat-decoder-batch-first-no-hint"),
]


@pytest.mark.parametrize("build", CASES)
def test_exported_program_matches_eager_on_new_shapes(build):
    case = build()
    args, kwargs = case.inputs(*EXPORT_SHAPE)
    program = torch.export.export(case.module, args, kwargs, dynamic_shapes=case.dynamic_shapes)
    exported = program.module()
    for shape in NEW_SHAPES:
        args, kwargs = case.inputs(*shape)
        with torch.no_grad():
            assert_close(exported(*args, **kwargs), case.module(*args, **kwargs),
                         atol=1e-5, rtol=0)


def test_exported_encoder_takes_lengths_past_max_len():
    """The sinusoid table is precomputed for ``max_len`` positions; eager computes the
    positions beyond on the fly, and so must the exported program."""
    case = encoder()
    program = torch.export.export(case.module, *case.inputs(*EXPORT_SHAPE),
                                  dynamic_shapes=case.dynamic_shapes)
    exported = program.module()
    for length in (MAX_LEN, MAX_LEN + 5):
        x = torch.randn(2, length, D)
        with torch.no_grad():
            assert_close(exported(x), case.module(x), atol=1e-5, rtol=0)


# -------------------------------------------------------------------------------- ONNX


def import_onnx_stack():
    reason = "needs the export extra: pip install 'attention-blocks[export]'"
    for name in ("onnx", "onnxscript"):
        pytest.importorskip(name, reason=f"{name} is not installed ({reason})")
    return pytest.importorskip("onnxruntime",
                               reason=f"onnxruntime is not installed ({reason})")


@pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning")
@pytest.mark.parametrize("mask", [None, "bool"], ids=["plain", "bool-padding-packed"])
def test_onnx_export_of_encoder_runs_in_onnxruntime(tmp_path, mask):
    onnxruntime = import_onnx_stack()
    case = encoder(mask)
    args, kwargs = case.inputs(*EXPORT_SHAPE)
    path = tmp_path / "encoder.onnx"
    torch.onnx.export(case.module, args, str(path), kwargs=kwargs, dynamo=True,
                      dynamic_shapes=case.dynamic_shapes, verbose=False)
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    assert names == ["x", *kwargs]
    for shape in NEW_SHAPES:
        args, kwargs = case.inputs(*shape)
        feed = dict(zip(names, [t.numpy() for t in (*args, *kwargs.values())], strict=True))
        (out,) = session.run(None, feed)
        with torch.no_grad():
            expected = case.module(*args, **kwargs)
        assert_close(torch.from_numpy(out), expected, atol=1e-4, rtol=0)


@pytest.mark.parametrize("build", [
    lambda: Encoder(D, HEADS, LAYERS, d_ff=FF, dropout=0.0, max_len=MAX_LEN),
    lambda: compat.TransformerEncoder(compat.TransformerEncoderLayer(
        D, HEADS, FF, dropout=0.0, batch_first=True), LAYERS),
], ids=["Encoder", "compat.TransformerEncoder"])
@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning", "ignore::DeprecationWarning")
def test_jit_trace_as_torch_nn_users_do_matches_eager(build):
    """``torch.jit.trace`` (and the TorchScript ONNX exporter built on it, ``dynamo=False``)
    takes torch.nn's encoder, and ours: on new shapes, and the drop-in on new padding."""
    torch.manual_seed(0)
    module = build().eval()
    with torch.no_grad():
        traced = torch.jit.trace(module, (torch.randn(*EXPORT_SHAPE, D),))
        for batch, length in NEW_SHAPES:
            x = torch.randn(batch, length, D)
            assert_close(traced(x), module(x), atol=1e-5, rtol=1e-5)
        if isinstance(module, Encoder):  # its mask is keyword-only, which a trace cannot take
            return
        x = torch.randn(*EXPORT_SHAPE, D)
        padded = torch.zeros(EXPORT_SHAPE, dtype=torch.bool)
        padded[1, 5:] = True
        traced = torch.jit.trace(module, example_kwarg_inputs={"src": x,
                                                               "src_key_padding_mask": padded})
        padded[2, 2:] = True  # other rows, other counts of real tokens
        assert_close(traced(src=x, src_key_padding_mask=padded),
                     module(x, src_key_padding_mask=padded), atol=1e-5, rtol=1e-5)
