"""flexnsa.masks: every mask_mod against a hand-written dense mask, every closed-form block table
against the tiles of that dense mask, and the BlockMasks end to end through FlexAttention (eager)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st
from torch.nn.attention.flex_attention import flex_attention

from flexnsa import masks, reference

pytestmark = pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")

BLOCKS = st.sampled_from([1, 2, 4, 8, 16, 128])


# ---- hand-written dense masks (plain Python loops, independent of the tensor code) ----------
def loop_mask(q_len: int, kv_len: int, rule, batch: int = 1) -> torch.Tensor:
    """bool ``[batch, 1, q_len, kv_len]`` from a Python predicate ``rule(b, t, s)``."""
    out = torch.zeros(batch, 1, q_len, kv_len, dtype=torch.bool)
    for b in range(batch):
        for t in range(q_len):
            for s in range(kv_len):
                out[b, 0, t, s] = bool(rule(b, t, s))
    return out


def tiles_of(dense: torch.Tensor, q_block: int, kv_block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(any, full) tiles of a dense mask, padding counted as masked (create_block_mask's rule)."""
    B, H, Q, K = dense.shape
    nqb, nkb = -(-Q // q_block), -(-K // kv_block)
    padded = torch.zeros(B, H, nqb * q_block, nkb * kv_block, dtype=torch.int64)
    padded[:, :, :Q, :K] = dense.long()
    sums = padded.view(B, H, nqb, q_block, nkb, kv_block).sum(dim=(3, 5))
    return sums > 0, sums == q_block * kv_block


def check_pattern(pattern: masks.MaskPattern, expected: torch.Tensor, block, exact_any: bool = True):
    """mask_mod == expected entry by entry; block tables vs the tiles of expected."""
    q_len, kv_len = expected.shape[-2:]
    got = pattern.dense(q_len, kv_len)
    assert got.shape[-2:] == expected.shape[-2:]
    assert torch.equal(got.expand_as(expected), expected), pattern.name
    q_block, kv_block = (block, block) if isinstance(block, int) else block
    any_true, full_true = tiles_of(expected, q_block, kv_block)
    any_got, full_got = pattern.block_tables(q_len, kv_len, (q_block, kv_block))
    assert any_got.dim() == 4 and any_got.shape[1] == 1  # head dimension 1, never HKV
    any_got, full_got = any_got.expand_as(any_true), full_got.expand_as(full_true)
    assert torch.equal(full_got & any_got, full_true), f"{pattern.name}: full tiles differ"
    if exact_any:
        assert torch.equal(any_got, any_true), f"{pattern.name}: any tiles differ"
    else:  # a superset is allowed (mask_mod is applied there), a missing tile is a bug
        assert bool((any_got | ~any_true).all()), f"{pattern.name}: a visible tile is missing"
    # the BlockMask holds exactly these tiles
    bm = pattern.block_mask(q_len, kv_len, block_size=(q_block, kv_block))
    assert torch.equal(bm.to_dense().bool().expand_as(any_true), any_got)


def doc_ids_strategy(max_len: int = 60):
    return st.lists(st.integers(1, 20), min_size=1, max_size=6).map(
        lambda runs: torch.cat([torch.full((n,), i) for i, n in enumerate(runs)])[:max_len]
    )


# ---- single patterns -----------------------------------------------------------------------
@settings(max_examples=20)
@given(st.integers(1, 70), st.integers(1, 70), BLOCKS)
def test_causal(q_len, kv_len, block):
    check_pattern(masks.causal(), loop_mask(q_len, kv_len, lambda b, t, s: s <= t), block)
    assert masks.causal_mask_mod().__name__ == "causal"


@settings(max_examples=20)
@given(st.integers(1, 70), st.integers(0, 80), BLOCKS)
@example(seq_len=2, window=0, block=2)  # w = 0 once gave a visible tile (CI, hypothesis)
def test_sliding_window(seq_len, window, block):
    expected = loop_mask(seq_len, seq_len, lambda b, t, s: t - window < s <= t)
    check_pattern(masks.sliding_window(window), expected, block)
    assert masks.sliding_window_mask_mod(window).__name__ == f"sliding_window_{window}"


@settings(max_examples=20)
@given(st.sampled_from([1, 2, 4, 8]), st.integers(1, 4), st.integers(1, 120), BLOCKS, BLOCKS)
def test_compressed_causal(d, ratio, seq_len, q_block, kv_block):
    l = d * ratio
    num_cmp = masks.num_compressed_tokens(seq_len, l, d)
    if num_cmp == 0:
        assert seq_len < l
        with pytest.raises(ValueError, match="no compressed token"):
            masks.compressed_causal_block_mask(seq_len, l, d)
        return
    expected = loop_mask(seq_len, num_cmp, lambda b, t, i: i * d + l - 1 <= t)
    check_pattern(masks.compressed_causal(l, d), expected, (q_block, kv_block))


@settings(max_examples=20)
@given(st.integers(1, 70), st.lists(st.integers(0, 80), min_size=1, max_size=3), BLOCKS)
def test_prefix_lm(seq_len, prefixes, block):
    check_pattern(
        masks.prefix_lm(prefixes[0]),
        loop_mask(seq_len, seq_len, lambda b, t, s: s < prefixes[0] or s <= t),
        block,
    )
    per_batch = torch.tensor(prefixes)
    expected = loop_mask(seq_len, seq_len, lambda b, t, s: s < prefixes[b] or s <= t, batch=len(prefixes))
    check_pattern(masks.prefix_lm(per_batch), expected, block)


@settings(max_examples=20)
@given(doc_ids_strategy(), BLOCKS, st.sampled_from(["none", "causal", "window", "prefix"]), st.integers(1, 9))
def test_document_composes(doc, block, inner_kind, param):
    T = doc.shape[0]
    inners = {
        "none": (None, lambda t, s: True),
        "causal": (masks.causal(), lambda t, s: s <= t),
        "window": (masks.sliding_window(param), lambda t, s: t - param < s <= t),
        "prefix": (masks.prefix_lm(param), lambda t, s: s < param or s <= t),
    }
    inner, rule = inners[inner_kind]
    expected = loop_mask(T, T, lambda b, t, s: doc[t] == doc[s] and rule(t, s))
    check_pattern(masks.document(doc, inner), expected, block, exact_any=inner is None)


@settings(max_examples=20)
@given(doc_ids_strategy(max_len=90), st.sampled_from([1, 2, 4]), st.integers(1, 3), BLOCKS)
def test_document_with_compressed(doc, d, ratio, block):
    l = d * ratio
    T = doc.shape[0]
    num_cmp = masks.num_compressed_tokens(T, l, d)
    if num_cmp == 0:
        return
    kv_doc = masks.compressed_doc_ids(doc, l, d)
    assert kv_doc.shape == (1, num_cmp)
    # hand-written: token i is visible iff causal and every raw token of it is in the query's document
    expected = loop_mask(
        T,
        num_cmp,
        lambda b, t, i: i * d + l - 1 <= t and all(doc[s] == doc[t] for s in range(i * d, i * d + l)),
    )
    check_pattern(
        masks.document(doc, masks.compressed_causal(l, d), kv_doc), expected, block, exact_any=False
    )


def test_document_batched_ids_and_shared_row():
    doc = torch.tensor([[0, 0, 1, 1, 1, 2], [0, 1, 1, 1, 1, 1]])
    expected = loop_mask(6, 6, lambda b, t, s: doc[b, t] == doc[b, s] and s <= t, batch=2)
    check_pattern(masks.document(doc, masks.causal()), expected, 2, exact_any=False)
    # a single row of ids ignores the batch index (works for any batch of the kernel)
    mod = masks.document_mask_mod(doc[0])
    b = torch.tensor(5)
    assert bool(mod(b, 0, torch.tensor(0), torch.tensor(1))) and not bool(
        mod(b, 0, torch.tensor(0), torch.tensor(2))
    )


def test_and_of_patterns_and_dense_fallback():
    def odd_keys(b, h, q_idx, kv_idx):
        return kv_idx % 2 == 1

    no_tables = masks.MaskPattern("odd_keys", odd_keys)  # no closed form: dense evaluation
    combined = masks.causal() & no_tables
    expected = loop_mask(37, 37, lambda b, t, s: s <= t and s % 2 == 1)
    check_pattern(combined, expected, 4)
    check_pattern(
        masks.causal() & masks.sliding_window(9), loop_mask(40, 40, lambda b, t, s: t - 9 < s <= t), 8
    )


def test_bad_arguments():
    with pytest.raises(ValueError, match="window"):
        masks.sliding_window(-1)
    with pytest.raises(ValueError, match="cmp_stride"):
        masks.compressed_causal(4, 0)
    with pytest.raises(ValueError, match="prefix_len"):
        masks.prefix_lm(-3)
    with pytest.raises(ValueError, match="doc_ids"):
        masks.document(torch.zeros(2, 3, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="document ids cover"):
        masks.document(torch.zeros(5, dtype=torch.long)).block_mask(6)


# ---- end to end through FlexAttention ------------------------------------------------------
@pytest.mark.parametrize(
    "name",
    ["causal", "window", "prefix", "document_causal", "document_window", "compressed", "document_compressed"],
)
def test_block_masks_through_flex(name):
    """Each closed-form BlockMask drives flex_attention to the dense-masked reference result."""
    gen = torch.Generator().manual_seed(3)
    T, l, d = 300, 8, 4
    doc = torch.repeat_interleave(torch.arange(4), torch.tensor([70, 1, 150, 79]))
    cases = {
        "causal": (masks.causal(), T),
        "window": (masks.sliding_window(45), T),
        "prefix": (masks.prefix_lm(131), T),
        "document_causal": (masks.document(doc, masks.causal()), T),
        "document_window": (masks.document(doc, masks.sliding_window(20)), T),
        "compressed": (masks.compressed_causal(l, d), masks.num_compressed_tokens(T, l, d)),
        "document_compressed": (
            masks.document(doc, masks.compressed_causal(l, d), masks.compressed_doc_ids(doc, l, d)),
            masks.num_compressed_tokens(T, l, d),
        ),
    }
    pattern, kv_len = cases[name]
    q = torch.randn(1, 4, T, 16, generator=gen)
    k = torch.randn(1, 2, kv_len, 16, generator=gen)
    v = torch.randn(1, 2, kv_len, 8, generator=gen)
    out = flex_attention(q, k, v, block_mask=pattern.block_mask(T, kv_len), enable_gqa=True)
    dense = pattern.dense(T, kv_len)  # [1, 1, T, KV]
    expected, _ = reference.masked_attention(q.double(), k.double(), v.double(), dense, 0.25)
    torch.testing.assert_close(out.double(), expected, atol=2e-6, rtol=1e-5)


# ---- drawings --------------------------------------------------------------------------------
def test_ascii_drawing():
    text = masks.sliding_window(3).ascii(6, block_size=2)
    lines = text.splitlines()
    assert lines[1:7] == ["#.....", "##....", "###...", ".###..", "..###.", "...###"]
    assert lines[7].startswith("blocks") and lines[8:] == ["p..", "pp.", ".pp"]
    big = masks.compressed_causal(32, 16).ascii(4096, 255, max_width=32)
    assert "entries per char" in big.splitlines()[0] and len(big.splitlines()[1]) <= 32
    assert masks.to_ascii(masks.causal_mask_mod(), 3).splitlines()[1:] == ["#..", "##.", "###"]


def test_png_drawing(tmp_path):
    pytest.importorskip("matplotlib")
    path = masks.document(torch.tensor([0] * 50 + [1] * 78), masks.causal()).png(
        tmp_path / "doc.png", 128, block_size=16
    )
    assert path.exists() and path.stat().st_size > 0


# ---- the README's "write your own pattern" example -------------------------------------------
def chunk_causal(size: int) -> masks.MaskPattern:
    """Causal attention inside chunks of ``size`` tokens (the README example)."""

    def rule(b, h, q_idx, kv_idx):
        return (kv_idx <= q_idx) & (kv_idx // size == q_idx // size)

    def tables(q_len, kv_len, q_block, kv_block, device):
        return masks.interval_block_tables(
            lambda t: t - t % size, lambda t: t, q_len, kv_len, q_block, kv_block, device
        )

    return masks.MaskPattern(f"chunk_causal_{size}", rule, tables)


@settings(max_examples=10)
@given(st.integers(1, 80), st.integers(1, 20), BLOCKS)
def test_readme_example_pattern(seq_len, size, block):
    expected = loop_mask(seq_len, seq_len, lambda b, t, s: s <= t and s // size == t // size)
    check_pattern(chunk_causal(size), expected, block)
    check_pattern(
        chunk_causal(size) & masks.sliding_window(5),
        expected & loop_mask(seq_len, seq_len, lambda b, t, s: t - 5 < s <= t),
        block,
        exact_any=False,
    )
