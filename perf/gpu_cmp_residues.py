"""Probe: the compressed branch as plain causal attention per residue class of the query position.

Compressed token ``j`` covers raw tokens ``[j*d, j*d + l)`` and is visible to query ``t`` iff
``j*d + l - 1 <= t``. Writing ``t = d*m + r`` (``0 <= r < d``) this is ``j <= m - c_r`` with
``c_r = ceil((l - 1 - r) / d)``: within one residue class the pattern is causal, shifted by ``c_r``.
Dropping the class's first ``c_r`` queries (they see no token) leaves top-left causal attention of
``M - c_r`` queries over the ``Tc`` compressed tokens, which any causal attention kernel computes
(here SDPA's cuDNN backend; residues with the same ``c_r`` share one call, folded into the batch).

The probe times, at the paper shape, FlexAttention's compressed branch as ``nsa_attention`` runs
it (``flexnsa.compressed_attention``, log-sum-exp returned, gradients recorded) against the folded
cuDNN form (the query permutation and the output's inverse included), forward and forward+backward,
and checks the folded output against FlexAttention's. Writes ``$OUT/cmp_residues.md``/``.json``.
Nothing in the library uses it (perf/NOTES.md, session 9).

    python perf/gpu_cmp_residues.py [--seq-lens 8192,65536]
On the CPU (small shapes, SDPA's math backend) ``--check`` compares with the float64 reference.
"""

from __future__ import annotations

import argparse
import math
import os
import sys

import torch
import torch.nn.functional as F
from _timing import median_ms  # perf/ is on sys.path: run as a script
from _writers import markdown_table, write_results

import flexnsa
from flexnsa import reference


def residue_groups(cmp_block: int, cmp_stride: int) -> dict[int, list[int]]:
    """``{c: [residues r with c_r = c]}``, ``c_r = ceil((l - 1 - r) / d)``."""
    groups: dict[int, list[int]] = {}
    for r in range(cmp_stride):
        groups.setdefault(math.ceil((cmp_block - 1 - r) / cmp_stride), []).append(r)
    return groups


def compressed_by_residues(q, k_cmp, v_cmp, config, scale, backend=None):
    """``o [B, HQ, T, Dv]`` of the compressed branch (T a multiple of d) via causal SDPA calls."""
    B, HQ, T, Dk = q.shape
    HKV, Tc, Dv = k_cmp.shape[1], k_cmp.shape[2], v_cmp.shape[-1]
    d = config.cmp_stride
    if T % d:
        raise ValueError(f"T = {T} must be a multiple of d = {d} in this probe")
    M = T // d
    q_res = q.view(B, HQ, M, d, Dk).permute(3, 0, 1, 2, 4)  # [d, B, HQ, M, Dk] (a view)
    out = q.new_zeros(d, B, HQ, M, Dv)  # [d, B, HQ, M, Dv]
    for c, rs in residue_groups(config.cmp_block, d).items():
        if c >= M:
            continue
        n = len(rs)
        qg = q_res[rs[0] : rs[-1] + 1, :, :, c:].reshape(n * B, HQ, M - c, Dk)  # [n*B, HQ, M-c, Dk] (copy)
        kg = k_cmp.expand(n, *k_cmp.shape).reshape(n * B, HKV, Tc, Dk)  # [n*B, HKV, Tc, Dk]
        vg = v_cmp.expand(n, *v_cmp.shape).reshape(n * B, HKV, Tc, Dv)
        if backend is None:
            og = F.scaled_dot_product_attention(qg, kg, vg, is_causal=True, scale=scale, enable_gqa=HKV < HQ)
        else:
            with torch.nn.attention.sdpa_kernel(backend):
                og = F.scaled_dot_product_attention(qg, kg, vg, is_causal=True, scale=scale, enable_gqa=HKV < HQ)
        out[rs[0] : rs[-1] + 1, :, :, c:] = og.view(n, B, HQ, M - c, Dv)
    return out.permute(1, 2, 3, 0, 4).reshape(B, HQ, T, Dv)  # [B, HQ, T, Dv]


def check_cpu() -> None:
    """The folded form against the float64 reference on small shapes (every residue grouping of a
    few (l, d) pairs; G 1 and 4)."""
    gen = torch.Generator().manual_seed(0)
    for l, d, T, G in ((32, 16, 160, 4), (16, 8, 96, 1), (8, 4, 44, 2), (12, 4, 40, 3)):
        cfg = flexnsa.NSAConfig(cmp_block=l, cmp_stride=d, slc_block=max(l, 16), num_selected=3)
        Tc = cfg.num_cmp_tokens(T)
        q = torch.randn(1, 2 * G, T, 16, generator=gen, dtype=torch.float64)
        kc, vc = (torch.randn(1, 2, Tc, 16, generator=gen, dtype=torch.float64) for _ in range(2))
        want = reference.compressed_attention(q, kc, vc, cfg, scale=0.25)
        want = want[0] if isinstance(want, tuple) else want
        got = compressed_by_residues(q, kc, vc, cfg, 0.25)
        torch.testing.assert_close(got, want)
    print("residue folding matches the float64 reference")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq-lens", default="8192,65536")
    parser.add_argument("--check", action="store_true", help="CPU: compare with the float64 reference")
    args = parser.parse_args()
    if args.check:
        check_cpu()
        return 0
    from torch.nn.attention import SDPBackend

    out_dir = os.environ.get("OUT", "perf/results/tmp")
    os.makedirs(out_dir, exist_ok=True)
    cfg = flexnsa.NSAConfig()
    B, HQ, HKV, D = 1, 64, 4, 128
    scale = D**-0.5
    rows = []
    for T in (int(x) for x in args.seq_lens.split(",")):
        gen = torch.Generator(device="cuda").manual_seed(T)
        Tc = cfg.num_cmp_tokens(T)
        q = torch.randn(B, HQ, T, D, generator=gen, device="cuda").bfloat16().requires_grad_()
        kc, vc = (torch.randn(B, HKV, Tc, D, generator=gen, device="cuda").bfloat16().requires_grad_() for _ in range(2))
        do = torch.randn(B, HQ, T, D, generator=gen, device="cuda").bfloat16()
        leaves = (q, kc, vc)
        flex = lambda: flexnsa.compressed_attention(q, kc, vc, cfg, scale=scale, return_lse=True)[0]  # noqa: E731
        for backend in (SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION):
            folded = lambda b=backend: compressed_by_residues(q, kc, vc, cfg, scale, b)  # noqa: E731
            row = {"T": T, "backend": backend.name}
            try:
                with torch.no_grad():
                    ref, got = flex(), folded()
                row["max_abs_diff_vs_flex"] = float((ref.float() - got.float()).abs().max())
                for name, fn in (("flex", flex), ("folded", folded)):
                    row[f"{name}_fwd_ms"] = median_ms(fn, q.device)
                    row[f"{name}_fwdbwd_ms"] = median_ms(lambda fn=fn: fn().backward(do), q.device, leaves=leaves)
            except Exception as err:  # a backend refusing the shape is a finding
                row["error"] = repr(err)[:300]
            rows.append(row)
            print(row, flush=True)
        del q, kc, vc, do
        torch.cuda.empty_cache()
    fmt = lambda r, k: f"{r[k]:.3f}" if k in r else "n/a"  # noqa: E731
    md = ["# The compressed branch folded into causal attention per residue class (paper shape, bf16, ms)", ""]
    md += markdown_table(
        ["T", "folded backend", "flex fwd", "folded fwd", "flex fwd+bwd", "folded fwd+bwd", "max abs diff", "error"],
        [[str(r["T"]), r["backend"], fmt(r, "flex_fwd_ms"), fmt(r, "folded_fwd_ms"), fmt(r, "flex_fwdbwd_ms"),
          fmt(r, "folded_fwdbwd_ms"), f"{r.get('max_abs_diff_vs_flex', float('nan')):.3g}", r.get("error", "")]
         for r in rows],
    )
    write_results(out_dir, "cmp_residues", md, rows)
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    sys.exit(main())
