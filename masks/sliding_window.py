"""Sliding-window pattern (NSA branch 3): query ``t`` sees keys ``t - w < s <= t``.

The window length ``w`` counts the query itself; ``w = 0`` masks everything.
"""

from __future__ import annotations

from torch.nn.attention.flex_attention import BlockMask

from .pattern import DEFAULT_BLOCK_SIZE, MaskPattern, interval_block_tables, named

__all__ = ["sliding_window", "sliding_window_mask_mod", "sliding_window_block_mask"]


def _check_window(window) -> int:
    if isinstance(window, bool) or not isinstance(window, int) or window < 0:
        raise ValueError(f"window must be an int >= 0, got {window!r}")
    return window


def sliding_window_mask_mod(window: int):
    """``mask_mod`` named ``sliding_window_<w>``: ``0 <= q_idx - kv_idx < w``."""
    window = _check_window(window)

    def sliding_window(b, h, q_idx, kv_idx):
        diff = q_idx - kv_idx
        return (diff >= 0) & (diff < window)

    return named(f"sliding_window_{window}", sliding_window)


def sliding_window(window: int) -> MaskPattern:
    """The window pattern; its blocks: rows ``[t - w + 1, t]`` (about ``w / 128 + 1`` tiles per row)."""
    window = _check_window(window)

    def tables(q_len, kv_len, q_block, kv_block, device):
        any_blocks, full_blocks = interval_block_tables(
            lambda t: t - (window - 1), lambda t: t, q_len, kv_len, q_block, kv_block, device
        )
        # interval_block_tables bounds a tile by the union of its rows' ranges, which assumes the rows
        # see something; with w = 0 every row is empty (found by hypothesis: seq_len=2, block=2)
        return (any_blocks & (window > 0)), (full_blocks & (window > 0))

    return MaskPattern(f"sliding_window_{window}", sliding_window_mask_mod(window), tables)


def sliding_window_block_mask(
    window: int, q_len: int, kv_len: int | None = None, device="cpu", block_size=DEFAULT_BLOCK_SIZE
) -> BlockMask:
    """Closed-form ``BlockMask`` of :func:`sliding_window`."""
    return sliding_window(window).block_mask(q_len, kv_len, device, block_size)
