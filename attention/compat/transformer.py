"""``torch.nn.Transformer``: an encoder-decoder of the compat layers, torch.nn's arguments."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..layers import layer_norm
from .decoder import TransformerDecoder, TransformerDecoderLayer
from .encoder import TransformerEncoder, TransformerEncoderLayer
from .errors import InvalidInputError, InvalidTypeError, torch_errors
from .twins import TORCH_CLASSES, check_exact_type, convert_part, copy_into, twin_of

__all__ = ["Transformer"]


@twin_of(TORCH_CLASSES["Transformer"])
class Transformer(nn.Module):
    """``torch.nn.Transformer``: same arguments, defaults, parameters and forward.

    ``encoder`` is a :class:`TransformerEncoder` and ``decoder`` a
    :class:`TransformerDecoder`, each with a final LayerNorm, unless ``custom_encoder`` or
    ``custom_decoder`` replace them. For decoding token by token, encode once and run
    ``decoder`` with a cache::

        memory = model.encoder(src)
        cache = model.decoder.new_cache()
        out = model.decoder(tgt_new, memory, cache=cache)  # only the new positions
    """

    @torch_errors
    def __init__(
        self,
        d_model: int = 512,
        nhead: int = 8,
        num_encoder_layers: int = 6,
        num_decoder_layers: int = 6,
        dim_feedforward: int = 2048,
        dropout: float = 0.1,
        activation: str | Callable[[Tensor], Tensor] = F.relu,
        custom_encoder: nn.Module | None = None,
        custom_decoder: nn.Module | None = None,
        layer_norm_eps: float = 1e-5,
        batch_first: bool = False,
        norm_first: bool = False,
        bias: bool = True,
        device: Any = None,
        dtype: Any = None,
    ) -> None:
        factory = {"device": device, "dtype": dtype}
        super().__init__()
        layer_args = (d_model, nhead, dim_feedforward, dropout, activation, layer_norm_eps,
                      batch_first, norm_first, bias)
        if custom_encoder is not None:
            self.encoder = custom_encoder
        else:
            self.encoder = TransformerEncoder(
                TransformerEncoderLayer(*layer_args, **factory), num_encoder_layers,
                layer_norm(d_model, layer_norm_eps, bias, **factory))
        if custom_decoder is not None:
            self.decoder = custom_decoder
        else:
            self.decoder = TransformerDecoder(
                TransformerDecoderLayer(*layer_args, **factory), num_decoder_layers,
                layer_norm(d_model, layer_norm_eps, bias, **factory))
        self._reset_parameters()
        self.d_model = d_model
        self.nhead = nhead
        self.batch_first = batch_first

    def _reset_parameters(self) -> None:
        """torch.nn's: Xavier-uniform every matrix, in parameter order."""
        for p in self.parameters():
            if p.dim() > 1:
                nn.init.xavier_uniform_(p)

    @classmethod
    def from_torch(cls, module: nn.Transformer) -> Transformer:
        """This class with the encoder and decoder (each converted, or copied if it is a
        custom one), weights, mode and ``requires_grad`` of ``module``, a
        ``torch.nn.Transformer`` (exactly)."""
        check_exact_type("module", module, cls.torch_class)
        return _rebuild(module, cls)

    def to_torch(self) -> nn.Transformer:
        """The ``torch.nn.Transformer`` with this model's encoder, decoder and weights."""
        return _rebuild(self, self.torch_class)

    def forward(
        self,
        src: Tensor,
        tgt: Tensor,
        src_mask: Tensor | None = None,
        tgt_mask: Tensor | None = None,
        memory_mask: Tensor | None = None,
        src_key_padding_mask: Tensor | None = None,
        tgt_key_padding_mask: Tensor | None = None,
        memory_key_padding_mask: Tensor | None = None,
        src_is_causal: bool | None = None,
        tgt_is_causal: bool | None = None,
        memory_is_causal: bool = False,
    ) -> Tensor:
        """Shape: src ``(S, N, E)``, tgt ``(T, N, E)`` (batch first if ``batch_first``, or
        unbatched ``(S, E)``, ``(T, E)``); src_mask ``(S, S)``; tgt_mask ``(T, T)``;
        memory_mask ``(T, S)``; the key padding masks ``(N, S)``, ``(N, T)``, ``(N, S)``.
        Returns ``(T, N, E)``. Masks: boolean ``True`` = may not attend, float = added."""
        for name, x in (("src", src), ("tgt", tgt)):
            if not isinstance(x, Tensor):
                raise InvalidTypeError(f"{name}: expected a Tensor, got {type(x).__name__}")
        batch_dim = 0 if self.batch_first else 1
        if src.dim() == 3 and (tgt.dim() != 3 or src.shape[batch_dim] != tgt.shape[batch_dim]):
            raise InvalidInputError(
                f"the batch number of src and tgt must be equal: tgt: expected batch "
                f"{src.shape[batch_dim]} (dimension {batch_dim}, as in src), got shape "
                f"{tuple(tgt.shape)}")
        if src.shape[-1] != self.d_model or tgt.shape[-1] != self.d_model:
            raise InvalidInputError(
                f"the feature number of src and tgt must be equal to d_model: expected "
                f"{self.d_model}, got src {src.shape[-1]} and tgt {tgt.shape[-1]}")
        memory = self.encoder(src, mask=src_mask, src_key_padding_mask=src_key_padding_mask,
                              is_causal=src_is_causal)
        return self.decoder(tgt, memory, tgt_mask=tgt_mask, memory_mask=memory_mask,
                            tgt_key_padding_mask=tgt_key_padding_mask,
                            memory_key_padding_mask=memory_key_padding_mask,
                            tgt_is_causal=tgt_is_causal, memory_is_causal=memory_is_causal)

    @staticmethod
    def generate_square_subsequent_mask(sz: int, device: Any = None, dtype: Any = None
                                        ) -> Tensor:
        """torch.nn's causal mask: ``(sz, sz)`` floats, ``-inf`` above the diagonal (the
        future, masked), ``0.0`` elsewhere."""
        return torch.triu(torch.full((sz, sz), float("-inf"), device=device,
                                     dtype=torch.get_default_dtype() if dtype is None else dtype),
                          diagonal=1)


def _rebuild(source: nn.Module, twin_class: type) -> nn.Module:
    encoder, decoder = convert_part(source.encoder), convert_part(source.decoder)
    twin = twin_class(source.d_model, source.nhead, custom_encoder=encoder,
                      custom_decoder=decoder, batch_first=source.batch_first)
    return copy_into(source, twin)  # the constructor re-initialised the custom parts
