"""NSA decoding over an :class:`~flexnsa.cache.NSACache`: prefill, single-token and short steps.

A decode step takes the queries of the ``T_new >= 1`` tokens just appended to a layer of the cache
(positions ``p_r = L - T_new + r``, ``L`` the layer's length after the append) and computes, for
each of them, exactly the row ``p_r`` of :func:`flexnsa.reference.nsa_attention` over the whole
sequence held: causal inside the new tokens, so ``T_new`` tokens decoded at once equal ``T_new``
tokens decoded one by one.

For query position ``p`` (NSA_SPEC.md with ``t = p``):

- compressed: softmax over compressed tokens ``i`` with ``i*d + l - 1 <= p`` (``Tc(p + 1)`` of them);
- selection: block scores ``sum_{h in group} sum_i w[i, j] p_cmp[h, i]``, eligible blocks
  ``j <= p // l'``, forced/top-n/ties as in the spec, attention over ``s <= p`` in the chosen blocks;
- window: ``p - w < s <= p`` over the window branch's K/V;
- ``o = g_cmp o_cmp + g_slc o_slc + g_win o_win``.

Backends: ``"torch"`` (pure PyTorch on the full capacity of the cache with masks built from the
on-device length: fixed shapes, any device and dtype), ``"triton"`` (the split-K kernels of
:mod:`flexnsa.custom_ops.decode_ops`), and ``"auto"``: Triton on CUDA (and on the CPU under
``TRITON_INTERPRET=1``) for float16/bfloat16/float32, else torch. Neither syncs with the host.
"""

from __future__ import annotations

import os

import torch

from . import reference
from ._checks import _check_tensor, _expect_shape, check_config, check_scale
from .cache import CompressFn, NSACache
from .config import NSAConfig
from .functional import nsa_attention
from .reference import _default_scale

__all__ = [
    "nsa_prefill",
    "nsa_decode",
    "nsa_decode_step",
    "decode_select_blocks",
    "DECODE_BACKENDS",
]

DECODE_BACKENDS = ("auto", "torch", "triton")
_TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


# ---- validation and dispatch ----------------------------------------------------------------
def _check_step_inputs(q, cache, layer_idx, gates, config, scale, need_gates=True) -> NSAConfig:
    if not isinstance(cache, NSACache):
        raise ValueError(f"cache must be a flexnsa.NSACache, got {type(cache).__name__}")
    cache._check_layer(layer_idx)
    config = cache.config if config is None else check_config(config)
    if config != cache.config:
        raise ValueError(f"config {config} differs from the cache's config {cache.config}")
    check_scale(scale)
    _check_tensor("q", q)
    B, HQ, T_new, Dk = q.shape
    HKV = cache.num_kv_heads
    if B != cache.batch_size:
        raise ValueError(f"q must have the cache's batch size {cache.batch_size}, got shape {tuple(q.shape)}")
    if HQ < 1 or HQ % HKV:
        raise ValueError(f"q has {HQ} heads, which must be a multiple of the cache's {HKV} KV heads")
    if T_new < 1 or T_new > cache.max_len:
        raise ValueError(f"q must hold 1 .. {cache.max_len} new tokens, got shape {tuple(q.shape)}")
    if Dk != cache.qk_dim:
        raise ValueError(f"q must have the cache's head dim Dk={cache.qk_dim}, got shape {tuple(q.shape)}")
    if q.dtype != cache.dtype:
        raise ValueError(f"q must have the cache's dtype {cache.dtype}, got {q.dtype}")
    if q.device != cache.device:
        raise ValueError(f"q must be on the cache's device {cache.device}, got {q.device}")
    if need_gates or gates is not None:
        _check_tensor("gates", gates)
        _expect_shape("gates", gates, (B, HQ, T_new, 3), "[B, HQ, T_new, 3]")
        if gates.device != q.device:
            raise ValueError(f"gates must be on q's device {q.device}, got {gates.device}")
    return config


def _resolve_backend(backend: str, dtype: torch.dtype, device: torch.device) -> str:
    if backend not in DECODE_BACKENDS:
        raise ValueError(f"backend must be one of {DECODE_BACKENDS}, got {backend!r}")
    if backend == "triton" and dtype not in _TRITON_DTYPES:
        raise ValueError(f"backend='triton' needs float16, bfloat16 or float32 inputs, got {dtype}")
    if backend != "auto":
        return backend
    triton_ok = device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"
    return "triton" if triton_ok and dtype in _TRITON_DTYPES else "torch"


# ---- the pure-PyTorch path ------------------------------------------------------------------
def _query_positions(cache: NSACache, layer_idx: int, num_new: int) -> torch.Tensor:
    """int64 ``[T_new]``: ``L - T_new + r``, read from the device length (no sync)."""
    return cache.lengths[layer_idx] - num_new + torch.arange(num_new, device=cache.device)


def torch_decode_step(q, cache, layer_idx, gates, scale, block_indices=None, upcast=True):
    """Pure-PyTorch decode step (inputs assumed valid). Returns ``(o, block_indices)``.

    ``block_indices`` (``[B, HKV, T_new, n]``) overrides the top-n; ``upcast=False`` keeps the
    matrix products in the input dtype (the low-precision reference of the tolerance criterion).
    """
    cfg, layer = cache.config, cache.layers[layer_idx]
    pos = _query_positions(cache, layer_idx, q.shape[2])  # [T_new]
    # the reference at the new tokens' positions, over the whole capacity (unwritten rows are invisible)
    o_cmp, lse = reference.compressed_attention(q, layer.k_cmp, layer.v_cmp, cfg, scale, upcast, positions=pos)
    if block_indices is None:
        scores = reference.block_scores(
            q, layer.k_cmp, cfg, scale, lse=lse, positions=pos, num_blocks=cfg.num_blocks(cache.max_len)
        )  # [B, HKV, T_new, NB_max]
        block_indices = reference.select_from_scores(scores, cfg, positions=pos)
    o_slc, _ = reference.selected_attention(q, layer.k, layer.v, block_indices, cfg, scale, upcast, positions=pos)
    o_win, _ = reference.sliding_window_attention(
        q, layer.k_win, layer.v_win, cfg.window, scale, upcast, positions=pos
    )
    return reference.combine_branches(o_cmp, o_slc, o_win, gates), block_indices


# ---- public API -----------------------------------------------------------------------------
def nsa_decode_step(
    q: torch.Tensor,
    cache: NSACache,
    layer_idx: int,
    gates: torch.Tensor,
    config: NSAConfig | None = None,
    scale: float | None = None,
    *,
    backend: str = "auto",
) -> torch.Tensor:
    """NSA output of the ``T_new`` newest tokens of layer ``layer_idx``, after their K/V were appended.

    Args:
        q: ``[B, HQ, T_new, Dk]`` queries of the tokens at positions ``L - T_new .. L - 1``
            (``L = cache.lengths[layer_idx]``); ``HQ`` a multiple of the cache's ``HKV``.
        cache: holds the layer's raw, window and compressed K/V (see :class:`NSACache`).
        gates: ``[B, HQ, T_new, 3]`` (cmp, slc, win) in [0, 1].
        config: must equal ``cache.config`` (None: the cache's).
        scale: ``1 / sqrt(Dk)`` when None.
        backend: ``"auto"``, ``"torch"`` or ``"triton"``.

    Returns:
        ``[B, HQ, T_new, Dv]`` in ``q.dtype``: row ``r`` equals row ``L - T_new + r`` of
        :func:`flexnsa.nsa_attention` over the ``L`` tokens held.
    """
    _check_step_inputs(q, cache, layer_idx, gates, config, scale)
    scale = _default_scale(scale, q.shape[-1])
    if _resolve_backend(backend, q.dtype, q.device) == "triton":
        from .custom_ops import decode_ops

        return decode_ops.decode_attention(q, cache, layer_idx, gates, scale)[0]
    return torch_decode_step(q, cache, layer_idx, gates, scale)[0]


def decode_select_blocks(
    q: torch.Tensor,
    cache: NSACache,
    layer_idx: int,
    config: NSAConfig | None = None,
    scale: float | None = None,
    *,
    backend: str = "auto",
) -> torch.Tensor:
    """Selected blocks ``int32 [B, HKV, T_new, n]`` of the newest ``T_new`` tokens (unused ``-1``;
    slot order unspecified): the rows ``L - T_new ..`` of :func:`flexnsa.select_blocks`."""
    _check_step_inputs(q, cache, layer_idx, None, config, scale, need_gates=False)
    scale = _default_scale(scale, q.shape[-1])
    if _resolve_backend(backend, q.dtype, q.device) == "triton":
        from .custom_ops import decode_ops

        return decode_ops.decode_attention(q, cache, layer_idx, q.new_zeros(*q.shape[:3], 3), scale)[1]
    return torch_decode_step(q, cache, layer_idx, q.new_zeros(*q.shape[:3], 3), scale)[1]


def nsa_decode(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    gates: torch.Tensor,
    cache: NSACache,
    layer_idx: int,
    compress: CompressFn,
    *,
    k_win: torch.Tensor | None = None,
    v_win: torch.Tensor | None = None,
    k_cmp_raw: torch.Tensor | None = None,
    v_cmp_raw: torch.Tensor | None = None,
    config: NSAConfig | None = None,
    scale: float | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """One decode step of a layer: :meth:`NSACache.append` of the new ``k, v`` (``[B, HKV, T_new, D]``;
    window K/V and phi's raw input where the cache keeps them separately; compressed tokens through
    ``compress``, see :data:`flexnsa.cache.CompressFn`) then :func:`nsa_decode_step`.
    Returns ``[B, HQ, T_new, Dv]``. Host-sync free and of fixed shapes: capturable in a CUDA graph."""
    cache.append(layer_idx, k, v, compress, k_win=k_win, v_win=v_win, k_cmp_raw=k_cmp_raw, v_cmp_raw=v_cmp_raw)
    return nsa_decode_step(q, cache, layer_idx, gates, config, scale, backend=backend)


def nsa_prefill(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    k_cmp: torch.Tensor,
    v_cmp: torch.Tensor,
    gates: torch.Tensor,
    cache: NSACache,
    layer_idx: int,
    *,
    k_win: torch.Tensor | None = None,
    v_win: torch.Tensor | None = None,
    k_cmp_raw: torch.Tensor | None = None,
    v_cmp_raw: torch.Tensor | None = None,
    config: NSAConfig | None = None,
    scale: float | None = None,
) -> torch.Tensor:
    """Full-sequence NSA over a prompt (:func:`flexnsa.nsa_attention`, fastest backend) that also
    fills layer ``layer_idx`` of the cache with its ``k, v``, window K/V, compressed tokens and
    (``separate_cmp_raw`` caches) phi's raw input (:meth:`NSACache.prefill`). Returns ``[B, HQ, T, Dv]``."""
    config = cache.config if config is None else config
    if config != cache.config:
        raise ValueError(f"config {config} differs from the cache's config {cache.config}")
    o = nsa_attention(q, k, v, k_cmp, v_cmp, gates, config, k_win=k_win, v_win=v_win, scale=scale)
    cache.prefill(layer_idx, k, v, k_cmp, v_cmp, k_win=k_win, v_win=v_win, k_cmp_raw=k_cmp_raw, v_cmp_raw=v_cmp_raw)
    return o
