"""flexnsa.flex_branches: the FlexAttention compressed and sliding-window branches against the
float64 reference (CPU), their block masks, chunked compressed layout, user mask_mods, paths and
torch.compile(fullgraph=True).

Tolerance (flash-attention's criterion): the error of the fast path against the float64 reference
must be at most 3x the error of the reference run in the input dtype (``upcast=False``), plus a
small absolute floor."""

from __future__ import annotations

import pytest
import torch
from flexnsa.masks.pattern import evaluate_mask_mod
from flexnsa.masks.sliding_window import sliding_window_mask_mod
from hypothesis import given, settings
from hypothesis import strategies as st
from nsa_inputs import configs

import flexnsa
from flexnsa import flex_branches as fb
from flexnsa import flex_runtime, reference

pytestmark = pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")

GROUPS = st.sampled_from([1, 2, 3, 4, 8, 16])
FLOOR = {torch.float32: 1e-5, torch.bfloat16: 1e-3, torch.float16: 1e-4}


def assert_within_reference_error(fast, exact, lowp, dtype, what=""):
    assert not torch.isnan(fast).any(), f"{what}: NaN"
    finite = torch.isfinite(exact)
    assert torch.equal(torch.isfinite(fast), finite), f"{what}: -inf pattern differs"
    err_fast = (fast.double() - exact).abs()[finite].max().item() if finite.any() else 0.0
    err_lowp = (lowp.double() - exact).abs()[finite].max().item() if finite.any() else 0.0
    assert err_fast <= 3 * err_lowp + FLOOR[dtype], (
        f"{what}: error {err_fast:.3g} vs reference's {err_lowp:.3g}"
    )


@st.composite
def shapes(draw, max_t: int = 300, min_t: int = 1):
    G = draw(GROUPS)
    HKV = draw(st.integers(1, 2))
    Dk = draw(st.sampled_from([8, 12, 16]))
    Dv = draw(st.sampled_from([d for d in (4, 8, 24) if d != Dk]))  # Dk != Dv
    return dict(
        B=draw(st.integers(1, 2)),
        HQ=G * HKV,
        HKV=HKV,
        T=draw(st.integers(min_t, max_t)),
        Dk=Dk,
        Dv=Dv,
        seed=draw(st.integers(0, 2**31 - 1)),
    )


def rand(shape, seed, dtype=torch.float32, device="cpu", scale=1.0):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=gen, dtype=torch.float64) * scale).to(device=device, dtype=dtype)


def window_inputs(s, dtype=torch.float32, device="cpu"):
    B, HQ, HKV, T, Dk, Dv, seed = (s[k] for k in ("B", "HQ", "HKV", "T", "Dk", "Dv", "seed"))
    return (
        rand((B, HQ, T, Dk), seed, dtype, device),  # q [B, HQ, T, Dk]
        rand((B, HKV, T, Dk), seed + 1, dtype, device),  # k [B, HKV, T, Dk]
        rand((B, HKV, T, Dv), seed + 2, dtype, device),  # v [B, HKV, T, Dv]
    )


def compressed_inputs(s, cfg, dtype=torch.float32, device="cpu"):
    B, HQ, HKV, T, Dk, Dv, seed = (s[k] for k in ("B", "HQ", "HKV", "T", "Dk", "Dv", "seed"))
    Tc = cfg.num_cmp_tokens(T)
    return (
        rand((B, HQ, T, Dk), seed, dtype, device),  # q [B, HQ, T, Dk]
        rand((B, HKV, Tc, Dk), seed + 3, dtype, device),  # k_cmp [B, HKV, Tc, Dk]
        rand((B, HKV, Tc, Dv), seed + 4, dtype, device),  # v_cmp [B, HKV, Tc, Dv]
    )


def window_reference(q, k, v, window, dtype):
    exact, _ = reference.sliding_window_attention(q.double(), k.double(), v.double(), window)
    lowp, _ = reference.sliding_window_attention(q, k, v, window, upcast=False)
    return exact, lowp


def compressed_reference(q, kc, vc, cfg):
    exact = reference.compressed_attention(q.double(), kc.double(), vc.double(), cfg)
    lowp = reference.compressed_attention(q, kc, vc, cfg, upcast=False)
    return exact, lowp


# ---- forward against the reference (FlexAttention eager: same mask_mods, no compile per shape) --
@settings(max_examples=15)
@given(
    shapes(), st.sampled_from([0, 1, 5, 16, 33, 128, 1000]), st.sampled_from([torch.float32, torch.bfloat16])
)
def test_window_forward_matches_reference(s, window, dtype):
    q, k, v = window_inputs(s, dtype)
    out = fb.sliding_window_attention(q, k, v, window, _path="flex_eager")
    assert out.shape == (s["B"], s["HQ"], s["T"], s["Dv"]) and out.dtype == dtype
    exact, lowp = window_reference(q, k, v, window, dtype)
    assert_within_reference_error(out, exact, lowp, dtype, "window o")


@settings(max_examples=15)
@given(shapes(), configs(), st.sampled_from([torch.float32, torch.bfloat16]))
def test_compressed_forward_matches_reference(s, cfg, dtype):
    q, kc, vc = compressed_inputs(s, cfg, dtype)
    out, lse = fb.compressed_attention(q, kc, vc, cfg, return_lse=True, _path="flex_eager")
    assert out.shape == (s["B"], s["HQ"], s["T"], s["Dv"]) and out.dtype == dtype
    assert lse.shape == (s["B"], s["HQ"], s["T"]) and lse.dtype == torch.float32
    (exact, exact_lse), (lowp, lowp_lse) = compressed_reference(q, kc, vc, cfg)
    assert_within_reference_error(out, exact, lowp, dtype, "compressed o")
    assert_within_reference_error(lse, exact_lse, lowp_lse, dtype, "compressed lse")
    # queries before the first complete compressed token: o = 0, lse = -inf
    empty = min(s["T"], cfg.cmp_block - 1)
    assert torch.all(out[:, :, :empty] == 0) and torch.all(lse[:, :, :empty] == float("-inf"))


@settings(max_examples=8)
@given(shapes(max_t=520, min_t=129), configs(), st.integers(2, 5))
def test_compressed_chunked_forward_is_exact(s, cfg, chunks):
    """Query chunks folded into the heads (the CUDA backward layout) give the unchunked result."""
    q, kc, vc = compressed_inputs(s, cfg)
    out, lse = fb.compressed_attention(
        q, kc, vc, cfg, return_lse=True, _path="flex_eager", _num_chunks=chunks
    )
    plain, plain_lse = fb.compressed_attention(
        q, kc, vc, cfg, return_lse=True, _path="flex_eager", _num_chunks=1
    )
    torch.testing.assert_close(out, plain, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(lse, plain_lse, atol=1e-6, rtol=1e-5)
    (exact, exact_lse), (lowp, lowp_lse) = compressed_reference(q, kc, vc, cfg)
    assert_within_reference_error(out, exact, lowp, torch.float32, "chunked o")


@settings(max_examples=6)
@given(shapes(max_t=300), configs(), st.integers(1, 3))
def test_compressed_expanded_heads_is_exact(s, cfg, chunks):
    """K/V repeated to the query heads (the CUDA training layout) give the grouped result."""
    q, kc, vc = compressed_inputs(s, cfg)
    out, lse = fb.compressed_attention(
        q, kc, vc, cfg, return_lse=True, _path="flex_eager", _num_chunks=chunks, _expand_heads=True
    )
    plain, plain_lse = fb.compressed_attention(
        q, kc, vc, cfg, return_lse=True, _path="flex_eager", _num_chunks=1, _expand_heads=False
    )
    torch.testing.assert_close(out, plain, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(lse, plain_lse, atol=1e-6, rtol=1e-5)


@settings(max_examples=15)
@given(st.integers(1, 2000), st.integers(0, 200), st.integers(1, 3), st.integers(1, 4), st.integers(1, 9))
def test_compressed_chunked_block_tables(seq_len, num_cmp_cap, heads, chunks, stride_pow):
    """The chunked BlockMask's tiles (one head per query head and chunk) against the tiles of its
    mask_mod evaluated densely."""
    d = 2 ** (stride_pow % 4)
    cfg = flexnsa.NSAConfig(cmp_block=2 * d, cmp_stride=d, slc_block=4 * d)
    num_cmp = cfg.num_cmp_tokens(seq_len)
    if num_cmp == 0:
        return
    C, Tq = fb._chunk_layout(seq_len, chunks)
    assert C * Tq >= seq_len and Tq % 128 == 0 or C == 1
    bm = fb._compressed_block_mask(seq_len, num_cmp, cfg, heads, C, Tq, "cpu", None)
    Hm = bm.kv_num_blocks.shape[1]
    assert bm.kv_num_blocks.shape[0] == 1 and Hm == (heads * C if C > 1 else 1)
    dense = evaluate_mask_mod(bm.mask_mod, Tq, num_cmp, 1, Hm)  # [1, Hm, Tq, Tc]
    for h in range(Hm):  # virtual head h: chunk h % C, raw rows (h % C) * Tq + [0, Tq)
        rows = torch.arange(Tq) + (h % C) * Tq
        expect = cfg.cmp_stride * torch.arange(num_cmp)[None, :] + cfg.cmp_block - 1 <= rows[:, None]
        assert torch.equal(dense[0, h], expect)
    nqb, nkb = -(-Tq // 128), -(-num_cmp // 128)
    padded = torch.zeros(1, Hm, nqb * 128, nkb * 128, dtype=torch.int64)
    padded[:, :, :Tq, :num_cmp] = dense.long()
    tiles = padded.view(1, Hm, nqb, 128, nkb, 128).sum(dim=(3, 5))
    assert torch.equal(bm.to_dense().bool(), tiles > 0)
    full = torch.zeros_like(tiles, dtype=torch.bool)
    for h in range(Hm):
        for r in range(nqb):
            n = int(bm.full_kv_num_blocks[0, h, r])
            full[0, h, r, bm.full_kv_indices[0, h, r, :n].long()] = True
    assert torch.equal(full, tiles == 128 * 128)


# ---- edge cases ------------------------------------------------------------------------------
def test_no_compressed_token_returns_zeros_and_minus_inf():
    cfg = flexnsa.NSAConfig()  # l = 32
    s = dict(B=2, HQ=4, HKV=2, T=31, Dk=16, Dv=8, seed=0)
    q, kc, vc = compressed_inputs(s, cfg)
    assert kc.shape[2] == 0
    out, lse = fb.compressed_attention(q, kc, vc, cfg, return_lse=True)
    assert torch.equal(out, torch.zeros(2, 4, 31, 8)) and torch.all(lse == float("-inf"))
    assert torch.equal(
        fb.compressed_attention(q, kc, vc, cfg, _path="flex_compiled"), out
    )  # no kernel launched


def test_zero_window_returns_zeros():
    q, k, v = window_inputs(dict(B=1, HQ=2, HKV=1, T=9, Dk=8, Dv=4, seed=1))
    assert torch.equal(fb.sliding_window_attention(q, k, v, 0), torch.zeros(1, 2, 9, 4))


def test_paths_are_chosen_automatically():
    cpu = torch.device("cpu")
    compiled = "flex_compiled" if flex_runtime.CPU_CAN_COMPILE else "flex_eager"
    assert flex_runtime.choose_path(cpu, torch.float32, False, False) == compiled
    assert flex_runtime.choose_path(cpu, torch.bfloat16, True, False) == "reference"
    assert flex_runtime.choose_path(cpu, torch.float32, False, True) == "reference"
    assert flex_runtime.choose_path(cpu, torch.float64, False, False) == "reference"
    assert flex_runtime.choose_path(torch.device("cuda"), torch.bfloat16, True, True) == "flex_compiled"
    with pytest.raises(ValueError, match="_path"):
        flex_runtime.choose_path(cpu, torch.float32, False, False, "fast")
    assert fb.default_num_chunks(65536, 4095, 1, 4) == 8
    assert fb.default_num_chunks(8192, 511, 1, 4) == 8
    assert fb.default_num_chunks(1000, 61, 1, 4) == 1


def test_window_blockmask_tiles():
    """The window's BlockMask has 64-row tiles exactly where the forward-only kernel tiles (64 x 64)
    apply: CUDA, 16-bit, head dims <= 128, no gradient; else 128 (inductor's backward tiles need it).
    Fake CUDA tensors: no GPU needed. Either tiling lists every pair of the window, the 64-row one
    fewer pairs outside it."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        q, v = (torch.empty(1, h, 8, 128, dtype=torch.bfloat16, device="cuda") for h in (2, 1))
        q32, v32 = q.float(), v.float()
        q192 = torch.empty(1, 2, 8, 192, dtype=torch.float16, device="cuda")
    assert fb.window_tile(q, v, grad=False) == 64
    assert fb.window_tile(q, v, grad=True) == fb.window_tile(q32, v32, grad=False) == 128
    assert fb.window_tile(q192, v, grad=False) == 128
    assert fb.window_tile(torch.zeros(1, 2, 8, 128, dtype=torch.bfloat16), torch.zeros(1, 1, 8, 128), False) == 128
    T, cpu = 1000, torch.device("cpu")
    window = evaluate_mask_mod(sliding_window_mask_mod(512), T, T, 1, 1, cpu)  # [1, 1, T, T]
    listed = []
    for block in (64, 128):
        mask = fb._window_block_mask(T, 512, cpu, None, block)
        assert mask.BLOCK_SIZE == (block, block)
        tiles = mask.to_dense().repeat_interleave(block, -2).repeat_interleave(block, -1)[..., :T, :T].bool()
        assert not (window & ~tiles).any()  # every pair of the window lies in a listed tile
        listed.append(int(tiles.sum()))
    assert listed[0] < listed[1]


def test_cpu_training_uses_the_reference_and_has_no_nan_gradient():
    """CPU + requires_grad: the reference path (FlexAttention's CPU kernel has no backward)."""
    cfg = flexnsa.NSAConfig(cmp_block=8, cmp_stride=4, slc_block=16, num_selected=4, window=7)
    s = dict(B=1, HQ=6, HKV=2, T=50, Dk=12, Dv=8, seed=5)
    q, kc, vc = (x.requires_grad_() for x in compressed_inputs(s, cfg))
    out, lse = fb.compressed_attention(q, kc, vc, cfg, return_lse=True)
    (out.square().sum() + lse[lse.isfinite()].sum()).backward()
    for x in (q, kc, vc):
        assert x.grad is not None and torch.isfinite(x.grad).all()
    assert torch.all(q.grad[:, :, : cfg.cmp_block - 1] == 0)
    q2, k2, v2 = (x.requires_grad_() for x in window_inputs(s))
    fb.sliding_window_attention(q2, k2, v2, 7).sum().backward()
    expected = torch.autograd.grad(reference.sliding_window_attention(q2, k2, v2, 7)[0].sum(), q2)[0]
    torch.testing.assert_close(q2.grad, expected)


def test_float64_uses_the_reference():
    cfg = flexnsa.NSAConfig(cmp_block=8, cmp_stride=4, slc_block=16, num_selected=4)
    s = dict(B=1, HQ=2, HKV=1, T=40, Dk=8, Dv=4, seed=2)
    q, kc, vc = compressed_inputs(s, cfg, torch.float64)
    out, lse = fb.compressed_attention(q, kc, vc, cfg, return_lse=True)
    assert out.dtype == torch.float64 and lse.dtype == torch.float64
    torch.testing.assert_close(out, reference.compressed_attention(q, kc, vc, cfg)[0], rtol=0, atol=0)


# ---- user mask_mod: packed documents ---------------------------------------------------------
def _doc_ids(batch: int, seq_len: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    bounds = torch.randint(0, 4, (batch, seq_len), generator=gen) == 0  # a new document starts
    return bounds.cumsum(-1)  # [B, T]


def _document_mod(doc):
    def same_document(b, h, q_idx, kv_idx):
        return doc[b, q_idx] == doc[b, kv_idx]

    return same_document


@pytest.mark.parametrize("path", ["flex_eager", "reference"])
@pytest.mark.parametrize("chunks", [1, 3])
def test_document_mask_mod_against_dense(path, chunks):
    cfg = flexnsa.NSAConfig(cmp_block=8, cmp_stride=4, slc_block=16, num_selected=4, window=21)
    s = dict(B=2, HQ=6, HKV=2, T=300, Dk=16, Dv=8, seed=9)
    doc = _doc_ids(2, 300, 4)
    mod = _document_mod(doc)
    T, l, d = s["T"], cfg.cmp_block, cfg.cmp_stride
    # hand-written dense masks
    t = torch.arange(T)
    same = doc[:, :, None] == doc[:, None, :]  # [B, T, T]
    win = same & (t[:, None] >= t[None, :]) & (t[:, None] - t[None, :] < cfg.window)
    Tc = cfg.num_cmp_tokens(T)
    i = torch.arange(Tc)
    first, last = i * d, i * d + l - 1
    cmp = (last[None, :] <= t[:, None]) & same[:, :, first] & same[:, :, last]  # [B, T, Tc]

    q, k, v = window_inputs(s)
    out = fb.sliding_window_attention(q, k, v, cfg.window, mask_mod=mod, _path=path)
    exact, _ = reference.masked_attention(q.double(), k.double(), v.double(), win[:, None], 0.25)
    torch.testing.assert_close(out.double(), exact, atol=2e-6, rtol=1e-5)

    q, kc, vc = compressed_inputs(s, cfg)
    out, lse = fb.compressed_attention(
        q, kc, vc, cfg, return_lse=True, mask_mod=mod, _path=path, _num_chunks=chunks
    )
    exact, exact_lse = reference.masked_attention(q.double(), kc.double(), vc.double(), cmp[:, None], 0.25)
    torch.testing.assert_close(out.double(), exact, atol=2e-6, rtol=1e-5)
    torch.testing.assert_close(lse.double(), exact_lse, atol=2e-6, rtol=1e-5)


def test_head_dependent_mask_mod_uses_query_heads():
    """mask_mod's h is the query head (never the KV head), on every path."""
    s = dict(B=1, HQ=4, HKV=2, T=150, Dk=8, Dv=4, seed=3)
    q, k, v = window_inputs(s)

    def even_heads_see_even_keys(b, h, q_idx, kv_idx):
        return (h % 2 == 1) | (kv_idx % 2 == 0)

    h = torch.arange(4)[:, None, None]
    kv = torch.arange(150)[None, None, :]
    t = torch.arange(150)[None, :, None]
    dense = ((h % 2 == 1) | (kv % 2 == 0)) & (t >= kv) & (t - kv < 40)  # [HQ, T, T]
    exact, _ = reference.masked_attention(q.double(), k.double(), v.double(), dense[None], 8**-0.5)
    for path in ("flex_eager", "reference"):
        out = fb.sliding_window_attention(q, k, v, 40, mask_mod=even_heads_see_even_keys, _path=path)
        torch.testing.assert_close(out.double(), exact, atol=2e-6, rtol=1e-5)


@pytest.mark.parametrize("chunks, expand", [(1, False), (1, True), (3, False), (3, True)])
def test_compressed_mask_mod_sees_batch_and_query_head_in_every_layout(chunks, expand):
    """The compressed branch's virtual-head layouts (query chunks, KV heads folded into the batch with
    K/V expanded over their query heads) still ask the user mask about the real batch entry and query
    head: a mask that depends on both gives the reference's output and log-sum-exp."""
    cfg = flexnsa.NSAConfig(cmp_block=8, cmp_stride=4, slc_block=16, num_selected=4, window=32)
    s = dict(B=2, HQ=6, HKV=2, T=301, Dk=16, Dv=8, seed=5)
    q, kc, vc = compressed_inputs(s, cfg)

    def batch_and_head(b, h, q_idx, kv_idx):
        return ((h + b) % 3 != 0) | (kv_idx % 2 == 0)

    out, lse = fb.compressed_attention(
        q, kc, vc, cfg, return_lse=True, mask_mod=batch_and_head, _path="flex_eager",
        _num_chunks=chunks, _expand_heads=expand,
    )  # fmt: skip
    exact, exact_lse = fb.compressed_attention(q, kc, vc, cfg, return_lse=True, mask_mod=batch_and_head, _path="reference")
    torch.testing.assert_close(out, exact.to(out.dtype), atol=2e-6, rtol=1e-5)
    torch.testing.assert_close(lse, exact_lse.to(lse.dtype), atol=2e-6, rtol=1e-5)


# ---- compiled FlexAttention on the CPU (the default inference path) -------------------------
@pytest.mark.slow
@pytest.mark.skipif(not flex_runtime.CPU_CAN_COMPILE, reason="no C++ compiler for inductor")
def test_compiled_cpu_kernels_match_reference():
    """The default CPU inference path: compiled FlexAttention kernels that use the block tables
    (full tiles skip mask_mod), window and chunked compressed with a user document mask."""
    cfg = flexnsa.NSAConfig(cmp_block=16, cmp_stride=8, slc_block=32, num_selected=4, window=130)
    s = dict(B=2, HQ=6, HKV=2, T=700, Dk=16, Dv=24, seed=11)
    q, k, v = window_inputs(s)
    with torch.no_grad():
        out = fb.sliding_window_attention(q, k, v, cfg.window)
    exact, lowp = window_reference(q, k, v, cfg.window, torch.float32)
    assert_within_reference_error(out, exact, lowp, torch.float32, "compiled window")
    q, kc, vc = compressed_inputs(s, cfg)
    doc = _doc_ids(2, 700, 6)
    with torch.no_grad():
        out = fb.compressed_attention(
            q, kc, vc, cfg, _path="flex_compiled", _num_chunks=3, mask_mod=_document_mod(doc)
        )
        expected = fb.compressed_attention(q, kc, vc, cfg, _path="reference", mask_mod=_document_mod(doc))
    torch.testing.assert_close(out, expected, atol=2e-6, rtol=1e-5)


# ---- torch.compile of the public functions ---------------------------------------------------
def _both_branches(cfg):
    def run(q, k, v, kc, vc):
        o_win = fb.sliding_window_attention(q, k, v, cfg.window)
        o_cmp, lse = fb.compressed_attention(q, kc, vc, cfg, return_lse=True)
        o_chunked = fb.compressed_attention(q, kc, vc, cfg, _num_chunks=2)
        return o_win, o_cmp, lse, o_chunked

    return run


@pytest.mark.parametrize("requires_grad", [False, True])
def test_fullgraph_compile_has_no_graph_break(requires_grad):
    """fullgraph=True raises on any graph break; aot_eager traces forward and backward quickly."""
    torch._dynamo.reset()
    cfg = flexnsa.NSAConfig(cmp_block=8, cmp_stride=4, slc_block=16, num_selected=4, window=50)
    s = dict(B=1, HQ=4, HKV=2, T=260, Dk=16, Dv=8, seed=4)
    q, k, v = window_inputs(s)
    _, kc, vc = compressed_inputs(s, cfg)
    if requires_grad:
        q.requires_grad_()
    compiled = torch.compile(_both_branches(cfg), fullgraph=True, backend="aot_eager")
    o_win, o_cmp, lse, o_chunked = compiled(q, k, v, kc, vc)
    e_win, _ = reference.sliding_window_attention(q, k, v, cfg.window)
    e_cmp, e_lse = reference.compressed_attention(q, kc, vc, cfg)
    for got, want in ((o_win, e_win), (o_cmp, e_cmp), (lse, e_lse), (o_chunked, e_cmp)):
        torch.testing.assert_close(got, want, atol=2e-6, rtol=1e-5)
    if requires_grad:
        (o_win.sum() + o_cmp.sum()).backward()
        assert torch.isfinite(q.grad).all()


@pytest.mark.slow
def test_fullgraph_compile_with_inductor_and_user_mask():
    torch._dynamo.reset()
    cfg = flexnsa.NSAConfig(cmp_block=8, cmp_stride=4, slc_block=16, num_selected=4, window=50)
    s = dict(B=2, HQ=4, HKV=2, T=200, Dk=16, Dv=8, seed=8)
    q, k, v = window_inputs(s)
    _, kc, vc = compressed_inputs(s, cfg)
    mod = _document_mod(_doc_ids(2, 200, 1))

    def run(q, k, v, kc, vc):
        return fb.sliding_window_attention(q, k, v, 50, mask_mod=mod), fb.compressed_attention(
            q, kc, vc, cfg, mask_mod=mod
        )

    with torch.no_grad():
        got = torch.compile(run, fullgraph=True)(q, k, v, kc, vc)
    want = (
        fb.sliding_window_attention(q, k, v, 50, mask_mod=mod, _path="reference"),
        fb.compressed_attention(q, kc, vc, cfg, mask_mod=mod, _path="reference"),
    )
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, atol=2e-6, rtol=1e-5)


# ---- input validation ------------------------------------------------------------------------
def test_bad_inputs_raise_value_errors():
    cfg = flexnsa.NSAConfig(cmp_block=8, cmp_stride=4, slc_block=16, num_selected=4)
    s = dict(B=1, HQ=4, HKV=2, T=40, Dk=8, Dv=4, seed=0)
    q, k, v = window_inputs(s)
    _, kc, vc = compressed_inputs(s, cfg)
    win = fb.sliding_window_attention
    cmp = fb.compressed_attention
    cases = [
        (lambda: win(q, k, v, -1), "window"),
        (lambda: win(q, k, v, True), "window"),
        (lambda: win(q, k[:, :, :-1], v, 4), "k"),
        (lambda: win(q, k, v[:, :1], 4), "v"),
        (lambda: win(q, k[:, :1].expand(1, 3, 40, 8).contiguous(), v, 4), "heads"),
        (lambda: win(q, k.double(), v, 4), "k"),
        (lambda: win(q, k, v, 4, scale=-1.0), "scale"),
        (lambda: win(q, k, v, 4, mask_mod="causal"), "mask_mod"),
        (lambda: win(q[0], k, v, 4), "q"),
        (lambda: cmp(q, kc[:, :, :-1], vc, cfg), "k_cmp"),
        (lambda: cmp(q, kc, vc[:, :, :-1], cfg), "v_cmp"),
        (lambda: cmp(q, kc, vc.half(), cfg), "v_cmp"),
        (lambda: cmp(q, kc, vc, "paper"), "config"),
        (lambda: cmp(q, kc, vc, cfg, _num_chunks=0), "_num_chunks"),
    ]
    for call, word in cases:
        with pytest.raises(ValueError, match=word):
            call()


# ---- CUDA (skipped without a GPU; perf/gpu_check_flex.py is the full check) ------------------
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_cuda_forward_backward_match_reference(dtype):
    cfg = flexnsa.NSAConfig()
    s = dict(B=1, HQ=8, HKV=2, T=1000, Dk=64, Dv=32, seed=0)
    for name in ("window", "compressed"):
        if name == "window":
            inputs = [x.requires_grad_() for x in window_inputs(s, dtype, "cuda")]
            fast = lambda *x: fb.sliding_window_attention(*x, cfg.window)  # noqa: E731
            ref = lambda *x, **kw: reference.sliding_window_attention(*x, cfg.window, **kw)[0]  # noqa: E731
        else:
            inputs = [x.requires_grad_() for x in compressed_inputs(s, cfg, dtype, "cuda")]
            fast = lambda *x: fb.compressed_attention(*x, cfg, _num_chunks=2)  # noqa: E731
            ref = lambda *x, **kw: reference.compressed_attention(*x, cfg, **kw)[0]  # noqa: E731
        grad = torch.randn(1, 8, 1000, 32, device="cuda", dtype=dtype)
        out = fast(*inputs)
        grads = torch.autograd.grad(out, inputs, grad)
        exact_in = [x.detach().double().requires_grad_() for x in inputs]
        exact = ref(*exact_in)
        exact_grads = torch.autograd.grad(exact, exact_in, grad.double())
        lowp = ref(*inputs, upcast=False)
        lowp_grads = torch.autograd.grad(lowp, inputs, grad)
        assert_within_reference_error(out, exact, lowp, dtype, f"{name} o")
        for g, e, lp in zip(grads, exact_grads, lowp_grads):
            assert_within_reference_error(g, e, lp, dtype, f"{name} grad")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_forward_only_tiles_match_reference():
    """Forward-only calls use the branches' measured FlexAttention tiles (window 64x64 on a BlockMask of
    64-row tiles; compressed with TMA loads once Tc >= 2048): still within the bf16 reference's error,
    lse included."""
    from flexnsa import flex_runtime

    cfg = flexnsa.NSAConfig()
    q, k, v = window_inputs(dict(B=1, HQ=4, HKV=2, T=3000, Dk=128, Dv=128, seed=1), torch.bfloat16, "cuda")
    assert flex_runtime.kernel_options_for(q, v, fb._WINDOW_FWD_OPTIONS) == fb._WINDOW_FWD_OPTIONS
    assert fb.window_tile(q, v, grad=False) == 64  # 64-row BlockMask tiles (T = 3000 is not a multiple)
    with torch.no_grad():
        out = fb.sliding_window_attention(q, k, v, cfg.window)
    exact, lowp = window_reference(q.cpu(), k.cpu(), v.cpu(), cfg.window, torch.bfloat16)
    assert_within_reference_error(out.cpu(), exact, lowp, torch.bfloat16, "window o (forward tiles)")

    s = dict(B=1, HQ=2, HKV=1, T=33000, Dk=128, Dv=128, seed=2)
    assert cfg.num_cmp_tokens(s["T"]) >= fb._COMPRESSED_TMA_MIN_KEYS
    q, kc, vc = compressed_inputs(s, cfg, torch.bfloat16, "cuda")
    with torch.no_grad():
        out, lse = fb.compressed_attention(q, kc, vc, cfg, return_lse=True)
    (exact, exact_lse), (lowp, lowp_lse) = compressed_reference(q, kc, vc, cfg)
    assert_within_reference_error(out, exact, lowp, torch.bfloat16, "compressed o (TMA tiles)")
    assert_within_reference_error(lse, exact_lse, lowp_lse, torch.bfloat16, "compressed lse (TMA tiles)")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_training_forward_tiles_match_reference():
    """With gradients the branches' forward tiles go to FlexAttention with the ``fwd_`` prefix (the
    backward keeps inductor's tiles): forward and every input gradient within the bf16 reference's
    error, for the window (64x64 tiles) and the compressed branch with TMA loads (Tc >= 2048, one
    query chunk, K/V repeated to the query heads as in training)."""
    from flexnsa import flex_runtime

    cfg = flexnsa.NSAConfig()
    dtype = torch.bfloat16
    probe = torch.zeros(1, 1, 1, 128, device="cuda", dtype=dtype)
    assert flex_runtime.kernel_options_for(probe, probe, fb._WINDOW_FWD_OPTIONS, forward_only=False) == {
        "fwd_" + name: value for name, value in fb._WINDOW_FWD_OPTIONS.items()
    }
    cases = [
        ("window", dict(B=1, HQ=4, HKV=2, T=3000, Dk=128, Dv=128, seed=3)),
        ("compressed", dict(B=1, HQ=2, HKV=1, T=33000, Dk=128, Dv=64, seed=4)),
    ]
    for name, s in cases:
        if name == "window":
            inputs = [x.requires_grad_() for x in window_inputs(s, dtype, "cuda")]
            fast = lambda *x: fb.sliding_window_attention(*x, cfg.window)  # noqa: E731
            ref = lambda *x, **kw: reference.sliding_window_attention(*x, cfg.window, **kw)[0]  # noqa: E731
        else:
            assert cfg.num_cmp_tokens(s["T"]) >= fb._COMPRESSED_TMA_MIN_KEYS
            inputs = [x.requires_grad_() for x in compressed_inputs(s, cfg, dtype, "cuda")]
            fast = lambda *x: fb.compressed_attention(*x, cfg, _num_chunks=1)  # noqa: E731
            ref = lambda *x, **kw: reference.compressed_attention(*x, cfg, **kw)[0]  # noqa: E731
        out = fast(*inputs)
        grad = torch.randn_like(out)
        grads = torch.autograd.grad(out, inputs, grad)
        cpu = [x.detach().cpu() for x in inputs]
        exact_in = [x.double().requires_grad_() for x in cpu]
        exact = ref(*exact_in)
        exact_grads = torch.autograd.grad(exact, exact_in, grad.cpu().double())
        lowp_in = [x.clone().requires_grad_() for x in cpu]
        lowp = ref(*lowp_in, upcast=False)
        lowp_grads = torch.autograd.grad(lowp, lowp_in, grad.cpu())
        assert_within_reference_error(out.cpu(), exact, lowp, dtype, f"{name} o (training forward tiles)")
        for g, e, lp, arg in zip(grads, exact_grads, lowp_grads, ("q", "k", "v")):
            assert_within_reference_error(g.cpu(), e, lp, dtype, f"{name} d{arg} (training forward tiles)")


@pytest.mark.parametrize("branch", ["compressed", "window"])
def test_empty_branch_has_zero_gradients(branch):
    """T < l (no compressed token) and window 0 return zeros that autograd still sees as a function of
    the inputs: torch.autograd.grad gives exact zeros (on the H200 it raised "not used in the graph")."""
    cfg = flexnsa.NSAConfig()
    q = torch.randn(1, 3, 20, 64, requires_grad=True)
    if branch == "compressed":
        k = torch.randn(1, 1, 0, 64, requires_grad=True)
        v = torch.randn(1, 1, 0, 32, requires_grad=True)
        out = flexnsa.compressed_attention(q, k, v, cfg)
    else:
        k = torch.randn(1, 1, 20, 64, requires_grad=True)
        v = torch.randn(1, 1, 20, 32, requires_grad=True)
        out = flexnsa.sliding_window_attention(q, k, v, 0)
    assert torch.equal(out, torch.zeros_like(out))
    for grad in torch.autograd.grad(out.square().sum() + out.sum(), (q, k, v)):
        assert torch.equal(grad, torch.zeros_like(grad))
