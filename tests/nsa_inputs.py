"""Random NSA inputs and configurations for the tests (never zeros: they hide indexing bugs)."""

from __future__ import annotations

import torch
from hypothesis import strategies as st

import flexnsa


@st.composite
def configs(draw, max_block: int = 64) -> flexnsa.NSAConfig:
    """Valid NSAConfigs with small blocks, including l = d = l'."""
    d = draw(st.sampled_from([1, 2, 4, 8, 16]))
    l = d * draw(st.integers(1, 4))
    bs = d * draw(st.integers(1, max(1, max_block // d)))
    n = draw(st.integers(1, 6))
    init = draw(st.integers(0, n))
    local = draw(st.integers(0, n - init))
    window = draw(st.sampled_from([0, 1, 5, 16, 33]))
    return flexnsa.NSAConfig(l, d, bs, n, init, local, window)


def make_inputs(cfg, B, HQ, HKV, T, Dk, Dv, dtype=torch.float64, seed=0, window_kv=False, device="cpu"):
    """Returns a dict of keyword arguments for ``nsa_attention`` (q, k, v, k_cmp, v_cmp, gates, ...)."""
    gen = torch.Generator().manual_seed(seed)
    Tc = cfg.num_cmp_tokens(T)

    def rnd(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64).to(device=device, dtype=dtype)

    inputs = dict(
        q=rnd(B, HQ, T, Dk),  # [B, HQ, T, Dk]
        k=rnd(B, HKV, T, Dk),  # [B, HKV, T, Dk]
        v=rnd(B, HKV, T, Dv),  # [B, HKV, T, Dv]
        k_cmp=rnd(B, HKV, Tc, Dk),  # [B, HKV, Tc, Dk]
        v_cmp=rnd(B, HKV, Tc, Dv),  # [B, HKV, Tc, Dv]
        gates=torch.rand(B, HQ, T, 3, generator=gen, dtype=torch.float64).to(device=device, dtype=dtype),
    )
    if window_kv:
        inputs["k_win"] = rnd(B, HKV, T, Dk)
        inputs["v_win"] = rnd(B, HKV, T, Dv)
    return inputs


def selections_agree(idx_a, idx_b, scores, rtol=1e-6, atol=1e-9) -> bool:
    """Tie-aware comparison of two selections ``[B, HKV, T, n]`` given the group scores
    ``[B, HKV, T, NB]``: rows must hold the same set of blocks, or, where the sets differ, the blocks
    only one side chose must have scores equal (within rounding) to blocks only the other side chose."""
    a = idx_a.long().flatten(0, 2)
    b = idx_b.long().flatten(0, 2)
    s = scores.flatten(0, 2)
    for row in range(a.shape[0]):
        set_a = {int(x) for x in a[row] if x >= 0}
        set_b = {int(x) for x in b[row] if x >= 0}
        if set_a == set_b:
            continue
        if len(set_a) != len(set_b):
            return False
        only_a = sorted(float(s[row, j]) for j in set_a - set_b)
        only_b = sorted(float(s[row, j]) for j in set_b - set_a)
        for x, y in zip(only_a, only_b):
            if abs(x - y) > atol + rtol * max(abs(x), abs(y)):
                return False
    return True
