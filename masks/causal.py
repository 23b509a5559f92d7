"""Causal pattern: query ``t`` sees keys ``s <= t`` (top-left aligned when ``Q_LEN != KV_LEN``)."""

from __future__ import annotations

import torch
from torch.nn.attention.flex_attention import BlockMask

from .pattern import DEFAULT_BLOCK_SIZE, MaskPattern, interval_block_tables, named

__all__ = ["causal", "causal_mask_mod", "causal_block_mask"]


def causal_mask_mod():
    """``mask_mod`` named ``causal``: ``kv_idx <= q_idx``."""

    def causal(b, h, q_idx, kv_idx):
        return kv_idx <= q_idx

    return named("causal", causal)


def _tables(q_len, kv_len, q_block, kv_block, device):
    return interval_block_tables(torch.zeros_like, lambda t: t, q_len, kv_len, q_block, kv_block, device)


def causal() -> MaskPattern:
    """The causal pattern; its blocks: rows ``[0, t]``, so the diagonal tiles are partial."""
    return MaskPattern("causal", causal_mask_mod(), _tables)


def causal_block_mask(
    q_len: int, kv_len: int | None = None, device="cpu", block_size=DEFAULT_BLOCK_SIZE
) -> BlockMask:
    """Closed-form ``BlockMask`` of :func:`causal` (no ``O(T^2)`` mask evaluation)."""
    return causal().block_mask(q_len, kv_len, device, block_size)
