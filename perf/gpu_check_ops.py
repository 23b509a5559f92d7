#!/usr/bin/env python
"""GPU check of the selection branch's Triton ops (``flexnsa.custom_ops``): correctness, then timings.
Exits non-zero when a result is wrong.

    OUT=perf/results/h200 python perf/gpu_check_ops.py        # about 3-4 minutes on an H200
    python perf/gpu_check_ops.py --no-256k          # without the 256k smoke run

(a) Correctness against ``flexnsa.reference`` in float64 on the GPU, flash-attention style: the
    error of the kernels must be <= 3x the error of the reference run in the input dtype
    (``upcast=False``) plus a small floor relative to the largest reference value; never NaN.
    T in {1000, 4096} (B=1, HKV=2), G in {1, 4, 16}, Dk/Dv in {64/64, 128/128, 192/128}, bf16, plus
    fp16 (G=4, 128/128) and fp32 (G=3, 64/64) at T=1000: the select kernel (tie-aware against the reference selection), the
    forward (o, lse) and the backward (dq, dk, dv) on the kernel's selection, and once on random
    valid indices (-1 anywhere, blocks after the query, random slot order). Deterministic dK/dV
    everywhere; on four cases also the atomic dK/dV, the random indices, and the deterministic path
    twice (bitwise equal, the second under ``torch.use_deterministic_algorithms(True)``).
(b) T = 64k, paper shape (B=1, HQ=64, HKV=4, Dk=Dv=128, bf16): the select kernel on all queries,
    compared tie-aware on 512 sampled queries (the first and last included) with float64 scores
    computed only for those rows; o, lse and dq on 256 sampled rows against a float64 gather
    reference (and the same gather in bf16 for the tolerance).
(b2) Select paths v1, v2 and split (``FLEXNSA_SELECT_IMPL``) on the same 64k inputs, Dk/Dv 128/128 and
    192/128: each checked tie-aware on 512 sampled queries and timed; prints which is faster.
(c) Timings at 64k (``triton.testing.do_bench``, median ms) of select_blocks, the selected forward
    and the backward (deterministic and atomic dK/dV), for Dk/Dv 128/128 and 192/128, with the
    FLOP and byte counts and achieved TFLOP/s and TB/s, and a per-kernel breakdown of the backward
    from ``torch.profiler``.
(d) T = 256k smoke run (int64 offsets: q holds 2^31 elements): select, forward and backward finish,
    sampled rows correct, gradients finite.
Launch-parameter sweeps: ``perf/gpu_sweep.py``.

Writes ``gpu_check_ops.json`` and ``gpu_check_ops.md`` under ``$OUT`` (default ``perf/results/tmp``),
rewritten after every stage (a time-out keeps what was done), and prints the summary table last.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import pathlib
import sys
import time
import traceback

REPO_ROOT = pathlib.Path(__file__).resolve().parent.parent

import torch  # noqa: E402
from _timing import kernel_times  # noqa: E402

import flexnsa  # noqa: E402  (installed: pip install -e .)

import flexnsa.custom_ops as custom_ops  # noqa: E402
from flexnsa import reference  # noqa: E402
from flexnsa.custom_ops import kernel_utils  # noqa: E402

F64 = torch.float64
DEVICE = "cuda"  # "cpu" with --cpu-smoke
FLOOR = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 1e-2}
PAPER = flexnsa.NSAConfig()  # l=32, d=16, l'=64, n=16, 1 init + 2 local blocks
START = time.time()
FAILURES: list[str] = []
RESULTS: dict = {"correctness": [], "select_64k": None, "rows_64k": None, "select_impls": [], "timings": [],
                 "t256k": None}


def elapsed() -> float:
    return time.time() - START


def log(msg: str) -> None:
    print(f"[{elapsed():6.1f}s] {msg}", flush=True)


def record_failure(what: str, err: BaseException | str) -> None:
    text = err if isinstance(err, str) else "".join(traceback.format_exception(err))
    FAILURES.append(f"{what}: {text}")
    log(f"FAIL {what}: {text.strip().splitlines()[-1] if text.strip() else text}")


# ---- inputs and comparisons -------------------------------------------------------------------
def rnd(shape, dtype, gen):
    return torch.randn(shape, generator=gen, device=DEVICE, dtype=torch.float32).to(dtype)


def generator(seed):
    return torch.Generator(device=DEVICE).manual_seed(seed)


def compressed_lse(q, k_cmp, cfg, scale, chunk=2048):
    """``[B, HQ, T]`` float32 log-sum-exp of the compressed branch, in query chunks (no [T, Tc]
    tensor for all of T at once); ``-inf`` where no compressed token is visible."""
    B, HQ, T, _ = q.shape
    HKV, Tc = k_cmp.shape[1], k_cmp.shape[2]
    G = HQ // HKV
    out = torch.full((B, HQ, T), -math.inf, device=q.device)
    if Tc == 0:
        return out
    kc = k_cmp.float().repeat_interleave(G, dim=1)  # [B, HQ, Tc, Dk]
    i = torch.arange(Tc, device=q.device)
    for t0 in range(0, T, chunk):
        t = torch.arange(t0, min(T, t0 + chunk), device=q.device)
        logits = (q[:, :, t0 : t0 + chunk].float() @ kc.transpose(-1, -2)) * scale  # [B, HQ, c, Tc]
        visible = i[None, :] * cfg.cmp_stride + cfg.cmp_block - 1 <= t[:, None]
        out[:, :, t0 : t0 + chunk] = torch.logsumexp(torch.where(visible, logits, -math.inf), dim=-1)
    return out


def keys_for_rows(q, k_cmp, cfg, scale, rows):
    """float64 ``[B, HKV, R, NB]`` selection keys of query rows ``rows``: block scores computed
    from scratch in float64 (own lse), forced blocks ``+inf``, ineligible ``-inf``."""
    B, HQ, T, _ = q.shape
    HKV, Tc = k_cmp.shape[1], k_cmp.shape[2]
    G, NB = HQ // HKV, cfg.num_blocks(T)
    qr = q[:, :, rows].to(F64)  # [B, HQ, R, Dk]
    kc = k_cmp.to(F64).repeat_interleave(G, dim=1)  # [B, HQ, Tc, Dk]
    logits = (qr @ kc.transpose(-1, -2)) * scale  # [B, HQ, R, Tc]
    i = torch.arange(Tc, device=q.device)
    visible = i[None, :] * cfg.cmp_stride + cfg.cmp_block - 1 <= rows[:, None]  # [R, Tc]
    lse = torch.logsumexp(torch.where(visible, logits, -math.inf), dim=-1, keepdim=True)
    probs = torch.where(visible, torch.exp(logits - torch.where(torch.isinf(lse), 0.0, lse)), 0.0)
    weights = reference.overlap_weights(cfg, Tc, NB, q.device, F64)  # [Tc, NB]
    scores = (probs @ weights).unflatten(1, (HKV, G)).sum(2)  # [B, HKV, R, NB]
    own = rows[:, None] // cfg.slc_block
    j = torch.arange(NB, device=q.device)[None, :]
    eligible = j <= own
    forced = eligible & ((j < cfg.num_init_blocks) | (j > own - cfg.num_local_blocks))
    return torch.where(forced, math.inf, torch.where(eligible, scores, -math.inf))


def picked(idx, NB):
    idx = idx.long()
    if not bool(((idx >= -1) & (idx < NB)).all()):
        raise AssertionError("index out of range")
    mask = torch.zeros(*idx.shape[:-1], NB + 1, dtype=torch.bool, device=idx.device)
    mask.scatter_(-1, torch.where(idx < 0, NB, idx), True)
    mask = mask[..., :NB]
    if not torch.equal(mask.sum(-1), (idx >= 0).sum(-1)):
        raise AssertionError("a block appears twice in one row")
    return mask


def selection_disagreement(idx, idx_ref, keys, rtol=2e-5, atol=1e-9) -> tuple[int, int]:
    """Tie-aware (NSA_SPEC.md): rows whose sets differ beyond rounding, and rows that differ at all."""
    a, b = picked(idx, keys.shape[-1]), picked(idx_ref, keys.shape[-1])
    differ = a ^ b
    rows = differ.any(-1)
    hi = torch.where(differ, keys, -math.inf).amax(-1)
    lo = torch.where(differ, keys, math.inf).amin(-1)
    ok = torch.isfinite(hi) & torch.isfinite(lo) & (hi - lo <= atol + rtol * torch.maximum(hi.abs(), lo.abs()))
    bad = (rows & ~ok) | (a.sum(-1) != b.sum(-1))
    return int(bad.sum()), int(rows.sum())


def top_n_from_keys(keys, n):
    """Exact top-n of float64 keys (ties to the lower block), unused slots -1."""
    order = torch.sort(keys, dim=-1, descending=True, stable=True).indices[..., :n]
    chosen = torch.gather(keys, -1, order) > -math.inf
    idx = torch.where(chosen, order, -1)
    if idx.shape[-1] < n:
        idx = torch.cat([idx, idx.new_full((*idx.shape[:-1], n - idx.shape[-1]), -1)], dim=-1)
    return idx


def fa_check(name, fast, low, exact, dtype, factor=3.0) -> dict:
    fast, low, exact = (x.detach().to(F64) for x in (fast, low, exact))
    inf = torch.isinf(exact)
    res = {"name": name, "nan": bool(torch.isnan(fast).any())}
    res["inf_match"] = bool(torch.equal(torch.isinf(fast), inf)) and bool(torch.equal(fast[inf], exact[inf]))
    fin = ~inf
    if fin.any():
        res["err"] = (fast[fin] - exact[fin]).abs().max().item()
        res["err_low"] = (low[fin] - exact[fin]).abs().max().item()
        res["floor"] = FLOOR[dtype] * max(1.0, exact[fin].abs().max().item())
    else:
        res["err"] = res["err_low"] = res["floor"] = 0.0
    res["ok"] = (not res["nan"]) and res["inf_match"] and res["err"] <= factor * res["err_low"] + res["floor"]
    return res


def reference_run(q, k, v, idx, cfg, scale, grad_out, dtype, upcast):
    q, k, v = (x.detach().to(dtype).requires_grad_() for x in (q, k, v))
    o, lse = reference.selected_attention(q, k, v, idx, cfg, scale, upcast=upcast)
    return (o, lse, *torch.autograd.grad(o, (q, k, v), grad_out.to(dtype)))


def kernel_run(q, k, v, idx, cfg, scale, grad_out):
    q, k, v = (x.detach().clone().requires_grad_() for x in (q, k, v))
    o, lse = custom_ops.selected_attention(q, k, v, idx, cfg, scale)
    return (o, lse, *torch.autograd.grad(o, (q, k, v), grad_out))


def random_indices(B, HKV, T, n, NB, gen):
    idx = torch.rand(B, HKV, T, NB, generator=gen, device=DEVICE).argsort(-1)[..., :n]
    if idx.shape[-1] < n:
        idx = torch.cat([idx, idx.new_full((B, HKV, T, n - idx.shape[-1]), -1)], dim=-1)
    idx = torch.where(torch.rand(B, HKV, T, n, generator=gen, device=DEVICE) < 0.3, -1, idx)
    idx[0, 0, 0] = -1
    return idx.to(torch.int32)


# ---- (a) correctness at 1k / 4k ---------------------------------------------------------------
def check_case(T, G, Dk, Dv, dtype, seed, extra=False):
    B, HKV = 1, 2
    cfg = PAPER
    scale = 1.0 / math.sqrt(Dk)
    gen = generator(seed)
    q, k, v = rnd((B, HKV * G, T, Dk), dtype, gen), rnd((B, HKV, T, Dk), dtype, gen), rnd((B, HKV, T, Dv), dtype, gen)
    k_cmp = rnd((B, HKV, cfg.num_cmp_tokens(T), Dk), dtype, gen)
    lse_cmp = compressed_lse(q, k_cmp, cfg, scale)
    case = {"T": T, "G": G, "Dk": Dk, "Dv": Dv, "dtype": str(dtype).replace("torch.", ""), "checks": []}
    idx = custom_ops.select_blocks(q, k_cmp, lse_cmp, cfg, scale)
    idx_ref = reference.select_blocks(q, k_cmp, cfg, scale, lse=lse_cmp)
    keys = keys_for_rows(q, k_cmp, cfg, scale, torch.arange(T, device=DEVICE))
    bad, differ = selection_disagreement(idx, idx_ref, keys)
    case["select_bad_rows"], case["select_differing_rows"] = bad, differ
    if bad:
        record_failure(f"select T={T} G={G} {Dk}/{Dv} {dtype}", f"{bad} rows disagree beyond ties")
    grad_out = rnd((B, HKV * G, T, Dv), dtype, gen)
    index_sets = [("selected", idx)]
    if extra:
        index_sets.append(("random", random_indices(B, HKV, T, cfg.num_selected, cfg.num_blocks(T), gen)))
    for label, indices in index_sets:
        exact = reference_run(q, k, v, indices, cfg, scale, grad_out, F64, True)
        low = reference_run(q, k, v, indices, cfg, scale, grad_out, dtype, False)
        for atomic in (False, True) if extra else (False,):
            os.environ["FLEXNSA_DKV_ATOMIC"] = "1" if atomic else "0"
            fast = kernel_run(q, k, v, indices, cfg, scale, grad_out)
            for name, f, lo, ex in zip(("o", "lse", "dq", "dk", "dv"), fast, low, exact):
                res = fa_check(name, f, lo, ex, dtype)
                res.update(indices=label, dkv="atomic" if atomic else "deterministic")
                case["checks"].append(res)
                if not res["ok"]:
                    record_failure(f"T={T} G={G} {Dk}/{Dv} {dtype} {label} {res['dkv']} {name}", json.dumps(res))
        os.environ["FLEXNSA_DKV_ATOMIC"] = "0"
    if extra:  # the deterministic path: bitwise reproducible, and legal under deterministic mode
        first = kernel_run(q, k, v, idx, cfg, scale, grad_out)
        torch.use_deterministic_algorithms(True)
        try:
            second = kernel_run(q, k, v, idx, cfg, scale, grad_out)
        finally:
            torch.use_deterministic_algorithms(False)
        same = all(torch.equal(a, b) for a, b in zip(first, second))
        case["deterministic_bitwise"] = same
        if not same:
            record_failure(f"determinism T={T} G={G}", "two deterministic backward runs differ")
    worst = max(case["checks"], key=lambda r: r["err"] / (3 * r["err_low"] + r["floor"] + 1e-30))
    case["worst"] = f"{worst['name']} {worst['err']:.2e} vs 3x{worst['err_low']:.2e}+{worst['floor']:.0e}"
    case["ok"] = not bad and all(r["ok"] for r in case["checks"]) and case.get("deterministic_bitwise", True)
    return case


# ---- gather reference for sampled rows (long sequences) ---------------------------------------
def rows_reference(q, k, v, idx, cfg, scale, rows, grad_out, low_dtype=None):
    """o, lse, dq of the query rows ``rows`` by gathering their selected tokens: float64, or the
    matrix products in ``low_dtype`` (the flash-attention tolerance's low-precision run)."""
    B, HQ, T, Dk = q.shape
    HKV, bs = k.shape[1], cfg.slc_block
    G = HQ // HKV
    sel = idx[:, :, rows].long()  # [B, HKV, R, n]
    tok = sel[..., None] * bs + torch.arange(bs, device=q.device)  # [B, HKV, R, n, l']
    ok = (sel[..., None] >= 0) & (tok <= rows[None, None, :, None, None]) & (tok < T)
    tok = torch.where(ok, tok, 0).flatten(-2)  # [B, HKV, R, S]
    ok = ok.flatten(-2)
    gather = lambda x: torch.gather(x[:, :, None].expand(-1, -1, len(rows), -1, -1), 3,  # noqa: E731
                                    tok[..., None].expand(-1, -1, -1, -1, x.shape[-1]))
    kg, vg = gather(k), gather(v)  # [B, HKV, R, S, D]
    qr = q[:, :, rows].unflatten(1, (HKV, G))  # [B, HKV, G, R, Dk]
    dor = grad_out[:, :, rows].unflatten(1, (HKV, G))
    dt = F64 if low_dtype is None else low_dtype
    logits = torch.einsum("bhgrd,bhrsd->bhgrs", qr.to(dt), kg.to(dt)).to(F64 if low_dtype is None else torch.float32)
    logits = torch.where(ok[:, :, None], logits * scale, -math.inf)
    has = ok.any(-1)[:, :, None, :, None]
    lse = torch.logsumexp(torch.where(has, logits, 0.0), dim=-1, keepdim=True)
    p = torch.where(ok[:, :, None], torch.exp(logits - lse), 0.0)
    o = torch.einsum("bhgrs,bhrsd->bhgrd", p.to(dt), vg.to(dt)).to(p.dtype)
    dp = torch.einsum("bhgrd,bhrsd->bhgrs", dor.to(dt), vg.to(dt)).to(p.dtype)
    delta = (o * dor.to(p.dtype)).sum(-1, keepdim=True)
    ds = p * (dp - delta)
    dq = torch.einsum("bhgrs,bhrsd->bhgrd", ds.to(dt), kg.to(dt)).to(p.dtype) * scale
    lse = torch.where(has, lse, -math.inf).squeeze(-1)
    return o.flatten(1, 2), lse.flatten(1, 2), dq.flatten(1, 2)


LONG_HEADS = (64, 4)  # HQ, HKV of the long-sequence stages ((4, 2) with --cpu-smoke)


def paper_inputs(T, Dk, Dv, seed, B=1, dtype=torch.bfloat16):
    HQ, HKV = LONG_HEADS
    gen = generator(seed)
    q, k, v = rnd((B, HQ, T, Dk), dtype, gen), rnd((B, HKV, T, Dk), dtype, gen), rnd((B, HKV, T, Dv), dtype, gen)
    k_cmp = rnd((B, HKV, PAPER.num_cmp_tokens(T), Dk), dtype, gen)
    return q, k, v, k_cmp, gen


def sample_rows(T, count, gen):
    rows = torch.randperm(T, generator=gen, device=DEVICE)[:count]
    rows[:4] = torch.tensor([0, 1, PAPER.slc_block * PAPER.num_selected + 5, T - 1], device=DEVICE)
    return torch.unique(rows)


def check_long(T, Dk, Dv, seed, n_select_rows, n_attn_rows, label):
    """Select on all queries, tie-aware on sampled rows; o/lse/dq on sampled rows; finite dk/dv."""
    scale = 1.0 / math.sqrt(Dk)
    q, k, v, k_cmp, gen = paper_inputs(T, Dk, Dv, seed)
    lse_cmp = compressed_lse(q, k_cmp, PAPER, scale)
    idx = custom_ops.select_blocks(q, k_cmp, lse_cmp, PAPER, scale)
    sync()
    rows = sample_rows(T, n_select_rows, gen)
    bad = differ = 0
    for chunk in rows.split(64):
        keys = keys_for_rows(q, k_cmp, PAPER, scale, chunk)
        b, d = selection_disagreement(idx[:, :, chunk], top_n_from_keys(keys, PAPER.num_selected), keys)
        bad, differ = bad + b, differ + d
    out = {"T": T, "select_rows": int(len(rows)), "select_bad_rows": bad, "select_differing_rows": differ}
    if bad:
        record_failure(f"select {label}", f"{bad} of {len(rows)} sampled rows disagree beyond ties")
    grad_out = rnd(q.shape, q.dtype, gen)
    qg, kg, vg = (x.detach().clone().requires_grad_() for x in (q, k, v))
    o, lse = custom_ops.selected_attention(qg, kg, vg, idx, PAPER, scale)
    dq, dk, dv = torch.autograd.grad(o, (qg, kg, vg), grad_out)
    rows = sample_rows(T, n_attn_rows, gen)
    exact = rows_reference(q, k, v, idx, PAPER, scale, rows, grad_out)
    low = rows_reference(q, k, v, idx, PAPER, scale, rows, grad_out, low_dtype=q.dtype)
    out["checks"] = []
    for name, fast, lo, ex in zip(("o", "lse", "dq"), (o[:, :, rows], lse[:, :, rows], dq[:, :, rows]), low, exact):
        res = fa_check(name, fast, lo, ex, q.dtype)
        out["checks"].append(res)
        if not res["ok"]:
            record_failure(f"{label} rows {name}", json.dumps(res))
    finite = bool(torch.isfinite(dk).all()) and bool(torch.isfinite(dv).all())
    out["dk_dv_finite"] = finite
    if not finite:
        record_failure(f"{label} dk/dv", "non-finite values")
    out["ok"] = not bad and finite and all(r["ok"] for r in out["checks"])
    return out


# ---- (b2) select paths against each other -------------------------------------------------------
SELECT_IMPLS = ("v1", "v2", "split")  # FLEXNSA_SELECT_IMPL values (custom_ops/select_kernel.py)


def compare_select_impls(T, Dk, Dv, seed, n_rows):
    """The select paths on the same 64k inputs: each checked tie-aware on ``n_rows`` sampled
    queries (float64 keys of those rows), then timed; returns one row per kernel."""
    scale = 1.0 / math.sqrt(Dk)
    q, _, _, k_cmp, gen = paper_inputs(T, Dk, Dv, seed)
    lse_cmp = compressed_lse(q, k_cmp, PAPER, scale)
    rows = sample_rows(T, n_rows, gen)
    keys = [keys_for_rows(q, k_cmp, PAPER, scale, chunk) for chunk in rows.split(64)]
    cmp_pairs = PAPER.attended_pairs(T)["cmp"] * q.shape[1]
    out = []
    before = os.environ.get("FLEXNSA_SELECT_IMPL")
    try:
        for impl in SELECT_IMPLS:
            os.environ["FLEXNSA_SELECT_IMPL"] = impl
            row = {"T": T, "Dk": Dk, "Dv": Dv, "impl": impl}
            try:
                idx = custom_ops.select_blocks(q, k_cmp, lse_cmp, PAPER, scale)
                sync()
                bad = differ = 0
                for chunk, key in zip(rows.split(64), keys):
                    b, d = selection_disagreement(idx[:, :, chunk], top_n_from_keys(key, PAPER.num_selected), key)
                    bad, differ = bad + b, differ + d
                row.update(rows=int(len(rows)), bad=bad, differing=differ)
                if bad:
                    record_failure(f"select {impl} T={T} {Dk}/{Dv}", f"{bad} of {len(rows)} sampled rows disagree beyond ties")
                ms = bench(lambda: custom_ops.select_blocks(q, k_cmp, lse_cmp, PAPER, scale))
                row.update(ms=round(ms, 3), tflops=round(2 * cmp_pairs * Dk / ms / 1e9, 1))
                log(f"  select {impl} T={T} {Dk}/{Dv}: {ms:8.3f} ms, sampled rows bad {bad}, differing {differ}")
            except Exception as err:  # v2 failing must not hide v1's numbers (and is a failure)
                record_failure(f"select {impl} T={T} {Dk}/{Dv}", err)
                row["error"] = repr(err)[:200]
            out.append(row)
            empty_cache()
    finally:
        if before is None:
            os.environ.pop("FLEXNSA_SELECT_IMPL", None)
        else:
            os.environ["FLEXNSA_SELECT_IMPL"] = before
    return out


def impl_summary(rows) -> list[str]:
    """One line per (T, Dk/Dv): every path's time and the fastest."""
    lines = []
    for key in sorted({(r["T"], r["Dk"], r["Dv"]) for r in rows}):
        ms = {r["impl"]: r.get("ms") for r in rows if (r["T"], r["Dk"], r["Dv"]) == key}
        if all(ms.get(i) is not None for i in SELECT_IMPLS):
            fastest = min(SELECT_IMPLS, key=lambda i: ms[i])
            times = ", ".join(f"{i} {ms[i]} ms" for i in SELECT_IMPLS)
            lines.append(f"select T={key[0]} {key[1]}/{key[2]}: {times} -> {fastest} fastest "
                         f"({max(ms.values()) / min(ms.values()):.2f}x the slowest)")
        else:
            lines.append(f"select T={key[0]} {key[1]}/{key[2]}: " + ", ".join(f"{i} {ms.get(i)}" for i in SELECT_IMPLS)
                         + " (a kernel failed)")
    return lines


# ---- (c) timings ------------------------------------------------------------------------------
def sync():
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def empty_cache():
    if DEVICE == "cuda":
        torch.cuda.empty_cache()


def bench(fn) -> float:
    if DEVICE != "cuda":  # --cpu-smoke: one warm-up, then one timed call
        fn()
        start = time.perf_counter()
        fn()
        return (time.perf_counter() - start) * 1e3
    from triton.testing import do_bench

    return float(do_bench(fn, warmup=25, rep=100, return_mode="median"))


def selected_pairs(idx, T, bs):
    """Number of (query, key) pairs the selected attention scores, per KV group (exact, from ``idx``)."""
    t = torch.arange(T, device=idx.device)[None, None, :, None]
    blk = idx.long()
    count = torch.clamp(torch.minimum(torch.clamp(t + 1, max=T), (blk + 1) * bs).clamp(max=T) - blk * bs, min=0)
    return int(torch.where(blk >= 0, count, 0).sum())


def kernel_breakdown(fn, reps=3) -> dict:
    """Mean CUDA time per kernel name over ``reps`` calls of ``fn`` (the 8 largest, ms)."""
    if DEVICE != "cuda":
        return {}
    return {r["kernel"][:60]: round(r["ms"], 3) for r in kernel_times(fn, reps)[:8]}


def time_paper(T, Dk, Dv, seed=0):
    scale = 1.0 / math.sqrt(Dk)
    q, k, v, k_cmp, gen = paper_inputs(T, Dk, Dv, seed)
    B, HQ, _, _ = q.shape
    HKV, Tc, n, bs = k.shape[1], k_cmp.shape[2], PAPER.num_selected, PAPER.slc_block
    lse_cmp = compressed_lse(q, k_cmp, PAPER, scale)
    idx = custom_ops.select_blocks(q, k_cmp, lse_cmp, PAPER, scale)
    with torch.no_grad():
        o, lse = custom_ops.selected_attention(q, k, v, idx, PAPER, scale)
    grad_out = rnd(o.shape, o.dtype, gen)
    pairs = selected_pairs(idx, T, bs) * (HQ // HKV)  # per batch, summed over query heads
    cmp_pairs = PAPER.attended_pairs(T)["cmp"] * HQ
    slots = int((idx >= 0).sum())
    esz = q.element_size()
    rows = []

    def add(op, ms, flops, bytes_unique, bytes_gathered=None, note=""):
        row = {"T": T, "Dk": Dk, "Dv": Dv, "op": op, "ms": round(ms, 3), "GFLOP": round(flops / 1e9, 1),
               "TFLOP/s": round(flops / ms / 1e9, 1), "MB unique": round(bytes_unique / 1e6, 1),
               "TB/s unique": round(bytes_unique / ms / 1e9, 2), "note": note}  # fmt: skip
        if bytes_gathered is not None:
            row["MB gathered"] = round(bytes_gathered / 1e6, 1)
            row["TB/s gathered"] = round(bytes_gathered / ms / 1e9, 2)
        rows.append(row)
        log(f"  {op:28s} T={T} {Dk}/{Dv}: {ms:8.3f} ms  {row['TFLOP/s']:6.1f} TFLOP/s")

    # select: q . k_cmp over visible pairs (the kernel's p @ W and top-n merges not counted)
    ms = bench(lambda: custom_ops.select_blocks(q, k_cmp, lse_cmp, PAPER, scale))
    add("select_blocks", ms, 2 * cmp_pairs * Dk,
        q.numel() * esz + lse_cmp.numel() * 4 + k_cmp.numel() * esz + idx.numel() * 4,
        note="FLOP: q.k_cmp on visible pairs")  # fmt: skip
    kv_gather = slots * bs * (Dk + Dv) * esz  # each (query, group) slot loads one K and one V block
    with torch.no_grad():
        ms = bench(lambda: custom_ops.selected_attention(q, k, v, idx, PAPER, scale))
    unique_fwd = (q.numel() + k.numel() + v.numel() + o.numel()) * esz + lse.numel() * 4 + idx.numel() * 4
    add("selected fwd", ms, 2 * pairs * (Dk + Dv), unique_fwd, kv_gather + unique_fwd - (k.numel() + v.numel()) * esz,
        note="FLOP: QK^T + PV on selected pairs")  # fmt: skip
    bwd_flops = 2 * pairs * (Dk + Dv + Dk) + 2 * pairs * (Dk + Dv + Dv + Dk)  # dq: 3 products, dk/dv: 4
    unique_bwd = (3 * q.numel() + 2 * k.numel() + 2 * v.numel() + 2 * o.numel()) * esz + 2 * lse.numel() * 4
    breakdown = {}
    for deterministic in (True, False):
        fn = lambda: torch.ops.flexnsa.selected_attention_backward(  # noqa: E731
            grad_out, q, k, v, o, lse, idx, bs, scale, deterministic)
        ms = bench(fn)
        name = "selected bwd " + ("deterministic" if deterministic else "atomic")
        # gathered: dq kernel loads K/V blocks per slot; dK/dV kernel loads q/do rows of G heads per slot
        gathered = kv_gather + slots * (HQ // HKV) * (Dk + Dv) * esz + unique_bwd
        add(name, ms, bwd_flops, unique_bwd, gathered, note="7 products (dq 3, dk/dv 4)")
        breakdown[name] = kernel_breakdown(fn)
        log(f"    kernels: {breakdown[name]}")
    return rows, breakdown


# ---- main -------------------------------------------------------------------------------------
def write_outputs(out_dir: pathlib.Path) -> str:
    out_dir.mkdir(parents=True, exist_ok=True)
    RESULTS["env"] = {
        "torch": torch.__version__,
        "triton": __import__("triton").__version__,
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "elapsed_s": round(elapsed(), 1),
        "failures": FAILURES,
    }
    (out_dir / "gpu_check_ops.json").write_text(json.dumps(RESULTS, indent=1, default=str))
    lines = [f"# flexnsa custom ops on {RESULTS['env']['device']}", "",
             f"torch {RESULTS['env']['torch']}, triton {RESULTS['env']['triton']}, {time.strftime('%Y-%m-%d')}", "",
             "## Correctness (T in 1k/4k: full float64 reference; flash-attention tolerance)", "",
             "| T | G | Dk/Dv | dtype | select: bad / differing rows | worst (err vs 3x low-precision err + floor) | ok |",
             "|---|---|---|---|---|---|---|"]  # fmt: skip
    for c in RESULTS["correctness"]:
        lines.append(f"| {c['T']} | {c['G']} | {c['Dk']}/{c['Dv']} | {c['dtype']} | {c['select_bad_rows']} / "
                     f"{c['select_differing_rows']} | {c['worst']} | {'yes' if c['ok'] else 'NO'} |")  # fmt: skip
    for key in ("select_64k", "t256k"):
        r = RESULTS.get(key)
        if r:
            checks = ", ".join(f"{x['name']} {x['err']:.2e} (low {x['err_low']:.2e})" for x in r.get("checks", []))
            lines += ["", f"{key}: {r['select_rows']} sampled rows, {r['select_bad_rows']} bad, "
                          f"{r['select_differing_rows']} differing within ties; rows: {checks}; "
                          f"dk/dv finite {r.get('dk_dv_finite')}; ok {r['ok']}"]  # fmt: skip
    if RESULTS["select_impls"]:
        lines += ["", "## Select kernels v1 / v2 (FLEXNSA_SELECT_IMPL) at 64k, paper shape; tie-aware on sampled rows", "",
                  "| T | Dk/Dv | impl | ms | TFLOP/s (q.k_cmp) | sampled rows | bad | differing within ties |",
                  "|---|---|---|---|---|---|---|---|"]  # fmt: skip
        for r in RESULTS["select_impls"]:
            lines.append(f"| {r['T']} | {r['Dk']}/{r['Dv']} | {r['impl']} | {r.get('ms', r.get('error', ''))} | "
                         f"{r.get('tflops', '')} | {r.get('rows', '')} | {r.get('bad', '')} | {r.get('differing', '')} |")
        lines += [""] + impl_summary(RESULTS["select_impls"])
    if RESULTS["timings"]:
        lines += ["", "## Timings (B=1, HQ=64, HKV=4, bf16, paper config; median ms, do_bench)", "",
                  "| T | Dk/Dv | op | ms | GFLOP | TFLOP/s | MB unique | TB/s unique | MB gathered | TB/s gathered |",
                  "|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
        for r in RESULTS["timings"]:
            lines.append(f"| {r['T']} | {r['Dk']}/{r['Dv']} | {r['op']} | {r['ms']} | {r['GFLOP']} | {r['TFLOP/s']} | "
                         f"{r['MB unique']} | {r['TB/s unique']} | {r.get('MB gathered', '')} | {r.get('TB/s gathered', '')} |")  # fmt: skip
        for name, kernels in RESULTS.get("breakdown", {}).items():
            lines.append(f"\n{name}, per kernel (ms): " + ", ".join(f"{k} {v}" for k, v in kernels.items()))
    lines += ["", f"Failures: {len(FAILURES)}"] + [f"- {f.splitlines()[0][:300]}" for f in FAILURES]
    text = "\n".join(lines) + "\n"
    (out_dir / "gpu_check_ops.md").write_text(text)
    return text


def main() -> int:
    global DEVICE, PAPER, LONG_HEADS
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--no-256k", action="store_true", help="skip the T=256k smoke run")
    parser.add_argument("--budget", type=float, default=195.0, help="seconds; the optional 256k stage starts only before it")
    parser.add_argument("--cpu-smoke", action="store_true",
                        help="tiny shapes on the CPU (set TRITON_INTERPRET=1 to run the kernels): checks this script")
    args = parser.parse_args()
    out_dir = pathlib.Path(os.environ.get("OUT", REPO_ROOT / "perf" / "results" / "tmp"))
    os.environ["FLEXNSA_DKV_ATOMIC"] = "0"
    if args.cpu_smoke:
        DEVICE, LONG_HEADS = "cpu", (4, 2)
        PAPER = flexnsa.NSAConfig(cmp_block=4, cmp_stride=2, slc_block=8, num_selected=4, num_init_blocks=1, num_local_blocks=2)
        sizes = dict(short=(40, 65), groups=(1, 3), dims=((16, 16), (24, 16)), long=(150, 24, 12), huge=(300, 8, 4))
        cases = [(T, G, Dk, Dv, torch.bfloat16) for T in sizes["short"] for G in sizes["groups"] for Dk, Dv in sizes["dims"]]
        cases += [(40, 2, 16, 16, torch.float16), (40, 3, 16, 8, torch.float32)]
        extras = (0, 3, 9)
        kernel_utils.TUNING.clear()
    else:
        if not torch.cuda.is_available():
            print("gpu_check_ops.py needs CUDA (or --cpu-smoke)", file=sys.stderr)
            return 2
        torch.backends.cuda.matmul.allow_tf32 = False
        sizes = dict(long=(65536, 512, 256), huge=(262144, 128, 64))
        cases = [(T, G, Dk, Dv, torch.bfloat16) for T in (1000, 4096) for G in (1, 4, 16)
                 for Dk, Dv in ((64, 64), (128, 128), (192, 128))]  # fmt: skip
        cases += [(1000, 4, 128, 128, torch.float16), (1000, 3, 64, 64, torch.float32)]
        extras = (0, 5, 7, 16, 19)
    T_long, n_sel, n_rows = sizes["long"]
    T_huge, n_sel_huge, n_rows_huge = sizes["huge"]

    log("(a) correctness against the full float64 reference")
    for i, (T, G, Dk, Dv, dtype) in enumerate(cases):
        try:
            case = check_case(T, G, Dk, Dv, dtype, seed=i, extra=i in extras)
            RESULTS["correctness"].append(case)
            log(f"  T={T} G={G} {Dk}/{Dv} {dtype}: ok={case['ok']} select differing {case['select_differing_rows']}"
                f" bad {case['select_bad_rows']}; worst {case['worst']}")  # fmt: skip
        except Exception as err:
            record_failure(f"case T={T} G={G} {Dk}/{Dv} {dtype}", err)
        empty_cache()
    write_outputs(out_dir)

    log(f"(b) T={T_long}, paper shape: selection on {n_sel} sampled queries, attention on {n_rows} sampled rows")
    try:
        RESULTS["select_64k"] = check_long(T_long, 128, 128, 7, n_sel, n_rows, f"T={T_long}")
        log(f"  {RESULTS['select_64k']}")
    except Exception as err:
        record_failure(f"T={T_long} check", err)
    empty_cache()
    write_outputs(out_dir)

    log(f"(b2) T={T_long}: select kernel v1 against v2 (both checked on {n_sel} sampled queries, both timed)")
    for Dk, Dv in ((128, 128), (192, 128)):
        try:
            RESULTS["select_impls"] += compare_select_impls(T_long, Dk, Dv, 13, n_sel)
        except Exception as err:
            record_failure(f"select v1/v2 T={T_long} {Dk}/{Dv}", err)
        empty_cache()
    for line in impl_summary(RESULTS["select_impls"]):
        log("  " + line)
    write_outputs(out_dir)

    log(f"(c) timings at T={T_long} (select: the default kernel, FLEXNSA_SELECT_IMPL={os.environ.get('FLEXNSA_SELECT_IMPL', 'v2')})")
    RESULTS["breakdown"] = {}
    for Dk, Dv in ((128, 128), (192, 128)):
        try:
            rows, breakdown = time_paper(T_long, Dk, Dv)
            RESULTS["timings"] += rows
            RESULTS["breakdown"].update({f"{k} ({Dk}/{Dv})": v for k, v in breakdown.items()})
        except Exception as err:
            record_failure(f"timing T={T_long} {Dk}/{Dv}", err)
        empty_cache()
        write_outputs(out_dir)
    if not args.no_256k and elapsed() < args.budget:
        log(f"(d) T={T_huge} smoke run")
        try:
            RESULTS["t256k"] = check_long(T_huge, 128, 128, 11, n_sel_huge, n_rows_huge, f"T={T_huge}")
            log(f"  {RESULTS['t256k']}")
        except Exception as err:
            record_failure(f"T={T_huge} run", err)
    elif not args.no_256k:
        log("(d) 256k smoke run skipped: time budget")
    write_outputs(out_dir)

    text = write_outputs(out_dir)
    print(text)
    for line in impl_summary(RESULTS["select_impls"]):
        print(line)
    print(f"{'FAILED' if FAILURES else 'OK'}: {len(FAILURES)} failures, {elapsed():.0f}s; results in {out_dir}")
    return 1 if FAILURES else 0


if __name__ == "__main__":
    sys.exit(main())
