"""Triton kernel: forward of the selected-attention branch (NSA_SPEC.md, branch 2, step 5).

For query ``t`` and every query head ``h`` of KV group ``g``:

    o[h, t]   = sum_{s in S(t)} softmax_s(scale * q[h, t] . k[g, s]) v[g, s]
    lse[h, t] = log sum_{s in S(t)} exp(scale * q[h, t] . k[g, s])

with ``S(t)`` the tokens ``s <= t`` of the blocks ``indices[b, g, t, :]`` (``-1`` slots skipped;
block ``j`` is ``[j*l', (j+1)*l')``). A query without any such token gets ``o = 0``, ``lse = -inf``.

Two kernels, launched in this order (``selected_fwd_launch``):

1. ``_selected_fwd_union_kernel`` (query tiles, ``QT = 4`` by default): one program per tile of QT
   consecutive queries; if the union of their selections has at most ``MAX_UNION`` distinct blocks
   (neighbours share blocks: always the init/local ones, in trained models most of them) it walks
   that union with all ``QT * G_ROWS`` rows (``G_ROWS = union_head_rows(G, QT)``: 4 per query for
   G = 4, 16 for G = 16), each block loaded once, the rows of queries that did not pick it masked;
   otherwise it only flags the tile (custom_ops/query_tiles.py). When no tile can exceed the
   threshold (``MAX_UNION >= QT * n``, the default when a union tile is no taller than one query's
   tile, e.g. G <= 4) it does every tile and kernel 2 is not launched.
2. ``_selected_fwd_kernel``: one program per (query position, batch x KV head), skipping flagged-done
   tiles: it loads the ``G`` query heads as the rows of one tile (padded to ``G_PAD >= 16`` rows
   inside the kernel, K/V are never repeated in memory), then loops over the ``n`` slots, loading
   each selected K/V block once for all heads.

Both use an online softmax in float32 (base-2 exponentials; the returned lse is natural-log); the
causal mask only cuts the query's own block. Offsets are int64 so that ``T * D`` may exceed 2**31.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .kernel_utils import LOG2E, TUNING, dims_pad, head_tile, load_kv_block, mma, selection_strides, static_sizes, upcast_dots
from .query_tiles import claim_tile, tile_plan, union_block

__all__ = ["selected_fwd_launch"]


@triton.jit
def _online_softmax_step(m_i, l_i, acc, logits, vb, IEEE: tl.constexpr, UPCAST: tl.constexpr):
    """One block of the online softmax: ``logits [ROWS, BS]`` in base 2 (masked keys ``-inf``),
    ``vb [BS, DV]``; returns the new row max ``m``, sum ``l`` and ``acc [ROWS, DV]`` (float32)."""
    m_new = tl.maximum(m_i, tl.max(logits, axis=1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp2(m_i - m_safe)
    p = tl.exp2(logits - m_safe[:, None])
    l_i = l_i * alpha + tl.sum(p, axis=1)
    acc = acc * alpha[:, None] + mma(p.to(vb.dtype), vb, IEEE, UPCAST)
    return m_new, l_i, acc


@triton.jit
def _softmax_result(m_i, l_i, acc):
    """``(o, lse)`` of the online softmax state (lse natural-log); rows without a key: 0, ``-inf``."""
    has_key = l_i > 0
    out = acc / tl.where(has_key, l_i, 1.0)[:, None]
    lse = tl.where(has_key, (m_i + tl.log2(tl.where(has_key, l_i, 1.0))) * 0.6931471805599453, float("-inf"))
    return out, lse


@triton.jit
def _store_result(o_ptr, lse_ptr, out, lse, o_row, lse_off, row_ok, dv, gates_ptr, o_cmp_ptr, o_win_ptr, y_ptr,
                  DV: tl.constexpr, COMBINE: tl.constexpr):  # fmt: skip
    """Stores ``out [ROWS, DV_PAD]`` at ``o_ptr + o_row`` (``o_row [ROWS]``: int64 offsets of the rows'
    first element) and ``lse`` at ``lse_ptr + lse_off``. ``COMBINE``: also the gated output
    ``y = g_cmp * o_cmp + g_slc * o + g_win * o_win`` (float32, ``o`` as stored: rounded to the output
    dtype, as :func:`flexnsa.custom_ops.gated_combine` would read it) into ``y_ptr``; ``o_cmp``,
    ``o_win`` and ``y`` are laid out like ``o`` (contiguous ``[B, HQ, T, DV]``), ``gates`` is
    ``[B, HQ, T, 3]`` contiguous."""
    offs = o_row[:, None] + dv[None, :]  # [ROWS, DV_PAD]
    mask = row_ok[:, None] & (dv[None, :] < DV)
    o_low = out.to(o_ptr.dtype.element_ty)
    tl.store(o_ptr + offs, o_low, mask=mask)
    tl.store(lse_ptr + lse_off, lse, mask=row_ok)
    if COMBINE:
        gate_row = (o_row // DV) * 3  # [ROWS]: the row's (b, h, t) in [B, HQ, T, 3]
        g_cmp = tl.load(gates_ptr + gate_row, mask=row_ok, other=0.0).to(tl.float32)
        g_slc = tl.load(gates_ptr + gate_row + 1, mask=row_ok, other=0.0).to(tl.float32)
        g_win = tl.load(gates_ptr + gate_row + 2, mask=row_ok, other=0.0).to(tl.float32)
        y = g_cmp[:, None] * tl.load(o_cmp_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        y += g_slc[:, None] * o_low.to(tl.float32)
        y += g_win[:, None] * tl.load(o_win_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        tl.store(y_ptr + offs, y.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _selected_fwd_kernel(
    q_ptr,  # [B, HQ, T, DK]
    k_ptr,  # [B, HKV, T, DK]
    v_ptr,  # [B, HKV, T, DV]
    idx_ptr,  # [B, HKV, T, N] int32/int64
    o_ptr,  # [B, HQ, T, DV] (output)
    lse_ptr,  # [B, HQ, T] float32 (output)
    done_ptr,  # TILE > 0: int8 [B * HKV, cdiv(T, TILE)], tiles the union kernel already did
    gates_ptr,  # COMBINE: [B, HQ, T, 3]
    o_cmp_ptr,  # COMBINE: [B, HQ, T, DV], like o
    o_win_ptr,  # COMBINE: [B, HQ, T, DV], like o
    y_ptr,  # COMBINE: [B, HQ, T, DV] (output): the gated sum of the three branches
    T,
    HKV,
    # scale * log2(e); constexpr because inductor passes python floats as fp64 scalars (seen on the
    # H200, torch 2.11), which would make the fp32 math fp64; one compile per distinct scale
    scale_log2: tl.constexpr,
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
    BS: tl.constexpr,  # l'
    BS_PAD: tl.constexpr,
    N: tl.constexpr,
    IEEE: tl.constexpr,  # float32 inputs: exact float32 products, not TF32
    UPCAST: tl.constexpr,
    TILE: tl.constexpr,  # 0, or the union kernel's queries per tile (skip the tiles it did)
    COMBINE: tl.constexpr,  # also write the gated output y (_store_result)
):
    t = tl.program_id(0).to(tl.int64)
    pid_bg = tl.program_id(1)
    if TILE > 0:
        if tl.load(done_ptr + pid_bg * tl.cdiv(T, TILE) + t // TILE) != 0:
            return
    b = (pid_bg // HKV).to(tl.int64)
    g = (pid_bg % HKV).to(tl.int64)

    h = tl.arange(0, G_PAD)
    head_ok = h < G
    head = g * G + h  # [G_PAD]
    dk = tl.arange(0, DK_PAD)
    dv = tl.arange(0, DV_PAD)
    q = tl.load(
        q_ptr + b * stride_qb + head[:, None] * stride_qh + t * stride_qt + dk[None, :],
        mask=head_ok[:, None] & (dk[None, :] < DK),
        other=0.0,
    )  # [G_PAD, DK_PAD]

    m_i = tl.full((G_PAD,), float("-inf"), tl.float32)
    l_i = tl.zeros((G_PAD,), tl.float32)
    acc = tl.zeros((G_PAD, DV_PAD), tl.float32)
    k_base = k_ptr + b * stride_kb + g * stride_kh
    v_base = v_ptr + b * stride_vb + g * stride_vh
    idx_base = idx_ptr + b * stride_ib + g * stride_ih + t * stride_it
    s_off = tl.arange(0, BS_PAD)
    for slot in range(N):
        blk = tl.load(idx_base + slot).to(tl.int64)
        pos = blk * BS + s_off  # [BS_PAD]
        key_ok = (pos >= 0) & (s_off < BS) & (pos <= t)  # blk = -1: pos < 0
        kb, vb = load_kv_block(k_base, v_base, pos, key_ok, stride_kt, stride_vt, DK, DK_PAD, DV, DV_PAD)
        logits = mma(q, tl.trans(kb), IEEE, UPCAST) * scale_log2  # [G_PAD, BS_PAD]
        logits = tl.where(key_ok[None, :], logits, float("-inf"))
        m_i, l_i, acc = _online_softmax_step(m_i, l_i, acc, logits, vb, IEEE, UPCAST)

    out, lse = _softmax_result(m_i, l_i, acc)
    o_row = b * stride_ob + head.to(tl.int64) * stride_oh + t * stride_ot  # [G_PAD]
    _store_result(o_ptr, lse_ptr, out, lse, o_row, b * stride_lb + head * stride_lh + t, head_ok, dv,
                  gates_ptr, o_cmp_ptr, o_win_ptr, y_ptr, DV, COMBINE)  # fmt: skip


@triton.jit
def _selected_fwd_union_kernel(
    q_ptr,  # [B, HQ, T, DK]
    k_ptr,  # [B, HKV, T, DK]
    v_ptr,  # [B, HKV, T, DV]
    idx_ptr,  # [B, HKV, T, N] int32/int64
    o_ptr,  # [B, HQ, T, DV] (output)
    lse_ptr,  # [B, HQ, T] float32 (output)
    done_ptr,  # int8 [B * HKV, cdiv(T, QT)] (output): 1 where this kernel did the tile
    gates_ptr,  # COMBINE: [B, HQ, T, 3]
    o_cmp_ptr,  # COMBINE: [B, HQ, T, DV], like o
    o_win_ptr,  # COMBINE: [B, HQ, T, DV], like o
    y_ptr,  # COMBINE: [B, HQ, T, DV] (output): the gated sum of the three branches
    T,
    HKV,
    scale_log2: tl.constexpr,  # constexpr: see _selected_fwd_kernel
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
    BS: tl.constexpr,  # l'
    BS_PAD: tl.constexpr,
    N: tl.constexpr,
    N_PAD: tl.constexpr,
    QT: tl.constexpr,  # queries per program (power of two)
    MAX_UNION: tl.constexpr,  # tiles with more distinct blocks are left to the one-query kernel
    IEEE: tl.constexpr,
    UPCAST: tl.constexpr,
    COMBINE: tl.constexpr,
):
    """Same results as :func:`_selected_fwd_kernel`, one program per tile of QT consecutive queries:
    the ``QT * G_PAD`` rows (query-major) attend the union of the tile's selected blocks, each block
    loaded once; a row ignores the blocks its query did not select (see custom_ops/query_tiles.py).
    A tile whose union has more than MAX_UNION blocks (little sharing: the masked rows would cost
    more than the saved loads) is only flagged, and the one-query kernel launched next does it."""
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
    row_t = (t0 + row_q).to(tl.int64)  # [ROWS] query position
    row_ok = (row_t < T) & (row_h < G)
    head = g * G + row_h  # [ROWS]
    dk = tl.arange(0, DK_PAD)
    dv = tl.arange(0, DV_PAD)
    q = tl.load(
        q_ptr + b * stride_qb + head[:, None] * stride_qh + row_t[:, None] * stride_qt + dk[None, :],
        mask=row_ok[:, None] & (dk[None, :] < DK),
        other=0.0,
    )  # [ROWS, DK_PAD]

    m_i = tl.full((QT * G_PAD,), float("-inf"), tl.float32)
    l_i = tl.zeros((QT * G_PAD,), tl.float32)
    acc = tl.zeros((QT * G_PAD, DV_PAD), tl.float32)
    k_base = k_ptr + b * stride_kb + g * stride_kh
    v_base = v_ptr + b * stride_vb + g * stride_vh
    s_off = tl.arange(0, BS_PAD)
    for u in range(num_blocks):
        blk, has_row = union_block(u, flat, rank, idx_tile, row_q, QT)
        pos = blk * BS + s_off  # [BS_PAD]
        pos_ok = (s_off < BS) & (pos < T)
        kb, vb = load_kv_block(k_base, v_base, pos, pos_ok, stride_kt, stride_vt, DK, DK_PAD, DV, DV_PAD)
        logits = mma(q, tl.trans(kb), IEEE, UPCAST) * scale_log2  # [ROWS, BS_PAD]
        key_ok = has_row[:, None] & pos_ok[None, :] & (pos[None, :] <= row_t[:, None])
        logits = tl.where(key_ok, logits, float("-inf"))
        m_i, l_i, acc = _online_softmax_step(m_i, l_i, acc, logits, vb, IEEE, UPCAST)

    out, lse = _softmax_result(m_i, l_i, acc)
    o_row = b * stride_ob + head.to(tl.int64) * stride_oh + row_t * stride_ot  # [ROWS]
    _store_result(o_ptr, lse_ptr, out, lse, o_row, b * stride_lb + head * stride_lh + row_t, row_ok, dv,
                  gates_ptr, o_cmp_ptr, o_win_ptr, y_ptr, DV, COMBINE)  # fmt: skip


def selected_fwd_launch(launch, q, k, v, indices, slc_block: int, scale: float, combine=None):
    """Runs the forward kernels on contiguous inputs; returns ``(o [B, HQ, T, Dv], lse [B, HQ, T] f32)``,
    or with ``combine = (o_cmp, o_win, gates)`` (contiguous, ``[B, HQ, T, Dv]`` twice in q's dtype and
    ``[B, HQ, T, 3]``) ``(y, o, lse)``, ``y`` the gated sum of the three branches written by the same
    kernels (:func:`_store_result`).

    ``TUNING["selected_fwd"]``: the query-tile keys of :func:`~.query_tiles.tile_plan` (``QT`` > 1
    first runs :func:`_selected_fwd_union_kernel` on the tiles whose selections share enough blocks,
    then :func:`_selected_fwd_kernel` on the rest), and ``num_warps`` / ``num_stages`` of the
    one-query kernel. The same keys in ``TUNING["selected_dq"]`` set the dq kernels.
    """
    options = dict(TUNING.get("selected_fwd", {}))
    B, HQ, T, Dk = q.shape
    HQ, HKV, Dk, Dv, n = static_sizes(HQ, k.shape[1], Dk, v.shape[-1], indices.shape[-1])
    G = HQ // HKV
    g_pad = head_tile(G)
    dk_pad, dv_pad = dims_pad(Dk), dims_pad(Dv)
    tiles = tile_plan(options, "selected_fwd", B, HKV, T, G, n, max(dk_pad, dv_pad), q.device)
    out = torch.empty(B, HQ, T, Dv, dtype=q.dtype, device=q.device)  # [B, HQ, T, Dv]
    lse = torch.empty(B, HQ, T, dtype=torch.float32, device=q.device)  # [B, HQ, T]
    args = (q, k, v, indices, out, lse)
    strides = selection_strides(q, k, v, indices, out, lse)
    if combine is not None:
        o_cmp, o_win, gates = combine
        y = torch.empty_like(out)  # [B, HQ, T, Dv]
        extra = (gates, o_cmp, o_win, y)
    else:
        extra = (lse, lse, lse, lse)  # placeholder pointers, never read
    shared = dict(G=G, G_PAD=g_pad, DK=Dk, DK_PAD=dk_pad, DV=Dv, DV_PAD=dv_pad, BS=slc_block,
                  BS_PAD=dims_pad(slc_block), N=n, IEEE=q.dtype == torch.float32, UPCAST=upcast_dots(q))  # fmt: skip
    qt, done = tiles["qt"], (lse if tiles["done"] is None else tiles["done"])  # lse: a placeholder pointer
    if qt > 1:
        launch(_selected_fwd_union_kernel)[(triton.cdiv(T, qt), B * HKV)](
            *args, done, *extra, T, HKV, scale * LOG2E, *strides,
            N_PAD=triton.next_power_of_2(n), QT=qt, MAX_UNION=tiles["max_union"], COMBINE=combine is not None,
            num_warps=tiles["union_warps"], num_stages=2, **dict(shared, G_PAD=tiles["rows"]),
        )  # fmt: skip
    if tiles["one_query"]:
        # 16 x 128 tiles: 2 warps (H200, 64k paper shape, same process: 15.5 ms against 18.5 ms with 4)
        warps = 2 if g_pad * max(dk_pad, dv_pad) <= 16 * 128 else 8
        launch(_selected_fwd_kernel)[(T, B * HKV)](
            *args, done, *extra, T, HKV, scale * LOG2E, *strides,
            TILE=qt if qt > 1 else 0, COMBINE=combine is not None, **shared, **{"num_warps": warps, "num_stages": 2, **options},
        )  # fmt: skip
    return (out, lse) if combine is None else (y, out, lse)
