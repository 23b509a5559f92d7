"""NativeSparseAttention, the small NSA language model, torch.compile behaviour and the training demo."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import flexnsa
from flexnsa.model import CausalSelfAttention, NSALanguageModel
from flexnsa.module import NativeSparseAttention

SMALL = flexnsa.NSAConfig(cmp_block=8, cmp_stride=4, slc_block=16, num_selected=3, num_init_blocks=1,
                          num_local_blocks=1, window=16)


# ---- the module composed by hand from the functional API --------------------------------------
def rope_complex(x: torch.Tensor, positions: torch.Tensor, base: float = 10000.0) -> torch.Tensor:
    """RoPE written as a complex rotation of the pairs (x[i], x[i + D/2]), independently of flexnsa.rope."""
    half = x.shape[-1] // 2
    freqs = base ** (-2.0 * torch.arange(half, dtype=torch.float64) / x.shape[-1])  # [D/2]
    rotation = torch.polar(torch.ones(len(positions), half, dtype=torch.float64),
                           positions.double()[:, None] * freqs[None, :])  # [T, D/2]
    z = torch.complex(x[..., :half].double(), x[..., half:].double()) * rotation
    return torch.cat((z.real, z.imag), dim=-1).to(x.dtype)


def module_by_hand(m: NativeSparseAttention, x: torch.Tensor) -> torch.Tensor:
    """Projections, RoPE, phi, gates and flexnsa.nsa_attention put together from the module's weights."""
    B, T, _ = x.shape
    HQ, HKV, Dk, Dv = m.num_heads, m.num_kv_heads, m.qk_head_dim, m.v_head_dim
    cfg = m.config

    def heads(y, h):
        return y.reshape(B, T, h, -1).permute(0, 2, 1, 3)

    def rope(y, pos):
        return rope_complex(y, pos) if m.rotary is not None else y

    def linear(lin, y):
        return y @ lin.weight.T + (lin.bias if lin.bias is not None else 0)

    pos = torch.arange(T)
    q = rope(heads(linear(m.q_proj, x), HQ), pos)
    kv = linear(m.kv_proj, x)
    width = HKV * (Dk + Dv)
    per_branch = {}
    for i, name in enumerate(m.kv_branches):  # documented layout: [K | V] for each branch in order
        chunk = kv[..., i * width : (i + 1) * width]
        per_branch[name] = heads(chunk[..., : HKV * Dk], HKV), heads(chunk[..., HKV * Dk :], HKV)
    if m.kv_sharing == "all":
        per_branch = dict.fromkeys(("cmp", "slc", "win"), per_branch["shared"])
    per_branch.setdefault("win", per_branch["slc"])  # window branch off
    (k_cmp_raw, v_cmp_raw), (k, v), (k_win, v_win) = per_branch["cmp"], per_branch["slc"], per_branch["win"]
    Tc = cfg.num_cmp_tokens(T)
    k_cmp = rope(m.k_compressor(k_cmp_raw), torch.arange(Tc) * cfg.cmp_stride + cfg.cmp_block - 1)
    v_cmp = m.v_compressor(v_cmp_raw)
    gates = torch.sigmoid(linear(m.gate_proj, x)).reshape(B, T, HQ, 3).permute(0, 2, 1, 3)
    o = flexnsa.nsa_attention(q, rope(k, pos), v, k_cmp, v_cmp, gates, cfg, k_win=rope(k_win, pos), v_win=v_win,
                              scale=m.scale, backend="reference")
    return linear(m.o_proj, o.permute(0, 2, 1, 3).reshape(B, T, HQ * Dv))


@st.composite
def module_cases(draw):
    groups = draw(st.sampled_from([1, 2, 3, 4, 8, 16]))
    kv_heads = draw(st.integers(1, 2))
    qk_dim = 2 * draw(st.integers(1, 4))
    v_dim = draw(st.integers(1, 7).filter(lambda v: v != qk_dim))  # Dk != Dv
    d = draw(st.sampled_from([2, 4]))
    l = d * draw(st.integers(1, 3))
    bs = d * draw(st.integers(1, 4))
    n = draw(st.integers(2, 4))
    cfg = flexnsa.NSAConfig(l, d, bs, n, 1, 1, draw(st.sampled_from([0, 3, 8])))
    T = draw(st.integers(1, 4 * bs + 3))  # includes T < l and T not a multiple of any block
    kwargs = dict(
        kv_sharing=draw(st.sampled_from(["none", "all"])),
        compress=draw(st.sampled_from(["mlp", "linear", "mean"])),
        rope=draw(st.booleans()),
        bias=draw(st.booleans()),
        scale=draw(st.sampled_from([None, 0.3])),
    )
    return groups * kv_heads, kv_heads, qk_dim, v_dim, cfg, T, kwargs, draw(st.integers(0, 2**16))


@given(module_cases())
def test_module_equals_functional_composed_by_hand(case):
    num_heads, kv_heads, qk_dim, v_dim, cfg, T, kwargs, seed = case
    torch.manual_seed(seed)
    m = NativeSparseAttention(12, num_heads, kv_heads, qk_head_dim=qk_dim, v_head_dim=v_dim, config=cfg,
                              gate_bias=(0.5, -0.5, 0.0), **kwargs).double()
    x = torch.randn(2, T, 12, dtype=torch.float64)
    out = m(x)
    assert out.shape == (2, T, 12) and out.dtype == torch.float64
    torch.testing.assert_close(out, module_by_hand(m, x), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("kv_sharing", ["none", "all"])
def test_every_parameter_gets_a_finite_gradient(kv_sharing):
    torch.manual_seed(0)
    m = NativeSparseAttention(24, 6, 2, qk_head_dim=8, v_head_dim=6, config=SMALL, kv_sharing=kv_sharing, bias=True)
    x = torch.randn(2, 75, 24, requires_grad=True)
    out = m(x)
    (out * torch.randn_like(out)).sum().backward()
    names = {name for name, _ in m.named_parameters()}
    assert {"gate_proj.weight", "gate_proj.bias", "k_compressor.pos_emb", "v_compressor.fc2.weight",
            "q_proj.weight", "kv_proj.weight", "o_proj.weight"} <= names
    for name, p in m.named_parameters():
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name
    assert torch.isfinite(x.grad).all()


def test_autocast_keeps_attention_statistics_in_float32():
    """Under bfloat16 autocast only the projections run in bfloat16: the attention is called with autocast
    off (inside it, autocast would run the score products and softmax in bfloat16, about 20x the error)."""
    torch.manual_seed(7)
    m = NativeSparseAttention(64, 4, 2, config=SMALL)
    x = torch.randn(2, 100, 64)
    exact = copy.deepcopy(m).double()(x.double())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = m(x)
    assert low.dtype == torch.bfloat16
    assert (low.double() - exact).abs().max() < 0.05


def test_compress_serves_a_decoding_cache():
    """``module.compress`` on the groups a cache would complete equals the k_cmp/v_cmp of a full forward."""
    torch.manual_seed(1)
    m = NativeSparseAttention(16, 4, 2, config=SMALL, kv_sharing="all").double()
    x = torch.randn(1, 40, 16, dtype=torch.float64)
    full = m.branch_inputs(x)
    raw = m.kv_proj(x).split([2 * 4, 2 * 4], dim=-1)
    k_raw, v_raw = (r.unflatten(-1, (2, 4)).transpose(1, 2) for r in raw)  # pre-RoPE, [1, 2, 40, 4]
    groups = [3, 5]  # compressed tokens i: raw tokens [4i, 4i + 8)
    k_blocks = torch.stack([k_raw[:, :, 4 * i : 4 * i + 8] for i in groups], dim=2)  # [1, 2, 2, 8, 4]
    v_blocks = torch.stack([v_raw[:, :, 4 * i : 4 * i + 8] for i in groups], dim=2)
    k_cmp, v_cmp = m.compress(k_blocks, v_blocks, torch.tensor(groups) * 4 + 7)
    torch.testing.assert_close(k_cmp, full["k_cmp"][:, :, groups])
    torch.testing.assert_close(v_cmp, full["v_cmp"][:, :, groups])


def test_window_only_gates_give_full_attention():
    """With the cmp/slc gates shut, the window gate open and w >= T, NSA is causal attention: the layer then
    equals CausalSelfAttention holding the same q, window-K/V and output weights (checks the 'full' twin)."""
    torch.manual_seed(2)
    cfg = flexnsa.NSAConfig(8, 4, 16, 2, 1, 1, window=64)
    nsa = NativeSparseAttention(16, 4, 2, qk_head_dim=6, v_head_dim=4, config=cfg, gate_bias=(-1e4, -1e4, 1e4))
    full = CausalSelfAttention(16, 4, 2, qk_head_dim=6, v_head_dim=4)
    nsa, full = nsa.double(), full.double()
    with torch.no_grad():
        nsa.gate_proj.weight.zero_()
        full.q_proj.weight.copy_(nsa.q_proj.weight)
        full.kv_proj.weight.copy_(nsa.kv_proj.weight[-2 * (6 + 4):])  # the window branch's [K | V]
        full.o_proj.weight.copy_(nsa.o_proj.weight)
    x = torch.randn(2, 50, 16, dtype=torch.float64)
    torch.testing.assert_close(nsa(x), full(x), rtol=1e-10, atol=1e-12)


def test_defaults_and_repr():
    m = NativeSparseAttention(64, 4)
    assert (m.num_kv_heads, m.qk_head_dim, m.v_head_dim) == (4, 16, 16)
    assert m.kv_branches == ("cmp", "slc", "win") and m.kv_proj.out_features == 3 * 4 * 32
    text = repr(m)
    for piece in ("dim=64", "num_heads=4", "kv_sharing='none'", "rope=True", "l=32", "n=16", "w=512", "Compressor"):
        assert piece in text, piece
    off = NativeSparseAttention(64, 4, config=flexnsa.NSAConfig(window=0))
    assert off.kv_branches == ("cmp", "slc")
    gates = torch.sigmoid(m.gate_proj(torch.randn(3, 64)))
    assert (gates - 0.5).abs().max() < 0.25  # documented: gates start near 1/2


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(dim=0, num_heads=2), "dim"),
        (dict(dim=16, num_heads=4, num_kv_heads=3), "num_kv_heads"),
        (dict(dim=15, num_heads=4), "num_heads"),
        (dict(dim=16, num_heads=4, qk_head_dim=5), "qk_head_dim"),
        (dict(dim=16, num_heads=4, v_head_dim=0), "v_head_dim"),
        (dict(dim=16, num_heads=4, kv_sharing="cmp"), "kv_sharing"),
        (dict(dim=16, num_heads=4, compress="max"), "compress"),
        (dict(dim=16, num_heads=4, config=dict(window=4)), "config"),
        (dict(dim=16, num_heads=4, scale=-1.0), "scale"),
        (dict(dim=16, num_heads=4, backend="cuda"), "backend"),
        (dict(dim=16, num_heads=4, gate_bias=(0.0, 1.0)), "gate_bias"),
    ],
)
def test_invalid_constructor_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        NativeSparseAttention(**kwargs)


@pytest.mark.parametrize("x", [torch.randn(2, 10), torch.randn(2, 10, 8), torch.randn(2, 0, 16)])
def test_invalid_input(x):
    with pytest.raises(ValueError, match="x"):
        NativeSparseAttention(16, 2, config=SMALL)(x)


# ---- the language model ------------------------------------------------------------------------
def test_language_model_shapes_and_switch():
    torch.manual_seed(3)
    nsa = NSALanguageModel(50, dim=32, num_layers=2, num_heads=4, num_kv_heads=2, config=SMALL)
    full = NSALanguageModel(50, dim=32, num_layers=2, num_heads=4, num_kv_heads=2, config=SMALL, attention="full")
    tokens = torch.randint(0, 50, (2, 37))
    for model, layer in ((nsa, NativeSparseAttention), (full, CausalSelfAttention)):
        assert all(isinstance(b.attn, layer) for b in model.blocks)
        logits = model(tokens)
        assert logits.shape == (2, 37, 50) and torch.isfinite(logits).all()
    assert nsa.lm_head.weight is nsa.embed.weight
    # residual writers are scaled by 1/sqrt(2 * num_layers) at initialisation
    std = nsa.blocks[0].attn.o_proj.weight.std().item()
    assert abs(std - (32**-0.5) / 2) < 0.25 * (32**-0.5) / 2
    with pytest.raises(ValueError, match="attention"):
        NSALanguageModel(50, dim=32, attention="sparse")
    with pytest.raises(ValueError, match="tokens"):
        nsa(torch.randn(2, 5))


def test_language_model_is_causal():
    torch.manual_seed(4)
    model = NSALanguageModel(30, dim=32, num_layers=2, num_heads=4, num_kv_heads=1, config=SMALL).double()
    tokens = torch.randint(0, 30, (1, 70))
    changed = tokens.clone()
    changed[0, 50:] = (changed[0, 50:] + 1) % 30
    torch.testing.assert_close(model(tokens)[:, :50], model(changed)[:, :50])
    assert not torch.allclose(model(tokens)[:, 50:], model(changed)[:, 50:])


# ---- torch.compile -----------------------------------------------------------------------------
class CountingBackend:
    """A torch.compile backend that counts the graphs dynamo hands it (one per (re)compilation)."""

    def __init__(self):
        self.graphs = 0

    def __call__(self, gm, example_inputs):
        self.graphs += 1
        return gm.forward


def _small_model(**kwargs) -> NSALanguageModel:
    torch.manual_seed(5)
    return NSALanguageModel(40, dim=32, num_layers=1, num_heads=4, num_kv_heads=2, config=SMALL, **kwargs)


@pytest.mark.slow
def test_fullgraph_compile_forward_backward_matches_eager():
    """``torch.compile(model, fullgraph=True)`` traces forward and backward without a graph break."""
    torch._dynamo.reset()
    model = _small_model()
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    tokens = torch.randint(0, 40, (2, 70))
    loss = compiled(tokens).logsumexp(-1).mean()
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    eager_loss = model(tokens).logsumexp(-1).mean()
    eager_loss.backward()
    torch.testing.assert_close(loss, eager_loss)
    for name, p in model.named_parameters():
        torch.testing.assert_close(grads[name], p.grad, msg=name)


@pytest.mark.slow
def test_recompilation_behaviour():
    """Same shapes: no recompile. A new T: one recompile, after which T is symbolic (automatic dynamic
    shapes) and later lengths in the same regime reuse that graph. Crossing T < l (no compressed token)
    recompiles once more."""
    torch._dynamo.reset()
    counter = CountingBackend()
    compiled = torch.compile(_small_model(), fullgraph=True, backend=counter)

    def run(T):
        compiled(torch.randint(0, 40, (2, T))).sum().backward()
        return counter.graphs

    assert run(70) == 1
    assert run(70) == 1  # same shapes: no recompile
    assert run(70) == 1
    assert run(90) == 2  # a new T: T becomes dynamic
    assert run(83) == 2  # same regime (T >= l, more blocks than n): the dynamic graph is reused
    assert run(150) == 2
    assert run(5) == 3  # T < l: no compressed tokens, a new specialisation


@pytest.mark.slow
def test_inductor_compiled_inference_matches_eager():
    torch._dynamo.reset()
    torch.manual_seed(6)
    m = NativeSparseAttention(32, 4, 2, config=SMALL).eval()
    x = torch.randn(2, 61, 32)
    compiled = torch.compile(m, fullgraph=True)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), m(x), rtol=1e-4, atol=1e-5)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_compiled_model_trains():
    torch._dynamo.reset()
    model = _small_model(head_dim=16).cuda()  # FlexAttention on CUDA needs head dims >= 16
    assert model.blocks[0].attn.backend == "auto"
    compiled = torch.compile(model, fullgraph=True)
    tokens = torch.randint(0, 40, (2, 300), device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = torch.nn.functional.cross_entropy(compiled(tokens[:, :-1]).flatten(0, 1), tokens[:, 1:].flatten())
    loss.backward()
    assert torch.isfinite(loss)
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name


# ---- the training demo ---------------------------------------------------------------------------
def test_recall_task_answers_are_the_stored_values():
    from flexnsa.train_demo import RecallTask

    task = RecallTask(seq_len=64, num_pairs=5, num_queries=3)
    tokens, query_pos, answers = task.sample(4, torch.Generator().manual_seed(0))
    assert tokens.shape == (4, 64) and int(tokens.max()) < task.vocab_size
    for b in range(4):
        for q, answer in zip(query_pos.tolist(), answers[b].tolist()):
            key = tokens[b, q].item()
            assert task.num_filler <= key < task.first_value and tokens[b, q + 1] == answer
            earlier = (tokens[b, : q].eq(key)).nonzero().flatten().tolist()
            assert len(earlier) == 1 and tokens[b, earlier[0] + 1] == answer  # stored once, before


def test_training_demo_runs(capsys):
    from flexnsa import train_demo

    assert train_demo.main(["--steps", "3", "--seq-len", "48", "--batch", "2", "--dim", "16", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "3/3" in out and "agreement" in out and "tok/s" in out
    err = float(out.split("max abs error")[1].split()[0])
    assert math.isfinite(err) and err < 1e-4
