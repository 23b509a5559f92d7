"""Validated Python entry points of the selection branch (what ``flexnsa.nsa_attention`` calls).

Both take an :class:`flexnsa.NSAConfig`, check their inputs (``ValueError`` naming the argument),
and call the ``flexnsa::`` ops of :mod:`.ops` with plain ints and floats.
"""

from __future__ import annotations

import math

import torch

from flexnsa._checks import Dims, _check_tensor, _expect_shape, check_block_indices, check_config, check_qk, check_scale

from . import ops  # noqa: F401  (registers the ops)
from .combine import check_combine_inputs

__all__ = ["select_blocks", "selected_attention", "selected_attention_gated"]


def _scale(scale, head_dim: int) -> float:
    check_scale(scale)
    return 1.0 / math.sqrt(head_dim) if scale is None else float(scale)


def select_blocks(q: torch.Tensor, k_cmp: torch.Tensor, lse: torch.Tensor, config, scale=None) -> torch.Tensor:
    """Top-n selection of NSA_SPEC.md (branch 2, steps 1-4) in one kernel.

    Args:
        q: ``[B, HQ, T, Dk]``; k_cmp: ``[B, HKV, Tc, Dk]``, ``Tc = config.num_cmp_tokens(T)``.
        lse: ``[B, HQ, T]`` log-sum-exp of the compressed branch (float; ``-inf`` on rows that see
            no compressed token). The probabilities ``exp(scale q.k_cmp - lse)`` are the
            compressed branch's attention weights.
        config: :class:`flexnsa.NSAConfig` (None: paper defaults); scale: ``1/sqrt(Dk)`` if None.
    Returns:
        ``int32 [B, HKV, T, n]`` selected blocks, unused slots ``-1``, slot order unspecified (the v1 kernel writes them by descending score; v2, the default, in no order, ``-1`` in any slot). No gradient.
    """
    config = check_config(config)
    dims = check_qk(q, k_cmp, config)
    _check_tensor("lse", lse, rank=3)
    _expect_shape("lse", lse, (dims.batch, dims.q_heads, dims.seq_len), "[B, HQ, T]")
    if lse.device != q.device:
        raise ValueError(f"lse must be on q's device {q.device}, got {lse.device}")
    scale = _scale(scale, dims.qk_dim)
    return torch.ops.flexnsa.select_blocks(
        q.detach(),
        k_cmp.detach(),
        lse.detach(),
        config.cmp_block,
        config.cmp_stride,
        config.slc_block,
        config.num_selected,
        config.num_init_blocks,
        config.num_local_blocks,
        scale,
    )


def _check_attention_inputs(q, k, v, indices, config) -> Dims:
    for name, x in (("q", q), ("k", k), ("v", v)):
        _check_tensor(name, x)
    B, HQ, T, Dk = q.shape
    if min(B, HQ, T, Dk) < 1:
        raise ValueError(f"q must have non-empty sizes [B, HQ, T, Dk], got {tuple(q.shape)}")
    HKV, Dv = k.shape[1], v.shape[-1]
    if HKV < 1 or HQ % HKV:
        raise ValueError(f"k has {HKV} heads, which must divide the {HQ} query heads of q (GQA: HQ = G * HKV)")
    if Dv < 1:
        raise ValueError(f"v must have a non-empty head dim, got shape {tuple(v.shape)}")
    _expect_shape("k", k, (B, HKV, T, Dk), "[B, HKV, T, Dk]")
    _expect_shape("v", v, (B, HKV, T, Dv), "[B, HKV, T, Dv]")
    for name, x in (("k", k), ("v", v)):
        if x.dtype != q.dtype:
            raise ValueError(f"{name} must have q's dtype {q.dtype}, got {x.dtype}")
        if x.device != q.device:
            raise ValueError(f"{name} must be on q's device {q.device}, got {x.device}")
    if isinstance(indices, torch.Tensor) and indices.device != q.device:
        raise ValueError(f"indices must be on q's device {q.device}, got {indices.device}")
    dims = Dims(B, HQ, HKV, T, config.num_cmp_tokens(T), Dk, Dv)
    try:
        check_block_indices(indices, dims, config)
    except ValueError as err:  # name the argument as this function calls it
        raise ValueError(str(err).replace("block_indices", "indices")) from None
    return dims


def selected_attention(q, k, v, indices, config, scale=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Selected-attention branch (NSA_SPEC.md, branch 2, step 5) with the Triton kernels.

    ``o[h, t] = softmax attention of q[h, t] over the tokens s <= t of the blocks
    indices[b, h // G, t, :]`` (``-1`` slots ignored, any slot order; duplicate blocks are not
    supported).

    Args:
        q: ``[B, HQ, T, Dk]``; k: ``[B, HKV, T, Dk]``; v: ``[B, HKV, T, Dv]``; ``HKV`` divides ``HQ``.
        indices: int32/int64 ``[B, HKV, T, n]`` with ``n = config.num_selected``, values in ``[-1, NB)``.
        config: :class:`flexnsa.NSAConfig` (its ``slc_block`` and ``num_selected`` are used).
        scale: softmax scale, ``1/sqrt(Dk)`` if None.
    Returns:
        ``(o [B, HQ, T, Dv]`` in q's dtype, ``lse [B, HQ, T]`` float32 (float64 for float64 inputs),
        ``-inf`` for a query without any selected token, where ``o = 0``). ``o`` is differentiable in
        q, k and v; ``lse`` is returned without gradient (marked non-differentiable).
    """
    config = check_config(config)
    dims = _check_attention_inputs(q, k, v, indices, config)
    scale = _scale(scale, dims.qk_dim)
    return torch.ops.flexnsa.selected_attention(q, k, v, indices, config.slc_block, scale)


def selected_attention_gated(q, k, v, indices, o_cmp, o_win, gates, config, scale=None):
    """:func:`selected_attention` and NSA's gated sum of the three branches in one pass.

    ``y = g_cmp * o_cmp + g_slc * o_slc + g_win * o_win`` (float32, cast to q's dtype), written by the
    selected-attention kernels' epilogue, so the selected output is not read back by a separate
    combine pass (:func:`flexnsa.custom_ops.gated_combine` gives the same values).

    Args:
        q, k, v, indices, config, scale: as :func:`selected_attention`.
        o_cmp, o_win: ``[B, HQ, T, Dv]`` compressed and window branch outputs, q's dtype and device.
        gates: ``[B, HQ, T, 3]`` (cmp, slc, win), any float dtype, on q's device.
    Returns:
        ``(y [B, HQ, T, Dv], o_slc [B, HQ, T, Dv], lse [B, HQ, T])``; ``y`` and ``o_slc`` are
        differentiable in q, k, v, o_cmp, o_win and gates; ``lse`` has no gradient.
    """
    config = check_config(config)
    dims = _check_attention_inputs(q, k, v, indices, config)
    _check_tensor("o_cmp", o_cmp, rank=4)
    _expect_shape("o_cmp", o_cmp, (dims.batch, dims.q_heads, dims.seq_len, dims.v_dim), "[B, HQ, T, Dv]")
    if o_cmp.dtype != q.dtype or o_cmp.device != q.device:
        raise ValueError(f"o_cmp must have q's dtype and device ({q.dtype}, {q.device}), got ({o_cmp.dtype}, {o_cmp.device})")
    check_combine_inputs(o_cmp, (("o_win", o_win),), gates)
    scale = _scale(scale, dims.qk_dim)
    return torch.ops.flexnsa.selected_attention_gated(q, k, v, indices, o_cmp, o_win, gates, config.slc_block, scale)
