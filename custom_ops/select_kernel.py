"""Triton kernel: NSA block scores and top-n selection in one pass (NSA_SPEC.md, branch 2, steps 1-4).

For a KV group ``g`` and query ``t`` the kernel computes, without storing any ``[T, Tc]`` or
``[T, NB]`` tensor,

    p[h, t, i]  = exp(scale * q[h, t] . k_cmp[g, i] - lse[h, t])      for visible i (i*d + l - 1 <= t)
    P[t, i]     = sum_{h in group g} p[h, t, i]
    score[t, j] = sum_i w[i, j] P[t, i],   w[i, j] = |[i*d, i*d+l) ∩ [j*l', (j+1)*l')| / d

and keeps, per query, a running top-n over the eligible blocks ``j <= t // l'`` with the forced
blocks (``j < num_init`` or ``j > t // l' - num_local``) at ``+inf`` and the ineligible ones at
``-inf``; equal keys go to the lower block index. The group sum is taken before the overlap
weights (the reference sums after); both are float32 and agree up to rounding, which is what the
tie-aware comparison of NSA_SPEC.md allows.

Work split: one program per (tile of ``BLOCK_T`` queries, batch x KV head). The loop runs over
chunks of ``BLOCKS_PER_CHUNK`` selection blocks. Block ``j`` reads the compressed tokens
``i = j*R + o`` with ``o`` in ``[-(M-1), R-1]`` (``R = l'/d``, ``M = l/d``) and weight
``w(o) = min(o + M, R) - max(o, 0)``: a chunk of blocks starting at ``j0`` needs the ``BLOCK_C``
tokens starting at ``j0*R - (M-1)``, so neighbouring chunks recompute ``M-1`` tokens. The scores
of a chunk, ``[BLOCK_T, BLOCK_J]``, are merged into the running top-n ``[BLOCK_T, N_PAD]`` by ``n``
passes of argmax; a chunk whose best key beats no row's current n-th key is skipped.

Three paths, chosen by ``FLEXNSA_SELECT_IMPL`` at every launch: ``split`` (the default), ``v2`` and
``v1`` (the description above). v2 keeps the n best blocks unordered and, while a row's best new block
beats its worst kept one (a strictly higher key), swaps them (rounds = entries, not n); skips the
visibility mask on steps fully visible to the tile; uses ``exp2``; splits the head dim into two
powers of two (192 = 128 + 64) instead of padding; prefetches the next step's ``k_cmp`` by hand.
See perf/NOTES.md, "select kernel v2".

v2 and split form the block scores of a chunk, ``sum_i w[i, j] P[t, i]``, as band sums where the band
applies (``BANDED``, the default when ``R`` is a power of two: a reshape of the chunk's columns to
``[blocks, R]``, a weighted sum over ``R`` and the first ``M - 1`` columns of the next group), else as a
float32 product with the weight matrix, whose operands pass through shared memory.

split takes v2's data-dependent merge out of the chunk loop: the v2 kernel with ``STORE_KEYS`` stores
each chunk's keys (the same tiles and arithmetic, so the same float32 keys) into a buffer
``[B, HKV, TQ, NB]`` float32, and ``_topn_kernel`` bisects each row's n-th largest key (see the comment
above it). The queries run in chunks of ``TQ`` (a Python loop of launches) that keep the buffer within
``SPLIT_KEYS_BYTES``: it grows as ``T * NB``, quadratically in T.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from .kernel_utils import LOG2E, mma, static_sizes, tuned, upcast_dots

__all__ = ["select_topn_launch", "select_impl"]

_BIG_INDEX = tl.constexpr(1 << 30)  # "no block": larger than any block index


@triton.jit
def _select_topn_kernel(
    q_ptr,  # [B, HQ, T, DK]
    kc_ptr,  # [B, HKV, Tc, DK]
    lse_ptr,  # [B, HQ, T] float32
    idx_ptr,  # [B, HKV, T, N] int32 (output)
    T,
    Tc,
    HKV,
    scale: tl.constexpr,  # constexpr: inductor passes a python float as an fp64 scalar (H200, torch 2.11)
    stride_qb,
    stride_qh,
    stride_qt,
    stride_kb,
    stride_kh,
    stride_kt,
    stride_lb,
    stride_lh,
    stride_ib,
    stride_ih,
    stride_it,
    G: tl.constexpr,
    G_PAD: tl.constexpr,
    HEAD_STEP: tl.constexpr,  # query heads per dot; G_PAD // HEAD_STEP dots per chunk
    DK: tl.constexpr,
    D_PAD: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_J: tl.constexpr,
    BLOCKS_PER_CHUNK: tl.constexpr,
    R: tl.constexpr,  # l' / d
    M: tl.constexpr,  # l / d
    CMP_BLOCK: tl.constexpr,
    CMP_STRIDE: tl.constexpr,
    SLC_BLOCK: tl.constexpr,
    N: tl.constexpr,
    N_PAD: tl.constexpr,
    NUM_INIT: tl.constexpr,
    NUM_LOCAL: tl.constexpr,
    IEEE: tl.constexpr,  # float32 inputs: exact float32 products, not TF32
    UPCAST: tl.constexpr,
):
    pid_t = tl.num_programs(0) - 1 - tl.program_id(0)  # longest (latest) query tiles first
    pid_bg = tl.program_id(1)
    b = (pid_bg // HKV).to(tl.int64)
    g = (pid_bg % HKV).to(tl.int64)
    t0 = pid_t * BLOCK_T

    rows = tl.arange(0, BLOCK_T * HEAD_STEP)
    row_t = t0 + rows // HEAD_STEP  # [ROWS] query position of each row
    row_hs = rows % HEAD_STEP  # [ROWS] head within the step
    d_off = tl.arange(0, D_PAD)
    d_ok = d_off < DK

    tq = t0 + tl.arange(0, BLOCK_T)  # [BLOCK_T]
    own_block = tq // SLC_BLOCK  # [BLOCK_T]
    last_block = (tl.minimum(t0 + BLOCK_T, T) - 1) // SLC_BLOCK
    num_chunks = last_block // BLOCKS_PER_CHUNK + 1

    c_off = tl.arange(0, BLOCK_C)
    jj = tl.arange(0, BLOCK_J)
    slot = tl.arange(0, N_PAD)
    kc_base = kc_ptr + b * stride_kb + g * stride_kh

    if HEAD_STEP == G_PAD:  # all heads of the group in one dot: keep the query tile resident
        head = g * G + row_hs
        row_ok = (row_t < T) & (row_hs < G)
        q_off = b * stride_qb + head * stride_qh + row_t.to(tl.int64) * stride_qt
        q_res = tl.load(q_ptr + q_off[:, None] + d_off[None, :], mask=row_ok[:, None] & d_ok[None, :], other=0.0)
        lse_res = tl.load(lse_ptr + b * stride_lb + head * stride_lh + row_t, mask=row_ok, other=0.0)
        lse_res = tl.where(lse_res == float("-inf"), 0.0, lse_res)  # such rows see nothing: p = 0

    top_val = tl.full((BLOCK_T, N_PAD), float("-inf"), tl.float32)
    top_idx = tl.full((BLOCK_T, N_PAD), _BIG_INDEX, tl.int32)

    for chunk in range(num_chunks):
        j0 = chunk * BLOCKS_PER_CHUNK
        tok = j0 * R - (M - 1) + c_off  # [BLOCK_C] compressed token ids
        tok_ok = (tok >= 0) & (tok < Tc)
        kc = tl.load(
            kc_base + tok.to(tl.int64)[:, None] * stride_kt + d_off[None, :],
            mask=tok_ok[:, None] & d_ok[None, :],
            other=0.0,
        )  # [BLOCK_C, D_PAD]
        visible = tok_ok[None, :] & (tok[None, :] * CMP_STRIDE + CMP_BLOCK - 1 <= row_t[:, None])  # [ROWS, C]
        if HEAD_STEP == G_PAD:
            logits = mma(q_res, tl.trans(kc), IEEE, UPCAST) * scale  # [ROWS, BLOCK_C]
            row_ok = (row_t < T) & (row_hs < G)
            probs = tl.where(visible & row_ok[:, None], tl.exp(logits - lse_res[:, None]), 0.0)
            group_probs = tl.sum(tl.reshape(probs, (BLOCK_T, HEAD_STEP, BLOCK_C)), axis=1)  # [BLOCK_T, C]
        else:
            group_probs = tl.zeros((BLOCK_T, BLOCK_C), tl.float32)
            for step in tl.static_range(G_PAD // HEAD_STEP):
                head = g * G + step * HEAD_STEP + row_hs
                row_ok = (row_t < T) & (step * HEAD_STEP + row_hs < G)
                q_off = b * stride_qb + head * stride_qh + row_t.to(tl.int64) * stride_qt
                q_sub = tl.load(
                    q_ptr + q_off[:, None] + d_off[None, :], mask=row_ok[:, None] & d_ok[None, :], other=0.0
                )
                lse_sub = tl.load(lse_ptr + b * stride_lb + head * stride_lh + row_t, mask=row_ok, other=0.0)
                lse_sub = tl.where(lse_sub == float("-inf"), 0.0, lse_sub)
                logits = mma(q_sub, tl.trans(kc), IEEE, UPCAST) * scale
                probs = tl.where(visible & row_ok[:, None], tl.exp(logits - lse_sub[:, None]), 0.0)
                group_probs += tl.sum(tl.reshape(probs, (BLOCK_T, HEAD_STEP, BLOCK_C)), axis=1)

        # overlap weights of token tok (row) in block j0 + jj (column)
        offset = tok[:, None] - (j0 + jj[None, :]) * R  # [BLOCK_C, BLOCK_J]
        weight = tl.minimum(offset + M, R) - tl.maximum(offset, 0)
        weight = tl.where((weight > 0) & (jj[None, :] < BLOCKS_PER_CHUNK), weight, 0).to(tl.float32)
        scores = tl.dot(group_probs, weight, input_precision="ieee")  # [BLOCK_T, BLOCK_J]

        blk = j0 + jj  # [BLOCK_J]
        eligible = (jj[None, :] < BLOCKS_PER_CHUNK) & (blk[None, :] <= own_block[:, None])
        forced = eligible & ((blk[None, :] < NUM_INIT) | (blk[None, :] > own_block[:, None] - NUM_LOCAL))
        key = tl.where(forced, float("inf"), tl.where(eligible, scores, float("-inf")))  # [BLOCK_T, BLOCK_J]

        # merge only if some row's best new key beats its current n-th key
        nth_key = tl.min(tl.where(slot[None, :] < N, top_val, float("inf")), axis=1)
        improves = tl.max(key, axis=1) > nth_key
        if tl.max(improves.to(tl.int32), axis=0) > 0:
            new_val = tl.full((BLOCK_T, N_PAD), float("-inf"), tl.float32)
            new_idx = tl.full((BLOCK_T, N_PAD), _BIG_INDEX, tl.int32)
            blk_2d = tl.zeros((BLOCK_T, BLOCK_J), tl.int32) + blk[None, :]
            for s in range(N):
                best_old = tl.max(top_val, axis=1)  # [BLOCK_T]
                arg_old = tl.min(tl.where(top_val == best_old[:, None], top_idx, _BIG_INDEX), axis=1)
                best_new = tl.max(key, axis=1)
                arg_new = tl.min(tl.where(key == best_new[:, None], blk_2d, _BIG_INDEX), axis=1)
                take_old = best_old >= best_new  # old entries hold lower block indices: they win ties
                pick_val = tl.where(take_old, best_old, best_new)
                pick_idx = tl.where(take_old, arg_old, arg_new)
                gone_old = take_old[:, None] & (top_idx == arg_old[:, None])
                top_val = tl.where(gone_old, float("-inf"), top_val)
                top_idx = tl.where(gone_old, _BIG_INDEX, top_idx)
                key = tl.where((~take_old)[:, None] & (blk_2d == arg_new[:, None]), float("-inf"), key)
                new_val = tl.where(slot[None, :] == s, pick_val[:, None], new_val)
                new_idx = tl.where(slot[None, :] == s, pick_idx[:, None], new_idx)
            top_val = new_val
            top_idx = new_idx

    out = tl.where(top_val > float("-inf"), top_idx, -1)  # [BLOCK_T, N_PAD]
    out_ptrs = idx_ptr + b * stride_ib + g * stride_ih + tq.to(tl.int64)[:, None] * stride_it + slot[None, :]
    tl.store(out_ptrs, out, mask=(tq[:, None] < T) & (slot[None, :] < N))


# ---- v2: rank merge, split head dim, exp2 ------------------------------------------------------
@triton.jit
def _load_q_part(q_ptr, q_off, row_ok, D0: tl.constexpr, DP: tl.constexpr, DK: tl.constexpr):
    """``[ROWS, DP]`` columns ``D0 .. D0 + DP`` of the query rows (zero outside ``DK`` and masked rows)."""
    d_off = D0 + tl.arange(0, DP)
    return tl.load(q_ptr + q_off[:, None] + d_off[None, :], mask=row_ok[:, None] & (d_off < DK)[None, :], other=0.0)


@triton.jit
def _load_kc_part(kc_base, tok, tok_ok, stride_kt, D0: tl.constexpr, DP: tl.constexpr, DK: tl.constexpr):
    """``[BLOCK_C, DP]`` columns ``D0 .. D0 + DP`` of the compressed keys ``tok``."""
    d_off = D0 + tl.arange(0, DP)
    ptrs = kc_base + tok.to(tl.int64)[:, None] * stride_kt + d_off[None, :]
    return tl.load(ptrs, mask=tok_ok[:, None] & (d_off < DK)[None, :], other=0.0)


@triton.jit
def _lse_log2(lse, row_ok):
    """lse in log2 units for ``exp2``: rows that see nothing (``-inf``) -> 0 (the visibility mask
    zeroes them), rows outside the problem -> ``+inf`` (p = 0 without a mask)."""
    lse = tl.where(lse == float("-inf"), 0.0, lse) * 1.4426950408889634
    return tl.where(row_ok, lse, float("inf"))


@triton.jit
def _select_topn_kernel_v2(
    q_ptr,  # [B, HQ, T, DK]
    kc_ptr,  # [B, HKV, Tc, DK]
    lse_ptr,  # [B, HQ, T] float32
    idx_ptr,  # [B, HKV, T, N] int32 (output)
    T,
    Tc,
    HKV,
    scale_log2: tl.constexpr,  # scale * log2(e); constexpr: inductor would pass an fp64 scalar
    stride_qb,
    stride_qh,
    stride_qt,
    stride_kb,
    stride_kh,
    stride_kt,
    stride_lb,
    stride_lh,
    stride_ib,
    stride_ih,
    stride_it,
    G: tl.constexpr,
    G_PAD: tl.constexpr,
    HEAD_STEP: tl.constexpr,  # query heads per dot; G_PAD // HEAD_STEP dots per chunk
    DK: tl.constexpr,
    D_A: tl.constexpr,  # head dim = D_A (power of two) + D_B (power of two or 0): 192 = 128 + 64, no padding to 256
    D_B: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_J: tl.constexpr,
    BLOCKS_PER_CHUNK: tl.constexpr,
    R: tl.constexpr,  # l' / d
    M: tl.constexpr,  # l / d
    CMP_BLOCK: tl.constexpr,
    CMP_STRIDE: tl.constexpr,
    SLC_BLOCK: tl.constexpr,
    N: tl.constexpr,
    N_PAD: tl.constexpr,
    NUM_INIT: tl.constexpr,
    NUM_LOCAL: tl.constexpr,
    IEEE: tl.constexpr,
    UPCAST: tl.constexpr,
    TRANS: tl.constexpr,  # k_cmp @ q^T (needs HEAD_STEP == G_PAD)
    SKIP_MERGE: tl.constexpr,  # timing diagnostic only (perf/gpu_sweep.py): no top-n merge, WRONG indices
    PREFETCH: tl.constexpr,  # load the next chunk's keys by hand (v2's default), else in the chunk's own iteration
    BANDED: tl.constexpr,  # block scores as band sums of the chunk's columns (R a power of two, BLOCK_C = BLOCK_J * R, M <= R + 1), not a float32 product
    keys_ptr,  # STORE_KEYS: [B, HKV, TQ, NB] float32 (output), else None
    t_start,  # STORE_KEYS: first query of this launch (the grid covers queries t_start ..)
    stride_yb,
    stride_yh,
    stride_yt,
    STORE_KEYS: tl.constexpr,  # "split": store each chunk's keys instead of merging (idx_ptr unused)
):
    pid_t = tl.num_programs(0) - 1 - tl.program_id(0)  # longest (latest) query tiles first
    pid_bg = tl.program_id(1)
    b = (pid_bg // HKV).to(tl.int64)
    g = (pid_bg % HKV).to(tl.int64)
    t0 = pid_t * BLOCK_T
    if STORE_KEYS:
        t0 += t_start

    rows = tl.arange(0, BLOCK_T * HEAD_STEP)
    row_t = t0 + rows // HEAD_STEP  # [ROWS] query position of each row
    row_hs = rows % HEAD_STEP  # [ROWS] head within the step

    tq = t0 + tl.arange(0, BLOCK_T)  # [BLOCK_T]
    own_block = tq // SLC_BLOCK  # [BLOCK_T]
    last_block = (tl.minimum(t0 + BLOCK_T, T) - 1) // SLC_BLOCK
    num_chunks = last_block // BLOCKS_PER_CHUNK + 1

    c_off = tl.arange(0, BLOCK_C)
    jj = tl.arange(0, BLOCK_J)
    slot = tl.arange(0, N_PAD)
    kc_base = kc_ptr + b * stride_kb + g * stride_kh

    if HEAD_STEP == G_PAD:  # all heads of the group in one dot: keep the query tile resident
        head = g * G + row_hs
        row_ok = (row_t < T) & (row_hs < G)
        q_off = b * stride_qb + head * stride_qh + row_t.to(tl.int64) * stride_qt
        q_a = _load_q_part(q_ptr, q_off, row_ok, 0, D_A, DK)
        if D_B > 0:
            q_b = _load_q_part(q_ptr, q_off, row_ok, D_A, D_B, DK)
        lse_res = tl.load(lse_ptr + b * stride_lb + head * stride_lh + row_t, mask=row_ok, other=0.0)
        lse_res = _lse_log2(lse_res, row_ok)

    # kept set of n blocks per row, unordered; empty slots hold -inf and distinct indices >= 2^30 (so
    # the worst entry, lowest key then highest index, is one slot); padding slots (>= N) hold +inf
    slot_2d = tl.zeros((BLOCK_T, N_PAD), tl.int32) + slot[None, :]  # [BLOCK_T, N_PAD]
    top_val = tl.where(slot_2d < N, float("-inf"), float("inf"))
    top_idx = slot_2d + _BIG_INDEX

    # PREFETCH: compressed keys of chunk 0 here, and each iteration loads the next chunk's keys into
    # registers before its own merge (a hand-written prefetch: the data-dependent merge loop keeps
    # Triton from pipelining). Otherwise each iteration loads its own keys, which Triton's pipeliner
    # may stage in shared memory (the split path's scores kernel has no merge loop), saving the
    # registers of the prefetched tile.
    if PREFETCH:
        tok = -(M - 1) + c_off  # [BLOCK_C] compressed token ids of the chunk
        tok_ok = (tok >= 0) & (tok < Tc)
        kc_a = _load_kc_part(kc_base, tok, tok_ok, stride_kt, 0, D_A, DK)
        if D_B > 0:
            kc_b = _load_kc_part(kc_base, tok, tok_ok, stride_kt, D_A, D_B, DK)
    for chunk in range(num_chunks):
        j0 = chunk * BLOCKS_PER_CHUNK
        tok = j0 * R - (M - 1) + c_off
        tok_ok = (tok >= 0) & (tok < Tc)
        tok_next = tok + BLOCKS_PER_CHUNK * R
        next_ok = tok_next < Tc  # (the last iteration loads keys it does not use)
        if not PREFETCH:
            kc_a = _load_kc_part(kc_base, tok, tok_ok, stride_kt, 0, D_A, DK)  # [BLOCK_C, D_A]
            if D_B > 0:
                kc_b = _load_kc_part(kc_base, tok, tok_ok, stride_kt, D_A, D_B, DK)  # [BLOCK_C, D_B]
        # every token of the chunk visible to every query of the tile: no mask (rows past T or past
        # the group have lse = +inf, p = 0)
        full = (j0 * R - (M - 1) >= 0) & ((j0 * R - (M - 1) + BLOCK_C - 1) * CMP_STRIDE + CMP_BLOCK - 1 <= t0)
        if TRANS:  # tokens x (query, head): a query's heads lie along the accumulator's columns
            logits_t = mma(kc_a, tl.trans(q_a), IEEE, UPCAST)  # [BLOCK_C, ROWS]
            if D_B > 0:
                logits_t += mma(kc_b, tl.trans(q_b), IEEE, UPCAST)
            probs_t = tl.exp2(logits_t * scale_log2 - lse_res[None, :])
            if not full:
                visible_t = tok_ok[:, None] & (tok[:, None] * CMP_STRIDE + CMP_BLOCK - 1 <= row_t[None, :])
                probs_t = tl.where(visible_t, probs_t, 0.0)  # [BLOCK_C, ROWS]
            group_probs_t = tl.sum(tl.reshape(probs_t, (BLOCK_C, BLOCK_T, HEAD_STEP)), axis=2)  # [C, BLOCK_T]
            group_probs = tl.trans(group_probs_t)  # [BLOCK_T, BLOCK_C]
        elif HEAD_STEP == G_PAD:
            logits = mma(q_a, tl.trans(kc_a), IEEE, UPCAST)  # [ROWS, BLOCK_C]
            if D_B > 0:
                logits += mma(q_b, tl.trans(kc_b), IEEE, UPCAST)
            probs = tl.exp2(logits * scale_log2 - lse_res[:, None])
            if not full:
                visible = tok_ok[None, :] & (tok[None, :] * CMP_STRIDE + CMP_BLOCK - 1 <= row_t[:, None])
                probs = tl.where(visible, probs, 0.0)  # [ROWS, BLOCK_C]
            group_probs = tl.sum(tl.reshape(probs, (BLOCK_T, HEAD_STEP, BLOCK_C)), axis=1)  # [BLOCK_T, C]
        else:
            group_probs = tl.zeros((BLOCK_T, BLOCK_C), tl.float32)
            for step in tl.static_range(G_PAD // HEAD_STEP):
                head = g * G + step * HEAD_STEP + row_hs
                row_ok = (row_t < T) & (step * HEAD_STEP + row_hs < G)
                q_off = b * stride_qb + head * stride_qh + row_t.to(tl.int64) * stride_qt
                q_sub = _load_q_part(q_ptr, q_off, row_ok, 0, D_A, DK)
                logits = mma(q_sub, tl.trans(kc_a), IEEE, UPCAST)
                if D_B > 0:
                    q_sub_b = _load_q_part(q_ptr, q_off, row_ok, D_A, D_B, DK)
                    logits += mma(q_sub_b, tl.trans(kc_b), IEEE, UPCAST)
                lse_sub = tl.load(lse_ptr + b * stride_lb + head * stride_lh + row_t, mask=row_ok, other=0.0)
                probs = tl.exp2(logits * scale_log2 - _lse_log2(lse_sub, row_ok)[:, None])
                if not full:
                    visible = tok_ok[None, :] & (tok[None, :] * CMP_STRIDE + CMP_BLOCK - 1 <= row_t[:, None])
                    probs = tl.where(visible, probs, 0.0)
                group_probs += tl.sum(tl.reshape(probs, (BLOCK_T, HEAD_STEP, BLOCK_C)), axis=1)

        if PREFETCH:  # the next chunk's keys, before this chunk's merge
            kc_a = _load_kc_part(kc_base, tok_next, next_ok, stride_kt, 0, D_A, DK)
            if D_B > 0:
                kc_b = _load_kc_part(kc_base, tok_next, next_ok, stride_kt, D_A, D_B, DK)

        if BANDED:  # block jj sums the chunk's columns jj*R .. jj*R + R + M - 2: a band, no product
            x = tl.reshape(group_probs, (BLOCK_T, BLOCK_J, R))  # x[t, jj, r]: column jj*R + r
            r_off = tl.arange(0, R)
            w_own = (r_off + 1) - tl.maximum(r_off - (M - 1), 0)  # w(o) = min(o + M, R) - max(o, 0), o = r - (M-1)
            scores = tl.sum(x * w_own.to(tl.float32)[None, None, :], axis=2)  # [BLOCK_T, BLOCK_J]
            if M > 1:  # columns (jj+1)*R + r, r < M - 1: o = R + r - (M-1), w(o) = M - 1 - r
                w_next = tl.maximum(M - 1 - r_off, 0).to(tl.float32)
                tail = tl.sum(x * w_next[None, None, :], axis=2)  # [BLOCK_T, BLOCK_J]: group jj's share of block jj - 1
                nxt = tl.minimum(jj + 1, BLOCK_J - 1)  # (block BLOCK_J - 1 is past the chunk: never eligible)
                scores += tl.gather(tail, tl.broadcast_to(nxt[None, :], (BLOCK_T, BLOCK_J)), axis=1)
        else:
            # overlap weights of token tok (row) in block j0 + jj (column)
            offset = tok[:, None] - (j0 + jj[None, :]) * R  # [BLOCK_C, BLOCK_J]
            weight = tl.minimum(offset + M, R) - tl.maximum(offset, 0)
            weight = tl.where((weight > 0) & (jj[None, :] < BLOCKS_PER_CHUNK), weight, 0).to(tl.float32)
            scores = tl.dot(group_probs, weight, input_precision="ieee")  # [BLOCK_T, BLOCK_J]

        blk = j0 + jj  # [BLOCK_J]
        eligible = (jj[None, :] < BLOCKS_PER_CHUNK) & (blk[None, :] <= own_block[:, None])
        forced = eligible & ((blk[None, :] < NUM_INIT) | (blk[None, :] > own_block[:, None] - NUM_LOCAL))
        key = tl.where(forced, float("inf"), tl.where(eligible, scores, float("-inf")))  # [BLOCK_T, BLOCK_J]

        if STORE_KEYS:  # every block of the chunk up to the tile's last one (a row reads j <= its own block)
            y_rows = keys_ptr + b * stride_yb + g * stride_yh + (tq - t_start).to(tl.int64) * stride_yt
            y_ok = (tq < T)[:, None] & ((jj < BLOCKS_PER_CHUNK) & (blk <= last_block))[None, :]
            tl.store(y_rows[:, None] + blk[None, :], key, mask=y_ok)
        elif SKIP_MERGE:  # keeps the scores live (one row max) so the timing still includes them
            top_val = tl.maximum(top_val, tl.max(key, axis=1)[:, None])
        else:
            # Threshold insertion: the best new block replaces the kept set's worst entry while it
            # beats it (a strictly higher key: kept blocks have lower indices, so they win ties). Rows
            # without such a block do nothing; the loop runs max-over-rows-of-entries times (often 0).
            best_new = tl.max(key, axis=1)  # [BLOCK_T]
            worst_val = tl.min(top_val, axis=1)  # [BLOCK_T]
            worst_idx = tl.max(tl.where(top_val == worst_val[:, None], top_idx, -1), axis=1)
            enters = best_new > worst_val
            while tl.max(enters.to(tl.int32), axis=0) > 0:
                arg_new = tl.min(tl.where(key == best_new[:, None], jj[None, :], BLOCK_J), axis=1)  # lowest block
                out_slot = enters[:, None] & (top_idx == worst_idx[:, None])  # [BLOCK_T, N_PAD] one slot per row
                top_val = tl.where(out_slot, best_new[:, None], top_val)
                top_idx = tl.where(out_slot, (j0 + arg_new)[:, None], top_idx)
                key = tl.where(enters[:, None] & (jj[None, :] == arg_new[:, None]), float("-inf"), key)
                best_new = tl.max(key, axis=1)
                worst_val = tl.min(top_val, axis=1)
                worst_idx = tl.max(tl.where(top_val == worst_val[:, None], top_idx, -1), axis=1)
                enters = best_new > worst_val

    if not STORE_KEYS:
        out = tl.where(top_val > float("-inf"), top_idx, -1)  # [BLOCK_T, N_PAD]
        out_ptrs = idx_ptr + b * stride_ib + g * stride_ih + tq.to(tl.int64)[:, None] * stride_it + slot[None, :]
        tl.store(out_ptrs, out, mask=(tq[:, None] < T) & (slot[None, :] < N))


# ---- split: v2's scores stored per query chunk, then a top-n kernel per row --------------------
# The top-n of a row t reads its keys k[j], j <= t // l' (the later ones are -inf; the scores kernel
# may not have written them) as int32 patterns v with the order of the floats (+0 == -0, -inf and
# absent blocks -> INT32_MIN, never chosen) and binary-searches the n-th largest pattern theta:
#   lo: count(v >= lo) > n,  hi: count(v >= hi) = c_hi <= n,  from lo = INT32_MIN + 1, hi = INT32_MAX.
# A pass counts the keys >= mid = (lo + hi) // 2 (a compare and an add per key, a row reduction).
# A row stops when count(v >= hi) == n (the set is v >= hi: the first mid that falls between the n-th
# and the (n+1)-th key) or when hi == lo + 1 (theta = lo, at most 31 passes: exact ties): then the set
# is v >= hi plus the n - c_hi lowest blocks with v == lo (prefix count). Rows with at most n eligible
# blocks take them all (no pass). A program loops while one of its rows is not done. Simulated on the
# reference keys of random inputs (T=4096, paper config, G=16): 14.7 passes per row on average
# (max 24), 17.0 per program of 4 rows.
# Cost at 64k, paper shape (B=1, HKV=4, T=65536, l'=64 -> NB=1024, n=16; a PREDICTION, not measured):
# 262144 rows; a program holds ROWS=4 rows (4 warps, 32 keys per thread) of a width W in registers,
# W = 256, 512 or 1024 by the program's last own block (mean width 0.69 * 1024 = 704). Per key and
# pass ~2.5 instructions (compare, select, add): 262144 * 704 * 17 passes * 2.5 = 7.8e9, plus the row
# reductions (~10 warp instructions per row and pass: 262144 * 17 * 10 * 32 = 1.4e9 lane instructions)
# and per key once the load, the pattern map and two prefix sums (~15: 2.8e9): ~1.2e10 lane
# instructions, 0.36 ms at the H200's ~3.3e13 lane instructions/s (132 SMs x 128 lanes x 1.98 GHz);
# bytes: the keys read once, only j <= t // l' (262144 * 512.5 * 4 B = 0.54 GB, 0.13 ms at ~4 TB/s),
# the indices 17 MB. Predicted 0.4-0.7 ms; the scores kernel writes the same 0.54 GB (~0.15 ms more).
# Measured (torch.profiler, H200, perf/results/h200/profile-4.md): 1.85 ms for the 4 top-n launches at
# 64k with 2 rows on 4 warps: the per-pass row reductions then cross warps (shared memory and a
# barrier per pass). One row on one warp (the default since) took the whole select from 11.21 to
# 10.41 ms, i.e. the top-n to ~1.05 ms.
_INT32_MIN = tl.constexpr(-(2**31))
_INT32_MAX = tl.constexpr(2**31 - 1)
_INF_BITS = tl.constexpr(0x7F800000)  # the pattern of +inf (positive floats keep their bits)


@triton.jit
def _ordered_keys(key_rows, rows_ok, own, j, PADDED: tl.constexpr = False):
    """``[ROWS, W]`` int32 patterns of the keys of blocks ``j`` (ordered like the floats, ``+0 == -0``);
    ``INT32_MIN`` for ``-inf``, NaN and blocks after the row's own block (never read: ``PADDED``
    rows, at least ``W`` wide in memory, are loaded whole, a mask per row only, so that the loads
    are vectorised, and those blocks are dropped after the load)."""
    ok = rows_ok[:, None] & (j[None, :] <= own[:, None])
    if PADDED:
        key = tl.load(key_rows[:, None] + j[None, :], mask=rows_ok[:, None], other=float("-inf"))
        key = tl.where(ok, key, float("-inf"))
    else:
        key = tl.load(key_rows[:, None] + j[None, :], mask=ok, other=float("-inf"))
    bits = key.to(tl.int32, bitcast=True)
    bits = tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits)  # negative floats: reverse their order
    bits = tl.where(key == 0.0, 0, bits)
    return tl.where(key > float("-inf"), bits, _INT32_MIN)


@triton.jit
def _search_start(c_valid, N: tl.constexpr):
    """Search state ``(lo, hi, c_hi, done)`` of rows with ``c_valid`` eligible blocks; rows with at
    most ``N`` are done: all of them (``v >= hi = INT32_MIN + 1``)."""
    lo = tl.zeros_like(c_valid) + (_INT32_MIN + 1)
    done = c_valid <= N
    return lo, tl.where(done, lo, _INT32_MAX), tl.where(done, c_valid, 0), done


@triton.jit
def _search_step(c, mid, lo, hi, c_hi, done, N: tl.constexpr):
    """One bisection step given ``c = count(v >= mid)`` (rows already done keep their state)."""
    down = (c <= N) & ~done
    hi = tl.where(down, mid, hi)
    c_hi = tl.where(down, c, c_hi)
    lo = tl.where((c > N) & ~done, mid, lo)
    return lo, hi, c_hi, done | (c_hi == N) | (hi <= lo + 1)


@triton.jit
def _midpoint(lo, hi):
    return (lo >> 1) + (hi >> 1) + (lo & hi & 1)  # floor((lo + hi) / 2) without overflow


@triton.jit
def _store_taken(take, j, n_out, out_rows, rows_ok):
    """Stores the blocks ``j`` where ``take [ROWS, W]`` to each row's next slots (after its ``n_out``
    stored ones); returns the new ``n_out``."""
    pos = n_out[:, None] + tl.cumsum(take.to(tl.int32), axis=1) - 1
    tl.store(out_rows[:, None] + pos, tl.zeros_like(pos) + j[None, :], mask=take & rows_ok[:, None])
    return n_out + tl.sum(take.to(tl.int32), axis=1)


@triton.jit
def _emit(v, j, lo, hi, quota, ties_before, n_out, out_rows, rows_ok):
    """Stores the blocks ``j`` of one tile that the search chose (``v >= hi``, and ``v == lo`` while
    at most ``quota`` came before) to the row's next slots; returns the updated ``(ties_before, n_out)``."""
    tie = v == lo[:, None]
    rank = ties_before[:, None] + tl.cumsum(tie.to(tl.int32), axis=1)
    take = (v >= hi[:, None]) | (tie & (rank <= quota[:, None]))
    return ties_before + tl.sum(tie.to(tl.int32), axis=1), _store_taken(take, j, n_out, out_rows, rows_ok)


@triton.jit
def _bracket(v, lo, hi, c_hi, done, N: tl.constexpr, W: tl.constexpr):
    """A narrower start for the search of rows ``v [ROWS, W]`` (int32 patterns): with ``n_inf`` keys at
    +inf (the forced blocks) and ``K = N - n_inf``, the ``K``-th largest of ``GROUPS`` disjoint group
    maxima of the finite keys (group ``i``: blocks ``j = i mod GROUPS``) has at least ``K`` finite
    keys above or equal to it, so ``count(v >= lo0) >= N``; ``hi0 = max finite + 1`` has
    ``count = n_inf <= N``. Rows where ``K < 1`` or fewer than ``K`` groups hold a finite key keep
    the full range. Returns the updated ``(lo, hi, c_hi, done)`` (done when ``count(v >= lo0) == N``)."""
    GROUPS: tl.constexpr = 32 if W >= 32 else W
    finite = tl.where(v < _INF_BITS, v, _INT32_MIN)  # [ROWS, W]
    n_inf = tl.sum((v >= _INF_BITS).to(tl.int32), axis=1)  # [ROWS]
    m = tl.max(tl.reshape(finite, (v.shape[0], W // GROUPS, GROUPS)), axis=1)  # [ROWS, GROUPS]
    at_least = tl.sum((m[:, None, :] >= m[:, :, None]).to(tl.int32), axis=2)  # [ROWS, GROUPS]: #{i: m_i >= m_j}
    k = N - n_inf
    lo0 = tl.max(tl.where(at_least >= k[:, None], m, _INT32_MIN), axis=1)  # [ROWS]
    use = ~done & (k >= 1) & (lo0 > _INT32_MIN)
    lo0 = tl.where(use, lo0, lo)
    c_lo = tl.sum((v >= lo0[:, None]).to(tl.int32), axis=1)  # [ROWS]
    exact = use & (c_lo == N)
    lo = lo0
    hi = tl.where(exact, lo0, tl.where(use, tl.max(finite, axis=1) + 1, hi))
    c_hi = tl.where(exact, N, tl.where(use, n_inf, c_hi))
    return lo, hi, c_hi, done | exact


@triton.jit
def _topn_rows_resident(key_rows, out_rows, rows_ok, own, N: tl.constexpr, W: tl.constexpr, BRACKET: tl.constexpr,
                        PADDED: tl.constexpr):
    """Top-n of rows whose eligible blocks all lie in ``[0, W)``: the keys stay in registers."""
    j = tl.arange(0, W)
    v = _ordered_keys(key_rows, rows_ok, own, j, PADDED)  # [ROWS, W]
    lo, hi, c_hi, done = _search_start(tl.sum((v > _INT32_MIN).to(tl.int32), axis=1), N)
    if BRACKET:
        lo, hi, c_hi, done = _bracket(v, lo, hi, c_hi, done, N, W)
    while tl.max((~done).to(tl.int32), axis=0) > 0:
        mid = _midpoint(lo, hi)
        c = tl.sum((v >= mid[:, None]).to(tl.int32), axis=1)
        lo, hi, c_hi, done = _search_step(c, mid, lo, hi, c_hi, done, N)
    quota = N - c_hi  # [ROWS] blocks still to take among the ties at lo
    if tl.max(quota, axis=0) > 0:
        zero = tl.zeros_like(c_hi)
        _, n_out = _emit(v, j, lo, hi, quota, zero, zero, out_rows, rows_ok)
    else:  # the usual case: exactly N keys >= hi, no tie to rank
        n_out = _store_taken(v >= hi[:, None], j, tl.zeros_like(c_hi), out_rows, rows_ok)
    return n_out


@triton.jit
def _count_streamed(key_rows, rows_ok, own, mid, ncols, W: tl.constexpr):
    """``count(v >= mid)`` per row, the keys read in column tiles of ``W``."""
    c = tl.zeros_like(own)
    for c0 in range(0, ncols, W):
        v = _ordered_keys(key_rows, rows_ok, own, c0 + tl.arange(0, W))
        c += tl.sum((v >= mid[:, None]).to(tl.int32), axis=1)
    return c


@triton.jit
def _topn_rows_streamed(key_rows, out_rows, rows_ok, own, ncols, N: tl.constexpr, W: tl.constexpr):
    """Top-n of rows of any length: every pass re-reads the keys in column tiles of ``W``."""
    lowest = tl.zeros_like(own) + (_INT32_MIN + 1)
    lo, hi, c_hi, done = _search_start(_count_streamed(key_rows, rows_ok, own, lowest, ncols, W), N)
    while tl.max((~done).to(tl.int32), axis=0) > 0:
        mid = _midpoint(lo, hi)
        c = _count_streamed(key_rows, rows_ok, own, mid, ncols, W)
        lo, hi, c_hi, done = _search_step(c, mid, lo, hi, c_hi, done, N)
    ties_before = tl.zeros_like(c_hi)
    n_out = tl.zeros_like(c_hi)
    for c0 in range(0, ncols, W):
        j = c0 + tl.arange(0, W)
        v = _ordered_keys(key_rows, rows_ok, own, j)
        ties_before, n_out = _emit(v, j, lo, hi, N - c_hi, ties_before, n_out, out_rows, rows_ok)
    return n_out


@triton.jit
def _topn_kernel(
    keys_ptr,  # [B, HKV, TQ, NB] float32: keys of queries t_start .. t_start + TQ - 1
    idx_ptr,  # [B, HKV, T, N] int32 (output)
    T,
    TQ,
    HKV,
    t_start,
    stride_yb,
    stride_yh,
    stride_yt,
    stride_ib,
    stride_ih,
    stride_it,
    SLC_BLOCK: tl.constexpr,
    N: tl.constexpr,
    N_PAD: tl.constexpr,
    ROWS: tl.constexpr,
    W1: tl.constexpr,  # resident widths W1 <= W2 <= WIDTH (powers of two), the narrowest that holds the
    W2: tl.constexpr,  # program's last own block; STREAM: column tiles of WIDTH
    WIDTH: tl.constexpr,
    STREAM: tl.constexpr,
    BRACKET: tl.constexpr,  # resident rows: start the search from group maxima (_bracket)
    PADDED: tl.constexpr,  # every row at least WIDTH wide in memory (whole-row vector loads)
):
    """Per row (b, g, t) the n best keys (ties to the lower block) as block indices, unordered, -1 unused."""
    pid_bg = tl.program_id(1)
    b = (pid_bg // HKV).to(tl.int64)
    g = (pid_bg % HKV).to(tl.int64)
    r = tl.program_id(0) * ROWS + tl.arange(0, ROWS)  # [ROWS] rows of the keys buffer
    t = t_start + r
    rows_ok = (r < TQ) & (t < T)
    own = tl.where(rows_ok, t // SLC_BLOCK, -1)  # [ROWS] last eligible block
    ncols = tl.max(own, axis=0) + 1
    key_rows = keys_ptr + b * stride_yb + g * stride_yh + r.to(tl.int64) * stride_yt
    out_rows = idx_ptr + b * stride_ib + g * stride_ih + t.to(tl.int64) * stride_it
    if STREAM:
        n_out = _topn_rows_streamed(key_rows, out_rows, rows_ok, own, ncols, N, WIDTH)
    elif ncols <= W1:
        n_out = _topn_rows_resident(key_rows, out_rows, rows_ok, own, N, W1, BRACKET, PADDED)
    elif ncols <= W2:
        n_out = _topn_rows_resident(key_rows, out_rows, rows_ok, own, N, W2, BRACKET, PADDED)
    else:
        n_out = _topn_rows_resident(key_rows, out_rows, rows_ok, own, N, WIDTH, BRACKET, PADDED)
    slot = tl.arange(0, N_PAD)
    unused = rows_ok[:, None] & (slot[None, :] >= n_out[:, None]) & (slot[None, :] < N)
    tl.store(out_rows[:, None] + slot[None, :], tl.full((ROWS, N_PAD), -1, tl.int32), mask=unused)


def _kernel_plan(G: int, Dk: int, cmp_block: int, cmp_stride: int, slc_block: int) -> dict:
    """Tile sizes of the select kernel (all powers of two, dot operands >= 16 on each side)."""
    tuning = tuned("select")
    g_pad = triton.next_power_of_2(G)
    d_pad = max(16, triton.next_power_of_2(Dk))
    block_t = tuning.get("BLOCK_T", max(16, 128 // g_pad))
    head_step = g_pad
    while head_step > 1 and block_t * head_step * d_pad > 256 * 256:  # q tile (shared memory) <= 128 KiB in bf16
        head_step //= 2
    r, m = slc_block // cmp_stride, cmp_block // cmp_stride
    block_c = max(tuning.get("BLOCK_C", 64), triton.next_power_of_2(r + m - 1))
    per_chunk, block_j = _chunk_blocks(block_c, r, m)
    return dict(
        G_PAD=g_pad,
        HEAD_STEP=head_step,
        D_PAD=d_pad,
        BLOCK_T=block_t,
        BLOCK_C=block_c,
        BLOCK_J=block_j,
        BLOCKS_PER_CHUNK=per_chunk,
        R=r,
        M=m,
        num_warps=tuning.get("num_warps", 8 if block_t * head_step >= 128 else 4),
        num_stages=tuning.get("num_stages", 2),
    )


def _chunk_blocks(block_c: int, r: int, m: int) -> tuple[int, int]:
    """``(BLOCKS_PER_CHUNK, BLOCK_J)`` of a chunk of ``block_c`` compressed tokens: the selection
    blocks whose ``R + M - 1`` tokens it holds (it starts ``M - 1`` tokens before its first block),
    and that count padded to a power of two >= 16 (a ``tl.dot`` side)."""
    per_chunk = (block_c - (m - 1)) // r
    return per_chunk, max(16, triton.next_power_of_2(per_chunk))


def _banded(r: int, m: int, block_c: int) -> bool:
    """Whether the v2 kernel can sum a chunk's compressed tokens into block scores as a band (a reshape
    to ``[blocks, R]``, the weights of the tokens of the block and of the next one) instead of a
    float32 product with the ``[BLOCK_C, BLOCK_J]`` weight matrix: ``R`` a power of two, the chunk an
    exact number of ``R``-groups, and a block's tokens within two groups (``M <= R + 1``)."""
    return r & (r - 1) == 0 and block_c == _chunk_blocks(block_c, r, m)[1] * r and m <= r + 1


def _head_dim_split(Dk: int) -> tuple[int, int]:
    """``(D_A, D_B)``: ``D_A`` the largest power of two <= Dk (at least 16), ``D_B`` the rest padded
    to a power of two >= 16, or 0. 128 -> (128, 0), 192 -> (128, 64), 24 -> (16, 16), 8 -> (16, 0)."""
    d_a = max(16, 1 << (Dk.bit_length() - 1))
    rest = Dk - d_a
    return d_a, (max(16, triton.next_power_of_2(rest)) if rest > 0 else 0)


# split path, G = 16, Dk <= 128: from this many queries on, the scores kernel takes 16 queries x 16
# heads on 8 warps (the whole select at 64k, H200, paper shape, three sweeps: 8.45 against 8.55-8.60 ms; at 32k
# 2.195 against 2.217; at 8k the smaller tiles measured 0.202 against 0.305 ms once and equal once)
LONG_SEQ_SCORES_TILE = 32768


def _kernel_plan_v2(G: int, Dk: int, cmp_block: int, cmp_stride: int, slc_block: int, split: bool, T: int = 0) -> dict:
    """Tile sizes of the v2 select kernel (``TUNING["select_v2"]`` overrides BLOCK_T, BLOCK_C,
    num_warps, num_stages, TRANS, PREFETCH, BANDED, SKIP_MERGE, maxnreg); ``split``: the split path's
    scores kernel; ``T``: the sequence length (long ones get taller tiles, see
    :data:`LONG_SEQ_SCORES_TILE`)."""
    tuning = tuned("select_v2")
    g_pad = triton.next_power_of_2(G)
    d_a, d_b = _head_dim_split(Dk)
    # 128 rows (queries x heads) on 4 warps: 2-3 CTAs per SM. 256 rows on 8 warps needed 142 registers
    # (triton 3.6), one CTA per SM, and ran 1.36x slower at 64k on the H200 (perf/NOTES.md, sweep);
    # with the split path's band sums 256 rows on 8 warps became the faster tile at long sequences
    # (measured at Dk = 128 only; at Dk = 192 the 256-row tile would need 145 KiB of shared memory, one
    # CTA per SM, by a local sm_90 compile: not taken there)
    long_tile = split and g_pad == 16 and T >= LONG_SEQ_SCORES_TILE and d_a + d_b <= 128
    block_t = tuning.get("BLOCK_T", 16 if long_tile else max(8, 128 // g_pad))
    head_step = g_pad
    while head_step > 1 and block_t * head_step * (d_a + d_b) > 256 * 256:  # q tile <= 128 KiB in bf16
        head_step //= 2
    r, m = slc_block // cmp_stride, cmp_block // cmp_stride
    block_c = max(tuning.get("BLOCK_C", 64), triton.next_power_of_2(r + m - 1))
    per_chunk, block_j = _chunk_blocks(block_c, r, m)
    return dict(
        G_PAD=g_pad,
        HEAD_STEP=head_step,
        D_A=d_a,
        D_B=d_b,
        BLOCK_T=block_t,
        BLOCK_C=block_c,
        BLOCK_J=block_j,
        BLOCKS_PER_CHUNK=per_chunk,
        R=r,
        M=m,
        TRANS=bool(tuning.get("TRANS", False)) and head_step == g_pad,
        SKIP_MERGE=bool(tuning.get("SKIP_MERGE", False)),
        # the hand-written prefetch of the next chunk's keys only where the merge loop keeps Triton's
        # pipeliner off (v2). On the split path (no merge loop) loading each chunk's keys in its own
        # iteration ran faster: H200, paper shape, same process (perf/results/h200/sweep-5.md): 9.27
        # against 10.42 ms at 64k, 0.211 against 0.222 ms at 8k
        PREFETCH=bool(tuning.get("PREFETCH", not split)),
        # block scores as band sums instead of the float32 product with the weight matrix (whose
        # operands went through shared memory: the kernel was bound by L1/shared throughput, 88% in
        # ncu): H200, paper shape, same process (perf/results/h200/sweep-5.md): 8.55 against 9.34 ms
        # at 64k, 0.202 against 0.217 ms at 8k
        BANDED=bool(tuning.get("BANDED", True)) and _banded(r, m, block_c),
        num_warps=tuning.get("num_warps", 8 if block_t * head_step > 128 else 4),
        num_stages=tuning.get("num_stages", 2),
        **({"maxnreg": tuning["maxnreg"]} if "maxnreg" in tuning else {}),
    )


# split: the keys buffer of one query chunk, [B, HKV, TQ, NB] float32, is at most this large
SPLIT_KEYS_BYTES = 256 << 20
# split: rows of at most this many blocks stay in registers in the top-n kernel; longer rows are read
# in column tiles of this width on every bisection pass (T > 131072 at l' = 64)
TOPN_RESIDENT_BLOCKS = 2048


def _split_chunk(B: int, HKV: int, T: int, NB: int, block_t: int) -> int:
    """Queries per chunk of the split path: a multiple of ``block_t``, at least one tile, with the keys
    buffer ``B * HKV * TQ * NB * 4`` bytes within :data:`SPLIT_KEYS_BYTES` (64k, paper shape: 16384)."""
    fit = SPLIT_KEYS_BYTES // (B * HKV * max(NB, 1) * 4) // block_t * block_t
    return max(block_t, min(fit, triton.cdiv(T, block_t) * block_t))


def _topn_plan(NB: int, num_selected: int) -> dict:
    """Launch plan of :func:`_topn_kernel` for key rows ``NB`` wide in memory (``TUNING["select_topn"]``
    overrides ROWS, num_warps, BRACKET, PADDED)."""
    tuning = tuned("select_topn")
    stream = NB > TOPN_RESIDENT_BLOCKS
    width = triton.next_power_of_2(TOPN_RESIDENT_BLOCKS) if stream else max(16, triton.next_power_of_2(NB))
    return dict(
        N=num_selected,
        N_PAD=triton.next_power_of_2(num_selected),
        # one row per program on one warp: the row's reductions stay inside the warp (shuffles, no
        # shared memory or barrier per bisection pass). H200, paper shape, whole select, one process
        # (perf/results/h200/sweep-4.md): 10.41 ms at 64k against 11.21 with the previous 2 rows on
        # 4 warps (10.94 with 2 rows on 1 warp), 0.222 against 0.235 ms at 8k (8 rows on 4 warps).
        # Rows wider than 1024 blocks (T > 64k at l' = 64; not timed) get one warp per 1024, so that
        # a thread holds at most the 32 keys of the measured case
        ROWS=tuning.get("ROWS", 1),
        W1=max(16, width // 4),
        W2=max(16, width // 2),
        WIDTH=width,
        STREAM=stream,
        BRACKET=bool(tuning.get("BRACKET", True)),
        # rows as wide in memory as the register width (``_split_launch`` pads them): whole-row loads
        PADDED=bool(tuning.get("PADDED", True)) and not stream and NB == width,
        num_warps=tuning.get("num_warps", max(1, width // 1024)),
    )


def select_impl() -> str:
    """``"split"`` (v2's scores stored per query chunk, then a top-n kernel; the default: 11.2 against
    12.8 ms for v2 at 64k, 0.234 against 0.327 ms at 8k, H200, paper shape, measured before the band
    sums and the split path's own key loads, which took it to 8.55 ms at 64k), ``"v2"`` (rank merge in
    the score loop) or ``"v1"`` (n argmax passes per merge), from ``FLEXNSA_SELECT_IMPL``; read at
    every launch so a process can time them all."""
    impl = os.environ.get("FLEXNSA_SELECT_IMPL", "split").strip().lower() or "split"
    if impl not in ("v1", "v2", "split"):
        raise ValueError(f"FLEXNSA_SELECT_IMPL must be 'v1', 'v2' or 'split', got {impl!r}")
    return impl


def select_topn_launch(
    launch,
    q: torch.Tensor,
    k_cmp: torch.Tensor,
    lse: torch.Tensor,
    cmp_block: int,
    cmp_stride: int,
    slc_block: int,
    num_selected: int,
    num_init_blocks: int,
    num_local_blocks: int,
    scale: float,
) -> torch.Tensor:
    """Runs the select kernel; ``launch`` wraps the kernel (``torch.library.wrap_triton``).

    ``q [B, HQ, T, Dk]``, ``k_cmp [B, HKV, Tc, Dk]`` contiguous, ``lse [B, HQ, T]`` float32
    contiguous. Returns ``int32 [B, HKV, T, n]``, unused slots ``-1``; slot order: v1 by descending
    key (``-1`` last), v2 and split unordered (``-1`` in any slot).
    """
    B, HQ, T, Dk = q.shape
    HQ, HKV, Dk = static_sizes(HQ, k_cmp.shape[1], Dk)
    Tc = k_cmp.shape[2]
    G = HQ // HKV
    impl = select_impl()
    if impl == "v1":
        kernel, plan = _select_topn_kernel, _kernel_plan(G, Dk, cmp_block, cmp_stride, slc_block)
        scale_arg = scale
    else:
        kernel, plan = _select_topn_kernel_v2, _kernel_plan_v2(G, Dk, cmp_block, cmp_stride, slc_block, impl == "split", T)
        scale_arg = scale * LOG2E
    if Tc == 0:  # no compressed token yet (T < l): a 1-token stand-in keeps the pointer valid, all masked
        k_cmp = k_cmp.new_zeros(B, HKV, 1, Dk)
    indices = torch.empty(B, HKV, T, num_selected, dtype=torch.int32, device=q.device)  # [B, HKV, T, n]
    args = [q, k_cmp, lse, indices, T, Tc, HKV, scale_arg]
    args += [q.stride(0), q.stride(1), q.stride(2), k_cmp.stride(0), k_cmp.stride(1), k_cmp.stride(2)]
    args += [lse.stride(0), lse.stride(1), indices.stride(0), indices.stride(1), indices.stride(2)]
    meta = dict(
        G=G,
        DK=Dk,
        CMP_BLOCK=cmp_block,
        CMP_STRIDE=cmp_stride,
        SLC_BLOCK=slc_block,
        N=num_selected,
        N_PAD=triton.next_power_of_2(num_selected),
        NUM_INIT=num_init_blocks,
        NUM_LOCAL=num_local_blocks,
        IEEE=q.dtype == torch.float32,
        UPCAST=upcast_dots(q),
        **plan,
    )
    if impl == "split":
        _split_launch(launch, args, meta, indices, slc_block)
        return indices
    if impl == "v2":
        meta.update(keys_ptr=None, t_start=0, stride_yb=0, stride_yh=0, stride_yt=0, STORE_KEYS=False)
    grid = (triton.cdiv(T, plan["BLOCK_T"]), B * HKV)
    launch(kernel)[grid](*args, **meta)
    return indices


def _split_launch(launch, args: list, meta: dict, indices: torch.Tensor, slc_block: int) -> None:
    """The split path: per chunk of ``TQ`` queries, v2's scores kernel stores the keys ``[B, HKV, TQ,
    NB]`` (``STORE_KEYS``), then :func:`_topn_kernel` selects from them into ``indices``."""
    B, HKV, T = indices.shape[:3]
    NB = triton.cdiv(T, slc_block)
    block_t = meta["BLOCK_T"]
    plan = _topn_plan(NB, indices.shape[3])
    width = NB if plan["STREAM"] else max(NB, plan["WIDTH"])  # rows padded to the top-n's register width
    tq = _split_chunk(B, HKV, T, width, block_t)
    keys = torch.empty(B, HKV, tq, width, dtype=torch.float32, device=indices.device)  # [B, HKV, TQ, width]
    args = list(args)
    args[3] = None  # the scores kernel writes no indices
    meta = dict(meta, SKIP_MERGE=False, STORE_KEYS=True)
    key_strides = dict(stride_yb=keys.stride(0), stride_yh=keys.stride(1), stride_yt=keys.stride(2))
    for t_start in range(0, T, tq):
        grid = (triton.cdiv(min(tq, T - t_start), block_t), B * HKV)
        launch(_select_topn_kernel_v2)[grid](*args, keys_ptr=keys, t_start=t_start, **key_strides, **meta)
        topn_launch(launch, keys, indices, t_start, slc_block)


def topn_launch(launch, keys: torch.Tensor, indices: torch.Tensor, t_start: int, slc_block: int) -> None:
    """:func:`_topn_kernel` on the keys ``[B, HKV, TQ, NB]`` float32 of queries ``t_start ..
    t_start + TQ - 1`` (row ``t`` reads blocks ``j <= t // slc_block``), into their rows of ``indices``.
    Rows as wide as the kernel's register width (``_split_launch`` pads them) are loaded whole
    (vector loads)."""
    B, HKV, tq, NB = keys.shape
    if keys.stride(3) != 1:
        raise ValueError(f"keys must be contiguous along the blocks (stride 1), got strides {keys.stride()}")
    T, n = indices.shape[2], indices.shape[3]
    plan = _topn_plan(NB, n)
    launch(_topn_kernel)[(triton.cdiv(min(tq, T - t_start), plan["ROWS"]), B * HKV)](
        keys,
        indices,
        T,
        tq,
        HKV,
        t_start,
        keys.stride(0),
        keys.stride(1),
        keys.stride(2),
        indices.stride(0),
        indices.stride(1),
        indices.stride(2),
        SLC_BLOCK=slc_block,
        **plan,
    )
