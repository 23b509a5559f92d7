"""nsa_attention's CUDA path (FlexAttention branches + Triton ops) against the float64 reference.

Tolerance as in flash-attention's tests: the error of the fast path against float64 must be within
a small multiple of the error of the reference run in the same low precision (``upcast=False``).
The selection is fixed to the float64 one so that both sides attend the same blocks; the default
top-n is compared separately, tie-aware.
"""

from __future__ import annotations

import pytest
import torch

import flexnsa
from flexnsa import reference
from nsa_inputs import make_inputs, selections_agree

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]


FLOOR = {torch.bfloat16: 2e-3, torch.float32: 1e-5}  # x max |reference|, as perf/gpu_check_flex.py


@pytest.fixture
def no_tf32():
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")  # float32 checks: no TF32 anywhere
    yield
    torch.set_float32_matmul_precision(previous)


def _grads(out, tensors, grad_out):
    return torch.autograd.grad(out, tensors, grad_out)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("G, T, dk, dv", [(1, 1000, 64, 64), (4, 777, 128, 128), (16, 1531, 192, 128), (3, 20, 64, 32)])
def test_flex_backend_matches_reference(dtype, G, T, dk, dv, no_tf32):
    cfg = flexnsa.NSAConfig()
    HKV = 2 if G < 16 else 1
    inputs64 = make_inputs(cfg, 1, G * HKV, HKV, T, dk, dv, window_kv=True, device="cuda", seed=T)
    idx = flexnsa.select_blocks(inputs64["q"], inputs64["k_cmp"], cfg)  # float64 selection
    names = list(inputs64)
    grad_out = torch.randn(1, G * HKV, T, dv, device="cuda", dtype=torch.float64)

    def run(tensors, **kw):
        leaves = [x.detach().clone().requires_grad_(True) for x in tensors]
        out = flexnsa.nsa_attention(**dict(zip(names, leaves)), config=cfg, block_indices=idx, **kw)
        return [out, *_grads(out, leaves, grad_out.to(out.dtype))]

    exact = run(inputs64.values(), backend="reference")
    low_inputs = [x.to(dtype) for x in inputs64.values()]
    fast = run(low_inputs, backend="flex")
    low_ref = [x.double() for x in _reference_low(low_inputs, names, cfg, idx, grad_out)]
    for name, f, r, e in zip(["out", *names], fast, low_ref, exact):
        assert torch.isfinite(f).all(), name
        assert f.shape == e.shape, f"{name}: shape {tuple(f.shape)} != {tuple(e.shape)}"
        if e.numel() == 0:  # e.g. the k_cmp/v_cmp gradients when T < l (no compressed token)
            continue
        err_fast = (f.double() - e).abs().max().item()
        err_ref = (r - e).abs().max().item()
        bound = 3 * err_ref + FLOOR[dtype] * max(e.abs().max().item(), 1e-3)
        assert err_fast <= bound, f"{name}: flex error {err_fast:.3e} > {bound:.3e} (low-precision reference {err_ref:.3e})"


def _reference_low(tensors, names, cfg, idx, grad_out):
    leaves = [x.detach().clone().requires_grad_(True) for x in tensors]
    kw = dict(zip(names, leaves))
    out = reference.nsa_attention(**kw, config=cfg, block_indices=idx, upcast=False)
    return [out, *_grads(out, leaves, grad_out.to(out.dtype))]


@pytest.mark.parametrize("G", [1, 4, 16])
def test_flex_selection_agrees_with_reference(G):
    cfg = flexnsa.NSAConfig()
    inputs = make_inputs(cfg, 1, G, 1, 3000, 128, 128, dtype=torch.float32, device="cuda", seed=G)
    idx = flexnsa.select_blocks(inputs["q"], inputs["k_cmp"], cfg, backend="flex")
    idx_ref = flexnsa.select_blocks(inputs["q"].double(), inputs["k_cmp"].double(), cfg, backend="reference")
    scores = reference.block_scores(inputs["q"].double(), inputs["k_cmp"].double(), cfg)
    assert selections_agree(idx, idx_ref, scores, rtol=1e-4, atol=1e-6)


def test_nsa_attention_compiles_fullgraph_forward_backward():
    cfg = flexnsa.NSAConfig()
    inputs = make_inputs(cfg, 1, 8, 2, 1100, 64, 64, dtype=torch.bfloat16, device="cuda")
    leaves = {k: v.requires_grad_(True) for k, v in inputs.items()}

    @torch.compile(fullgraph=True)
    def step(q, k, v, k_cmp, v_cmp, gates):
        return flexnsa.nsa_attention(q, k, v, k_cmp, v_cmp, gates, cfg).float().square().mean()

    loss = step(**leaves)
    loss.backward()
    eager = flexnsa.nsa_attention(**{k: v.detach() for k, v in inputs.items()}, config=cfg).float().square().mean()
    assert torch.isfinite(loss) and abs(loss.item() - eager.item()) <= 2e-2 * abs(eager.item())
    for name, x in leaves.items():
        assert x.grad is not None and torch.isfinite(x.grad).all(), name


def test_nsa_attention_compiles_with_dynamic_shapes():
    """One compiled step over changing sequence lengths, GQA groups (G = 4, 16) and head counts, forward
    and backward against the eager call: the recompiles mark the changed sizes dynamic (torch.compile's
    automatic dynamic shapes), and the kernels' constexpr sizes (heads, head dims, slots) are then
    specialised (kernel_utils.static_sizes). Before that, perf/gpu_overhead.py failed this way on the H200
    (the small-group shape traced after recompiles for the paper shape); this test itself was first run
    after the fix. (``dynamic=True`` from the first call is not supported on torch 2.11: it also makes
    the config's ints symbolic.)"""
    cfg = flexnsa.NSAConfig()

    @torch.compile(fullgraph=True)
    def step(q, k, v, k_cmp, v_cmp, gates):
        return flexnsa.nsa_attention(q, k, v, k_cmp, v_cmp, gates, cfg).float().square().mean()

    for HQ, HKV, T in ((8, 2, 700), (8, 2, 1100), (16, 1, 900), (8, 2, 1300)):
        inputs = make_inputs(cfg, 1, HQ, HKV, T, 64, 64, dtype=torch.bfloat16, device="cuda", seed=T)
        leaves = {k: v.detach().requires_grad_(True) for k, v in inputs.items()}
        loss = step(**leaves)
        loss.backward()
        eager_leaves = {k: v.detach().requires_grad_(True) for k, v in inputs.items()}
        eager = flexnsa.nsa_attention(**eager_leaves, config=cfg).float().square().mean()
        eager.backward()
        assert abs(loss.item() - eager.item()) <= 2e-2 * abs(eager.item()), (HQ, HKV, T)
        for name, x in leaves.items():  # in norm: a near-tie may select differently in a few rows
            want = eager_leaves[name].grad.float()
            err = (x.grad.float() - want).norm().item()
            assert torch.isfinite(x.grad).all() and err <= 5e-2 * want.norm().item() + 1e-6, (name, HQ, HKV, T, err)
