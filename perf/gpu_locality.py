"""How ``nsa_attention``'s forward+backward depends on the locality of the selections, against cuDNN.

The report times random inputs, whose top-n selections are independent from one query to the next:
four consecutive queries share only the forced blocks (34.8 distinct blocks of 64 slots at 8k). A
trained model's neighbouring queries choose mostly the same blocks, which the union kernels load once
per tile. This probe replaces the report's ``q`` by its moving average over ``W`` consecutive queries
(rescaled by ``sqrt(W)`` to keep unit variance; ``W = 1`` is the report's input), so that the
selections of neighbours overlap more as ``W`` grows, and times in one process:

- the mean number of distinct blocks per tile of 4 queries (of ``4 n`` slots), from the library's
  selection;
- ``nsa_attention`` forward+backward on those inputs (all other inputs as in the report);
- full causal attention through SDPA's cuDNN backend, forward+backward, on the same inputs.

Writes ``$OUT/locality.md`` and ``.json``.

    python perf/gpu_locality.py [--seq-lens 8192] [--windows 1,4,16,64]
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

from _cases import build_baseline, build_nsa, make_inputs, smoothed_queries, union_sizes  # noqa: E402  (perf/ is on sys.path: run as a script)
from _shapes import GPU_SHAPES  # noqa: E402
from _timing import median_ms  # noqa: E402
from _writers import markdown_table, write_results  # noqa: E402

import flexnsa  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq-lens", default="8192")
    parser.add_argument("--windows", default="1,4,16,64")
    args = parser.parse_args()
    out_dir = os.environ.get("OUT", "perf/results/tmp")
    os.makedirs(out_dir, exist_ok=True)
    shape = GPU_SHAPES["paper"]
    cfg = flexnsa.NSAConfig()
    rows = []
    for T in (int(x) for x in args.seq_lens.split(",")):
        inp = make_inputs(shape, T, cfg, torch.device("cuda"), seed=0)
        q_random = inp.q
        cudnn = build_baseline("sdpa-cudnn", inp)
        cudnn_ms = median_ms(cudnn.fwd_bwd, inp.device, leaves=cudnn.leaves)
        for window in (int(x) for x in args.windows.split(",")):
            inp.q = smoothed_queries(q_random, window).requires_grad_()  # [B, HQ, T, Dk]
            with torch.no_grad():
                idx = flexnsa.select_blocks(inp.q, inp.k_cmp, cfg)  # [B, HKV, T, n]
            nsa = build_nsa(inp)
            nsa_ms = median_ms(nsa.fwd_bwd, inp.device, leaves=nsa.leaves)
            row = {"T": T, "window": window, "distinct_per_4": union_sizes(idx), "nsa_fwd_bwd_ms": nsa_ms,
                   "cudnn_fwd_bwd_ms": cudnn_ms, "speedup": cudnn_ms / nsa_ms}  # fmt: skip
            rows.append(row)
            print(row, flush=True)
        inp.q = q_random
        cudnn_after = median_ms(cudnn.fwd_bwd, inp.device, leaves=cudnn.leaves)
        rows.append({"T": T, "window": "cuDNN again", "cudnn_fwd_bwd_ms": cudnn_after})
        print(rows[-1], flush=True)
        del inp, cudnn, nsa, q_random
        torch.cuda.empty_cache()
    header = ["T", "q averaged over", "distinct blocks per 4 queries (of 64)", "nsa fwd+bwd ms", "cuDNN fwd+bwd ms",
              "cuDNN / nsa"]  # fmt: skip
    table = [[str(r["T"]), str(r["window"]), f"{r['distinct_per_4']:.1f}", f"{r['nsa_fwd_bwd_ms']:.3f}",
              f"{r['cudnn_fwd_bwd_ms']:.3f}", f"{r['speedup']:.2f}x"] for r in rows if "speedup" in r]  # fmt: skip
    md = ["# nsa_attention forward+backward against the locality of the selections (paper shape, bf16)", "",
          *markdown_table(header, table), "",
          *(f"cuDNN timed again after the rows at T={r['T']}: {r['cudnn_fwd_bwd_ms']:.3f} ms" for r in rows
            if r["window"] == "cuDNN again")]  # fmt: skip
    write_results(out_dir, "locality", md, rows)
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    sys.exit(main())
