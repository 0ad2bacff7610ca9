"""Dynamic int8 quantization of a model's ``nn.Linear`` layers, for inference on the CPU.

``quantize_dynamic(model)`` returns a copy whose ``nn.Linear`` layers hold int8 weights
(one scale per tensor) and quantize their inputs on the fly, batch by batch; everything
else (embeddings, norms, attention's softmax) stays float32. On a CPU the matrix products,
which are most of a Transformer's time, then run in int8 with float32 outputs. The
application's (``attention-translate --int8``, ``benchmarks/int8_quality.py``): the library
quantizes nothing itself, and runs quantized layers as their own forward.

    from attention.translation.quantization import quantize_dynamic

    int8_model = quantize_dynamic(model)   # model: float32, on the CPU
    int8_model.generate(src_ids, 64, bos_id, eos_id)

:class:`~attention.multihead.MultiHeadAttention` fuses q/k/v into one matmul, and
:func:`~attention.inference.prepared_for_inference` packs weights for decoding, only for plain
``nn.Linear`` layers; quantized ones run their own forward (q, k and v one after the other).
"""

from __future__ import annotations

import copy

import torch
from torch import nn

__all__ = ["DTYPES", "quantize_dynamic"]

# The weight types this module quantizes to, by name: the one source of the choices.
DTYPES = {"int8": torch.qint8}


def quantize_dynamic(model: nn.Module, *, dtype: str = "int8", inplace: bool = False
                     ) -> nn.Module:
    """``model`` with every ``nn.Linear`` replaced by a dynamically quantized one, in
    evaluation mode.

    A wrapper of ``torch.ao.quantization.quantize_dynamic(model, {nn.Linear},
    dtype=torch.qint8)``. torch deprecates that API in favour of torchao and says so on
    every call (a ``DeprecationWarning`` and a ``UserWarning``, left as torch raises them);
    it still works on torch 2.13. torchao 0.18's ``Int8DynamicActivationInt8WeightConfig``
    decoded Multi30k slower than float32 on the CPU (0.74× greedy, 0.86× beam 4, where
    this ran 1.34× and 1.21×; eager, one thread: ``benchmarks/NOTES.md``), so this stays
    on ``torch.ao`` while torch keeps it.

    For inference only: the int8 weights are constants, not parameters, and have no
    gradient, so the result is returned in evaluation mode (no dropout) whatever the mode
    of ``model``. Only layers whose type is exactly ``nn.Linear`` are replaced (subclasses
    keep float32). Dynamic int8 kernels run on the CPU only.

    With ``tie_embeddings``, ``lm_head.weight`` is ``tgt_embed.weight``; quantizing
    ``lm_head`` unties them: the head gets its own int8 copy and the embedding stays
    float32. That changes nothing for inference; do not train or save the result as if
    they were still tied.

    Args:
        model: a float32 model on the CPU.
        dtype: the weights' type, one of :data:`DTYPES`.
        inplace: replace the layers in ``model`` itself (and set it to evaluation mode)
            instead of a deep copy; ``model`` is left untouched otherwise.

    Raises:
        TypeError: ``model`` is not an ``nn.Module``.
        ValueError: an unknown ``dtype``; a parameter or buffer of ``model`` not on the
            CPU; an ``nn.Linear`` whose weight is not float32.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected an nn.Module, got {type(model).__name__}")
    if dtype not in DTYPES:
        raise ValueError(f"dtype: expected one of {list(DTYPES)}, got {dtype!r}")
    _check_on_cpu(model)
    _check_float32_linears(model)
    if not inplace:
        model = copy.deepcopy(model)
    torch.ao.quantization.quantize_dynamic(model, {nn.Linear}, dtype=DTYPES[dtype],
                                           inplace=True)
    return model.eval()


def _check_on_cpu(model: nn.Module) -> None:
    for name, tensor in (*model.named_parameters(), *model.named_buffers()):
        if tensor.device.type != "cpu":
            raise ValueError(f"model: expected a model on the CPU (dynamic int8 kernels are "
                             f"CPU only), got {name!r} on {tensor.device}; move it with "
                             f"model.cpu() first")


def _check_float32_linears(model: nn.Module) -> None:
    for name, module in model.named_modules():
        if type(module) is nn.Linear and module.weight.dtype != torch.float32:
            raise ValueError(f"model: expected float32 nn.Linear weights (dynamic int8 "
                             f"quantization reads float32), got {module.weight.dtype} in "
                             f"{name!r}; convert it with model.float() first")
