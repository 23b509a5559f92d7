"""The module and the language model with an NSACache: prefill + cached steps reproduce the
full-sequence forward, across compressed-token and selection-block boundaries, with GQA and T < l."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import flexnsa

CFG = flexnsa.NSAConfig(cmp_block=8, cmp_stride=4, slc_block=8, num_selected=3, num_init_blocks=1,
                        num_local_blocks=1, window=10)


@settings(max_examples=8)
@given(st.integers(1, 20), st.lists(st.integers(1, 9), min_size=1, max_size=5), st.sampled_from(["none", "all"]),
       st.sampled_from([(4, 4), (6, 2), (4, 1)]), st.sampled_from([CFG, CFG.__class__(8, 4, 8, 3, 1, 1, 0)]),
       st.integers(0, 99))
def test_cached_steps_equal_full_forward(prompt, steps, sharing, heads, cfg, seed):
    torch.manual_seed(seed)
    HQ, HKV = heads
    model = flexnsa.NSALanguageModel(40, dim=24, num_layers=2, num_heads=HQ, num_kv_heads=HKV, head_dim=6,
                                     config=cfg, kv_sharing=sharing).double()
    T = prompt + sum(steps)
    tokens = torch.randint(0, 40, (2, T))
    full = model(tokens)  # [B, T, vocab]
    cache = model.new_cache(2, T)
    pieces = [model(tokens[:, :prompt], cache=cache, prefill=True)]
    start = prompt
    for n in steps:
        pieces.append(model(tokens[:, start : start + n], cache=cache))
        start += n
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, rtol=1e-9, atol=1e-9)


def test_generate_greedy_matches_repeated_full_forwards():
    torch.manual_seed(0)
    model = flexnsa.NSALanguageModel(30, dim=24, num_layers=2, num_heads=4, num_kv_heads=2, config=CFG).double()
    prompt = torch.randint(0, 30, (2, 13))
    out = model.generate(prompt, 12)
    expected = prompt
    for _ in range(12):
        expected = torch.cat([expected, model(expected)[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(out, expected)
    sampled = model.generate(prompt, 5, temperature=1.0, generator=torch.Generator().manual_seed(0))
    assert sampled.shape == (2, 18) and torch.equal(sampled[:, :13], prompt)


def test_cache_errors():
    model = flexnsa.NSALanguageModel(30, dim=24, num_layers=1, num_heads=4, num_kv_heads=2, config=CFG)
    with pytest.raises(ValueError, match="max_new_tokens"):
        model.generate(torch.zeros(1, 3, dtype=torch.long), -1)
    full = flexnsa.NSALanguageModel(30, dim=24, num_layers=1, num_heads=4, num_kv_heads=2, attention="full")
    with pytest.raises(ValueError, match="cache"):
        full.new_cache(1, 10)
