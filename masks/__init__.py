"""FlexAttention mask patterns (installed as ``flexnsa.masks``), one pattern per file.

Each pattern file gives a factory returning a :class:`MaskPattern` (a named ``mask_mod`` plus its
block tables in closed form), the bare ``*_mask_mod`` factory and a direct ``*_block_mask``
builder that never evaluates the ``O(Q_LEN * KV_LEN)`` mask. Draw any pattern with
``pattern.ascii(T)`` or ``pattern.png(path, T)``.

Patterns: :func:`causal`, :func:`sliding_window`, :func:`compressed_causal` (NSA branch 1:
``Q_LEN = T`` raw queries, ``KV_LEN = Tc`` compressed tokens), :func:`document` (packed sequences,
composes with every other pattern), :func:`prefix_lm`. Compose with ``&``.
"""

from .causal import causal, causal_block_mask, causal_mask_mod
from .compressed_causal import (
    compressed_causal,
    compressed_causal_block_mask,
    compressed_causal_mask_mod,
    num_compressed_tokens,
)
from .document import compressed_doc_ids, document, document_block_mask, document_mask_mod
from .draw import block_kinds, to_ascii, to_png
from .pattern import (
    DEFAULT_BLOCK_SIZE,
    MaskPattern,
    block_mask_from_tables,
    evaluate_mask_mod,
    interval_block_tables,
)
from .prefix_lm import prefix_lm, prefix_lm_block_mask, prefix_lm_mask_mod
from .sliding_window import sliding_window, sliding_window_block_mask, sliding_window_mask_mod

__all__ = [
    "MaskPattern",
    "DEFAULT_BLOCK_SIZE",
    "block_mask_from_tables",
    "interval_block_tables",
    "evaluate_mask_mod",
    "causal",
    "causal_mask_mod",
    "causal_block_mask",
    "sliding_window",
    "sliding_window_mask_mod",
    "sliding_window_block_mask",
    "compressed_causal",
    "compressed_causal_mask_mod",
    "compressed_causal_block_mask",
    "num_compressed_tokens",
    "document",
    "document_mask_mod",
    "document_block_mask",
    "compressed_doc_ids",
    "prefix_lm",
    "prefix_lm_mask_mod",
    "prefix_lm_block_mask",
    "to_ascii",
    "to_png",
    "block_kinds",
]
