"""Median run time of a callable: ``triton.testing.do_bench`` on CUDA, a wall-clock loop on the CPU."""

from __future__ import annotations

import gc
import statistics
import time
from collections.abc import Callable, Sequence

import torch

__all__ = ["median_ms", "kernel_times", "free_memory", "is_oom"]


def _reset_grads(leaves: Sequence[torch.Tensor]) -> None:
    for x in leaves:
        x.grad = None


def median_ms(
    fn: Callable[[], object],
    device: torch.device,
    leaves: Sequence[torch.Tensor] = (),
    warmup_ms: float = 25.0,
    rep_ms: float = 100.0,
    cpu_reps: int = 5,
    min_reps: int = 10,
) -> float:
    """Median milliseconds of ``fn()``, after warm-up, with the ``.grad`` of ``leaves`` set to None
    before each run (so a forward+backward never accumulates into an existing gradient).

    CUDA: ``triton.testing.do_bench(..., return_mode="median")`` (it also flushes the L2 cache
    between runs) over at least ``min_reps`` timed calls (its ``rep`` budget raised for long calls).
    CPU: one warm-up call, then the median of ``cpu_reps`` timed calls.
    """
    if device.type == "cuda":
        from triton.testing import do_bench

        # do_bench runs int(rep_ms / its estimate) timed calls: a single one for a 124 ms call at the
        # default 100 ms. One timed call here sizes the budget so that at least min_reps are taken
        # (one call of margin: do_bench's own estimate may be a little above this one).
        _reset_grads(leaves)
        fn()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        _reset_grads(leaves)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        rep_ms = max(rep_ms, (min_reps + 1) * start.elapsed_time(end))
        _reset_grads(leaves)
        ms = do_bench(fn, warmup=warmup_ms, rep=rep_ms, grad_to_none=list(leaves), return_mode="median")
        _reset_grads(leaves)
        return float(ms)
    _reset_grads(leaves)
    fn()
    times = []
    for _ in range(cpu_reps):
        _reset_grads(leaves)
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    _reset_grads(leaves)
    return statistics.median(times)


def kernel_times(fn: Callable[[], object], iters: int = 3) -> list[dict]:
    """Device time per kernel of ``fn()`` under ``torch.profiler`` (CUDA activity), one warm-up call
    first: rows ``{"kernel": name, "ms": per call of fn, "calls": per call of fn}``, largest first."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(iters):
            fn()
        torch.cuda.synchronize()
    rows = []
    for event in prof.key_averages():
        us = getattr(event, "device_time_total", None)
        if us is None:
            us = getattr(event, "cuda_time_total", 0.0)
        if us and us > 0:
            rows.append({"kernel": event.key, "ms": us / 1e3 / iters, "calls": event.count / iters})
    return sorted(rows, key=lambda r: -r["ms"])


def free_memory() -> None:
    """Drop unreferenced tensors and return cached CUDA blocks to the driver."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.empty_cache()


def is_oom(error: BaseException) -> bool:
    """True for CUDA out-of-memory errors, whatever layer raised them (torch, triton, cuDNN)."""
    if isinstance(error, torch.OutOfMemoryError):
        return True
    return "out of memory" in str(error).lower()
