"""Pure-PyTorch Native Sparse Attention: the definition of correctness for every flexnsa backend.

Everything here follows ``NSA_SPEC.md`` literally, with dense ``[T, S]`` masks per head: simple to
read, vectorised (no Python loop over tokens or heads), differentiable, and valid for any float
dtype. It uses O(T^2) memory per head, so it is meant for tests, for the CPU training path and
for short sequences. The fast backends (FlexAttention, Triton) are compared against it run in
float64.

Layout: ``q [B, HQ, T, Dk]``, ``k [B, HKV, T, Dk]``, ``v [B, HKV, T, Dv]``,
``k_cmp [B, HKV, Tc, Dk]``, ``v_cmp [B, HKV, Tc, Dv]``, ``gates [B, HQ, T, 3]`` (cmp, slc, win).
Query head ``h`` reads KV head ``h // G`` with ``G = HQ // HKV``.

Precision: with ``upcast=True`` (default) every product runs in float32 (float64 for float64
inputs) and the output is cast back to the input dtype. ``upcast=False`` keeps the two matrix
products in the input dtype (softmax statistics stay in float32): that is "the reference run in the
fast backend's dtype" of flash-attention's test criterion.
"""

from __future__ import annotations

import math

import torch

from .config import NSAConfig

__all__ = [
    "accumulation_dtype",
    "masked_attention",
    "evaluate_mask_mod",
    "compressed_visibility",
    "compressed_attention",
    "overlap_weights",
    "block_scores",
    "select_from_scores",
    "select_blocks",
    "selection_mask",
    "selected_attention",
    "sliding_window_attention",
    "combine_branches",
    "nsa_attention",
]


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 for float64 inputs, float32 for every other float dtype."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _expand_kv(x: torch.Tensor, groups: int) -> torch.Tensor:
    """``[B, HKV, S, D] -> [B, HKV * groups, S, D]``: KV head ``g`` serves query heads ``g*G .. g*G+G-1``."""
    return x.repeat_interleave(groups, dim=1) if groups > 1 else x


def _default_scale(scale: float | None, head_dim: int) -> float:
    return 1.0 / math.sqrt(head_dim) if scale is None else float(scale)


def masked_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor,
    scale: float,
    upcast: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax attention restricted to a boolean mask, with GQA.

    ``o[h, t] = sum_s softmax_s(scale * q[h, t] . k[h // G, s] | mask[h, t, s]) v[h // G, s]``
    and ``lse[h, t] = log sum_{s in mask} exp(scale * q[h, t] . k[h // G, s])``.
    A row with no visible key gives ``o = 0`` and ``lse = -inf``, and no NaN in the gradient.

    Args:
        q: ``[B, HQ, T, Dk]``; k: ``[B, HKV, S, Dk]``; v: ``[B, HKV, S, Dv]``.
        mask: bool, broadcastable to ``[B, HQ, T, S]``; True where query t may read key s.
    Returns:
        ``o [B, HQ, T, Dv]`` in ``q.dtype`` and ``lse [B, HQ, T]`` in the accumulation dtype.
    """
    groups = q.shape[1] // k.shape[1]
    k = _expand_kv(k, groups)  # [B, HQ, S, Dk]
    v = _expand_kv(v, groups)  # [B, HQ, S, Dv]
    acc = accumulation_dtype(q.dtype)
    if upcast:
        scores = (q.to(acc) @ k.to(acc).transpose(-1, -2)) * scale  # [B, HQ, T, S]
    else:
        scores = (q @ k.transpose(-1, -2)).to(acc) * scale  # [B, HQ, T, S]
    mask = mask.expand(scores.shape)
    row_has_key = mask.any(dim=-1, keepdim=True)  # [B, HQ, T, 1]
    # -inf outside the mask; rows without any key get a finite dummy row so that neither the
    # forward nor the backward of logsumexp produces NaN. Their output is zeroed below.
    masked = torch.where(mask, scores, float("-inf"))
    masked = torch.where(row_has_key, masked, 0.0)
    lse = torch.logsumexp(masked, dim=-1, keepdim=True)  # [B, HQ, T, 1]
    probs = torch.where(mask, torch.exp(masked - lse), 0.0)  # [B, HQ, T, S]
    if upcast:
        out = probs @ v.to(acc)  # [B, HQ, T, Dv]
    else:
        out = (probs.to(v.dtype) @ v).to(acc)
    lse = torch.where(row_has_key, lse, float("-inf")).squeeze(-1)  # [B, HQ, T]
    return out.to(q.dtype), lse


def evaluate_mask_mod(mask_mod, batch: int, heads: int, q_idx: torch.Tensor, kv_idx: torch.Tensor) -> torch.Tensor:
    """A FlexAttention ``mask_mod(b, h, q_idx, kv_idx)`` evaluated densely by broadcasting:
    bool ``[B, H, len(q_idx), len(kv_idx)]`` (``q_idx``, ``kv_idx``: int64 positions ``[T]``, ``[S]``)."""
    device = q_idx.device
    b = torch.arange(batch, device=device)[:, None, None, None]
    h = torch.arange(heads, device=device)[None, :, None, None]
    allowed = mask_mod(b, h, q_idx[None, None, :, None], kv_idx[None, None, None, :])
    return torch.as_tensor(allowed, dtype=torch.bool, device=device).expand(batch, heads, len(q_idx), len(kv_idx))


def _query_positions(q: torch.Tensor, positions: torch.Tensor | None) -> torch.Tensor:
    """int64 ``[T]``: the positions of q's rows, ``0 .. T-1`` unless given (decoding: the new tokens')."""
    return torch.arange(q.shape[2], device=q.device) if positions is None else positions


def _user_token_mask(mask_mod, q: torch.Tensor, kv_len: int, positions=None):
    """The user pattern over raw tokens, ``[B, HQ, T, S]``, or None without one."""
    if mask_mod is None:
        return None
    keys = torch.arange(kv_len, device=q.device)
    return evaluate_mask_mod(mask_mod, q.shape[0], q.shape[1], _query_positions(q, positions), keys)


# ---- branch 1: compressed attention ---------------------------------------------------------
def compressed_visibility(
    seq_len: int, num_cmp: int, config: NSAConfig, device=None, positions: torch.Tensor | None = None
) -> torch.Tensor:
    """bool ``[T, Tc]``: query t sees compressed token i iff ``i*d + l - 1 <= t``; the rows are the
    queries at ``positions`` (int64 ``[T]``) when given, else ``0 .. seq_len-1``."""
    t = (torch.arange(seq_len, device=device) if positions is None else positions)[:, None]
    i = torch.arange(num_cmp, device=device)[None, :]
    return i * config.cmp_stride + config.cmp_block - 1 <= t


def _compressed_mask(q: torch.Tensor, num_cmp: int, config: NSAConfig, mask_mod=None, positions=None):
    """``[T, Tc]`` (or ``[B, HQ, T, Tc]`` with a user pattern): compressed token i is visible to query t
    iff it is causally complete and the pattern allows both its first and its last raw token."""
    t = _query_positions(q, positions)
    visible = compressed_visibility(q.shape[2], num_cmp, config, q.device, t)
    if mask_mod is None:
        return visible
    first = torch.arange(num_cmp, device=q.device) * config.cmp_stride
    last = first + config.cmp_block - 1
    B, HQ = q.shape[0], q.shape[1]
    return visible & evaluate_mask_mod(mask_mod, B, HQ, t, first) & evaluate_mask_mod(mask_mod, B, HQ, t, last)


def compressed_attention(
    q: torch.Tensor,
    k_cmp: torch.Tensor,
    v_cmp: torch.Tensor,
    config: NSAConfig,
    scale: float | None = None,
    upcast: bool = True,
    mask_mod=None,
    positions: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Branch 1: ``o_cmp [B, HQ, T, Dv]`` and its log-sum-exp ``lse [B, HQ, T]``.

    Queries with ``t < l - 1`` see no compressed token: ``o_cmp = 0``, ``lse = -inf``. An optional
    user ``mask_mod`` (raw positions) hides compressed tokens whose first or last raw token it hides.
    ``positions`` (int64 ``[T]``): the positions of q's rows when they are not ``0 .. T-1`` (decoding).
    """
    scale = _default_scale(scale, q.shape[-1])
    visible = _compressed_mask(q, k_cmp.shape[2], config, mask_mod, positions)  # [T, Tc] or [B, HQ, T, Tc]
    return masked_attention(q, k_cmp, v_cmp, visible, scale, upcast)


# ---- branch 2: block scores, top-n, selected attention --------------------------------------
def overlap_weights(config: NSAConfig, num_cmp: int, num_blocks: int, device=None, dtype=torch.float32):
    """``w [Tc, NB]``, ``w[i, j] = |[i*d, i*d + l) ∩ [j*l', (j+1)*l')| / d`` (NSA_SPEC.md, Eq. 9)."""
    d, l, bs = config.cmp_stride, config.cmp_block, config.slc_block
    start = torch.arange(num_cmp, device=device)[:, None] * d  # [Tc, 1]
    block_start = torch.arange(num_blocks, device=device)[None, :] * bs  # [1, NB]
    overlap = torch.minimum(start + l, block_start + bs) - torch.maximum(start, block_start)
    return overlap.clamp(min=0).to(dtype) / d  # [Tc, NB]


def block_scores(
    q: torch.Tensor,
    k_cmp: torch.Tensor,
    config: NSAConfig,
    scale: float | None = None,
    lse: torch.Tensor | None = None,
    mask_mod=None,
    positions: torch.Tensor | None = None,
    num_blocks: int | None = None,
) -> torch.Tensor:
    """Group-summed block scores ``[B, HKV, T, NB]`` (accumulation dtype, no gradient).

    ``p[h, t, i] = exp(scale * q_t . k_cmp[i] - lse[h, t])`` over visible ``i``;
    ``score[g, t, j] = sum_{h in group g} sum_i w[i, j] p[h, t, i]``.
    ``lse`` (``[B, HQ, T]``) is the compressed branch's; it is computed when not given.
    ``positions``: the rows' positions when not ``0 .. T-1``; ``num_blocks``: NB, default ``ceil(T / l')``.
    """
    scale = _default_scale(scale, q.shape[-1])
    B, HQ, T, _ = q.shape
    HKV, Tc = k_cmp.shape[1], k_cmp.shape[2]
    acc = accumulation_dtype(q.dtype)
    with torch.no_grad():
        q, k_cmp = q.detach(), k_cmp.detach()
        if lse is None:
            v_dummy = k_cmp.new_zeros(B, HKV, Tc, 1)
            _, lse = compressed_attention(q, k_cmp, v_dummy, config, scale, mask_mod=mask_mod, positions=positions)
        logits = (q.to(acc) @ _expand_kv(k_cmp, HQ // HKV).to(acc).transpose(-1, -2)) * scale
        visible = _compressed_mask(q, Tc, config, mask_mod, positions)  # [T, Tc] or [B, HQ, T, Tc]
        # lse is -inf exactly on rows with nothing visible, where every entry is masked anyway
        lse_safe = torch.where(torch.isinf(lse), 0.0, lse.to(acc))[..., None]
        probs = torch.where(visible, torch.exp(logits - lse_safe), 0.0)  # [B, HQ, T, Tc]
        num_blocks = config.num_blocks(T) if num_blocks is None else num_blocks
        weights = overlap_weights(config, Tc, num_blocks, q.device, acc)  # [Tc, NB]
        scores = probs @ weights  # [B, HQ, T, NB]
        return scores.unflatten(1, (HKV, HQ // HKV)).sum(dim=2)  # [B, HKV, T, NB]


def select_from_scores(scores: torch.Tensor, config: NSAConfig, positions: torch.Tensor | None = None) -> torch.Tensor:
    """Top-n block indices ``int32 [B, HKV, T, n]`` from group scores ``[B, HKV, T, NB]``, row ``r``
    being the query at ``positions[r]`` (default ``r``).

    Eligible blocks of query t: ``j <= t // l'``. Forced: eligible ``j < num_init_blocks`` and
    eligible ``j > t // l' - num_local_blocks``. With at most n eligible blocks all are selected;
    otherwise the forced blocks plus the best-scoring other eligible blocks, equal scores going to
    the lower block index. Indices are returned in ascending order, unused slots ``-1`` at the end.
    """
    T, NB = scores.shape[2], scores.shape[3]
    n = config.num_selected
    device = scores.device
    t = torch.arange(T, device=device) if positions is None else positions
    own = t[:, None] // config.slc_block  # [T, 1]
    j = torch.arange(NB, device=device)[None, :]  # [1, NB]
    eligible = j <= own  # [T, NB]
    forced = eligible & ((j < config.num_init_blocks) | (j > own - config.num_local_blocks))
    key = torch.where(eligible, scores, float("-inf"))
    key = torch.where(forced, float("inf"), key)  # [B, HKV, T, NB]
    # stable sort: among equal keys the lower block index comes first
    order = torch.sort(key, dim=-1, descending=True, stable=True).indices[..., :n]
    chosen = torch.gather(key, -1, order) > float("-inf")
    idx = torch.where(chosen, order, NB)  # unused -> NB, sorts last
    idx = torch.sort(idx, dim=-1).values
    idx = torch.where(idx == NB, -1, idx).to(torch.int32)
    if idx.shape[-1] < n:  # fewer blocks than slots
        pad = idx.new_full((*idx.shape[:-1], n - idx.shape[-1]), -1)
        idx = torch.cat([idx, pad], dim=-1)
    return idx  # [B, HKV, T, n]


def select_blocks(
    q: torch.Tensor,
    k_cmp: torch.Tensor,
    config: NSAConfig,
    scale: float | None = None,
    lse: torch.Tensor | None = None,
    mask_mod=None,
) -> torch.Tensor:
    """Selected block indices ``int32 [B, HKV, T, n]`` (NSA_SPEC.md, branch 2, steps 1-4); with a user
    ``mask_mod`` the scores come from the masked compressed probabilities."""
    return select_from_scores(block_scores(q, k_cmp, config, scale, lse, mask_mod), config)


def selection_mask(
    indices: torch.Tensor, seq_len: int, config: NSAConfig, positions: torch.Tensor | None = None
) -> torch.Tensor:
    """bool ``[B, HKV, T, S]`` over ``S = seq_len`` keys: token s is read by query t iff its block is
    selected and ``s <= t``; query rows at ``positions`` (int64 ``[T]``, default ``0 .. T-1``)."""
    B, HKV, T, _ = indices.shape
    NB = config.num_blocks(seq_len)
    idx = torch.where(indices < 0, NB, indices).long()  # unused slots -> dummy column NB
    picked = torch.zeros(B, HKV, T, NB + 1, dtype=torch.bool, device=indices.device)
    picked.scatter_(-1, idx, True)
    block_of_key = torch.arange(seq_len, device=indices.device) // config.slc_block  # [S]
    token_picked = picked[..., block_of_key]  # [B, HKV, T, S]
    keys = torch.arange(seq_len, device=indices.device)
    queries = torch.arange(T, device=indices.device) if positions is None else positions
    return token_picked & (keys[None, :] <= queries[:, None])


def selected_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    indices: torch.Tensor,
    config: NSAConfig,
    scale: float | None = None,
    upcast: bool = True,
    mask_mod=None,
    positions: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Branch 2 attention: each query reads raw tokens ``s <= t`` of its group's selected blocks
    (and allowed by the user ``mask_mod``, if any).

    ``indices``: ``[B, HKV, T, n]`` block ids, ``-1`` for unused slots; ``positions``: the rows'
    positions when not ``0 .. T-1`` (k, v then hold ``S`` tokens). Returns
    ``o_slc [B, HQ, T, Dv]`` and ``lse [B, HQ, T]``.
    """
    scale = _default_scale(scale, q.shape[-1])
    groups = q.shape[1] // k.shape[1]
    mask = _expand_kv(selection_mask(indices, k.shape[2], config, positions), groups)  # [B, HQ, T, S]
    user = _user_token_mask(mask_mod, q, k.shape[2], positions)
    return masked_attention(q, k, v, mask if user is None else mask & user, scale, upcast)


# ---- branch 3: sliding window ----------------------------------------------------------------
def sliding_window_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    window: int,
    scale: float | None = None,
    upcast: bool = True,
    mask_mod=None,
    positions: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Branch 3: attention over raw tokens ``t - w < s <= t`` (and allowed by the user ``mask_mod``).
    ``window == 0`` gives zeros, lse -inf. ``positions``: the rows' positions when not ``0 .. T-1``."""
    scale = _default_scale(scale, q.shape[-1])
    keys = torch.arange(k.shape[2], device=q.device)
    diff = _query_positions(q, positions)[:, None] - keys[None, :]  # t - s, [T, S]
    mask = (diff >= 0) & (diff < window)
    user = _user_token_mask(mask_mod, q, k.shape[2], positions)
    return masked_attention(q, k, v, mask if user is None else mask & user, scale, upcast)


# ---- output ----------------------------------------------------------------------------------
def combine_branches(o_cmp, o_slc, o_win, gates: torch.Tensor) -> torch.Tensor:
    """``o = g_cmp * o_cmp + g_slc * o_slc + g_win * o_win``, in float32, cast to ``o_cmp.dtype``.

    ``gates [B, HQ, T, 3]`` in the order (cmp, slc, win); no log-sum-exp merge between branches.
    """
    acc = accumulation_dtype(o_cmp.dtype)
    g = gates.to(acc)
    out = g[..., 0:1] * o_cmp.to(acc) + g[..., 1:2] * o_slc.to(acc) + g[..., 2:3] * o_win.to(acc)
    return out.to(o_cmp.dtype)


def nsa_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    k_cmp: torch.Tensor,
    v_cmp: torch.Tensor,
    gates: torch.Tensor,
    config: NSAConfig,
    k_win: torch.Tensor | None = None,
    v_win: torch.Tensor | None = None,
    scale: float | None = None,
    block_indices: torch.Tensor | None = None,
    upcast: bool = True,
    mask_mod=None,
) -> torch.Tensor:
    """Full NSA output ``[B, HQ, T, Dv]``: the gated sum of the three branches.

    The selection uses the compressed branch's own probabilities (no gradient flows through
    top-n); ``block_indices`` (``[B, HKV, T, n]``) overrides it. ``k_win``/``v_win`` default to
    ``k``/``v``. An optional user ``mask_mod(b, h, q_idx, kv_idx)`` (FlexAttention's signature, raw
    positions, ``h`` the query head) is ANDed into every branch: the window and the selected tokens,
    and the compressed tokens whose first and last raw tokens it allows (so the block scores, too,
    see only allowed compressed tokens). Inputs are assumed valid: ``flexnsa.nsa_attention`` checks them.
    """
    scale = _default_scale(scale, q.shape[-1])
    k_win = k if k_win is None else k_win
    v_win = v if v_win is None else v_win
    o_cmp, lse_cmp = compressed_attention(q, k_cmp, v_cmp, config, scale, upcast, mask_mod)
    if block_indices is None:
        block_indices = select_blocks(q, k_cmp, config, scale, lse=lse_cmp.detach(), mask_mod=mask_mod)
    o_slc, _ = selected_attention(q, k, v, block_indices, config, scale, upcast, mask_mod)
    o_win, _ = sliding_window_attention(q, k_win, v_win, config.window, scale, upcast, mask_mod)
    return combine_branches(o_cmp, o_slc, o_win, gates)
