"""Benchmarks of the functional API: ``nsa_attention``, ``select_blocks`` and each stage."""

from __future__ import annotations

import pytest

import _cases
from conftest import DIRECTIONS

import flexnsa


@pytest.mark.parametrize("direction", DIRECTIONS)
def test_nsa_attention(run_case, inputs, direction):
    run_case(_cases.build_nsa, inputs, direction, "nsa_attention")


def _build_select_blocks(inp):
    def fwd():
        return flexnsa.select_blocks(inp.q.detach(), inp.k_cmp.detach(), inp.config)

    return _cases.Case("select_blocks", fwd, None, (), no_bwd="discrete, no gradient")


def test_select_blocks(run_case, inputs):
    run_case(_build_select_blocks, inputs, "fwd", "select_blocks")


@pytest.mark.parametrize("direction", DIRECTIONS)
@pytest.mark.parametrize("stage", list(_cases.STAGES))
def test_stage(run_case, inputs, stage, direction):
    run_case(_cases.STAGES[stage], inputs, direction, f"stage {stage}")
