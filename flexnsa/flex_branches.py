"""NSA branches 1 (compressed) and 3 (sliding window) on FlexAttention.

Both are block-sparse FlexAttention patterns from :mod:`flexnsa.masks`, with GQA through
``enable_gqa`` (query head ``h`` reads KV head ``h // G``). Block masks are built in closed form
once per (sequence lengths, config, device) and cached; the kernel is one compiled
``flex_attention``. Which path runs (FlexAttention compiled / eager, or the float64-capable
reference for CPU training) is chosen automatically: see :mod:`flexnsa.flex_runtime`.

Compressed-branch backward on CUDA: FlexAttention's dK/dV pass runs one program per key block,
each looping over every query. With ``Tc ~ T/16`` keys that is too few programs to fill the GPU,
so when gradients are needed the queries are split into ``C`` chunks folded into the head
dimension (``[B, H, T, D] -> [B, H*C, T/C, D]``, a view: head ``h*C + c`` is chunk ``c`` of head
``h``; the mask recovers the raw position ``t = (h mod C) * T/C + q_idx``) and every virtual head gets
its own K/V, so that each chunk has its own dK/dV programs: the KV heads are folded into the batch
(entry ``b * HKV + g`` holds the ``G * C`` virtual heads of KV head ``g``, still a view of q) and K/V
expanded over those heads with stride 0, no copy (their gradients sum back through the expand).
Every chunk attends the same keys, so the result is exactly that of the unchunked computation; see
:func:`default_num_chunks`.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from . import reference
from ._checks import _check_tensor, _expect_shape, check_config, check_qk, check_scale
from .config import NSAConfig
from .flex_runtime import cached_block_mask, call_flex, choose_path, needs_grad, takes_forward_options
from .masks.compressed_causal import compressed_causal
from .masks.pattern import DEFAULT_BLOCK_SIZE, block_mask_from_tables, evaluate_mask_mod, named
from .masks.sliding_window import sliding_window

__all__ = ["sliding_window_attention", "compressed_attention", "default_num_chunks"]

_Q_BLOCK = DEFAULT_BLOCK_SIZE  # query rows per BlockMask tile; chunk lengths are multiples of it
# Forward FlexAttention tiles (16-bit, head dims <= 128; flex_runtime.call_flex: with the fwd_ prefix when
# autograd records the call, so the backward keeps inductor's tiles), measured without gradients on the
# H200 (torch 2.11, paper shape, perf/results/h200/sweep-3.md): window 64x64 tiles, 4 warps, 3 stages:
# 4.34 -> 4.12 ms at 64k, 0.527 -> 0.480 ms at 8k; compressed with TMA loads and 128x128 tiles on
# 8 warps: 12.05 -> 11.45 ms at 64k (Tc = 4095) but 0.378 -> 0.433 ms at 8k (Tc = 511), hence a
# threshold on Tc (2048: between the two measured points). Training forward with the fwd_ prefix
# (perf/results/h200/sweep-4.md): compressed 12.27 -> 11.75 ms, window 4.29 -> 4.18 ms at 64k.
_WINDOW_FWD_OPTIONS = {"BLOCK_M": 64, "BLOCK_N": 64, "num_warps": 4, "num_stages": 3}
_COMPRESSED_FWD_OPTIONS = {"USE_TMA": True, "BLOCK_M": 128, "BLOCK_N": 128, "num_warps": 8, "num_stages": 2}
_COMPRESSED_TMA_MIN_KEYS = 2048
# Rows (queries and keys) per tile of the window's BlockMask where the forward-only tiles apply. A tile of
# 64 queries sees 512 + 63 keys: 9 tiles of 64, 89% of their pairs in the window, against 80% for 128-row
# tiles. H200, paper shape, no gradients (perf/results/h200/sweep-10.md, two processes): 4.231 -> 3.807 and
# 4.388 -> 4.173 ms at 64k, 0.482 -> 0.440 and 0.498 -> 0.444 ms at 8k. Calls that record autograd keep
# 128: inductor's backward (torch 2.11, sm90, head dim <= 128) only has 64x128 / 128x64 tiles, and it
# drops a configuration that does not divide the BlockMask's tiles before applying kernel options, so a
# 64-row BlockMask leaves it no kernel at all.
_WINDOW_FWD_BLOCK = 64
_WINDOW_BLOCK: int | None = None  # benchmarks only (perf/gpu_sweep.py): force the window's BlockMask tiles
_TARGET_KV_PROGRAMS = 1024  # dK/dV programs wanted in the compressed backward (H200: 132 SMs)
_MIN_CHUNK = 1024  # shortest query chunk worth a batch entry
_MAX_CHUNKS = 64


# ---- validation ----------------------------------------------------------------------------
def _check_mask_mod(mask_mod) -> None:
    if mask_mod is not None and not callable(mask_mod):
        raise ValueError(
            f"mask_mod must be None or a callable (b, h, q_idx, kv_idx) -> bool, got {type(mask_mod).__name__}"
        )


def _check_same(name: str, x: torch.Tensor, q: torch.Tensor) -> None:
    if x.dtype != q.dtype:
        raise ValueError(f"{name} must have q's dtype {q.dtype}, got {x.dtype}")
    if x.device != q.device:
        raise ValueError(f"{name} must be on q's device {q.device}, got {x.device}")


def _check_window_inputs(q, k, v, window) -> None:
    for name, x in (("q", q), ("k", k), ("v", v)):
        _check_tensor(name, x)
    B, HQ, T, Dk = q.shape
    if T < 1 or B < 1 or HQ < 1 or Dk < 1:
        raise ValueError(f"q must have non-empty batch, head, token and head-dim sizes, got {tuple(q.shape)}")
    HKV, Dv = k.shape[1], v.shape[-1]
    if HKV < 1 or HQ % HKV:
        raise ValueError(
            f"k has {HKV} heads, which must divide the {HQ} query heads of q (GQA: HQ = G * HKV)"
        )
    if Dv < 1:
        raise ValueError(f"v must have a non-empty head dim, got shape {tuple(v.shape)}")
    _expect_shape("k", k, (B, HKV, T, Dk), "[B, HKV, T, Dk]")
    _expect_shape("v", v, (B, HKV, T, Dv), "[B, HKV, T, Dv]")
    _check_same("k", k, q)
    _check_same("v", v, q)
    if isinstance(window, bool) or not isinstance(window, int) or window < 0:
        raise ValueError(f"window must be an int >= 0, got {window!r}")


def _check_compressed_inputs(q, k_cmp, v_cmp, config: NSAConfig):
    dims = check_qk(q, k_cmp, config)
    _check_tensor("v_cmp", v_cmp)
    Dv = v_cmp.shape[-1]
    if Dv < 1:
        raise ValueError(f"v_cmp must have a non-empty head dim, got shape {tuple(v_cmp.shape)}")
    _expect_shape("v_cmp", v_cmp, (dims.batch, dims.kv_heads, dims.num_cmp, Dv), "[B, HKV, Tc(T), Dv]")
    _check_same("v_cmp", v_cmp, q)
    return dims


def _zeros_in_graph(shape, *inputs: torch.Tensor) -> torch.Tensor:
    """Zeros of ``shape`` that autograd sees as a function of ``inputs`` (exact zero gradients), so that
    ``torch.autograd.grad`` over an empty branch gives zeros instead of "not used in the graph". The
    link is a sum over empty slices: exactly 0, whatever the inputs hold."""
    link = sum(x.flatten()[:0].sum() for x in inputs)
    return inputs[0].new_zeros(shape) + link.to(inputs[0].dtype)


def _default_scale(scale, head_dim: int) -> float:
    return 1.0 / math.sqrt(head_dim) if scale is None else float(scale)


def _device_key(device: torch.device) -> str:
    return str(device)


# ---- branch 3: sliding window ------------------------------------------------------------
def window_tile(q: torch.Tensor, v: torch.Tensor, grad: bool) -> int:
    """Rows per tile of the window's BlockMask: ``_WINDOW_FWD_BLOCK`` (64) for a CUDA call without
    gradients that takes the window's forward tiles (16-bit, head dims <= 128: 64 x 64 kernel tiles,
    which divide it), else the default 128 (see ``_WINDOW_FWD_BLOCK``)."""
    if _WINDOW_BLOCK is not None:
        return _WINDOW_BLOCK
    return _WINDOW_FWD_BLOCK if takes_forward_options(q, v) and not grad else _Q_BLOCK


def _window_block_mask(seq_len: int, window: int, device: torch.device, user_mask_mod, block: int = _Q_BLOCK):
    """Closed-form window BlockMask ``[1, 1, T, T]`` of ``block x block`` tiles; with a user mask_mod
    every tile the window meets is partial (the user pattern is unknown in block form) and the two
    mask_mods are ANDed."""
    pattern = sliding_window(window)

    def build():
        any_blocks, full_blocks = pattern.block_tables(seq_len, seq_len, block, device)
        mask_mod = pattern.mask_mod
        if user_mask_mod is not None:
            full_blocks = torch.zeros_like(full_blocks)
            window_mod = pattern.mask_mod

            def window_and_user(b, h, q_idx, kv_idx):
                return window_mod(b, h, q_idx, kv_idx) & user_mask_mod(b, h, q_idx, kv_idx)

            mask_mod = named(f"{window_mod.__name__} & user", window_and_user)
        return block_mask_from_tables(any_blocks, full_blocks, mask_mod, seq_len, seq_len, block)

    key = ("window", seq_len, window, block, _device_key(device))
    return cached_block_mask(key, build, user_mask_mod)


def sliding_window_attention(q, k, v, window, scale=None, *, mask_mod=None, _path=None):
    """NSA branch 3: ``o[t] = softmax_s(scale * q_t . k_s) v_s`` over raw tokens ``t - w < s <= t``.

    Args:
        q: ``[B, HQ, T, Dk]``; k: ``[B, HKV, T, Dk]``; v: ``[B, HKV, T, Dv]``; ``HKV`` divides ``HQ``.
        window: ``w`` (int >= 0), the query itself included; 0 gives zeros.
        scale: softmax scale, ``1 / sqrt(Dk)`` when None.
        mask_mod: optional extra pattern ``(b, h, q_idx, kv_idx) -> bool`` in raw token positions
            (``h`` is the query head), ANDed with the window. Its BlockMask is cached per mask_mod
            object: build the mask_mod once and reuse it (a new function object per call rebuilds
            the mask and recompiles the kernel).
        _path: private override of the path (``"reference"``, ``"flex_eager"``, ``"flex_compiled"``).

    Returns:
        ``o [B, HQ, T, Dv]`` in ``q.dtype``. Rows with no visible key are 0.
    """
    _check_window_inputs(q, k, v, window)
    check_scale(scale)
    _check_mask_mod(mask_mod)
    B, HQ, T, Dk = q.shape
    Dv = v.shape[-1]
    scale = _default_scale(scale, Dk)
    if window == 0:
        return _zeros_in_graph((B, HQ, T, Dv), q, k, v)  # [B, HQ, T, Dv]
    path = choose_path(q.device, q.dtype, needs_grad(q, k, v), False, _path)
    if path == "reference":
        if mask_mod is None:
            return reference.sliding_window_attention(q, k, v, window, scale)[0]
        window_mod = sliding_window(window).mask_mod

        def window_and_user(b, h, q_idx, kv_idx):
            return window_mod(b, h, q_idx, kv_idx) & mask_mod(b, h, q_idx, kv_idx)

        dense = evaluate_mask_mod(window_and_user, T, T, B, HQ, q.device)  # [B, HQ, T, T]
        return reference.masked_attention(q, k, v, dense, scale)[0]
    block_mask = _window_block_mask(T, window, q.device, mask_mod, window_tile(q, v, needs_grad(q, k, v)))
    out, _ = call_flex(path, q, k, v, block_mask, scale, want_lse=False, forward_options=_WINDOW_FWD_OPTIONS)
    return out  # [B, HQ, T, Dv]


# ---- branch 1: compressed attention --------------------------------------------------------
def default_num_chunks(seq_len: int, num_cmp: int, batch: int, kv_heads: int) -> int:
    """Query chunks for the compressed branch when gradients are needed on CUDA.

    Aims at ``_TARGET_KV_PROGRAMS`` dK/dV programs (``batch * kv_heads * ceil(Tc / 128) * C``)
    with chunks of at least ``_MIN_CHUNK`` queries, a power of two, at most ``_MAX_CHUNKS``.
    Paper shape (B=1, HKV=4): 64k -> 8 chunks of 8k, 8k -> 8 chunks of 1k.
    """
    kv_programs = max(1, batch * kv_heads * -(-num_cmp // _Q_BLOCK))
    wanted = -(-_TARGET_KV_PROGRAMS // kv_programs)
    chunks = max(1, min(wanted, seq_len // _MIN_CHUNK, _MAX_CHUNKS))
    return 1 << (chunks.bit_length() - 1)  # round down to a power of two


def _chunk_layout(seq_len: int, num_chunks: int) -> tuple[int, int]:
    """``(C, Tq)``: ``C`` chunks of ``Tq`` queries (a multiple of the query tile), ``C * Tq >= T``."""
    if num_chunks <= 1:
        return 1, seq_len
    chunk_len = -(-seq_len // num_chunks)
    chunk_len = -(-chunk_len // _Q_BLOCK) * _Q_BLOCK
    if chunk_len >= seq_len:  # one chunk (T <= one query tile): the unchunked layout, no padding
        return 1, seq_len
    return -(-seq_len // chunk_len), chunk_len


def _compressed_mask_mod(
    config: NSAConfig, num_chunks: int, chunk_len: int, seq_len: int, user_mask_mod, kv_fold: int = 1, group: int = 1
):
    """The compressed pattern in the chunked layout: query row ``q_idx`` of virtual head ``h`` is raw
    position ``t = (h mod C) * Tq + q_idx`` of query head ``h div C``; with a user mask_mod, compressed
    token ``i`` also needs ``user(b, h div C, t, i*d)`` and ``user(b, h div C, t, i*d + l - 1)``. The
    user mask only ever sees positions ``< T``: padding rows (``t >= T``, dropped from the output) ask
    about ``T - 1``. ``kv_fold > 1``: the KV heads are folded into the batch (batch entry
    ``b * kv_fold + g`` holds the ``group * C`` virtual heads of KV head ``g``), so the user mask is
    asked about batch ``b div kv_fold`` and query head ``(b mod kv_fold) * group + h div C``."""
    l, d = config.cmp_block, config.cmp_stride
    if num_chunks == 1 and user_mask_mod is None:
        return compressed_causal(l, d).mask_mod
    C, Tq, last_pos = num_chunks, chunk_len, seq_len - 1

    def compressed_chunked(b, h, q_idx, kv_idx):
        t = (h % C) * Tq + q_idx
        visible = kv_idx * d + (l - 1) <= t
        if user_mask_mod is None:
            return visible
        batch, head = b // kv_fold, (b % kv_fold) * group + h // C
        t_user = torch.clamp(t, max=last_pos)
        first = torch.clamp(kv_idx * d, max=last_pos)
        last = torch.clamp(kv_idx * d + (l - 1), max=last_pos)
        return visible & user_mask_mod(batch, head, t_user, first) & user_mask_mod(batch, head, t_user, last)

    suffix = "" if user_mask_mod is None else " & user"
    return named(f"compressed_causal_l{l}_d{d}_chunks{C}{suffix}", compressed_chunked)


def _compressed_block_mask(
    seq_len, num_cmp, config, heads, num_chunks, chunk_len, device, user_mask_mod, kv_fold: int = 1
):
    """Closed-form compressed BlockMask ``[1, H*C or 1, Tq, Tc]``: the tables of the unchunked
    ``[C*Tq, Tc]`` pattern cut into ``C`` row slabs, one per chunk (virtual head ``h*C + c``);
    ``heads`` query heads per batch entry (``kv_fold``: see :func:`_compressed_mask_mod`)."""
    l, d = config.cmp_block, config.cmp_stride

    def build():
        rows = num_chunks * chunk_len
        any_blocks, full_blocks = compressed_causal(l, d).block_tables(rows, num_cmp, _Q_BLOCK, device)
        if user_mask_mod is not None:
            full_blocks = torch.zeros_like(full_blocks)
        if num_chunks > 1:  # [1, 1, C*NQBc, NKB] -> [1, H*C, NQBc, NKB]
            nkb = any_blocks.shape[-1]
            any_blocks = any_blocks.reshape(1, num_chunks, -1, nkb).repeat(1, heads, 1, 1)
            full_blocks = full_blocks.reshape(1, num_chunks, -1, nkb).repeat(1, heads, 1, 1)
        mask_mod = _compressed_mask_mod(config, num_chunks, chunk_len, seq_len, user_mask_mod, kv_fold, heads)
        return block_mask_from_tables(any_blocks, full_blocks, mask_mod, chunk_len, num_cmp, _Q_BLOCK)

    key = (
        "compressed",
        seq_len,
        num_cmp,
        l,
        d,
        heads,
        num_chunks,
        kv_fold,
        _device_key(device),
    )
    return cached_block_mask(key, build, user_mask_mod)


def _to_chunks(x: torch.Tensor, num_chunks: int, chunk_len: int) -> torch.Tensor:
    """``[B, H, T, D] -> [B, H*C, Tq, D]`` (zero-padded to ``C*Tq`` rows; a view of contiguous ``x``
    when no padding is needed)."""
    B, H, T, D = x.shape
    pad = num_chunks * chunk_len - T
    if pad:
        x = F.pad(x, (0, 0, 0, pad))  # [B, H, C*Tq, D]
    return x.reshape(B, H * num_chunks, chunk_len, D)


def _from_chunks(x: torch.Tensor, heads: int, seq_len: int) -> torch.Tensor:
    """``[B, H*C, Tq, ...] -> [B, H, T, ...]`` (inverse of :func:`_to_chunks`, padding dropped; a view
    of contiguous ``x``)."""
    B, HC, Tq = x.shape[:3]
    return x.reshape(B, heads, (HC // heads) * Tq, *x.shape[3:])[:, :, :seq_len]


def _flex_compressed(path, q, k_cmp, v_cmp, config, scale, want_lse, user_mask_mod, num_chunks, expand):
    """FlexAttention on the compressed tokens in ``num_chunks`` query chunks (virtual heads). K/V are
    given to every virtual head when there are several chunks (the chunks exist to give each its
    own dK/dV programs) and, with ``expand``, to each of the ``HQ`` query heads: the KV heads are
    folded into the batch (entry ``b * HKV + g`` holds the ``G * C`` virtual heads of KV head ``g``, a
    view of q) and K/V expanded over those heads with stride 0 (no copy; their gradients sum back
    through the expand). Otherwise GQA maps the query heads onto the ``HKV`` K/V heads."""
    B, HQ, T, Dk = q.shape
    HKV, Tc, Dv = k_cmp.shape[1], k_cmp.shape[2], v_cmp.shape[-1]
    C, Tq = _chunk_layout(T, num_chunks)
    options = _COMPRESSED_FWD_OPTIONS if C == 1 and Tc >= _COMPRESSED_TMA_MIN_KEYS else None
    if C == 1 and not (expand and HQ > HKV):
        block_mask = _compressed_block_mask(T, Tc, config, HQ, 1, T, q.device, user_mask_mod)
        out, lse = call_flex(path, q, k_cmp, v_cmp, block_mask, scale, want_lse, forward_options=options)
    else:
        G = HQ // HKV
        block_mask = _compressed_block_mask(T, Tc, config, G, C, Tq, q.device, user_mask_mod, kv_fold=HKV)
        # a view of contiguous q (C == 1: also of a [B, T, H, D]-strided q when B == 1)
        q_virtual = _to_chunks(q if C == 1 else q.contiguous(), C, Tq).reshape(B * HKV, G * C, Tq, Dk)
        k_virtual = k_cmp.reshape(B * HKV, 1, Tc, Dk).expand(B * HKV, G * C, Tc, Dk)  # stride 0 over heads
        v_virtual = v_cmp.reshape(B * HKV, 1, Tc, Dv).expand(B * HKV, G * C, Tc, Dv)
        out, lse = call_flex(path, q_virtual, k_virtual, v_virtual, block_mask, scale, want_lse, forward_options=options)
        out = _from_chunks(out.reshape(B, HQ * C, Tq, Dv), HQ, T)  # [B, HQ, T, Dv]
        lse = None if lse is None else _from_chunks(lse.reshape(B, HQ * C, Tq), HQ, T)  # [B, HQ, T]
    if lse is not None:
        # queries t < l - 1 see no compressed token: lse = -inf (FlexAttention gives -inf for
        # empty rows already; this pins the contract whatever the kernel version does)
        t = torch.arange(T, device=q.device)
        lse = torch.where(t >= config.cmp_block - 1, lse.float(), float("-inf"))
    return out, lse


def compressed_attention(
    q,
    k_cmp,
    v_cmp,
    config=None,
    scale=None,
    return_lse=False,
    *,
    mask_mod=None,
    _path=None,
    _num_chunks=None,
    _expand_heads=None,
):
    """NSA branch 1: ``o[t] = softmax_i(scale * q_t . k_cmp[i]) v_cmp[i]`` over the compressed
    tokens with ``i*d + l - 1 <= t``, and its log-sum-exp.

    Args:
        q: ``[B, HQ, T, Dk]``; k_cmp: ``[B, HKV, Tc, Dk]``; v_cmp: ``[B, HKV, Tc, Dv]``, with
            ``Tc = config.num_cmp_tokens(T)`` (0 when ``T < l``).
        config: :class:`NSAConfig` (``cmp_block`` l, ``cmp_stride`` d); defaults when None.
        scale: softmax scale, ``1 / sqrt(Dk)`` when None.
        return_lse: also return ``lse [B, HQ, T]`` float32 (float64 for float64 inputs):
            ``log sum_i exp(scale * q_t . k_cmp[i])`` over the visible ``i``.
        mask_mod: optional extra pattern ``(b, h, q_idx, kv_idx) -> bool`` in RAW token positions;
            compressed token ``i`` stays visible to query ``t`` only if the user mask allows both
            raw positions ``i*d`` and ``i*d + l - 1``. Cached per mask_mod object (reuse it).
        _path: private path override (see :mod:`flexnsa.flex_runtime`).
        _num_chunks: private override of the query chunks (see :func:`default_num_chunks`); by
            default chunks are used only on CUDA when gradients are needed.
        _expand_heads: private override: give each of the ``HQ`` query heads its own (stride-0) view of
            ``k_cmp``/``v_cmp`` instead of GQA (default: on CUDA when gradients are needed and ``HKV < HQ``).

    Returns:
        ``o [B, HQ, T, Dv]`` in ``q.dtype``, or ``(o, lse)``. Queries ``t < l - 1`` (and rows the
        user mask empties) give ``o = 0``, ``lse = -inf``, and no NaN in the gradients.
    """
    config = check_config(config)
    check_scale(scale)
    _check_mask_mod(mask_mod)
    if _num_chunks is not None and (
        isinstance(_num_chunks, bool) or not isinstance(_num_chunks, int) or _num_chunks < 1
    ):
        raise ValueError(f"_num_chunks must be None or an int >= 1, got {_num_chunks!r}")
    dims = _check_compressed_inputs(q, k_cmp, v_cmp, config)
    B, HQ, T, Dk = q.shape
    Tc, Dv = dims.num_cmp, v_cmp.shape[-1]
    scale = _default_scale(scale, Dk)
    if Tc == 0:  # T < l: no compressed token, nothing to launch
        out = _zeros_in_graph((B, HQ, T, Dv), q, k_cmp, v_cmp)  # [B, HQ, T, Dv]
        lse = torch.full(
            (B, HQ, T), float("-inf"), device=q.device, dtype=reference.accumulation_dtype(q.dtype)
        )
        return (out, lse) if return_lse else out
    wants_grad = needs_grad(q, k_cmp, v_cmp)
    path = choose_path(q.device, q.dtype, wants_grad, return_lse, _path)
    if path == "reference":
        if mask_mod is None:
            out, lse = reference.compressed_attention(q, k_cmp, v_cmp, config, scale)
        else:
            chunked_mod = _compressed_mask_mod(config, 1, T, T, mask_mod)  # one chunk: b is the sequence
            dense = evaluate_mask_mod(chunked_mod, T, Tc, B, HQ, q.device)  # [B, HQ, T, Tc]
            out, lse = reference.masked_attention(q, k_cmp, v_cmp, dense, scale)
        return (out, lse) if return_lse else out
    HKV = k_cmp.shape[1]
    if _expand_heads is None:
        # FlexAttention's dK/dV pass runs one program per (key tile, KV head) and loops over the G
        # query heads of the group: with Tc = T/16 keys that is too few programs. K/V given to each of
        # the HQ query heads give G times more (their gradients sum back over the heads): H200, paper
        # shape, forward+backward of this branch 2.09 -> 1.63 ms at 8k, 49.25 -> 47.96 ms at 64k
        # (perf/NOTES.md, session 4, then as copies; session 11: stride-0 views, no copy)
        _expand_heads = wants_grad and q.is_cuda and HKV < HQ
    if _num_chunks is None:
        _num_chunks = default_num_chunks(T, Tc, B, HQ if _expand_heads else HKV) if wants_grad and q.is_cuda else 1
    out, lse = _flex_compressed(path, q, k_cmp, v_cmp, config, scale, return_lse, mask_mod, _num_chunks, _expand_heads)
    return (out, lse) if return_lse else out
