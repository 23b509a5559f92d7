"""Launch-parameter sweep of the selection kernels (``kernel_utils.TUNING``) and of FlexAttention's
``kernel_options`` at the paper shape (``*_sg`` kernels: the small-group shape).

For each kernel and variant (one ``TUNING`` entry or one set of FlexAttention options at a time): the median time of
``triton.testing.do_bench`` and, for the select kernel, whether the selected sets equal the default
variant's (sorted per row; exact: same tiles' arithmetic is not promised, so a mismatch is reported
as a count, not hidden). Writes ``$OUT/sweep.md`` and ``sweep.json``.

    python perf/gpu_sweep.py [--seq-lens 65536,8192] [--kernels select_v2,selected_fwd,selected_dq,selected_dkv]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch
from _cases import raise_recompile_limit, smoothed_queries, union_sizes
from _timing import median_ms
from _writers import write_results

import flexnsa
from flexnsa import custom_ops
from flexnsa import flex_branches, flex_runtime
from flexnsa.custom_ops import kernel_utils

# FlexAttention backward tiles (bwd_ prefix: the forward keeps the library's tiles); inductor's H100/H200
# default for head dim 128 in bf16 is BLOCK_M1/N1/M2/N2 = 64/128/128/64, 3 stages, 8 warps (torch 2.13)
BWD_TILES = [
    {"extra": {"bwd_num_stages": 2}},
    {"extra": {"bwd_num_warps": 4}},
    {"extra": {"bwd_BLOCK_M1": 32, "bwd_BLOCK_N1": 64, "bwd_BLOCK_M2": 64, "bwd_BLOCK_N2": 32, "bwd_num_warps": 4}},
    {"extra": {"bwd_BLOCK_M1": 64, "bwd_BLOCK_N1": 64, "bwd_BLOCK_M2": 64, "bwd_BLOCK_N2": 64, "bwd_num_warps": 4}},
]

VARIANTS = {
    # SKIP_MERGE: timing diagnostic (no top-n merge, wrong indices): splits the time between scores and merge
    "select_v2": [{}, {"SKIP_MERGE": True}, {"maxnreg": 128}, {"BLOCK_C": 128, "num_warps": 8}, {"TRANS": True}],
    # FLEXNSA_SELECT_IMPL=split: scores stored per query chunk, then a bisection top-n kernel
    # (session 7: ROWS 2/4/8 and 2 warps slower than 1 row on 1 warp, sweep-6.md); BRACKET: the search
    # starts from group maxima
    "select_split": [{}, {"BRACKET": False}, {"PADDED": False}, {"BRACKET": False, "PADDED": False}],
    # the split path's scores kernel tiles (TUNING["select_v2"]), top-n at its default
    # (session 6: BLOCK_T 4, 8 warps, 3 stages, the query tile in registers and PREFETCH were slower
    # than the defaults; perf/results/h200/sweep-5.md)
    # (session 7: BANDED off 9.35 against 8.60 ms at 64k, 128-token chunks on 8 warps 11.87, 1 stage 9.54;
    # sweep-6.md)
    "select_split_scores": [{}, {"BLOCK_T": 16, "num_warps": 8}],
    # QT: tiles of QT queries whose union of selected blocks has <= MAX_UNION blocks (default 9/16 of
    # QT * n, or every tile for G <= 4: query_tiles.union_threshold) run the union kernel, the others
    # the one-query kernel
    # (session 10, sweep-10.md: a claim kernel queueing the taken tiles for the union kernel, so that its
    # programs past them end at once: random 64k even with QT 1, but correlated selections slower; removed)
    "selected_fwd": [{}, {"QT": 1}, {"QT": 4, "MAX_UNION": 64}, {"QT": 4, "MAX_UNION": 36}, {"QT": 2}],
    # (session 12, sweep-12.md: the forward by key blocks, per-entry partial softmaxes then a merge, commit
    # 31652cc: 8k 2.14 against 1.72 ms, 64k 16.96 against 15.6; removed)
    # the whole selected backward; default: dq from the dK/dV kernel's stored dS; DS_BUFFER False (or any
    # tile key): the direct dq kernels
    "selected_dq": [{}, {"DS_BUFFER": False}, {"QT": 1}, {"QT": 4, "MAX_UNION": 64}, {"num_warps": 2}],
    # the dq-from-dS kernel's launch (TUNING["selected_dq_ds"]); QT > 1: tiles of QT queries over the
    # union of their blocks (session 8, sweep-7.md: 2 stages on 4 warps the best at 64k; 2 warps 3.47 against
    # 3.51 ms at 8k but 27.7 against 26.4 at 64k)
    "selected_dq_ds": [{}, {"QT": 2}, {"QT": 4}, {"QT": 8}, {"QT": 4, "num_warps": 8}],
    "selected_dq_ds_sg": [{}, {"QT": 1}, {"QT": 2}, {"QT": 8}],
    # the same kernels on the selections of correlated queries (each query the mean of 64 random ones,
    # rescaled): neighbours then share most blocks, as in trained models
    "selected_fwd_corr": [{}, {"QT": 1}, {"QT": 4, "MAX_UNION": 64}, {"QT": 4, "MAX_UNION": 36}, {"QT": 8}],
    "selected_dq_corr": [{}, {"QT": 1}, {"QT": 4, "MAX_UNION": 64}, {"QT": 4, "MAX_UNION": 36}, {"QT": 8}],
    # small-group shape (HQ=32, HKV=8: G=4), random inputs. Default: union tiles of 4 queries x 4 heads
    # = 16 rows, every tile; {"union_rows": 16, "MAX_UNION": 42} is the previous default (each query's
    # 4 heads padded to 16 rows, 64-row tiles, union only up to 42 blocks)
    "selected_fwd_sg": [{}, {"QT": 1}, {"union_rows": 16, "MAX_UNION": 42}, {"QT": 8}, {"union_warps": 4}],
    "selected_dq_sg": [{}, {"DS_BUFFER": False}, {"QT": 1}, {"QT": 8}, {"union_warps": 4}],
    "flex_cmp_fwd": [{}, {"USE_TMA": True}, {"USE_TMA": True, "BLOCK_M": 128, "BLOCK_N": 128, "num_warps": 8, "num_stages": 2},
                     {"BLOCK_M": 128, "BLOCK_N": 128, "num_warps": 8, "num_stages": 2}],
    # block: the window BlockMask's tile rows (session 10, sweep-10.md: 64 adopted for calls without gradients,
    # flex_branches._WINDOW_FWD_BLOCK; FlexAttention's tiles must divide it)
    "flex_win_fwd": [{}, {"block": 128, "BLOCK_M": 64, "BLOCK_N": 64, "num_warps": 4, "num_stages": 3}],
    # the whole nsa_attention without gradients (inference): the library's window tiles against 128-row ones
    "flex_nsa_fwd": [{}, {"block": 128}],
    # compressed branch forward+backward: query chunks (None: default_num_chunks) and K/V expanded to
    # the HQ query heads (FlexAttention's dK/dV pass then has HQ/HKV times more programs)
    "flex_cmp_train": [{}, {"chunks": 32}, {"expand": True}, {"expand": True, "chunks": 8},
                       {"expand": True, "USE_TMA": True}, {"expand": True, "inductor": True},
                       *({"expand": True, **tiles} for tiles in BWD_TILES)],
    # window branch forward+backward; bwd_ tiles added to the library's forward tiles
    # (session 10: with "block": 64 every backward variant failed to compile, NoValidChoicesError: inductor
    # filters its one default configuration, 64x128 / 128x64, by the BlockMask's tiles before the options apply)
    # (session 11, sweep-11.md: a 64-row BlockMask with gradients, compiled with max_autotune so that inductor has
    # backward tiles dividing it: 14.15 against 15.13 ms at 64k, but the autotuner benchmarks its candidates on
    # dense BlockMask inputs, ~4 minutes per shape at 64k; not adopted, the hook removed)
    "flex_win_train": [{}, {"inductor": True}, *BWD_TILES],
    # the training forward alone (autograd recording): default = the branch's forward tiles with the
    # fwd_ prefix (compressed: Tc >= 2048 only); {"inductor": True}: no kernel_options at all
    "flex_cmp_train_fwd": [{}, {"inductor": True}],
    "flex_win_train_fwd": [{}, {"inductor": True}, {"block": 64}],
    # the whole nsa_attention in training (forward+backward, and the forward alone with autograd recording) and
    # the compressed branch's forward+backward with the library's layout (run twice: the spread is the noise)
    # (session 11, sweep-11.md: the compressed K/V copied to every virtual head, the layout before the stride-0
    # views, 8.862 / 8.835 against 8.771 / 8.766 ms at 8k forward+backward; the hook removed, rerun at e9ae1c5)
    # (session 11, sweep-11.md: PRESCALE_QK in both FlexAttention branches, q scaled by scale * log2(e) and
    # rounded once: 8k forward+backward 8.94 against 8.86 ms, 64k forward 39.70 / 40.05 against 40.26 / 40.36,
    # with "about 20% more numerical error" (inductor's note) in the log-sum-exp that drives the selection)
    "flex_nsa_train": [{}] * 2,
    "flex_nsa_train_fwd": [{}] * 2,
    "flex_cmp_train_lib": [{}] * 2,
    # CHUNK: queries per dK/dV work item (default: custom_ops/selected_bwd.dkv_chunk).
    # (ROWS 32/128, 8 warps, 1 stage and CHUNK 256 were slower than the default at 64k in sweep-2.md;
    # session 8: work items ordered by query segments slower at 8k and 64k, since removed; sweep-8.md)
    # (session 9, sweep-9.md: 3 and 4 stages equal to 2 at 8k and 64k; the pipeliner keeps one buffer of q/dO)
    # (session 9, sweep-9.md: 128 rows on 8 warps and 32 rows slower; the next step's query positions
    # loaded one step ahead so that 3-4 stages double-buffer q/dO: 1.3x slower, since removed)
    # (session 10, sweep-10.md: S^T = K q^T formed keys x rows, so that P^T and dS^T feed their products
    # from registers as in Triton's fused-attention tutorial: 3.588 against 3.333 ms at 8k, slower; removed)
    # (session 12, sweep-12.md: dV and dK in two launches, one accumulator each: 3.966 against 3.341 ms at 8k,
    # 33.45 against 26.03 at 64k; not committed)
    # (session 13, sweep-13.md: register caps through maxnreg, 8 warps at 128 registers or 4 at 168, for more
    # warps per SM, with and without S^T = K q^T and single-buffered loads: every capped variant spilled
    # (triton's n_spills 58-164) and ran 1.35-3.3x slower, e.g. 8 warps / 2 stages / 128 registers 4.508 against
    # 3.335 ms at 8k and 36.3 against 26.0 at 64k; S^T = K q^T on 1 stage without a cap 3.807 / 31.3; removed)
    "selected_dkv": [{}, {"CHUNK": 1024}, {"CHUNK": 256}, {"num_stages": 3}],
    # software-pipelining depth of the one-query forward and the dq-from-dS kernels (session 9)
    "selected_fwd_stages": [{}, {"num_stages": 3}, {"num_stages": 1}],
    "selected_dq_ds_stages": [{}, {"num_stages": 3}, {"num_stages": 4}],
}  # fmt: skip
TUNING_KEY = {"select_split": "select_topn", "select_split_scores": "select_v2", "selected_fwd_stages": "selected_fwd",
              "selected_dq_ds_stages": "selected_dq_ds"}


def kernel_resources(jit_fn) -> list[dict]:
    """Registers, spills and shared memory of every compiled variant of a Triton kernel (its
    ``device_caches``; the layout of that attribute differs between triton versions, so this only
    collects what it finds)."""
    found = []
    for entry in getattr(jit_fn, "device_caches", {}).values():
        caches = entry if isinstance(entry, (tuple, list)) else (entry,)
        for cache in caches:
            if not isinstance(cache, dict):
                continue
            for compiled in cache.values():
                meta = getattr(compiled, "metadata", None)
                if meta is None:
                    continue
                found.append({"num_warps": getattr(meta, "num_warps", None), "num_stages": getattr(meta, "num_stages", None),
                              "maxnreg": getattr(meta, "maxnreg", None), "n_regs": getattr(compiled, "n_regs", None),
                              "n_spills": getattr(compiled, "n_spills", None), "shared": getattr(meta, "shared", None)})
    return found


def set_flex_options(variant: dict | None) -> None:
    """Sets ``flex_runtime``'s benchmark hooks for a flex variant: the library's choice for ``{}`` or
    None, no options at all (inductor's defaults) for ``{"inductor": True}``, the library's choice
    plus ``variant["extra"]`` (e.g. ``bwd_`` tiles) for ``{"extra": {...}}``, else the options alone;
    ``variant["block"]`` forces the window BlockMask's tiles (else the library's choice);
    ``variant["tuning"]`` sets ``kernel_utils.TUNING`` entries for the row (e.g. a selection-kernel variant
    in the whole-call rows ``flex_nsa_train*``; session 12 alternated them this way)."""
    variant = dict(variant or {})
    for key, value in variant.pop("tuning", {}).items():  # selection-kernel TUNING entries (cleared per row)
        kernel_utils.TUNING[key] = dict(value)
    flex_branches._WINDOW_BLOCK = variant.pop("block", None)  # the window's BlockMask tiles (None: the library's)
    flex_runtime.KERNEL_OPTIONS_EXTRA = variant.pop("extra", None)
    if variant.pop("inductor", False):
        flex_runtime.KERNEL_OPTIONS_OVERRIDE = {}
    else:
        flex_runtime.KERNEL_OPTIONS_OVERRIDE = variant or None


def small_group_problem(T: int, cfg, scale: float, g: torch.Generator) -> dict:
    """Random small-group inputs (B=1, HQ=32, HKV=8, D=128, bf16) with the default kernels' selection,
    output and lse, for the ``*_sg`` kernels."""
    B, HQ, HKV, D = 1, 32, 8, 128
    randn = lambda *s: torch.randn(*s, generator=g, device="cuda").bfloat16()  # noqa: E731
    q, k, v = randn(B, HQ, T, D), randn(B, HKV, T, D), randn(B, HKV, T, D)
    kc = randn(B, HKV, cfg.num_cmp_tokens(T), D)
    _, lse_c = flexnsa.compressed_attention(q, kc, kc, cfg, scale=scale, return_lse=True)
    idx = custom_ops.select_blocks(q, kc, lse_c.float().contiguous(), cfg, scale)
    o, lse = custom_ops.selected_attention(q, k, v, idx, cfg, scale)
    return dict(q=q, k=k, v=v, idx=idx, o=o, lse=lse, do=randn(B, HQ, T, D))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq-lens", default="65536,8192")
    parser.add_argument("--kernels", default=",".join(VARIANTS))
    parser.add_argument("--budget", type=float, default=150.0)
    parser.add_argument("--only-default", action="store_true", help="each kernel's first variant only (a kernel "
                        "named twice runs twice: same-process drift)")
    args = parser.parse_args()
    out_dir = os.environ.get("OUT", "perf/results/tmp")
    os.makedirs(out_dir, exist_ok=True)
    t_start = time.time()
    raise_recompile_limit()  # every variant of a FlexAttention option or BlockMask is one more compile
    cfg = flexnsa.NSAConfig()
    B, HQ, HKV, D = 1, 64, 4, 128
    scale = D**-0.5
    rows = []
    for T in (int(x) for x in args.seq_lens.split(",")):
        g = torch.Generator(device="cuda").manual_seed(T)
        randn = lambda *s: torch.randn(*s, generator=g, device="cuda").bfloat16()  # noqa: E731
        q, k, v = randn(B, HQ, T, D), randn(B, HKV, T, D), randn(B, HKV, T, D)
        kc, vc = randn(B, HKV, cfg.num_cmp_tokens(T), D), randn(B, HKV, cfg.num_cmp_tokens(T), D)
        _, lse = flexnsa.compressed_attention(q, kc, vc, cfg, scale=scale, return_lse=True)
        gates = torch.rand(B, HQ, T, 3, device=q.device, dtype=q.dtype)  # [B, HQ, T, 3]
        lse = lse.float().contiguous()
        kernel_utils.TUNING.clear()
        idx_ref = custom_ops.select_blocks(q, kc, lse, cfg, scale)
        ref_sorted = idx_ref.sort(-1).values
        o, lse_s = custom_ops.selected_attention(q, k, v, idx_ref, cfg, scale)
        do = randn(*o.shape)
        q_corr = smoothed_queries(q, 64)  # [B, HQ, T, D]: mean of 64 queries x sqrt(64)
        _, lse_c = flexnsa.compressed_attention(q_corr, kc, vc, cfg, scale=scale, return_lse=True)
        idx_corr = custom_ops.select_blocks(q_corr, kc, lse_c.float().contiguous(), cfg, scale)
        o_corr, lse_corr = custom_ops.selected_attention(q_corr, k, v, idx_corr, cfg, scale)
        union = {"T": T, "kernel": "union_sizes", "variant": "mean distinct blocks per 4 queries (of 64)",
                 "random": union_sizes(idx_ref), "correlated": union_sizes(idx_corr)}  # fmt: skip
        rows.append(union)
        print(union, flush=True)
        qg = q.detach().requires_grad_(True)
        kcg, vcg = kc.detach().requires_grad_(True), vc.detach().requires_grad_(True)
        do_c = randn(B, HQ, T, D)

        def cmp_train(chunks=None, expand=None, **options):
            set_flex_options(options)
            kx, vx = (kcg.repeat_interleave(HQ // HKV, 1), vcg.repeat_interleave(HQ // HKV, 1)) if expand else (kcg, vcg)
            out_c, lse_c = flexnsa.compressed_attention(
                qg, kx, vx, cfg, scale=scale, return_lse=True, _num_chunks=chunks, _expand_heads=False)
            torch.autograd.backward((out_c, lse_c), (do_c, torch.zeros_like(lse_c)))

        def win_train(**options):
            set_flex_options(options)
            out_w = flexnsa.sliding_window_attention(qg, kg, vg, cfg.window, scale=scale)
            out_w.backward(do_c)

        kg, vg = k.detach().requires_grad_(True), v.detach().requires_grad_(True)
        gg = gates.detach().requires_grad_(True)

        def nsa_train_fwd():
            return flexnsa.nsa_attention(qg, kg, vg, kcg, vcg, gg, cfg, scale=scale)

        def nsa_train():
            nsa_train_fwd().backward(do_c)

        def cmp_lib_train():  # the compressed branch forward+backward with the library's layout
            out_c, lse_c = flexnsa.compressed_attention(qg, kcg, vcg, cfg, scale=scale, return_lse=True)
            torch.autograd.backward((out_c, lse_c), (do_c, torch.zeros_like(lse_c)))

        train_calls = {  # forward+backward with the options of set_flex_options (gradients compared)
            "flex_nsa_train": (nsa_train, (qg, kg, vg, kcg, vcg, gg)),
            "flex_cmp_train_lib": (cmp_lib_train, (qg, kcg, vcg)),
        }

        train_fwd = {  # forwards with autograd recording (the graph is dropped: no backward)
            "flex_cmp_train_fwd": lambda: flexnsa.compressed_attention(qg, kcg, vcg, cfg, scale=scale, return_lse=True),
            "flex_win_train_fwd": lambda: flexnsa.sliding_window_attention(qg, kg, vg, cfg.window, scale=scale),
            "flex_nsa_train_fwd": nsa_train_fwd,
        }
        sg = small_group_problem(T, cfg, scale, g) if any(n.endswith("_sg") for n in args.kernels.split(",")) else None
        if sg is not None:
            union["small_group"] = union_sizes(sg["idx"])
            print("small-group union per 4 queries:", union["small_group"], flush=True)
        def select():
            return custom_ops.select_blocks(q, kc, lse, cfg, scale)

        def selected_bwd():
            return torch.ops.flexnsa.selected_attention_backward(do, q, k, v, o, lse_s, idx_ref, cfg.slc_block, scale, True)

        calls = {
            "select_v2": select,  # the select kernels: FLEXNSA_SELECT_IMPL and TUNING set below
            "selected_fwd": lambda: custom_ops.selected_attention(q, k, v, idx_ref, cfg, scale),
            "selected_dq": selected_bwd,  # the whole selected backward, TUNING["selected_dq"] varied
            "select_split": select,
            "select_split_scores": select,
            "selected_fwd_corr": lambda: custom_ops.selected_attention(q_corr, k, v, idx_corr, cfg, scale),
            "selected_dq_corr": lambda: torch.ops.flexnsa.selected_attention_backward(
                do, q_corr, k, v, o_corr, lse_corr, idx_corr, cfg.slc_block, scale, True),
            "flex_cmp_fwd": lambda: flexnsa.compressed_attention(q, kc, vc, cfg, scale=scale, return_lse=True),
            "flex_win_fwd": lambda: flexnsa.sliding_window_attention(q, k, v, cfg.window, scale=scale),
            "flex_nsa_fwd": lambda: flexnsa.nsa_attention(q, k, v, kc, vc, gates, cfg, scale=scale),
            "selected_dkv": selected_bwd,  # TUNING["selected_dkv"] varied
            "selected_dq_ds": selected_bwd,  # TUNING["selected_dq_ds"] varied
            "selected_dq_ds_stages": selected_bwd,
            "selected_fwd_stages": lambda: custom_ops.selected_attention(q, k, v, idx_ref, cfg, scale),
        }  # fmt: skip
        if sg is not None:
            calls["selected_fwd_sg"] = lambda: custom_ops.selected_attention(sg["q"], sg["k"], sg["v"], sg["idx"], cfg, scale)
            calls["selected_dq_sg"] = lambda: torch.ops.flexnsa.selected_attention_backward(
                sg["do"], sg["q"], sg["k"], sg["v"], sg["o"], sg["lse"], sg["idx"], cfg.slc_block, scale, True)
            calls["selected_dq_ds_sg"] = calls["selected_dq_sg"]
        first_grads = {}  # backward kernels: (dq, dk, dv) of each kernel's first variant
        for name in args.kernels.split(","):
            for variant in VARIANTS[name][:1] if args.only_default else VARIANTS[name]:
                if time.time() - t_start > args.budget:
                    print("budget spent", flush=True)
                    break
                kernel_utils.TUNING.clear()
                row = {"T": T, "kernel": name, "variant": json.dumps(variant)}
                if name in train_fwd or name in train_calls or name in ("flex_cmp_train", "flex_win_train"):
                    if name in train_calls:  # autograd recording: outside no_grad
                        set_flex_options(variant)
                        fn, leaves = train_calls[name]
                    elif name == "flex_cmp_train":  # cmp_train / win_train set the options themselves
                        fn, leaves = (lambda: cmp_train(**variant)), (qg, kcg, vcg)
                    elif name == "flex_win_train":
                        fn, leaves = (lambda: win_train(**variant)), (qg, kg, vg)
                    else:
                        set_flex_options(variant)
                        fn, leaves = train_fwd[name], ()
                    try:
                        if name in train_calls:  # gradients against the first variant's
                            for x in leaves:
                                x.grad = None
                            fn()
                            grads = [x.grad.detach().clone() for x in leaves]
                            first = first_grads.setdefault(name, grads)
                            row["max_abs_diff_o"] = max(float((a.float() - b.float()).abs().max()) for a, b in zip(grads, first))
                        if name == "flex_nsa_train_fwd":  # the output against the first variant's
                            out = fn().detach()
                            first = first_grads.setdefault(name, out)
                            row["max_abs_diff_o"] = float((out.float() - first.float()).abs().max())
                        row["ms"] = median_ms(fn, q.device, leaves=leaves)
                    except Exception as err:
                        row["error"] = repr(err)[:160]
                    set_flex_options(None)
                    rows.append(row)
                    print(row, flush=True)
                    continue
                if name.startswith("flex_"):
                    set_flex_options(variant)
                else:
                    kernel_utils.TUNING[TUNING_KEY.get(name, name.removesuffix("_corr").removesuffix("_sg"))] = dict(variant)
                if name.startswith("select_"):  # the select kernels' own variants; every other call: the library's
                    os.environ["FLEXNSA_SELECT_IMPL"] = "split" if name.startswith("select_split") else "v2"
                try:
                    with torch.no_grad():
                        out = calls[name]()
                        if name.startswith("select_"):
                            row["rows_differing"] = int((out.sort(-1).values != ref_sorted).any(-1).sum())
                        if name.startswith("selected_fwd"):  # against the default kernel's output
                            want = o_corr if name.endswith("_corr") else (sg["o"] if name.endswith("_sg") else o)
                            row["max_abs_diff_o"] = float((out[0].float() - want.float()).abs().max())
                        if name.startswith(("selected_dq", "selected_dkv")):  # gradients against the first variant's
                            first = first_grads.setdefault(name, out)
                            row["max_abs_diff_o"] = max(float((a.float() - b.float()).abs().max()) for a, b in zip(out, first))
                        row["ms"] = median_ms(calls[name], q.device)
                except Exception as err:  # a variant that does not compile is a finding
                    row["error"] = repr(err)[:160]
                kernel_utils.TUNING.clear()
                set_flex_options(None)
                os.environ.pop("FLEXNSA_SELECT_IMPL", None)
                rows.append(row)
                print(row, flush=True)
        del q, k, v, kc, vc, gates, gg, lse, o, do, qg, kcg, vcg, kg, vg, do_c, q_corr, idx_corr, o_corr, lse_corr, sg, calls
        torch.cuda.empty_cache()
    if "selected_dkv" in args.kernels.split(","):
        from flexnsa.custom_ops import selected_bwd

        resources = {"kernel": "resources", "variant": "_dkv_kernel", "compiled": kernel_resources(selected_bwd._dkv_kernel)}
        rows.append(resources)
        print(resources, flush=True)
    md = ["# Launch-parameter sweep (bf16, B=1, HQ=64, HKV=4, D=128, paper config)", "",
          "| T | kernel | variant | ms | select rows differing from default / max abs diff of o (fwd) or of dq, dk, dv (bwd) from the first variant | error |", "|---|---|---|---|---|---|"]
    md += [f"| {r['T']} | {r['kernel']} | `{r['variant']}` | {r.get('ms', float('nan')):.3f} | "
           f"{r.get('rows_differing', r.get('max_abs_diff_o', ''))} | {r.get('error', '')} |" for r in rows if "ms" in r or "error" in r]
    md += [f"\n{r['T']}: {r['variant']}: random {r['random']:.1f}, correlated {r['correlated']:.1f}"
           + (f", small-group random {r['small_group']:.1f}" if "small_group" in r else "") for r in rows if r["kernel"] == "union_sizes"]  # fmt: skip
    md += [f"\n{r['variant']} compiled variants: {r['compiled']}" for r in rows if r["kernel"] == "resources"]
    write_results(out_dir, "sweep", md, rows)
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    sys.exit(main())
