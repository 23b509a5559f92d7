"""The float64 reference against a naive loop implementation, and NSA's invariants."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import flexnsa
from flexnsa import reference
from naive_nsa import naive_nsa, naive_overlap
from nsa_inputs import configs, make_inputs, selections_agree

GROUPS = st.sampled_from([1, 2, 3, 4, 8, 16])


@st.composite
def problems(draw, max_t: int = 160, max_heads: int = 16):
    cfg = draw(configs())
    G = draw(GROUPS)
    HKV = draw(st.integers(1, max(1, max_heads // G)))
    B = draw(st.integers(1, 2))
    T = draw(st.integers(1, max_t))
    Dk = draw(st.sampled_from([4, 8, 12]))
    Dv = draw(st.sampled_from([4, 6, 8]))
    seed = draw(st.integers(0, 2**31 - 1))
    return cfg, dict(B=B, HQ=G * HKV, HKV=HKV, T=T, Dk=Dk, Dv=Dv, seed=seed)


def _run_naive(inputs, cfg):
    return naive_nsa(**inputs, cfg=cfg)


# ---- against the naive implementation -------------------------------------------------------
@settings(max_examples=15)
@given(problems(max_t=100), st.booleans())
def test_nsa_matches_naive(problem, window_kv):
    cfg, shape = problem
    inputs = make_inputs(cfg, **shape, window_kv=window_kv)
    out_naive, sel_naive, _ = _run_naive(inputs, cfg)
    idx_naive = _selection_tensor(sel_naive, shape, cfg)
    idx = flexnsa.select_blocks(inputs["q"], inputs["k_cmp"], cfg)
    scores = reference.block_scores(inputs["q"], inputs["k_cmp"], cfg)
    assert selections_agree(idx, idx_naive, scores)
    if torch.equal(idx, idx_naive):
        out = flexnsa.nsa_attention(**inputs, config=cfg)
    else:  # a tie broken differently by rounding: compare the rest with the naive selection
        out = flexnsa.nsa_attention(**inputs, config=cfg, block_indices=idx_naive)
    torch.testing.assert_close(out, out_naive, rtol=1e-9, atol=1e-10)


def _selection_tensor(selections, shape, cfg):
    idx = torch.full((shape["B"], shape["HKV"], shape["T"], cfg.num_selected), -1, dtype=torch.int32)
    for (b, g, t), blocks in selections.items():
        idx[b, g, t, : len(blocks)] = torch.tensor(blocks, dtype=torch.int32)
    return idx


@settings(max_examples=15)
@given(problems(max_t=100))
def test_block_scores_match_naive(problem):
    cfg, shape = problem
    inputs = make_inputs(cfg, **shape)
    _, _, scores_naive = _run_naive(inputs, cfg)
    scores = reference.block_scores(inputs["q"], inputs["k_cmp"], cfg)  # [B, HKV, T, NB]
    expected = torch.zeros_like(scores)
    for (b, g, t), row in scores_naive.items():
        expected[b, g, t] = torch.tensor(row, dtype=scores.dtype)
    torch.testing.assert_close(scores, expected, rtol=1e-10, atol=1e-12)


@given(configs(), st.integers(0, 12), st.integers(1, 12))
def test_overlap_weights_count_tokens(cfg, num_cmp, num_blocks):
    w = reference.overlap_weights(cfg, num_cmp, num_blocks, dtype=torch.float64)
    expected = torch.tensor(
        [[naive_overlap(i, j, cfg) for j in range(num_blocks)] for i in range(num_cmp)], dtype=torch.float64
    ).reshape(num_cmp, num_blocks)
    torch.testing.assert_close(w, expected)


def test_overlap_weights_paper_pattern():
    """l=32, d=16, l'=64: block j gets compressed tokens 4j-1 .. 4j+3 with weights 1, 2, 2, 2, 1."""
    cfg = flexnsa.NSAConfig()
    w = reference.overlap_weights(cfg, 20, 5, dtype=torch.float64)
    j = 2
    column = w[:, j]
    assert torch.equal(column.nonzero().flatten(), torch.arange(4 * j - 1, 4 * j + 4))
    assert column[4 * j - 1 : 4 * j + 4].tolist() == [1.0, 2.0, 2.0, 2.0, 1.0]


# ---- invariants --------------------------------------------------------------------------------
def _full_causal(q, k, v):
    T = q.shape[2]
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    return reference.masked_attention(q, k, v, causal, q.shape[-1] ** -0.5)[0]


@given(problems(max_t=130))
def test_selection_with_enough_blocks_is_full_attention(problem):
    cfg, shape = problem
    cfg = flexnsa.NSAConfig(cfg.cmp_block, cfg.cmp_stride, cfg.slc_block, cfg.num_blocks(shape["T"]) + 1, 0, 0, 0)
    inputs = make_inputs(cfg, **shape)
    idx = flexnsa.select_blocks(inputs["q"], inputs["k_cmp"], cfg)
    o_slc, _ = reference.selected_attention(inputs["q"], inputs["k"], inputs["v"], idx, cfg)
    torch.testing.assert_close(o_slc, _full_causal(inputs["q"], inputs["k"], inputs["v"]))


@given(problems(max_t=130), st.integers(0, 40))
def test_window_covering_sequence_is_full_attention(problem, extra):
    cfg, shape = problem
    q, k, v = (make_inputs(cfg, **shape)[name] for name in ("q", "k", "v"))
    o_win, _ = reference.sliding_window_attention(q, k, v, shape["T"] + extra)
    torch.testing.assert_close(o_win, _full_causal(q, k, v))


@given(problems(max_t=100), st.integers(0, 2))
def test_one_hot_gates_return_one_branch(problem, branch):
    cfg, shape = problem
    inputs = make_inputs(cfg, **shape)
    inputs["gates"] = torch.zeros_like(inputs["gates"])
    inputs["gates"][..., branch] = 1.0
    out = flexnsa.nsa_attention(**inputs, config=cfg)
    q, k, v = inputs["q"], inputs["k"], inputs["v"]
    if branch == 0:
        expected, _ = reference.compressed_attention(q, inputs["k_cmp"], inputs["v_cmp"], cfg)
    elif branch == 1:
        idx = flexnsa.select_blocks(q, inputs["k_cmp"], cfg)
        expected, _ = reference.selected_attention(q, k, v, idx, cfg)
    else:
        expected, _ = reference.sliding_window_attention(q, k, v, cfg.window)
    torch.testing.assert_close(out, expected, rtol=0, atol=0)


@given(problems(max_t=150))
def test_indices_are_well_formed_and_forced_blocks_selected(problem):
    cfg, shape = problem
    inputs = make_inputs(cfg, **shape)
    idx = flexnsa.select_blocks(inputs["q"], inputs["k_cmp"], cfg)
    B, HKV, T, n = idx.shape
    assert idx.dtype == torch.int32 and (B, HKV, T, n) == (shape["B"], shape["HKV"], shape["T"], cfg.num_selected)
    for t in range(T):
        own = t // cfg.slc_block
        eligible = own + 1
        forced = {j for j in range(eligible) if j < cfg.num_init_blocks or j > own - cfg.num_local_blocks}
        row = idx[:, :, t].reshape(-1, n)
        for blocks in row.tolist():
            chosen = [j for j in blocks if j >= 0]
            assert len(chosen) == min(cfg.num_selected, eligible)
            assert len(set(chosen)) == len(chosen)
            assert all(0 <= j <= own for j in chosen)
            assert forced <= set(chosen)
            assert blocks[len(chosen) :] == [-1] * (n - len(chosen))


@given(problems(max_t=150))
def test_heads_of_a_group_share_blocks_and_order_does_not_matter(problem):
    """Group scores sum over the group's heads, so permuting heads inside each group leaves the
    selection unchanged; the selection is one row per KV head, read by all G of its query heads."""
    cfg, shape = problem
    inputs = make_inputs(cfg, **shape)
    G = shape["HQ"] // shape["HKV"]
    perm = torch.cat([g * G + torch.randperm(G) for g in range(shape["HKV"])])
    idx = flexnsa.select_blocks(inputs["q"], inputs["k_cmp"], cfg)
    idx_perm = flexnsa.select_blocks(inputs["q"][:, perm], inputs["k_cmp"], cfg)
    scores = reference.block_scores(inputs["q"], inputs["k_cmp"], cfg)
    assert selections_agree(idx, idx_perm, scores)


def test_equal_scores_go_to_lower_block():
    """q = 0 makes every visible compressed token equally likely: interior blocks tie exactly."""
    cfg = flexnsa.NSAConfig(cmp_block=32, cmp_stride=16, slc_block=64, num_selected=4, num_init_blocks=1,
                            num_local_blocks=1, window=8)
    inputs = make_inputs(cfg, 1, 2, 1, 1000, 8, 8)
    q = torch.zeros_like(inputs["q"])
    idx = flexnsa.select_blocks(q, inputs["k_cmp"], cfg)
    # query 999 sees compressed tokens 0..60: blocks 0..15 eligible, 0 and 15 forced; blocks 1..14
    # each collect overlap weight 1+2+2+2+1 = 8 and tie exactly. Ties go to the lowest: 1 and 2.
    assert idx[0, 0, 999].tolist() == [0, 1, 2, 15]
    _, sel_naive, _ = naive_nsa(q=q, **{k: v for k, v in inputs.items() if k != "q"}, cfg=cfg)
    assert sel_naive[(0, 0, 999)] == [0, 1, 2, 15]


@given(st.integers(1, 31), GROUPS, st.sampled_from([torch.float64, torch.float32, torch.bfloat16]))
def test_short_sequence_has_zero_compressed_branch_and_no_nan(T, G, dtype):
    cfg = flexnsa.NSAConfig()  # l = 32 > T: no compressed token
    inputs = make_inputs(cfg, 1, G, 1, T, 8, 8, dtype=dtype)
    for x in inputs.values():
        x.requires_grad_(True)
    o_cmp, lse = reference.compressed_attention(inputs["q"], inputs["k_cmp"], inputs["v_cmp"], cfg)
    assert inputs["k_cmp"].shape[2] == 0
    assert torch.equal(o_cmp, torch.zeros_like(o_cmp)) and torch.isneginf(lse).all()
    out = flexnsa.nsa_attention(**inputs, config=cfg)
    out.float().square().sum().backward()
    assert torch.isfinite(out).all()
    for name, x in inputs.items():
        assert torch.isfinite(x.grad).all(), name


def test_rows_before_first_compressed_token_are_zero():
    cfg = flexnsa.NSAConfig(cmp_block=8, cmp_stride=4, slc_block=8, num_selected=2, num_init_blocks=0,
                           num_local_blocks=2, window=4)
    inputs = make_inputs(cfg, 1, 2, 1, 20, 4, 4)
    o_cmp, lse = reference.compressed_attention(inputs["q"], inputs["k_cmp"], inputs["v_cmp"], cfg)
    assert torch.equal(o_cmp[:, :, :7], torch.zeros_like(o_cmp[:, :, :7]))
    assert torch.isneginf(lse[:, :, :7]).all() and torch.isfinite(lse[:, :, 7:]).all()
    assert (o_cmp[:, :, 7:].abs().sum(-1) > 0).all()


@given(problems(max_t=80), st.sampled_from([torch.float32, torch.bfloat16, torch.float16]))
def test_low_precision_inputs_keep_their_dtype_and_stay_close(problem, dtype):
    cfg, shape = problem
    inputs64 = make_inputs(cfg, **shape)
    idx = flexnsa.select_blocks(inputs64["q"], inputs64["k_cmp"], cfg)
    out64 = flexnsa.nsa_attention(**inputs64, config=cfg, block_indices=idx)
    low = {name: x.to(dtype) for name, x in inputs64.items()}
    out = flexnsa.nsa_attention(**low, config=cfg, block_indices=idx)
    assert out.dtype == dtype and torch.isfinite(out).all()
    tol = {torch.float32: 1e-5, torch.bfloat16: 5e-2, torch.float16: 1e-2}[dtype]
    torch.testing.assert_close(out.double(), out64, rtol=tol, atol=tol)


@given(problems(max_t=100))
def test_block_indices_override_reproduces_own_selection(problem):
    cfg, shape = problem
    inputs = make_inputs(cfg, **shape)
    idx = flexnsa.select_blocks(inputs["q"], inputs["k_cmp"], cfg)
    shuffled = idx[..., torch.randperm(idx.shape[-1])]  # slot order is free
    out = flexnsa.nsa_attention(**inputs, config=cfg)
    torch.testing.assert_close(flexnsa.nsa_attention(**inputs, config=cfg, block_indices=shuffled), out)


def test_compressed_keys_get_gradient_from_compressed_branch_only():
    cfg = flexnsa.NSAConfig(cmp_block=8, cmp_stride=4, slc_block=8, num_selected=2, num_init_blocks=0,
                            num_local_blocks=1, window=4)
    inputs = make_inputs(cfg, 1, 4, 2, 40, 8, 8)
    inputs["gates"][..., 0] = 0.0  # compressed branch switched off
    inputs["k_cmp"].requires_grad_(True)
    flexnsa.nsa_attention(**inputs, config=cfg).sum().backward()
    assert torch.equal(inputs["k_cmp"].grad, torch.zeros_like(inputs["k_cmp"]))


@given(problems(max_t=200))
def test_attended_pairs_count_the_masks(problem):
    cfg, shape = problem
    T = shape["T"]
    counts = cfg.attended_pairs(T)
    Tc = cfg.num_cmp_tokens(T)
    assert counts["cmp"] == int(reference.compressed_visibility(T, Tc, cfg).sum())
    assert counts["full"] == T * (T + 1) // 2
    pos = torch.arange(T)
    assert counts["win"] == int(((pos[:, None] - pos[None]) >= 0).logical_and((pos[:, None] - pos[None]) < cfg.window).sum())
    if cfg.num_local_blocks >= 1:
        inputs = make_inputs(cfg, **{**shape, "B": 1, "HKV": 1, "HQ": 1})
        idx = flexnsa.select_blocks(inputs["q"], inputs["k_cmp"], cfg)
        assert counts["slc"] == int(reference.selection_mask(idx, T, cfg).sum())


# ---- gradients -----------------------------------------------------------------------------
@pytest.mark.parametrize(
    "cfg, T, G, window_kv",
    [
        (flexnsa.NSAConfig(cmp_block=4, cmp_stride=2, slc_block=4, num_selected=2, num_init_blocks=1,
                           num_local_blocks=1, window=3), 13, 2, False),
        (flexnsa.NSAConfig(cmp_block=4, cmp_stride=4, slc_block=8, num_selected=2, num_init_blocks=0,
                           num_local_blocks=1, window=5), 19, 3, True),
        (flexnsa.NSAConfig(), 7, 1, False),  # T < l: no compressed token
    ],
)
def test_gradcheck_float64(cfg, T, G, window_kv):
    inputs = make_inputs(cfg, 1, G, 1, T, 3, 2, window_kv=window_kv)
    idx = flexnsa.select_blocks(inputs["q"], inputs["k_cmp"], cfg)  # top-n is discrete: fix it
    names = list(inputs)

    def f(*tensors):
        return flexnsa.nsa_attention(**dict(zip(names, tensors)), config=cfg, block_indices=idx)

    tensors = tuple(x.clone().requires_grad_(True) for x in inputs.values())
    assert torch.autograd.gradcheck(f, tensors, eps=1e-6, atol=1e-6)
