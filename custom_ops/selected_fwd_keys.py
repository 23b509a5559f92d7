"""Triton kernels: the selected-attention forward by key blocks, then a merge (opt-in:
``TUNING["selected_fwd"]["KEYS"] = True``).

The default forward (:mod:`.selected_fwd`) gathers, for every query, its ``n`` selected K/V blocks:
``n * l' * (Dk + Dv)`` bytes per query and KV group, mostly from L2. Here the work is turned around,
as in the dK/dV kernel: every selected block is loaded once per work item of the reverse index
(:func:`.selected_bwd.build_reverse_index`: the queries that selected it, ``CHUNK`` at most), and its
queries' ``G`` head rows are gathered, ``QB`` queries per step. Each (query, slot) entry gets the
softmax of its block alone:

    lse_s[h]  = log2 sum_{j in block s, j <= t} exp2(scale*log2(e) * q[h] . k[j])
    o_s[h]    = sum_j exp2(... - lse_s[h]) v[j]                      (stored in q's dtype)

and ``_selected_merge_kernel`` combines the entries of each query in slot order:

    lse[h] = log2 sum_s exp2(lse_s[h]),   o[h] = sum_s exp2(lse_s[h] - lse[h]) o_s[h]

(``lse`` returned in nats; a query without any visible key gets ``o = 0``, ``lse = -inf``; ``-1`` slots
have no entry and are skipped). The partials make a round trip through memory
(``B * HKV * T * n * next_pow2(G) * Dv`` elements in q's dtype, plus float32 ``lse_s``), traded against
the gathered K/V bytes of the default.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .kernel_utils import LOG2E, dims_pad, mma, tuned, upcast_dots
from .selected_fwd import _store_result

__all__ = ["selected_fwd_keys_launch"]


@triton.jit
def _selected_fwd_keys_kernel(
    q_ptr,  # [B, HQ, T, DK]
    k_ptr,  # [B, HKV, T, DK]
    v_ptr,  # [B, HKV, T, DV]
    entry_t_ptr,  # [L] int32: query of each sorted index entry
    entry_pos_ptr,  # [L] int32: flat index slot ((b * HKV + g) * T + t) * N + slot of each entry
    item_key_ptr,  # [W] int32: (b * HKV + g) * NB + block, or >= NUM_KEYS for an empty item
    item_start_ptr,  # [W] int32
    item_end_ptr,  # [W] int32
    part_o_ptr,  # [B * HKV * T * N, G_ROWS, DV_PAD] (output), q's dtype
    part_lse_ptr,  # [B * HKV * T * N, G_ROWS] float32 (output), base 2
    T,
    HKV,
    NB,
    NUM_KEYS,
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
    G: tl.constexpr,
    G_ROWS: tl.constexpr,  # rows per query: G padded to a power of two
    QB: tl.constexpr,  # queries per step
    DK: tl.constexpr,
    DK_PAD: tl.constexpr,
    DV: tl.constexpr,
    DV_PAD: tl.constexpr,
    BS: tl.constexpr,
    BS_PAD: tl.constexpr,
    IEEE: tl.constexpr,
    UPCAST: tl.constexpr,
):
    """One program per work item: its block's K/V loaded once, ``QB * G_ROWS`` query rows per step;
    each entry's block-local ``(o_s, lse_s)`` stored at its flat index slot."""
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
        rows = tl.arange(0, QB * G_ROWS)
        row_q = rows // G_ROWS  # query slot within the step
        row_h = rows % G_ROWS
        head = g * G + row_h  # [ROWS]
        for e0 in range(start, end, QB):
            entry = e0 + row_q  # [ROWS]
            in_item = entry < end
            row_ok = in_item & (row_h < G)
            t = tl.load(entry_t_ptr + entry, mask=in_item, other=0).to(tl.int64)  # [ROWS]
            q = tl.load(
                q_ptr + b * stride_qb + head[:, None] * stride_qh + t[:, None] * stride_qt + dk_off[None, :],
                mask=row_ok[:, None] & (dk_off[None, :] < DK),
                other=0.0,
            )  # [ROWS, DK_PAD]
            logits = mma(q, tl.trans(kb), IEEE, UPCAST) * scale_log2  # [ROWS, BS_PAD]
            valid = pos_ok[None, :] & (pos[None, :] <= t[:, None])
            logits = tl.where(valid, logits, float("-inf"))
            m = tl.max(logits, axis=1)  # [ROWS]
            m_safe = tl.where(m == float("-inf"), 0.0, m)
            p = tl.exp2(logits - m_safe[:, None])
            l_sum = tl.sum(p, axis=1)
            has_key = l_sum > 0
            o = mma(p.to(vb.dtype), vb, IEEE, UPCAST) / tl.where(has_key, l_sum, 1.0)[:, None]  # [ROWS, DV_PAD]
            lse2 = tl.where(has_key, m_safe + tl.log2(tl.where(has_key, l_sum, 1.0)), float("-inf"))
            e_pos = tl.load(entry_pos_ptr + entry, mask=in_item, other=0).to(tl.int64)  # [ROWS]
            part_row = e_pos * G_ROWS + row_h  # [ROWS]
            tl.store(part_o_ptr + part_row[:, None] * DV_PAD + dv_off[None, :], o.to(part_o_ptr.dtype.element_ty),
                     mask=in_item[:, None])  # fmt: skip
            tl.store(part_lse_ptr + part_row, lse2, mask=in_item)


@triton.jit
def _selected_merge_kernel(
    idx_ptr,  # [B, HKV, T, N]
    part_o_ptr,  # [B * HKV * T * N, G_ROWS, DV_PAD]
    part_lse_ptr,  # [B * HKV * T * N, G_ROWS] float32, base 2
    o_ptr,  # [B, HQ, T, DV] (output)
    lse_ptr,  # [B, HQ, T] float32 (output), natural log
    gates_ptr,  # COMBINE: [B, HQ, T, 3]
    o_cmp_ptr,  # COMBINE: like o
    o_win_ptr,  # COMBINE: like o
    y_ptr,  # COMBINE: like o (output)
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
    G_ROWS: tl.constexpr,
    DV: tl.constexpr,
    DV_PAD: tl.constexpr,
    N: tl.constexpr,
    COMBINE: tl.constexpr,
):
    """One program per (query, batch x KV head): the entries of its ``N`` slots merged in slot order."""
    t = tl.program_id(0).to(tl.int64)
    pid_bg = tl.program_id(1).to(tl.int64)
    b = pid_bg // HKV
    g = pid_bg % HKV
    h = tl.arange(0, G_ROWS)
    head_ok = h < G
    dv = tl.arange(0, DV_PAD)
    m_i = tl.full((G_ROWS,), float("-inf"), tl.float32)
    l_i = tl.zeros((G_ROWS,), tl.float32)
    acc = tl.zeros((G_ROWS, DV_PAD), tl.float32)
    idx_base = idx_ptr + b * stride_ib + g * stride_ih + t * stride_it
    entry0 = (pid_bg * T + t) * N
    for slot in range(N):
        blk = tl.load(idx_base + slot)
        if blk >= 0:
            part_row = (entry0 + slot) * G_ROWS + h  # [G_ROWS]
            lse_s = tl.load(part_lse_ptr + part_row)  # [G_ROWS] base 2, -inf: no visible key
            o_s = tl.load(part_o_ptr + part_row[:, None] * DV_PAD + dv[None, :]).to(tl.float32)  # [G_ROWS, DV_PAD]
            m_new = tl.maximum(m_i, lse_s)
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            alpha = tl.exp2(m_i - m_safe)
            w_s = tl.exp2(lse_s - m_safe)
            l_i = l_i * alpha + w_s
            acc = acc * alpha[:, None] + w_s[:, None] * o_s
            m_i = m_new
    has_key = l_i > 0
    out = acc / tl.where(has_key, l_i, 1.0)[:, None]
    lse = tl.where(has_key, (m_i + tl.log2(tl.where(has_key, l_i, 1.0))) * 0.6931471805599453, float("-inf"))
    head = g * G + h
    o_row = b * stride_ob + head.to(tl.int64) * stride_oh + t * stride_ot  # [G_ROWS]
    _store_result(o_ptr, lse_ptr, out, lse, o_row, b * stride_lb + head * stride_lh + t, head_ok, dv,
                  gates_ptr, o_cmp_ptr, o_win_ptr, y_ptr, DV, COMBINE)  # fmt: skip


def selected_fwd_keys_launch(launch, q, k, v, indices, slc_block: int, scale: float, combine, options: dict):
    """The key-block forward on contiguous inputs; same results and return values as
    :func:`.selected_fwd.selected_fwd_launch` (``combine``: ``(o_cmp, o_win, gates)`` or None).
    ``options``: ``ROWS`` (query rows per step, default 64), ``CHUNK`` (queries per work item, default
    :func:`.selected_bwd.dkv_chunk`), ``num_warps``, ``num_stages``."""
    from .selected_bwd import build_reverse_index, dkv_chunk

    B, HQ, T, Dk = q.shape
    HKV, Dv, n = k.shape[1], v.shape[-1], indices.shape[-1]
    G = HQ // HKV
    g_rows = triton.next_power_of_2(G)
    dk_pad, dv_pad, bs_pad = dims_pad(Dk), dims_pad(Dv), dims_pad(slc_block)
    opts = {"num_warps": 4, "num_stages": 2, "ROWS": 64, "CHUNK": dkv_chunk(B * HKV * T * n), **options}
    rev = build_reverse_index(indices, -(-T // slc_block), opts.pop("CHUNK"))
    qb = max(1, opts.pop("ROWS") // g_rows)
    entries = B * HKV * T * n
    part_o = torch.empty(entries, g_rows, dv_pad, dtype=q.dtype, device=q.device)  # [L, G_ROWS, DV_PAD]
    part_lse = torch.empty(entries, g_rows, dtype=torch.float32, device=q.device)  # [L, G_ROWS]
    dims = dict(DK=Dk, DK_PAD=dk_pad, DV=Dv, DV_PAD=dv_pad, BS=slc_block, BS_PAD=bs_pad)
    launch(_selected_fwd_keys_kernel)[(rev["max_items"],)](
        q, k, v, rev["entry_t"], rev["entry_pos"], rev["item_key"], rev["item_start"], rev["item_end"],
        part_o, part_lse, T, HKV, -(-T // slc_block), rev["num_keys"], scale * LOG2E,
        *q.stride()[:3], *k.stride()[:3], *v.stride()[:3],
        G=G, G_ROWS=g_rows, QB=qb, IEEE=q.dtype == torch.float32, UPCAST=upcast_dots(q), **dims, **opts,
    )  # fmt: skip
    out = torch.empty(B, HQ, T, Dv, dtype=q.dtype, device=q.device)  # [B, HQ, T, Dv]
    lse = torch.empty(B, HQ, T, dtype=torch.float32, device=q.device)  # [B, HQ, T]
    if combine is not None:
        o_cmp, o_win, gates = combine
        y = torch.empty_like(out)  # [B, HQ, T, Dv]
        extra = (gates, o_cmp, o_win, y)
    else:
        extra = (lse, lse, lse, lse)  # placeholder pointers, never read
    merge = tuned("selected_merge", num_warps=4 if g_rows * dv_pad > 16 * 128 else 2)
    launch(_selected_merge_kernel)[(T, B * HKV)](
        indices, part_o, part_lse, out, lse, *extra, T, HKV, *indices.stride()[:3], *out.stride()[:3], *lse.stride()[:2],
        G=G, G_ROWS=g_rows, DV=Dv, DV_PAD=dv_pad, N=n, COMBINE=combine is not None, **merge,
    )  # fmt: skip
    return (out, lse) if combine is None else (y, out, lse)
