"""Every invalid argument of the public API is a ValueError that names the argument."""

from __future__ import annotations

import dataclasses

import pytest
import torch

import flexnsa
from nsa_inputs import make_inputs

CFG = flexnsa.NSAConfig(cmp_block=8, cmp_stride=4, slc_block=8, num_selected=3, window=6)
B, HQ, HKV, T, DK, DV = 2, 6, 2, 37, 8, 4


def _inputs(**kw):
    return make_inputs(CFG, B, HQ, HKV, T, DK, DV, dtype=torch.float32, **kw)


def _replace(name, value):
    inputs = _inputs(window_kv=name in ("k_win", "v_win"))
    inputs[name] = value
    return inputs


def _tc():
    return CFG.num_cmp_tokens(T)


BAD_TENSORS = [
    ("q", lambda: torch.randn(HQ, T, DK)),  # rank 3
    ("q", lambda: torch.randn(B, HQ, T, DK).long()),  # integer dtype
    ("q", lambda: torch.randn(B, HQ, 0, DK)),  # no token
    ("k", lambda: torch.randn(B, HKV, T + 1, DK)),  # wrong T
    ("k", lambda: torch.randn(B, HKV, T, DK + 1)),  # wrong Dk
    ("k", lambda: torch.randn(B, HKV, T, DK, dtype=torch.float64)),  # dtype mismatch
    ("v", lambda: torch.randn(B + 1, HKV, T, DV)),  # wrong batch
    ("v", lambda: [[0.0]]),  # not a tensor
    ("k_cmp", lambda: torch.randn(B, 4, _tc(), DK)),  # 4 KV heads do not divide 6 query heads
    ("k_cmp", lambda: torch.randn(B, HKV, _tc() + 1, DK)),  # wrong Tc
    ("v_cmp", lambda: torch.randn(B, HKV, _tc(), DV + 2)),  # wrong Dv
    ("v_cmp", lambda: torch.randn(B, HKV, _tc(), DV, dtype=torch.float16)),
    ("gates", lambda: torch.rand(B, HQ, T, 2)),  # two gates
    ("gates", lambda: torch.rand(B, HQ, T, 3).int()),  # integer gates
    ("k_win", lambda: torch.randn(B, HKV, T - 1, DK)),
    ("v_win", lambda: torch.randn(B, HKV, T, DV + 1)),
]


@pytest.mark.parametrize("name, make_bad", BAD_TENSORS, ids=[f"{n}-{i}" for i, (n, _) in enumerate(BAD_TENSORS)])
def test_bad_tensor_names_the_argument(name, make_bad):
    inputs = _replace(name, make_bad())
    with pytest.raises(ValueError, match=name):
        flexnsa.nsa_attention(**inputs, config=CFG)


def test_head_count_mismatch_between_k_and_k_cmp():
    inputs = _inputs()
    inputs["k"] = torch.randn(B, 3, T, DK)
    with pytest.raises(ValueError, match=r"\bk\b"):
        flexnsa.nsa_attention(**inputs, config=CFG)


def test_k_win_without_v_win():
    inputs = _inputs()
    inputs["k_win"] = inputs["k"].clone()
    with pytest.raises(ValueError, match="k_win and v_win"):
        flexnsa.nsa_attention(**inputs, config=CFG)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a second device")
def test_device_mismatch():
    inputs = _inputs()
    inputs["v"] = inputs["v"].cuda()
    with pytest.raises(ValueError, match="v must be on"):
        flexnsa.nsa_attention(**inputs, config=CFG)


def test_device_mismatch_with_meta_tensor():
    inputs = _inputs()
    inputs["v"] = inputs["v"].to("meta")
    with pytest.raises(ValueError, match="v must be on"):
        flexnsa.nsa_attention(**inputs, config=CFG)


@pytest.mark.parametrize("scale", [0.0, -1.0, float("nan"), float("inf"), "0.5", True])
def test_bad_scale(scale):
    with pytest.raises(ValueError, match="scale"):
        flexnsa.nsa_attention(**_inputs(), config=CFG, scale=scale)


def test_bad_config_type_and_backend():
    with pytest.raises(ValueError, match="config"):
        flexnsa.nsa_attention(**_inputs(), config=dataclasses.asdict(CFG))
    with pytest.raises(ValueError, match="backend"):
        flexnsa.nsa_attention(**_inputs(), config=CFG, backend="cuda-magic")
    with pytest.raises(ValueError, match="backend"):
        flexnsa.select_blocks(_inputs()["q"], _inputs()["k_cmp"], CFG, backend="nope")


@pytest.mark.parametrize(
    "bad, match",
    [
        (lambda idx: idx.float(), "int32 or int64"),
        (lambda idx: idx[..., :2], r"\[B, HKV, T, n\]"),
        (lambda idx: idx + 100, r"\[-1, "),
        (lambda idx: idx - 5, r"\[-1, "),
    ],
)
def test_bad_block_indices(bad, match):
    inputs = _inputs()
    idx = flexnsa.select_blocks(inputs["q"], inputs["k_cmp"], CFG)
    with pytest.raises(ValueError, match="block_indices") as info:
        flexnsa.nsa_attention(**inputs, config=CFG, block_indices=bad(idx))
    assert info.match(match)


@pytest.mark.parametrize(
    "fields, name",
    [
        (dict(cmp_block=24, cmp_stride=16), "cmp_stride"),  # d does not divide l
        (dict(cmp_block=8, cmp_stride=16), "cmp_block"),  # l < d
        (dict(slc_block=40), "cmp_stride"),  # d does not divide l'
        (dict(num_selected=2), "num_selected"),  # init + local > n
        (dict(num_selected=0, num_init_blocks=0, num_local_blocks=0), "num_selected"),
        (dict(window=-1), "window"),
        (dict(num_init_blocks=-1), "num_init_blocks"),
        (dict(cmp_block=32.0), "cmp_block"),
        (dict(slc_block=True), "slc_block"),
        (dict(cmp_stride=0), "cmp_stride"),
    ],
)
def test_invalid_config_names_the_field(fields, name):
    with pytest.raises(ValueError, match=name):
        flexnsa.NSAConfig(**fields)


def test_config_is_frozen_with_paper_defaults():
    cfg = flexnsa.NSAConfig()
    assert (cfg.cmp_block, cfg.cmp_stride, cfg.slc_block, cfg.num_selected) == (32, 16, 64, 16)
    assert (cfg.num_init_blocks, cfg.num_local_blocks, cfg.window) == (1, 2, 512)
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.window = 3
    assert [cfg.num_cmp_tokens(t) for t in (0, 31, 32, 47, 48, 64)] == [0, 0, 1, 1, 2, 3]
    assert [cfg.num_blocks(t) for t in (1, 64, 65, 128)] == [1, 1, 2, 2]


def test_select_blocks_bad_inputs():
    inputs = _inputs()
    with pytest.raises(ValueError, match="q"):
        flexnsa.select_blocks(inputs["q"][0], inputs["k_cmp"], CFG)
    with pytest.raises(ValueError, match="k_cmp"):
        flexnsa.select_blocks(inputs["q"], inputs["k_cmp"][:, :, 1:], CFG)
    with pytest.raises(ValueError, match="k_cmp"):
        flexnsa.select_blocks(inputs["q"], inputs["k_cmp"].double(), CFG)
