"""What is timed: random inputs for a shape, and one ``Case`` per function, stage or baseline.

A ``Case`` holds a forward closure and a forward+backward closure over fixed inputs. The
forward+backward closure runs the forward then ``out.backward(grad_out)`` with a fixed random
``grad_out``; the timer sets the ``.grad`` of ``Case.leaves`` to None before every run. Builders
raise :class:`Unavailable` with a reason when a piece is missing (not built yet, no CUDA, an
unsupported shape); the caller records "n/a (reason)" and goes on.

Timed pieces (PERF.md):
- ``nsa``: ``flexnsa.nsa_attention`` with given ``k_cmp``/``v_cmp``/gates, selection included.
- stages: ``compressed`` (forward returns the log-sum-exp too), ``scores+top-n`` (forward only:
  discrete), ``window``, ``selected+combine`` (the selected branch with NSA's gated sum in its
  kernels' epilogue, as ``nsa_attention`` runs it).
- ``module``: ``flexnsa.NativeSparseAttention`` forward+backward, projections included.
- baselines: full causal attention (SDPA cuDNN, SDPA flash, FlexAttention causal), FlexAttention
  with a 512-token causal sliding window (the floor of NSA's window branch), fla-core's
  ``parallel_nsa``; on the CPU, SDPA's default backend stands in for them.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import inspect
from collections.abc import Callable

import torch
import torch.nn.functional as F

from _setup import ensure_flexnsa
from _shapes import CPU_MODULE_DIM, MODULE_DIM, Shape

ensure_flexnsa()
import flexnsa  # noqa: E402
from flexnsa import reference  # noqa: E402

__all__ = [
    "Unavailable",
    "Inputs",
    "Case",
    "make_inputs",
    "smoothed_queries",
    "union_sizes",
    "STAGES",
    "BASELINES",
    "build_nsa",
    "build_stage",
    "build_module",
    "build_baseline",
    "baseline_names",
    "FLA_NOTE",
]


class Unavailable(Exception):
    """A case that cannot run here; ``str(error)`` is the reason shown in the report."""


@dataclasses.dataclass
class Inputs:
    """Random inputs of ``nsa_attention`` for one shape and length (all leaves requiring grad)."""

    shape: Shape
    seq_len: int
    config: flexnsa.NSAConfig
    q: torch.Tensor  # [B, HQ, T, Dk]
    k: torch.Tensor  # [B, HKV, T, Dk]
    v: torch.Tensor  # [B, HKV, T, Dv]
    k_cmp: torch.Tensor  # [B, HKV, Tc, Dk]
    v_cmp: torch.Tensor  # [B, HKV, Tc, Dv]
    gates: torch.Tensor  # [B, HQ, T, 3], uniform in [0, 1)
    grad_out: torch.Tensor  # [B, HQ, T, Dv], the fixed upstream gradient

    @property
    def device(self) -> torch.device:
        return self.q.device

    @property
    def leaves(self) -> tuple[torch.Tensor, ...]:
        return (self.q, self.k, self.v, self.k_cmp, self.v_cmp, self.gates)


def make_inputs(shape: Shape, seq_len: int, config, device, seed: int = 0) -> Inputs:
    """Random normal q/k/v/k_cmp/v_cmp and uniform gates in ``shape.dtype`` on ``device``."""
    gen = torch.Generator(device=device).manual_seed(seed)
    B, HQ, HKV, Dk, Dv, T = shape.batch, shape.q_heads, shape.kv_heads, shape.qk_dim, shape.v_dim, seq_len
    Tc = config.num_cmp_tokens(T)

    def randn(*size):
        return torch.randn(*size, generator=gen, device=device, dtype=shape.dtype).requires_grad_()

    gates = torch.rand(B, HQ, T, 3, generator=gen, device=device, dtype=shape.dtype).requires_grad_()
    return Inputs(
        shape=shape,
        seq_len=T,
        config=config,
        q=randn(B, HQ, T, Dk),
        k=randn(B, HKV, T, Dk),
        v=randn(B, HKV, T, Dv),
        k_cmp=randn(B, HKV, Tc, Dk),
        v_cmp=randn(B, HKV, Tc, Dv),
        gates=gates,
        grad_out=torch.randn(B, HQ, T, Dv, generator=gen, device=device, dtype=shape.dtype),
    )


def smoothed_queries(q: torch.Tensor, window: int) -> torch.Tensor:
    """Moving average of ``q [B, H, T, D]`` over the ``window`` queries ending at each position (zeros
    before the start), times ``sqrt(window)``: unit variance for unit-normal ``q``, and neighbouring
    queries that select overlapping blocks, as a trained model's do. ``window = 1``: a copy of ``q``."""
    if window == 1:
        return q.detach().clone()
    csum = torch.nn.functional.pad(q.detach().float().cumsum(2), (0, 0, window, 0))  # [B, H, window + T, D]
    return ((csum[:, :, window:] - csum[:, :, :-window]) / window**0.5).to(q.dtype)  # [B, H, T, D]


def union_sizes(idx: torch.Tensor, qt: int = 4) -> float:
    """Mean number of distinct blocks per tile of ``qt`` consecutive queries (a [B, HKV, T, n] selection)."""
    B, HKV, T, n = idx.shape
    tiles = idx[:, :, : T // qt * qt].reshape(B, HKV, T // qt, qt * n).long().sort(-1).values  # [B, HKV, tiles, qt*n]
    distinct = (tiles[..., 1:] != tiles[..., :-1]) & (tiles[..., 1:] >= 0)
    return float((distinct.sum(-1) + (tiles[..., 0] >= 0)).float().mean())


@dataclasses.dataclass
class Case:
    """A timed piece. ``fwd_bwd`` is None when there is nothing to differentiate (``no_bwd`` says why)."""

    name: str
    fwd: Callable[[], torch.Tensor]
    fwd_bwd: Callable[[], torch.Tensor] | None
    leaves: tuple[torch.Tensor, ...]
    note: str = ""
    no_bwd: str = ""


def _first(out):
    """The attention output of a function that may return ``(o, lse)``."""
    return out[0] if isinstance(out, (tuple, list)) else out


def _with_backward(fwd: Callable[[], object], grad_out: torch.Tensor) -> Callable[[], torch.Tensor]:
    def fwd_bwd() -> torch.Tensor:
        out = _first(fwd())
        out.backward(grad_out)
        return out

    return fwd_bwd


# where a piece lives until flexnsa/__init__.py exports it
_HOMES = {
    ("flexnsa", "compressed_attention"): "flexnsa.flex_branches",
    ("flexnsa", "sliding_window_attention"): "flexnsa.flex_branches",
    ("flexnsa", "NativeSparseAttention"): "flexnsa.module",
}


def _require(obj, attr: str, where: str):
    """``obj.attr``, else the same name in its home module, else :class:`Unavailable`."""
    value = getattr(obj, attr, None)
    home = _HOMES.get((where, attr))
    if value is None and home is not None:
        try:
            value = getattr(importlib.import_module(home), attr, None)
        except Exception:  # noqa: BLE001 - a half-built module counts as missing
            value = None
    if value is None:
        raise Unavailable(f"{where}.{attr} is not built yet")
    return value


# ---- NSA ------------------------------------------------------------------------------------
def build_nsa(inp: Inputs, compiled: bool = False) -> Case:
    """``flexnsa.nsa_attention`` (backend ``"auto"``), the three branches, selection and gating;
    ``compiled``: the whole call under ``torch.compile(fullgraph=True)``."""
    attention = torch.compile(flexnsa.nsa_attention, fullgraph=True) if compiled else flexnsa.nsa_attention

    def fwd():
        return attention(inp.q, inp.k, inp.v, inp.k_cmp, inp.v_cmp, inp.gates, inp.config)

    return Case("nsa_attention", fwd, _with_backward(fwd, inp.grad_out), inp.leaves)


# ---- stages ---------------------------------------------------------------------------------
def _compressed_fn():
    return _require(flexnsa, "compressed_attention", "flexnsa")


def _lse_cmp(inp: Inputs) -> torch.Tensor:
    with torch.no_grad():
        _, lse = _compressed_fn()(inp.q, inp.k_cmp, inp.v_cmp, inp.config, return_lse=True)
    return lse  # [B, HQ, T]


def _indices(inp: Inputs) -> tuple[torch.Tensor, str]:
    """The selection of the stage ``selected``: the fast top-n when built, else a synthetic one
    (forced blocks plus random eligible ones, chosen by the reference rule from random scores)."""
    from flexnsa import custom_ops

    select = getattr(custom_ops, "select_blocks", None)
    try:
        _compressed_fn()
    except Unavailable:
        select = None
    if select is not None:
        with torch.no_grad():
            return select(inp.q, inp.k_cmp, _lse_cmp(inp), inp.config), ""
    B, HKV, T = inp.shape.batch, inp.shape.kv_heads, inp.seq_len
    gen = torch.Generator(device=inp.device).manual_seed(1)
    scores = torch.rand(B, HKV, T, inp.config.num_blocks(T), generator=gen, device=inp.device)
    return reference.select_from_scores(scores, inp.config), "synthetic indices (fast top-n not built)"


def _stage_compressed(inp: Inputs) -> Case:
    fn = _compressed_fn()

    def fwd():
        return fn(inp.q, inp.k_cmp, inp.v_cmp, inp.config, return_lse=True)

    leaves = (inp.q, inp.k_cmp, inp.v_cmp)
    return Case("compressed", fwd, _with_backward(fwd, inp.grad_out), leaves, note="forward returns lse")


def _stage_topn(inp: Inputs) -> Case:
    from flexnsa import custom_ops

    select = _require(custom_ops, "select_blocks", "flexnsa.custom_ops")
    lse = _lse_cmp(inp)

    def fwd():
        with torch.no_grad():
            return select(inp.q, inp.k_cmp, lse, inp.config)

    return Case("scores+top-n", fwd, None, (), no_bwd="discrete, no gradient")


def _branch_outputs(inp: Inputs, count: int, seed: int) -> list[torch.Tensor]:
    """``count`` random ``[B, HQ, T, Dv]`` branch outputs requiring grad (stand-ins for o_cmp, o_win...)."""
    gen = torch.Generator(device=inp.device).manual_seed(seed)
    like = inp.grad_out
    return [
        torch.randn(like.shape, generator=gen, device=like.device, dtype=like.dtype).requires_grad_()
        for _ in range(count)
    ]


def _stage_selected_combine(inp: Inputs) -> Case:
    """The selected branch as ``nsa_attention`` runs it: ``selected_attention_gated``, whose kernels
    also write the gated sum of the three branches (o_cmp and o_win random stand-ins here)."""
    from flexnsa import custom_ops

    attend = _require(custom_ops, "selected_attention_gated", "flexnsa.custom_ops")
    indices, note = _indices(inp)
    o_cmp, o_win = _branch_outputs(inp, 2, seed=2)  # 2 x [B, HQ, T, Dv]

    def fwd():
        return attend(inp.q, inp.k, inp.v, indices, o_cmp, o_win, inp.gates, inp.config)

    leaves = (inp.q, inp.k, inp.v, o_cmp, o_win, inp.gates)
    return Case("selected+combine", fwd, _with_backward(fwd, inp.grad_out), leaves, note=note)


def _stage_window(inp: Inputs) -> Case:
    fn = _require(flexnsa, "sliding_window_attention", "flexnsa")

    def fwd():
        return fn(inp.q, inp.k, inp.v, inp.config.window)

    leaves = (inp.q, inp.k, inp.v)
    return Case("window", fwd, _with_backward(fwd, inp.grad_out), leaves)


STAGES: dict[str, Callable[[Inputs], Case]] = {
    "compressed": _stage_compressed,
    "scores+top-n": _stage_topn,
    "window": _stage_window,
    "selected+combine": _stage_selected_combine,
}


def build_stage(name: str, inp: Inputs) -> Case:
    return STAGES[name](inp)


# ---- module ---------------------------------------------------------------------------------
_DIM_NAMES = ("dim", "hidden_size", "embed_dim", "d_model")
_V_DIM_NAMES = ("v_head_dim", "value_head_dim", "head_dim_v")


def build_module(inp: Inputs) -> Case:
    """``NativeSparseAttention(dim, HQ, HKV, head_dim, config)`` on ``x [B, T, dim]``, forward+backward
    through the projections, the compression, the gates and the attention."""
    cls = _require(flexnsa, "NativeSparseAttention", "flexnsa")
    shape = inp.shape
    dim = MODULE_DIM if inp.device.type == "cuda" else CPU_MODULE_DIM
    params = inspect.signature(cls).parameters
    kwargs: dict[str, object] = {}
    for name in params:
        if name in _DIM_NAMES:
            kwargs[name] = dim
        elif name == "num_heads":
            kwargs[name] = shape.q_heads
        elif name == "num_kv_heads":
            kwargs[name] = shape.kv_heads
        elif name in ("head_dim", "qk_head_dim"):
            kwargs[name] = shape.qk_dim
        elif name in _V_DIM_NAMES:
            kwargs[name] = shape.v_dim
        elif name == "config":
            kwargs[name] = inp.config
    if "qk_head_dim" in kwargs and any(n in kwargs for n in _V_DIM_NAMES):
        kwargs.pop("head_dim", None)  # Dk and Dv given separately
    if shape.qk_dim != shape.v_dim and not any(n in kwargs for n in _V_DIM_NAMES):
        raise Unavailable(f"NativeSparseAttention takes no separate value head dim (Dv={shape.v_dim})")
    try:
        module = cls(**kwargs).to(device=inp.device, dtype=shape.dtype)
    except TypeError as error:
        raise Unavailable(f"cannot construct NativeSparseAttention({kwargs}): {error}") from error
    gen = torch.Generator(device=inp.device).manual_seed(3)
    x = torch.randn(shape.batch, inp.seq_len, dim, generator=gen, device=inp.device, dtype=shape.dtype)
    x.requires_grad_()  # [B, T, dim]

    def fwd():
        return _first(module(x))

    with torch.no_grad():
        out_shape = fwd().shape
    grad_out = torch.randn(out_shape, generator=gen, device=inp.device, dtype=shape.dtype)
    leaves = (x, *module.parameters())
    note = ", ".join(f"{k}={v}" for k, v in kwargs.items() if k != "config")
    return Case("module", fwd, _with_backward(fwd, grad_out), leaves, note=note)


# ---- baselines ------------------------------------------------------------------------------
def _expanded_kv(inp: Inputs) -> tuple[torch.Tensor, torch.Tensor]:
    """K/V repeated to the HQ query heads, as new leaves (for backends without GQA)."""
    groups = inp.shape.groups
    k = inp.k.detach().repeat_interleave(groups, dim=1).requires_grad_()  # [B, HQ, T, Dk]
    v = inp.v.detach().repeat_interleave(groups, dim=1).requires_grad_()  # [B, HQ, T, Dv]
    return k, v


def _sdpa_case(name: str, backend, inp: Inputs) -> Case:
    """Full causal attention through ``F.scaled_dot_product_attention`` with one backend (None: the
    default dispatch). GQA through ``enable_gqa`` when the backend takes it, else K/V expanded."""
    from torch.nn.attention import sdpa_kernel

    def attend(k, v, gqa):
        if backend is None:
            return F.scaled_dot_product_attention(inp.q, k, v, is_causal=True, enable_gqa=gqa)
        with sdpa_kernel(backend):
            return F.scaled_dot_product_attention(inp.q, k, v, is_causal=True, enable_gqa=gqa)

    errors = []
    for gqa in (True, False):
        k, v = (inp.k, inp.v) if gqa else _expanded_kv(inp)
        fwd = functools.partial(attend, k, v, gqa)
        fwd_bwd = _with_backward(fwd, inp.grad_out)
        try:
            fwd_bwd()  # probe: unsupported shapes raise here ("No available kernel")
        except RuntimeError as error:
            if "out of memory" in str(error).lower():
                raise
            errors.append(str(error).strip().splitlines()[0][:160])
            continue
        finally:
            for x in (inp.q, k, v):
                x.grad = None
        note = "" if gqa else "K/V expanded to HQ heads (backend has no GQA)"
        return Case(name, fwd, fwd_bwd, (inp.q, k, v), note=note)
    raise Unavailable(f"{name} unsupported for this shape: {errors[-1]}")


def _baseline_cudnn(inp: Inputs) -> Case:
    from torch.nn.attention import SDPBackend

    _cuda_only(inp, "cuDNN")
    return _sdpa_case("sdpa-cudnn", SDPBackend.CUDNN_ATTENTION, inp)


def _baseline_flash(inp: Inputs) -> Case:
    from torch.nn.attention import SDPBackend

    _cuda_only(inp, "flash")
    return _sdpa_case("sdpa-flash", SDPBackend.FLASH_ATTENTION, inp)


def _baseline_sdpa_cpu(inp: Inputs) -> Case:
    if inp.device.type != "cpu":
        raise Unavailable("CPU stand-in only")
    return _sdpa_case("sdpa-cpu", None, inp)


def _cuda_only(inp: Inputs, what: str) -> None:
    if inp.device.type != "cuda":
        raise Unavailable(f"{what} needs CUDA")


def raise_recompile_limit(limit: int = 64, accumulated: int = 512) -> None:
    """Every (shape, T, mask) is a recompile of ``flex_attention`` (``dynamic=False``), in the
    baselines and in flexnsa's own branches alike, and they share one code object: past dynamo's
    default limit of 8 it would silently fall back to eager FlexAttention, which materialises the
    full score matrix. A benchmark run over many shapes (or kernel options) therefore raises the
    per-code-object limit to ``limit`` and the total over all of them to ``accumulated`` (never
    lowers either)."""
    import torch._dynamo

    wanted = {"cache_size_limit": limit, "recompile_limit": limit, "accumulated_cache_size_limit": accumulated,
              "accumulated_recompile_limit": accumulated}  # fmt: skip
    for name, value in wanted.items():
        if hasattr(torch._dynamo.config, name):
            setattr(torch._dynamo.config, name, max(getattr(torch._dynamo.config, name), value))


@functools.cache
def _compiled_flex():
    """One compiled FlexAttention for the whole run (see :func:`raise_recompile_limit`)."""
    from torch.nn.attention.flex_attention import flex_attention

    raise_recompile_limit()
    return torch.compile(flex_attention, dynamic=False)


def _causal_mask(b, h, q_idx, kv_idx):
    return q_idx >= kv_idx


@functools.cache
def _window_mask(window: int):
    """The same function object per window, so that compiled code is reused across shapes."""

    def sliding(b, h, q_idx, kv_idx):
        return (q_idx >= kv_idx) & (q_idx - kv_idx < window)

    return sliding


def _flex_case(name: str, inp: Inputs, window: int | None) -> Case:
    from torch.nn.attention.flex_attention import create_block_mask

    _cuda_only(inp, "FlexAttention (compiled)")
    T = inp.seq_len
    mask_mod = _causal_mask if window is None else _window_mask(window)
    block_mask = create_block_mask(mask_mod, None, None, T, T, device=inp.device, _compile=True)
    flex = _compiled_flex()

    def fwd():
        return flex(inp.q, inp.k, inp.v, block_mask=block_mask, enable_gqa=True)

    return Case(name, fwd, _with_backward(fwd, inp.grad_out), (inp.q, inp.k, inp.v))


def _baseline_flex_causal(inp: Inputs) -> Case:
    return _flex_case("flex-causal", inp, None)


def _baseline_flex_window(inp: Inputs) -> Case:
    return _flex_case("flex-window", inp, inp.config.window)


FLA_NOTE = (
    "fla-core `parallel_nsa`: its own simplified NSA on the same q/k/v: compression by mean pooling "
    "of non-overlapping 64-token blocks inside the timed call (no learned phi, no overlap l=32/d=16), "
    "top-16 blocks of 64 from those scores, gates g_cmp/g_slc; window branch only when flash-attn is "
    "installed (else off); needs G = HQ/HKV a power of two >= 16."
)


def _fla_window(window: int) -> tuple[int, str]:
    try:
        import flash_attn  # noqa: F401
    except ImportError:
        return 0, "no window branch (flash-attn not installed)"
    return window, f"window {window} via flash-attn"


def _baseline_fla(inp: Inputs) -> Case:
    _cuda_only(inp, "fla-core")
    try:
        from fla.ops.nsa import parallel_nsa
    except Exception as error:  # ImportError, or a Triton/driver problem at import time
        raise Unavailable(f"fla-core not importable: {type(error).__name__}: {error}") from error
    shape, cfg = inp.shape, inp.config
    groups = shape.groups
    if groups < 16 or groups & (groups - 1):
        raise Unavailable(f"fla-core refuses G={groups} (needs a power of two >= 16)")
    window, note = _fla_window(cfg.window)

    def bthd(x):  # [B, H, T, D] -> contiguous [B, T, H, D] leaf
        return x.detach().transpose(1, 2).contiguous().requires_grad_()

    q, k, v = bthd(inp.q), bthd(inp.k), bthd(inp.v)
    gates = inp.gates.detach().transpose(1, 2).contiguous()  # [B, T, HQ, 3]
    g_cmp, g_slc, g_swa = (gates[..., i].contiguous().requires_grad_() for i in range(3))  # [B, T, HQ]
    grad_out = inp.grad_out.transpose(1, 2).contiguous()  # [B, T, HQ, Dv]

    def fwd():
        return parallel_nsa(
            q, k, v, g_cmp=g_cmp, g_slc=g_slc, g_swa=g_swa if window else None,
            block_counts=cfg.num_selected, block_size=cfg.slc_block, window_size=window,
        )

    leaves = (q, k, v, g_cmp, g_slc) + ((g_swa,) if window else ())
    return Case("fla-nsa", fwd, _with_backward(fwd, grad_out), leaves, note=note)


BASELINES: dict[str, Callable[[Inputs], Case]] = {
    "sdpa-cudnn": _baseline_cudnn,
    "sdpa-flash": _baseline_flash,
    "flex-causal": _baseline_flex_causal,
    "flex-window": _baseline_flex_window,
    "fla-nsa": _baseline_fla,
    "sdpa-cpu": _baseline_sdpa_cpu,
}


def baseline_names(device: torch.device, flex_window: bool = False) -> list[str]:
    """The baselines of a run: the PERF.md ones on CUDA, SDPA's default backend on the CPU.
    ``flex_window`` adds FlexAttention's sliding window (the stage ``window`` already times NSA's
    own window branch; this baseline costs a compile per shape)."""
    window = ["flex-window"] if flex_window else []
    # cuDNN and fla-core first: the targets of PERF.md are stated against them, and a run whose time
    # budget runs out drops the points it has not started
    names = ["sdpa-cudnn", "fla-nsa", "sdpa-flash", "flex-causal", *window]
    return names if device.type == "cuda" else ["sdpa-cpu", "sdpa-cudnn", "flex-causal", "fla-nsa"]


def build_baseline(name: str, inp: Inputs) -> Case:
    return BASELINES[name](inp)


raise_recompile_limit()
