"""Triton helpers for kernels that process a tile of QT consecutive queries of one KV group.

The queries of a tile attend the union of their selected blocks: each distinct block is loaded once
for all ``QT * G`` query rows, and the rows of queries that did not select it are masked. Adjacent
queries usually share blocks (always NSA's init and local blocks; in trained models most of the
rest), so the tile reads fewer K/V bytes than QT separate queries, at the price of masked rows in
the products.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .kernel_utils import head_tile

# Queries per tile by default. H200, paper shape (perf/results/h200/sweep-3.md), QT=4 against the
# one-query kernels alone: random selections 15.80 vs 15.62 ms forward at 64k, 1.77 vs 1.90 at 8k;
# selections of correlated queries (neighbours share blocks, as in trained models) 9.92 vs 15.50 ms
# forward at 64k, 1.07 vs 1.91 at 8k, and their selected backward (dq + dK/dV) 24.7 vs 31.1 ms at 64k.
DEFAULT_QT = 4


def union_head_rows(G: int, qt: int) -> int:
    """Rows per query in a union tile: the G heads padded to a power of two, and to ``16 // qt`` so
    that the tile's ``qt * rows`` are at least the 16 a ``tl.dot`` needs. The one-query kernels pad
    every query to 16 rows (:func:`~.kernel_utils.head_tile`): for G = 4 a tile of 4 queries packs
    into those 16 rows with no padding at all, where the one-query tiles are 3/4 padding."""
    return max(triton.next_power_of_2(G), -(-16 // qt))


def tile_plan(options: dict, kernel: str, B: int, HKV: int, T: int, G: int, n: int, d_pad: int, device) -> dict:
    """The query-tile launch plan shared by the selected forward and dq launchers.

    Pops ``TUNING[kernel]``'s tile keys from ``options`` (the rest stays for the one-query kernel):
    ``QT`` (queries per tile, a power of two, default :data:`DEFAULT_QT`), ``union_rows`` (rows per
    query of a union tile: a power of two >= G with ``QT * rows >= 16``, default
    :func:`union_head_rows`), ``MAX_UNION`` (default :func:`union_threshold`), ``union_warps``.
    Raises ValueError naming the key on a bad value. Returns ``qt``, ``rows``, ``max_union``,
    ``union_warps``, ``done`` (``int8 [B * HKV, cdiv(T, qt)]`` for the union kernel's flags, None when
    ``qt == 1``) and ``one_query`` (whether the one-query kernel must run: ``qt == 1``, or a tile may
    exceed ``max_union``; no tile has more than ``qt * n`` blocks).
    """
    qt = options.pop("QT", DEFAULT_QT)
    if not isinstance(qt, int) or qt < 1 or qt & (qt - 1):
        raise ValueError(f"TUNING['{kernel}']['QT'] must be a power of two, got {qt!r}")
    rows = options.pop("union_rows", union_head_rows(G, qt))
    if not isinstance(rows, int) or rows < G or rows & (rows - 1) or qt * rows < 16:
        raise ValueError(
            f"TUNING['{kernel}']['union_rows'] must be a power of two >= G = {G} with QT * union_rows >= 16 "
            f"(QT = {qt}), got {rows!r}"
        )
    max_union = options.pop("MAX_UNION", union_threshold(qt, n, G, rows))
    tile = qt * rows * d_pad
    # 16 x 128 tiles on 2 warps, as the one-query forward (H200, small-group 64k dq: 35.5 against
    # 39.5 ms with 4 warps, perf/results/h200/sweep-4.md); 64 x 128 on 4, larger on 8
    union_warps = options.pop("union_warps", 2 if tile <= 16 * 128 else (4 if tile <= 64 * 128 else 8))
    done = torch.empty(B * HKV, triton.cdiv(T, qt), dtype=torch.int8, device=device) if qt > 1 else None
    return dict(qt=qt, rows=rows, max_union=max_union, union_warps=union_warps, done=done,
                one_query=qt == 1 or max_union < qt * n)  # fmt: skip


def union_threshold(qt: int, n: int, G: int = 16, rows: int | None = None) -> int:
    """Largest union (distinct blocks of a tile of ``qt`` queries with ``n`` slots each) for which the
    union kernels run.

    A union tile no taller than one query's tile (``qt * rows <= head_tile(G)``, ``rows`` the rows
    per query, default :func:`union_head_rows`; e.g. G = 4 with qt = 4) costs per block what the one-query kernel pays per query and block, and a
    tile's union has at most ``qt * n`` blocks: every tile goes to the union kernel (``qt * n``).

    Taller union tiles (G = 16: 64 rows against 16) cost more per block. On the H200 (paper shape,
    QT=4, every tile on the union kernel) a union block cost 1.69x (64k: 20.54 ms for 49.9 blocks per
    tile on average against 15.62 ms for 64) to 1.81x (8k: 1.867 ms for 34.8 against 1.898 ms) one
    query's block, so break-even near 36-38 of 64; the threshold there is 9/16 of ``qt * n`` (36 of
    64). Measured against 42 (2/3) in one process (perf/results/h200/sweep-4.md): forward 15.68 ->
    15.64 ms at 64k and 1.775 -> 1.724 ms at 8k, dq 3.756 -> 3.745 ms at 8k, equal at 64k."""
    if qt * (union_head_rows(G, qt) if rows is None else rows) <= head_tile(G):
        return qt * n
    return (9 * qt * n) // 16


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


@triton.jit
def union_block_slot(u, flat, rank, idx_tile, row_q, QT: tl.constexpr, N_PAD: tl.constexpr):
    """:func:`union_block` plus, per query row, the slot of its query holding the block (0 where
    ``has_row`` is False; a query's slots hold distinct blocks): ``(blk, has_row, slot_row [ROWS])``."""
    blk = tl.sum(tl.where(rank == u, flat, 0), axis=0)  # the u-th distinct block
    match = idx_tile == blk  # [QT, N_PAD]
    slot_q = tl.sum(tl.where(match, tl.arange(0, N_PAD)[None, :], 0), axis=1)  # [QT]
    has_q = tl.sum(match.to(tl.int32), axis=1)  # [QT]
    row_sel = tl.arange(0, QT)[None, :] == row_q[:, None]  # [ROWS, QT]
    slot_row = tl.sum(tl.where(row_sel, slot_q[None, :], 0), axis=1).to(tl.int64)  # [ROWS]
    has_row = tl.sum(tl.where(row_sel, has_q[None, :], 0), axis=1) > 0  # [ROWS]
    return blk, has_row, slot_row


@triton.jit
def load_tile_selections(idx_ptr, b, g, t0, T, stride_ib, stride_ih, stride_it,
                         QT: tl.constexpr, N: tl.constexpr, N_PAD: tl.constexpr):  # fmt: skip
    """``idx_tile [QT, N_PAD]`` int64: the selections of queries ``t0 .. t0 + QT - 1`` of group
    ``(b, g)`` in ``idx [B, HKV, T, N]``, ``-1`` past ``T`` and in the padding slots."""
    tq = (t0 + tl.arange(0, QT)).to(tl.int64)  # [QT]
    slots = tl.arange(0, N_PAD)
    return tl.load(
        idx_ptr + b * stride_ib + g * stride_ih + tq[:, None] * stride_it + slots[None, :],
        mask=(tq < T)[:, None] & (slots < N)[None, :],
        other=-1,
    ).to(tl.int64)  # [QT, N_PAD]


@triton.jit
def claim_tile(idx_ptr, done_ptr, b, g, pid_bg, t0, T, stride_ib, stride_ih, stride_it,
               QT: tl.constexpr, N: tl.constexpr, N_PAD: tl.constexpr, MAX_UNION: tl.constexpr):  # fmt: skip
    """Loads the selections of the tile of queries ``t0 .. t0 + QT - 1`` (``idx [B, HKV, T, N]``,
    ``-1`` past T), computes their union (:func:`union_of_selections`) and flags in ``done_ptr``
    (``int8 [B * HKV, cdiv(T, QT)]``) whether the union kernel takes the tile (at most MAX_UNION
    distinct blocks). Returns ``(take, idx_tile, flat, rank, num_blocks)``."""
    idx_tile = load_tile_selections(idx_ptr, b, g, t0, T, stride_ib, stride_ih, stride_it, QT, N, N_PAD)
    flat, rank, num_blocks = union_of_selections(idx_tile, QT, N_PAD)
    take = num_blocks <= MAX_UNION
    tl.store(done_ptr + pid_bg * tl.cdiv(T, QT) + t0 // QT, take.to(tl.int8))
    return take, idx_tile, flat, rank, num_blocks
