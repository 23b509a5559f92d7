"""The public functional API of NSA_SPEC.md: ``nsa_attention`` and ``select_blocks``.

Both validate their inputs (``ValueError`` naming the argument) and dispatch to a backend:

- ``"reference"``: the pure-PyTorch definition in :mod:`flexnsa.reference` (any device, any float
  dtype, differentiable; O(T^2) memory per head).
- ``"flex"``: the compressed and window branches on FlexAttention (:mod:`flexnsa.flex_branches`),
  the top-n selection and the selected attention as ``flexnsa::`` Triton ops
  (:mod:`flexnsa.custom_ops`). On CUDA everything runs compiled, forward and backward. On the CPU
  each piece takes its own CPU path (the compressed branch the reference, since compiled CPU
  FlexAttention returns no log-sum-exp; the ops their pure-PyTorch bodies).
- ``"auto"``: ``"flex"`` for float16/bfloat16/float32 CUDA tensors with head dims >= 16 and no user
  ``mask_mod``, else ``"reference"`` (on the CPU
  the reference is the training path, and faster than the pieces above at the lengths a CPU runs).
"""

from __future__ import annotations

import torch

from . import reference
from ._checks import check_block_indices, check_config, check_nsa_inputs, check_qk, check_scale
from .config import NSAConfig

__all__ = ["nsa_attention", "select_blocks", "BACKENDS"]

BACKENDS = ("auto", "reference", "flex")


# FlexAttention's CUDA kernels need head dims of at least 16 (inductor: "embedding dimension of the
# query, key, and value must be at least 16", seen on the H200 with torch 2.11).
MIN_FLEX_HEAD_DIM = 16


def _resolve_backend(backend: str, q: torch.Tensor, mask_mod=None, v_dim: int | None = None) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    small_dims = min(q.shape[-1], q.shape[-1] if v_dim is None else v_dim) < MIN_FLEX_HEAD_DIM
    if backend == "flex" and q.device.type == "cuda" and small_dims:
        raise ValueError(f"backend='flex' on CUDA needs head dims >= {MIN_FLEX_HEAD_DIM} (FlexAttention), got "
                         f"Dk={q.shape[-1]}, Dv={v_dim}")
    if mask_mod is not None and not callable(mask_mod):
        raise ValueError(f"mask_mod must be a callable (b, h, q_idx, kv_idx) -> bool tensor, got {mask_mod!r}")
    if mask_mod is not None and backend == "flex":
        raise ValueError("mask_mod is supported by backend='reference' (or 'auto') only: the Triton selection "
                         "kernels do not take a user pattern yet")
    if backend == "auto":
        fast = q.device.type == "cuda" and q.dtype != torch.float64 and mask_mod is None and not small_dims
        return "flex" if fast else "reference"
    return backend


def _nsa_flex(q, k, v, k_cmp, v_cmp, gates, config, k_win, v_win, scale, block_indices):
    from . import custom_ops
    from .flex_branches import compressed_attention, sliding_window_attention

    o_cmp, lse_cmp = compressed_attention(q, k_cmp, v_cmp, config, scale, return_lse=True)  # [B, HQ, T, Dv], [B, HQ, T]
    if block_indices is None:
        block_indices = custom_ops.select_blocks(q, k_cmp, lse_cmp.detach(), config, scale)  # [B, HKV, T, n]
    o_win = sliding_window_attention(q, k if k_win is None else k_win, v if v_win is None else v_win, config.window, scale)
    # the selected branch last: its kernels also write the gated sum of the three branches
    out, _, _ = custom_ops.selected_attention_gated(q, k, v, block_indices, o_cmp, o_win, gates, config, scale)
    return out  # [B, HQ, T, Dv]


def nsa_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    k_cmp: torch.Tensor,
    v_cmp: torch.Tensor,
    gates: torch.Tensor,
    config: NSAConfig | None = None,
    *,
    k_win: torch.Tensor | None = None,
    v_win: torch.Tensor | None = None,
    scale: float | None = None,
    block_indices: torch.Tensor | None = None,
    mask_mod=None,
    backend: str = "auto",
) -> torch.Tensor:
    """Native Sparse Attention: ``o = g_cmp * o_cmp + g_slc * o_slc + g_win * o_win``.

    Args:
        q: ``[B, HQ, T, Dk]`` queries.
        k, v: ``[B, HKV, T, Dk]``, ``[B, HKV, T, Dv]``: keys and values of the selection branch
            (and of the window branch unless ``k_win``/``v_win`` are given). ``HKV`` divides ``HQ``.
        k_cmp, v_cmp: ``[B, HKV, Tc, Dk]``, ``[B, HKV, Tc, Dv]`` compressed keys and values,
            ``Tc = config.num_cmp_tokens(T)``; token ``i`` summarises raw tokens ``[i*d, i*d + l)``.
        gates: ``[B, HQ, T, 3]`` branch gates in [0, 1], order (cmp, slc, win); any float dtype.
        config: :class:`NSAConfig`; the paper's defaults when None.
        k_win, v_win: optional window-branch keys/values shaped like ``k``, ``v``.
        scale: softmax scale, ``1 / sqrt(Dk)`` when None; shared by the three branches.
        block_indices: optional ``int [B, HKV, T, n]`` selection overriding the top-n (``-1`` marks
            an unused slot); by default blocks are chosen from the compressed branch's scores.
        backend: ``"auto"``, ``"reference"`` or ``"flex"`` (module docstring).

    Returns:
        ``[B, HQ, T, Dv]`` in ``q.dtype``.
    """
    config = check_config(config)
    check_scale(scale)
    dims = check_nsa_inputs(q, k, v, k_cmp, v_cmp, gates, config, k_win, v_win)
    if block_indices is not None:
        check_block_indices(block_indices, dims, config)
    if _resolve_backend(backend, q, mask_mod, dims.v_dim) == "flex":
        return _nsa_flex(q, k, v, k_cmp, v_cmp, gates, config, k_win, v_win, scale, block_indices)
    return reference.nsa_attention(
        q, k, v, k_cmp, v_cmp, gates, config, k_win, v_win, scale, block_indices=block_indices, mask_mod=mask_mod
    )


def select_blocks(
    q: torch.Tensor,
    k_cmp: torch.Tensor,
    config: NSAConfig | None = None,
    *,
    scale: float | None = None,
    mask_mod=None,
    backend: str = "auto",
) -> torch.Tensor:
    """The blocks each query's KV group attends in the selection branch.

    Args:
        q: ``[B, HQ, T, Dk]``; k_cmp: ``[B, HKV, Tc, Dk]`` with ``Tc = config.num_cmp_tokens(T)``.
    Returns:
        ``int32 [B, HKV, T, n]`` block ids (block ``j`` holds tokens ``[j*l', (j+1)*l')``), unused
        slots ``-1``. Slot order is unspecified; no gradient flows through the selection.
    """
    config = check_config(config)
    check_scale(scale)
    check_qk(q, k_cmp, config)
    if _resolve_backend(backend, q, mask_mod) == "flex":
        from . import custom_ops
        from .flex_branches import compressed_attention

        # only the log-sum-exp is needed; k_cmp stands in for the values
        _, lse = compressed_attention(q.detach(), k_cmp.detach(), k_cmp.detach(), config, scale, return_lse=True)
        return custom_ops.select_blocks(q, k_cmp, lse, config, scale)
    return reference.select_blocks(q, k_cmp, config, scale, mask_mod=mask_mod)
