"""The "split" select path (``FLEXNSA_SELECT_IMPL=split``): v2's scores kernel storing each query
chunk's keys, then the top-n kernel (``custom_ops/select_kernel.py``).

- ``test_interp_*`` run the kernels under Triton's CPU interpreter; ``test_split_kernels_in_subprocess``
  re-runs them with ``TRITON_INTERPRET=1`` (as ``test_custom_ops.py`` does for its own). Directly:
  ``TRITON_INTERPRET=1 python -m pytest tests/test_select_split.py``.
- Split must select exactly v2's sets (the scores are v2's, bit for bit), and agree tie-aware with the
  float64 reference; query chunks and the streamed top-n (long rows) must not change the result.
- CUDA tests (marked ``gpu``) compare split with v2 on a short and a paper-shape problem.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys

import pytest
import torch
import triton
from hypothesis import given, settings
from hypothesis import strategies as st

import flexnsa
import flexnsa.custom_ops as custom_ops
from flexnsa import reference
from flexnsa.custom_ops import kernel_utils, select_kernel
from test_custom_ops import assert_selection_agrees, cpu_path_only, interp_only, make_problem, needs_cuda

PAPER_RATIOS = flexnsa.NSAConfig(
    cmp_block=4, cmp_stride=2, slc_block=8, num_selected=5, num_init_blocks=1, num_local_blocks=2
)


def select_with(impl, q, k_cmp, lse, cfg):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FLEXNSA_SELECT_IMPL", impl)
        return custom_ops.select_blocks(q, k_cmp, lse, cfg)


def as_sets(idx):
    """Each row's slots sorted (``-1`` first): equal tensors <=> equal sets."""
    return idx.detach().cpu().sort(-1).values


def check_split_against_v2(cfg, B, HKV, G, T, Dk, dtype, seed, ties=None):
    q, _, _, k_cmp, lse = make_problem(cfg, B, HKV, G, T, Dk, 4, dtype, seed, ties=ties)
    idx = select_with("split", q, k_cmp, lse, cfg)
    assert idx.dtype == torch.int32 and idx.shape == (B, HKV, T, cfg.num_selected)
    assert torch.equal(as_sets(idx), as_sets(select_with("v2", q, k_cmp, lse, cfg)))
    ref = reference.select_blocks(q.cpu(), k_cmp.cpu(), cfg, lse=lse.cpu())
    assert_selection_agrees(idx, ref, q, k_cmp, cfg)
    return idx


# ---- CPU path (no kernel runs) ------------------------------------------------------------------
@cpu_path_only
def test_split_impl_and_chunks(monkeypatch):
    monkeypatch.setenv("FLEXNSA_SELECT_IMPL", " Split ")
    assert select_kernel.select_impl() == "split"
    # 64k, paper shape (B=1, HKV=4, NB=1024, BLOCK_T=8): 16384 queries per chunk, 4 chunks of 256 MiB
    assert select_kernel._split_chunk(1, 4, 65536, 1024, 8) == 16384
    for B, HKV, T, NB, block_t in [
        (1, 4, 65536, 1024, 8),
        (2, 8, 300000, 4688, 32),
        (1, 1, 5, 1, 16),
        (64, 64, 10**6, 15625, 8),
    ]:
        tq = select_kernel._split_chunk(B, HKV, T, NB, block_t)
        assert tq % block_t == 0 and tq >= block_t and tq <= triton.cdiv(T, block_t) * block_t
        assert tq == block_t or B * HKV * tq * NB * 4 <= select_kernel.SPLIT_KEYS_BYTES
    plan = select_kernel._topn_plan(1024, 16)
    assert (plan["W1"], plan["W2"], plan["WIDTH"], plan["STREAM"]) == (256, 512, 1024, False)
    assert (plan["ROWS"], plan["num_warps"]) == (1, 1)  # one row per warp, 32 keys per thread
    assert select_kernel._topn_plan(2048, 16)["num_warps"] == 2  # wider rows: one warp per 1024 blocks
    assert select_kernel._topn_plan(select_kernel.TOPN_RESIDENT_BLOCKS + 1, 16)["STREAM"]
    assert plan["BRACKET"] and plan["PADDED"]
    # the scores kernel's tiles: 16 queries x 16 heads on 8 warps for long sequences (G = 16, split)
    tiles = lambda G, split, T, Dk=128: (lambda p: (p["BLOCK_T"], p["HEAD_STEP"], p["num_warps"]))(  # noqa: E731
        select_kernel._kernel_plan_v2(G, Dk, 32, 16, 64, split, T))
    long_t = select_kernel.LONG_SEQ_SCORES_TILE
    assert tiles(16, True, long_t) == (16, 16, 8) and tiles(16, True, long_t - 1) == (8, 16, 4)
    assert tiles(16, False, long_t) == (8, 16, 4) and tiles(4, True, long_t) == (32, 4, 4)
    assert tiles(16, True, long_t, Dk=192) == (8, 16, 4)  # the long tile only where measured (Dk <= 128)


# ---- kernels under the interpreter (subprocess) -------------------------------------------------
@cpu_path_only
@pytest.mark.slow
def test_split_kernels_in_subprocess():
    """This file's ``test_interp_*`` with ``TRITON_INTERPRET=1`` (read when the kernels are defined)."""
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    env.setdefault("HYPOTHESIS_PROFILE", "ci")
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-k", "interp", os.path.abspath(__file__)],
        cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )
    summary = proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else ""
    assert proc.returncode == 0 and " passed" in summary and "skipped" not in summary, (
        proc.stdout[-6000:] + proc.stderr[-3000:]
    )


@interp_only
@pytest.mark.parametrize(
    "B, HKV, G, T, Dk, dtype, ties",
    [(1, 2, 1, 77, 16, torch.float32, None),  # G = 1, T not a multiple of any block
     (2, 1, 3, 61, 24, torch.bfloat16, None),  # G = 3 (padded heads), head dim 16 + 16 (a "192-like" split)
     (1, 1, 16, 130, 16, torch.bfloat16, "zero_q"),  # G = 16, exact ties between all visible blocks
     (1, 2, 3, 99, 24, torch.float32, "periodic"),  # ties between blocks
     (1, 2, 4, 5, 8, torch.float32, None),  # T shorter than one block (one block)
     (1, 1, 2, 3, 8, torch.float32, None)],  # T shorter than l: no compressed token
)  # fmt: skip
def test_interp_split_matches_v2(B, HKV, G, T, Dk, dtype, ties):
    check_split_against_v2(PAPER_RATIOS, B, HKV, G, T, Dk, dtype, seed=G * T, ties=ties)


@interp_only
def test_interp_split_other_config():
    """l = d = l' (one compressed token per block), no forced blocks, n = 3."""
    cfg = flexnsa.NSAConfig(4, 4, 4, 3, 0, 0)
    check_split_against_v2(cfg, 1, 1, 2, 45, 8, torch.float32, seed=3)


@interp_only
def test_interp_split_chunks_and_streamed_rows(monkeypatch):
    """Several query chunks (a keys buffer of 32 queries, one query tile; top-n programs of 64 rows that
    overhang it) and the streamed top-n (rows of 10 blocks in column tiles of 8; exact ties across tiles)
    give the one-chunk result exactly, slot order included."""
    cfg = PAPER_RATIOS
    T = 77  # 10 blocks, 3 chunks
    q, _, _, k_cmp, lse = make_problem(cfg, 1, 2, 3, T, 16, 4, torch.float32, seed=11, ties="periodic")
    one_chunk = select_with("split", q, k_cmp, lse, cfg)
    assert torch.equal(as_sets(one_chunk), as_sets(select_with("v2", q, k_cmp, lse, cfg)))
    NB = cfg.num_blocks(T)
    monkeypatch.setitem(kernel_utils.TUNING, "select_topn", {"ROWS": 64})
    monkeypatch.setattr(select_kernel, "SPLIT_KEYS_BYTES", 1 * 2 * 32 * NB * 4 + 100)
    assert select_kernel._split_chunk(1, 2, T, NB, 32) == 32  # v2's BLOCK_T for G = 3: 32
    assert torch.equal(select_with("split", q, k_cmp, lse, cfg), one_chunk)
    monkeypatch.setattr(select_kernel, "TOPN_RESIDENT_BLOCKS", 8)
    assert torch.equal(select_with("split", q, k_cmp, lse, cfg), one_chunk)


@interp_only
def test_interp_split_few_eligible_blocks_leave_unused_slots():
    """Queries with at most n eligible blocks take all of them (forced or not) and fill the rest with -1."""
    cfg = flexnsa.NSAConfig(
        cmp_block=4, cmp_stride=2, slc_block=8, num_selected=4, num_init_blocks=1, num_local_blocks=1
    )
    T = 45  # blocks 0..5: queries t < 32 have t // 8 + 1 <= 4 eligible blocks
    idx = check_split_against_v2(cfg, 1, 2, 2, T, 16, torch.float32, seed=7)
    for t in range(32):
        own = t // cfg.slc_block
        expected = list(range(own + 1)) + [-1] * (cfg.num_selected - own - 1)
        assert (as_sets(idx)[:, :, t] == torch.tensor(sorted(expected), dtype=torch.int32)).all(), t
    assert (idx[:, :, 32:] >= 0).all()  # 5 or 6 eligible blocks: every slot used


def reference_topn(keys, T, t_start, slc_block, n):
    """Rows ``t_start ..`` of ``keys [B, HKV, TQ, NB]``: the n best of ``j <= t // l'`` (ties to the
    lower block; -inf and NaN never), as sorted sets ``[B, HKV, rows, n]`` with ``-1`` first."""
    B, HKV, TQ = keys.shape[:3]
    rows = min(TQ, T - t_start)
    out = torch.full((B, HKV, rows, n), -1, dtype=torch.int32)
    for r in range(rows):
        own = (t_start + r) // slc_block
        k = keys[:, :, r, : own + 1].double()
        order = torch.sort(
            torch.nan_to_num(k, nan=-math.inf, posinf=math.inf, neginf=-math.inf), dim=-1, descending=True, stable=True
        )
        for b in range(B):
            for g in range(HKV):
                picked = [int(j) for v, j in zip(order.values[b, g], order.indices[b, g]) if v > -math.inf][:n]
                out[b, g, r, n - len(picked) :] = torch.tensor(sorted(picked), dtype=torch.int32)
    return out


@interp_only
@pytest.mark.parametrize("resident", [True, False])
def test_interp_topn_kernel_orders_like_floats(resident, monkeypatch):
    """The top-n kernel alone on hand-made keys: negative values, -0.0 == +0.0, +-inf, NaN, many exact
    ties and unwritten (NaN) entries after each row's own block; two query chunks of one buffer."""
    if resident:  # programs of 8 rows: all three register widths (16, 32, 64 blocks) run
        monkeypatch.setitem(kernel_utils.TUNING, "select_topn", {"ROWS": 8})
    else:  # rows of 40 blocks in column tiles of 16
        monkeypatch.setattr(select_kernel, "TOPN_RESIDENT_BLOCKS", 16)
    gen = torch.Generator().manual_seed(0)
    B, HKV, TQ, NB, slc_block, n = 1, 2, 24, 40, 1, 6
    T = 40
    values = torch.tensor([-math.inf, -2.5, -1e-30, -0.0, 0.0, 1e-30, 0.5, 0.5, 3.0, math.inf, math.nan])
    for t_start, mode in ((0, "small"), (TQ, "random")):
        if mode == "small":  # few distinct values: ties everywhere
            keys = values[torch.randint(len(values), (B, HKV, TQ, NB), generator=gen)]
        else:
            keys = torch.randn(B, HKV, TQ, NB, generator=gen).float()
            keys[..., ::7] = math.inf
        for r in range(TQ):  # never read: after the row's own block
            keys[:, :, r, (t_start + r) // slc_block + 1 :] = math.nan
        idx = torch.full((B, HKV, T, n), -7, dtype=torch.int32)
        select_kernel.topn_launch(lambda kernel: kernel, keys, idx, t_start, slc_block)
        rows = min(TQ, T - t_start)
        got = idx[:, :, t_start : t_start + rows]
        assert torch.equal(as_sets(got), reference_topn(keys, T, t_start, slc_block, n)), mode
        assert (idx[:, :, :t_start] == -7).all() and (idx[:, :, t_start + rows :] == -7).all()


@interp_only
@pytest.mark.parametrize("bracket, padded", [(True, True), (True, False), (False, False)])
def test_interp_topn_kernel_wide_rows(bracket, padded, monkeypatch):
    """Rows of up to 300 blocks (register widths 128 to 512: 32 groups of several keys each, so the
    search's start from group maxima narrows and the bisection still runs): keys rounded to few
    distinct values in half of the chunks (ties at the threshold), three +inf blocks per row like the
    forced ones, some rows with more +inf than n, rows with fewer eligible blocks than n; ``padded``:
    rows stored 512 wide with garbage after the last block (whole-row loads)."""
    monkeypatch.setitem(kernel_utils.TUNING, "select_topn", {"BRACKET": bracket})
    gen = torch.Generator().manual_seed(1)
    B, HKV, slc_block, n = 1, 2, 1, 16
    T = 300
    for t_start, TQ in ((0, 20), (100, 60), (260, 40)):
        keys = torch.rand(B, HKV, TQ, 512 if padded else T, generator=gen)  # [B, HKV, TQ, NB or 512]
        if t_start != 100:
            keys = (keys * 64).round() / 64
        for r in range(TQ):
            own = (t_start + r) // slc_block
            keys[:, :, r, [0, max(own - 1, 0), own]] = math.inf
            if r % 7 == 3:  # more +inf than n: the n lowest of them
                keys[:, 0, r, : own + 1 : 2] = math.inf
            keys[:, :, r, own + 1 : T] = math.nan  # never read
        keys[..., T:] = torch.tensor([math.nan, math.inf, 5.0])[torch.arange(keys.shape[-1] - T) % 3]  # padding
        idx = torch.full((B, HKV, T, n), -7, dtype=torch.int32)
        select_kernel.topn_launch(lambda kernel: kernel, keys, idx, t_start, slc_block)
        got = idx[:, :, t_start : t_start + TQ]
        assert torch.equal(as_sets(got), reference_topn(keys[..., :T], T, t_start, slc_block, n)), t_start


@interp_only
@settings(max_examples=8)
@given(st.integers(1, 200), st.integers(1, 40), st.integers(1, 16), st.sampled_from([1, 2, 8]), st.booleans(),
       st.sampled_from(["normal", "rounded", "inf"]), st.booleans(), st.integers(0, 2**31 - 1))  # fmt: skip
def test_interp_topn_kernel_properties(NB, TQ, n, rows, padded, kind, bracket, seed):
    """The top-n kernel on drawn rows: any width up to 200 blocks (register widths 16 to 256), any n,
    1-8 rows per program, rows padded or not, keys with few distinct values (ties) or many +inf, the
    search started from group maxima or not; equal sets to a stable sort of the keys."""
    gen = torch.Generator().manual_seed(seed)
    B, HKV, slc_block = 1, 2, 1
    T = NB
    t_start = int(torch.randint(0, T, (1,), generator=gen))
    width = triton.next_power_of_2(max(16, NB)) if padded else NB
    keys = torch.randn(B, HKV, TQ, width, generator=gen)  # [B, HKV, TQ, width]
    if kind == "rounded":
        keys = keys.round()
    elif kind == "inf":
        keys = torch.where(torch.rand(keys.shape, generator=gen) < 0.3, math.inf, keys)
    keys[..., NB:] = math.inf  # padding: never read
    for r in range(TQ):
        keys[:, :, r, min((t_start + r) // slc_block + 1, NB) : NB] = math.nan  # after the row's own block
    idx = torch.full((B, HKV, T, n), -7, dtype=torch.int32)
    kernel_utils.TUNING["select_topn"] = {"ROWS": rows, "BRACKET": bracket}
    try:
        select_kernel.topn_launch(lambda kernel: kernel, keys, idx, t_start, slc_block)
    finally:
        kernel_utils.TUNING.pop("select_topn", None)
    got = idx[:, :, t_start : min(t_start + TQ, T)]
    assert torch.equal(as_sets(got), reference_topn(keys[..., :NB], T, t_start, slc_block, n))


# ---- CUDA --------------------------------------------------------------------------------------
@pytest.mark.gpu
@needs_cuda
def test_gpu_split_matches_v2_short():
    cfg = flexnsa.NSAConfig(cmp_block=16, cmp_stride=8, slc_block=32, num_selected=6)
    q, _, _, k_cmp, lse = make_problem(cfg, 1, 2, 3, 333, 64, 4, torch.bfloat16, seed=333, device="cuda")
    idx = select_with("split", q, k_cmp, lse, cfg)
    assert torch.equal(as_sets(idx), as_sets(select_with("v2", q, k_cmp, lse, cfg)))
    assert_selection_agrees(idx, reference.select_blocks(q.cpu(), k_cmp.cpu(), cfg, lse=lse.cpu()), q, k_cmp, cfg)


@pytest.mark.gpu
@needs_cuda
def test_gpu_split_matches_v2_paper_shape_8k():
    """B=1, HQ=64, HKV=4, D=128, bfloat16, l=32, d=16, l'=64, n=16, T=8192: the same sets as v2."""
    cfg = flexnsa.NSAConfig()
    B, HQ, HKV, T, D = 1, 64, 4, 8192, 128
    gen = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(B, HQ, T, D, generator=gen, device="cuda", dtype=torch.bfloat16)
    k_cmp = torch.randn(B, HKV, cfg.num_cmp_tokens(T), D, generator=gen, device="cuda", dtype=torch.bfloat16)
    _, lse = reference.compressed_attention(q, k_cmp, k_cmp[..., :1], cfg, upcast=False)
    idx = select_with("split", q, k_cmp, lse.float().contiguous(), cfg)
    assert idx.shape == (B, HKV, T, cfg.num_selected)
    assert torch.equal(as_sets(idx), as_sets(select_with("v2", q, k_cmp, lse.float().contiguous(), cfg)))


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("banded", [False, True])
def test_gpu_split_paper_config_agrees_with_reference(banded, monkeypatch):
    """Paper config (l=32, d=16, l'=64, n=16), G=16, head dim 128, T=2000: the split path, with block
    scores by the float32 product or as band sums (``BANDED``), agrees tie-aware with float64."""
    monkeypatch.setitem(kernel_utils.TUNING, "select_v2", {"BANDED": banded})
    cfg = flexnsa.NSAConfig()
    q, _, _, k_cmp, lse = make_problem(cfg, 1, 2, 16, 2000, 128, 4, torch.bfloat16, seed=4, device="cuda")
    idx = select_with("split", q, k_cmp, lse, cfg)
    assert_selection_agrees(idx, reference.select_blocks(q.cpu(), k_cmp.cpu(), cfg, lse=lse.cpu()), q, k_cmp, cfg)
