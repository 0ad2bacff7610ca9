"""Self-attention building blocks and a Transformer stack for PyTorch.

The public API, re-exported from the module that defines each piece.
"""

from .decoding import beam_search, greedy_search
from .functional import attend, causal_mask
from .layers import DecoderLayer, EncoderLayer, FeedForward
from .models import Decoder, DecoderCache, Encoder, Transformer
from .multihead import KVCache, MultiHeadAttention
from .positional import LearnedPositionalEncoding, RotaryEmbedding, SinusoidalPositionalEncoding

__all__ = [
    "Decoder",
    "DecoderCache",
    "DecoderLayer",
    "Encoder",
    "EncoderLayer",
    "FeedForward",
    "KVCache",
    "LearnedPositionalEncoding",
    "MultiHeadAttention",
    "RotaryEmbedding",
    "SinusoidalPositionalEncoding",
    "Transformer",
    "attend",
    "beam_search",
    "causal_mask",
    "greedy_search",
]

__version__ = "0.1.0"
