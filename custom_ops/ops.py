"""The torch.library registrations of the selection branch.

Ops (tensors and Python scalars only, so that ``torch.compile`` and ``opcheck`` see plain ops):

- ``flexnsa::select_blocks(q, k_cmp, lse, cmp_block, cmp_stride, slc_block, num_selected,
  num_init_blocks, num_local_blocks, scale) -> int32 [B, HKV, T, n]``
- ``flexnsa::selected_attention(q, k, v, indices, slc_block, scale) -> (o, lse)``, differentiable in
  ``q, k, v`` through ``register_autograd``; ``lse`` is marked non-differentiable.
- ``flexnsa::selected_attention_backward(grad_out, q, k, v, out, lse, indices, slc_block, scale,
  deterministic, delta=None) -> (dq, dk, dv)``; ``delta`` (optional, float ``[B, HQ, T]``) is
  ``rowsum(out * grad_out)`` when the caller already has it (the gated op's combine backward
  computes it), else the op computes it
- ``flexnsa::selected_attention_gated(q, k, v, indices, o_cmp, o_win, gates, slc_block, scale) ->
  (y, o, lse)``: the selected attention ``o`` and, from the same kernels' epilogue, NSA's gated sum
  ``y = g_cmp * o_cmp + g_slc * o + g_win * o_win`` (what ``flexnsa::gated_combine`` computes, without
  its separate pass over ``o``); differentiable in ``q, k, v, o_cmp, o_win, gates`` (the backward is
  ``gated_combine_backward`` then ``selected_attention_backward``).

Each is a ``torch.library.triton_op``: ``torch.compile`` traces through its body and sees the
Triton kernels (launched with ``wrap_triton``), so there is no graph break. The body dispatches on
the device: CUDA (float16/bfloat16/float32) runs the Triton kernels; the CPU, and float64 anywhere,
run the pure-PyTorch path of :mod:`.torch_path`. With ``TRITON_INTERPRET=1`` (or
``FLEXNSA_TRITON_INTERPRET=1``, which sets it) in the environment before the import, the CPU runs the
real Triton kernels in Triton's interpreter instead: that is how the CPU tests check the kernels
(tiny shapes only; eager mode only, torch.compile and opcheck need the default CPU path).

dK/dV: the deterministic reverse-index path is the default. The atomic path is taken only when
``FLEXNSA_DKV_ATOMIC=1`` is set and ``torch.are_deterministic_algorithms_enabled()`` is False.
"""

from __future__ import annotations

import os
from typing import Optional

import torch
from torch.library import triton_op, wrap_triton

from . import torch_path
from .select_kernel import select_topn_launch
from .selected_bwd import selected_bwd_launch
from .selected_fwd import selected_fwd_launch

__all__ = ["interpret_mode", "use_triton", "dkv_atomic_allowed"]

TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def interpret_mode() -> bool:
    """True when the CPU path runs the Triton kernels in Triton's interpreter."""
    return os.environ.get("TRITON_INTERPRET") == "1" or os.environ.get("FLEXNSA_TRITON_INTERPRET") == "1"


def use_triton(x: torch.Tensor) -> bool:
    """Whether an op on ``x`` runs the Triton kernels (else the pure-PyTorch path)."""
    if x.dtype not in TRITON_DTYPES:
        return False
    return x.device.type == "cuda" or (x.device.type == "cpu" and interpret_mode())


def dkv_atomic_allowed() -> bool:
    """dK/dV with atomics only when asked for (``FLEXNSA_DKV_ATOMIC=1``) and determinism is not required."""
    return os.environ.get("FLEXNSA_DKV_ATOMIC") == "1" and not torch.are_deterministic_algorithms_enabled()


@triton_op("flexnsa::select_blocks", mutates_args=())
def _select_blocks_op(
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
    if not use_triton(q):
        return torch_path.select_blocks(
            q, k_cmp, lse, cmp_block, cmp_stride, slc_block, num_selected, num_init_blocks, num_local_blocks, scale
        )
    return select_topn_launch(
        wrap_triton,
        q.contiguous(),
        k_cmp.contiguous(),
        lse.to(torch.float32).contiguous(),
        cmp_block,
        cmp_stride,
        slc_block,
        num_selected,
        num_init_blocks,
        num_local_blocks,
        scale,
    )


@triton_op("flexnsa::selected_attention", mutates_args=())
def _selected_attention_op(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    indices: torch.Tensor,
    slc_block: int,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    if not use_triton(q):
        return torch_path.selected_attention_fwd(q, k, v, indices, slc_block, scale)
    return selected_fwd_launch(
        wrap_triton, q.contiguous(), k.contiguous(), v.contiguous(), indices.contiguous(), slc_block, scale
    )


@triton_op("flexnsa::selected_attention_backward", mutates_args=())
def _selected_attention_backward_op(
    grad_out: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    indices: torch.Tensor,
    slc_block: int,
    scale: float,
    deterministic: bool,
    delta: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    if delta is not None and (delta.shape != q.shape[:3] or not delta.is_floating_point() or delta.device != q.device):
        raise ValueError(f"delta must be a float tensor [B, HQ, T] = {tuple(q.shape[:3])} on {q.device}, "
                         f"got {tuple(delta.shape)} {delta.dtype} on {delta.device}")  # fmt: skip
    if not use_triton(q):
        return torch_path.selected_attention_bwd(grad_out, q, k, v, out, lse, indices, slc_block, scale, delta)
    return selected_bwd_launch(
        wrap_triton,
        grad_out.contiguous(),
        q.contiguous(),
        k.contiguous(),
        v.contiguous(),
        out.contiguous(),
        lse.contiguous(),
        indices.contiguous(),
        slc_block,
        scale,
        atomic=not deterministic,
        delta=None if delta is None else delta.to(torch.float32).contiguous(),
    )


def _setup_context(ctx, inputs, output):
    q, k, v, indices, slc_block, scale = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, indices, out, lse)
    ctx.slc_block = slc_block
    ctx.scale = scale
    ctx.mark_non_differentiable(lse)


def _backward(ctx, grad_out, grad_lse):
    q, k, v, indices, out, lse = ctx.saved_tensors
    if grad_out is None:
        grad_out = torch.zeros_like(out)
    dq, dk, dv = torch.ops.flexnsa.selected_attention_backward(
        grad_out, q, k, v, out, lse, indices, ctx.slc_block, ctx.scale, not dkv_atomic_allowed()
    )
    return dq, dk, dv, None, None, None


torch.library.register_autograd("flexnsa::selected_attention", _backward, setup_context=_setup_context)


@triton_op("flexnsa::selected_attention_gated", mutates_args=())
def _selected_attention_gated_op(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    indices: torch.Tensor,
    o_cmp: torch.Tensor,
    o_win: torch.Tensor,
    gates: torch.Tensor,
    slc_block: int,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    if not use_triton(q):
        from flexnsa.reference import combine_branches

        out, lse = torch_path.selected_attention_fwd(q, k, v, indices, slc_block, scale)
        return combine_branches(o_cmp, out, o_win, gates), out, lse
    combine = (o_cmp.contiguous(), o_win.contiguous(), gates.contiguous())
    return selected_fwd_launch(
        wrap_triton, q.contiguous(), k.contiguous(), v.contiguous(), indices.contiguous(), slc_block, scale, combine
    )


def _setup_context_gated(ctx, inputs, output):
    q, k, v, indices, o_cmp, o_win, gates, slc_block, scale = inputs
    _, out, lse = output
    ctx.save_for_backward(q, k, v, indices, o_cmp, o_win, gates, out, lse)
    ctx.slc_block = slc_block
    ctx.scale = scale
    ctx.mark_non_differentiable(lse)
    ctx.set_materialize_grads(False)  # an unused o arrives as None: no zeros to add


def _backward_gated(ctx, grad_y, grad_out, grad_lse):
    q, k, v, indices, o_cmp, o_win, gates, out, lse = ctx.saved_tensors
    if grad_y is None:  # only o was used downstream
        d_cmp = d_win = d_gates = delta = None
        d_slc = grad_out
    else:
        d_cmp, d_slc, d_win, d_gates, delta = torch.ops.flexnsa.gated_combine_backward(grad_y, o_cmp, out, o_win, gates)
        if grad_out is not None:  # o itself used downstream as well: delta no longer rowsum(out * d_slc)
            d_slc, delta = d_slc + grad_out, None
    if d_slc is None:  # neither output reaches the loss
        return (None,) * 9
    dq, dk, dv = torch.ops.flexnsa.selected_attention_backward(
        d_slc, q, k, v, out, lse, indices, ctx.slc_block, ctx.scale, not dkv_atomic_allowed(), delta
    )
    return dq, dk, dv, None, d_cmp, d_win, d_gates, None, None


torch.library.register_autograd(
    "flexnsa::selected_attention_gated", _backward_gated, setup_context=_setup_context_gated
)
