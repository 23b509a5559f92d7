"""Compressed causal pattern (NSA branch 1): ``Q_LEN = T`` raw queries, ``KV_LEN = Tc`` compressed keys.

Compressed token ``i`` summarises raw tokens ``[i*d, i*d + l)``; query ``t`` sees it iff every one of
them is in the past: ``i*d + l - 1 <= t``, i.e. ``i <= floor((t - l + 1) / d)``. Queries ``t < l - 1``
see nothing. ``Tc(T) = 0 if T < l else (T - l) // d + 1``.
"""

from __future__ import annotations

import torch
from torch.nn.attention.flex_attention import BlockMask

from .pattern import DEFAULT_BLOCK_SIZE, MaskPattern, interval_block_tables, named

__all__ = [
    "compressed_causal",
    "compressed_causal_mask_mod",
    "compressed_causal_block_mask",
    "num_compressed_tokens",
]


def _check(cmp_block, cmp_stride) -> tuple[int, int]:
    for name, value in (("cmp_block", cmp_block), ("cmp_stride", cmp_stride)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be an int >= 1, got {value!r}")
    return cmp_block, cmp_stride


def num_compressed_tokens(seq_len: int, cmp_block: int, cmp_stride: int) -> int:
    """``Tc(T) = 0 if T < l else (T - l) // d + 1``."""
    return 0 if seq_len < cmp_block else (seq_len - cmp_block) // cmp_stride + 1


def compressed_causal_mask_mod(cmp_block: int, cmp_stride: int):
    """``mask_mod`` named ``compressed_causal_l<l>_d<d>``: ``kv_idx * d + l - 1 <= q_idx``."""
    l, d = _check(cmp_block, cmp_stride)

    def compressed_causal(b, h, q_idx, kv_idx):
        return kv_idx * d + (l - 1) <= q_idx

    return named(f"compressed_causal_l{l}_d{d}", compressed_causal)


def compressed_causal(cmp_block: int, cmp_stride: int) -> MaskPattern:
    """The compressed causal pattern; its blocks: rows ``[0, floor((t - l + 1) / d)]``."""
    l, d = _check(cmp_block, cmp_stride)

    def hi(t):
        return torch.div(t - (l - 1), d, rounding_mode="floor")

    def tables(q_len, kv_len, q_block, kv_block, device):
        return interval_block_tables(torch.zeros_like, hi, q_len, kv_len, q_block, kv_block, device)

    return MaskPattern(f"compressed_causal_l{l}_d{d}", compressed_causal_mask_mod(l, d), tables)


def compressed_causal_block_mask(
    seq_len: int, cmp_block: int, cmp_stride: int, device="cpu", block_size=DEFAULT_BLOCK_SIZE
) -> BlockMask:
    """Closed-form ``BlockMask`` of :func:`compressed_causal` for ``T = seq_len`` raw queries and
    ``Tc(T)`` compressed keys. ``Tc`` must be >= 1 (FlexAttention needs a key)."""
    num_cmp = num_compressed_tokens(seq_len, cmp_block, cmp_stride)
    if num_cmp < 1:
        raise ValueError(f"seq_len={seq_len} < cmp_block={cmp_block}: there is no compressed token")
    return compressed_causal(cmp_block, cmp_stride).block_mask(seq_len, num_cmp, device, block_size)
