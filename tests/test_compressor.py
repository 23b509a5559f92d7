"""flexnsa.Compressor (phi): shapes, block coverage, equality with a per-block loop, gradients, errors."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

import flexnsa
from flexnsa.compressor import Compressor


def _config(l: int, d: int) -> flexnsa.NSAConfig:
    return flexnsa.NSAConfig(cmp_block=l, cmp_stride=d, slc_block=l, num_selected=2, num_init_blocks=0,
                             num_local_blocks=1, window=4)


@st.composite
def cases(draw):
    d = draw(st.sampled_from([1, 2, 4, 8]))
    l = d * draw(st.integers(1, 4))
    T = draw(st.integers(1, 3 * l + 5))  # T < l, T = l, T not l plus a multiple of d
    B, H = draw(st.integers(1, 2)), draw(st.integers(1, 3))
    D = draw(st.integers(1, 6))
    kind = draw(st.sampled_from(["mlp", "linear", "mean"]))
    seed = draw(st.integers(0, 2**16))
    return _config(l, d), B, H, T, D, kind, seed


def _randomise(phi: Compressor, seed: int) -> None:
    """Random non-trivial parameters (the 'linear' kind starts as mean pooling, biases start at 0)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in phi.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype))


def phi_loop(phi: Compressor, x: torch.Tensor, cfg: flexnsa.NSAConfig) -> torch.Tensor:
    """The definition, one compressed token at a time: ``phi(x[i*d : i*d + l])``."""
    B, H, T, D = x.shape
    l, d = cfg.cmp_block, cfg.cmp_stride
    out = []
    i = 0
    while i * d + l <= T:
        block = x[:, :, i * d : i * d + l, :]  # [B, H, l, D]
        if phi.kind == "mean":
            out.append(block.mean(dim=2))
        elif phi.kind == "linear":
            out.append(block.reshape(B, H, l * D) @ phi.proj.weight.T + phi.proj.bias)
        else:
            h = (block + phi.pos_emb).reshape(B, H, l * D) @ phi.fc1.weight.T + phi.fc1.bias
            out.append(F.gelu(h) @ phi.fc2.weight.T + phi.fc2.bias)
        i += 1
    if not out:
        return x.new_zeros(B, H, 0, D)
    return torch.stack(out, dim=2)  # [B, H, Tc, D]


@given(cases())
def test_equals_per_block_loop(case):
    cfg, B, H, T, D, kind, seed = case
    phi = Compressor(D, cfg, kind).double()
    _randomise(phi, seed)
    x = torch.randn(B, H, T, D, dtype=torch.float64, generator=torch.Generator().manual_seed(seed + 1))
    out = phi(x)
    assert out.shape == (B, H, cfg.num_cmp_tokens(T), D)
    assert out.dtype == x.dtype
    torch.testing.assert_close(out, phi_loop(phi, x, cfg), rtol=1e-12, atol=1e-12)


@given(cases())
def test_token_depends_only_on_its_block(case):
    """d out[i] / d x[s] is non-zero only for s in [i*d, i*d + l)."""
    cfg, B, H, T, D, kind, seed = case
    Tc = cfg.num_cmp_tokens(T)
    if Tc == 0:
        return
    phi = Compressor(D, cfg, kind).double()
    _randomise(phi, seed)
    i = seed % Tc
    x = torch.randn(B, H, T, D, dtype=torch.float64, requires_grad=True)
    phi(x)[:, :, i].sum().backward()
    touched = x.grad.abs().sum(dim=(0, 1, 3)) > 0  # [T]
    expected = torch.zeros(T, dtype=torch.bool)
    expected[i * cfg.cmp_stride : i * cfg.cmp_stride + cfg.cmp_block] = True
    assert torch.equal(touched, expected)


def test_blocks_are_a_strided_view():
    cfg = _config(8, 4)
    x = torch.randn(2, 3, 29, 5)
    blocks = Compressor(5, cfg, "mean").blocks(x)
    assert blocks.shape == (2, 3, cfg.num_cmp_tokens(29), 8, 5)
    assert blocks.data_ptr() == x.data_ptr() and blocks._base is x  # no copy
    torch.testing.assert_close(blocks[:, :, 3], x[:, :, 12:20])


def test_linear_starts_as_mean_pooling():
    cfg = _config(8, 2)
    x = torch.randn(2, 2, 23, 6, dtype=torch.float64)
    linear, mean = Compressor(6, cfg, "linear").double(), Compressor(6, cfg, "mean")
    torch.testing.assert_close(linear(x), mean(x), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("kind", ["mlp", "linear"])
@pytest.mark.parametrize("T", [5, 40])
def test_parameters_get_finite_gradients(kind, T):
    """Every parameter gets a finite gradient, zero when T < l (no compressed token), non-zero otherwise."""
    cfg = _config(16, 8)
    phi = Compressor(4, cfg, kind)
    x = torch.randn(2, 2, T, 4, requires_grad=True)
    out = phi(x)
    assert out.shape == (2, 2, cfg.num_cmp_tokens(T), 4)
    (out * torch.randn_like(out)).sum().backward()
    for name, p in phi.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert (p.grad.abs().sum() > 0) == (T >= 16), name


def test_default_sizes_and_repr():
    phi = Compressor(16)  # paper defaults: l = 32, d = 16
    assert phi.fc1.in_features == 32 * 16 and phi.hidden_dim == 64 and phi.pos_emb.shape == (32, 16)
    assert "kind='mlp'" in repr(phi) and "block=32" in repr(phi) and "stride=16" in repr(phi)
    assert Compressor(16, kind="mlp", hidden_dim=7).fc1.out_features == 7
    assert not list(Compressor(16, kind="mean").parameters())


def test_bfloat16_autocast_matches_float32_closely():
    cfg = _config(8, 4)
    phi = Compressor(8, cfg)
    x = torch.randn(1, 2, 40, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = phi(x.bfloat16())
    assert low.dtype == torch.bfloat16
    torch.testing.assert_close(low.float(), phi(x), rtol=0.05, atol=0.05)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(head_dim=0), "head_dim"),
        (dict(head_dim=4, kind="max"), "kind"),
        (dict(head_dim=4, kind="mean", hidden_dim=8), "hidden_dim"),
        (dict(head_dim=4, hidden_dim=0), "hidden_dim"),
        (dict(head_dim=4, config="paper"), "config"),
    ],
)
def test_invalid_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        Compressor(**kwargs)


@pytest.mark.parametrize(
    "x, match",
    [
        (torch.randn(2, 10, 4), "x must be a 4-D"),
        (torch.randn(1, 2, 10, 5), "head dim 4"),
        (torch.ones(1, 2, 10, 4, dtype=torch.int64), "floating"),
    ],
)
def test_invalid_inputs(x, match):
    with pytest.raises(ValueError, match=match):
        Compressor(4, _config(4, 2))(x)


def test_compiles_without_graph_breaks():
    phi = Compressor(8, _config(8, 4))
    compiled = torch.compile(phi, fullgraph=True, backend="aot_eager")
    for T in (3, 37):
        x = torch.randn(1, 2, T, 8, requires_grad=True)
        out = compiled(x)
        torch.testing.assert_close(out, phi(x))
        out.sum().backward()


@pytest.mark.parametrize("kind", ["mlp", "linear", "mean"])
def test_compress_blocks_on_blocks_cut_out(kind):
    """``compress_blocks`` (used for the groups a decoding cache completes) equals ``forward``."""
    cfg = _config(8, 4)
    phi = Compressor(6, cfg, kind).double()
    x = torch.randn(2, 3, 30, 6, dtype=torch.float64)
    groups = torch.stack([x[:, :, 4 * i : 4 * i + 8] for i in (0, 2, 5)], dim=2)  # [2, 3, 3, 8, 6]
    torch.testing.assert_close(phi.compress_blocks(groups), phi(x)[:, :, [0, 2, 5]])
    with pytest.raises(ValueError, match="blocks"):
        phi.compress_blocks(torch.randn(2, 3, 3, 7, 6, dtype=torch.float64))
