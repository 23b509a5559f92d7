"""Triton kernels of one NSA decode step (flash-decoding style split-K), four launches in all.

Each program serves one query row (a batch entry and one of the ``T_new`` new tokens, at position
``pos = L - T_new + r`` with ``L`` read from the device) and one KV head ``g``: the ``G`` query
heads of the group form the M dimension of the matrix products, so each key is loaded once for all
of them.

1. ``_cmp_partial_kernel``, grid ``(rows, HKV, n_cmp_splits)``: compressed attention over a split of
   the ``Tc(pos + 1)`` visible compressed tokens (online softmax: unnormalised ``o``, max ``m``,
   sum ``l``), and, per tile of ``TT = BJ * l'/d`` tokens, the tile's contribution to the block
   scores of its ``BJ`` blocks plus the ``SPILL`` blocks after them, relative to the running max.
2. ``_select_kernel``, grid ``(rows, HKV, n_chunks)``: the compressed ``lse`` per head from the
   split statistics, the group-summed block scores ``sum_h exp(m_tile - lse) * partial`` of a chunk
   of ``TB`` tiles, and that chunk's n best blocks (forced ones first, ties to the lower index) as
   packed int64 keys ``(score, -block)``, in descending order: each key's rank (the number of larger
   keys in the chunk, one pairwise comparison) is its slot (``RANK_TOPN``), or one max-reduction per
   pick (the serial v2 loop).
3. ``_slc_win_partial_kernel``, grid ``(rows, HKV, np_sel + np_win)``: selection programs merge the
   chunks' candidates into the top-n (program 0 also writes the indices) and attend to ``SPP``
   selected blocks each; window programs attend to ``SPP`` tiles of the window; both write split-K
   partials.
4. ``_combine_kernel``, grid ``(rows, HQ)``, or ``_combine_group_kernel``, grid ``(rows, HKV)`` with
   the ``G`` heads of a group as rows: merges the partials of each branch (separately normalised,
   NSA_SPEC.md) and applies the gates.

Block-score weights: token ``i`` covers the ``R = l/d`` stride segments ``i .. i+R-1``; block ``j``
is segments ``j*C .. j*C+C-1`` with ``C = l'/d``; ``w[i, j]`` = number of shared segments, which is
``|[i*d, i*d+l) ∩ [j*l', (j+1)*l')| / d`` of NSA_SPEC.md. A tile whose tokens start at segment
``tile*TT`` touches its own ``BJ`` blocks and ``SPILL = ceil((R-1)/C)`` more.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _row_position(len_ptr, row, T_NEW):
    """Batch entry, new-token index and absolute position of a query row."""
    b = (row // T_NEW).to(tl.int64)
    r = row % T_NEW
    pos = tl.load(len_ptr).to(tl.int32) - T_NEW + r
    return b, r, pos


@triton.jit
def _load_group_queries(q_ptr, b, r, g, sq_b, sq_h, sq_t, G: tl.constexpr, G_PAD: tl.constexpr,
                        DK: tl.constexpr, DK_PAD: tl.constexpr):
    hh = tl.arange(0, G_PAD)
    dk = tl.arange(0, DK_PAD)
    heads = g * G + hh
    ptrs = q_ptr + b * sq_b + heads[:, None] * sq_h + r * sq_t + dk[None, :]
    return tl.load(ptrs, mask=(hh[:, None] < G) & (dk[None, :] < DK), other=0.0)  # [G_PAD, DK_PAD]


@triton.jit
def _dot(a, b, PRECISION: tl.constexpr, DOT_FP32: tl.constexpr):
    """``a @ b`` accumulated in float32. DOT_FP32 (set under TRITON_INTERPRET=1, whose bfloat16
    dot is wrong) multiplies float32 copies instead."""
    if DOT_FP32:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    return tl.dot(a, b, input_precision=PRECISION)


@triton.jit
def _cmp_partial_kernel(
    q_ptr, sq_b, sq_h, sq_t,
    kc_ptr, skc_b, skc_h, skc_t,
    vc_ptr, svc_b, svc_h, svc_t,
    len_ptr,
    o_part_ptr, m_part_ptr, l_part_ptr,  # [rows, HQ, NSPLIT, DV], [rows, HQ, NSPLIT] x2, fp32
    sc_part_ptr, tmax_ptr,  # [rows, HQ, NTILES, BJS], [rows, HQ, NTILES], fp32
    scale: tl.constexpr, T_NEW, HQ,  # constexpr: inductor would pass a python float as fp64
    G: tl.constexpr, G_PAD: tl.constexpr,
    DK: tl.constexpr, DV: tl.constexpr, DK_PAD: tl.constexpr, DV_PAD: tl.constexpr,
    CMP_L: tl.constexpr, CMP_D: tl.constexpr, C: tl.constexpr, R: tl.constexpr,
    BJ: tl.constexpr, BJS: tl.constexpr, BJS_PAD: tl.constexpr, TT: tl.constexpr, BN: tl.constexpr,
    TPS: tl.constexpr, NSPLIT: tl.constexpr, NTILES: tl.constexpr, QK_PRECISION: tl.constexpr,
    DOT_FP32: tl.constexpr,
):
    row = tl.program_id(0)
    g = tl.program_id(1)
    split = tl.program_id(2)
    b, r, pos = _row_position(len_ptr, row, T_NEW)
    n_vis = tl.where(pos + 1 >= CMP_L, (pos + 1 - CMP_L) // CMP_D + 1, 0)  # visible compressed tokens
    q = _load_group_queries(q_ptr, b, r, g, sq_b, sq_h, sq_t, G, G_PAD, DK, DK_PAD)
    hh = tl.arange(0, G_PAD)
    head_ok = hh < G
    stat_row = row * HQ + g * G + hh  # [G_PAD] index of (row, head)
    dk = tl.arange(0, DK_PAD)
    dv = tl.arange(0, DV_PAD)
    lane = tl.arange(0, BN)
    u = tl.arange(0, BJS_PAD)
    # w[lane, u]: stride segments shared by the tile's token `lane` and its local block `u`
    seg_hi = tl.minimum(lane[:, None] + R, (u[None, :] + 1) * C)
    seg_lo = tl.maximum(lane[:, None], u[None, :] * C)
    weights = tl.maximum(seg_hi - seg_lo, 0).to(tl.float32)  # [BN, BJS_PAD]

    m_i = tl.full([G_PAD], float("-inf"), tl.float32)
    l_i = tl.zeros([G_PAD], tl.float32)
    acc = tl.zeros([G_PAD, DV_PAD], tl.float32)
    k_base = kc_ptr + b * skc_b + g * skc_h
    v_base = vc_ptr + b * svc_b + g * svc_h
    tile_lo = split * TPS
    tile_hi = tl.minimum(tile_lo + TPS, tl.cdiv(n_vis, TT))
    for tile in range(tile_lo, tile_hi):
        tok = tile * TT + lane  # [BN] compressed token ids
        valid = (lane < TT) & (tok < n_vis)
        k = tl.load(k_base + tok[:, None] * skc_t + dk[None, :],
                    mask=valid[:, None] & (dk[None, :] < DK), other=0.0)  # [BN, DK_PAD]
        s = _dot(q, tl.trans(k), QK_PRECISION, DOT_FP32) * scale  # [G_PAD, BN]
        s = tl.where(valid[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))  # finite: the tile holds a visible token
        p = tl.exp(s - m_new[:, None])
        alpha = tl.exp(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_base + tok[:, None] * svc_t + dv[None, :],
                    mask=valid[:, None] & (dv[None, :] < DV), other=0.0)  # [BN, DV_PAD]
        acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v, QK_PRECISION, DOT_FP32)
        m_i = m_new
        part = tl.dot(p, weights, input_precision="ieee")  # [G_PAD, BJS_PAD] block-score partials
        sc_ptrs = sc_part_ptr + (stat_row[:, None] * NTILES + tile) * BJS + u[None, :]
        tl.store(sc_ptrs, part, mask=head_ok[:, None] & (u[None, :] < BJS))
        tl.store(tmax_ptr + stat_row * NTILES + tile, m_new, mask=head_ok)
    o_ptrs = o_part_ptr + (stat_row[:, None] * NSPLIT + split) * DV + dv[None, :]
    tl.store(o_ptrs, acc, mask=head_ok[:, None] & (dv[None, :] < DV))
    tl.store(m_part_ptr + stat_row * NSPLIT + split, m_i, mask=head_ok)
    tl.store(l_part_ptr + stat_row * NSPLIT + split, l_i, mask=head_ok)


@triton.jit
def _pack_key(score, j, eligible, forced):
    """int64 keys ordered like (score, -j): ``(bits(score) + 1) << 32 | (2^31 - 1 - j)``, forced
    blocks score +inf, ineligible ones 0. Scores are sums of non-negative terms, so their float bits
    order like the floats."""
    bits = tl.where(forced, float("inf"), score).to(tl.int32, bitcast=True)
    high = tl.where(eligible, bits.to(tl.int64) + 1, 0)
    return (high << 32) | (2147483647 - j).to(tl.int64)


@triton.jit
def _block_of_key(key):
    """Block id of a packed key, ``-1`` for an ineligible (``< 2^32``) one."""
    return tl.where(key >= 4294967296, 2147483647 - (key & 4294967295), -1).to(tl.int32)


@triton.jit
def _store_top_by_rank(key, out, N_SEL: tl.constexpr, N_SEL_PAD: tl.constexpr, TB: tl.constexpr,
                       BJ: tl.constexpr, BJ_PAD: tl.constexpr):
    """The chunk's ``N_SEL`` largest keys of ``key [TB, BJ_PAD]`` in descending order to
    ``out[0 .. N_SEL-1]``, without a loop.

    Lane ``(t, u)`` with ``u < BJ`` packs block ``t*BJ + u``: ``TB*BJ`` distinct blocks, so distinct
    keys (eligible ones ``>= 2^32``, ineligible ones ``2^31 - 1 - block >= 0``). Padded lanes
    (``u >= BJ``) get key ``-1``, below all of them. The rank of a key, ``rank_i = #{i' : key_i' >
    key_i}``, is then a permutation of ``0 .. TB*BJ - 1`` over the real lanes, and their slot
    (masked scatter, ``rank < N_SEL``); slots ``TB*BJ .. N_SEL-1`` (a chunk with fewer blocks than
    n) get ``-1``, a disjoint store.

    Same eligible keys in the same slots as the serial loop; where that loop runs past the eligible
    keys it writes ineligible keys (``2^31 - 1 - j`` of padded lanes too, or ``-1``), this writes
    ``2^31 - 1 - j`` of real lanes or ``-1``: all ``< 2^32``, block ``-1`` for ``_merge_candidates``."""
    u = tl.arange(0, BJ_PAD)
    flat = tl.reshape(tl.where(u[None, :] < BJ, key, -1), [TB * BJ_PAD])  # [TB*BJ_PAD]
    # [other, own] comparisons summed over axis 0: under the default layout the summed axis stays
    # in each thread (sm_90, 128-block chunks: 64 registers, 5 barriers; summed over axis 1 it is
    # a cross-thread reduction per key: 151 registers, 41 barriers)
    rank = tl.sum((flat[:, None] > flat[None, :]).to(tl.int32), 0)  # [TB*BJ_PAD] larger keys
    tl.store(out + rank, flat, mask=(flat >= 0) & (rank < N_SEL))
    if TB * BJ < N_SEL:
        s = tl.arange(0, N_SEL_PAD)
        tl.store(out + s, tl.full([N_SEL_PAD], -1, tl.int64), mask=(s >= TB * BJ) & (s < N_SEL))


@triton.jit
def _select_kernel(
    m_part_ptr, l_part_ptr, sc_part_ptr, tmax_ptr,
    cand_ptr,  # int64 [rows, HKV, NCHUNK, N_SEL] packed candidates
    len_ptr, T_NEW, HQ, HKV,
    G: tl.constexpr, G_PAD: tl.constexpr, CMP_L: tl.constexpr, CMP_D: tl.constexpr, SLC: tl.constexpr,
    N_SEL: tl.constexpr, N_INIT: tl.constexpr, N_LOCAL: tl.constexpr,
    BJ: tl.constexpr, BJS: tl.constexpr, SPILL: tl.constexpr, TT: tl.constexpr,
    NTILES: tl.constexpr, TB: tl.constexpr, NCHUNK: tl.constexpr, BJ_PAD: tl.constexpr,
    NSPLIT: tl.constexpr, NS_PAD: tl.constexpr, N_SEL_PAD: tl.constexpr, RANK_TOPN: tl.constexpr,
):
    row = tl.program_id(0)
    g = tl.program_id(1)
    chunk = tl.program_id(2)
    b, r, pos = _row_position(len_ptr, row, T_NEW)
    n_vis = tl.where(pos + 1 >= CMP_L, (pos + 1 - CMP_L) // CMP_D + 1, 0)
    hh = tl.arange(0, G_PAD)
    head_ok = hh < G
    stat_row = row * HQ + g * G + hh  # [G_PAD]
    # log-sum-exp of the compressed branch per head, from the split statistics
    sp = tl.arange(0, NS_PAD)
    split_ok = head_ok[:, None] & (sp[None, :] < NSPLIT)
    ms = tl.load(m_part_ptr + stat_row[:, None] * NSPLIT + sp[None, :], mask=split_ok, other=float("-inf"))
    ls = tl.load(l_part_ptr + stat_row[:, None] * NSPLIT + sp[None, :], mask=split_ok, other=0.0)
    m_max = tl.max(ms, 1)
    m_max = tl.where(m_max == float("-inf"), 0.0, m_max)
    total = tl.sum(ls * tl.exp(ms - m_max[:, None]), 1)
    lse = tl.where(total > 0, m_max + tl.log(tl.where(total > 0, total, 1.0)), float("-inf"))  # [G_PAD]
    # this chunk's tiles: group-summed block scores sum_h exp(m_tile - lse) * partial
    t = chunk * TB + tl.arange(0, TB)  # [TB]
    u = tl.arange(0, BJ_PAD)
    tile_ok = head_ok[:, None] & ((t < NTILES) & (t * TT < n_vis))[None, :]  # [G_PAD, TB]
    prev_ok = head_ok[:, None] & ((t >= 1) & (t <= NTILES) & ((t - 1) * TT < n_vis))[None, :]
    tile_row = stat_row[:, None] * NTILES + t[None, :]  # [G_PAD, TB]
    tmax = tl.load(tmax_ptr + tile_row, mask=tile_ok, other=0.0)
    tmax_prev = tl.load(tmax_ptr + tile_row - 1, mask=prev_ok, other=0.0)
    f = tl.where(tile_ok, tl.exp(tmax - lse[:, None]), 0.0)
    f_prev = tl.where(prev_ok, tl.exp(tmax_prev - lse[:, None]), 0.0)
    u3 = u[None, None, :]
    own = tl.load(sc_part_ptr + tile_row[:, :, None] * BJS + u3,
                  mask=tile_ok[:, :, None] & (u3 < BJ), other=0.0)  # [G_PAD, TB, BJ_PAD]
    spill = tl.load(sc_part_ptr + (tile_row[:, :, None] - 1) * BJS + BJ + u3,
                    mask=prev_ok[:, :, None] & (u3 < SPILL), other=0.0)
    scores = tl.sum(f[:, :, None] * own + f_prev[:, :, None] * spill, 0)  # [TB, BJ_PAD]
    j = t[:, None] * BJ + u[None, :]  # block ids
    own_block = pos // SLC
    eligible = (j <= own_block) & (u[None, :] < BJ) & (t[:, None] < NTILES)
    forced = eligible & ((j < N_INIT) | (j > own_block - N_LOCAL))
    key = _pack_key(scores, j, eligible, forced)  # [TB, BJ_PAD]
    out = cand_ptr + ((row * HKV + g) * NCHUNK + chunk) * N_SEL
    # this chunk's n best, in order
    if RANK_TOPN:
        _store_top_by_rank(key, out, N_SEL, N_SEL_PAD, TB, BJ, BJ_PAD)
    else:  # N_SEL serial block-wide max-reductions
        for kk in range(N_SEL):
            best = tl.max(tl.max(key, 1), 0)
            tl.store(out + kk, best)
            key = tl.where(key == best, -1, key)


@triton.jit
def _attend_tile(q, k_base, v_base, sk_t, sv_t, s_pos, valid, m_i, l_i, acc, scale,
                 DK: tl.constexpr, DV: tl.constexpr, DK_PAD: tl.constexpr, DV_PAD: tl.constexpr,
                 QK_PRECISION: tl.constexpr, DOT_FP32: tl.constexpr):
    """Online-softmax update of ``(m, l, acc)`` with the keys at ``s_pos`` where ``valid``."""
    dk = tl.arange(0, DK_PAD)
    dv = tl.arange(0, DV_PAD)
    k = tl.load(k_base + s_pos[:, None] * sk_t + dk[None, :],
                mask=valid[:, None] & (dk[None, :] < DK), other=0.0)  # [BS, DK_PAD]
    v = tl.load(v_base + s_pos[:, None] * sv_t + dv[None, :],
                mask=valid[:, None] & (dv[None, :] < DV), other=0.0)  # [BS, DV_PAD], issued with K
    s = _dot(q, tl.trans(k), QK_PRECISION, DOT_FP32) * scale  # [G_PAD, BS]
    s = tl.where(valid[None, :], s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # an all-masked tile changes nothing
    p = tl.exp(s - m_safe[:, None])
    alpha = tl.exp(m_i - m_safe)
    acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v, QK_PRECISION, DOT_FP32)
    return m_new, l_i * alpha + tl.sum(p, 1), acc


@triton.jit
def _merge_candidates(cand_base, N_SEL: tl.constexpr, NCHUNK: tl.constexpr, NCAND_PAD: tl.constexpr,
                      N_SEL_PAD: tl.constexpr):
    """Top-n of the chunks' candidate lists (packed keys, ``NCHUNK * N_SEL`` of them): the block of
    each rank ``0 .. N_SEL_PAD-1`` (``-1`` for ranks past the eligible blocks). A key's rank is the
    number of larger keys, counted against one chunk list at a time (no serial max-reductions).
    Eligible keys are distinct (distinct blocks), so their ranks are exact; equal (ineligible) keys
    share a rank and all decode to -1."""
    cc = tl.arange(0, NCAND_PAD)
    key = tl.load(cand_base + cc, mask=cc < NCHUNK * N_SEL, other=-1)  # [NCAND_PAD]
    kk = tl.arange(0, N_SEL_PAD)
    rank = tl.zeros([NCAND_PAD], tl.int32)
    for ch in range(NCHUNK):
        other = tl.load(cand_base + ch * N_SEL + kk, mask=kk < N_SEL, other=-1)  # [N_SEL_PAD]
        rank += tl.sum((other[None, :] > key[:, None]).to(tl.int32), 1)
    blk = _block_of_key(key)  # [NCAND_PAD]
    hit = (rank[:, None] == kk[None, :]) & (cc < NCHUNK * N_SEL)[:, None] & (kk < N_SEL)[None, :]
    return tl.max(tl.where(hit, blk[:, None], -1), 0)  # [N_SEL_PAD]


@triton.jit
def _slc_win_partial_kernel(
    q_ptr, sq_b, sq_h, sq_t,
    k_ptr, v_ptr, sk_b, sk_h, sk_t, sv_b, sv_h, sv_t,
    kw_ptr, vw_ptr, skw_b, skw_h, skw_t, svw_b, svw_h, svw_t,
    cand_ptr, idx_ptr, len_ptr,  # packed candidates [rows, HKV, NCHUNK, N_SEL]; int32 [B, HKV, T_NEW, N_SEL]
    o_part_ptr, m_part_ptr, l_part_ptr,  # [rows, HQ, NPROG, DV], [rows, HQ, NPROG] x2, fp32
    scale: tl.constexpr, T_NEW, HQ, HKV,  # constexpr: inductor would pass a python float as fp64
    G: tl.constexpr, G_PAD: tl.constexpr,
    DK: tl.constexpr, DV: tl.constexpr, DK_PAD: tl.constexpr, DV_PAD: tl.constexpr,
    SLC: tl.constexpr, BS: tl.constexpr, N_SEL: tl.constexpr, SPP: tl.constexpr,
    NCHUNK: tl.constexpr, NCAND_PAD: tl.constexpr, N_SEL_PAD: tl.constexpr, NP_SEL: tl.constexpr,
    WINDOW: tl.constexpr, NW_TILES: tl.constexpr, NPROG: tl.constexpr,
    QK_PRECISION: tl.constexpr, DOT_FP32: tl.constexpr,
):
    row = tl.program_id(0)
    g = tl.program_id(1)
    prog = tl.program_id(2)
    b, r, pos = _row_position(len_ptr, row, T_NEW)
    q = _load_group_queries(q_ptr, b, r, g, sq_b, sq_h, sq_t, G, G_PAD, DK, DK_PAD)
    hh = tl.arange(0, G_PAD)
    lane = tl.arange(0, BS)
    m_i = tl.full([G_PAD], float("-inf"), tl.float32)
    l_i = tl.zeros([G_PAD], tl.float32)
    acc = tl.zeros([G_PAD, DV_PAD], tl.float32)
    # one loop for both kinds of program (one set of pipeline buffers in shared memory):
    # selection programs attend to the blocks of rank prog*SPP .. prog*SPP + SPP - 1 of the top-n,
    # window programs to offsets [tile*BS, tile*BS + BS) of the window (pos - WINDOW, pos]
    is_sel = prog < NP_SEL
    rank = tl.arange(0, N_SEL_PAD)
    ranked = tl.full([N_SEL_PAD], -1, tl.int32)
    if is_sel:
        ranked = _merge_candidates(cand_ptr + (row * HKV + g) * NCHUNK * N_SEL, N_SEL, NCHUNK, NCAND_PAD,
                                   N_SEL_PAD)  # [N_SEL_PAD] block of each rank, -1 past the eligible ones
        if prog == 0:
            idx_base = idx_ptr + ((b * HKV + g) * T_NEW + r) * N_SEL
            tl.store(idx_base + rank, ranked, mask=rank < N_SEL)
    k_base = tl.where(is_sel, k_ptr + b * sk_b + g * sk_h, kw_ptr + b * skw_b + g * skw_h)
    v_base = tl.where(is_sel, v_ptr + b * sv_b + g * sv_h, vw_ptr + b * svw_b + g * svw_h)
    k_t = tl.where(is_sel, sk_t, skw_t)
    v_t = tl.where(is_sel, sv_t, svw_t)
    for kk in range(SPP):  # static trip count: the K/V loads are software-pipelined
        blk = tl.max(tl.where(rank == prog * SPP + kk, ranked, -1), 0)
        sel_pos = blk * SLC + lane
        sel_valid = (lane < SLC) & (sel_pos >= 0) & (sel_pos <= pos)  # blk = -1 gives sel_pos < 0
        offset = ((prog - NP_SEL) * SPP + kk) * BS + lane
        win_pos = pos - WINDOW + 1 + offset
        win_valid = (offset < WINDOW) & (win_pos >= 0)
        s_pos = tl.where(is_sel, sel_pos, win_pos)
        valid = tl.where(is_sel, sel_valid, win_valid)
        m_i, l_i, acc = _attend_tile(q, k_base, v_base, k_t, v_t, s_pos, valid, m_i, l_i, acc, scale,
                                     DK, DV, DK_PAD, DV_PAD, QK_PRECISION, DOT_FP32)
    stat_row = row * HQ + g * G + hh
    dv = tl.arange(0, DV_PAD)
    head_ok = hh < G
    tl.store(o_part_ptr + (stat_row[:, None] * NPROG + prog) * DV + dv[None, :], acc,
             mask=head_ok[:, None] & (dv[None, :] < DV))
    tl.store(m_part_ptr + stat_row * NPROG + prog, m_i, mask=head_ok)
    tl.store(l_part_ptr + stat_row * NPROG + prog, l_i, mask=head_ok)


@triton.jit
def _merge_partials(o_ptr, m_ptr, l_ptr, stat_row, lo, hi, COUNT: tl.constexpr, PAD: tl.constexpr,
                    DV: tl.constexpr, DV_PAD: tl.constexpr):
    """Normalised output ``[DV_PAD]`` of partials ``lo .. hi-1`` (of COUNT); 0 when they hold no key."""
    sp = tl.arange(0, PAD)
    dv = tl.arange(0, DV_PAD)
    use = (sp >= lo) & (sp < hi)
    ms = tl.load(m_ptr + stat_row * COUNT + sp, mask=use, other=float("-inf"))
    ls = tl.load(l_ptr + stat_row * COUNT + sp, mask=use, other=0.0)
    m_max = tl.max(ms, 0)
    m_max = tl.where(m_max == float("-inf"), 0.0, m_max)
    w = tl.where(use, tl.exp(ms - m_max), 0.0)  # [PAD]
    total = tl.sum(ls * w, 0)
    os = tl.load(o_ptr + (stat_row * COUNT + sp[:, None]) * DV + dv[None, :],
                 mask=use[:, None] & (dv[None, :] < DV), other=0.0)  # [PAD, DV_PAD]
    return tl.sum(os * w[:, None], 0) / tl.where(total > 0, total, 1.0)


@triton.jit
def _combine_kernel(
    co_ptr, cm_ptr, cl_ptr,  # compressed partials [rows, HQ, NSPLIT(, DV)]
    so_ptr, sm_ptr, sl_ptr,  # selected + window partials [rows, HQ, NPROG(, DV)]
    gate_ptr, sg_b, sg_h, sg_t, sg_c,
    out_ptr, so_b, so_h, so_t,
    T_NEW, HQ,
    DV: tl.constexpr, DV_PAD: tl.constexpr,
    NSPLIT: tl.constexpr, NS_PAD: tl.constexpr,
    NP_SEL: tl.constexpr, NPROG: tl.constexpr, NP_PAD: tl.constexpr,
):
    row = tl.program_id(0)
    h = tl.program_id(1)
    b = (row // T_NEW).to(tl.int64)
    r = row % T_NEW
    stat_row = row * HQ + h
    o_cmp = _merge_partials(co_ptr, cm_ptr, cl_ptr, stat_row, 0, NSPLIT, NSPLIT, NS_PAD, DV, DV_PAD)
    o_slc = _merge_partials(so_ptr, sm_ptr, sl_ptr, stat_row, 0, NP_SEL, NPROG, NP_PAD, DV, DV_PAD)
    o_win = _merge_partials(so_ptr, sm_ptr, sl_ptr, stat_row, NP_SEL, NPROG, NPROG, NP_PAD, DV, DV_PAD)
    gate_base = gate_ptr + b * sg_b + h * sg_h + r * sg_t
    g_cmp = tl.load(gate_base).to(tl.float32)
    g_slc = tl.load(gate_base + sg_c).to(tl.float32)
    g_win = tl.load(gate_base + 2 * sg_c).to(tl.float32)
    o = g_cmp * o_cmp + g_slc * o_slc + g_win * o_win
    dv = tl.arange(0, DV_PAD)
    tl.store(out_ptr + b * so_b + h * so_h + r * so_t + dv, o.to(out_ptr.dtype.element_ty), mask=dv < DV)


@triton.jit
def _merge_partials_group(o_ptr, m_ptr, l_ptr, stat_row, head_ok, LO: tl.constexpr, HI: tl.constexpr,
                          COUNT: tl.constexpr, PAD: tl.constexpr, G_PAD: tl.constexpr, DV: tl.constexpr,
                          DV_PAD: tl.constexpr):
    """``_merge_partials`` for the ``G_PAD`` heads at ``stat_row``: per head
    ``sum_s exp(m_s - m) o_s / sum_s exp(m_s - m) l_s`` over partials ``s = LO .. HI-1`` (of COUNT),
    ``m = max_s m_s``; 0 when they hold no key. ``[G_PAD, DV_PAD]``; one ``[G_PAD, DV_PAD]`` load
    per partial (a loop: a ``[G_PAD, PAD, DV_PAD]`` tile would not fit in registers)."""
    sp = tl.arange(0, PAD)
    dv = tl.arange(0, DV_PAD)
    use = head_ok[:, None] & (sp[None, :] >= LO) & (sp[None, :] < HI)  # [G_PAD, PAD]
    ms = tl.load(m_ptr + stat_row[:, None] * COUNT + sp[None, :], mask=use, other=float("-inf"))
    ls = tl.load(l_ptr + stat_row[:, None] * COUNT + sp[None, :], mask=use, other=0.0)
    m_max = tl.max(ms, 1)
    m_max = tl.where(m_max == float("-inf"), 0.0, m_max)  # [G_PAD]
    total = tl.sum(ls * tl.where(use, tl.exp(ms - m_max[:, None]), 0.0), 1)  # [G_PAD]
    acc = tl.zeros([G_PAD, DV_PAD], tl.float32)
    for s in range(LO, HI):
        m_s = tl.load(m_ptr + stat_row * COUNT + s, mask=head_ok, other=float("-inf"))  # [G_PAD]
        o_s = tl.load(o_ptr + (stat_row[:, None] * COUNT + s) * DV + dv[None, :],
                      mask=head_ok[:, None] & (dv[None, :] < DV), other=0.0)  # [G_PAD, DV_PAD]
        acc += tl.exp(m_s - m_max)[:, None] * o_s
    return acc / tl.where(total > 0, total, 1.0)[:, None]


@triton.jit
def _combine_group_kernel(
    co_ptr, cm_ptr, cl_ptr,  # compressed partials [rows, HQ, NSPLIT(, DV)]
    so_ptr, sm_ptr, sl_ptr,  # selected + window partials [rows, HQ, NPROG(, DV)]
    gate_ptr, sg_b, sg_h, sg_t, sg_c,
    out_ptr, so_b, so_h, so_t,
    T_NEW, HQ,
    G: tl.constexpr, G_PAD: tl.constexpr, DV: tl.constexpr, DV_PAD: tl.constexpr,
    NSPLIT: tl.constexpr, NS_PAD: tl.constexpr,
    NP_SEL: tl.constexpr, NPROG: tl.constexpr, NP_PAD: tl.constexpr,
):
    """``_combine_kernel`` for the ``G`` heads of KV group ``g``: grid ``(rows, HKV)``, the heads as
    the rows of ``[G_PAD, DV_PAD]`` tiles (16x fewer, larger programs at G=16)."""
    row = tl.program_id(0)
    g = tl.program_id(1)
    b = (row // T_NEW).to(tl.int64)
    r = row % T_NEW
    hh = tl.arange(0, G_PAD)
    head_ok = hh < G
    heads = g * G + hh  # [G_PAD]
    stat_row = row * HQ + heads
    o_cmp = _merge_partials_group(co_ptr, cm_ptr, cl_ptr, stat_row, head_ok, 0, NSPLIT, NSPLIT, NS_PAD,
                                  G_PAD, DV, DV_PAD)  # [G_PAD, DV_PAD]
    o_slc = _merge_partials_group(so_ptr, sm_ptr, sl_ptr, stat_row, head_ok, 0, NP_SEL, NPROG, NP_PAD,
                                  G_PAD, DV, DV_PAD)
    o_win = _merge_partials_group(so_ptr, sm_ptr, sl_ptr, stat_row, head_ok, NP_SEL, NPROG, NPROG, NP_PAD,
                                  G_PAD, DV, DV_PAD)
    gate_base = gate_ptr + b * sg_b + heads * sg_h + r * sg_t  # [G_PAD]
    g_cmp = tl.load(gate_base, mask=head_ok, other=0.0).to(tl.float32)
    g_slc = tl.load(gate_base + sg_c, mask=head_ok, other=0.0).to(tl.float32)
    g_win = tl.load(gate_base + 2 * sg_c, mask=head_ok, other=0.0).to(tl.float32)
    o = g_cmp[:, None] * o_cmp + g_slc[:, None] * o_slc + g_win[:, None] * o_win  # [G_PAD, DV_PAD]
    dv = tl.arange(0, DV_PAD)
    tl.store(out_ptr + b * so_b + heads[:, None] * so_h + r * so_t + dv[None, :],
             o.to(out_ptr.dtype.element_ty), mask=head_ok[:, None] & (dv[None, :] < DV))
