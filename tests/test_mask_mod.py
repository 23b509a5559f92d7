"""A user pattern (FlexAttention mask_mod) composed into NSA: packed documents behave like separate
sequences, and nothing leaks across documents through any branch or through the selection."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import flexnsa
from flexnsa import masks
from nsa_inputs import make_inputs

# l=8, d=4, l'=16: a document starting at a multiple of 16 aligns with blocks and compressed tokens
CFG_ALL = flexnsa.NSAConfig(cmp_block=8, cmp_stride=4, slc_block=16, num_selected=8, num_init_blocks=1,
                            num_local_blocks=1, window=12)


def _document_mask_mod(doc_ids):
    def same_document(b, h, q_idx, kv_idx):
        return doc_ids[q_idx] == doc_ids[kv_idx]

    return same_document


@settings(max_examples=10)
@given(st.integers(1, 4), st.integers(1, 60), st.sampled_from([1, 2, 4]), st.integers(0, 1000))
def test_packed_documents_equal_separate_sequences(first_blocks, second_len, G, seed):
    """With n >= all eligible blocks the selection is every eligible block, so a document mask makes the
    second document's rows exactly NSA run on that document alone (positions shifted by a block multiple)."""
    cfg = CFG_ALL
    first_len = first_blocks * cfg.slc_block
    T = first_len + second_len
    if cfg.num_blocks(T) > cfg.num_selected:
        cfg = flexnsa.NSAConfig(8, 4, 16, cfg.num_blocks(T), 1, 1, 12)
    one = make_inputs(cfg, 1, G, 1, first_len, 8, 6, seed=seed)
    two = make_inputs(cfg, 1, G, 1, second_len, 8, 6, seed=seed + 1)
    packed = {name: torch.cat([one[name], two[name]], dim=2) for name in ("q", "k", "v", "gates")}
    Tc = cfg.num_cmp_tokens(T)
    first_cmp = first_len // cfg.cmp_stride  # global index of the second document's first compressed token
    for name in ("k_cmp", "v_cmp"):
        rows = torch.randn(1, 1, Tc, one[name].shape[-1], dtype=torch.float64)  # straddling tokens: junk
        rows[:, :, : one[name].shape[2]] = one[name]
        rows[:, :, first_cmp : first_cmp + two[name].shape[2]] = two[name]
        packed[name] = rows
    doc_ids = torch.cat([torch.zeros(first_len, dtype=torch.long), torch.ones(second_len, dtype=torch.long)])
    out = flexnsa.nsa_attention(**packed, config=cfg, mask_mod=_document_mask_mod(doc_ids))
    torch.testing.assert_close(out[:, :, :first_len], flexnsa.nsa_attention(**one, config=cfg))
    torch.testing.assert_close(out[:, :, first_len:], flexnsa.nsa_attention(**two, config=cfg))


@settings(max_examples=10)
@given(st.integers(20, 90), st.integers(10, 60), st.sampled_from([1, 3, 16]), st.integers(0, 1000))
def test_no_leak_across_documents_with_top_n(first_len, second_len, G, seed):
    """Few selected blocks (top-n active) and unaligned documents: the second document's outputs and
    selection scores ignore everything in the first document."""
    cfg = flexnsa.NSAConfig(cmp_block=8, cmp_stride=4, slc_block=8, num_selected=3, window=10)
    T = first_len + second_len
    inputs = make_inputs(cfg, 1, G, 1, T, 8, 8, seed=seed)
    doc_ids = torch.cat([torch.zeros(first_len, dtype=torch.long), torch.ones(second_len, dtype=torch.long)])
    mask_mod = masks.document_mask_mod(doc_ids)
    out = flexnsa.nsa_attention(**inputs, config=cfg, mask_mod=mask_mod)
    changed = {name: x.clone() for name, x in inputs.items()}
    for name in ("q", "k", "v"):
        changed[name][:, :, :first_len] = torch.randn_like(changed[name][:, :, :first_len])
    last_first_doc_cmp = (first_len - 1) // cfg.cmp_stride  # every compressed token touching document 0
    for name in ("k_cmp", "v_cmp"):
        changed[name][:, :, : last_first_doc_cmp + 1] = torch.randn_like(changed[name][:, :, : last_first_doc_cmp + 1])
    out_changed = flexnsa.nsa_attention(**changed, config=cfg, mask_mod=mask_mod)
    torch.testing.assert_close(out_changed[:, :, first_len:], out[:, :, first_len:], rtol=1e-12, atol=1e-12)
    assert not torch.allclose(out_changed[:, :, :first_len], out[:, :, :first_len])


def test_mask_mod_backend_rules():
    cfg = flexnsa.NSAConfig(cmp_block=8, cmp_stride=4, slc_block=8, num_selected=3, window=10)
    inputs = make_inputs(cfg, 1, 2, 1, 40, 8, 8, dtype=torch.float32)
    def causal(b, h, q_idx, kv_idx):
        return kv_idx <= q_idx

    with pytest.raises(ValueError, match="mask_mod"):
        flexnsa.nsa_attention(**inputs, config=cfg, mask_mod=causal, backend="flex")
    with pytest.raises(ValueError, match="mask_mod"):
        flexnsa.nsa_attention(**inputs, config=cfg, mask_mod="documents")
    # a pattern that changes nothing (causal) gives the unmasked result
    torch.testing.assert_close(flexnsa.nsa_attention(**inputs, config=cfg, mask_mod=causal),
                               flexnsa.nsa_attention(**inputs, config=cfg))


def test_module_and_model_take_a_document_mask():
    cfg = flexnsa.NSAConfig(cmp_block=8, cmp_stride=4, slc_block=8, num_selected=3, window=10)
    torch.manual_seed(0)
    model = flexnsa.NSALanguageModel(50, dim=32, num_layers=2, num_heads=4, num_kv_heads=2, config=cfg).double()
    tokens = torch.randint(0, 50, (1, 70))
    doc_ids = (torch.arange(70) >= 33).long()
    mask_mod = masks.document_mask_mod(doc_ids)
    logits = model(tokens, mask_mod=mask_mod)
    other = tokens.clone()
    other[:, :33] = torch.randint(0, 50, (1, 33))
    torch.testing.assert_close(model(other, mask_mod=mask_mod)[:, 33:], logits[:, 33:])
    logits.sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    full = flexnsa.NSALanguageModel(50, dim=32, num_layers=1, num_heads=4, num_kv_heads=2, attention="full")
    with pytest.raises(ValueError, match="mask_mod"):
        full(tokens, mask_mod=mask_mod)
