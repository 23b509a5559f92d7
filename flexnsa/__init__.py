"""flexnsa: DeepSeek's Native Sparse Attention on FlexAttention and Triton.

Public API:
    NSAConfig                 hyper-parameters (paper defaults)
    nsa_attention             the three gated branches, ``[B, HQ, T, Dv]``
    select_blocks             top-n block indices, ``int32 [B, HKV, T, n]``
    compressed_attention      branch 1 on FlexAttention (optionally with its log-sum-exp)
    sliding_window_attention  branch 3 on FlexAttention
    reference                 the pure-PyTorch definition every backend is tested against
    Compressor                phi: raw K/V blocks -> compressed tokens (mlp, linear, mean)
    NativeSparseAttention     the attention layer (projections, RoPE, phi, gates, three branches)
    NSALanguageModel          a small decoder-only LM on it, with a full-attention switch
    NSACache, nsa_prefill, nsa_decode, nsa_decode_step, decode_select_blocks
                              decoding with a preallocated cache
    masks, custom_ops         FlexAttention patterns; the Triton ops of the selection branch
"""

from . import reference
from .cache import NSACache
from .compressor import Compressor
from .config import NSAConfig
from .decode import decode_select_blocks, nsa_decode, nsa_decode_step, nsa_prefill
from .flex_branches import compressed_attention, sliding_window_attention
from .functional import nsa_attention, select_blocks
from .model import NSALanguageModel
from .module import NativeSparseAttention
from .rope import RotaryEmbedding

__all__ = [
    "NSAConfig",
    "nsa_attention",
    "select_blocks",
    "compressed_attention",
    "sliding_window_attention",
    "reference",
    "Compressor",
    "NativeSparseAttention",
    "NSALanguageModel",
    "RotaryEmbedding",
    "NSACache",
    "nsa_prefill",
    "nsa_decode",
    "nsa_decode_step",
    "decode_select_blocks",
]
__version__ = "0.1.0"
