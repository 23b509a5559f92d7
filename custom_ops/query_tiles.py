"""Triton helpers for kernels that process a tile of QT consecutive queries of one KV group.

The queries of a tile attend the union of their selected blocks: each distinct block is loaded once
for all ``QT * G`` query rows, and the rows of queries that did not select it are masked. Adjacent
queries usually share blocks (always NSA's init and local blocks; in trained models most of the
rest), so the tile reads fewer K/V bytes than QT separate queries, at the price of masked rows in
the products.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def union_of_selections(idx_tile, QT: tl.constexpr, N_PAD: tl.constexpr):
    """Distinct valid blocks of a tile's selections.

    ``idx_tile [QT, N_PAD]`` int64 block indices, ``-1`` for unused slots (a query's own slots hold
    distinct blocks; different queries may repeat them). Returns ``(flat [QT*N_PAD], rank
    [QT*N_PAD], count)``: entry ``i`` of the flattened tile is the ``rank[i]``-th distinct block
    (first occurrence in row-major order), ``rank = -1`` for ``-1`` slots and repeats; ``count``
    distinct blocks in all. Cost: one ``[QT*N_PAD, QT*N_PAD]`` comparison per tile.
    """
    flat = tl.reshape(idx_tile, (QT * N_PAD,))  # [M]
    i = tl.arange(0, QT * N_PAD)
    same_earlier = (flat[:, None] == flat[None, :]) & (i[None, :] < i[:, None])  # [M, M]: j < i holds the same block
    first = (flat >= 0) & (tl.sum(same_earlier.to(tl.int32), axis=1) == 0)  # [M]
    first_i = first.to(tl.int32)
    rank = tl.where(first, tl.cumsum(first_i, axis=0) - 1, -1)  # [M]
    return flat, rank, tl.sum(first_i, axis=0)


@triton.jit
def union_block(u, flat, rank, idx_tile, row_q, QT: tl.constexpr):
    """The ``u``-th distinct block of the tile (see :func:`union_of_selections`) and, per query row
    (``row_q [ROWS]``: the row's query within the tile), whether its query selected it."""
    blk = tl.sum(tl.where(rank == u, flat, 0), axis=0)  # scalar block index
    has = (tl.sum((idx_tile == blk).to(tl.int32), axis=1) > 0).to(tl.int32)  # [QT]
    qi = tl.arange(0, QT)
    has_row = tl.sum(tl.where(qi[None, :] == row_q[:, None], has[None, :], 0), axis=1) > 0  # [ROWS]
    return blk, has_row
