"""flexnsa: DeepSeek's Native Sparse Attention on FlexAttention and Triton.

Public API:
    NSAConfig          hyper-parameters (paper defaults)
    nsa_attention      the three gated branches, ``[B, HQ, T, Dv]``
    select_blocks      top-n block indices, ``int32 [B, HKV, T, n]``
    reference          the pure-PyTorch definition every backend is tested against
"""

from . import reference
from .config import NSAConfig
from .functional import nsa_attention, select_blocks

__all__ = ["NSAConfig", "nsa_attention", "select_blocks", "reference"]
__version__ = "0.1.0"
