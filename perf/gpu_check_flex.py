#!/usr/bin/env python
"""GPU check of flexnsa's FlexAttention branches (compressed and sliding window): correctness
against the reference, then timings. Exits non-zero when a result is wrong.

    OUT=perf/results/h200 python perf/gpu_check_flex.py        # about 3-4 minutes on an H200

(a) Correctness, forward and backward of both branches, against the float64 reference (better than
    the float32 one; it makes the fp32 check meaningful), with flash-attention's tolerance: the
    error of flexnsa must be <= 3x the error of the reference run in the input dtype
    (``upcast=False``) plus a small floor relative to the largest reference value. bf16 and fp32,
    T in {1000, 4096}, G in {1, 4, 16}, Dk/Dv 128/128 and 192/128, chunked and unchunked
    compressed layouts (B = 1 view, B = 2 copy, padded last chunk). Forward only at 16k and 64k
    (paper shape) against a float32 reference on 256 sampled query rows (the first ones included).
(b) Timings (``triton.testing.do_bench``, median ms) on the paper shape (B=1, HQ=64, HKV=4, D=128,
    bf16) at 8k and 64k: window and compressed branches, forward and forward+backward, the
    compressed branch with query chunks (default) and without (1 chunk).

Writes ``gpu_check_flex.json`` and ``gpu_check_flex.md`` under ``$OUT`` (default
``perf/results/tmp``) and prints the summary table last.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import subprocess
import sys
import time
import traceback

REPO_ROOT = pathlib.Path(__file__).resolve().parent.parent




import torch  # noqa: E402
from _cases import raise_recompile_limit  # noqa: E402

import flexnsa  # noqa: E402  (installed: pip install -e .)

from flexnsa import flex_branches as fb  # noqa: E402
from flexnsa import reference  # noqa: E402

CFG = flexnsa.NSAConfig()  # paper defaults: l=32, d=16, w=512
FLOOR = {torch.bfloat16: 2e-3, torch.float16: 5e-4, torch.float32: 1e-5}  # x max |reference|
PERF_ANCHORS = {  # PERF.md, H200, torch 2.11: FlexAttention alone on each pattern, ms
    ("window", 8192, "fwd"): 0.53,
    ("window", 8192, "fwd+bwd"): 2.05,
    ("window", 65536, "fwd"): 4.34,
    ("window", 65536, "fwd+bwd"): 16.5,
    ("compressed", 8192, "fwd"): 0.37,
    ("compressed", 8192, "fwd+bwd"): 5.5,
    ("compressed", 65536, "fwd"): 12.1,
    ("compressed", 65536, "fwd+bwd"): 67.0,
}
TARGET_64K_CMP_BWD_MS = 40.0
DEVICE = "cuda"


# ---- helpers ---------------------------------------------------------------------------------
def _randn(shape, dtype, seed):
    gen = torch.Generator(device=DEVICE).manual_seed(seed)
    return torch.randn(*shape, generator=gen, device=DEVICE, dtype=torch.float32).to(dtype)


def _errors(fast, exact, lowp, dtype):
    """(err_fast, err_lowp, tolerance, ok) over the entries where the exact value is finite."""
    fast, exact, lowp = fast.detach().double(), exact.detach().double(), lowp.detach().double()
    finite = torch.isfinite(exact)
    same_inf = bool(torch.equal(torch.isfinite(fast), finite)) and not bool(torch.isnan(fast).any())
    if not bool(finite.any()):
        return 0.0, 0.0, 0.0, same_inf
    err_fast = (fast - exact)[finite].abs().max().item()
    err_lowp = (lowp - exact)[finite].abs().max().item()
    tol = 3 * err_lowp + FLOOR[dtype] * max(exact[finite].abs().max().item(), 1e-3)
    return err_fast, err_lowp, tol, same_inf and err_fast <= tol


class Report:
    def __init__(self):
        self.checks: list[dict] = []
        self.timings: list[dict] = []
        self.failures: list[str] = []
        self.section_s: dict[str, float] = {}

    def check(self, case: str, quantity: str, fast, exact, lowp, dtype):
        err_fast, err_lowp, tol, ok = _errors(fast, exact, lowp, dtype)
        self.checks.append(
            dict(case=case, quantity=quantity, err=err_fast, ref_lowp_err=err_lowp, tol=tol, ok=ok)
        )
        if not ok:
            self.failures.append(f"{case} {quantity}: error {err_fast:.3g} > tolerance {tol:.3g}")
        print(
            f"  {'ok ' if ok else 'BAD'} {case:58s} {quantity:8s} err {err_fast:.2e} ref-lowp {err_lowp:.2e} tol {tol:.2e}",
            flush=True,
        )

    def crash(self, case: str, err: BaseException):
        self.checks.append(
            dict(
                case=case,
                quantity="crash",
                err=float("nan"),
                ref_lowp_err=float("nan"),
                tol=0.0,
                ok=False,
                error=repr(err),
            )
        )
        self.failures.append(f"{case}: {err!r}")
        print(f"  BAD {case}: {err!r}", flush=True)
        traceback.print_exc()


def _window(q, k, v):
    return fb.sliding_window_attention(q, k, v, CFG.window)


# ---- (a) correctness, forward and backward -------------------------------------------------
SMALL_CASES = [
    # dtype, B, HQ, HKV, T, Dk, Dv, compressed chunks (None: automatic; T=4096 -> 4 chunks)
    (torch.bfloat16, 1, 16, 1, 1000, 192, 128, 3),  # G=16, padded last chunk (3 x 384 rows)
    (torch.bfloat16, 2, 8, 2, 4096, 128, 128, None),  # G=4, B=2: chunks copy the K/V per chunk
    (torch.float32, 1, 16, 1, 4096, 128, 128, None),  # G=16, B=1: chunks are a view, K/V broadcast
    (torch.float32, 1, 4, 4, 1000, 192, 128, None),  # G=1, one chunk
]


def _branch_fns(name, chunks):
    """(fast, ref): fast(q, k, v) -> o or (o, lse); ref(q, k, v, upcast) -> (o, lse)."""
    if name == "window":

        def ref(q, k, v, upcast):
            return reference.sliding_window_attention(q, k, v, CFG.window, upcast=upcast)

        return _window, ref

    def fast(q, k_cmp, v_cmp):
        return fb.compressed_attention(q, k_cmp, v_cmp, CFG, return_lse=True, _num_chunks=chunks)

    def ref(q, k_cmp, v_cmp, upcast):
        return reference.compressed_attention(q, k_cmp, v_cmp, CFG, upcast=upcast)

    return fast, ref


def check_small(report: Report):
    for dtype, B, HQ, HKV, T, Dk, Dv, chunks in SMALL_CASES:
        for name in ("window", "compressed"):
            S = T if name == "window" else CFG.num_cmp_tokens(T)
            case = f"{name} {str(dtype)[6:]} B{B} HQ{HQ}/HKV{HKV} T{T} D{Dk}/{Dv}"
            if name == "compressed":
                case += f" chunks={'auto' if chunks is None else chunks}"
            try:
                seed = T + HQ + Dk
                inputs = [
                    _randn((B, HQ, T, Dk), dtype, seed).requires_grad_(),  # q
                    _randn((B, HKV, S, Dk), dtype, seed + 1).requires_grad_(),  # k or k_cmp
                    _randn((B, HKV, S, Dv), dtype, seed + 2).requires_grad_(),  # v or v_cmp
                ]
                grad_out = _randn((B, HQ, T, Dv), dtype, seed + 3)
                fast_fn, ref_fn = _branch_fns(name, chunks)
                out = fast_fn(*inputs)
                out, lse = out if isinstance(out, tuple) else (out, None)
                grads = torch.autograd.grad(out, inputs, grad_out)
                exact_in = [x.detach().double().requires_grad_() for x in inputs]
                exact, exact_lse = ref_fn(*exact_in, True)
                exact_grads = torch.autograd.grad(exact, exact_in, grad_out.double())
                lowp, lowp_lse = ref_fn(*inputs, False)
                lowp_grads = torch.autograd.grad(lowp, inputs, grad_out)
                report.check(case, "o", out, exact, lowp, dtype)
                if lse is not None:
                    report.check(case, "lse", lse, exact_lse, lowp_lse, dtype)
                for label, g, e, lp in zip(("dq", "dk", "dv"), grads, exact_grads, lowp_grads):
                    report.check(case, label, g, e, lp, dtype)
                del inputs, grads, exact_in, exact_grads, lowp_grads, exact, lowp
            except Exception as err:  # noqa: BLE001 - reported as a failure, the run goes on
                report.crash(case, err)
            if DEVICE == "cuda":
                torch.cuda.empty_cache()


# ---- (a') long sequences, forward only, on sampled rows ---------------------------------------
def _sample_rows(T: int, count: int = 256) -> torch.Tensor:
    gen = torch.Generator().manual_seed(T)
    first = torch.arange(40)  # includes the rows t < l - 1 that see no compressed token
    rest = torch.randperm(T - 40, generator=gen)[: count - 40] + 40
    return torch.cat([first, rest.sort().values]).to(DEVICE)


def check_long(report: Report, lengths=(16384, 65536), heads=(64, 4)):
    (HQ, HKV), B, D, dtype = heads, 1, 128, torch.bfloat16
    scale = D**-0.5
    for T in lengths:
        rows = _sample_rows(T)
        t = rows[:, None]
        for name in ("window", "compressed"):
            case = f"{name} bf16 paper shape T{T} fwd, 256 rows"
            try:
                S = T if name == "window" else CFG.num_cmp_tokens(T)
                q = _randn((B, HQ, T, D), dtype, T)
                k = _randn((B, HKV, S, D), dtype, T + 1)
                v = _randn((B, HKV, S, D), dtype, T + 2)
                s = torch.arange(S, device=DEVICE)[None, :]
                with torch.no_grad():
                    if name == "window":
                        out, lse = fb.sliding_window_attention(q, k, v, CFG.window), None
                        mask = (t >= s) & (t - s < CFG.window)  # [R, T]
                    else:
                        out, lse = fb.compressed_attention(q, k, v, CFG, return_lse=True)
                        mask = s * CFG.cmp_stride + CFG.cmp_block - 1 <= t  # [R, Tc]
                    q_rows = q[:, :, rows]
                    exact, exact_lse = reference.masked_attention(q_rows, k, v, mask, scale, upcast=True)
                    lowp, lowp_lse = reference.masked_attention(q_rows, k, v, mask, scale, upcast=False)
                report.check(case, "o", out[:, :, rows], exact, lowp, dtype)
                if lse is not None:
                    report.check(case, "lse", lse[:, :, rows], exact_lse, lowp_lse, dtype)
                del q, k, v, out, exact, lowp
            except Exception as err:  # noqa: BLE001
                report.crash(case, err)
            if DEVICE == "cuda":
                torch.cuda.empty_cache()


# ---- (b) timings -------------------------------------------------------------------------------
def _bench(fn, leaves=()):
    from triton.testing import do_bench

    for x in leaves:
        x.grad = None
    fn()  # compile outside the measurement
    torch.cuda.synchronize()
    ms = do_bench(fn, warmup=25, rep=100, grad_to_none=list(leaves) or None, return_mode="median")
    for x in leaves:
        x.grad = None
    return float(ms)


def _compressed(chunks):
    """Compressed branch with ``chunks`` query chunks (None: the default choice)."""

    def run(q, k_cmp, v_cmp):
        return fb.compressed_attention(q, k_cmp, v_cmp, CFG, return_lse=True, _num_chunks=chunks)[0]

    return run


def _forward_backward(fn, leaves, grad_out):
    def run():
        fn(*leaves).backward(grad_out)

    return run


def _time_length(report: Report, T: int, sweep, deadline):
    """Paper shape at length T: window and compressed, forward and forward+backward."""
    B, HQ, HKV, D, dtype = 1, 64, 4, 128, torch.bfloat16
    Tc = CFG.num_cmp_tokens(T)
    auto = fb.default_num_chunks(T, Tc, B, HKV)
    q = _randn((B, HQ, T, D), dtype, 1)  # [B, HQ, T, D]
    k, v = _randn((B, HKV, T, D), dtype, 2), _randn((B, HKV, T, D), dtype, 3)  # [B, HKV, T, D]
    kc, vc = _randn((B, HKV, Tc, D), dtype, 4), _randn((B, HKV, Tc, D), dtype, 5)  # [B, HKV, Tc, D]
    grad_out = _randn((B, HQ, T, D), dtype, 6)
    win_leaves = [x.detach().clone().requires_grad_() for x in (q, k, v)]
    cmp_leaves = [x.detach().clone().requires_grad_() for x in (q, kc, vc)]
    # (branch, mode, chunks label, callable, leaves whose .grad is reset, optional)
    plans = [
        ("window", "fwd", "-", lambda: _window(q, k, v), (), False),
        ("window", "fwd+bwd", "-", _forward_backward(_window, win_leaves, grad_out), win_leaves, False),
        ("compressed", "fwd", "1", lambda: _compressed(None)(q, kc, vc), (), False),
    ]
    chunk_counts = [(1, False)] + ([(auto, False)] if auto > 1 else [])
    chunk_counts += [(n, True) for n in sweep if n not in (1, auto)]
    for chunks, optional in chunk_counts:
        run = _forward_backward(_compressed(chunks), cmp_leaves, grad_out)
        plans.append(("compressed", "fwd+bwd", str(chunks), run, cmp_leaves, optional))
    for branch, mode, chunks, fn, leaves, optional in plans:
        if optional and deadline is not None and time.perf_counter() > deadline:
            print(f"  skipped {branch} {mode} chunks={chunks} at T={T}: time budget", flush=True)
            continue
        try:
            with torch.no_grad() if mode == "fwd" else torch.enable_grad():
                ms = _bench(fn, leaves)
        except Exception as err:  # noqa: BLE001
            report.crash(f"timing {branch} {mode} chunks={chunks} T{T}", err)
            continue
        anchor = PERF_ANCHORS.get((branch, T, mode)) if chunks in ("-", "1") else None
        report.timings.append(dict(branch=branch, T=T, mode=mode, chunks=chunks, ms=ms, perf_md_ms=anchor))
        print(f"  {branch:10s} T={T:6d} {mode:8s} chunks={chunks:3s} {ms:8.3f} ms", flush=True)


def time_branches(report: Report, lengths=(8192, 65536), sweep=(16, 32), deadline=None):
    """Timings at each length; the chunk sweep only at the longest one, and only within budget."""
    for T in lengths:
        _time_length(report, T, sweep if T == max(lengths) else (), deadline)
        if DEVICE == "cuda":
            torch.cuda.empty_cache()


def _backward_ms(timings, T, chunks):
    fwd = next(
        (r["ms"] for r in timings if (r["branch"], r["T"], r["mode"]) == ("compressed", T, "fwd")), None
    )
    both = next(
        (
            r["ms"]
            for r in timings
            if (r["branch"], r["T"], r["mode"], r["chunks"]) == ("compressed", T, "fwd+bwd", chunks)
        ),
        None,
    )
    return None if fwd is None or both is None else both - fwd


# ---- output --------------------------------------------------------------------------------
def _meta():
    driver = "?"
    try:
        driver = (
            subprocess.run(
                ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                capture_output=True,
                text=True,
                timeout=20,
            )
            .stdout.strip()
            .splitlines()[0]
        )
    except Exception:  # noqa: BLE001
        pass
    import triton

    return dict(
        date=time.strftime("%Y-%m-%d %H:%M:%S"),
        gpu=torch.cuda.get_device_name(),
        torch=torch.__version__,
        triton=triton.__version__,
        cuda=torch.version.cuda,
        driver=driver,
    )


def _timing_rows(report: Report):
    lines = ["| branch | T | mode | chunks | ms (median) | PERF.md anchor ms |", "|---|---|---|---|---|---|"]
    for r in report.timings:
        anchor = "" if r["perf_md_ms"] is None else f"{r['perf_md_ms']:.2f}"
        lines.append(f"| {r['branch']} | {r['T']} | {r['mode']} | {r['chunks']} | {r['ms']:.3f} | {anchor} |")
    derived = []
    for T in sorted({r["T"] for r in report.timings}):
        for chunks in sorted(
            {
                r["chunks"]
                for r in report.timings
                if r["T"] == T and r["branch"] == "compressed" and r["mode"] == "fwd+bwd"
            },
            key=int,
        ):
            bwd = _backward_ms(report.timings, T, chunks)
            if bwd is not None:
                derived.append(f"| compressed | {T} | bwd (fwd+bwd - fwd) | {chunks} | {bwd:.3f} | |")
    return lines + derived


def write_outputs(report: Report, meta: dict, out_dir: pathlib.Path):
    out_dir.mkdir(parents=True, exist_ok=True)
    auto_64k = str(fb.default_num_chunks(65536, CFG.num_cmp_tokens(65536), 1, 4))
    bwd_64k = _backward_ms(report.timings, 65536, auto_64k)
    summary = dict(
        checks=len(report.checks),
        failures=len(report.failures),
        compressed_64k_backward_ms=bwd_64k,
        target_ms=TARGET_64K_CMP_BWD_MS,
        target_met=None if bwd_64k is None else bwd_64k <= TARGET_64K_CMP_BWD_MS,
    )
    payload = dict(
        meta=meta,
        summary=summary,
        sections_s=report.section_s,
        checks=report.checks,
        timings=report.timings,
        failures=report.failures,
    )
    (out_dir / "gpu_check_flex.json").write_text(json.dumps(payload, indent=2, default=str))
    md = (
        [
            f"# flexnsa FlexAttention branches on {meta['gpu']}",
            "",
            f"{meta['date']}, torch {meta['torch']}, triton {meta['triton']}, CUDA {meta['cuda']}, driver {meta['driver']}.",
            "Paper shape for timings: B=1, HQ=64, HKV=4, D=128, bf16, l=32, d=16, w=512. Medians of "
            "triton.testing.do_bench. chunks = query chunks folded into the batch for the compressed backward.",
            "",
            "## Timings",
            "",
        ]
        + _timing_rows(report)
        + [
            "",
            f"64k compressed backward with default chunks ({auto_64k}): "
            f"{'n/a' if bwd_64k is None else f'{bwd_64k:.2f} ms'} (target <= {TARGET_64K_CMP_BWD_MS:.0f} ms).",
            "",
            "## Correctness (error vs the float64 reference; 256 sampled rows vs float32 for 16k/64k)",
            "",
            "| case | quantity | error | reference-in-dtype error | tolerance | ok |",
            "|---|---|---|---|---|---|",
        ]
    )
    for c in report.checks:
        md.append(
            f"| {c['case']} | {c['quantity']} | {c['err']:.2e} | {c['ref_lowp_err']:.2e} | {c['tol']:.2e} | "
            f"{'yes' if c['ok'] else '**NO**'} |"
        )
    if report.failures:
        md += ["", "## Failures", ""] + [f"- {f}" for f in report.failures]
    (out_dir / "gpu_check_flex.md").write_text("\n".join(md) + "\n")
    return summary


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--budget-s", type=float, default=150.0, help="skip the optional chunk sweep past this (s)"
    )
    parser.add_argument("--skip-timing", action="store_true")
    parser.add_argument("--skip-long", action="store_true")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("needs a CUDA GPU", file=sys.stderr)
        return 2
    start = time.perf_counter()
    torch.set_float32_matmul_precision("highest")  # fp32 checks: no TF32 anywhere
    raise_recompile_limit(256, 1024)  # one compiled flex_attention serves every shape here (about 20)
    out_dir = pathlib.Path(os.environ.get("OUT", str(REPO_ROOT / "perf" / "results" / "tmp")))
    report = Report()
    meta = _meta()
    print(f"gpu_check_flex: {meta}", flush=True)

    # Order: correctness, timings, then the long forward (it reuses the 64k forward kernels the
    # timings compiled). Outputs are rewritten after each section, so a run stopped by an outer
    # time limit still leaves its results.
    print("(a) forward+backward vs reference", flush=True)
    check_small(report)
    report.section_s["small"] = time.perf_counter() - start
    write_outputs(report, meta, out_dir)
    if not args.skip_timing:
        print("(b) timings", flush=True)
        time_branches(report, deadline=start + args.budget_s)
        report.section_s["timing"] = time.perf_counter() - start
        write_outputs(report, meta, out_dir)
    if not args.skip_long:
        print("(a') long forward vs sampled-row reference", flush=True)
        check_long(report)
        report.section_s["long"] = time.perf_counter() - start

    summary = write_outputs(report, meta, out_dir)
    elapsed = time.perf_counter() - start
    print()
    print("\n".join(_timing_rows(report)))
    print(
        f"\nchecks: {summary['checks']}, failures: {summary['failures']}; 64k compressed backward "
        f"{summary['compressed_64k_backward_ms']} ms (target <= {TARGET_64K_CMP_BWD_MS} ms, met: {summary['target_met']}); "
        f"sections (s, cumulative): {', '.join(f'{k} {v:.0f}' for k, v in report.section_s.items())}; "
        f"total {elapsed:.0f} s; outputs in {out_dir}"
    )
    for failure in report.failures:
        print(f"FAILED: {failure}")
    return 1 if report.failures else 0


if __name__ == "__main__":
    sys.exit(main())
