"""The correctness gate the report runs before timing: speed of wrong results is worth nothing.

For one shape at a short length, ``flexnsa.nsa_attention`` (backend "auto", the path that is timed)
is compared with the float64 reference on the same inputs and the same block selection (chosen by
the float64 reference, so that rounding-level ties cannot flip blocks). Criterion of
flash-attention: for the output and every input gradient,

    max|fast - ref64| <= FACTOR * max|ref_low - ref64| + atol * max(1, max|ref64|)

where ``ref_low`` is the reference run in the inputs' dtype (``upcast=False``). The default top-n of
the fast path is compared with the float64 reference's selection separately: the share of
(batch, KV head, query) rows that pick the same set must reach ``MIN_SELECTION_AGREEMENT``.
"""

from __future__ import annotations

import dataclasses

import torch

from _cases import make_inputs
from _setup import ensure_flexnsa
from _shapes import Shape

ensure_flexnsa()
import flexnsa  # noqa: E402
from flexnsa import reference  # noqa: E402

__all__ = ["CheckResult", "check_nsa", "FACTOR", "MIN_SELECTION_AGREEMENT"]

FACTOR = 3.0
MIN_SELECTION_AGREEMENT = 0.98
_ATOL = {torch.float16: 1e-3, torch.bfloat16: 1e-3, torch.float32: 1e-5, torch.float64: 1e-10}
_NAMES = ("out", "dq", "dk", "dv", "dk_cmp", "dv_cmp", "dgates")


@dataclasses.dataclass
class CheckResult:
    shape: str
    seq_len: int
    ok: bool
    errors: dict[str, tuple[float, float]]  # name -> (fast error, low-precision reference error)
    selection_agreement: float | None
    message: str = ""


def _run(fn, tensors: list[torch.Tensor], grad_out: torch.Tensor) -> list[torch.Tensor]:
    """Output and input gradients of ``fn(*tensors)`` for the upstream gradient ``grad_out``."""
    leaves = [t.detach().clone().requires_grad_() for t in tensors]
    out = fn(*leaves)
    out.backward(grad_out.to(out.dtype))
    return [out.detach()] + [leaf.grad for leaf in leaves]


def check_nsa(shape: Shape, seq_len: int, config, device: torch.device) -> CheckResult:
    """Compares the fast ``nsa_attention`` with the float64 reference (see module docstring)."""
    inp = make_inputs(shape, seq_len, config, device, seed=7)
    tensors = [t.detach() for t in inp.leaves]  # q, k, v, k_cmp, v_cmp, gates
    wide = [t.double() for t in tensors]
    with torch.no_grad():
        indices = reference.select_blocks(wide[0], wide[3], config)  # [B, HKV, T, n]

    def fast(q, k, v, k_cmp, v_cmp, gates):
        return flexnsa.nsa_attention(q, k, v, k_cmp, v_cmp, gates, config, block_indices=indices)

    def ref(upcast):
        def run(q, k, v, k_cmp, v_cmp, gates):
            return reference.nsa_attention(
                q, k, v, k_cmp, v_cmp, gates, config, block_indices=indices, upcast=upcast
            )

        return run

    try:
        got = _run(fast, tensors, inp.grad_out)
        exact = _run(ref(True), wide, inp.grad_out.double())
        low = _run(ref(False), tensors, inp.grad_out)
        with torch.no_grad():
            picked = flexnsa.select_blocks(tensors[0], tensors[3], config)
    except Exception as error:  # the gate must report, not crash the run
        msg = f"{type(error).__name__}: {str(error).strip().splitlines()[0][:200] if str(error) else ''}"
        return CheckResult(shape.name, seq_len, False, {}, None, message=msg)

    atol = _ATOL[shape.dtype]
    errors, failures = {}, []
    for name, g, e, lo in zip(_NAMES, got, exact, low):
        if g is None or e is None:
            failures.append(f"{name}: no gradient")
            continue
        err_fast = (g.double() - e).abs().max().item()
        err_low = (lo.double() - e).abs().max().item()
        errors[name] = (err_fast, err_low)
        bound = FACTOR * err_low + atol * max(1.0, e.abs().max().item())
        if not torch.isfinite(g).all() or not err_fast <= bound:
            failures.append(f"{name}: error {err_fast:.3g} > bound {bound:.3g}")
    same = (picked.sort(dim=-1).values == indices.sort(dim=-1).values).all(dim=-1)  # [B, HKV, T]
    agreement = same.double().mean().item()
    if agreement < MIN_SELECTION_AGREEMENT:
        failures.append(f"selection agrees with float64 on {agreement:.1%} of rows")
    return CheckResult(shape.name, seq_len, not failures, errors, agreement, message="; ".join(failures))
