"""Launching the decode kernels of :mod:`flexnsa.custom_ops.decode_kernels`, and their torch.library op.

``decode_attention(q, cache, layer_idx, gates, scale)`` runs one NSA decode step over an
:class:`~flexnsa.cache.NSACache` layer in four launches, with no host sync: every grid and buffer
size derives from the cache's capacity, ``q``'s shape and the device's SM count, never from the
current length (kernels read it from ``cache.lengths``). The step can therefore be captured in a
CUDA graph and replayed while the cache grows.

Under ``torch.compile`` the launcher is reached through the custom op ``flexnsa::decode_attention``
(an opaque node, no graph break); in eager mode it is called directly (the op's dispatch costs tens
of microseconds, as much as the step itself at 8k context).
"""

from __future__ import annotations

import dataclasses
import functools
import os

import torch
import triton

from . import decode_kernels as K

__all__ = ["DecodeTuning", "DEFAULT_TUNING", "decode_attention", "launch_decode"]


@dataclasses.dataclass(frozen=True)
class DecodeTuning:
    """Launch parameters (shape-only decisions: a graph captured with them stays valid).

    cmp_tile_tokens: target compressed tokens per tile of the compressed kernel (rounded to whole
        selection blocks: a tile holds ``BJ = max(1, cmp_tile_tokens // (l'/d))`` blocks).
    cmp_splits: programs per (query row, KV head) over the compressed tokens; 0 = heuristic
        (``floor(SMs * cmp_programs_per_sm / (rows * HKV))``: one full wave, no partial last wave).
    slc_tiles_per_program: selected blocks / window tiles per program of the selected+window
        kernel; 0 = heuristic (at most 8, while the programs still give ``programs_per_sm`` per SM:
        batch 16, HKV=4 on 132 SMs gives 8, i.e. 2 selection + 1 window program per group; the
        H200 step at 64k was 0.1043 ms with 8 against 0.1054 ms with 4, the previous cap).
    select_chunk_blocks: selection blocks scored per program of the selection kernel (each
        program contributes its n best to the final top-n).
    programs_per_sm: target of the selected+window heuristic.
    num_warps: of the two split-K kernels.
    cmp_programs_per_sm: target of the compressed split heuristic: the CTAs of the compressed
        kernel resident per SM (sm_90, bf16, D=128, 64-token tiles: 99 registers and 84 KB of
        shared memory with ``cmp_num_stages=3``, so 2 per SM; 51 KB with 2 stages, 4 per SM).
    cmp_num_stages: software-pipelining depth of the compressed kernel's K/V loads.
    select_topn: how the selection kernel orders a chunk's n best keys (``TB * BJ_PAD`` packed
        keys, all distinct): ``"rank"`` writes each key to slot ``rank = #{larger keys}`` (one
        pairwise ``[TB*BJ_PAD, TB*BJ_PAD]`` comparison, a masked scatter); ``"serial"`` (v2) runs n
        block-wide max-reductions one after the other. Same eligible candidates in the same slots;
        past them both write ineligible keys (``< 2^32``, block -1), not always the same ones.
        "rank" applies to chunks of at most 128 keys (the default ``select_chunk_blocks``); larger
        chunks use the serial merge, which is faster there.
    combine_per_group: the combine kernel runs one program per (query row, KV group), its ``G``
        heads as the rows of ``[G_PAD, DV]`` tiles (``rows * HKV`` programs), instead of one per
        (query row, head) (``rows * HQ`` programs of one ``[DV]`` row each). Same math; the sums
        over partials run in another order, so outputs differ by float rounding only.

    v1 defaults (measured 0.127 ms at 64k on the H200) were programs_per_sm=8 for both kernels
    (ceil-rounded: 17 compressed splits, 1088 programs = 4.1 waves of 264 resident CTAs) and one
    tile per selected/window program.
    """

    cmp_tile_tokens: int = 64
    cmp_splits: int = 0
    slc_tiles_per_program: int = 0
    select_chunk_blocks: int = 128
    programs_per_sm: int = 1
    num_warps: int = 4
    cmp_programs_per_sm: int = 2
    cmp_num_stages: int = 3
    select_topn: str = "rank"
    # At batch 16, HKV=4, 64k: 64 programs of 8 warps (sm_90 compile: 54 registers, ~780 SASS
    # instructions, 11 barriers; each reads its 16 heads' ~80 KB of partials) instead of 1024 of
    # 4 warps (32 registers, ~450 instructions, 13 barriers; ~8 per SM). Measured on the H200
    # (perf/results/h200/decode.md): step 0.1054 -> 0.1005 ms with it, 0.0974 ms with it and 8
    # selected/window tiles per program.
    combine_per_group: bool = True

    def __post_init__(self) -> None:
        if self.select_topn not in _SELECT_TOPN:
            raise ValueError(f"DecodeTuning.select_topn must be one of {_SELECT_TOPN}, got {self.select_topn!r}")
        if not isinstance(self.combine_per_group, bool):
            raise ValueError(f"DecodeTuning.combine_per_group must be a bool, got {self.combine_per_group!r}")


_SELECT_TOPN = ("rank", "serial")
DEFAULT_TUNING = DecodeTuning()


def _tuning_to_ints(tuning: DecodeTuning) -> list[int]:
    """The tuning as the ``list[int]`` the custom op's schema takes (``select_topn`` as its index
    in ``_SELECT_TOPN``, bools as 0/1); inverse of :func:`_tuning_from_ints`."""
    values = dataclasses.asdict(tuning)
    values["select_topn"] = _SELECT_TOPN.index(tuning.select_topn)
    return [int(values[f.name]) for f in dataclasses.fields(DecodeTuning)]


def _tuning_from_ints(ints) -> DecodeTuning:
    values = dict(zip((f.name for f in dataclasses.fields(DecodeTuning)), ints))
    values["select_topn"] = _SELECT_TOPN[values["select_topn"]]
    values["combine_per_group"] = bool(values["combine_per_group"])
    return DecodeTuning(**values)


def _pow2(x: int, at_least: int = 1) -> int:
    return max(at_least, triton.next_power_of_2(max(1, x)))


@functools.lru_cache(maxsize=None)
def _num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4  # the interpreter: a few programs are enough to exercise the splits


@dataclasses.dataclass(frozen=True)
class _Plan:
    """Sizes of one launch, derived from shapes only."""

    G: int
    G_PAD: int
    DK_PAD: int
    DV_PAD: int
    C: int  # l' / d: stride segments per selection block
    R: int  # l / d: stride segments per compressed token
    BJ: int  # selection blocks per compressed tile
    SPILL: int  # further blocks a tile's last tokens reach
    TT: int  # compressed tokens per tile
    BN: int  # TT padded
    NTILES: int
    TB: int  # tiles per chunk of the selection kernel
    NCHUNK: int
    TPS: int  # tiles per split
    NSPLIT: int
    BS: int  # selection block padded
    SPP: int  # selected blocks / window tiles per program
    NP_SEL: int
    NP_WIN: int
    NW_TILES: int


def _plan(cfg, max_len: int, rows: int, HQ: int, HKV: int, Dk: int, Dv: int, device, tuning) -> _Plan:
    l, d, bs = cfg.cmp_block, cfg.cmp_stride, cfg.slc_block
    G = HQ // HKV
    C, R = bs // d, l // d
    SPILL = -(-(R - 1) // C)
    BJ = max(1, tuning.cmp_tile_tokens // C, SPILL)
    TT = BJ * C
    NTILES = -(-cfg.num_blocks(max_len) // BJ)  # tiles cover Tc(max_len) <= NB * C tokens
    TB = min(_pow2(NTILES), max(1, tuning.select_chunk_blocks // BJ))
    groups = rows * HKV
    cmp_target = _num_sms(device) * tuning.cmp_programs_per_sm  # resident CTAs: one wave
    splits = tuning.cmp_splits or max(1, min(NTILES, cmp_target // groups))
    TPS = -(-NTILES // splits)
    NSPLIT = -(-NTILES // TPS)
    BS = _pow2(bs, 16)
    NW_TILES = -(-cfg.window // BS)
    tiles = cfg.num_selected + NW_TILES
    target = _num_sms(device) * tuning.programs_per_sm
    SPP = tuning.slc_tiles_per_program or max(1, min(8, (tiles * groups) // target))
    return _Plan(
        G=G, G_PAD=_pow2(G, 16), DK_PAD=_pow2(Dk, 16), DV_PAD=_pow2(Dv, 16), C=C, R=R, BJ=BJ,
        SPILL=SPILL, TT=TT, BN=_pow2(TT, 16), NTILES=NTILES, TB=_pow2(TB), NCHUNK=-(-NTILES // _pow2(TB)), TPS=TPS, NSPLIT=NSPLIT, BS=BS, SPP=SPP,
        NP_SEL=-(-cfg.num_selected // SPP), NP_WIN=-(-NW_TILES // SPP), NW_TILES=NW_TILES,
    )


def launch_decode(q, k, v, k_win, v_win, k_cmp, v_cmp, length, gates, cfg, max_len, scale,
                  tuning: DecodeTuning = DEFAULT_TUNING):
    """Runs the four kernels. Shapes: ``q [B, HQ, T_new, Dk]``, ``k/k_win [B, HKV, max_len, Dk]``,
    ``v/v_win [B, HKV, max_len, Dv]``, ``k_cmp/v_cmp [B, HKV, >= Tc(max_len), D]``, ``length`` a
    one-element int64 tensor (tokens held, the new ones included), ``gates [B, HQ, T_new, 3]``.
    Returns ``o [B, HQ, T_new, Dv]`` (q's dtype) and ``indices int32 [B, HKV, T_new, n]``."""
    B, HQ, T_new, Dk = q.shape
    HKV, Dv = k.shape[1], v.shape[-1]
    rows = B * T_new
    tensors = (q, k, v, k_win, v_win, k_cmp, v_cmp)
    q, k, v, k_win, v_win, k_cmp, v_cmp = (x if x.stride(-1) == 1 else x.contiguous() for x in tensors)
    p = _plan(cfg, max_len, rows, HQ, HKV, Dk, Dv, q.device, tuning)
    f32 = dict(device=q.device, dtype=torch.float32)
    precision = "ieee" if q.dtype == torch.float32 else "tf32"
    dot_fp32 = os.environ.get("TRITON_INTERPRET") == "1"  # see decode_kernels._dot
    BJS = p.BJ + p.SPILL
    cmp_o = torch.empty(rows, HQ, p.NSPLIT, Dv, **f32)
    cmp_m = torch.empty(rows, HQ, p.NSPLIT, **f32)
    cmp_l = torch.empty(rows, HQ, p.NSPLIT, **f32)
    score_part = torch.empty(rows, HQ, p.NTILES, BJS, **f32)
    tile_max = torch.empty(rows, HQ, p.NTILES, **f32)
    K._cmp_partial_kernel[(rows, HKV, p.NSPLIT)](
        q, q.stride(0), q.stride(1), q.stride(2),
        k_cmp, k_cmp.stride(0), k_cmp.stride(1), k_cmp.stride(2),
        v_cmp, v_cmp.stride(0), v_cmp.stride(1), v_cmp.stride(2),
        length, cmp_o, cmp_m, cmp_l, score_part, tile_max,
        scale, T_new, HQ,
        G=p.G, G_PAD=p.G_PAD, DK=Dk, DV=Dv, DK_PAD=p.DK_PAD, DV_PAD=p.DV_PAD,
        CMP_L=cfg.cmp_block, CMP_D=cfg.cmp_stride, C=p.C, R=p.R,
        BJ=p.BJ, BJS=BJS, BJS_PAD=_pow2(BJS, 16), TT=p.TT, BN=p.BN,
        TPS=p.TPS, NSPLIT=p.NSPLIT, NTILES=p.NTILES, QK_PRECISION=precision, DOT_FP32=dot_fp32,
        num_warps=tuning.num_warps, num_stages=tuning.cmp_num_stages,
    )
    candidates = torch.empty(rows, HKV, p.NCHUNK, cfg.num_selected, device=q.device, dtype=torch.int64)
    # the rank top-n compares TB*BJ_PAD keys pairwise: at 4 warps (sm_90) 64 registers for 128 keys,
    # 128 for 256, spills for 512. Measured on the H200 (64k, batch 16; 8 warps above 128 keys): 128
    # keys 0.1054 ms per step (serial 0.1123), but 256 keys 0.417 and 512 keys 0.857 ms (serial
    # 0.120): above 128 keys per chunk the serial merge runs instead.
    rank_topn = tuning.select_topn == "rank" and p.TB * _pow2(p.BJ) <= 128
    K._select_kernel[(rows, HKV, p.NCHUNK)](
        cmp_m, cmp_l, score_part, tile_max, candidates, length, T_new, HQ, HKV,
        G=p.G, G_PAD=p.G_PAD, CMP_L=cfg.cmp_block, CMP_D=cfg.cmp_stride, SLC=cfg.slc_block,
        N_SEL=cfg.num_selected, N_INIT=cfg.num_init_blocks, N_LOCAL=cfg.num_local_blocks,
        BJ=p.BJ, BJS=BJS, SPILL=p.SPILL, TT=p.TT, NTILES=p.NTILES, TB=p.TB, NCHUNK=p.NCHUNK,
        BJ_PAD=_pow2(p.BJ), NSPLIT=p.NSPLIT, NS_PAD=_pow2(p.NSPLIT), N_SEL_PAD=_pow2(cfg.num_selected),
        RANK_TOPN=rank_topn, num_warps=4,
    )
    indices = torch.empty(B, HKV, T_new, cfg.num_selected, device=q.device, dtype=torch.int32)
    nprog = p.NP_SEL + p.NP_WIN
    sw_o = torch.empty(rows, HQ, nprog, Dv, **f32)
    sw_m = torch.empty(rows, HQ, nprog, **f32)
    sw_l = torch.empty(rows, HQ, nprog, **f32)
    K._slc_win_partial_kernel[(rows, HKV, nprog)](
        q, q.stride(0), q.stride(1), q.stride(2),
        k, v, k.stride(0), k.stride(1), k.stride(2), v.stride(0), v.stride(1), v.stride(2),
        k_win, v_win, k_win.stride(0), k_win.stride(1), k_win.stride(2),
        v_win.stride(0), v_win.stride(1), v_win.stride(2),
        candidates, indices, length, sw_o, sw_m, sw_l, scale, T_new, HQ, HKV,
        G=p.G, G_PAD=p.G_PAD, DK=Dk, DV=Dv, DK_PAD=p.DK_PAD, DV_PAD=p.DV_PAD,
        SLC=cfg.slc_block, BS=p.BS, N_SEL=cfg.num_selected, SPP=p.SPP, NCHUNK=p.NCHUNK,
        NCAND_PAD=_pow2(p.NCHUNK * cfg.num_selected), N_SEL_PAD=_pow2(cfg.num_selected), NP_SEL=p.NP_SEL,
        WINDOW=cfg.window, NW_TILES=p.NW_TILES, NPROG=nprog, QK_PRECISION=precision, DOT_FP32=dot_fp32,
        num_warps=tuning.num_warps,
    )
    out = torch.empty(B, HQ, T_new, Dv, device=q.device, dtype=q.dtype)
    combine_args = (
        cmp_o, cmp_m, cmp_l, sw_o, sw_m, sw_l,
        gates, gates.stride(0), gates.stride(1), gates.stride(2), gates.stride(3),
        out, out.stride(0), out.stride(1), out.stride(2),
        T_new, HQ,
    )
    combine_sizes = dict(DV=Dv, DV_PAD=p.DV_PAD, NSPLIT=p.NSPLIT, NS_PAD=_pow2(p.NSPLIT),
                         NP_SEL=p.NP_SEL, NPROG=nprog, NP_PAD=_pow2(nprog))
    if tuning.combine_per_group:  # [G_PAD, DV] tiles: 8 warps (sm_90, G=16, D=128: 54 registers)
        K._combine_group_kernel[(rows, HKV)](*combine_args, G=p.G, G_PAD=p.G_PAD, **combine_sizes, num_warps=8)
    else:
        K._combine_kernel[(rows, HQ)](*combine_args, **combine_sizes, num_warps=4)
    return out, indices


# ---- torch.library registration (the path torch.compile sees) ------------------------------
def _config_from_ints(cmp_block, cmp_stride, slc_block, num_selected, num_init_blocks, num_local_blocks,
                      window):
    from ..config import NSAConfig

    return NSAConfig(cmp_block, cmp_stride, slc_block, num_selected, num_init_blocks, num_local_blocks, window)


@torch.library.custom_op("flexnsa::decode_attention", mutates_args=())
def _decode_attention_op(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_win: torch.Tensor, v_win: torch.Tensor,
    k_cmp: torch.Tensor, v_cmp: torch.Tensor, length: torch.Tensor, gates: torch.Tensor,
    config: list[int], max_len: int, scale: float, tuning: list[int],
) -> tuple[torch.Tensor, torch.Tensor]:
    cfg = _config_from_ints(*config)
    return launch_decode(q, k, v, k_win, v_win, k_cmp, v_cmp, length, gates, cfg, max_len, scale,
                         _tuning_from_ints(tuning))


@_decode_attention_op.register_fake
def _(q, k, v, k_win, v_win, k_cmp, v_cmp, length, gates, config, max_len, scale, tuning):
    B, HQ, T_new, _ = q.shape
    return (q.new_empty(B, HQ, T_new, v.shape[-1]),
            q.new_empty(B, k.shape[1], T_new, config[3], dtype=torch.int32))


def decode_attention(q, cache, layer_idx: int, gates, scale: float, tuning: DecodeTuning = DEFAULT_TUNING):
    """One decode step over layer ``layer_idx`` of ``cache`` (inputs already validated by
    :func:`flexnsa.decode.nsa_decode_step`). Returns ``(o [B, HQ, T_new, Dv], indices)``."""
    layer, cfg = cache.layers[layer_idx], cache.config
    length = cache.lengths[layer_idx : layer_idx + 1]  # [1] int64 view, read by the kernels
    args = (q, layer.k, layer.v, layer.k_win, layer.v_win, layer.k_cmp, layer.v_cmp, length, gates)
    if torch.compiler.is_compiling():
        cfg_ints = list(dataclasses.astuple(cfg))
        return torch.ops.flexnsa.decode_attention(*args, cfg_ints, cache.max_len, scale,
                                                  _tuning_to_ints(tuning))
    return launch_decode(*args, cfg, cache.max_len, scale, tuning)
