"""Small helpers shared by the Triton kernels of the selection branch and their launchers."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

LOG2E = 1.4426950408889634


@triton.jit
def mma(a, b, IEEE: tl.constexpr, UPCAST: tl.constexpr):
    """``a @ b`` with float32 accumulation.

    ``IEEE``: float32 operands multiply in full float32 (TF32, the default, would miss the float32
    reference by ~1e-3). ``UPCAST``: convert the operands to float32 first; only set under Triton's
    CPU interpreter for bfloat16, whose ``tl.dot`` it gets wrong (triton 3.9). The conversion is
    exact; compiled kernels multiply bfloat16 on the tensor cores.
    """
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    elif IEEE:
        return tl.dot(a, b, input_precision="ieee")
    else:
        return tl.dot(a, b)


@triton.jit
def load_kv_block(k_base, v_base, pos, ok, stride_kt, stride_vt,
                  DK: tl.constexpr, DK_PAD: tl.constexpr, DV: tl.constexpr, DV_PAD: tl.constexpr):  # fmt: skip
    """The K and V rows at token positions ``pos [BS_PAD]`` (int64) where ``ok``, zeros elsewhere:
    ``(kb [BS_PAD, DK_PAD], vb [BS_PAD, DV_PAD])``."""
    dk = tl.arange(0, DK_PAD)
    dv = tl.arange(0, DV_PAD)
    kb = tl.load(k_base + pos[:, None] * stride_kt + dk[None, :], mask=ok[:, None] & (dk[None, :] < DK), other=0.0)
    vb = tl.load(v_base + pos[:, None] * stride_vt + dv[None, :], mask=ok[:, None] & (dv[None, :] < DV), other=0.0)
    return kb, vb


def static_sizes(*sizes) -> tuple[int, ...]:
    """``sizes`` as python ints. The kernels take head counts, head dims and slot counts as
    ``tl.constexpr`` and the launchers branch on them, so when ``torch.compile`` traces a launcher with
    symbolic sizes (the automatic dynamic shapes of a recompile) these sizes are specialised: ``int()``
    of a ``SymInt`` adds a guard, and each distinct value gets its own graph, as it gets its own kernel.
    Sequence and batch lengths stay symbolic where a launcher can keep them."""
    return tuple(int(size) for size in sizes)


def head_tile(G: int) -> int:
    """Rows of a per-query tile: the G heads padded to a power of two >= 16 (``tl.dot`` minimum)."""
    return max(16, triton.next_power_of_2(G))


def dims_pad(D: int) -> int:
    """A head dim or block size padded to a power of two >= 16."""
    return max(16, triton.next_power_of_2(D))


def upcast_dots(x: torch.Tensor) -> bool:
    """True for bfloat16 under the CPU interpreter (see :func:`mma`)."""
    return x.device.type == "cpu" and x.dtype == torch.bfloat16


# Per-kernel overrides of the launch heuristics, e.g. ``TUNING["selected_fwd"] = {"num_warps": 8}``.
# Keys: "select" (v1 kernel: num_warps, num_stages, BLOCK_T, BLOCK_C), "select_v2" (the same, TRANS,
# PREFETCH, BANDED, SKIP_MERGE and maxnreg; maxnreg is meant for eager timing, untested under
# torch.compile; also the tiles of the split path's scores kernel), "select_topn" (the split path's
# top-n kernel: ROWS, num_warps, BRACKET, PADDED), "selected_fwd", "selected_dq" (DS_BUFFER, and for the
# direct dq kernels QT, union_rows, MAX_UNION, union_warps, num_warps, num_stages), "selected_dq_ds"
# (num_warps, num_stages of the dq-from-dS kernel), "selected_dkv_reduce" (num_warps, num_stages),
# "selected_dkv" (num_warps, num_stages, ROWS, CHUNK).
# Meant for benchmarks (perf/gpu_sweep.py sweeps them); empty by default.
TUNING: dict[str, dict] = {}


def tuned(name: str, **defaults) -> dict:
    """``defaults`` updated with ``TUNING[name]``."""
    return {**defaults, **TUNING.get(name, {})}


def selection_strides(q, k, v, indices, out, lse) -> tuple[int, ...]:
    """The (batch, head, token) strides of the selected-attention kernels' tensors, in their order."""
    return (*q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *indices.stride()[:3], *out.stride()[:3], *lse.stride()[:2])
