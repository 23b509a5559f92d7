"""Benchmark of the ``NativeSparseAttention`` module, projections included."""

from __future__ import annotations

import pytest

import _cases
from conftest import DIRECTIONS


@pytest.mark.parametrize("direction", DIRECTIONS)
def test_module(run_case, inputs, direction):
    run_case(_cases.build_module, inputs, direction, "module")
