"""flexnsa: DeepSeek's Native Sparse Attention on FlexAttention and Triton.

Public API:
    NSAConfig                 hyper-parameters (paper defaults)
    nsa_attention             the three gated branches, ``[B, HQ, T, Dv]``
    select_blocks             top-n block indices, ``int32 [B, HKV, T, n]``
    compressed_attention      branch 1 on FlexAttention (optionally with its log-sum-exp)
    sliding_window_attention  branch 3 on FlexAttention
    reference                 the pure-PyTorch definition every backend is tested against
    masks, custom_ops         FlexAttention patterns; the Triton ops of the selection branch
"""

from . import reference
from .config import NSAConfig
from .flex_branches import compressed_attention, sliding_window_attention
from .functional import nsa_attention, select_blocks

__all__ = [
    "NSAConfig",
    "nsa_attention",
    "select_blocks",
    "compressed_attention",
    "sliding_window_attention",
    "reference",
]
__version__ = "0.1.0"
