"""Triton kernels of NSA's selection branch, registered with torch.library (ops ``flexnsa::*``).

Public wrappers:
    select_blocks(q, k_cmp, lse, config, scale=None) -> int32 [B, HKV, T, n]
    selected_attention(q, k, v, indices, config, scale=None) -> (o [B, HQ, T, Dv], lse [B, HQ, T])
    gated_combine(o_cmp, o_slc, o_win, gates) -> o [B, HQ, T, Dv]   (NSA's gated sum, fused)
    selected_attention_gated(q, k, v, indices, o_cmp, o_win, gates, config, scale=None)
        -> (o [B, HQ, T, Dv], o_slc, lse)   (the selected branch with the gated sum in its epilogue)

Set ``FLEXNSA_TRITON_INTERPRET=1`` (or ``TRITON_INTERPRET=1``) before importing to run the Triton
kernels on the CPU in Triton's interpreter (tests, tiny shapes); otherwise CPU tensors take the
pure-PyTorch path.
"""

import os

if os.environ.get("FLEXNSA_TRITON_INTERPRET") == "1":  # must precede the @triton.jit decorations
    os.environ["TRITON_INTERPRET"] = "1"

from .api import select_blocks, selected_attention, selected_attention_gated  # noqa: E402
from .combine import gated_combine  # noqa: E402

__all__ = ["select_blocks", "selected_attention", "selected_attention_gated", "gated_combine"]
