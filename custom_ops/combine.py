"""The gated sum of NSA's three branches as one fused Triton pass each way (op ``flexnsa::gated_combine``).

Forward, per row ``r`` of ``[B * HQ * T]`` (gates ``g [r, 3]`` in the order cmp, slc, win)::

    o[r, :] = g[r, 0] * o_cmp[r, :] + g[r, 1] * o_slc[r, :] + g[r, 2] * o_win[r, :]      (float32 math)

Backward, given ``do``::

    d o_cmp[r, :] = g[r, 0] * do[r, :]   (likewise slc, win)
    d g[r, k]     = sum_d do[r, d] * o_k[r, d]
    delta_slc[r]  = g[r, 1] * d g[r, 1]  (float32: rowsum(o_slc * d o_slc), what the selected branch's
                                          backward needs, so that it skips its own pass over o_slc)

Eager PyTorch makes float32 copies of the three ``[B, HQ, T, Dv]`` branch outputs (measured on the
H200 at 64k on the paper shape: the gated sum was most of a 12.6 ms gap in the forward); fused, the
forward reads 3 outputs and writes 1, the backward reads 4 and writes 3 (+ the gates).
CUDA float16/bfloat16/float32 run the kernels; the CPU and float64 run PyTorch, or the kernels in
Triton's interpreter under ``FLEXNSA_TRITON_INTERPRET=1`` / ``TRITON_INTERPRET=1``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

from .kernel_utils import static_sizes

__all__ = ["gated_combine"]


@triton.jit
def _combine_fwd_kernel(
    o_cmp_ptr, o_slc_ptr, o_win_ptr, gates_ptr, out_ptr,  # [N, D] x 3, [N, 3], [N, D]
    N, D: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)  # [BLOCK_R]
    cols = tl.arange(0, BLOCK_D)  # [BLOCK_D]
    row_ok = rows < N
    mask = row_ok[:, None] & (cols[None, :] < D)
    offs = rows[:, None] * D + cols[None, :]  # [BLOCK_R, BLOCK_D], int64
    g0 = tl.load(gates_ptr + rows * 3 + 0, mask=row_ok, other=0.0).to(tl.float32)
    g1 = tl.load(gates_ptr + rows * 3 + 1, mask=row_ok, other=0.0).to(tl.float32)
    g2 = tl.load(gates_ptr + rows * 3 + 2, mask=row_ok, other=0.0).to(tl.float32)
    acc = g0[:, None] * tl.load(o_cmp_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    acc += g1[:, None] * tl.load(o_slc_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    acc += g2[:, None] * tl.load(o_win_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + offs, acc.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _combine_bwd_kernel(
    do_ptr, o_cmp_ptr, o_slc_ptr, o_win_ptr, gates_ptr,  # [N, D], [N, D] x 3, [N, 3]
    d_cmp_ptr, d_slc_ptr, d_win_ptr, d_gates_ptr, delta_slc_ptr,  # [N, D] x 3, [N, 3], [N] float32
    N, D: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)  # [BLOCK_R]
    cols = tl.arange(0, BLOCK_D)  # [BLOCK_D]
    row_ok = rows < N
    mask = row_ok[:, None] & (cols[None, :] < D)
    offs = rows[:, None] * D + cols[None, :]  # [BLOCK_R, BLOCK_D], int64
    do = tl.load(do_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    _combine_bwd_branch(do, o_cmp_ptr, d_cmp_ptr, gates_ptr, d_gates_ptr, rows, offs, row_ok, mask, 0)
    g_slc, dg_slc = _combine_bwd_branch(do, o_slc_ptr, d_slc_ptr, gates_ptr, d_gates_ptr, rows, offs, row_ok, mask, 1)
    _combine_bwd_branch(do, o_win_ptr, d_win_ptr, gates_ptr, d_gates_ptr, rows, offs, row_ok, mask, 2)
    tl.store(delta_slc_ptr + rows, g_slc * dg_slc, mask=row_ok)


@triton.jit
def _combine_bwd_branch(do, o_ptr, d_ptr, gates_ptr, d_gates_ptr, rows, offs, row_ok, mask, k: tl.constexpr):
    """Branch k: ``d o_k = g_k * do`` and ``d g_k = rowsum(do * o_k)``; returns ``(g_k, d g_k)`` in
    float32 (``[BLOCK_R]`` each)."""
    g = tl.load(gates_ptr + rows * 3 + k, mask=row_ok, other=0.0).to(tl.float32)  # [BLOCK_R]
    tl.store(d_ptr + offs, (g[:, None] * do).to(d_ptr.dtype.element_ty), mask=mask)
    o = tl.load(o_ptr + offs, mask=mask, other=0.0).to(tl.float32)  # [BLOCK_R, BLOCK_D]
    dg = tl.sum(do * o, axis=1)  # [BLOCK_R]
    tl.store(d_gates_ptr + rows * 3 + k, dg.to(d_gates_ptr.dtype.element_ty), mask=row_ok)
    return g, dg


def _tiles(D: int) -> tuple[int, int]:
    block_d = max(16, triton.next_power_of_2(D))
    return max(1, 4096 // block_d), block_d  # about 4096 elements of each tensor per program


def _use_triton(x: torch.Tensor) -> bool:
    from .ops import use_triton  # one rule for every flexnsa op

    return use_triton(x)


def _torch_forward(o_cmp, o_slc, o_win, gates):
    from flexnsa.reference import combine_branches

    return combine_branches(o_cmp, o_slc, o_win, gates)


def _torch_backward(grad_out, o_cmp, o_slc, o_win, gates):
    acc = torch.float64 if o_cmp.dtype == torch.float64 else torch.float32
    do, g = grad_out.to(acc), gates.to(acc)
    branches = (o_cmp, o_slc, o_win)
    d_branches = [(g[..., k : k + 1] * do).to(o.dtype) for k, o in enumerate(branches)]
    dg = torch.stack([(do * o.to(acc)).sum(-1) for o in branches], dim=-1)  # [B, HQ, T, 3]
    delta_slc = g[..., 1] * dg[..., 1]  # [B, HQ, T], in acc
    return (*d_branches, dg.to(gates.dtype), delta_slc)


@triton_op("flexnsa::gated_combine", mutates_args=())
def _gated_combine_op(o_cmp: torch.Tensor, o_slc: torch.Tensor, o_win: torch.Tensor, gates: torch.Tensor) -> torch.Tensor:
    if not _use_triton(o_cmp):
        return _torch_forward(o_cmp, o_slc, o_win, gates)
    (D,) = static_sizes(o_cmp.shape[-1])  # a constexpr's source
    N = o_cmp.numel() // D
    out = torch.empty_like(o_cmp, memory_format=torch.contiguous_format)  # [B, HQ, T, Dv]
    block_r, block_d = _tiles(D)
    wrap_triton(_combine_fwd_kernel)[(triton.cdiv(N, block_r),)](
        o_cmp.contiguous(), o_slc.contiguous(), o_win.contiguous(), gates.contiguous(), out,
        N, D, BLOCK_R=block_r, BLOCK_D=block_d, num_warps=4,
    )
    return out


@triton_op("flexnsa::gated_combine_backward", mutates_args=())
def _gated_combine_backward_op(
    grad_out: torch.Tensor, o_cmp: torch.Tensor, o_slc: torch.Tensor, o_win: torch.Tensor, gates: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(d o_cmp, d o_slc, d o_win, d gates, delta_slc)``; ``delta_slc [B, HQ, T]`` is float32
    (float64 for float64 inputs): ``g_slc * d g_slc = rowsum(o_slc * d o_slc)`` before rounding."""
    if not _use_triton(o_cmp):
        return _torch_backward(grad_out, o_cmp, o_slc, o_win, gates)
    (D,) = static_sizes(o_cmp.shape[-1])  # a constexpr's source
    N = o_cmp.numel() // D
    d_cmp, d_slc, d_win = (torch.empty_like(o, memory_format=torch.contiguous_format) for o in (o_cmp, o_slc, o_win))
    d_gates = torch.empty_like(gates, memory_format=torch.contiguous_format)  # [B, HQ, T, 3]
    delta_slc = torch.empty(gates.shape[:-1], dtype=torch.float32, device=gates.device)  # [B, HQ, T]
    block_r, block_d = _tiles(D)
    wrap_triton(_combine_bwd_kernel)[(triton.cdiv(N, block_r),)](
        grad_out.contiguous(), o_cmp.contiguous(), o_slc.contiguous(), o_win.contiguous(), gates.contiguous(),
        d_cmp, d_slc, d_win, d_gates, delta_slc,
        N, D, BLOCK_R=block_r, BLOCK_D=block_d, num_warps=4,
    )
    return d_cmp, d_slc, d_win, d_gates, delta_slc


def _setup_context(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _backward(ctx, grad_out):
    return tuple(torch.ops.flexnsa.gated_combine_backward(grad_out, *ctx.saved_tensors)[:4])


torch.library.register_autograd("flexnsa::gated_combine", _backward, setup_context=_setup_context)


def gated_combine(o_cmp: torch.Tensor, o_slc: torch.Tensor, o_win: torch.Tensor, gates: torch.Tensor) -> torch.Tensor:
    """``o = g_cmp * o_cmp + g_slc * o_slc + g_win * o_win`` in float32, cast to ``o_cmp.dtype``.

    Args:
        o_cmp, o_slc, o_win: ``[B, HQ, T, Dv]`` branch outputs of one dtype and device.
        gates: ``[B, HQ, T, 3]`` (cmp, slc, win), any float dtype.
    Returns:
        ``[B, HQ, T, Dv]``; differentiable in all four inputs (the same function as
        :func:`flexnsa.reference.combine_branches`).
    """
    check_combine_inputs(o_cmp, (("o_slc", o_slc), ("o_win", o_win)), gates)
    return torch.ops.flexnsa.gated_combine(o_cmp, o_slc, o_win, gates)


def check_combine_inputs(o_cmp: torch.Tensor, others, gates: torch.Tensor) -> None:
    """ValueError naming the argument unless every ``(name, x)`` of ``others`` has ``o_cmp``'s shape,
    dtype and device and ``gates`` is a float tensor ``[*o_cmp.shape[:-1], 3]`` on its device."""
    for name, x in others:
        if not isinstance(x, torch.Tensor) or x.shape != o_cmp.shape or x.dtype != o_cmp.dtype or x.device != o_cmp.device:
            got = (tuple(x.shape), x.dtype, x.device) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"{name} must match o_cmp ({tuple(o_cmp.shape)}, {o_cmp.dtype}, {o_cmp.device}), got {got}")
    if (not isinstance(gates, torch.Tensor) or gates.shape != (*o_cmp.shape[:-1], 3) or not gates.is_floating_point()
            or gates.device != o_cmp.device):  # fmt: skip
        got = f"{tuple(gates.shape)} {gates.dtype} on {gates.device}" if isinstance(gates, torch.Tensor) else type(gates).__name__
        raise ValueError(f"gates must be a float tensor [B, HQ, T, 3] on {o_cmp.device}, got {got}")
