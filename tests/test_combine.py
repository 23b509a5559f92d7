"""flexnsa::gated_combine against reference.combine_branches: CPU path, gradients, opcheck, compile,
and the Triton kernels under the interpreter (subprocess)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from flexnsa import reference
from flexnsa.custom_ops import gated_combine


def _inputs(B, H, T, D, dtype, gate_dtype, device="cpu", seed=0):
    gen = torch.Generator().manual_seed(seed)
    outs = [torch.randn(B, H, T, D, generator=gen).to(device=device, dtype=dtype) for _ in range(3)]
    gates = torch.rand(B, H, T, 3, generator=gen).to(device=device, dtype=gate_dtype)
    return outs, gates


@settings(max_examples=15)
@given(st.integers(1, 2), st.integers(1, 5), st.integers(1, 40), st.sampled_from([8, 24, 64]),
       st.sampled_from([torch.float64, torch.float32]), st.integers(0, 99))
def test_matches_reference_forward_and_backward(B, H, T, D, dtype, seed):
    outs, gates = _inputs(B, H, T, D, dtype, dtype, seed=seed)
    leaves = [x.clone().requires_grad_(True) for x in (*outs, gates)]
    ref_leaves = [x.clone().requires_grad_(True) for x in (*outs, gates)]
    out = gated_combine(*leaves)
    expected = reference.combine_branches(*ref_leaves)
    torch.testing.assert_close(out, expected)
    grad = torch.randn_like(out)
    out.backward(grad)
    expected.backward(grad)
    for a, b in zip(leaves, ref_leaves):
        torch.testing.assert_close(a.grad, b.grad)
    *_, delta_slc = torch.ops.flexnsa.gated_combine_backward(grad, *outs, gates)
    torch.testing.assert_close(delta_slc, _expected_delta(grad, outs[1], gates).to(delta_slc.dtype))


def _expected_delta(grad, o_slc, gates):
    """``rowsum(o_slc * d o_slc)`` with ``d o_slc = g_slc * grad``, in float64: ``[B, HQ, T]``."""
    return (o_slc.double() * gates[..., 1:2].double() * grad.double()).sum(-1)


def test_gradcheck_and_opcheck():
    outs, gates = _inputs(1, 2, 5, 4, torch.float64, torch.float64)
    leaves = tuple(x.requires_grad_(True) for x in (*outs, gates))
    assert torch.autograd.gradcheck(gated_combine, leaves)
    outs32, gates32 = _inputs(1, 2, 5, 4, torch.float32, torch.float32)
    torch.library.opcheck(torch.ops.flexnsa.gated_combine.default, (*outs32, gates32))


def test_compile_fullgraph_no_graph_break():
    outs, gates = _inputs(1, 2, 7, 8, torch.float32, torch.float32)
    leaves = [x.requires_grad_(True) for x in (*outs, gates)]
    fn = torch.compile(lambda *xs: gated_combine(*xs).square().sum(), fullgraph=True, backend="aot_eager")
    fn(*leaves).backward()
    assert all(x.grad is not None for x in leaves)


def test_bad_inputs():
    outs, gates = _inputs(1, 2, 5, 4, torch.float32, torch.float32)
    with pytest.raises(ValueError, match="o_slc"):
        gated_combine(outs[0], outs[1][..., :3], outs[2], gates)
    with pytest.raises(ValueError, match="gates"):
        gated_combine(*outs, gates[..., :2])


def test_triton_kernels_under_interpreter():
    script = textwrap.dedent(
        """
        import torch
        from flexnsa import reference
        from flexnsa.custom_ops import gated_combine
        for dtype, gdtype, D in [(torch.float32, torch.float32, 24), (torch.bfloat16, torch.float32, 64)]:
            gen = torch.Generator().manual_seed(D)
            xs = [torch.randn(1, 3, 37, D, generator=gen).to(dtype).requires_grad_(True) for _ in range(3)]
            g = torch.rand(1, 3, 37, 3, generator=gen).to(gdtype).requires_grad_(True)
            ref = [x.detach().clone().requires_grad_(True) for x in (*xs, g)]
            out, expected = gated_combine(*xs, g), reference.combine_branches(*ref)
            tol = dict(rtol=1e-6, atol=1e-6) if dtype == torch.float32 else dict(rtol=1e-2, atol=1e-2)
            torch.testing.assert_close(out, expected, **tol)
            grad = torch.randn(out.shape, generator=gen).to(dtype)
            out.backward(grad); expected.backward(grad)
            for a, b in zip((*xs, g), ref):
                torch.testing.assert_close(a.grad, b.grad, **tol)
            *_, delta = torch.ops.flexnsa.gated_combine_backward(grad, *(x.detach() for x in xs), g.detach())
            expected_delta = (xs[1].double() * g[..., 1:2].double() * grad.double()).sum(-1)
            assert delta.dtype == torch.float32
            torch.testing.assert_close(delta.double(), expected_delta, rtol=1e-4, atol=1e-4)
        print("interpreted combine ok")
        """
    )
    env = {**os.environ, "FLEXNSA_TRITON_INTERPRET": "1", "TRITON_INTERPRET": "1"}
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0 and "interpreted combine ok" in proc.stdout, proc.stdout[-3000:] + proc.stderr[-3000:]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype, D", [(torch.bfloat16, 128), (torch.float16, 192), (torch.float32, 40)])
def test_cuda_kernels(dtype, D):
    outs, gates = _inputs(2, 3, 1001, D, dtype, torch.float32, device="cuda")
    leaves = [x.requires_grad_(True) for x in (*outs, gates)]
    ref = [x.detach().double().requires_grad_(True) for x in (*outs, gates)]
    out, expected = gated_combine(*leaves), reference.combine_branches(*ref)
    grad = torch.randn_like(out)
    out.backward(grad)
    expected.backward(grad.double())
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(out.double(), expected, rtol=tol, atol=tol)
    for a, b in zip(leaves, ref):
        torch.testing.assert_close(a.grad.double(), b.grad, rtol=tol, atol=tol * 10)
    *_, delta = torch.ops.flexnsa.gated_combine_backward(grad, *outs, gates)
    assert delta.dtype == torch.float32 and delta.shape == gates.shape[:-1]
    torch.testing.assert_close(delta.double(), _expected_delta(grad, outs[1], gates), rtol=1e-4, atol=1e-4)
