"""Prefix-LM pattern: every query sees the whole prefix ``s < P``, and causally ``s <= t`` after it.

``P`` is an int or an int tensor ``[B]`` (one prefix length per sequence of the batch).
"""

from __future__ import annotations

import torch
from torch.nn.attention.flex_attention import BlockMask

from .pattern import DEFAULT_BLOCK_SIZE, MaskPattern, interval_block_tables, named

__all__ = ["prefix_lm", "prefix_lm_mask_mod", "prefix_lm_block_mask"]


def _check_prefix(prefix_len):
    if isinstance(prefix_len, torch.Tensor):
        if prefix_len.dim() != 1 or prefix_len.dtype.is_floating_point or prefix_len.dtype == torch.bool:
            raise ValueError(
                f"prefix_len must be an int or an integer tensor [B], got {prefix_len.dtype} "
                f"{tuple(prefix_len.shape)}"
            )
        return prefix_len
    if isinstance(prefix_len, bool) or not isinstance(prefix_len, int) or prefix_len < 0:
        raise ValueError(f"prefix_len must be an int >= 0 or an integer tensor [B], got {prefix_len!r}")
    return prefix_len


def prefix_lm_mask_mod(prefix_len):
    """``mask_mod`` named ``prefix_lm``: ``kv_idx < P[b] or kv_idx <= q_idx``."""
    prefix_len = _check_prefix(prefix_len)
    if isinstance(prefix_len, torch.Tensor):

        def prefix_lm(b, h, q_idx, kv_idx):
            return (kv_idx < prefix_len[b]) | (kv_idx <= q_idx)

    else:

        def prefix_lm(b, h, q_idx, kv_idx):
            return (kv_idx < prefix_len) | (kv_idx <= q_idx)

    return named("prefix_lm", prefix_lm)


def prefix_lm(prefix_len) -> MaskPattern:
    """The prefix-LM pattern; its blocks: rows ``[0, max(t, P - 1)]``."""
    prefix_len = _check_prefix(prefix_len)
    batch = prefix_len.shape[0] if isinstance(prefix_len, torch.Tensor) else 1

    def tables(q_len, kv_len, q_block, kv_block, device):
        if isinstance(prefix_len, torch.Tensor):
            last_prefix = prefix_len.to(device=device, dtype=torch.int64)[:, None] - 1  # [B, 1]
        else:
            last_prefix = prefix_len - 1

        def hi(t):
            return torch.maximum(t, torch.as_tensor(last_prefix, device=t.device))  # [Bm, N]

        return interval_block_tables(torch.zeros_like, hi, q_len, kv_len, q_block, kv_block, device)

    return MaskPattern("prefix_lm", prefix_lm_mask_mod(prefix_len), tables, batch)


def prefix_lm_block_mask(
    prefix_len, q_len: int, kv_len: int | None = None, device="cpu", block_size=DEFAULT_BLOCK_SIZE
) -> BlockMask:
    """Closed-form ``BlockMask`` of :func:`prefix_lm` (batch dimension ``B`` for a tensor prefix)."""
    return prefix_lm(prefix_len).block_mask(q_len, kv_len, device, block_size)
