"""Kernel-level breakdown of ``nsa_attention`` (and of one decode step) on one CUDA device.

For each case: warm up, then run ``torch.profiler`` over a few iterations and write the GPU kernels
sorted by total device time (ms per iteration, calls per iteration, share of the iteration) to
``$OUT/profile.md`` (and the raw rows to ``profile.json``). Device times are the profiler's kernel
durations, so launch gaps do not appear in them; the wall time per iteration (CUDA events) is given
next to their sum.

    python perf/gpu_profile.py [--cases paper:8192:fwdbwd,paper:65536:fwd,paper:65536:infer,decode:65536]

Modes: ``fwd`` (the forward with autograd recording, as in training), ``fwdbwd``, ``infer`` (the forward
under ``torch.no_grad()``).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

from _cases import build_nsa, make_inputs  # noqa: E402  (perf/ is on sys.path: run as a script)
from _shapes import GPU_SHAPES  # noqa: E402
from _timing import kernel_times  # noqa: E402
from _writers import write_results  # noqa: E402

import flexnsa  # noqa: E402

DEFAULT_CASES = "paper:8192:fwdbwd,paper:65536:fwd,paper:65536:fwdbwd,small-group:65536:fwdbwd,decode:65536"


def kernel_table(fn, iters: int = 3):
    """Runs ``fn`` ``iters`` times under the profiler; returns (rows, wall ms per iteration)."""
    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    torch.cuda.synchronize()
    rows = [dict(r, kernel=r["kernel"][:110]) for r in kernel_times(fn, iters)]
    return rows, start.elapsed_time(end) / iters


def nsa_case(shape_name: str, seq_len: int, mode: str):
    shape = GPU_SHAPES[shape_name]
    inp = make_inputs(shape, seq_len, flexnsa.NSAConfig(), torch.device("cuda"))
    case = build_nsa(inp)

    def fwd_bwd():
        for leaf in case.leaves:
            leaf.grad = None
        case.fwd_bwd()

    def infer():  # the forward without autograd (prefill, inference)
        with torch.no_grad():
            return case.fwd()

    modes = {"fwd": case.fwd, "fwdbwd": fwd_bwd, "infer": infer}
    if mode not in modes:
        raise ValueError(f"mode must be one of {sorted(modes)}, got {mode!r}")
    return modes[mode], inp


def decode_case(context: int):
    from flexnsa.cache import NSACache
    from flexnsa.decode import nsa_decode_step

    cfg = flexnsa.NSAConfig()
    B, HQ, HKV, D = 16, 64, 4, 128
    cache = NSACache(cfg, 1, B, HKV, context + 16, D, D, dtype=torch.bfloat16, device="cuda")
    g = torch.Generator(device="cuda").manual_seed(0)
    k = torch.randn(B, HKV, context, D, generator=g, device="cuda").bfloat16()
    v = torch.randn(B, HKV, context, D, generator=g, device="cuda").bfloat16()
    tc = cfg.num_cmp_tokens(context)
    kc = torch.randn(B, HKV, tc, D, generator=g, device="cuda").bfloat16()
    vc = torch.randn(B, HKV, tc, D, generator=g, device="cuda").bfloat16()
    cache.prefill(0, k, v, kc, vc)
    q = torch.randn(B, HQ, 1, D, generator=g, device="cuda").bfloat16()
    gates = torch.rand(B, HQ, 1, 3, generator=g, device="cuda").bfloat16()
    return lambda: nsa_decode_step(q, cache, 0, gates, backend="triton")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", default=DEFAULT_CASES)
    args = parser.parse_args()
    out_dir = os.environ.get("OUT", "perf/results/tmp")
    os.makedirs(out_dir, exist_ok=True)
    md = ["# Kernel breakdown (torch.profiler, device time per iteration)", ""]
    raw = {}
    for spec in args.cases.split(","):
        parts = spec.split(":")
        t0 = time.time()
        try:
            if parts[0] == "decode":
                fn = decode_case(int(parts[1]))
            else:
                fn, _ = nsa_case(parts[0], int(parts[1]), parts[2])
            rows, wall = kernel_table(fn)
        except Exception as exc:  # record and go on
            md += [f"## {spec}: failed: {type(exc).__name__}: {exc}", ""]
            print(f"{spec}: failed: {exc}", flush=True)
            continue
        total = sum(r["ms"] for r in rows)
        raw[spec] = {"wall_ms": wall, "kernel_ms": total, "rows": rows}
        md += [f"## {spec}: wall {wall:.3f} ms/iter, kernels {total:.3f} ms ({time.time() - t0:.0f} s)", "",
               "| kernel | ms | calls | share |", "|---|---|---|---|"]
        md += [f"| `{r['kernel']}` | {r['ms']:.4f} | {r['calls']:.0f} | {100 * r['ms'] / total:.1f}% |" for r in rows[:30]]
        md.append("")
        print("\n".join(md[-min(len(rows), 30) - 4:]), flush=True)
        torch.cuda.empty_cache()
    write_results(out_dir, "profile", md, raw)
    return 0


if __name__ == "__main__":
    sys.exit(main())
