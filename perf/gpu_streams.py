"""Probe: how much of NSA's three independent branches can overlap on CUDA streams.

The window branch does not depend on the compressed branch or the selection; the three branch
backwards only depend on the combine backward. This script times, at the paper shape, the pieces
of ``nsa_attention`` one after another on one stream and then forked onto streams (the same
kernels, the same inputs), so that the gain of running branches concurrently is measured before
the library is changed for it:

- forward (autograd recording, as in training): compressed + top-n + window + selected/combine,
  serial against the window on a side stream (joined before the selected kernels);
- backward, given the combine backward's gradients: window backward, compressed backward and the
  selected backward (dK/dV, dq), serial against forked, in two launch orders and with the side
  streams at high priority or not.

Writes ``$OUT/streams.md``/``.json``. Nothing in the library uses it (perf/NOTES.md, session 11).

    python perf/gpu_streams.py [--seq-lens 8192,65536]
"""

from __future__ import annotations

import argparse
import os

import torch
from _cases import make_inputs
from _shapes import GPU_SHAPES
from _timing import median_ms
from _writers import markdown_table, write_results

import flexnsa
from flexnsa import custom_ops
from flexnsa.flex_branches import compressed_attention, sliding_window_attention


def _forward_pieces(inp, scale, stream_win=None):
    """The branch outputs of one training forward; the window on ``stream_win`` when given."""
    q, k, v, config = inp.q, inp.k, inp.v, inp.config
    main = torch.cuda.current_stream()
    if stream_win is not None:
        stream_win.wait_stream(main)
        with torch.cuda.stream(stream_win):
            o_win = sliding_window_attention(q, k, v, config.window, scale)  # [B, HQ, T, Dv]
    o_cmp, lse_cmp = compressed_attention(q, inp.k_cmp, inp.v_cmp, config, scale, return_lse=True)
    idx = custom_ops.select_blocks(q, inp.k_cmp, lse_cmp.detach(), config, scale)  # [B, HKV, T, n]
    if stream_win is None:
        o_win = sliding_window_attention(q, k, v, config.window, scale)
    else:
        main.wait_stream(stream_win)
        o_win.record_stream(main)
    y, o_slc, lse = custom_ops.selected_attention_gated(q, k, v, idx, o_cmp, o_win, inp.gates, config, scale)
    return y, o_slc, lse, o_cmp, o_win, idx


def run(seq_len: int) -> list[dict]:
    shape = GPU_SHAPES["paper"]
    config = flexnsa.NSAConfig()
    inp = make_inputs(shape, seq_len, config, torch.device("cuda"))
    scale = shape.qk_dim**-0.5
    dev = inp.q.device
    rows = []

    def timed(name, fn):
        ms = median_ms(fn, dev, inp.leaves)
        rows.append({"T": seq_len, "case": name, "ms": ms})
        print(f"T={seq_len} {name}: {ms:.3f} ms", flush=True)
        return ms

    side = torch.cuda.Stream(dev)
    side_hi = torch.cuda.Stream(dev, priority=-1)
    timed("fwd serial", lambda: _forward_pieces(inp, scale)[0])
    timed("fwd window on side stream", lambda: _forward_pieces(inp, scale, side)[0])
    timed("fwd window on high-priority stream", lambda: _forward_pieces(inp, scale, side_hi)[0])

    # backward pieces from fixed branch gradients (the combine backward of the fixed grad_out)
    q, k, v, k_cmp, v_cmp = inp.q, inp.k, inp.v, inp.k_cmp, inp.v_cmp
    y, o_slc, lse, o_cmp, o_win, idx = _forward_pieces(inp, scale)
    with torch.no_grad():
        d_cmp, d_slc, d_win, _, delta = torch.ops.flexnsa.gated_combine_backward(
            inp.grad_out, o_cmp.detach(), o_slc.detach(), o_win.detach(), inp.gates.detach()
        )

    def slc_bwd():
        return torch.ops.flexnsa.selected_attention_backward(
            d_slc, q.detach(), k.detach(), v.detach(), o_slc.detach(), lse, idx, config.slc_block, scale, False, delta
        )

    def serial():
        gw = torch.autograd.grad(o_win, (q, k, v), d_win, retain_graph=True)
        gc = torch.autograd.grad(o_cmp, (q, k_cmp, v_cmp), d_cmp, retain_graph=True)
        return slc_bwd(), gw, gc

    timed("bwd window only", lambda: torch.autograd.grad(o_win, (q, k, v), d_win, retain_graph=True))
    timed("bwd compressed only", lambda: torch.autograd.grad(o_cmp, (q, k_cmp, v_cmp), d_cmp, retain_graph=True))
    timed("bwd selected only", slc_bwd)
    timed("bwd serial (3 pieces)", serial)

    for label, s_win, s_cmp in (
        ("normal", torch.cuda.Stream(dev), torch.cuda.Stream(dev)),
        ("high-priority", torch.cuda.Stream(dev, priority=-1), torch.cuda.Stream(dev, priority=-1)),
    ):
        # graphs whose window / compressed nodes live on the side streams
        main = torch.cuda.current_stream()
        s_win.wait_stream(main)
        s_cmp.wait_stream(main)
        with torch.cuda.stream(s_win):
            o_win_s = sliding_window_attention(q, k, v, config.window, scale)
        with torch.cuda.stream(s_cmp):
            o_cmp_s, _ = compressed_attention(q, k_cmp, v_cmp, config, scale, return_lse=True)
        main.wait_stream(s_win)
        main.wait_stream(s_cmp)

        def side_grads():
            with torch.cuda.stream(s_win):
                gw = torch.autograd.grad(o_win_s, (q, k, v), d_win, retain_graph=True)
            with torch.cuda.stream(s_cmp):
                gc = torch.autograd.grad(o_cmp_s, (q, k_cmp, v_cmp), d_cmp, retain_graph=True)
            return gw, gc

        def forked_side_first():
            main = torch.cuda.current_stream()
            s_win.wait_stream(main)
            s_cmp.wait_stream(main)
            gw, gc = side_grads()
            out = slc_bwd()
            main.wait_stream(s_win)
            main.wait_stream(s_cmp)
            return out, gw, gc

        def forked_selected_first():
            main = torch.cuda.current_stream()
            s_win.wait_stream(main)
            s_cmp.wait_stream(main)
            out = slc_bwd()
            gw, gc = side_grads()
            main.wait_stream(s_win)
            main.wait_stream(s_cmp)
            return out, gw, gc

        timed(f"bwd forked, side first, {label} side streams", forked_side_first)
        timed(f"bwd forked, selected first, {label} side streams", forked_selected_first)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seq-lens", default="8192,65536")
    args = parser.parse_args()
    rows = []
    for T in (int(x) for x in args.seq_lens.split(",")):
        rows += run(T)
        torch.cuda.empty_cache()
    md = ["# Branches on CUDA streams (paper shape, bf16)", ""]
    md += markdown_table(["T", "case", "ms"], [[str(r["T"]), r["case"], f"{r['ms']:.3f}"] for r in rows])
    write_results(os.environ.get("OUT", "."), "streams", md, rows)


if __name__ == "__main__":
    main()
