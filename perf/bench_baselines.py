"""Baselines on the same inputs: full causal attention (SDPA cuDNN / flash, FlexAttention), a
FlexAttention sliding window, fla-core's ``parallel_nsa``; SDPA's default backend on the CPU."""

from __future__ import annotations

import pytest

import _cases
from conftest import DEVICE, DIRECTIONS


@pytest.mark.parametrize("direction", DIRECTIONS)
@pytest.mark.parametrize("name", _cases.baseline_names(DEVICE, flex_window=True))
def test_baseline(run_case, inputs, name, direction):
    run_case(_cases.BASELINES[name], inputs, direction, f"baseline {name}")
