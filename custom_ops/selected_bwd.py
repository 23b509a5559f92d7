"""Triton kernels: backward of the selected-attention branch.

With ``P[h, t, s] = exp(scale * q[h, t] . k[g, s] - lse[h, t])`` on the selected tokens (0 elsewhere),
``delta[h, t] = sum_c o[h, t, c] * do[h, t, c]`` and ``dS = P * (do . v^T - delta)``:

    dq[h, t] = scale * sum_s dS[h, t, s] k[g, s]
    dk[g, s] = scale * sum_{h in g, t} dS[h, t, s] q[h, t]
    dv[g, s] =         sum_{h in g, t} P[h, t, s] do[h, t]

Two schemes, chosen by :func:`use_ds_buffer`:

**dS buffer** (the default while the buffer fits ``DS_BUFFER_MAX_BYTES``):

1. ``_delta_kernel``: ``delta`` from ``o`` and ``do``.
2. ``_dkv_kernel`` (below) with ``STORE_DS``: besides dK/dV it stores the ``dS [G, l']`` it forms
   for every (query, slot) in a buffer laid out like the index (``[B * HKV * T * n, G, l']``).
3. ``_dq_ds_kernel``: per query, ``dq = scale * sum_slot dS @ K[block]``: one product and one K
   block per (query, slot), where the direct kernels load K and V and do three products.
4. ``_dkv_reduce_kernel`` (deterministic dK/dV, below).

**Direct** (dq recomputes dS):

1. ``_dq_union_kernel`` then ``_dq_kernel``: dq by the same two-kernel scheme as the forward (query
   tiles walking the union of their blocks where it is small, one program per query elsewhere);
   they also write ``delta`` for step 2.
2. ``_dkv_kernel``: dK/dV without write races through a reverse index. The (batch, KV head, block)
   keys of all valid index slots are sorted (``torch.sort``, stable), so every block owns the
   contiguous list of queries that selected it. Each list is cut into chunks of at most
   ``CHUNK`` queries ("work items", at least one per block, so a block chosen by every query,
   such as block 0, does not serialise the kernel); a program loads its block's K/V once and
   loops over its chunk, ``QB`` queries x ``G`` heads per step. Its partial dK/dV goes either
   to its own slot of a float32 buffer (deterministic) or is added with ``tl.atomic_add`` into
   a zeroed float32 accumulator (faster to write, summation order not fixed).
3. ``_dkv_reduce_kernel`` (deterministic path): one program per block sums its work items'
   partials in a fixed order and writes dK/dV in the input dtype.

The index is built with torch ops of static shapes (sort, searchsorted, cumsum): no host sync.
Work items per call: ``NB * B * HKV + (B * HKV * T * n) // CHUNK`` (an upper bound; the surplus
items do nothing), so the partial buffer holds at most about twice the float32 size of dK/dV.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .kernel_utils import dims_pad, head_tile, load_kv_block, mma, selection_strides, static_sizes, tuned, upcast_dots
from .query_tiles import (claim_tile, load_tile_selections, tile_plan, union_block, union_block_slot, union_head_rows,
                          union_of_selections)

__all__ = ["selected_bwd_launch", "build_reverse_index", "use_ds_buffer", "dkv_chunk", "DKV_CHUNK", "DS_BUFFER_MAX_BYTES"]

DKV_CHUNK = 1024  # most queries per dK/dV work item (see dkv_chunk)
_DKV_TARGET_ITEMS = 2048  # work items wanted per call (H200: 132 SMs x 2 programs, ~8 waves)


def dkv_chunk(num_entries: int) -> int:
    """Queries per dK/dV work item for ``num_entries`` index slots: the power of two in [256, 1024]
    nearest below ``num_entries / 2048``, so that short sequences still get enough work items to
    balance the programs (H200, paper shape, whole selected backward: 256 ran 3.34 against 3.53 ms
    for 1024 at 8k; at 64k 256 was slower, 31.8 against 31.1 ms, perf/results/h200/sweep-2.md;
    session 8, perf/results/h200/sweep-8.md)."""
    wanted = max(1, num_entries // _DKV_TARGET_ITEMS)
    return max(256, min(DKV_CHUNK, 1 << (wanted.bit_length() - 1)))


@triton.jit
def _dq_rows_setup(o_ptr, do_ptr, lse_ptr, delta_ptr, o_off, o_mask, lse_off, row_ok):
    """Per query row: ``do [ROWS, DV_PAD]``, ``delta = rowsum(o * do)`` (float32, also stored for the
    dK/dV kernel) and the lse in base 2 (0 for rows without a key)."""
    do = tl.load(do_ptr + o_off, mask=o_mask, other=0.0)
    o = tl.load(o_ptr + o_off, mask=o_mask, other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), axis=1)  # [ROWS]
    tl.store(delta_ptr + lse_off, delta, mask=row_ok)
    lse = tl.load(lse_ptr + lse_off, mask=row_ok, other=0.0)
    return do, delta, tl.where(lse == float("-inf"), 0.0, lse * 1.4426950408889634)


@triton.jit
def _dq_step(dq, q, do, kb, vb, p_ok, lse2, delta, scale_log2, IEEE: tl.constexpr, UPCAST: tl.constexpr):
    """``dq += dS @ K`` for one block (unscaled), ``dS = P * (do @ V^T - delta)``, ``P`` where ``p_ok``."""
    logits = mma(q, tl.trans(kb), IEEE, UPCAST) * scale_log2  # [ROWS, BS_PAD]
    p = tl.where(p_ok, tl.exp2(logits - lse2[:, None]), 0.0)
    dp = mma(do, tl.trans(vb), IEEE, UPCAST)  # [ROWS, BS_PAD]
    ds = p * (dp - delta[:, None])
    return dq + mma(ds.to(kb.dtype), kb, IEEE, UPCAST)


@triton.jit
def _dq_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    idx_ptr,
    o_ptr,
    do_ptr,
    lse_ptr,  # [B, HQ, T] float32, natural log
    dq_ptr,  # [B, HQ, T, DK] (output)
    delta_ptr,  # [B, HQ, T] float32 (output)
    done_ptr,  # TILE > 0: int8 [B * HKV, cdiv(T, TILE)], tiles the union kernel already did
    T,
    HKV,
    scale: tl.constexpr,  # constexpr: inductor would pass a python float as an fp64 scalar
    stride_qb,
    stride_qh,
    stride_qt,
    stride_kb,
    stride_kh,
    stride_kt,
    stride_vb,
    stride_vh,
    stride_vt,
    stride_ib,
    stride_ih,
    stride_it,
    stride_ob,
    stride_oh,
    stride_ot,
    stride_lb,
    stride_lh,
    G: tl.constexpr,
    G_PAD: tl.constexpr,
    DK: tl.constexpr,
    DK_PAD: tl.constexpr,
    DV: tl.constexpr,
    DV_PAD: tl.constexpr,
    BS: tl.constexpr,
    BS_PAD: tl.constexpr,
    N: tl.constexpr,
    IEEE: tl.constexpr,  # float32 inputs: exact float32 products, not TF32
    UPCAST: tl.constexpr,
    TILE: tl.constexpr,  # 0, or the union kernel's queries per tile (skip the tiles it did)
):
    """q/dq share strides; o/do share strides; lse/delta share strides."""
    t = tl.program_id(0).to(tl.int64)
    pid_bg = tl.program_id(1)
    if TILE > 0:
        if tl.load(done_ptr + pid_bg * tl.cdiv(T, TILE) + t // TILE) != 0:
            return
    b = (pid_bg // HKV).to(tl.int64)
    g = (pid_bg % HKV).to(tl.int64)

    h = tl.arange(0, G_PAD)
    head_ok = h < G
    head = g * G + h
    dk = tl.arange(0, DK_PAD)
    dv = tl.arange(0, DV_PAD)
    q_off = b * stride_qb + head[:, None] * stride_qh + t * stride_qt + dk[None, :]
    q_mask = head_ok[:, None] & (dk[None, :] < DK)
    q = tl.load(q_ptr + q_off, mask=q_mask, other=0.0)  # [G_PAD, DK_PAD]
    o_off = b * stride_ob + head[:, None] * stride_oh + t * stride_ot + dv[None, :]
    o_mask = head_ok[:, None] & (dv[None, :] < DV)
    lse_off = b * stride_lb + head * stride_lh + t
    do, delta, lse2 = _dq_rows_setup(o_ptr, do_ptr, lse_ptr, delta_ptr, o_off, o_mask, lse_off, head_ok)

    scale_log2 = scale * 1.4426950408889634
    dq = tl.zeros((G_PAD, DK_PAD), tl.float32)
    k_base = k_ptr + b * stride_kb + g * stride_kh
    v_base = v_ptr + b * stride_vb + g * stride_vh
    idx_base = idx_ptr + b * stride_ib + g * stride_ih + t * stride_it
    s_off = tl.arange(0, BS_PAD)
    for slot in range(N):
        blk = tl.load(idx_base + slot).to(tl.int64)
        pos = blk * BS + s_off
        key_ok = (pos >= 0) & (s_off < BS) & (pos <= t)  # blk = -1: pos < 0
        kb, vb = load_kv_block(k_base, v_base, pos, key_ok, stride_kt, stride_vt, DK, DK_PAD, DV, DV_PAD)
        dq = _dq_step(dq, q, do, kb, vb, key_ok[None, :] & head_ok[:, None], lse2, delta, scale_log2, IEEE, UPCAST)
    tl.store(dq_ptr + q_off, (dq * scale).to(dq_ptr.dtype.element_ty), mask=q_mask)


@triton.jit
def _dq_union_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    idx_ptr,
    o_ptr,
    do_ptr,
    lse_ptr,  # [B, HQ, T] float32, natural log
    dq_ptr,  # [B, HQ, T, DK] (output)
    delta_ptr,  # [B, HQ, T] float32 (output)
    done_ptr,  # int8 [B * HKV, cdiv(T, QT)] (output): 1 where this kernel did the tile
    T,
    HKV,
    scale: tl.constexpr,
    stride_qb,
    stride_qh,
    stride_qt,
    stride_kb,
    stride_kh,
    stride_kt,
    stride_vb,
    stride_vh,
    stride_vt,
    stride_ib,
    stride_ih,
    stride_it,
    stride_ob,
    stride_oh,
    stride_ot,
    stride_lb,
    stride_lh,
    G: tl.constexpr,
    G_PAD: tl.constexpr,
    DK: tl.constexpr,
    DK_PAD: tl.constexpr,
    DV: tl.constexpr,
    DV_PAD: tl.constexpr,
    BS: tl.constexpr,
    BS_PAD: tl.constexpr,
    N: tl.constexpr,
    N_PAD: tl.constexpr,
    QT: tl.constexpr,  # queries per program (power of two)
    MAX_UNION: tl.constexpr,  # tiles with more distinct blocks are left to _dq_kernel
    IEEE: tl.constexpr,
    UPCAST: tl.constexpr,
):
    """:func:`_dq_kernel` over tiles of QT consecutive queries: the ``QT * G_PAD`` rows go over the
    union of the tile's selected blocks, each loaded once (custom_ops/query_tiles.py). Tiles whose
    union exceeds MAX_UNION blocks are only flagged; ``_dq_kernel``, launched next, does them."""
    t0 = tl.program_id(0) * QT
    pid_bg = tl.program_id(1)
    b = (pid_bg // HKV).to(tl.int64)
    g = (pid_bg % HKV).to(tl.int64)

    take, idx_tile, flat, rank, num_blocks = claim_tile(
        idx_ptr, done_ptr, b, g, pid_bg, t0, T, stride_ib, stride_ih, stride_it, QT, N, N_PAD, MAX_UNION
    )

    if not take:
        return

    rows = tl.arange(0, QT * G_PAD)
    row_q = rows // G_PAD  # [ROWS] query of the row within the tile
    row_h = rows % G_PAD
    row_t = (t0 + row_q).to(tl.int64)  # [ROWS]
    row_ok = (row_t < T) & (row_h < G)
    head = g * G + row_h
    dk = tl.arange(0, DK_PAD)
    dv = tl.arange(0, DV_PAD)
    q_off = b * stride_qb + head[:, None] * stride_qh + row_t[:, None] * stride_qt + dk[None, :]
    q_mask = row_ok[:, None] & (dk[None, :] < DK)
    q = tl.load(q_ptr + q_off, mask=q_mask, other=0.0)  # [ROWS, DK_PAD]
    o_off = b * stride_ob + head[:, None] * stride_oh + row_t[:, None] * stride_ot + dv[None, :]
    o_mask = row_ok[:, None] & (dv[None, :] < DV)
    lse_off = b * stride_lb + head * stride_lh + row_t
    do, delta, lse2 = _dq_rows_setup(o_ptr, do_ptr, lse_ptr, delta_ptr, o_off, o_mask, lse_off, row_ok)

    scale_log2 = scale * 1.4426950408889634
    dq = tl.zeros((QT * G_PAD, DK_PAD), tl.float32)
    k_base = k_ptr + b * stride_kb + g * stride_kh
    v_base = v_ptr + b * stride_vb + g * stride_vh
    s_off = tl.arange(0, BS_PAD)
    for u in range(num_blocks):
        blk, has_row = union_block(u, flat, rank, idx_tile, row_q, QT)
        pos = blk * BS + s_off  # [BS_PAD]
        pos_ok = (s_off < BS) & (pos < T)
        kb, vb = load_kv_block(k_base, v_base, pos, pos_ok, stride_kt, stride_vt, DK, DK_PAD, DV, DV_PAD)
        key_ok = row_ok[:, None] & has_row[:, None] & pos_ok[None, :] & (pos[None, :] <= row_t[:, None])
        dq = _dq_step(dq, q, do, kb, vb, key_ok, lse2, delta, scale_log2, IEEE, UPCAST)
    tl.store(dq_ptr + q_off, (dq * scale).to(dq_ptr.dtype.element_ty), mask=q_mask)


@triton.jit
def _delta_kernel(o_ptr, do_ptr, delta_ptr, R, DV: tl.constexpr, DV_PAD: tl.constexpr, BLOCK_R: tl.constexpr):
    """``delta[r] = sum_c o[r, c] * do[r, c]`` in float32 for the ``R`` rows of contiguous ``[R, DV]``
    ``o`` and ``do`` (``R = B * HQ * T``; ``delta`` contiguous ``[B, HQ, T]``)."""
    r = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)  # [BLOCK_R]
    c = tl.arange(0, DV_PAD)
    mask = (r[:, None] < R) & (c[None, :] < DV)
    off = r[:, None] * DV + c[None, :]  # [BLOCK_R, DV_PAD]
    o = tl.load(o_ptr + off, mask=mask, other=0.0).to(tl.float32)
    do = tl.load(do_ptr + off, mask=mask, other=0.0).to(tl.float32)
    tl.store(delta_ptr + r, tl.sum(o * do, axis=1), mask=r < R)


@triton.jit
def _dq_ds_kernel(
    k_ptr,  # [B, HKV, T, DK]
    idx_ptr,  # [B, HKV, T, N] int32/int64
    ds_ptr,  # [B * HKV * T * N, DS_ROWS, BS_PAD], written by _dkv_kernel (STORE_DS)
    dq_ptr,  # [B, HQ, T, DK] (output)
    T,
    HKV,
    scale: tl.constexpr,
    stride_qb,  # dq's strides
    stride_qh,
    stride_qt,
    stride_kb,
    stride_kh,
    stride_kt,
    stride_ib,
    stride_ih,
    stride_it,
    G: tl.constexpr,
    G_PAD: tl.constexpr,  # rows of the product (>= 16)
    DS_ROWS: tl.constexpr,  # rows per entry in ds (the dK/dV kernel's padded heads)
    DK: tl.constexpr,
    DK_PAD: tl.constexpr,
    BS: tl.constexpr,
    BS_PAD: tl.constexpr,
    N: tl.constexpr,
    IEEE: tl.constexpr,
    UPCAST: tl.constexpr,
):
    """``dq[h, t] = scale * sum_slot dS[t, slot, h, :] @ K[block(t, slot)]``: one program per (query,
    batch x KV head), the ``G`` heads as rows; dS comes from the dK/dV kernel, so each (query, slot)
    reads its K block (not V) and does one product instead of three. Slots ``-1`` and keys after
    the query are skipped (their dS rows are not read)."""
    t = tl.program_id(0).to(tl.int64)
    pid_bg = tl.program_id(1).to(tl.int64)
    b = pid_bg // HKV
    g = pid_bg % HKV
    h = tl.arange(0, G_PAD)
    head_ok = h < G
    dk = tl.arange(0, DK_PAD)
    s_off = tl.arange(0, BS_PAD)
    k_base = k_ptr + b * stride_kb + g * stride_kh
    idx_base = idx_ptr + b * stride_ib + g * stride_ih + t * stride_it
    entry0 = (pid_bg * T + t) * N  # flat index slot of (b, g, t, slot 0)
    dq = tl.zeros((G_PAD, DK_PAD), tl.float32)
    for slot in range(N):
        blk = tl.load(idx_base + slot).to(tl.int64)
        pos = blk * BS + s_off  # [BS_PAD]
        key_ok = (pos >= 0) & (s_off < BS) & (pos <= t)  # blk = -1: pos < 0
        kb = tl.load(
            k_base + pos[:, None] * stride_kt + dk[None, :], mask=key_ok[:, None] & (dk[None, :] < DK), other=0.0
        )  # [BS_PAD, DK_PAD]
        ds_off = (entry0 + slot) * (DS_ROWS * BS_PAD) + h[:, None] * BS_PAD + s_off[None, :]
        ds = tl.load(ds_ptr + ds_off, mask=head_ok[:, None] & key_ok[None, :], other=0.0)  # [G_PAD, BS_PAD]
        dq += mma(ds, kb, IEEE, UPCAST)
    dq_off = b * stride_qb + (g * G + h)[:, None] * stride_qh + t * stride_qt + dk[None, :]
    tl.store(dq_ptr + dq_off, (dq * scale).to(dq_ptr.dtype.element_ty), mask=head_ok[:, None] & (dk[None, :] < DK))


@triton.jit
def _dq_ds_union_kernel(
    k_ptr,  # [B, HKV, T, DK]
    idx_ptr,  # [B, HKV, T, N] int32/int64
    ds_ptr,  # [B * HKV * T * N, DS_ROWS, BS_PAD], written by _dkv_kernel (STORE_DS)
    dq_ptr,  # [B, HQ, T, DK] (output)
    T,
    HKV,
    scale: tl.constexpr,
    stride_qb,  # dq's strides
    stride_qh,
    stride_qt,
    stride_kb,
    stride_kh,
    stride_kt,
    stride_ib,
    stride_ih,
    stride_it,
    G: tl.constexpr,
    G_ROWS: tl.constexpr,  # rows per query (power of two >= G, QT * G_ROWS >= 16)
    DS_ROWS: tl.constexpr,
    DK: tl.constexpr,
    DK_PAD: tl.constexpr,
    BS: tl.constexpr,
    BS_PAD: tl.constexpr,
    N: tl.constexpr,
    N_PAD: tl.constexpr,
    QT: tl.constexpr,  # queries per program
    IEEE: tl.constexpr,
    UPCAST: tl.constexpr,
):
    """:func:`_dq_ds_kernel` over tiles of QT consecutive queries: each distinct block of the tile's
    selections (custom_ops/query_tiles.py) is loaded once for the ``QT * G_ROWS`` rows; a row reads
    the dS of its query's slot holding that block (none if its query did not select it)."""
    t0 = tl.program_id(0) * QT
    pid_bg = tl.program_id(1).to(tl.int64)
    b = pid_bg // HKV
    g = pid_bg % HKV
    idx_tile = load_tile_selections(idx_ptr, b, g, t0, T, stride_ib, stride_ih, stride_it, QT, N, N_PAD)
    flat, rank, num_blocks = union_of_selections(idx_tile, QT, N_PAD)

    rows = tl.arange(0, QT * G_ROWS)
    row_q = rows // G_ROWS  # [ROWS] query of the row within the tile
    row_h = rows % G_ROWS
    row_t = (t0 + row_q).to(tl.int64)  # [ROWS]
    row_ok = (row_t < T) & (row_h < G)
    dk = tl.arange(0, DK_PAD)
    s_off = tl.arange(0, BS_PAD)
    k_base = k_ptr + b * stride_kb + g * stride_kh
    dq = tl.zeros((QT * G_ROWS, DK_PAD), tl.float32)
    for u in range(num_blocks):
        blk, has_row, slot_row = union_block_slot(u, flat, rank, idx_tile, row_q, QT, N_PAD)
        pos = blk * BS + s_off  # [BS_PAD]
        pos_ok = (s_off < BS) & (pos < T)
        kb = tl.load(
            k_base + pos[:, None] * stride_kt + dk[None, :], mask=pos_ok[:, None] & (dk[None, :] < DK), other=0.0
        )  # [BS_PAD, DK_PAD]
        entry = (pid_bg * T + row_t) * N + slot_row  # [ROWS] flat index slot of the row's query
        ds_off = entry[:, None] * (DS_ROWS * BS_PAD) + row_h[:, None] * BS_PAD + s_off[None, :]
        ds_ok = (row_ok & has_row)[:, None] & pos_ok[None, :] & (pos[None, :] <= row_t[:, None])
        ds = tl.load(ds_ptr + ds_off, mask=ds_ok, other=0.0)  # [ROWS, BS_PAD]
        dq += mma(ds, kb, IEEE, UPCAST)
    dq_off = b * stride_qb + (g * G + row_h)[:, None] * stride_qh + row_t[:, None] * stride_qt + dk[None, :]
    tl.store(dq_ptr + dq_off, (dq * scale).to(dq_ptr.dtype.element_ty), mask=row_ok[:, None] & (dk[None, :] < DK))


@triton.jit
def _dkv_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    do_ptr,
    lse_ptr,
    delta_ptr,
    entry_t_ptr,  # [L] int32: query of each sorted index entry
    item_key_ptr,  # [W] int32: (b * HKV + g) * NB + block, or >= NUM_KEYS for an empty item
    item_start_ptr,  # [W] int32: first entry of the item
    item_end_ptr,  # [W] int32: one past its last entry
    dk_out_ptr,  # float32: [W, BS_PAD, DK_PAD] partials, or [B, HKV, T, DK] accumulator (ATOMIC)
    dv_out_ptr,
    entry_pos_ptr,  # STORE_DS: [L] int32, flat index slot position of each sorted entry
    ds_ptr,  # STORE_DS: [B * HKV * T * N, G_PAD, BS_PAD] (output), dS of every (query, slot) in q's dtype
    T,
    HKV,
    NB,
    NUM_KEYS,
    scale: tl.constexpr,  # constexpr: inductor would pass a python float as an fp64 scalar
    stride_qb,
    stride_qh,
    stride_qt,
    stride_kb,
    stride_kh,
    stride_kt,
    stride_vb,
    stride_vh,
    stride_vt,
    stride_ob,
    stride_oh,
    stride_ot,
    stride_lb,
    stride_lh,
    G: tl.constexpr,
    G_PAD: tl.constexpr,
    QB: tl.constexpr,  # queries per step
    DK: tl.constexpr,
    DK_PAD: tl.constexpr,
    DV: tl.constexpr,
    DV_PAD: tl.constexpr,
    BS: tl.constexpr,
    BS_PAD: tl.constexpr,
    ATOMIC: tl.constexpr,
    STORE_DS: tl.constexpr,  # also store dS (unscaled, rounded as for the dK product) for _dq_ds_kernel
    IEEE: tl.constexpr,  # float32 inputs: exact float32 products, not TF32
    UPCAST: tl.constexpr,
):
    """do shares o's strides (stride_o*); delta shares lse's strides; accumulator shares k's/v's
    (b, h, t) strides with unit stride on the last dim. ``STORE_DS``: entry ``e`` (flat index slot
    ``entry_pos[e] = ((b * HKV + g) * T + t) * N + slot``) stores its ``dS [G_PAD, BS_PAD]`` at row
    ``entry_pos[e]`` of ``ds``; rows of padded heads and keys after the query hold zeros."""
    w = tl.program_id(0).to(tl.int64)
    key = tl.load(item_key_ptr + w)
    if key < NUM_KEYS:
        start = tl.load(item_start_ptr + w)
        end = tl.load(item_end_ptr + w)
        bg = key // NB
        blk = (key % NB).to(tl.int64)
        b = (bg // HKV).to(tl.int64)
        g = (bg % HKV).to(tl.int64)

        s_off = tl.arange(0, BS_PAD)
        pos = blk * BS + s_off  # [BS_PAD]
        pos_ok = (s_off < BS) & (pos < T)
        dk_off = tl.arange(0, DK_PAD)
        dv_off = tl.arange(0, DV_PAD)
        k_rows = b * stride_kb + g * stride_kh + pos[:, None] * stride_kt + dk_off[None, :]
        v_rows = b * stride_vb + g * stride_vh + pos[:, None] * stride_vt + dv_off[None, :]
        k_mask = pos_ok[:, None] & (dk_off[None, :] < DK)
        v_mask = pos_ok[:, None] & (dv_off[None, :] < DV)
        kb = tl.load(k_ptr + k_rows, mask=k_mask, other=0.0)  # [BS_PAD, DK_PAD]
        vb = tl.load(v_ptr + v_rows, mask=v_mask, other=0.0)  # [BS_PAD, DV_PAD]

        rows = tl.arange(0, QB * G_PAD)
        row_q = rows // G_PAD  # query slot within the step
        row_h = rows % G_PAD
        head = g * G + row_h  # [ROWS]
        scale_log2 = scale * 1.4426950408889634
        dk_acc = tl.zeros((BS_PAD, DK_PAD), tl.float32)
        dv_acc = tl.zeros((BS_PAD, DV_PAD), tl.float32)
        for e0 in range(start, end, QB):
            entry = e0 + row_q
            row_ok = (entry < end) & (row_h < G)
            t = tl.load(entry_t_ptr + entry, mask=row_ok, other=0).to(tl.int64)  # [ROWS]
            q = tl.load(
                q_ptr + b * stride_qb + head[:, None] * stride_qh + t[:, None] * stride_qt + dk_off[None, :],
                mask=row_ok[:, None] & (dk_off[None, :] < DK),
                other=0.0,
            )  # [ROWS, DK_PAD]
            do = tl.load(
                do_ptr + b * stride_ob + head[:, None] * stride_oh + t[:, None] * stride_ot + dv_off[None, :],
                mask=row_ok[:, None] & (dv_off[None, :] < DV),
                other=0.0,
            )  # [ROWS, DV_PAD]
            stat_off = b * stride_lb + head * stride_lh + t
            lse = tl.load(lse_ptr + stat_off, mask=row_ok, other=0.0)
            lse2 = tl.where(lse == float("-inf"), 0.0, lse * 1.4426950408889634)
            delta = tl.load(delta_ptr + stat_off, mask=row_ok, other=0.0)
            logits = mma(q, tl.trans(kb), IEEE, UPCAST) * scale_log2  # [ROWS, BS_PAD]
            valid = row_ok[:, None] & pos_ok[None, :] & (pos[None, :] <= t[:, None])
            p = tl.where(valid, tl.exp2(logits - lse2[:, None]), 0.0)
            dv_acc += mma(tl.trans(p.to(do.dtype)), do, IEEE, UPCAST)
            dp = mma(do, tl.trans(vb), IEEE, UPCAST)  # [ROWS, BS_PAD]
            ds = (p * (dp - delta[:, None])).to(q.dtype)  # [ROWS, BS_PAD]
            dk_acc += mma(tl.trans(ds), q, IEEE, UPCAST)
            if STORE_DS:
                in_item = entry < end  # [ROWS]
                e_pos = tl.load(entry_pos_ptr + entry, mask=in_item, other=0).to(tl.int64)  # [ROWS]
                ds_off = e_pos[:, None] * (G_PAD * BS_PAD) + row_h[:, None] * BS_PAD + s_off[None, :]
                tl.store(ds_ptr + ds_off, ds, mask=in_item[:, None])
        dk_acc = dk_acc * scale

        if ATOMIC:
            tl.atomic_add(dk_out_ptr + k_rows, dk_acc, mask=k_mask)
            tl.atomic_add(dv_out_ptr + v_rows, dv_acc, mask=v_mask)
        else:
            part_k = w * (BS_PAD * DK_PAD) + s_off[:, None] * DK_PAD + dk_off[None, :]
            part_v = w * (BS_PAD * DV_PAD) + s_off[:, None] * DV_PAD + dv_off[None, :]
            tl.store(dk_out_ptr + part_k, dk_acc)
            tl.store(dv_out_ptr + part_v, dv_acc)


@triton.jit
def _dkv_reduce_kernel(
    dk_part_ptr,  # [W, BS_PAD, DK_PAD] float32
    dv_part_ptr,
    first_item_ptr,  # [NUM_KEYS] int32
    num_items_ptr,  # [NUM_KEYS] int32
    dk_ptr,  # [B, HKV, T, DK] (output)
    dv_ptr,
    T,
    HKV,
    NB,
    stride_kb,
    stride_kh,
    stride_kt,
    stride_vb,
    stride_vh,
    stride_vt,
    DK: tl.constexpr,
    DK_PAD: tl.constexpr,
    DV: tl.constexpr,
    DV_PAD: tl.constexpr,
    BS: tl.constexpr,
    BS_PAD: tl.constexpr,
):
    """dK/dV of one block: the sum of its work items' partials in order (deterministic)."""
    key = tl.program_id(0)
    bg = key // NB
    blk = (key % NB).to(tl.int64)
    b = (bg // HKV).to(tl.int64)
    g = (bg % HKV).to(tl.int64)
    first = tl.load(first_item_ptr + key).to(tl.int64)
    count = tl.load(num_items_ptr + key)
    s_off = tl.arange(0, BS_PAD)
    dk_off = tl.arange(0, DK_PAD)
    dv_off = tl.arange(0, DV_PAD)
    dk_acc = tl.zeros((BS_PAD, DK_PAD), tl.float32)
    dv_acc = tl.zeros((BS_PAD, DV_PAD), tl.float32)
    for i in range(count):  # fixed order: deterministic
        item = first + i
        dk_acc += tl.load(dk_part_ptr + item * (BS_PAD * DK_PAD) + s_off[:, None] * DK_PAD + dk_off[None, :])
        dv_acc += tl.load(dv_part_ptr + item * (BS_PAD * DV_PAD) + s_off[:, None] * DV_PAD + dv_off[None, :])
    pos = blk * BS + s_off
    pos_ok = (s_off < BS) & (pos < T)
    tl.store(
        dk_ptr + b * stride_kb + g * stride_kh + pos[:, None] * stride_kt + dk_off[None, :],
        dk_acc.to(dk_ptr.dtype.element_ty),
        mask=pos_ok[:, None] & (dk_off[None, :] < DK),
    )
    tl.store(
        dv_ptr + b * stride_vb + g * stride_vh + pos[:, None] * stride_vt + dv_off[None, :],
        dv_acc.to(dv_ptr.dtype.element_ty),
        mask=pos_ok[:, None] & (dv_off[None, :] < DV),
    )


def build_reverse_index(indices: torch.Tensor, num_blocks: int, chunk: int = DKV_CHUNK) -> dict:
    """Block -> queries index of a selection ``[B, HKV, T, n]`` (``-1`` = unused), by torch ops.

    Keys ``(b * HKV + g) * NB + block`` of all slots are stably sorted; ``entry_t[e]`` is the query
    of sorted entry ``e`` (``entry_pos[e]`` its flat position in ``indices``: ``((b * HKV + g) * T + t)
    * n + slot``), and key ``k`` owns entries ``[offsets[k], offsets[k+1])``. Each key's list is cut
    into ``ceil(len / chunk)`` work items (none for an empty list); item ``w`` covers entries
    ``[item_start[w], item_end[w])`` of key ``item_key[w]`` (``>= NUM_KEYS``: nothing to do). Key
    ``k``'s items are ``first_item[k] .. first_item[k] + num_items[k] - 1``. All shapes are static.
    """
    B, HKV, T, n = indices.shape
    if B * HKV * T * n >= 2**31:  # entries and item bounds are int32
        raise ValueError(f"indices has {B * HKV * T * n} slots; the selected backward supports fewer than 2**31")
    device = indices.device
    num_keys = B * HKV * num_blocks
    total = B * HKV * T * n
    flat = indices.reshape(B * HKV, T * n).to(torch.int32)  # [B * HKV, T * n]
    group = torch.arange(B * HKV, device=device, dtype=torch.int32)[:, None]  # b * HKV + g
    keys = torch.where(flat >= 0, group * num_blocks + flat, num_keys).reshape(-1)  # [L], invalid slots last
    sorted_keys, order = torch.sort(keys, stable=True)  # [L]
    entry_t = ((order // n) % T).to(torch.int32)  # [L]
    entry_pos = order.to(torch.int32)  # [L] flat index slot of each entry
    bounds = torch.arange(num_keys + 1, device=device, dtype=sorted_keys.dtype)
    offsets = torch.searchsorted(sorted_keys, bounds)  # [NUM_KEYS + 1]
    counts = offsets[1:] - offsets[:-1]  # [NUM_KEYS]
    num_items = (counts + chunk - 1) // chunk  # [NUM_KEYS]
    items_end = torch.cumsum(num_items, 0)  # [NUM_KEYS] inclusive
    first_item = items_end - num_items
    max_items = max(1, min(num_keys, total) + total // chunk)  # static bound on sum(num_items)
    w = torch.arange(max_items, device=device)
    item_key = torch.searchsorted(items_end, w, right=True)  # [W], == NUM_KEYS past the last item
    key_c = torch.clamp(item_key, max=num_keys - 1)
    start = offsets[key_c] + (w - first_item[key_c]) * chunk
    end = torch.minimum(start + chunk, offsets[key_c + 1])
    return dict(
        entry_t=entry_t,
        entry_pos=entry_pos,
        item_key=item_key.to(torch.int32),
        item_start=start.to(torch.int32),
        item_end=end.to(torch.int32),
        first_item=first_item.to(torch.int32),
        num_items=num_items.to(torch.int32),
        num_keys=num_keys,
        max_items=max_items,
    )


# dq from the dK/dV kernel's dS (``_dq_ds_kernel``) while that buffer (``2 * B * HKV * T * n *
# next_pow2(G) * l'`` bytes in 16-bit, 8x the size of q for the paper config) fits in this many
# bytes; else the direct dq kernels (which reload V and recompute dS per query and block).
DS_BUFFER_MAX_BYTES = 8 << 30
_DQ_TILE_KEYS = ("QT", "union_rows", "MAX_UNION", "union_warps")


def use_ds_buffer(dq_options: dict, ds_bytes: int) -> bool:
    """Whether the backward computes dq from a stored dS. Pops ``DS_BUFFER`` (True / False / None:
    automatic) from ``dq_options`` (``TUNING["selected_dq"]``). Automatic: yes while ``ds_bytes <=
    DS_BUFFER_MAX_BYTES``, unless query-tile keys (which configure the direct dq kernels) are set."""
    choice = dq_options.pop("DS_BUFFER", None)
    if choice is None:
        return ds_bytes <= DS_BUFFER_MAX_BYTES and not any(key in dq_options for key in _DQ_TILE_KEYS)
    if not isinstance(choice, bool):
        raise ValueError(f"TUNING['selected_dq']['DS_BUFFER'] must be True, False or None, got {choice!r}")
    return choice


def _dq_direct(launch, dq_opts, q, k, v, indices, out, grad_out, lse, dq, delta, scale, g_pad, n, shared):
    """dq (and delta) by the union and one-query kernels, each recomputing dS from K and V."""
    B, HQ, T, _ = q.shape
    HKV = k.shape[1]
    tiles = tile_plan(dq_opts, "selected_dq", B, HKV, T, HQ // HKV, n, max(shared["DK_PAD"], shared["DV_PAD"]), q.device)
    args = (q, k, v, indices, out, grad_out, lse, dq, delta)
    strides = selection_strides(q, k, v, indices, out, lse)
    qt, done = tiles["qt"], (delta if tiles["done"] is None else tiles["done"])  # delta: a placeholder pointer
    if qt > 1:
        launch(_dq_union_kernel)[(triton.cdiv(T, qt), B * HKV)](
            *args, done, T, HKV, scale, *strides,
            G_PAD=tiles["rows"], N=n, N_PAD=triton.next_power_of_2(n), QT=qt,
            MAX_UNION=tiles["max_union"], num_warps=tiles["union_warps"], num_stages=2, **shared,
        )  # fmt: skip
    if tiles["one_query"]:
        launch(_dq_kernel)[(T, B * HKV)](
            *args, done, T, HKV, scale, *strides, G_PAD=g_pad, N=n, TILE=qt if qt > 1 else 0, **dq_opts, **shared,
        )  # fmt: skip


def _dq_from_ds(launch, k, indices, ds, dq, scale, G, g_pad, g_rows, n, shared):
    """dq from the stored dS: tiles of ``QT`` queries over the union of their blocks
    (``_dq_ds_union_kernel``), or one query per program (``QT = 1``, ``_dq_ds_kernel``).
    ``TUNING["selected_dq_ds"]``: QT, num_warps, num_stages."""
    B, HKV, T, _ = k.shape
    # tiles of 4 queries when they fit the 16 rows one query's tile has anyway (G <= 4): H200, small-group
    # shape (G = 4), whole selected backward 2.74 against 3.36 ms at 8k, 24.8 against 25.8 at 64k; for
    # G = 16 (64-row tiles) slower: 3.96 against 3.52 ms at 8k (sweep-8.md)
    opts = tuned("selected_dq_ds", QT=4 if 4 * union_head_rows(G, 4) <= g_pad else 1, num_stages=2)
    qt = opts.pop("QT")
    if not isinstance(qt, int) or qt < 1 or qt & (qt - 1):
        raise ValueError(f"TUNING['selected_dq_ds']['QT'] must be a power of two, got {qt!r}")
    dims = dict(DS_ROWS=g_rows, DK=shared["DK"], DK_PAD=shared["DK_PAD"], BS=shared["BS"], BS_PAD=shared["BS_PAD"], N=n,
                IEEE=shared["IEEE"], UPCAST=shared["UPCAST"])
    strides = (*dq.stride()[:3], *k.stride()[:3], *indices.stride()[:3])
    if qt == 1:  # 2 stages: H200, paper shape, whole selected backward 3.51 / 26.4 ms at 8k / 64k
        # against 3.59 / 28.1 with 3 (perf/results/h200/sweep-7.md)
        launch(_dq_ds_kernel)[(T, B * HKV)](
            k, indices, ds, dq, T, HKV, scale, *strides, G=G, G_PAD=g_pad, **dims, **{"num_warps": 4, **opts},
        )  # fmt: skip
        return
    rows = union_head_rows(G, qt)
    warps = 2 if rows * qt * dims["DK_PAD"] <= 16 * 128 else (4 if rows * qt * dims["DK_PAD"] <= 64 * 128 else 8)
    launch(_dq_ds_union_kernel)[(triton.cdiv(T, qt), B * HKV)](
        k, indices, ds, dq, T, HKV, scale, *strides, G=G, G_ROWS=rows, N_PAD=triton.next_power_of_2(n), QT=qt,
        **dims, **{"num_warps": warps, **opts},
    )  # fmt: skip


def selected_bwd_launch(launch, grad_out, q, k, v, out, lse, indices, slc_block: int, scale: float, atomic: bool,
                        delta=None):  # fmt: skip
    """Runs the backward kernels on contiguous inputs; returns ``(dq, dk, dv)`` in the input dtypes.

    ``atomic=False``: dK/dV deterministic (partials summed in a fixed order); dq always is. With the
    dS buffer (:func:`use_ds_buffer`): delta (unless given: contiguous float32 ``[B, HQ, T]``
    ``rowsum(out * grad_out)``), dK/dV (also storing dS), dq from dS; else dq (also writing delta,
    a given one is not used), then dK/dV.
    """
    B, HQ, T, Dk = q.shape
    HQ, HKV, Dk, Dv, n = static_sizes(HQ, k.shape[1], Dk, v.shape[-1], indices.shape[-1])
    G = HQ // HKV
    nb = -(-T // slc_block)
    g_pad = head_tile(G)
    dk_pad, dv_pad, bs_pad = dims_pad(Dk), dims_pad(Dv), dims_pad(slc_block)
    shared = dict(G=G, DK=Dk, DK_PAD=dk_pad, DV=Dv, DV_PAD=dv_pad, BS=slc_block, BS_PAD=bs_pad, IEEE=q.dtype == torch.float32,
                  UPCAST=upcast_dots(q))

    g_rows = triton.next_power_of_2(G)  # head rows per query in the dK/dV kernel (and in dS)
    dq_opts = tuned("selected_dq", num_warps=4 if g_pad * max(dk_pad, dv_pad) <= 16 * 128 else 8, num_stages=2)
    ds_path = use_ds_buffer(dq_opts, B * HKV * T * n * g_rows * bs_pad * q.element_size())
    dq = torch.empty_like(q)  # [B, HQ, T, Dk]
    if not ds_path:  # dq first (it writes delta; a given one is not used)
        delta = torch.empty(B, HQ, T, dtype=torch.float32, device=q.device)  # [B, HQ, T]
        _dq_direct(launch, dq_opts, q, k, v, indices, out, grad_out, lse, dq, delta, scale, g_pad, n, shared)
    elif delta is None:  # delta now (unless the caller had it); dq after the dK/dV kernel, from its dS
        delta = torch.empty(B, HQ, T, dtype=torch.float32, device=q.device)  # [B, HQ, T]
        rows = B * HQ * T
        block_r = max(1, 4096 // dv_pad)
        launch(_delta_kernel)[(triton.cdiv(rows, block_r),)](
            out, grad_out, delta, rows, DV=Dv, DV_PAD=dv_pad, BLOCK_R=block_r, num_warps=4
        )

    # 4 warps: 8 warps needed 207 registers (one CTA per SM, latency-bound); 4 warps ran the whole
    # backward 1.46x faster at 64k on the H200 (perf/NOTES.md, sweep)
    dkv_opts = tuned("selected_dkv", num_warps=4, num_stages=2, ROWS=64, CHUNK=dkv_chunk(B * HKV * T * n))
    rev = build_reverse_index(indices, nb, dkv_opts.pop("CHUNK"))
    qb = max(1, dkv_opts.pop("ROWS") // g_rows)
    if atomic:
        dk_out = torch.zeros(B, HKV, T, Dk, dtype=torch.float32, device=q.device)  # [B, HKV, T, Dk]
        dv_out = torch.zeros(B, HKV, T, Dv, dtype=torch.float32, device=q.device)  # [B, HKV, T, Dv]
    else:
        dk_out = torch.empty(rev["max_items"], bs_pad, dk_pad, dtype=torch.float32, device=q.device)  # [W, BS, Dk]
        dv_out = torch.empty(rev["max_items"], bs_pad, dv_pad, dtype=torch.float32, device=q.device)  # [W, BS, Dv]
    # [B * HKV * T * n, g_rows, BS_PAD]: dS of every index slot (rows of -1 slots stay unwritten, never read)
    ds = torch.empty(B * HKV * T * n, g_rows, bs_pad, dtype=q.dtype, device=q.device) if ds_path else delta
    launch(_dkv_kernel)[(rev["max_items"],)](
        q, k, v, grad_out, lse, delta,
        rev["entry_t"], rev["item_key"], rev["item_start"], rev["item_end"],
        dk_out, dv_out, rev["entry_pos"], ds, T, HKV, nb, rev["num_keys"], scale,
        q.stride(0), q.stride(1), q.stride(2),
        k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        out.stride(0), out.stride(1), out.stride(2),
        lse.stride(0), lse.stride(1),
        G_PAD=g_rows, QB=qb, ATOMIC=atomic, STORE_DS=ds_path, **dkv_opts,
        **shared,
    )  # fmt: skip
    if ds_path:
        _dq_from_ds(launch, k, indices, ds, dq, scale, G, g_pad, g_rows, n, shared)
    if atomic:
        return dq, dk_out.to(k.dtype), dv_out.to(v.dtype)

    dk = torch.empty_like(k)  # [B, HKV, T, Dk]
    dv = torch.empty_like(v)  # [B, HKV, T, Dv]
    launch(_dkv_reduce_kernel)[(rev["num_keys"],)](
        dk_out, dv_out, rev["first_item"], rev["num_items"], dk, dv, T, HKV, nb,
        dk.stride(0), dk.stride(1), dk.stride(2),
        dv.stride(0), dv.stride(1), dv.stride(2),
        DK=Dk, DK_PAD=dk_pad, DV=Dv, DV_PAD=dv_pad, BS=slc_block, BS_PAD=bs_pad,
        **tuned("selected_dkv_reduce", num_warps=8),
    )  # fmt: skip
    return dq, dk, dv
