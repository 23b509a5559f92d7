"""Plumbing shared by the FlexAttention branches: which path runs, the compiled kernel, the calls
that return the log-sum-exp, and the block-mask cache.

Path choice (automatic, see :func:`choose_path`):

==========================================  =====================================================
inputs                                      path
==========================================  =====================================================
float64 (any device)                        ``reference`` (FlexAttention kernels take 16/32-bit)
CPU, an input requires grad (grad mode on)  ``reference`` (the CPU FlexAttention kernel is
                                            inference only: no backward)
CPU, ``return_lse=True``                    ``reference`` (the compiled CPU kernel returns no
                                            log-sum-exp)
CPU, otherwise                              ``flex_compiled`` when a C++ compiler is found (inductor
                                            needs one), else ``flex_eager``
CUDA                                        ``flex_compiled``: forward and backward, lse through
                                            ``return_aux`` (or ``return_lse`` on older torch)
==========================================  =====================================================

``flex_compiled`` calls one module-level ``torch.compile(flex_attention, dynamic=False)`` object;
inside an outer ``torch.compile`` trace the plain ``flex_attention`` is called instead and the outer
compiler lowers it. Each new (shape, dtype, mask closure) compiles once; many distinct sequence
lengths can exceed dynamo's ``recompile_limit`` (8 by default), raise it for such workloads.
"""

from __future__ import annotations

import inspect
import shutil
import sysconfig

import torch
from torch.nn.attention import flex_attention as _flex_module
from torch.nn.attention.flex_attention import BlockMask, flex_attention

__all__ = [
    "PATHS",
    "choose_path",
    "needs_grad",
    "takes_forward_options",
    "call_flex",
    "cached_block_mask",
    "clear_block_mask_cache",
    "HAS_AUX_REQUEST",
    "CPU_CAN_COMPILE",
]

PATHS = ("reference", "flex_eager", "flex_compiled")

# ---- feature checks (at import, so that a compiled caller never runs them) -------------------
# torch >= 2.9 returns the log-sum-exp through ``return_aux=AuxRequest(lse=True)`` and deprecates
# ``return_lse=True``; older versions only have the latter.
HAS_AUX_REQUEST = (
    hasattr(_flex_module, "AuxRequest") and "return_aux" in inspect.signature(flex_attention).parameters
)


def _find_cpp_compiler() -> bool:
    """Inductor's CPU backend compiles C++; without a compiler the CPU path runs flex eagerly."""
    candidates = [sysconfig.get_config_var("CXX") or "", "g++", "c++", "clang++"]
    return any(name and shutil.which(name.split()[0]) for name in candidates)


CPU_CAN_COMPILE = _find_cpp_compiler()

_COMPILED_FLEX = torch.compile(flex_attention, dynamic=False)


def needs_grad(*tensors: torch.Tensor) -> bool:
    """True when autograd will record a call on ``tensors`` (grad mode on, one requires grad)."""
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


def choose_path(
    device: torch.device, dtype: torch.dtype, needs_grad: bool, want_lse: bool, override=None
) -> str:
    """One of :data:`PATHS` for inputs on ``device`` of ``dtype`` (table in the module docstring).

    ``override`` (tests and benchmarks) forces a path; it must be one of :data:`PATHS` or None.
    """
    if override is not None:
        if override not in PATHS:
            raise ValueError(f"_path must be one of {PATHS} or None, got {override!r}")
        return override
    if dtype == torch.float64:
        return "reference"
    if device.type == "cpu":
        if needs_grad or want_lse:
            return "reference"
        return "flex_compiled" if CPU_CAN_COMPILE else "flex_eager"
    return "flex_compiled"


def call_flex(
    path: str,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    block_mask: BlockMask,
    scale: float,
    want_lse: bool,
    forward_options: dict | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``flex_attention`` with GQA on the chosen path; returns ``(o, lse or None)``, lse in nats.

    ``forward_options``: FlexAttention ``kernel_options`` measured faster for this branch's forward,
    on CUDA, for 16-bit inputs with head dims <= 128 (see :func:`kernel_options_for`). When autograd
    records the call they are passed with FlexAttention's ``fwd_`` prefix, so that they set the
    forward kernel only and the backward keeps inductor's launch.
    Rows that see no key give ``o = 0`` and ``lse = -inf`` (FlexAttention's convention since 2.5).
    """
    if torch.compiler.is_compiling() or path == "flex_eager":
        fn = flex_attention
    else:
        fn = _COMPILED_FLEX
    gqa = q.shape[1] != k.shape[1]
    options = kernel_options_for(q, v, forward_options, forward_only=not needs_grad(q, k, v))
    if not want_lse:
        return fn(q, k, v, block_mask=block_mask, scale=scale, enable_gqa=gqa, kernel_options=options), None
    if HAS_AUX_REQUEST:
        out, aux = fn(
            q,
            k,
            v,
            block_mask=block_mask,
            scale=scale,
            enable_gqa=gqa,
            kernel_options=options,
            return_aux=_flex_module.AuxRequest(lse=True),
        )
        return out, aux.lse
    out, lse = fn(q, k, v, block_mask=block_mask, scale=scale, enable_gqa=gqa, kernel_options=options, return_lse=True)
    return out, lse


# float32 tiles of head dims above 128 overflow the H200's 227 KB of shared memory with inductor's
# default FlexAttention configs (seen on the H200, torch 2.11: 278,784 bytes required for
# Dk=192/Dv=128): smaller tiles, one pipeline stage.
_SMALL_TILES = {
    "BLOCK_M": 32, "BLOCK_N": 32, "num_stages": 1,
    "BLOCK_M1": 32, "BLOCK_N1": 32, "BLOCK_M2": 32, "BLOCK_N2": 32,
}


# Benchmarks only (perf/gpu_sweep.py): when not None, these kernel_options replace the choice below
# for every FlexAttention call (each distinct dict compiles once more); KERNEL_OPTIONS_EXTRA is added
# to the choice below (e.g. ``bwd_``-prefixed backward tiles on top of a branch's forward tiles).
KERNEL_OPTIONS_OVERRIDE: dict | None = None
KERNEL_OPTIONS_EXTRA: dict | None = None


def kernel_options_for(
    q: torch.Tensor, v: torch.Tensor, forward_options: dict | None = None, forward_only: bool = True
):
    """FlexAttention ``kernel_options`` for these inputs: None (inductor's defaults) except for
    float32 on CUDA with a head dim above 128, where the default tiles do not fit, and
    ``forward_options`` (a branch's measured forward tiles) for 16-bit CUDA inputs with head dims
    <= 128: as given for a forward-only call, with the ``fwd_`` prefix (forward kernel only) when
    ``forward_only`` is False."""
    if KERNEL_OPTIONS_OVERRIDE is not None:
        return dict(KERNEL_OPTIONS_OVERRIDE)
    if KERNEL_OPTIONS_EXTRA:
        return {**(_kernel_options(q, v, forward_options, forward_only) or {}), **KERNEL_OPTIONS_EXTRA}
    return _kernel_options(q, v, forward_options, forward_only)


def takes_forward_options(q: torch.Tensor, v: torch.Tensor) -> bool:
    """Whether a branch's measured forward tiles apply to these inputs: 16-bit CUDA tensors with head
    dims <= 128 (the tiles were measured there; larger head dims or float32 need other tiles)."""
    return q.device.type == "cuda" and q.dtype in (torch.bfloat16, torch.float16) and max(q.shape[-1], v.shape[-1]) <= 128


def _kernel_options(q, v, forward_options, forward_only):
    if q.device.type == "cuda" and q.dtype == torch.float32 and max(q.shape[-1], v.shape[-1]) > 128:
        return dict(_SMALL_TILES)
    if forward_options and takes_forward_options(q, v):
        return {("" if forward_only else "fwd_") + name: value for name, value in forward_options.items()}
    return None


# ---- block-mask cache ------------------------------------------------------------------------
# Keys are tuples of python ints/strings (plus, with a user mask_mod, the id of that function,
# whose object the entry keeps alive so that the id cannot be reused while cached). Values are
# (BlockMask, user mask_mod). Inside a torch.compile trace the cache is only read (dynamo guards
# on that one key): a hit makes the cached tensors graph inputs, a miss builds the mask inside the
# traced graph (a few small closed-form tensor ops per call) without storing it; an eager call that
# fills the entry later costs the compiled caller one recompile.
_BLOCK_MASKS: dict[tuple, tuple[BlockMask, object]] = {}
_MAX_ENTRIES = 64


def cached_block_mask(key: tuple, build, user_mask_mod=None) -> BlockMask:
    """The block mask for ``key``, built by ``build()`` on the first use."""
    if user_mask_mod is not None:
        key = key + (id(user_mask_mod),)
    hit = _BLOCK_MASKS.get(key)
    if hit is not None:
        return hit[0]
    block_mask = build()
    if torch.compiler.is_compiling():
        return block_mask
    if len(_BLOCK_MASKS) >= _MAX_ENTRIES:  # drop the oldest entry (dicts keep insertion order)
        _BLOCK_MASKS.pop(next(iter(_BLOCK_MASKS)))
    _BLOCK_MASKS[key] = (block_mask, user_mask_mod)
    return block_mask


def clear_block_mask_cache() -> None:
    """Forget every cached block mask (e.g. after a user mask_mod's captured tensors changed)."""
    _BLOCK_MASKS.clear()
