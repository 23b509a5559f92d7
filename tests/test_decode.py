"""Decoding over NSACache: token-by-token and multi-token steps reproduce the full-sequence reference.

CPU tests run the pure-PyTorch decode path in float64 against ``flexnsa.reference.nsa_attention``;
the Triton kernels are checked under ``TRITON_INTERPRET=1`` in a subprocess on tiny shapes, and on
CUDA (skipped without it) in bf16 and under CUDA-graph capture.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import flexnsa
from flexnsa import reference
from flexnsa.cache import NSACache
from flexnsa.decode import decode_select_blocks, nsa_decode, nsa_decode_step, nsa_prefill

GROUPS = (1, 2, 3, 4, 8, 16)
F64 = torch.float64


# ---- problem construction --------------------------------------------------------------------
def linear_phi(x: torch.Tensor, weight: torch.Tensor, config) -> torch.Tensor:
    """An order-aware compressor: ``[N, H, S, D] -> [N, H, Tc(S), D]``, flattened block @ weight."""
    l, d = config.cmp_block, config.cmp_stride
    N, H, S, D = x.shape
    if S < l:
        return x.new_zeros(N, H, 0, weight.shape[-1])
    blocks = x.unfold(2, l, d).transpose(-1, -2).flatten(-2)  # [N, H, Tc, l * D]
    return blocks @ weight


def position_term(ends: torch.Tensor, dim: int, dtype) -> torch.Tensor:
    """``[M, dim]`` added to compressed keys at the position of their group's last token (a stand-in
    for the module's RoPE, which checks that ``compress`` gets the right ``ends``)."""
    freq = torch.arange(1, dim + 1, dtype=F64, device=ends.device) / dim
    return (0.3 * torch.sin(ends.to(F64)[:, None] * freq)).to(dtype)


class Problem:
    """Random full-sequence inputs and the matching ``compress`` callable."""

    def __init__(self, config, B, HKV, G, T, Dk, Dv, dtype=F64, separate_window=True, seed=0, device="cpu",
                 separate_cmp_raw=False):
        gen = torch.Generator().manual_seed(seed)
        rnd = lambda *shape: torch.randn(*shape, generator=gen, dtype=F64).to(device, dtype)  # noqa: E731
        HQ = HKV * G
        self.config, self.B, self.HKV, self.HQ, self.T, self.Dk, self.Dv = config, B, HKV, HQ, T, Dk, Dv
        self.q, self.k, self.v = rnd(B, HQ, T, Dk), rnd(B, HKV, T, Dk), rnd(B, HKV, T, Dv)
        self.k_win = rnd(B, HKV, T, Dk) if separate_window else None
        self.v_win = rnd(B, HKV, T, Dv) if separate_window else None
        self.gates = torch.rand(B, HQ, T, 3, generator=gen, dtype=F64).to(device, dtype)
        l = config.cmp_block
        self.wk = rnd(l * Dk, Dk) / (l * Dk) ** 0.5
        self.wv = rnd(l * Dv, Dv) / (l * Dv) ** 0.5
        self.k_cmp_raw = rnd(B, HKV, T, Dk) if separate_cmp_raw else None  # phi's own input
        self.v_cmp_raw = rnd(B, HKV, T, Dv) if separate_cmp_raw else None
        k_raw = self.k if self.k_cmp_raw is None else self.k_cmp_raw
        v_raw = self.v if self.v_cmp_raw is None else self.v_cmp_raw
        Tc = config.num_cmp_tokens(T)
        ends = torch.arange(Tc, device=device) * config.cmp_stride + l - 1
        self.k_cmp = linear_phi(k_raw, self.wk, config) + position_term(ends, Dk, dtype)
        self.v_cmp = linear_phi(v_raw, self.wv, config)

    def compress(self, k_blocks, v_blocks, ends):
        """:data:`flexnsa.cache.CompressFn`: blocks ``[B, HKV, M, l, D]`` -> ``[B, HKV, M, D]``."""
        k = k_blocks.flatten(-2) @ self.wk + position_term(ends, k_blocks.shape[-1], k_blocks.dtype)
        return k, v_blocks.flatten(-2) @ self.wv

    def window_kv(self, lo, hi):
        """The keyword arguments of the optional per-branch inputs for tokens ``lo .. hi - 1``."""
        extra = {}
        if self.k_win is not None:
            extra.update(k_win=self.k_win[:, :, lo:hi], v_win=self.v_win[:, :, lo:hi])
        if self.k_cmp_raw is not None:
            extra.update(k_cmp_raw=self.k_cmp_raw[:, :, lo:hi], v_cmp_raw=self.v_cmp_raw[:, :, lo:hi])
        return extra

    def reference(self, upcast=True):
        return reference.nsa_attention(
            self.q, self.k, self.v, self.k_cmp, self.v_cmp, self.gates, self.config,
            self.k_win, self.v_win, upcast=upcast,
        )

    def reference_scores(self):
        return reference.block_scores(self.q.to(F64), self.k_cmp.to(F64), self.config)

    def new_cache(self, max_len=None, **kw):
        kw.setdefault("share_window_kv", self.k_win is None)
        kw.setdefault("separate_cmp_raw", self.k_cmp_raw is not None)
        return NSACache(
            self.config, 1, self.B, self.HKV, max_len or self.T, self.Dk, self.Dv,
            dtype=self.q.dtype, device=self.q.device, **kw,
        )


def run_decode(problem: Problem, cache: NSACache, prompt: int, steps, backend="auto"):
    """Prefill ``prompt`` tokens, then append/decode chunks of the sizes in ``steps`` (cycled).
    Returns the outputs ``[B, HQ, T - prompt, Dv]`` and indices ``[B, HKV, T - prompt, n]``."""
    p, outs, idxs = problem, [], []
    if prompt:
        Tc = p.config.num_cmp_tokens(prompt)
        nsa_prefill(
            p.q[:, :, :prompt], p.k[:, :, :prompt], p.v[:, :, :prompt], p.k_cmp[:, :, :Tc],
            p.v_cmp[:, :, :Tc], p.gates[:, :, :prompt], cache, 0, **p.window_kv(0, prompt),
        )
    t, i = prompt, 0
    while t < p.T:
        hi = min(p.T, t + steps[i % len(steps)])
        sl = slice(t, hi)
        outs.append(nsa_decode(
            p.q[:, :, sl], p.k[:, :, sl], p.v[:, :, sl], p.gates[:, :, sl], cache, 0, p.compress,
            backend=backend, **p.window_kv(t, hi),
        ))
        idxs.append(decode_select_blocks(p.q[:, :, sl], cache, 0, backend=backend))
        t, i = hi, i + 1
    return torch.cat(outs, dim=2), torch.cat(idxs, dim=2)


def assert_selection_tie_aware(idx, idx_ref, scores_ref, rtol=1e-9, atol=1e-12):
    """Same block sets, or where they differ, the blocks swapped have equal reference scores."""
    NB = scores_ref.shape[-1]
    def one_hot(ix):
        picked = torch.zeros(*ix.shape[:-1], NB + 1, dtype=torch.bool)
        picked.scatter_(-1, torch.where(ix < 0, NB, ix).long().cpu(), True)
        return picked[..., :NB]
    got, want = one_hot(idx), one_hot(idx_ref)
    differ = got != want
    if not differ.any():
        return
    # every block picked only by one side must score like the weakest block picked by both sides
    s = scores_ref.cpu().to(F64)
    only_got = torch.where(got & ~want, s, float("nan"))
    only_want = torch.where(want & ~got, s, float("nan"))
    rows = differ.any(-1)
    lo = torch.nan_to_num(only_want, nan=float("inf")).amin(-1)[rows]
    hi = torch.nan_to_num(only_got, nan=float("-inf")).amax(-1)[rows]
    lo2 = torch.nan_to_num(only_got, nan=float("inf")).amin(-1)[rows]
    hi2 = torch.nan_to_num(only_want, nan=float("-inf")).amax(-1)[rows]
    tol = atol + rtol * s.abs().amax()
    assert torch.all((hi - lo).abs() <= tol) and torch.all((hi2 - lo2).abs() <= tol), (
        f"selections differ beyond ties: {differ.sum().item()} blocks"
    )


# ---- strategies ------------------------------------------------------------------------------
@st.composite
def configs(draw):
    d = draw(st.sampled_from([2, 4]))
    l = d * draw(st.integers(1, 3))
    bs = d * draw(st.integers(1, 3))
    n = draw(st.integers(1, 4))
    n_init = draw(st.integers(0, n))
    n_local = draw(st.integers(0, n - n_init))
    window = draw(st.sampled_from([0, 1, 5, 9]))
    return flexnsa.NSAConfig(l, d, bs, n, n_init, n_local, window)


@st.composite
def problems(draw, max_T=36):
    config = draw(configs())
    G = draw(st.sampled_from(GROUPS))
    HKV = draw(st.integers(1, 2)) if G <= 4 else 1
    B = draw(st.integers(1, 2))
    T = draw(st.integers(1, max_T))
    Dk, Dv = draw(st.sampled_from([(4, 4), (3, 5), (6, 2)]))
    separate = draw(st.booleans())
    separate_raw = draw(st.booleans())
    seed = draw(st.integers(0, 2**16))
    return Problem(config, B, HKV, G, T, Dk, Dv, separate_window=separate, seed=seed, separate_cmp_raw=separate_raw)


def check_against_reference(problem, out, idx, prompt):
    want = problem.reference()[:, :, prompt:]
    torch.testing.assert_close(out, want, rtol=1e-9, atol=1e-10)
    idx_ref = reference.select_blocks(problem.q, problem.k_cmp, problem.config)[:, :, prompt:]
    assert_selection_tie_aware(idx, idx_ref, problem.reference_scores()[:, :, prompt:])


# ---- CPU tests: the pure-PyTorch path in float64 ----------------------------------------------
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(problem=problems(), data=st.data())
def test_token_by_token_matches_full_sequence(problem, data):
    """Prefill a prompt (possibly empty, possibly shorter than l), then decode one token at a time:
    every row equals the full-sequence reference, across compressed-token and block boundaries."""
    prompt = data.draw(st.integers(0, problem.T - 1), label="prompt")
    cache = problem.new_cache(max_len=problem.T + data.draw(st.integers(0, 5), label="spare"))
    out, idx = run_decode(problem, cache, prompt, [1], backend="torch")
    check_against_reference(problem, out, idx, prompt)
    assert cache.seq_len() == problem.T


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(problem=problems(), data=st.data())
def test_multi_token_steps_match_full_sequence(problem, data):
    """Chunks of several tokens (more than d: several compressed tokens complete in one append) are
    causal inside the chunk and equal the reference rows."""
    prompt = data.draw(st.integers(0, problem.T - 1), label="prompt")
    steps = data.draw(st.lists(st.integers(1, 9), min_size=1, max_size=4), label="steps")
    out, idx = run_decode(problem, problem.new_cache(), prompt, steps, backend="torch")
    check_against_reference(problem, out, idx, prompt)


def test_cache_holds_the_full_sequence_compressed_tokens():
    """After decoding, the cache's compressed rows are exactly phi over the raw groups, appended
    as soon as each group completed, and the raw rows are the inputs."""
    cfg = flexnsa.NSAConfig(cmp_block=6, cmp_stride=2, slc_block=4, num_selected=2, num_local_blocks=1, window=3)
    p = Problem(cfg, 2, 2, 3, 23, 4, 5, separate_cmp_raw=True)
    cache = p.new_cache(max_len=30)
    held_cmp = []
    for t in range(p.T):
        cache.append(0, p.k[:, :, t : t + 1], p.v[:, :, t : t + 1], p.compress, **p.window_kv(t, t + 1))
        held_cmp.append(cfg.num_cmp_tokens(t + 1))
        Tc = held_cmp[-1]
        torch.testing.assert_close(cache.layers[0].k_cmp[:, :, :Tc], p.k_cmp[:, :, :Tc], rtol=0, atol=1e-12)
        assert cache.layers[0].k_cmp[:, :, Tc:].abs().sum() == 0  # nothing written past Tc(t + 1)
    layer = cache.layers[0]
    assert torch.equal(layer.k[:, :, : p.T], p.k) and torch.equal(layer.v_win[:, :, : p.T], p.v_win)
    assert torch.equal(layer.k_cmp_raw[:, :, : p.T], p.k_cmp_raw)
    torch.testing.assert_close(layer.v_cmp[:, :, : held_cmp[-1]], p.v_cmp, rtol=0, atol=1e-12)


def test_shared_window_kv_aliases_buffers():
    cfg = flexnsa.NSAConfig(cmp_block=4, cmp_stride=2, slc_block=4, num_selected=2, num_local_blocks=1, window=5)
    p = Problem(cfg, 1, 2, 4, 19, 4, 4, separate_window=False)
    cache = p.new_cache()
    assert cache.layers[0].k_win is cache.layers[0].k
    out, idx = run_decode(p, cache, 7, [1, 3], backend="torch")
    check_against_reference(p, out, idx, 7)


def test_paper_config_crosses_blocks():
    """The paper's l=32, d=16, l'=64 with a shrunken n and window, G=16, T spanning several blocks."""
    cfg = flexnsa.NSAConfig(num_selected=3, window=40)
    p = Problem(cfg, 1, 1, 16, 200, 8, 6)
    out, idx = run_decode(p, p.new_cache(max_len=256), 120, [1, 17, 1, 40], backend="torch")
    check_against_reference(p, out, idx, 120)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_low_precision_error_is_reference_sized(dtype):
    """The torch path in bf16/fp32: error vs float64 within 3x that of the reference run in the
    same dtype (selection forced equal to isolate the arithmetic)."""
    cfg = flexnsa.NSAConfig(cmp_block=8, cmp_stride=4, slc_block=8, num_selected=3, window=10)
    p64 = Problem(cfg, 2, 2, 3, 40, 16, 8, seed=3)
    p = Problem(cfg, 2, 2, 3, 40, 16, 8, seed=3, dtype=dtype)
    idx = reference.select_blocks(p64.q, p64.k_cmp, cfg)
    exact = reference.nsa_attention(p64.q, p64.k, p64.v, p64.k_cmp, p64.v_cmp, p64.gates, cfg,
                                    p64.k_win, p64.v_win, block_indices=idx)
    low = reference.nsa_attention(p.q, p.k, p.v, p.k_cmp, p.v_cmp, p.gates, cfg, p.k_win, p.v_win,
                                  block_indices=idx, upcast=False)
    cache = p.new_cache()
    # low-precision compress output differs from p.k_cmp: feed the cache the same compressed rows
    cache.prefill(0, p.k[:, :, :20], p.v[:, :, :20], p.k_cmp[:, :, :4], p.v_cmp[:, :, :4], **p.window_kv(0, 20))
    from flexnsa.decode import torch_decode_step

    outs = []
    for t in range(20, 40):
        cache.append(0, p.k[:, :, t : t + 1], p.v[:, :, t : t + 1], p.compress, **p.window_kv(t, t + 1))
        Tc = cfg.num_cmp_tokens(t + 1)
        cache.layers[0].k_cmp[:, :, :Tc] = p.k_cmp[:, :, :Tc]
        cache.layers[0].v_cmp[:, :, :Tc] = p.v_cmp[:, :, :Tc]
        o, _ = torch_decode_step(p.q[:, :, t : t + 1], cache, 0, p.gates[:, :, t : t + 1], 16**-0.5,
                                 block_indices=idx[:, :, t : t + 1])
        outs.append(o)
    out = torch.cat(outs, dim=2)
    assert out.dtype == dtype and not out.isnan().any()
    err = (out.to(F64) - exact[:, :, 20:]).abs().max()
    err_ref = (low.to(F64) - exact).abs()[:, :, 20:].max()
    assert err <= 3 * err_ref + 1e-6, (err, err_ref)


def test_decode_step_compiles_without_graph_breaks():
    """append + decode step (torch backend) under torch.compile(fullgraph=True): same result, and
    one graph serves every length (the length lives on the device)."""
    cfg = flexnsa.NSAConfig(cmp_block=4, cmp_stride=2, slc_block=4, num_selected=2, num_local_blocks=1, window=3)
    p = Problem(cfg, 1, 1, 2, 14, 4, 4)
    eager_cache, compiled_cache = p.new_cache(), p.new_cache()

    def step(cache, q, k, v, gates, k_win, v_win):
        return nsa_decode(q, k, v, gates, cache, 0, p.compress, k_win=k_win, v_win=v_win, backend="torch")

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager", dynamic=False)
    for t in range(9, 14):
        args = [x[:, :, t : t + 1] for x in (p.q, p.k, p.v, p.gates, p.k_win, p.v_win)]
        want = step(eager_cache, *args)
        got = compiled(compiled_cache, *args)
        torch.testing.assert_close(got, want, rtol=0, atol=1e-12)


# ---- validation --------------------------------------------------------------------------------
def test_invalid_arguments_raise_value_error():
    cfg = flexnsa.NSAConfig(cmp_block=4, cmp_stride=2, slc_block=4, num_selected=2, num_local_blocks=1, window=3)
    p = Problem(cfg, 1, 2, 2, 8, 4, 4)
    cache = p.new_cache(max_len=8)
    q, k, v, g = p.q[:, :, :1], p.k[:, :, :1], p.v[:, :, :1], p.gates[:, :, :1]
    kw = p.window_kv(0, 1)
    cases = [
        ("layer_idx", lambda: nsa_decode_step(q, cache, 1, g)),
        ("q", lambda: nsa_decode_step(q[..., :3], cache, 0, g)),
        ("q", lambda: nsa_decode_step(q.float(), cache, 0, g)),
        ("heads", lambda: nsa_decode_step(q[:, :3], cache, 0, g[:, :3])),
        ("gates", lambda: nsa_decode_step(q, cache, 0, g[..., :2])),
        ("gates", lambda: nsa_decode_step(q, cache, 0, None)),
        ("config", lambda: nsa_decode_step(q, cache, 0, g, flexnsa.NSAConfig())),
        ("backend", lambda: nsa_decode_step(q, cache, 0, g, backend="cuda")),
        ("backend", lambda: nsa_decode_step(q, cache, 0, g, backend="triton")),  # float64
        ("k", lambda: cache.append(0, k[..., :3], v, p.compress, **kw)),
        ("v_win", lambda: cache.append(0, k, v, p.compress, k_win=kw["k_win"])),
        ("compress", lambda: cache.append(0, k, v, None, **kw)),
        ("compress must return", lambda: cache.append(0, k, v, lambda a, b, e: (a, b), **kw)),
        ("k_cmp_raw", lambda: cache.append(0, k, v, p.compress, k_cmp_raw=k, v_cmp_raw=v, **kw)),
        ("k_cmp_raw", lambda: NSACache(cfg, 1, 1, 2, 8, 4, separate_cmp_raw=True).append(0, k, v, p.compress)),
        ("k_cmp", lambda: cache.prefill(0, p.k, p.v, p.k_cmp[:, :, :1], p.v_cmp, **p.window_kv(0, 8))),
        ("max_len", lambda: NSACache(cfg, 1, 1, 2, 0, 4)),
        ("dtype", lambda: NSACache(cfg, 1, 1, 2, 8, 4, dtype=torch.int32)),
        ("config", lambda: NSACache(None, 1, 1, 2, 8, 4)),
    ]
    for needle, call in cases:
        with pytest.raises(ValueError, match=needle):
            call()
    cache.prefill(0, p.k, p.v, p.k_cmp, p.v_cmp, **p.window_kv(0, 8))
    with pytest.raises(ValueError, match="max_len"):  # full: caught on the host on the CPU
        cache.append(0, k, v, p.compress, **kw)
    assert cache.seq_len() == 8


# ---- Triton kernels under the interpreter (subprocess: TRITON_INTERPRET must be set at import) ----
_INTERPRETER_SCRIPT = textwrap.dedent(
    """
    import sys, torch, flexnsa
    sys.path.insert(0, {tests_dir!r})
    from test_decode import Problem, check_against_reference
    from flexnsa.cache import NSACache
    from flexnsa.decode import nsa_decode, nsa_prefill
    from flexnsa.custom_ops import decode_ops
    from flexnsa import reference

    def run(cfg, B, HKV, G, T, Dk, Dv, prompt, steps, tuning, separate=True):
        kw = dict(separate_window=separate, seed=T, separate_cmp_raw=separate)
        p64 = Problem(cfg, B, HKV, G, T, Dk, Dv, **kw)
        p = Problem(cfg, B, HKV, G, T, Dk, Dv, dtype=torch.float32, **kw)
        cache = p.new_cache(max_len=T + 3)
        if prompt:
            Tc = cfg.num_cmp_tokens(prompt)
            cache.prefill(0, p.k[:, :, :prompt], p.v[:, :, :prompt], p.k_cmp[:, :, :Tc], p.v_cmp[:, :, :Tc],
                          **p.window_kv(0, prompt))
        outs, idxs, t, i = [], [], prompt, 0
        while t < T:
            hi = min(T, t + steps[i % len(steps)])
            sl = slice(t, hi)
            cache.append(0, p.k[:, :, sl], p.v[:, :, sl], p.compress, **p.window_kv(t, hi))
            o, idx = decode_ops.decode_attention(p.q[:, :, sl], cache, 0, p.gates[:, :, sl], Dk ** -0.5, tuning)
            outs.append(o); idxs.append(idx); t, i = hi, i + 1
        out, idx = torch.cat(outs, 2), torch.cat(idxs, 2)
        assert out.dtype == torch.float32 and not out.isnan().any()
        # float32 kernels (ieee dots) vs the float64 reference; selection tie-aware
        want = p64.reference()[:, :, prompt:]
        err = (out.double() - want).abs().max().item()
        assert err < 2e-5, err
        from test_decode import assert_selection_tie_aware
        idx_ref = reference.select_blocks(p64.q, p64.k_cmp, cfg)[:, :, prompt:]
        assert_selection_tie_aware(idx, idx_ref, p64.reference_scores()[:, :, prompt:], rtol=1e-5)
        print("ok", cfg, G, T, prompt, steps, err)

    T = decode_ops.DecodeTuning
    # several compressed splits and selection chunks, GQA G=3, Dk != Dv, multi-token steps
    run(flexnsa.NSAConfig(8, 4, 8, 3, 1, 1, 6), 2, 2, 3, 41, 5, 7, 27, [1, 6, 2],
        T(cmp_tile_tokens=4, select_chunk_blocks=2, slc_tiles_per_program=1, programs_per_sm=2,
      cmp_programs_per_sm=4))
    # spill of two blocks (l = 3 l'), G=16, shared window K/V, window off; 3 ranks per selection
    # program for n = 4 (ranks past n masked)
    run(flexnsa.NSAConfig(12, 4, 4, 4, 0, 2, 0), 1, 1, 16, 37, 8, 8, 30, [1, 3],
        T(cmp_tile_tokens=2, select_chunk_blocks=2, slc_tiles_per_program=3, programs_per_sm=2), separate=False)
    # prompt shorter than l (no compressed token yet), G=1, then crossing the first boundaries
    run(flexnsa.NSAConfig(16, 8, 16, 2, 1, 1, 5), 1, 2, 1, 19, 4, 4, 9, [1, 2], T(programs_per_sm=1))
    """
)


def test_triton_kernels_under_interpreter():
    script = _INTERPRETER_SCRIPT.format(tests_dir=os.path.dirname(__file__))
    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.count("ok ") == 3, proc.stdout


_TOPN_SCRIPT = textwrap.dedent(
    """
    import sys, dataclasses, torch, flexnsa
    sys.path.insert(0, {tests_dir!r})
    from test_decode import Problem
    from flexnsa.custom_ops import decode_kernels, decode_ops

    captured = []  # the candidates tensor of every selection launch
    real_select = decode_kernels._select_kernel

    class CaptureSelect:
        def __getitem__(self, grid):
            launch = real_select[grid]
            def run(*args, **kw):
                captured.append(args[4])
                return launch(*args, **kw)
            return run

    decode_kernels._select_kernel = CaptureSelect()
    T = decode_ops.DecodeTuning

    def step(q, cache, gates, scale, tuning):
        captured.clear()
        o, idx = decode_ops.decode_attention(q, cache, 0, gates, scale, tuning)
        return o, idx, captured[0].clone()

    def run(cfg, B, HKV, G, T_len, D, prompt, steps, seed, **tune):
        p = Problem(cfg, B, HKV, G, T_len, D, D, dtype=torch.float32, seed=seed)
        cache = p.new_cache(max_len=T_len + 3)
        rank, serial = T(select_topn="rank", **tune), T(select_topn="serial", **tune)
        group = T(select_topn="rank", combine_per_group=True, **tune)
        plan = decode_ops._plan(cfg, cache.max_len, B, G * HKV, HKV, D, D, p.q.device, rank)
        n_keys = plan.TB * plan.BJ  # real keys of a chunk
        assert plan.NCHUNK > 1, plan
        if prompt:
            Tc = cfg.num_cmp_tokens(prompt)
            cache.prefill(0, p.k[:, :, :prompt], p.v[:, :, :prompt], p.k_cmp[:, :, :Tc], p.v_cmp[:, :, :Tc],
                          **p.window_kv(0, prompt))
        t, i, short, full = prompt, 0, 0, 0
        while t < T_len:
            hi = min(T_len, t + steps[i % len(steps)])
            sl = slice(t, hi)
            cache.append(0, p.k[:, :, sl], p.v[:, :, sl], p.compress, **p.window_kv(t, hi))
            q, gates = p.q[:, :, sl], p.gates[:, :, sl]
            o_r, idx_r, cand_r = step(q, cache, gates, D ** -0.5, rank)
            o_s, idx_s, cand_s = step(q, cache, gates, D ** -0.5, serial)
            o_g, idx_g, _ = step(q, cache, gates, D ** -0.5, group)
            # the same eligible keys (>= 2^32) in the same slots, ineligible ones (block -1) elsewhere
            eligible = lambda c: torch.where(c >= 2**32, c, -1)  # noqa: E731
            assert torch.equal(eligible(cand_r), eligible(cand_s)), (t, cand_r, cand_s)
            assert (cand_r >= -1).all() and (cand_s >= -1).all()
            assert torch.equal(idx_r, idx_s) and torch.equal(o_r, o_s), t
            assert torch.equal(idx_g, idx_r), t
            torch.testing.assert_close(o_g, o_r, rtol=1e-6, atol=1e-6)
            if i == 0:  # the torch.compile path: the op with the tuning encoded as ints
                layer = cache.layers[0]
                o_op, idx_op = torch.ops.flexnsa.decode_attention(
                    q, layer.k, layer.v, layer.k_win, layer.v_win, layer.k_cmp, layer.v_cmp,
                    cache.lengths[0:1], gates, list(dataclasses.astuple(cfg)), cache.max_len, D ** -0.5,
                    decode_ops._tuning_to_ints(serial))
                assert torch.equal(o_op, o_s) and torch.equal(idx_op, idx_s)
            n_blocks = (hi - 1) // cfg.slc_block + 1  # eligible blocks of the last row
            short += n_blocks < cfg.num_selected
            full += n_blocks >= cfg.num_selected
            t, i = hi, i + 1
        assert short and full, (short, full)  # rows with fewer than n eligible blocks, and with n or more
        print("ok", G, plan.BJ, plan.TB, plan.NCHUNK, n_keys, cfg.num_selected, i)

    # G=3, a chunk of one 2-block tile for n=3: the -1 fill of the slots past the chunk's keys
    run(flexnsa.NSAConfig(8, 4, 8, 3, 1, 1, 6), 1, 2, 3, 30, 5, 6, [1, 6, 2], seed=1,
        cmp_tile_tokens=4, select_chunk_blocks=2, slc_tiles_per_program=1)
    # G=16, 3 blocks per tile padded to 4 (padded lanes dropped), 2 tiles per chunk: 6 keys for n=8;
    # window off (no window programs to combine)
    run(flexnsa.NSAConfig(8, 4, 4, 8, 1, 2, 0), 1, 1, 16, 34, 4, 3, [1, 4, 6], seed=2,
        cmp_tile_tokens=3, select_chunk_blocks=6)
    # G=1, 2 tiles of 2 blocks per chunk, more keys than n: the scatter alone (and a 2-block spill)
    run(flexnsa.NSAConfig(16, 4, 8, 3, 0, 1, 9), 1, 2, 1, 48, 4, 10, [1, 5, 2, 9], seed=3,
        cmp_tile_tokens=4, select_chunk_blocks=4, programs_per_sm=1)
    """
)


def test_rank_topn_matches_serial_under_interpreter():
    """select_topn="rank" writes the serial loop's eligible candidates in the same slots (so the
    same indices and outputs, bit for bit), over steps with fewer and with more than n eligible
    blocks, several chunks, G 1/3/16; the per-group combine matches the per-head one up to rounding;
    the op path (torch.compile's) decodes the tuning from ints."""
    script = _TOPN_SCRIPT.format(tests_dir=os.path.dirname(__file__))
    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.count("ok ") == 3, proc.stdout


def test_decode_tuning_validates_and_round_trips():
    from flexnsa.custom_ops.decode_ops import DecodeTuning, _tuning_from_ints, _tuning_to_ints

    with pytest.raises(ValueError, match="select_topn"):
        DecodeTuning(select_topn="bitonic")
    with pytest.raises(ValueError, match="combine_per_group"):
        DecodeTuning(combine_per_group=1)
    for tuning in (DecodeTuning(), DecodeTuning(select_topn="serial", combine_per_group=True, cmp_splits=5)):
        ints = _tuning_to_ints(tuning)
        assert all(type(x) is int for x in ints) and _tuning_from_ints(ints) == tuning


# ---- GPU --------------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("G", [1, 3, 16])
def test_triton_decode_matches_reference_bf16(G):
    cfg = flexnsa.NSAConfig(num_selected=4, window=100)
    p64 = Problem(cfg, 2, 2, G, 700, 64, 32, device="cuda", seed=G)
    p = Problem(cfg, 2, 2, G, 700, 64, 32, device="cuda", seed=G, dtype=torch.bfloat16)
    prompt = 600
    out, idx = run_decode(p, p.new_cache(max_len=720), prompt, [1, 5, 1, 40], backend="triton")
    idx_ref = reference.select_blocks(p64.q, p64.k_cmp, cfg)[:, :, prompt:]
    assert_selection_tie_aware(idx.cpu(), idx_ref.cpu(), p64.reference_scores()[:, :, prompt:], rtol=2e-2)
    # outputs compared under the kernels' own selection, against float64 and low-precision references
    full_idx = torch.cat([reference.select_blocks(p64.q, p64.k_cmp, cfg)[:, :, :prompt], idx.long()], 2)
    exact = reference.nsa_attention(p64.q, p64.k, p64.v, p64.k_cmp, p64.v_cmp, p64.gates, cfg,
                                    p64.k_win, p64.v_win, block_indices=full_idx)[:, :, prompt:]
    low = reference.nsa_attention(p.q, p.k, p.v, p.k_cmp, p.v_cmp, p.gates, cfg, p.k_win, p.v_win,
                                  block_indices=full_idx, upcast=False)[:, :, prompt:]
    err = (out.double() - exact).abs().max()
    err_ref = (low.double() - exact).abs().max()
    assert not out.isnan().any() and err <= 3 * err_ref + 1e-3, (err, err_ref)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_decode_step_replays_in_a_cuda_graph():
    cfg = flexnsa.NSAConfig(num_selected=4, window=64)
    p = Problem(cfg, 2, 2, 8, 400, 64, 64, device="cuda", dtype=torch.bfloat16)
    eager, graphed = p.new_cache(max_len=400), p.new_cache(max_len=400)
    for cache in (eager, graphed):
        Tc = cfg.num_cmp_tokens(300)
        cache.prefill(0, p.k[:, :, :300], p.v[:, :, :300], p.k_cmp[:, :, :Tc], p.v_cmp[:, :, :Tc], **p.window_kv(0, 300))
    static = [x[:, :, 300:301].clone() for x in (p.q, p.k, p.v, p.gates, p.k_win, p.v_win)]

    def step(cache):
        q, k, v, g, kw, vw = static
        return nsa_decode(q, k, v, g, cache, 0, p.compress, k_win=kw, v_win=vw, backend="triton")

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up (compiles the kernels), then undo its append
        step(graphed)
        graphed.lengths.sub_(1)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):  # records the step without running it
        out = step(graphed)
    for t in range(300, 340):
        for buf, x in zip(static, (p.q, p.k, p.v, p.gates, p.k_win, p.v_win)):
            buf.copy_(x[:, :, t : t + 1])
        graph.replay()
        want = step(eager)
        torch.testing.assert_close(out, want, rtol=0, atol=0)
    assert graphed.seq_len() == eager.seq_len() == 340
