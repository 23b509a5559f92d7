"""Input validation for the public API: every problem is a ValueError naming the argument."""

from __future__ import annotations

import dataclasses
import math

import torch

from .config import NSAConfig

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


@dataclasses.dataclass(frozen=True)
class Dims:
    """Sizes read off validated inputs."""

    batch: int
    q_heads: int
    kv_heads: int
    seq_len: int
    num_cmp: int
    qk_dim: int
    v_dim: int

    @property
    def groups(self) -> int:
        return self.q_heads // self.kv_heads


def check_config(config) -> NSAConfig:
    if config is None:
        return NSAConfig()
    if not isinstance(config, NSAConfig):
        raise ValueError(f"config must be a flexnsa.NSAConfig or None, got {type(config).__name__}")
    return config


def check_scale(scale) -> None:
    if scale is None:
        return
    if isinstance(scale, bool) or not isinstance(scale, (int, float)):
        raise ValueError(f"scale must be a positive float or None, got {scale!r}")
    if not math.isfinite(scale) or scale <= 0:
        raise ValueError(f"scale must be a positive finite float, got {scale!r}")


def _check_tensor(name: str, x, rank: int = 4, float_only: bool = True) -> None:
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != rank:
        raise ValueError(f"{name} must have {rank} dimensions, got shape {tuple(x.shape)}")
    if float_only and x.dtype not in FLOAT_DTYPES:
        raise ValueError(f"{name} must be float16, bfloat16, float32 or float64, got {x.dtype}")


def _expect_shape(name: str, x: torch.Tensor, expected: tuple, layout: str) -> None:
    if tuple(x.shape) != tuple(expected):
        raise ValueError(f"{name} must have shape {layout} = {tuple(expected)}, got {tuple(x.shape)}")


def check_qk(q, k_cmp, config: NSAConfig) -> Dims:
    """Checks ``q [B, HQ, T, Dk]`` and ``k_cmp [B, HKV, Tc, Dk]``; returns the sizes."""
    _check_tensor("q", q)
    _check_tensor("k_cmp", k_cmp)
    B, HQ, T, Dk = q.shape
    if T < 1:
        raise ValueError(f"q must hold at least one token (T >= 1), got shape {tuple(q.shape)}")
    if HQ < 1 or Dk < 1 or B < 1:
        raise ValueError(f"q must have non-empty batch, head and head-dim sizes, got {tuple(q.shape)}")
    HKV = k_cmp.shape[1]
    if HKV < 1 or HQ % HKV:
        raise ValueError(
            f"k_cmp has {HKV} heads, which must divide the {HQ} query heads of q (GQA: HQ = G * HKV)"
        )
    Tc = config.num_cmp_tokens(T)
    _expect_shape("k_cmp", k_cmp, (B, HKV, Tc, Dk), "[B, HKV, Tc(T), Dk]")
    if k_cmp.dtype != q.dtype:
        raise ValueError(f"k_cmp must have q's dtype {q.dtype}, got {k_cmp.dtype}")
    if k_cmp.device != q.device:
        raise ValueError(f"k_cmp must be on q's device {q.device}, got {k_cmp.device}")
    return Dims(B, HQ, HKV, T, Tc, Dk, -1)


def check_nsa_inputs(q, k, v, k_cmp, v_cmp, gates, config: NSAConfig, k_win=None, v_win=None) -> Dims:
    """Checks the arguments of ``nsa_attention``; returns the sizes."""
    dims = check_qk(q, k_cmp, config)
    B, HQ, HKV, T, Tc, Dk = dims.batch, dims.q_heads, dims.kv_heads, dims.seq_len, dims.num_cmp, dims.qk_dim
    for name, x in (("k", k), ("v", v), ("v_cmp", v_cmp)):
        _check_tensor(name, x)
    _check_tensor("gates", gates)
    Dv = v.shape[-1]
    if Dv < 1:
        raise ValueError(f"v must have a non-empty head dim, got shape {tuple(v.shape)}")
    _expect_shape("k", k, (B, HKV, T, Dk), "[B, HKV, T, Dk]")
    _expect_shape("v", v, (B, HKV, T, Dv), "[B, HKV, T, Dv]")
    _expect_shape("v_cmp", v_cmp, (B, HKV, Tc, Dv), "[B, HKV, Tc(T), Dv]")
    _expect_shape("gates", gates, (B, HQ, T, 3), "[B, HQ, T, 3]")
    if (k_win is None) != (v_win is None):
        raise ValueError("k_win and v_win must be given together (or both left None)")
    named = [("k", k), ("v", v), ("v_cmp", v_cmp), ("gates", gates)]
    if k_win is not None:
        _check_tensor("k_win", k_win)
        _check_tensor("v_win", v_win)
        _expect_shape("k_win", k_win, (B, HKV, T, Dk), "[B, HKV, T, Dk]")
        _expect_shape("v_win", v_win, (B, HKV, T, Dv), "[B, HKV, T, Dv]")
        named += [("k_win", k_win), ("v_win", v_win)]
    for name, x in named:
        if name != "gates" and x.dtype != q.dtype:
            raise ValueError(f"{name} must have q's dtype {q.dtype}, got {x.dtype}")
        if x.device != q.device:
            raise ValueError(f"{name} must be on q's device {q.device}, got {x.device}")
    return dataclasses.replace(dims, v_dim=Dv)


def check_block_indices(block_indices, dims: Dims, config: NSAConfig) -> None:
    """``block_indices``: integer ``[B, HKV, T, n]``, values in ``[-1, NB)``; checked on the host
    only when the tensor lives on the CPU (a device check would be a host sync)."""
    _check_tensor("block_indices", block_indices, float_only=False)
    if block_indices.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"block_indices must be int32 or int64, got {block_indices.dtype}")
    expected = (dims.batch, dims.kv_heads, dims.seq_len, config.num_selected)
    _expect_shape("block_indices", block_indices, expected, "[B, HKV, T, n]")
    if block_indices.device.type == "cpu" and block_indices.numel() and not torch.compiler.is_compiling():
        nb = config.num_blocks(dims.seq_len)
        lo, hi = int(block_indices.min()), int(block_indices.max())
        if lo < -1 or hi >= nb:
            raise ValueError(f"block_indices values must lie in [-1, {nb}), got range [{lo}, {hi}]")
