"""``python -m flexnsa.demo``: train a small NSA model, then show what NSA selects.

1. The main job, :mod:`flexnsa.train_demo`: a 2-layer NSA language model learns associative recall
   (progress bar, falling loss), then its agreement with the float64 reference and its throughput
   against the same-size full-attention model are printed (``--skip-training`` leaves it out).
2. NSA on random inputs with a few "needle" blocks planted in the compressed keys: which blocks a few
   queries select, drawn as text, and the fraction of query-key pairs each branch scores against
   full causal attention.
"""

from __future__ import annotations

import argparse
import time

import torch

import flexnsa


def planted_inputs(cfg: flexnsa.NSAConfig, T: int, heads: int, dim: int, needles, device, seed=0):
    """Random q/k/v with the compressed keys of the ``needles`` blocks aligned with every query."""
    gen = torch.Generator().manual_seed(seed)
    Tc = cfg.num_cmp_tokens(T)

    def rnd(*shape):
        return torch.randn(*shape, generator=gen).to(device)

    q = rnd(1, heads, T, dim)  # [B, HQ, T, D]
    k, v = rnd(1, 1, T, dim), rnd(1, 1, T, dim)  # [B, HKV, T, D]
    k_cmp, v_cmp = rnd(1, 1, Tc, dim), rnd(1, 1, Tc, dim)  # [B, HKV, Tc, D]
    direction = rnd(dim)
    q += 0.5 * direction
    per_block = cfg.slc_block // cfg.cmp_stride
    for block in needles:  # compressed tokens lying inside the needle block
        first = block * per_block
        k_cmp[..., first : first + per_block - 1, :] += 3.0 * direction
    gates = torch.full((1, heads, T, 3), 1 / 3, device=device)  # [B, HQ, T, 3]
    return q, k, v, k_cmp, v_cmp, gates


def draw_selection(indices: torch.Tensor, queries, cfg: flexnsa.NSAConfig, T: int) -> str:
    """One text row per query: '#' selected block, '.' eligible but skipped, ' ' in the future."""
    num_blocks = cfg.num_blocks(T)
    lines = [f"{'query':>7} | block 0 .. {num_blocks - 1}  ('#' selected, '.' skipped)"]
    for t in queries:
        chosen = set(indices[0, 0, t].tolist()) - {-1}
        row = "".join("#" if j in chosen else ("." if j <= t // cfg.slc_block else " ") for j in range(num_blocks))
        lines.append(f"{t:>7} | {row}")
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--skip-training", action="store_true", help="only the selection picture")
    args = parser.parse_args(argv)

    if not args.skip_training:
        from . import train_demo

        train_demo.main(["--device", args.device])
        print()

    cfg = flexnsa.NSAConfig()
    T = args.seq_len
    needles = [3, 11, 17]
    q, k, v, k_cmp, v_cmp, gates = planted_inputs(cfg, T, args.heads, args.dim, needles, args.device)
    start = time.perf_counter()
    out = flexnsa.nsa_attention(q, k, v, k_cmp, v_cmp, gates, cfg)
    indices = flexnsa.select_blocks(q, k_cmp, cfg)
    elapsed = time.perf_counter() - start
    print(f"NSA on {args.device}: T={T}, {args.heads} query heads sharing 1 KV head, D={args.dim}, {cfg}")
    print(f"output {tuple(out.shape)} {out.dtype}, finite: {bool(torch.isfinite(out).all())}, {elapsed:.2f} s")
    print(f"planted needle blocks {needles}: forced are block 0 and the two latest")
    print(draw_selection(indices, [T // 8, T // 3, T // 2, T - 1], cfg, T))
    pairs = cfg.attended_pairs(T)
    sparse = pairs["cmp"] + pairs["slc"] + pairs["win"]
    print(
        f"query-key pairs per head: compressed {pairs['cmp']:,}, selected {pairs['slc']:,}, window "
        f"{pairs['win']:,}; together {sparse / pairs['full']:.1%} of full causal attention ({pairs['full']:,})"
    )
    for long_t in (8192, 65536):
        p = flexnsa.NSAConfig().attended_pairs(long_t)
        print(f"  at T={long_t}: {(p['cmp'] + p['slc'] + p['win']) / p['full']:.1%} of full attention")


if __name__ == "__main__":
    main()
