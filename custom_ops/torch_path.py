"""Pure-PyTorch bodies of the flexnsa ops: what the ops run on the CPU (and for float64).

Same math as the Triton kernels, written with the dense ``[T, T]`` masks of
:mod:`flexnsa.reference` (O(T^2) memory: short sequences only). Every function is traceable by
``torch.compile`` (no data-dependent Python) and accepts fake tensors.
"""

from __future__ import annotations

import torch

from flexnsa import reference
from flexnsa.config import NSAConfig

__all__ = ["select_blocks", "selected_attention_fwd", "selected_attention_bwd"]


def _slc_config(slc_block: int) -> NSAConfig:
    """A config that only carries the selection block size (all that ``selection_mask`` reads)."""
    return NSAConfig(slc_block, slc_block, slc_block, 1, 0, 0, 0)


def select_blocks(q, k_cmp, lse, cmp_block, cmp_stride, slc_block, num_selected, num_init, num_local, scale):
    """``int32 [B, HKV, T, n]``: ``reference.select_blocks`` with the given compressed-branch lse."""
    cfg = NSAConfig(cmp_block, cmp_stride, slc_block, num_selected, num_init, num_local, 0)
    return reference.select_blocks(q, k_cmp, cfg, scale, lse=lse)


def _mask(indices: torch.Tensor, seq_len: int, slc_block: int, groups: int) -> torch.Tensor:
    mask = reference.selection_mask(indices, seq_len, _slc_config(slc_block))
    return mask.repeat_interleave(groups, dim=1) if groups > 1 else mask  # [B, HQ, T, T]


def selected_attention_fwd(q, k, v, indices, slc_block: int, scale: float):
    """``(o [B, HQ, T, Dv], lse [B, HQ, T])``: ``reference.selected_attention`` (products upcast to
    float32, float64 for float64 inputs); lse is float32 (float64 for float64 inputs)."""
    groups = q.shape[1] // k.shape[1]
    return reference.masked_attention(q, k, v, _mask(indices, q.shape[2], slc_block, groups), scale)


def selected_attention_bwd(grad_out, q, k, v, out, lse, indices, slc_block: int, scale: float, delta=None):
    """``(dq, dk, dv)`` of :func:`selected_attention_fwd`, in closed form (module docstring of
    ``selected_bwd``): ``P = exp(scale q k^T - lse)`` on the mask, ``dS = P (do v^T - delta)``,
    ``delta = rowsum(o * do)`` (``[B, HQ, T]``, computed here unless given); dk and dv summed over
    the G query heads of each KV head."""
    B, HQ, T, _ = q.shape
    HKV = k.shape[1]
    groups = HQ // HKV
    acc = reference.accumulation_dtype(q.dtype)
    mask = _mask(indices, T, slc_block, groups)  # [B, HQ, T, T]
    k_x = k.repeat_interleave(groups, dim=1).to(acc)  # [B, HQ, T, Dk]
    v_x = v.repeat_interleave(groups, dim=1).to(acc)  # [B, HQ, T, Dv]
    q_a, do_a = q.to(acc), grad_out.to(acc)
    lse_safe = torch.where(torch.isinf(lse), 0.0, lse.to(acc))[..., None]  # [B, HQ, T, 1]
    probs = torch.where(mask, torch.exp(q_a @ k_x.transpose(-1, -2) * scale - lse_safe), 0.0)  # [B, HQ, T, T]
    if delta is None:
        delta = (out.to(acc) * do_a).sum(-1)  # [B, HQ, T]
    delta = delta.to(acc)[..., None]  # [B, HQ, T, 1]
    dscores = probs * (do_a @ v_x.transpose(-1, -2) - delta)  # [B, HQ, T, T]
    dq = (dscores @ k_x) * scale  # [B, HQ, T, Dk]
    dk = (dscores.transpose(-1, -2) @ q_a) * scale  # [B, HQ, T, Dk] per query head
    dv = probs.transpose(-1, -2) @ do_a  # [B, HQ, T, Dv]
    dk = dk.unflatten(1, (HKV, groups)).sum(2)  # [B, HKV, T, Dk]
    dv = dv.unflatten(1, (HKV, groups)).sum(2)  # [B, HKV, T, Dv]
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)
