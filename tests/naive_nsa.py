"""A deliberately naive NSA, written independently of flexnsa.reference for the tests.

One Python loop over (batch, query position), float64, lists instead of masks, token-by-token
counting instead of the closed-form overlap weights. Slow: tiny shapes only.
"""

from __future__ import annotations

import functools
import math

import torch


def _softmax_attend(q_vec, keys, values, scale):
    """q_vec [D]; keys [S, Dk]; values [S, Dv] -> ([Dv], probabilities [S]); S may be 0."""
    if keys.shape[0] == 0:
        return torch.zeros(values.shape[-1], dtype=torch.float64), torch.zeros(0, dtype=torch.float64)
    logits = (keys @ q_vec) * scale
    probs = torch.softmax(logits, dim=0)
    return probs @ values, probs


@functools.lru_cache(maxsize=None)
def naive_overlap(i: int, j: int, cfg) -> float:
    """Counts, token by token, the raw tokens of compressed token i lying in block j, over d."""
    count = sum(1 for pos in range(i * cfg.cmp_stride, i * cfg.cmp_stride + cfg.cmp_block) if pos // cfg.slc_block == j)
    return count / cfg.cmp_stride


def naive_nsa(q, k, v, k_cmp, v_cmp, gates, cfg, k_win=None, v_win=None, scale=None):
    """Returns (output [B, HQ, T, Dv] float64, selections: dict[(b, g, t)] -> sorted list of blocks,
    scores: dict[(b, g, t)] -> list of block scores)."""
    q, k, v, k_cmp, v_cmp, gates = (x.double() for x in (q, k, v, k_cmp, v_cmp, gates))
    k_win = k if k_win is None else k_win.double()
    v_win = v if v_win is None else v_win.double()
    B, HQ, T, Dk = q.shape
    HKV, Dv = k.shape[1], v.shape[-1]
    G = HQ // HKV
    Tc = k_cmp.shape[2]
    scale = 1 / math.sqrt(Dk) if scale is None else scale
    l, d, bs, n = cfg.cmp_block, cfg.cmp_stride, cfg.slc_block, cfg.num_selected
    NB = math.ceil(T / bs)
    out = torch.zeros(B, HQ, T, Dv, dtype=torch.float64)
    selections, all_scores = {}, {}
    for b in range(B):
        for t in range(T):
            visible = [i for i in range(Tc) if i * d + l - 1 <= t]
            o_cmp, probs = {}, {}
            for h in range(HQ):
                g = h // G
                o_cmp[h], probs[h] = _softmax_attend(q[b, h, t], k_cmp[b, g, visible], v_cmp[b, g, visible], scale)
            own = t // bs
            eligible = list(range(own + 1))
            for g in range(HKV):
                group_probs = [sum(float(probs[h][pos]) for h in range(g * G, (g + 1) * G)) for pos in range(len(visible))]
                scores = [0.0] * NB
                for pos, i in enumerate(visible):
                    for j in range(NB):
                        scores[j] += group_probs[pos] * naive_overlap(i, j, cfg)
                forced = [j for j in eligible if j < cfg.num_init_blocks or j > own - cfg.num_local_blocks]
                if len(eligible) <= n:
                    chosen = eligible
                else:
                    others = sorted((j for j in eligible if j not in forced), key=lambda j: (-scores[j], j))
                    chosen = forced + others[: n - len(forced)]
                selections[(b, g, t)] = sorted(chosen)
                all_scores[(b, g, t)] = scores
                keys = [s for j in sorted(chosen) for s in range(j * bs, min((j + 1) * bs, t + 1))]
                win_keys = list(range(max(0, t - cfg.window + 1), t + 1)) if cfg.window > 0 else []
                for h in range(g * G, (g + 1) * G):
                    o_slc, _ = _softmax_attend(q[b, h, t], k[b, g, keys], v[b, g, keys], scale)
                    o_win, _ = _softmax_attend(q[b, h, t], k_win[b, g, win_keys], v_win[b, g, win_keys], scale)
                    gate = gates[b, h, t]
                    out[b, h, t] = gate[0] * o_cmp[h] + gate[1] * o_slc + gate[2] * o_win
    return out, selections, all_scores
