"""Triton kernels: block-centric forward of the selected-attention branch (opt-in, see below).

Same result as :mod:`.selected_fwd` (NSA_SPEC.md, branch 2, step 5), computed the other way round:

1. ``_block_partial_kernel``: one program per work item of the reverse index of
   :func:`.selected_bwd.build_reverse_index` (a selection block ``j`` of KV group ``g`` and up to
   ``CHUNK`` of the queries that chose it). It loads the block's K/V once and loops over its
   queries, ``QB`` queries x ``G`` heads per step, writing for every (query ``t``, slot ``s``) the
   block's normalised partial and its statistics (base-2 exponents)::

       m[h, t, s] = max_{x in j, x <= t} scale*log2(e) * q[h, t] . k[g, x]
       l[h, t, s] = sum_{x in j, x <= t} 2^(scale*log2(e) * q[h, t] . k[g, x] - m)
       o[h, t, s] = sum_{x in j, x <= t} 2^(... - m) v[g, x] / l      (0 when l = 0)

2. ``_merge_kernel``: one program per (query, batch x KV head) merges the ``n`` slots::

       M = max_s m[s],  w_s = l[s] 2^(m[s] - M),  o = sum_s w_s o[s] / sum_s w_s,
       lse = ln 2 * (M + log2 sum_s w_s)   (o = 0, lse = -inf without any visible key)

   Slots holding ``-1`` are skipped (the reverse index has no entry for them).

Why: the query-centric kernel reads 16 K/V blocks per (query, group), 139 GB at 64k (paper shape),
and runs at the L2 bandwidth limit (``perf/NOTES.md``). Here each block is read once per work item
and the queries are gathered instead: ``B * T * n * HQ * Dk`` elements of q (17.2 GB in bf16 at 64k,
paper shape: B=1, HQ=64, n=16, Dk=Dv=128), plus ``B * T * n * HQ * Dv`` elements of partials written
and read back (17.2 GB each way, in a buffer allocated per call; twice that for float32 inputs) and
0.5 GB of (m, l).
Partials are stored in the input dtype (float32 for float32 inputs), so bf16 results carry one more
rounding than the query-centric kernel's.

Opt-in until measured on a GPU: ``kernel_utils.TUNING["selected_fwd"] = {"impl": "blocks"}``
(optional ``ROWS``, ``CHUNK``, ``num_warps``, ``num_stages``); the backward is unchanged.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .kernel_utils import LOG2E, dims_pad, head_tile, mma, upcast_dots
from .selected_bwd import DKV_CHUNK, build_reverse_index

__all__ = ["selected_fwd_blocks_launch"]


@triton.jit
def _block_partial_kernel(
    q_ptr,  # [B, HQ, T, DK]
    k_ptr,  # [B, HKV, T, DK]
    v_ptr,  # [B, HKV, T, DV]
    entry_t_ptr,  # [L] int32: query of each sorted index entry
    entry_slot_ptr,  # [L] int32: its slot
    item_key_ptr,  # [W] int32: (b * HKV + g) * NB + block, or >= NUM_KEYS for an empty item
    item_start_ptr,  # [W] int32
    item_end_ptr,  # [W] int32
    o_part_ptr,  # [B * HKV, T, N, G, DV] (q's dtype or float32)
    m_part_ptr,  # [B * HKV, T, N, G] float32
    l_part_ptr,  # [B * HKV, T, N, G] float32
    T,
    HKV,
    NB,
    NUM_KEYS,
    scale_log2: tl.constexpr,  # constexpr: inductor would pass a python float as an fp64 scalar
    stride_qb,
    stride_qh,
    stride_qt,
    stride_kb,
    stride_kh,
    stride_kt,
    stride_vb,
    stride_vh,
    stride_vt,
    G: tl.constexpr,
    G_PAD: tl.constexpr,
    QB: tl.constexpr,  # queries per step
    N: tl.constexpr,
    DK: tl.constexpr,
    DK_PAD: tl.constexpr,
    DV: tl.constexpr,
    DV_PAD: tl.constexpr,
    BS: tl.constexpr,
    BS_PAD: tl.constexpr,
    IEEE: tl.constexpr,
    UPCAST: tl.constexpr,
):
    w = tl.program_id(0).to(tl.int64)
    key = tl.load(item_key_ptr + w)
    if key < NUM_KEYS:
        start = tl.load(item_start_ptr + w)
        end = tl.load(item_end_ptr + w)
        bg = (key // NB).to(tl.int64)
        blk = (key % NB).to(tl.int64)
        b = bg // HKV
        g = bg % HKV

        s_off = tl.arange(0, BS_PAD)
        pos = blk * BS + s_off  # [BS_PAD]
        pos_ok = (s_off < BS) & (pos < T)
        dk_off = tl.arange(0, DK_PAD)
        dv_off = tl.arange(0, DV_PAD)
        kb = tl.load(
            k_ptr + b * stride_kb + g * stride_kh + pos[:, None] * stride_kt + dk_off[None, :],
            mask=pos_ok[:, None] & (dk_off[None, :] < DK),
            other=0.0,
        )  # [BS_PAD, DK_PAD]
        vb = tl.load(
            v_ptr + b * stride_vb + g * stride_vh + pos[:, None] * stride_vt + dv_off[None, :],
            mask=pos_ok[:, None] & (dv_off[None, :] < DV),
            other=0.0,
        )  # [BS_PAD, DV_PAD]

        rows = tl.arange(0, QB * G_PAD)
        row_q = rows // G_PAD  # query within the step
        row_h = rows % G_PAD  # head within the group
        head = g * G + row_h  # [ROWS]
        for e0 in range(start, end, QB):
            entry = e0 + row_q
            row_ok = (entry < end) & (row_h < G)
            t = tl.load(entry_t_ptr + entry, mask=row_ok, other=0).to(tl.int64)  # [ROWS]
            slot = tl.load(entry_slot_ptr + entry, mask=row_ok, other=0).to(tl.int64)  # [ROWS]
            q = tl.load(
                q_ptr + b * stride_qb + head[:, None] * stride_qh + t[:, None] * stride_qt + dk_off[None, :],
                mask=row_ok[:, None] & (dk_off[None, :] < DK),
                other=0.0,
            )  # [ROWS, DK_PAD]
            logits = mma(q, tl.trans(kb), IEEE, UPCAST) * scale_log2  # [ROWS, BS_PAD]
            valid = row_ok[:, None] & pos_ok[None, :] & (pos[None, :] <= t[:, None])
            logits = tl.where(valid, logits, float("-inf"))
            m = tl.max(logits, axis=1)  # [ROWS]
            m_safe = tl.where(m == float("-inf"), 0.0, m)
            p = tl.exp2(logits - m_safe[:, None])  # [ROWS, BS_PAD], 0 where masked
            l = tl.sum(p, axis=1)  # [ROWS]
            o = mma(p.to(vb.dtype), vb, IEEE, UPCAST) / tl.where(l > 0, l, 1.0)[:, None]  # [ROWS, DV_PAD]
            stat = ((bg * T + t) * N + slot) * G + row_h  # [ROWS] row of (b*HKV+g, t, slot, h)
            tl.store(
                o_part_ptr + stat[:, None] * DV + dv_off[None, :],
                o.to(o_part_ptr.dtype.element_ty),
                mask=row_ok[:, None] & (dv_off[None, :] < DV),
            )
            tl.store(m_part_ptr + stat, m, mask=row_ok)
            tl.store(l_part_ptr + stat, l, mask=row_ok)


@triton.jit
def _merge_kernel(
    idx_ptr,  # [B, HKV, T, N] int32/int64
    o_part_ptr,  # [B * HKV, T, N, G, DV]
    m_part_ptr,  # [B * HKV, T, N, G] float32
    l_part_ptr,
    o_ptr,  # [B, HQ, T, DV] (output)
    lse_ptr,  # [B, HQ, T] float32 (output)
    T,
    HKV,
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
    N: tl.constexpr,
    N_PAD: tl.constexpr,
    DV: tl.constexpr,
    DV_PAD: tl.constexpr,
):
    t = tl.program_id(0).to(tl.int64)
    bg = tl.program_id(1).to(tl.int64)
    b = bg // HKV
    g = bg % HKV
    h = tl.arange(0, G_PAD)
    head_ok = h < G
    sl = tl.arange(0, N_PAD)
    blk = tl.load(idx_ptr + b * stride_ib + g * stride_ih + t * stride_it + sl, mask=sl < N, other=-1)  # [N_PAD]
    use = head_ok[:, None] & (blk >= 0)[None, :]  # [G_PAD, N_PAD]
    stat = ((bg * T + t) * N + sl[None, :]) * G + h[:, None]  # [G_PAD, N_PAD]
    m = tl.load(m_part_ptr + stat, mask=use, other=float("-inf"))
    l = tl.load(l_part_ptr + stat, mask=use, other=0.0)
    m_max = tl.max(m, axis=1)  # [G_PAD]
    m_max = tl.where(m_max == float("-inf"), 0.0, m_max)
    wts = tl.where(use & (l > 0), l * tl.exp2(m - m_max[:, None]), 0.0)  # [G_PAD, N_PAD]
    total = tl.sum(wts, axis=1)  # [G_PAD]
    dv = tl.arange(0, DV_PAD)
    acc = tl.zeros((G_PAD, DV_PAD), tl.float32)
    for s in tl.static_range(N):  # one [G_PAD, DV] partial per slot
        w_s = tl.sum(tl.where(sl[None, :] == s, wts, 0.0), axis=1)  # [G_PAD]
        # written rows only: a -1 slot's partial is uninitialised memory (0 * NaN would be NaN)
        use_s = tl.sum(tl.where(sl[None, :] == s, use.to(tl.int32), 0), axis=1) > 0  # [G_PAD]
        row_s = ((bg * T + t) * N + s) * G + h  # [G_PAD]
        o_s = tl.load(
            o_part_ptr + row_s[:, None] * DV + dv[None, :],
            mask=use_s[:, None] & (dv[None, :] < DV),
            other=0.0,
        ).to(tl.float32)  # [G_PAD, DV_PAD]
        acc += w_s[:, None] * o_s
    has_key = total > 0
    out = acc / tl.where(has_key, total, 1.0)[:, None]
    lse = tl.where(has_key, (m_max + tl.log2(tl.where(has_key, total, 1.0))) * 0.6931471805599453, float("-inf"))
    head = g * G + h
    tl.store(
        o_ptr + b * stride_ob + head[:, None] * stride_oh + t * stride_ot + dv[None, :],
        out.to(o_ptr.dtype.element_ty),
        mask=head_ok[:, None] & (dv[None, :] < DV),
    )
    tl.store(lse_ptr + b * stride_lb + head * stride_lh + t, lse, mask=head_ok)


def selected_fwd_blocks_launch(launch, q, k, v, indices, slc_block: int, scale: float, options: dict):
    """Block-centric forward on contiguous inputs; returns ``(o [B, HQ, T, Dv], lse [B, HQ, T] f32)``.

    ``options``: ``ROWS`` (query rows per step, default 64), ``CHUNK`` (queries per work item,
    default :data:`.selected_bwd.DKV_CHUNK`), ``num_warps`` (4), ``num_stages`` (2).
    """
    unknown = set(options) - {"ROWS", "CHUNK", "num_warps", "num_stages"}
    if unknown:  # would be dropped silently (the query-centric kernel takes other keys)
        raise ValueError(
            f"TUNING['selected_fwd'] with impl 'blocks' takes ROWS, CHUNK, num_warps, num_stages; got {sorted(unknown)}"
        )
    B, HQ, T, Dk = q.shape
    HKV, Dv, n = k.shape[1], v.shape[-1], indices.shape[-1]
    G = HQ // HKV
    nb = -(-T // slc_block)
    g_rows = triton.next_power_of_2(G)
    qb = max(1, options.get("ROWS", 64) // g_rows)
    rev = build_reverse_index(indices, nb, options.get("CHUNK", DKV_CHUNK))
    part_dtype = torch.float32 if q.dtype == torch.float32 else q.dtype
    o_part = torch.empty(B * HKV, T, n, G, Dv, dtype=part_dtype, device=q.device)  # [B*HKV, T, n, G, Dv]
    m_part = torch.empty(B * HKV, T, n, G, dtype=torch.float32, device=q.device)  # [B*HKV, T, n, G]
    l_part = torch.empty(B * HKV, T, n, G, dtype=torch.float32, device=q.device)  # [B*HKV, T, n, G]
    dk_pad, dv_pad, bs_pad = dims_pad(Dk), dims_pad(Dv), dims_pad(slc_block)
    launch(_block_partial_kernel)[(rev["max_items"],)](
        q, k, v, rev["entry_t"], rev["entry_slot"], rev["item_key"], rev["item_start"], rev["item_end"],
        o_part, m_part, l_part, T, HKV, nb, rev["num_keys"], scale * LOG2E,
        q.stride(0), q.stride(1), q.stride(2),
        k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        G=G, G_PAD=g_rows, QB=qb, N=n, DK=Dk, DK_PAD=dk_pad, DV=Dv, DV_PAD=dv_pad, BS=slc_block, BS_PAD=bs_pad,
        IEEE=q.dtype == torch.float32, UPCAST=upcast_dots(q),
        num_warps=options.get("num_warps", 4), num_stages=options.get("num_stages", 2),
    )  # fmt: skip
    out = torch.empty(B, HQ, T, Dv, dtype=q.dtype, device=q.device)  # [B, HQ, T, Dv]
    lse = torch.empty(B, HQ, T, dtype=torch.float32, device=q.device)  # [B, HQ, T]
    launch(_merge_kernel)[(T, B * HKV)](
        indices, o_part, m_part, l_part, out, lse, T, HKV,
        indices.stride(0), indices.stride(1), indices.stride(2),
        out.stride(0), out.stride(1), out.stride(2),
        lse.stride(0), lse.stride(1),
        G=G, G_PAD=head_tile(G), N=n, N_PAD=triton.next_power_of_2(n), DV=Dv, DV_PAD=dv_pad,
        num_warps=4,
    )  # fmt: skip
    return out, lse
