"""How much of ``nsa_attention``'s measured time is the host's: the same call timed three ways.

For each case (shape, T, fwd or fwd+bwd):

- ``eager``: ``triton.testing.do_bench`` median, as in ``perf/report.py``;
- ``host``: milliseconds of host time per call while the device is kept busy (``iters`` calls issued
  back to back after a synchronize, the loop timed without synchronizing; the device queue absorbs
  them, so this is the time to issue one call, not to run it);
- ``graph``: the call captured once in a CUDA graph and the replay timed by ``do_bench`` (no host
  work but one launch): what the device alone needs;
- ``compiled``: ``torch.compile(flexnsa.nsa_attention, fullgraph=True)`` timed like ``eager`` (inductor
  then fuses the elementwise work around the kernels, e.g. the autograd sums of the branches' dq), and
  its host time to issue one call, like ``host``.

If ``host`` approaches ``eager``, the call is host-bound at that size; ``eager - graph`` is the time
the device waited for the host (or spent on launch gaps). Writes ``$OUT/overhead.md`` and ``.json``.

    python perf/gpu_overhead.py [--cases paper:8192:fwdbwd,paper:8192:fwd]
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

from _cases import build_nsa, make_inputs  # noqa: E402  (perf/ is on sys.path: run as a script)
from _shapes import GPU_SHAPES  # noqa: E402
from _timing import median_ms  # noqa: E402
from _writers import markdown_table, write_results  # noqa: E402

import flexnsa  # noqa: E402

DEFAULT_CASES = "paper:8192:fwd,paper:8192:fwdbwd,small-group:8192:fwdbwd"


def _call(case, mode):
    if mode == "fwd":
        return case.fwd

    def fwd_bwd():
        for leaf in case.leaves:
            leaf.grad = None
        case.fwd_bwd()

    return fwd_bwd


def host_ms(fn, iters: int = 20) -> float:
    """Host milliseconds to issue one call (the device is busy with the earlier ones)."""
    fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(iters):
        fn()
    issued = (time.perf_counter() - start) * 1e3 / iters
    torch.cuda.synchronize()
    return issued


def graph_ms(fn) -> float:
    """Device milliseconds of one replay of ``fn`` captured in a CUDA graph."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):  # warm-up on the side stream, as torch.cuda.graph asks
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    torch.cuda.synchronize()
    return median_ms(graph.replay, torch.device("cuda"))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cases", default=DEFAULT_CASES)
    args = parser.parse_args()
    out_dir = os.environ.get("OUT", "perf/results/tmp")
    os.makedirs(out_dir, exist_ok=True)
    rows = []
    for spec in args.cases.split(","):
        shape_name, seq_len, mode = spec.split(":")
        inp = make_inputs(GPU_SHAPES[shape_name], int(seq_len), flexnsa.NSAConfig(), torch.device("cuda"))
        case = build_nsa(inp)
        fn = _call(case, mode)
        row = {"case": spec}
        row["eager_ms"] = median_ms(fn, inp.device, leaves=case.leaves if mode != "fwd" else ())
        row["host_ms"] = host_ms(fn)
        try:
            compiled_case = build_nsa(inp, compiled=True)
            row["compiled_ms"] = median_ms(_call(compiled_case, mode), inp.device,
                                           leaves=case.leaves if mode != "fwd" else ())
            row["compiled_host_ms"] = host_ms(_call(compiled_case, mode))
        except Exception as err:  # a compile failure is a finding, not a crash
            row["compiled_error"] = repr(err)[:300]
        try:
            row["graph_ms"] = graph_ms(fn)
        except Exception as err:  # a capture failure is a finding, not a crash
            row["graph_error"] = repr(err)[:200]
        rows.append(row)
        print(row, flush=True)
        del inp, case, fn
        torch.cuda.empty_cache()
    md = ["# Host overhead of nsa_attention (ms)", ""] + markdown_table(
        ["case", "do_bench eager", "host time to issue", "CUDA graph replay", "torch.compile(fullgraph)",
         "compiled: host time to issue", "note"],
        [[r["case"], f"{r['eager_ms']:.3f}", f"{r['host_ms']:.3f}", f"{r.get('graph_ms', float('nan')):.3f}",
          f"{r.get('compiled_ms', float('nan')):.3f}", f"{r.get('compiled_host_ms', float('nan')):.3f}",
          r.get("graph_error", "") + r.get("compiled_error", "")]
         for r in rows],
    )
    write_results(out_dir, "overhead", md, rows)
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    sys.exit(main())
