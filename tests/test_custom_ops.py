"""The selection branch's torch.library ops (``flexnsa::select_blocks``, ``flexnsa::selected_attention``
and its backward) and their Triton kernels, against ``flexnsa.reference``.

Three layers:

- The default CPU run checks the ops' pure-PyTorch path (closed-form backward against autograd of
  the float64 reference), the argument plumbing, ``torch.library.opcheck``,
  ``torch.compile(fullgraph=True)`` forward and backward, input validation and the reverse index
  of the dK/dV kernel.
- ``test_triton_kernels_in_subprocess`` re-runs this file's ``test_interp_*`` tests in a
  subprocess with ``TRITON_INTERPRET=1`` (Triton reads it when the kernels are defined, and it
  would slow every other Triton user of this process), so the real kernels (select, forward,
  both backward paths) run on the CPU on tiny shapes. Directly:
  ``TRITON_INTERPRET=1 python -m pytest tests/test_custom_ops.py -k interp``.
- CUDA tests (marked ``gpu``, skipped without CUDA) on small shapes; ``perf/gpu_check_ops.py``
  covers long sequences.

Comparisons: selections tie-aware (NSA_SPEC.md: the same set, or the blocks on which the sets
differ have float64 scores equal within rounding); attention flash-attention style (error of the
fast path against the float64 reference <= 3x the error of the reference run in the same low
precision, plus a small floor), never NaN.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import flexnsa
import flexnsa.custom_ops as custom_ops
from flexnsa import reference
from flexnsa.custom_ops import ops
from flexnsa.custom_ops.selected_bwd import build_reverse_index
from nsa_inputs import configs

GROUPS = st.sampled_from([1, 2, 3, 4, 8, 16])
LOW_DTYPES = st.sampled_from([torch.float32, torch.bfloat16, torch.float16])
INTERPRETING = ops.interpret_mode()
FLOOR = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 1e-2, torch.float64: 1e-12}

interp_only = pytest.mark.skipif(
    not INTERPRETING, reason="needs TRITON_INTERPRET=1 (run by test_triton_kernels_in_subprocess)"
)
cpu_path_only = pytest.mark.skipif(INTERPRETING, reason="default CPU path only")
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


# ---- problems ----------------------------------------------------------------------------------
def make_problem(cfg, B, HKV, G, T, Dk, Dv, dtype, seed, device="cpu", ties=None):
    """Random ``q, k, v, k_cmp`` in ``dtype`` and the compressed branch's lse (float32).

    ``ties``: None; ``"zero_q"`` (all compressed probabilities equal: exact ties between blocks);
    ``"periodic"`` (``k_cmp`` repeats with the period of one selection block: ties between blocks).
    """
    gen = torch.Generator().manual_seed(seed)
    Tc = cfg.num_cmp_tokens(T)
    rnd = lambda *shape: torch.randn(*shape, generator=gen, dtype=torch.float64)  # noqa: E731
    q, k, v, k_cmp = rnd(B, HKV * G, T, Dk), rnd(B, HKV, T, Dk), rnd(B, HKV, T, Dv), rnd(B, HKV, Tc, Dk)
    if ties == "zero_q":
        q = torch.zeros_like(q)
    elif ties == "periodic" and Tc:
        period = cfg.slc_block // cfg.cmp_stride
        k_cmp = k_cmp[:, :, torch.arange(Tc) % period]
    q, k, v, k_cmp = (x.to(device=device, dtype=dtype) for x in (q, k, v, k_cmp))
    lse = compressed_lse(q, k_cmp, cfg)
    return q, k, v, k_cmp, lse


def compressed_lse(q, k_cmp, cfg, scale=None):
    """``[B, HQ, T]`` log-sum-exp of the compressed branch (float32; float64 for float64 inputs)."""
    v_dummy = k_cmp.new_zeros(*k_cmp.shape[:-1], 1)
    return reference.compressed_attention(q.cpu(), k_cmp.cpu(), v_dummy.cpu(), cfg, scale)[1].to(q.device)


def random_indices(B, HKV, T, n, num_blocks, seed, unused=0.3, device="cpu"):
    """Valid, unusual indices ``int32 [B, HKV, T, n]``: distinct random blocks (also ones after the
    query, which causality masks), random slot order, ``-1`` anywhere, and one row with none."""
    gen = torch.Generator().manual_seed(seed)
    idx = torch.rand(B, HKV, T, num_blocks, generator=gen).argsort(-1)[..., :n]  # [B, HKV, T, min(n, NB)]
    if idx.shape[-1] < n:
        idx = torch.cat([idx, idx.new_full((B, HKV, T, n - idx.shape[-1]), -1)], dim=-1)
    idx = torch.where(torch.rand(B, HKV, T, n, generator=gen) < unused, -1, idx)
    idx[0, 0, 0] = -1  # a query without any selected token: o = 0, lse = -inf
    return idx.to(device=device, dtype=torch.int32)


# ---- comparisons -------------------------------------------------------------------------------
def selection_keys(q, k_cmp, cfg, scale=None):
    """float64 ``[B, HKV, T, NB]``: block scores, forced blocks ``+inf``, ineligible ``-inf``."""
    scores = reference.block_scores(q.detach().cpu().double(), k_cmp.detach().cpu().double(), cfg, scale)
    T, NB = scores.shape[2], scores.shape[3]
    own = torch.arange(T)[:, None] // cfg.slc_block  # [T, 1]
    j = torch.arange(NB)[None, :]  # [1, NB]
    eligible = j <= own
    forced = eligible & ((j < cfg.num_init_blocks) | (j > own - cfg.num_local_blocks))
    return torch.where(forced, math.inf, torch.where(eligible, scores, -math.inf))


def picked_blocks(idx, num_blocks):
    """bool ``[B, HKV, T, NB]`` of the blocks in each row; asserts values in [-1, NB) and no duplicates."""
    idx = idx.detach().cpu().long()
    assert ((idx >= -1) & (idx < num_blocks)).all(), "index out of range"
    picked = torch.zeros(*idx.shape[:-1], num_blocks + 1, dtype=torch.bool)
    picked.scatter_(-1, torch.where(idx < 0, num_blocks, idx), True)
    picked = picked[..., :num_blocks]
    assert torch.equal(picked.sum(-1), (idx >= 0).sum(-1)), "a block appears twice in one row"
    return picked


def assert_selection_agrees(idx, idx_ref, q, k_cmp, cfg, scale=None, rtol=1e-5, atol=1e-7):
    """Tie-aware: per row the same number of blocks, and where the sets differ all the blocks on
    which they differ have float64 keys within ``atol + rtol * |key|`` of each other (so each set
    is a valid top-n up to rounding). A forced block missing or an ineligible one chosen fails."""
    keys = selection_keys(q, k_cmp, cfg, scale)
    NB = keys.shape[-1]
    a, b = picked_blocks(idx, NB), picked_blocks(idx_ref, NB)
    assert torch.equal(a.sum(-1), b.sum(-1)), "different numbers of selected blocks"
    differ = a ^ b
    rows = differ.any(-1)
    hi = torch.where(differ, keys, -math.inf).amax(-1)
    lo = torch.where(differ, keys, math.inf).amin(-1)
    ok = torch.isfinite(hi) & torch.isfinite(lo) & (hi - lo <= atol + rtol * torch.maximum(hi.abs(), lo.abs()))
    bad = rows & ~ok
    assert not bad.any(), f"{int(bad.sum())} rows disagree beyond ties, first at {bad.nonzero()[0].tolist()}"


def assert_fa_close(name, fast, low, exact, dtype, factor=3.0):
    """``|fast - exact| <= factor * |low - exact| + floor(dtype)`` (max norms, the floor relative
    to the largest ``|exact|``); infinities must match."""
    fast, low, exact = (x.detach().cpu().double() for x in (fast, low, exact))
    assert not torch.isnan(fast).any(), f"{name}: NaN"
    inf = torch.isinf(exact)
    assert torch.equal(torch.isinf(fast), inf), f"{name}: infinities differ"
    assert torch.equal(fast[inf], exact[inf]), f"{name}: infinities differ"
    if inf.all():
        return
    fin = ~inf
    err_fast = (fast[fin] - exact[fin]).abs().max().item()
    err_low = (low[fin] - exact[fin]).abs().max().item()
    floor = FLOOR[dtype] * max(1.0, exact[fin].abs().max().item())
    assert err_fast <= factor * err_low + floor, f"{name}: error {err_fast:.3g} > {factor} x {err_low:.3g} + {floor:.3g}"


def reference_run(q, k, v, idx, cfg, grad_out, dtype, upcast):
    """``(o, lse, dq, dk, dv)`` of ``reference.selected_attention`` with inputs cast to ``dtype``."""
    q, k, v = (x.detach().cpu().to(dtype).requires_grad_() for x in (q, k, v))
    o, lse = reference.selected_attention(q, k, v, idx.cpu(), cfg, upcast=upcast)
    grads = torch.autograd.grad(o, (q, k, v), grad_out.cpu().to(dtype))
    return (o, lse, *grads)


def check_attention(q, k, v, idx, cfg, seed=0):
    """Runs the op forward and backward and compares all five results flash-attention style."""
    q, k, v = (x.detach().clone().requires_grad_() for x in (q, k, v))
    o, lse = custom_ops.selected_attention(q, k, v, idx, cfg)
    gen = torch.Generator().manual_seed(seed)
    grad_out = torch.randn(o.shape, generator=gen, dtype=torch.float64).to(o.device, o.dtype)
    grads = torch.autograd.grad(o, (q, k, v), grad_out)
    exact = reference_run(q, k, v, idx, cfg, grad_out, torch.float64, True)
    low = reference_run(q, k, v, idx, cfg, grad_out, q.dtype, False)
    for name, fast, lo, ex in zip(("o", "lse", "dq", "dk", "dv"), (o, lse, *grads), low, exact):
        assert_fa_close(name, fast, lo, ex, q.dtype)
    return o, lse, grads


# ---- the Triton launchers under symbolic shapes -------------------------------------------------
@cpu_path_only
@pytest.mark.parametrize("G, HKV", [(1, 2), (3, 1), (4, 2), (16, 1)])
def test_launchers_trace_with_symbolic_shapes(G, HKV, monkeypatch):
    """Every op's Triton launcher traced with symbolic sizes (``make_fx(tracing_mode="symbolic")``, as
    ``torch.compile`` does after a recompile marks sizes dynamic) on meta
    tensors, the launches recorded, not run: the head counts, head dims and slot counts that the
    kernels take as constexprs are specialised (``kernel_utils.static_sizes``) instead of failing
    (seen on the H200: a recompile for the small-group shape, G = 4, raised ValueError in
    ``tile_plan``); output shapes as declared."""
    from torch.fx.experimental.proxy_tensor import make_fx

    from flexnsa.custom_ops import combine

    monkeypatch.setattr(ops, "use_triton", lambda x: True)
    monkeypatch.setattr(combine, "_use_triton", lambda x: True)
    cfg = flexnsa.NSAConfig(8, 4, 8, 3, 1, 1)
    B, T, Dk, Dv = 2, 40, 16, 24
    HQ, n, Tc = G * HKV, cfg.num_selected, cfg.num_cmp_tokens(T)

    def every_op(q, k, v, k_cmp, idx, o_cmp, gates):
        lse_cmp = torch.zeros(q.shape[:3], device=q.device)  # [B, HQ, T]
        sel = torch.ops.flexnsa.select_blocks(q, k_cmp, lse_cmp, 8, 4, 8, n, 1, 1, 0.25)
        o, lse = torch.ops.flexnsa.selected_attention(q, k, v, idx, 8, 0.25)
        y, o_g, lse_g = torch.ops.flexnsa.selected_attention_gated(q, k, v, idx, o_cmp, o_cmp, gates, 8, 0.25)
        grads = torch.ops.flexnsa.selected_attention_backward(o_cmp, q, k, v, o, lse, idx, 8, 0.25, True)
        grads_delta = torch.ops.flexnsa.selected_attention_backward(o_cmp, q, k, v, o, lse, idx, 8, 0.25, False, lse)
        mix = torch.ops.flexnsa.gated_combine(o_cmp, o, o_cmp, gates)
        combine_grads = torch.ops.flexnsa.gated_combine_backward(o_cmp, o_cmp, o, o_cmp, gates)
        return sel, o, lse, y, o_g, lse_g, *grads, *grads_delta, mix, *combine_grads

    meta = dict(device="meta")
    inputs = (torch.empty(B, HQ, T, Dk, **meta), torch.empty(B, HKV, T, Dk, **meta), torch.empty(B, HKV, T, Dv, **meta),
              torch.empty(B, HKV, Tc, Dk, **meta), torch.empty(B, HKV, T, n, dtype=torch.int32, **meta),
              torch.empty(B, HQ, T, Dv, **meta), torch.empty(B, HQ, T, 3, **meta))  # fmt: skip
    graph = make_fx(every_op, tracing_mode="symbolic")(*inputs)
    outputs = [node for node in graph.graph.nodes if node.op == "output"][0].args[0]
    shapes = [tuple(int(size) for size in out.meta["val"].shape) for out in outputs]
    q_shape, o_shape, row_shape = (B, HQ, T, Dk), (B, HQ, T, Dv), (B, HQ, T)
    k_shape, v_shape = (B, HKV, T, Dk), (B, HKV, T, Dv)
    assert shapes == [(B, HKV, T, n), o_shape, row_shape, o_shape, o_shape, row_shape, q_shape, k_shape, v_shape,
                      q_shape, k_shape, v_shape, o_shape, o_shape, o_shape, o_shape, (B, HQ, T, 3), row_shape]  # fmt: skip


# ---- default CPU path ------------------------------------------------------------------------
@cpu_path_only
@given(configs(max_block=16), GROUPS, st.integers(1, 2), st.integers(1, 70), st.integers(0, 2**31 - 1))
def test_select_blocks_cpu_path_matches_reference(cfg, G, HKV, T, seed):
    """The wrapper passes the config fields and the given lse through in the right order."""
    q, _, _, k_cmp, lse = make_problem(cfg, 1, HKV, G, T, 8, 4, torch.float64, seed)
    scale = 0.3
    lse = compressed_lse(q, k_cmp, cfg, scale)
    idx = custom_ops.select_blocks(q, k_cmp, lse, cfg, scale=scale)
    assert idx.dtype == torch.int32 and idx.shape == (1, HKV, T, cfg.num_selected)
    assert torch.equal(idx, reference.select_blocks(q, k_cmp, cfg, scale, lse=lse))


@cpu_path_only
@given(GROUPS, st.integers(1, 2), st.integers(1, 45), st.sampled_from([(8, 4), (4, 12)]),
       st.sampled_from([3, 8, 16]), st.integers(1, 4), st.integers(0, 2**31 - 1))  # fmt: skip
def test_selected_attention_cpu_path_gradients(G, B, T, dims, block, n, seed):
    """float64 CPU path: forward = reference, closed-form backward = autograd of the reference."""
    Dk, Dv = dims
    cfg = flexnsa.NSAConfig(block, block, block, n, 0, 0)
    q, k, v, _, _ = make_problem(cfg, B, 1, G, T, Dk, Dv, torch.float64, seed)
    idx = random_indices(B, 1, T, n, cfg.num_blocks(T), seed)
    q, k, v = (x.requires_grad_() for x in (q, k, v))
    o, lse = custom_ops.selected_attention(q, k, v, idx, cfg)
    grad_out = torch.randn_like(o)
    grads = torch.autograd.grad(o, (q, k, v), grad_out)
    o_ref, lse_ref, *grads_ref = reference_run(q, k, v, idx, cfg, grad_out, torch.float64, True)
    torch.testing.assert_close(o, o_ref, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(lse, lse_ref, rtol=1e-10, atol=1e-12)
    for got, want in zip(grads, grads_ref):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-11)


@cpu_path_only
def test_selected_attention_cpu_path_float32_close_to_reference():
    cfg = flexnsa.NSAConfig(8, 4, 8, 3, 1, 1)
    q, k, v, _, _ = make_problem(cfg, 2, 2, 3, 37, 8, 6, torch.float32, seed=3)
    check_attention(q, k, v, random_indices(2, 2, 37, 3, cfg.num_blocks(37), seed=3), cfg)


def test_lse_is_not_differentiable():
    cfg = flexnsa.NSAConfig(4, 4, 4, 2, 0, 1)
    q, k, v, _, _ = make_problem(cfg, 1, 1, 2, 9, 4, 4, torch.float32, seed=0)
    q.requires_grad_()
    o, lse = custom_ops.selected_attention(q, k, v, random_indices(1, 1, 9, 2, 3, seed=0), cfg)
    assert o.requires_grad and not lse.requires_grad


def small_problem():
    """``cfg, q, k, v, k_cmp, lse, idx`` of one small float32 problem (opcheck, compile)."""
    cfg = flexnsa.NSAConfig(8, 4, 8, 3, 1, 1)
    q, k, v, k_cmp, lse = make_problem(cfg, 1, 2, 2, 29, 8, 6, torch.float32, seed=1)
    return cfg, q, k, v, k_cmp, lse, custom_ops.select_blocks(q, k_cmp, lse, cfg)


@cpu_path_only
@pytest.mark.slow
def test_opcheck():
    cfg, q, k, v, k_cmp, lse, idx = small_problem()
    torch.library.opcheck(torch.ops.flexnsa.select_blocks.default, (q, k_cmp, lse, 8, 4, 8, 3, 1, 1, 0.35))
    q, k, v = (x.requires_grad_() for x in (q, k, v))
    torch.library.opcheck(torch.ops.flexnsa.selected_attention.default, (q, k, v, idx, 8, 0.35))
    o, lse_slc = torch.ops.flexnsa.selected_attention(q, k, v, idx, 8, 0.35)
    args = (torch.randn_like(o), q.detach(), k.detach(), v.detach(), o.detach(), lse_slc, idx, 8, 0.35, True)
    torch.library.opcheck(torch.ops.flexnsa.selected_attention_backward.default, args)
    delta = (args[0] * args[4]).sum(-1)  # [B, HQ, T]: rowsum(grad_out * out), given instead of computed
    torch.library.opcheck(torch.ops.flexnsa.selected_attention_backward.default, (*args, delta))


@cpu_path_only
def test_selected_backward_given_delta():
    """A given ``delta = rowsum(out * grad_out)`` gives the gradients the op computes without it, and
    the op does use it (a shifted delta moves dq and dk: ``dS = P (dP - delta)``; dv has no delta); a
    delta of the wrong shape, dtype or device is a ValueError naming it."""
    cfg, q, k, v, k_cmp, lse, idx = small_problem()
    o, lse_slc = torch.ops.flexnsa.selected_attention(q, k, v, idx, 8, 0.35)
    args = (torch.randn_like(o), q, k, v, o, lse_slc, idx, 8, 0.35, True)
    delta = (args[0].double() * o.double()).sum(-1)  # [B, HQ, T] float64: the op casts it
    want = torch.ops.flexnsa.selected_attention_backward(*args)
    for got, expected in zip(torch.ops.flexnsa.selected_attention_backward(*args, delta), want):
        torch.testing.assert_close(got, expected)
    dq, dk, dv = torch.ops.flexnsa.selected_attention_backward(*args, delta + 1.0)
    assert not torch.allclose(dq, want[0]) and not torch.allclose(dk, want[1])
    torch.testing.assert_close(dv, want[2])
    for bad in (delta[..., :-1], delta.long(), delta[..., None]):
        with pytest.raises(ValueError, match="delta"):
            torch.ops.flexnsa.selected_attention_backward(*args, bad)


@cpu_path_only
@pytest.mark.slow
def test_compile_fullgraph_forward_backward():
    """Compressed lse -> select_blocks -> selected_attention, compiled with ``fullgraph=True`` (a
    graph break raises), forward and backward equal to eager."""
    cfg = flexnsa.NSAConfig(8, 4, 8, 3, 1, 1)
    q, k, v, k_cmp, _ = make_problem(cfg, 1, 2, 3, 33, 8, 6, torch.float32, seed=2)

    def selection_branch(q, k, v, k_cmp):
        _, lse = reference.compressed_attention(q, k_cmp, torch.zeros_like(k_cmp[..., :1]), cfg)
        idx = custom_ops.select_blocks(q, k_cmp, lse, cfg)
        out, _ = custom_ops.selected_attention(q, k, v, idx, cfg)
        return out

    compiled = torch.compile(selection_branch, fullgraph=True)
    results = []
    for fn in (compiled, selection_branch):
        leaves = [x.detach().clone().requires_grad_() for x in (q, k, v)]
        out = fn(*leaves, k_cmp)
        results.append((out, *torch.autograd.grad(out.square().sum(), leaves)))
    for got, want in zip(*results):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@st.composite
def reverse_index_cases(draw):
    B, HKV, T, n = draw(st.integers(1, 2)), draw(st.integers(1, 3)), draw(st.integers(1, 40)), draw(st.integers(1, 5))
    block = draw(st.sampled_from([1, 3, 8]))
    return B, HKV, T, n, block, draw(st.integers(1, 7)), draw(st.integers(0, 2**31 - 1))


@given(reverse_index_cases())
def test_reverse_index_covers_every_slot_once(case):
    """Work items partition each block's list of queries, non-empty and in key order; the lists hold
    exactly the valid slots, and each entry points back at its index slot."""
    B, HKV, T, n, block, chunk, seed = case
    NB = -(-T // block)
    idx = random_indices(B, HKV, T, n, NB, seed)
    rev = build_reverse_index(idx, NB, chunk)
    seen, last_key = {}, -1
    for w in range(rev["max_items"]):
        key, start, end = (int(rev[name][w]) for name in ("item_key", "item_start", "item_end"))
        if key >= rev["num_keys"]:
            continue
        assert key >= last_key  # items come key by key
        last_key = key
        assert 0 < end - start <= chunk
        first = int(rev["first_item"][key])
        assert first <= w < first + int(rev["num_items"][key])
        seen.setdefault(key, []).extend(int(t) for t in rev["entry_t"][start:end])
        for e in range(start, end):  # entry_pos points back at the index slot of the entry
            pos = int(rev["entry_pos"][e])
            bg, t, slot = pos // (T * n), (pos // n) % T, pos % n
            assert t == int(rev["entry_t"][e]) and key == bg * NB + int(idx[bg // HKV, bg % HKV, t, slot])
    expected = {}
    for b, g, t, s in (idx >= 0).nonzero().tolist():
        expected.setdefault((b * HKV + g) * NB + int(idx[b, g, t, s]), []).append(t)
    assert {k: sorted(v) for k, v in seen.items() if v} == {k: sorted(v) for k, v in expected.items()}
    assert int(rev["num_items"].sum()) <= rev["max_items"]


def test_reverse_index_refuses_2_31_slots():
    """int32 entries: a selection of 2**31 slots or more is refused (a meta tensor, nothing allocated)."""
    with pytest.raises(ValueError, match="2\\*\\*31"):
        build_reverse_index(torch.empty(1, 1, 2**27, 16, dtype=torch.int32, device="meta"), 2**21)


def test_dkv_atomics_only_when_allowed(monkeypatch):
    monkeypatch.delenv("FLEXNSA_DKV_ATOMIC", raising=False)
    assert not ops.dkv_atomic_allowed()
    monkeypatch.setenv("FLEXNSA_DKV_ATOMIC", "1")
    assert ops.dkv_atomic_allowed()
    previous = torch.are_deterministic_algorithms_enabled()
    try:
        torch.use_deterministic_algorithms(True)
        assert not ops.dkv_atomic_allowed()
    finally:
        torch.use_deterministic_algorithms(previous)


# ---- input validation ---------------------------------------------------------------------------
def _valid_args():
    cfg = flexnsa.NSAConfig(8, 4, 8, 2, 1, 1)
    q, k, v, k_cmp, lse = make_problem(cfg, 1, 2, 2, 20, 8, 4, torch.float32, seed=0)
    idx = torch.zeros(1, 2, 20, 2, dtype=torch.int32)
    return cfg, q, k, v, k_cmp, lse, idx


@pytest.mark.parametrize(
    "case, name",
    [
        (lambda c, q, k, v, kc, lse, i: custom_ops.select_blocks(q, kc, lse[:, :1], c), "lse"),
        (lambda c, q, k, v, kc, lse, i: custom_ops.select_blocks(q, kc, lse.numpy(), c), "lse"),
        (lambda c, q, k, v, kc, lse, i: custom_ops.select_blocks(q, kc[:, :, 1:], lse, c), "k_cmp"),
        (lambda c, q, k, v, kc, lse, i: custom_ops.select_blocks(q[0], kc, lse, c), "q"),
        (lambda c, q, k, v, kc, lse, i: custom_ops.select_blocks(q, kc, lse, c, scale=-1.0), "scale"),
        (lambda c, q, k, v, kc, lse, i: custom_ops.select_blocks(q, kc, lse, "paper"), "config"),
        (lambda c, q, k, v, kc, lse, i: custom_ops.selected_attention(q, k[:, :, 1:], v, i, c), "k"),
        (lambda c, q, k, v, kc, lse, i: custom_ops.selected_attention(q, k, v.double(), i, c), "v"),
        (lambda c, q, k, v, kc, lse, i: custom_ops.selected_attention(q, k[:, :1].expand(1, 3, 20, 8), v, i, c), "k"),
        (lambda c, q, k, v, kc, lse, i: custom_ops.selected_attention(q, k, v, i.float(), c), "indices"),
        (lambda c, q, k, v, kc, lse, i: custom_ops.selected_attention(q, k, v, i[..., :1], c), "indices"),
        (lambda c, q, k, v, kc, lse, i: custom_ops.selected_attention(q, k, v, i + 3, c), "indices"),
        (lambda c, q, k, v, kc, lse, i: custom_ops.selected_attention(q.int(), k, v, i, c), "q"),
        (lambda c, q, k, v, kc, lse, i: custom_ops.selected_attention_gated(
            q, k, v, i, q[..., :4], q[..., 1:], q[..., :3], c), "o_win"),
        (lambda c, q, k, v, kc, lse, i: custom_ops.selected_attention_gated(
            q, k, v, i, q[..., :4].double(), q[..., :4], q[..., :3], c), "o_cmp"),
        (lambda c, q, k, v, kc, lse, i: custom_ops.selected_attention_gated(
            q, k, v, i, q[..., :4], q[..., :4], q[..., :2], c), "gates"),
        (lambda c, q, k, v, kc, lse, i: custom_ops.selected_attention_gated(
            q, k, v, i, q[..., :4], q[..., :4], q[..., :3].int(), c), "gates"),
    ],
)
def test_invalid_inputs_name_the_argument(case, name):
    with pytest.raises(ValueError, match=rf"\b{name}\b"):
        case(*_valid_args())


@cpu_path_only
def test_select_impl_from_environment(monkeypatch):
    from flexnsa.custom_ops.select_kernel import _head_dim_split, select_impl

    monkeypatch.delenv("FLEXNSA_SELECT_IMPL", raising=False)
    assert select_impl() == "split"
    monkeypatch.setenv("FLEXNSA_SELECT_IMPL", "V1")
    assert select_impl() == "v1"
    monkeypatch.setenv("FLEXNSA_SELECT_IMPL", "v3")
    with pytest.raises(ValueError, match="FLEXNSA_SELECT_IMPL"):
        select_impl()
    split = {Dk: _head_dim_split(Dk) for Dk in (8, 16, 24, 40, 64, 96, 128, 192, 256)}
    assert split == {8: (16, 0), 16: (16, 0), 24: (16, 16), 40: (32, 16), 64: (64, 0), 96: (64, 32),
                     128: (128, 0), 192: (128, 64), 256: (256, 0)}  # fmt: skip


# ---- Triton kernels under the interpreter (subprocess) ----------------------------------------
@cpu_path_only
@pytest.mark.slow
def test_triton_kernels_in_subprocess():
    env = dict(os.environ, TRITON_INTERPRET="1", HYPOTHESIS_PROFILE=os.environ.get("HYPOTHESIS_PROFILE", "ci"))
    cmd = [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", __file__, "-k", "interp"]
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900, cwd=root)
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-3000:]
    assert " passed" in proc.stdout and " skipped" not in proc.stdout.splitlines()[-1], proc.stdout[-2000:]


@interp_only
@given(configs(max_block=16), GROUPS, st.integers(1, 2), st.integers(1, 2), st.integers(1, 90),
       st.sampled_from([8, 24]), LOW_DTYPES, st.sampled_from([None, None, "zero_q", "periodic"]),
       st.integers(0, 2**31 - 1))  # fmt: skip
def test_interp_select_kernel_matches_reference(cfg, G, B, HKV, T, Dk, dtype, ties, seed):
    q, _, _, k_cmp, lse = make_problem(cfg, B, HKV, G, T, Dk, 4, dtype, seed, ties=ties)
    idx = custom_ops.select_blocks(q, k_cmp, lse, cfg)
    assert idx.dtype == torch.int32 and idx.shape == (B, HKV, T, cfg.num_selected)
    assert_selection_agrees(idx, reference.select_blocks(q, k_cmp, cfg, lse=lse), q, k_cmp, cfg)


@interp_only
@pytest.mark.parametrize("impl", ["v1", "v2"])
def test_interp_select_kernel_paper_blocks_many_candidates(impl, monkeypatch):
    """Paper ratios (l = 2d, l' = 4d) with more blocks than one chunk of the kernel holds (15) and
    than n, so the running top-n merge runs across chunks; both kernels (``FLEXNSA_SELECT_IMPL``)."""
    monkeypatch.setenv("FLEXNSA_SELECT_IMPL", impl)
    cfg = flexnsa.NSAConfig(cmp_block=4, cmp_stride=2, slc_block=8, num_selected=5, num_init_blocks=1, num_local_blocks=2)
    for dtype, ties in ((torch.bfloat16, None), (torch.float32, "zero_q")):
        q, _, _, k_cmp, lse = make_problem(cfg, 1, 1, 16, 301, 16, 4, dtype, seed=5, ties=ties)
        idx = custom_ops.select_blocks(q, k_cmp, lse, cfg)
        assert_selection_agrees(idx, reference.select_blocks(q, k_cmp, cfg, lse=lse), q, k_cmp, cfg)


@interp_only
@pytest.mark.parametrize(
    "tuning, G, Dk, ties, impl",
    [({"BLOCK_C": 128}, 16, 40, None, "v2"), ({"BLOCK_T": 256, "BLOCK_C": 32}, 16, 24, "periodic", "v2"),
     ({"BLOCK_T": 32}, 3, 8, "zero_q", "v2"), ({"TRANS": True}, 4, 24, None, "v2"),
     ({"PREFETCH": False}, 16, 40, None, "split"), ({"PREFETCH": False, "BLOCK_C": 32}, 3, 24, "periodic", "v2"),
     ({"BANDED": False}, 16, 40, "periodic", "split")],
)  # fmt: skip
def test_interp_select_v2_tiles(tuning, G, Dk, ties, impl, monkeypatch):
    """v2 with other tiles: wider chunks (31 blocks), query heads in two dots (q tile too large to
    keep), a head dim split 32 + 16, several query tiles, the transposed product (``TRANS``), keys
    loaded in their own iteration (``PREFETCH`` off, also on the split path), block scores by the
    float32 product instead of band sums (``BANDED`` off); exact ties and many chunks."""
    from flexnsa.custom_ops import kernel_utils

    monkeypatch.setenv("FLEXNSA_SELECT_IMPL", impl)
    monkeypatch.setitem(kernel_utils.TUNING, "select_v2", tuning)
    cfg = flexnsa.NSAConfig(cmp_block=4, cmp_stride=2, slc_block=8, num_selected=6, num_init_blocks=1, num_local_blocks=2)
    q, _, _, k_cmp, lse = make_problem(cfg, 1, 2, G, 333, Dk, 4, torch.bfloat16, seed=G + Dk, ties=ties)
    idx = custom_ops.select_blocks(q, k_cmp, lse, cfg)
    assert_selection_agrees(idx, reference.select_blocks(q, k_cmp, cfg, lse=lse), q, k_cmp, cfg)




@interp_only
@pytest.mark.parametrize("cmp_block, cmp_stride, slc_block", [(2, 2, 8), (8, 2, 8), (4, 2, 4), (4, 2, 6)])
def test_interp_select_banded_block_scores(cmp_block, cmp_stride, slc_block, monkeypatch):
    """Block scores as band sums of the chunk's columns (``BANDED``, the default) for R = l'/d = 4 with
    M = l/d = 1 and 4 (a block's tokens in one group of R, or spilling into the next), R = 2; R = 3
    falls back to the product. Against the float64 selection, tie-aware."""
    from flexnsa.custom_ops import select_kernel

    r, m = slc_block // cmp_stride, cmp_block // cmp_stride
    assert select_kernel._banded(r, m, 64) == (r in (2, 4))
    monkeypatch.setenv("FLEXNSA_SELECT_IMPL", "split")
    cfg = flexnsa.NSAConfig(cmp_block=cmp_block, cmp_stride=cmp_stride, slc_block=slc_block, num_selected=5)
    q, _, _, k_cmp, lse = make_problem(cfg, 1, 2, 16, 301, 16, 4, torch.bfloat16, seed=cmp_block + slc_block)
    idx = custom_ops.select_blocks(q, k_cmp, lse, cfg)
    assert_selection_agrees(idx, reference.select_blocks(q, k_cmp, cfg, lse=lse), q, k_cmp, cfg)


@interp_only
@settings(max_examples=15)
@given(GROUPS, st.integers(1, 37).map(lambda t: 2 * t - 1), st.sampled_from([(16, 8), (24, 16), (8, 20)]),
       st.sampled_from([4, 8, 12]), st.integers(1, 4), LOW_DTYPES, st.booleans(), st.booleans(),
       st.one_of(st.none(), st.integers(1, 40)), st.sampled_from([1, 2, 4, 8]), st.integers(0, 2**31 - 1))  # fmt: skip
def test_interp_selected_attention_matches_reference(G, T, dims, block, n, dtype, atomic, ds_buffer, chunk, dq_qt,
                                                     seed):  # fmt: skip
    """Forward (o, lse) and backward (dq, dk, dv), deterministic or atomic dK/dV, dq from the stored
    dS (``dq_qt`` queries per program) or by the direct kernels, dK/dV work items of the default or
    a drawn size, odd T, any indices."""
    from flexnsa.custom_ops import kernel_utils

    Dk, Dv = dims
    cfg = flexnsa.NSAConfig(block, block, block, n, 0, 0)
    q, k, v, _, _ = make_problem(cfg, 1, 1, G, T, Dk, Dv, dtype, seed)
    idx = random_indices(1, 1, T, n, cfg.num_blocks(T), seed)
    env = {"FLEXNSA_DKV_ATOMIC": "1"} if atomic else {}
    with pytest.MonkeyPatch.context() as mp:  # hypothesis: no function-scoped monkeypatch fixture
        for key, value in env.items():
            mp.setenv(key, value)
        mp.setitem(kernel_utils.TUNING, "selected_dq", {"DS_BUFFER": ds_buffer})
        mp.setitem(kernel_utils.TUNING, "selected_dkv", {} if chunk is None else {"CHUNK": chunk})
        mp.setitem(kernel_utils.TUNING, "selected_dq_ds", {"QT": dq_qt})
        check_attention(q, k, v, idx, cfg, seed)


@interp_only
def test_interp_pipeline_select_then_attend():
    """The real pipeline on kernels: lse -> select kernel -> selected attention, B=2, HKV=2, G=3."""
    cfg = flexnsa.NSAConfig(cmp_block=4, cmp_stride=2, slc_block=4, num_selected=3, num_init_blocks=1, num_local_blocks=1)
    q, k, v, k_cmp, lse = make_problem(cfg, 2, 2, 3, 27, 16, 8, torch.float32, seed=9)
    idx = custom_ops.select_blocks(q, k_cmp, lse, cfg)
    assert_selection_agrees(idx, reference.select_blocks(q, k_cmp, cfg, lse=lse), q, k_cmp, cfg)
    check_attention(q, k, v, idx, cfg)


@interp_only
@pytest.mark.parametrize("atomic", [False, True])
def test_interp_dkv_work_items_split_long_lists(atomic, monkeypatch):
    """Work items of 3 queries: blocks chosen by many queries (block 0, the local ones) are split
    into several items whose partials are reduced (or added atomically); smaller select tiles."""
    from flexnsa.custom_ops import kernel_utils

    monkeypatch.setitem(kernel_utils.TUNING, "selected_dkv", {"CHUNK": 3})
    monkeypatch.setitem(kernel_utils.TUNING, "select", {"BLOCK_T": 16, "BLOCK_C": 128})
    if atomic:
        monkeypatch.setenv("FLEXNSA_DKV_ATOMIC", "1")
    cfg = flexnsa.NSAConfig(cmp_block=4, cmp_stride=2, slc_block=8, num_selected=3, num_init_blocks=1, num_local_blocks=1)
    q, k, v, k_cmp, lse = make_problem(cfg, 1, 1, 4, 45, 16, 8, torch.bfloat16, seed=4)
    idx = custom_ops.select_blocks(q, k_cmp, lse, cfg)
    assert_selection_agrees(idx, reference.select_blocks(q, k_cmp, cfg, lse=lse), q, k_cmp, cfg)
    check_attention(q, k, v, idx, cfg)



def indices_with_keyless_rows(B, HKV, T, n, num_blocks, seed, dtype=torch.int32):
    """:func:`random_indices` plus queries that see no key: query ``T // 2`` of every group has only
    ``-1`` slots and, with two blocks or more, query 0 of the last group selects only the last block
    (all of its tokens after the query)."""
    idx = random_indices(B, HKV, T, n, num_blocks, seed)
    idx[:, :, T // 2] = -1
    if num_blocks > 1:
        idx[0, -1, 0] = -1
        idx[0, -1, 0, -1] = num_blocks - 1
    return idx.to(dtype)


def assert_keyless_rows_zero(o, lse, dq, idx, block):
    """Queries without a visible key (every slot ``-1`` or after the query): exactly ``o = 0``,
    ``lse = -inf`` and ``dq = 0``."""
    t = torch.arange(idx.shape[2])[:, None]  # [T, 1]
    visible = ((idx >= 0) & (idx.long() * block <= t)).any(-1)  # [B, HKV, T]: a block starting at or before t
    keyless = ~visible.repeat_interleave(o.shape[1] // idx.shape[1], dim=1)  # [B, HQ, T]
    assert keyless.any()
    assert (o[keyless] == 0).all() and (lse[keyless] == -math.inf).all() and (dq[keyless] == 0).all()


EDGE_CASES = [  # G, T, (Dk, Dv), l', n, dtype, query rows per step, index dtype
    (3, 13, (16, 8), 4, 3, torch.float32, 32, torch.int64),  # keyless rows, int64 indices, padded heads
    (2, 5, (16, 8), 8, 2, torch.bfloat16, 64, torch.int32),  # T shorter than one block (NB = 1)
    (5, 11, (24, 40), 4, 3, torch.float16, 64, torch.int64),  # Dk, Dv not powers of two, G = 5
    (16, 19, (16, 16), 8, 2, torch.bfloat16, 128, torch.int32),  # G = 16 with 128 rows per step (8 queries)
]


@interp_only
@pytest.mark.parametrize("ds_buffer, dq_qt", [(True, 1), (True, 4), (False, 1)])
@pytest.mark.parametrize("G, T, dims, block, n, dtype, rows, idx_dtype", EDGE_CASES)
def test_interp_edge_cases(G, T, dims, block, n, dtype, rows, idx_dtype, ds_buffer, dq_qt, monkeypatch):
    """The default kernels on the edge cases above (two KV groups; dK/dV work items of 2 queries,
    ``rows`` query rows per dK/dV step; atomic dK/dV for the bfloat16 cases; dq from the stored dS or
    by the direct kernels; from dS one query or 4 per program), run under ``torch.use_deterministic_algorithms(True)`` (which fills
    ``torch.empty`` with NaN, so a read of an unwritten partial or dS row shows): against the reference, and keyless queries get exactly ``o = 0``,
    ``lse = -inf``, ``dq = 0``."""
    from flexnsa.custom_ops import kernel_utils

    Dk, Dv = dims
    if dtype == torch.bfloat16:
        monkeypatch.setenv("FLEXNSA_DKV_ATOMIC", "1")
    cfg = flexnsa.NSAConfig(block, block, block, n, 0, 0)
    q, k, v, _, _ = make_problem(cfg, 1, 2, G, T, Dk, Dv, dtype, seed=T + 1)
    idx = indices_with_keyless_rows(1, 2, T, n, cfg.num_blocks(T), seed=G + 1, dtype=idx_dtype)
    monkeypatch.setitem(kernel_utils.TUNING, "selected_dkv", {"CHUNK": 2, "ROWS": rows})
    monkeypatch.setitem(kernel_utils.TUNING, "selected_dq", {"DS_BUFFER": ds_buffer})
    monkeypatch.setitem(kernel_utils.TUNING, "selected_dq_ds", {"QT": dq_qt})
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(dtype != torch.bfloat16)
    try:
        o, lse, grads = check_attention(q, k, v, idx, cfg, seed=G)
    finally:
        torch.use_deterministic_algorithms(previous)
    assert_keyless_rows_zero(o, lse, grads[0], idx, block)


TILE_CASES = [  # G, T, (Dk, Dv), l', n, dtype, QT, indices ("select": the kernel's selection; "random")
    (1, 45, (16, 16), 8, 4, torch.float32, 4, "select"),  # G = 1, T not a multiple of l'
    (3, 37, (24, 40), 8, 3, torch.float16, 8, "random"),  # G = 3, dims not powers of two, random slots
    (16, 29, (16, 16), 8, 3, torch.bfloat16, 2, "select"),  # G = 16
    (2, 5, (16, 8), 8, 3, torch.float32, 4, "select"),  # T shorter than one block
    (3, 13, (16, 8), 4, 3, torch.float32, 4, "keyless"),  # keyless rows, int64 indices
]


def tile_union_sizes(idx, qt):
    """Distinct valid blocks per tile of ``qt`` consecutive queries: ``[B, HKV, cdiv(T, qt)]``."""
    B, HKV, T, n = idx.shape
    pad = -T % qt
    tiles = torch.nn.functional.pad(idx.long(), (0, 0, 0, pad), value=-1).reshape(B, HKV, -1, qt * n)
    return torch.tensor([[[len(set(row.tolist()) - {-1}) for row in g] for g in b] for b in tiles])


@interp_only
@pytest.mark.parametrize("G, T, dims, block, n, dtype, qt, kind", TILE_CASES)
def test_interp_query_tile_kernels(G, T, dims, block, n, dtype, qt, kind, monkeypatch):
    """Forward and dq over tiles of QT queries (``TUNING[...]["QT"]``: each distinct block of the
    tile's selections loaded once; tiles with more than ``MAX_UNION`` distinct blocks left to the
    one-query kernels): against the reference, forward and backward; float32 equal to the one-query
    kernels up to rounding; keyless rows exactly zero."""
    from flexnsa.custom_ops import kernel_utils

    Dk, Dv = dims
    cfg = flexnsa.NSAConfig(block, block, block, n, 1, 2)
    q, k, v, k_cmp, lse = make_problem(cfg, 1, 2, G, T, Dk, Dv, dtype, seed=T + G)
    if kind == "select":
        idx = custom_ops.select_blocks(q, k_cmp, lse, cfg)
    elif kind == "random":
        idx = random_indices(1, 2, T, n, cfg.num_blocks(T), seed=G)
    else:
        idx = indices_with_keyless_rows(1, 2, T, n, cfg.num_blocks(T), seed=G, dtype=torch.int64)
    monkeypatch.setitem(kernel_utils.TUNING, "selected_fwd", {"QT": 1})
    monkeypatch.setitem(kernel_utils.TUNING, "selected_dq", {"QT": 1})
    o_one, lse_one, grads_one = check_attention(q, k, v, idx, cfg, seed=G)
    # MAX_UNION: every tile by the union kernels, none (all by the one-query kernels), or a mix
    sizes = tile_union_sizes(idx, qt)
    mixed = int(sizes.min())  # the smallest tiles by the union kernels, the others not
    assert cfg.num_blocks(T) == 1 or (sizes > mixed).any(), sizes  # several blocks: a mix of both kinds
    for max_union in (qt * n, 0, mixed):
        monkeypatch.setitem(kernel_utils.TUNING, "selected_fwd", {"QT": qt, "MAX_UNION": max_union})
        monkeypatch.setitem(kernel_utils.TUNING, "selected_dq", {"QT": qt, "MAX_UNION": max_union})
        o, lse_t, grads = check_attention(q, k, v, idx, cfg, seed=G)
        torch.testing.assert_close(lse_t, lse_one, rtol=1e-5, atol=1e-5)
        if dtype == torch.float32:
            torch.testing.assert_close(o, o_one, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(grads[0], grads_one[0], rtol=1e-5, atol=1e-5)
        if kind == "keyless":
            assert_keyless_rows_zero(o, lse_t, grads[0], idx, block)


def test_query_tile_options_are_checked(monkeypatch):
    from flexnsa.custom_ops import kernel_utils
    from flexnsa.custom_ops.selected_bwd import selected_bwd_launch
    from flexnsa.custom_ops.selected_fwd import selected_fwd_launch

    def no_launch(kernel):
        raise AssertionError(f"{kernel} launched")

    q, k, v = torch.zeros(1, 2, 8, 16), torch.zeros(1, 1, 8, 16), torch.zeros(1, 1, 8, 16)
    idx = torch.zeros(1, 1, 8, 2, dtype=torch.int32)
    monkeypatch.setitem(kernel_utils.TUNING, "selected_fwd", {"QT": 3})
    with pytest.raises(ValueError, match="QT"):
        selected_fwd_launch(no_launch, q, k, v, idx, 8, 0.25)
    monkeypatch.setitem(kernel_utils.TUNING, "selected_dq", {"QT": 0})
    with pytest.raises(ValueError, match="QT"):
        selected_bwd_launch(no_launch, q, q, k, v, q, torch.zeros(1, 2, 8), idx, 8, 0.25, atomic=False)
    # union tiles: rows per query fewer than the G = 2 heads, not a power of two, or under 16 per tile
    for rows, qt in ((1, 16), (3, 8), (4, 2)):
        monkeypatch.setitem(kernel_utils.TUNING, "selected_fwd", {"QT": qt, "union_rows": rows})
        with pytest.raises(ValueError, match="union_rows"):
            selected_fwd_launch(no_launch, q, k, v, idx, 8, 0.25)
        monkeypatch.setitem(kernel_utils.TUNING, "selected_dq", {"QT": qt, "union_rows": rows})
        with pytest.raises(ValueError, match="union_rows"):
            selected_bwd_launch(no_launch, q, q, k, v, q, torch.zeros(1, 2, 8), idx, 8, 0.25, atomic=False)


def test_union_tile_rows_and_threshold():
    """Rows per query in a union tile and the union threshold (QT = 4, n = 16): G <= 4 packs a tile into
    the 16 rows of one query's padded tile, so every tile takes the union kernel (threshold QT * n);
    taller tiles use 36 of 64."""
    from flexnsa.custom_ops.query_tiles import union_head_rows, union_threshold

    assert [union_head_rows(G, 4) for G in (1, 2, 3, 4, 5, 8, 16)] == [4, 4, 4, 4, 8, 8, 16]
    assert [union_head_rows(G, qt) for G, qt in ((1, 1), (1, 16), (3, 8))] == [16, 1, 4]
    assert [union_threshold(4, 16, G) for G in (1, 3, 4, 8, 16)] == [64, 64, 64, 36, 36]
    assert union_threshold(2, 16, 4) == 32  # 2 queries x 8 rows (4 heads padded): 16 rows, every tile


def test_tuning_options_reach_the_kernels(monkeypatch):
    """``TUNING`` options arrive as launch arguments (recorded, nothing runs)."""
    from flexnsa.custom_ops import kernel_utils
    from flexnsa.custom_ops.selected_bwd import selected_bwd_launch
    from flexnsa.custom_ops.selected_fwd import selected_fwd_launch

    launches = {}

    class RecordingLaunch:  # launch(kernel)[grid](*args, **kwargs): keeps the keywords and the grid
        def __init__(self, kernel):
            self.name = kernel.fn.__name__

        def __getitem__(self, grid):
            return lambda *args, **kwargs: launches.__setitem__(self.name, dict(kwargs, grid=grid))

    B, HKV, G, T, n = 1, 2, 16, 24, 3
    q, k, v = torch.zeros(B, HKV * G, T, 16), torch.zeros(B, HKV, T, 16), torch.zeros(B, HKV, T, 8)
    o, lse = torch.zeros(B, HKV * G, T, 8), torch.zeros(B, HKV * G, T)
    idx = torch.zeros(B, HKV, T, n, dtype=torch.int32)
    monkeypatch.setitem(kernel_utils.TUNING, "selected_fwd", {"num_warps": 8, "num_stages": 3})
    selected_fwd_launch(RecordingLaunch, q, k, v, idx, 8, 0.25)
    fwd = launches.pop("_selected_fwd_kernel")
    assert (fwd["num_warps"], fwd["num_stages"], fwd["TILE"], fwd["grid"]) == (8, 3, 4, (T, B * HKV))
    union = launches.pop("_selected_fwd_union_kernel")  # default QT = 4: the union kernel runs first
    assert (union["QT"], union["MAX_UNION"], union["grid"]) == (4, 6, (T // 4, B * HKV))  # 9/16 of 4 x 3
    monkeypatch.setitem(kernel_utils.TUNING, "selected_dq", {"num_warps": 2, "QT": 2, "MAX_UNION": 5})
    monkeypatch.setitem(kernel_utils.TUNING, "selected_dkv", {"ROWS": 32, "CHUNK": 4, "num_warps": 8})
    selected_bwd_launch(RecordingLaunch, o, q, k, v, o, lse, idx, 8, 0.25, atomic=False)
    dkv = launches["_dkv_kernel"]
    assert (dkv["QB"], dkv["num_warps"], dkv["grid"]) == (2, 8, (B * HKV * 3 + B * HKV * T * n // 4,))
    assert (launches["_dq_kernel"]["num_warps"], launches["_dq_kernel"]["TILE"]) == (2, 2)
    assert (launches["_dq_union_kernel"]["QT"], launches["_dq_union_kernel"]["MAX_UNION"]) == (2, 5)
    assert set(launches) == {"_dq_union_kernel", "_dq_kernel", "_dkv_kernel", "_dkv_reduce_kernel"}
    # no tile keys: dq from the dK/dV kernel's dS (delta first, dq last)
    monkeypatch.setitem(kernel_utils.TUNING, "selected_dq", {})
    monkeypatch.setitem(kernel_utils.TUNING, "selected_dq_ds", {"num_warps": 2, "num_stages": 4})
    launches.clear()
    selected_bwd_launch(RecordingLaunch, o, q, k, v, o, lse, idx, 8, 0.25, atomic=False)
    assert set(launches) == {"_delta_kernel", "_dkv_kernel", "_dq_ds_kernel", "_dkv_reduce_kernel"}
    assert launches["_dkv_kernel"]["STORE_DS"] and launches["_dq_ds_kernel"]["grid"] == (T, B * HKV)
    launches.clear()  # a given delta (the gated op's combine backward computed it): no delta kernel
    selected_bwd_launch(RecordingLaunch, o, q, k, v, o, lse, idx, 8, 0.25, atomic=False, delta=lse)
    assert set(launches) == {"_dkv_kernel", "_dq_ds_kernel", "_dkv_reduce_kernel"}
    dq_ds = launches["_dq_ds_kernel"]
    assert (dq_ds["num_warps"], dq_ds["num_stages"], dq_ds["DS_ROWS"], dq_ds["G_PAD"]) == (2, 4, 16, 16)
    # G = 4: 4-query union tiles by default (16 rows, as one query's padded tile)
    monkeypatch.setitem(kernel_utils.TUNING, "selected_dq_ds", {})
    launches.clear()
    q4, o4, lse4 = q[:, : HKV * 4], o[:, : HKV * 4], lse[:, : HKV * 4]
    selected_bwd_launch(RecordingLaunch, o4, q4, k, v, o4, lse4, idx, 8, 0.25, atomic=False)
    union = launches["_dq_ds_union_kernel"]
    assert (union["QT"], union["G_ROWS"], union["grid"]) == (4, 4, (T // 4, B * HKV)) and "_dq_ds_kernel" not in launches
    # one-query kernel only; a union-tile option does not leak into its launch
    monkeypatch.setitem(kernel_utils.TUNING, "selected_fwd", {"QT": 1, "union_rows": 16})
    launches.clear()
    selected_fwd_launch(RecordingLaunch, q, k, v, idx, 8, 0.25)
    assert set(launches) == {"_selected_fwd_kernel"} and launches["_selected_fwd_kernel"]["TILE"] == 0
    assert "union_rows" not in launches["_selected_fwd_kernel"]


def test_ds_buffer_choice():
    """dq from the stored dS while the buffer fits ``DS_BUFFER_MAX_BYTES`` and no query-tile key (an
    option of the direct dq kernels) is set; ``DS_BUFFER`` forces either way; bad values raise."""
    from flexnsa.custom_ops.selected_bwd import DS_BUFFER_MAX_BYTES, use_ds_buffer

    assert use_ds_buffer({}, DS_BUFFER_MAX_BYTES) and not use_ds_buffer({}, DS_BUFFER_MAX_BYTES + 1)
    assert not use_ds_buffer({"QT": 4}, 1) and not use_ds_buffer({"MAX_UNION": 3}, 1)
    assert use_ds_buffer({"DS_BUFFER": True, "QT": 4}, 2 * DS_BUFFER_MAX_BYTES)
    assert not use_ds_buffer({"DS_BUFFER": False}, 1)
    options = {"DS_BUFFER": None, "num_warps": 4}
    assert use_ds_buffer(options, 1) and options == {"num_warps": 4}  # the key is consumed
    with pytest.raises(ValueError, match="DS_BUFFER"):
        use_ds_buffer({"DS_BUFFER": 1}, 1)


def test_dkv_work_item_size():
    """Work items of 256-1024 queries, a power of two, ~2048 items per call where that range allows."""
    from flexnsa.custom_ops.selected_bwd import dkv_chunk

    assert [dkv_chunk(4 * T * 16) for T in (1, 1000, 8192, 16384, 32768, 65536, 1 << 20)] == [
        256, 256, 256, 512, 1024, 1024, 1024]


def _separate_ops(q, k, v, idx, o_cmp, o_win, gates, cfg):
    """The unfused path: ``selected_attention`` then ``gated_combine``."""
    o, lse = custom_ops.selected_attention(q, k, v, idx, cfg)
    return custom_ops.gated_combine(o_cmp, o, o_win, gates), o, lse


def _separate_reference(q, k, v, idx, o_cmp, o_win, gates, cfg):
    """The float64 truth: the reference's selected attention and gated sum."""
    o, lse = reference.selected_attention(q, k, v, idx, cfg)
    return reference.combine_branches(o_cmp, o, o_win, gates), o, lse


def check_gated_against_combine(q, k, v, idx, cfg, seed=0, use="y", separate=_separate_ops):
    """``selected_attention_gated`` against ``separate`` (default: ``selected_attention`` then
    ``gated_combine``): the gated sum, the selected output and its lse, and the gradients of q, k, v,
    o_cmp, o_win and gates (the backward is the same two kernels, so they agree to rounding; the
    forward's sum is the same float32 arithmetic on the stored selected output). ``use``: what the
    loss reads, ``"y"``, ``"y+o"`` (the selected output as well: its gradient then reaches the op too)
    or ``"o"`` (the gated sum unused: no gradient for o_cmp, o_win, gates).

    One difference is by design: with ``use="y"`` the fused op takes the selected backward's
    ``delta = rowsum(o * d o)`` from the combine backward, in float32 before ``d o = g_slc * dy`` is
    rounded to q's dtype, where the separate ops sum the rounded ``d o``. In half precision dq, dk
    and dv are then checked against the same computation in float64 instead: the fused error within
    2x the separate ops' error (plus a rounding step of the dtype)."""
    gen = torch.Generator().manual_seed(seed)
    B, HQ, T, _ = q.shape
    Dv = v.shape[-1]
    rnd = lambda *shape: torch.randn(*shape, generator=gen, dtype=torch.float64).to(q.device, q.dtype)  # noqa: E731
    o_cmp, o_win, grad = rnd(B, HQ, T, Dv), rnd(B, HQ, T, Dv), rnd(B, HQ, T, Dv)
    gates = torch.rand(B, HQ, T, 3, generator=gen).to(q.device)  # float32 gates with low-precision q
    results = []
    for fused in (True, False):
        leaves = [x.detach().clone().requires_grad_() for x in (q, k, v, o_cmp, o_win, gates)]
        qq, kk, vv, oc, ow, gg = leaves
        if fused:
            y, o, lse = custom_ops.selected_attention_gated(qq, kk, vv, idx, oc, ow, gg, cfg)
        else:
            y, o, lse = separate(qq, kk, vv, idx, oc, ow, gg, cfg)
        outputs, grads = {"y": ((y,), (grad,)), "y+o": ((y, o), (grad, grad.flip(2))), "o": ((o,), (grad,))}[use]
        results.append((y, o, lse, *torch.autograd.grad(outputs, leaves, grads, allow_unused=True)))
    if q.dtype == torch.float64:
        tol = dict(rtol=1e-9, atol=1e-11)
    else:
        tol = dict(rtol=1e-5, atol=1e-5) if q.dtype == torch.float32 else dict(rtol=1e-2, atol=1e-2)
    names = ("y", "o", "lse", "dq", "dk", "dv", "d_cmp", "d_win", "d_gates")
    half = q.dtype in (torch.float16, torch.bfloat16)
    if half:  # the float64 run of the separate ops: the truth for dq, dk, dv (docstring)
        leaves = [x.detach().double().requires_grad_() for x in (q, k, v, o_cmp, o_win, gates)]
        y, o, _ = separate(*leaves[:3], idx, *leaves[3:], cfg)
        outputs, grads64 = {"y": ((y,), (grad,)), "y+o": ((y, o), (grad, grad.flip(2))), "o": ((o,), (grad,))}[use]
        exact = torch.autograd.grad(outputs, leaves[:3], [g.double() for g in grads64], allow_unused=True)
    for i, (name, got, want) in enumerate(zip(names, *results)):
        if want is None:  # unused input (use="o"): no gradient on either path
            assert got is None, name
            continue
        if half and name in ("dq", "dk", "dv"):
            true = exact[i - 3]
            fused_err, separate_err = (got.double() - true).abs().max(), (want.double() - true).abs().max()
            step = torch.finfo(q.dtype).eps * true.abs().max()
            assert fused_err <= 2 * separate_err + step, f"{name}: fused {fused_err:.3g}, separate {separate_err:.3g}"
            continue
        torch.testing.assert_close(got, want, **tol, msg=lambda m, name=name: f"{name}: {m}")


@cpu_path_only
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_gated_cpu_path_matches_selected_then_combine(dtype):
    cfg = flexnsa.NSAConfig(8, 4, 8, 3, 1, 1)
    q, k, v, k_cmp, lse = make_problem(cfg, 2, 2, 3, 37, 8, 6, dtype, seed=3)
    idx = custom_ops.select_blocks(q, k_cmp, lse, cfg)
    for use in ("y", "y+o", "o"):
        check_gated_against_combine(q, k, v, idx, cfg, use=use)


@cpu_path_only
@given(GROUPS, st.integers(1, 2), st.integers(1, 45), st.sampled_from([(8, 4), (4, 12)]),
       st.sampled_from([3, 8, 16]), st.integers(1, 4), st.sampled_from(["y", "y+o", "o"]),
       st.integers(0, 2**31 - 1))  # fmt: skip
def test_gated_cpu_path_matches_reference(G, B, T, dims, block, n, use, seed):
    """float64 CPU path of ``selected_attention_gated`` against the reference's selected attention
    and gated sum: the three outputs and the gradients of all six inputs (T shorter than a block,
    not a multiple of one, G from 1 to 16)."""
    Dk, Dv = dims
    cfg = flexnsa.NSAConfig(block, block, block, n, 0, 0)
    q, k, v, _, _ = make_problem(cfg, B, 1, G, T, Dk, Dv, torch.float64, seed)
    idx = random_indices(B, 1, T, n, cfg.num_blocks(T), seed)
    check_gated_against_combine(q, k, v, idx, cfg, seed=seed, use=use, separate=_separate_reference)


@cpu_path_only
@pytest.mark.slow
def test_gated_opcheck_and_compile():
    cfg, q, k, v, _, _, idx = small_problem()
    o_cmp, o_win = torch.randn(1, 4, 29, 6), torch.randn(1, 4, 29, 6)
    gates = torch.rand(1, 4, 29, 3)
    leaves = [x.requires_grad_() for x in (q, k, v, o_cmp, o_win, gates)]
    q, k, v, o_cmp, o_win, gates = leaves
    torch.library.opcheck(torch.ops.flexnsa.selected_attention_gated.default, (q, k, v, idx, o_cmp, o_win, gates, 8, 0.35))

    def branch(*xs):
        return custom_ops.selected_attention_gated(*xs[:3], idx, *xs[3:], cfg)[0]

    compiled = torch.compile(branch, fullgraph=True)
    got, want = compiled(*leaves), branch(*leaves)
    torch.testing.assert_close(got, want)
    for a, b in zip(torch.autograd.grad(got.square().sum(), leaves), torch.autograd.grad(want.square().sum(), leaves)):
        torch.testing.assert_close(a, b)


@interp_only
@settings(max_examples=6)
@given(st.sampled_from([1, 3, 16]), st.integers(1, 2), st.integers(1, 40), st.sampled_from([(16, 16), (24, 40)]),
       LOW_DTYPES, st.sampled_from([(1, 0), (2, 64), (4, 5)]), st.integers(0, 2**31 - 1))  # fmt: skip
def test_interp_gated_epilogue_properties(G, B, T, dims, dtype, tiles, seed):
    """The epilogue's gated sum against the separate pass on drawn shapes: G 1/3/16, batch 1-2, T from
    1 (shorter than a block) to 40 (not a multiple of one), query tiles by the one-query kernel, the
    union kernel or a mix; the selected output also in the loss."""
    from flexnsa.custom_ops import kernel_utils

    qt, max_union = tiles
    cfg = flexnsa.NSAConfig(8, 4, 8, 3, 1, 1)
    q, k, v, _, _ = make_problem(cfg, B, 2, G, T, *dims, dtype, seed=seed)
    kernel_utils.TUNING["selected_fwd"] = {"QT": qt, "MAX_UNION": max_union}
    try:
        check_gated_against_combine(q, k, v, random_indices(B, 2, T, 3, cfg.num_blocks(T), seed=seed), cfg,
                                    seed=seed, use="y+o")  # fmt: skip
    finally:
        kernel_utils.TUNING.pop("selected_fwd", None)


@interp_only
@pytest.mark.parametrize("G, dims, dtype, qt, max_union", [(16, (32, 32), torch.bfloat16, 4, 5), (3, (24, 40), torch.float32, 2, 64),
                                                           (4, (16, 16), torch.float16, 1, 0)])  # fmt: skip
def test_interp_gated_epilogue_matches_combine(G, dims, dtype, qt, max_union, monkeypatch):
    """The gated sum in the selected kernels' epilogue (union tiles, one-query tiles and a mix of
    both) against the separate combine pass, forward and every gradient."""
    from flexnsa.custom_ops import kernel_utils

    cfg = flexnsa.NSAConfig(8, 4, 8, 3, 1, 1)
    q, k, v, k_cmp, lse = make_problem(cfg, 1, 2, G, 45, *dims, dtype, seed=G)
    idx = custom_ops.select_blocks(q, k_cmp, lse, cfg)
    monkeypatch.setitem(kernel_utils.TUNING, "selected_fwd", {"QT": qt, "MAX_UNION": max_union})
    check_gated_against_combine(q, k, v, idx, cfg, seed=G)
    check_gated_against_combine(q, k, v, random_indices(1, 2, 45, 3, cfg.num_blocks(45), seed=G), cfg, seed=G + 1,
                                use="y+o")
    check_gated_against_combine(q, k, v, idx, cfg, seed=G + 2, use="o")


# ---- CUDA --------------------------------------------------------------------------------------
@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize(
    "G, dims, dtype, atomic",
    [(1, (64, 64), torch.bfloat16, False), (4, (128, 128), torch.float16, True),
     (16, (192, 128), torch.bfloat16, True), (3, (32, 48), torch.float32, False)],
)  # fmt: skip
def test_gpu_kernels_match_reference(G, dims, dtype, atomic, monkeypatch):
    if atomic:
        monkeypatch.setenv("FLEXNSA_DKV_ATOMIC", "1")
    cfg = flexnsa.NSAConfig(cmp_block=16, cmp_stride=8, slc_block=32, num_selected=6)
    q, k, v, k_cmp, lse = make_problem(cfg, 1, 2, G, 333, *dims, dtype, seed=G, device="cuda")
    idx = custom_ops.select_blocks(q, k_cmp, lse, cfg)
    assert_selection_agrees(idx, reference.select_blocks(q.cpu(), k_cmp.cpu(), cfg, lse=lse.cpu()), q, k_cmp, cfg)
    check_attention(q, k, v, idx, cfg)
    check_attention(q, k, v, random_indices(1, 2, 333, 6, cfg.num_blocks(333), seed=1, device="cuda"), cfg)
    from flexnsa.custom_ops import kernel_utils

    for qt, max_union in ((2, 12), (4, 64), (8, 20)):  # query tiles: all by the union kernels, or mixed
        monkeypatch.setitem(kernel_utils.TUNING, "selected_fwd", {"QT": qt, "MAX_UNION": max_union})
        monkeypatch.setitem(kernel_utils.TUNING, "selected_dq", {"QT": qt, "MAX_UNION": max_union})
        check_attention(q, k, v, idx, cfg)
        check_attention(q, k, v, random_indices(1, 2, 333, 6, cfg.num_blocks(333), seed=2, device="cuda"), cfg)
    # dq from dS over 4-query union tiles, dK/dV work items of 100 queries
    monkeypatch.setitem(kernel_utils.TUNING, "selected_dq", {})
    monkeypatch.setitem(kernel_utils.TUNING, "selected_dq_ds", {"QT": 4})
    monkeypatch.setitem(kernel_utils.TUNING, "selected_dkv", {"CHUNK": 100})
    check_attention(q, k, v, idx, cfg)


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("G, dims, dtype", [(16, (128, 128), torch.bfloat16), (3, (32, 48), torch.float32)])
def test_gpu_gated_epilogue_matches_combine(G, dims, dtype, monkeypatch):
    """The gated sum written by the selected kernels (union and one-query tiles, and a mix) equals
    the separate combine pass on CUDA, forward and every gradient."""
    from flexnsa.custom_ops import kernel_utils

    cfg = flexnsa.NSAConfig(cmp_block=16, cmp_stride=8, slc_block=32, num_selected=6)
    q, k, v, k_cmp, lse = make_problem(cfg, 1, 2, G, 333, *dims, dtype, seed=G, device="cuda")
    idx = custom_ops.select_blocks(q, k_cmp, lse, cfg)
    for qt, max_union in ((4, 64), (4, 14), (1, 0)):
        monkeypatch.setitem(kernel_utils.TUNING, "selected_fwd", {"QT": qt, "MAX_UNION": max_union})
        check_gated_against_combine(q, k, v, idx, cfg)


@pytest.mark.gpu
@needs_cuda
def test_gpu_compile_fullgraph():
    cfg = flexnsa.NSAConfig(cmp_block=16, cmp_stride=8, slc_block=32, num_selected=4)
    q, k, v, k_cmp, _ = make_problem(cfg, 1, 2, 4, 200, 64, 64, torch.bfloat16, seed=0, device="cuda")

    def selection_branch(q, k, v, k_cmp):
        _, lse = reference.compressed_attention(q, k_cmp, torch.zeros_like(k_cmp[..., :1]), cfg)
        out, _ = custom_ops.selected_attention(q, k, v, custom_ops.select_blocks(q, k_cmp, lse, cfg), cfg)
        return out

    results = []
    for fn in (torch.compile(selection_branch, fullgraph=True), selection_branch):
        leaves = [x.detach().clone().requires_grad_() for x in (q, k, v)]
        out = fn(*leaves, k_cmp)
        results.append((out, *torch.autograd.grad(out.float().square().sum(), leaves)))
    for got, want in zip(*results):
        torch.testing.assert_close(got, want, rtol=2e-2, atol=2e-2)
