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
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .kernel_utils import mma, tuned, upcast_dots

__all__ = ["select_topn_launch"]

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
    scale,
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
    per_chunk = (block_c - (m - 1)) // r
    return dict(
        G_PAD=g_pad,
        HEAD_STEP=head_step,
        D_PAD=d_pad,
        BLOCK_T=block_t,
        BLOCK_C=block_c,
        BLOCK_J=max(16, triton.next_power_of_2(per_chunk)),
        BLOCKS_PER_CHUNK=per_chunk,
        R=r,
        M=m,
        num_warps=tuning.get("num_warps", 8 if block_t * head_step >= 128 else 4),
        num_stages=tuning.get("num_stages", 2),
    )


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
    contiguous. Returns ``int32 [B, HKV, T, n]``, slots in descending key order, unused ``-1``.
    """
    B, HQ, T, Dk = q.shape
    HKV, Tc = k_cmp.shape[1], k_cmp.shape[2]
    G = HQ // HKV
    plan = _kernel_plan(G, Dk, cmp_block, cmp_stride, slc_block)
    if Tc == 0:  # no compressed token yet (T < l): a 1-token stand-in keeps the pointer valid, all masked
        k_cmp = k_cmp.new_zeros(B, HKV, 1, Dk)
    indices = torch.empty(B, HKV, T, num_selected, dtype=torch.int32, device=q.device)  # [B, HKV, T, n]
    grid = (triton.cdiv(T, plan["BLOCK_T"]), B * HKV)
    launch(_select_topn_kernel)[grid](
        q,
        k_cmp,
        lse,
        indices,
        T,
        Tc,
        HKV,
        scale,
        q.stride(0),
        q.stride(1),
        q.stride(2),
        k_cmp.stride(0),
        k_cmp.stride(1),
        k_cmp.stride(2),
        lse.stride(0),
        lse.stride(1),
        indices.stride(0),
        indices.stride(1),
        indices.stride(2),
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
    return indices
