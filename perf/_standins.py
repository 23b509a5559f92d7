"""Reference-backed stand-ins for pieces of flexnsa that are not built yet, for CPU dry runs only.

``report.py --cpu-smoke`` installs them so that every code path of the report (each stage, the
module) runs before a GPU run depends on it. Each stand-in has the signature its real piece will
have and is marked: the report notes which pieces were stand-ins. Never used on CUDA.
"""

from __future__ import annotations

import torch
from torch import nn

from _cases import Unavailable, _require
from _setup import ensure_flexnsa

ensure_flexnsa()
import flexnsa  # noqa: E402
from flexnsa import custom_ops, reference  # noqa: E402

__all__ = ["install_stand_ins"]


def _compressed_attention(q, k_cmp, v_cmp, config, scale=None, return_lse=False):
    o, lse = reference.compressed_attention(q, k_cmp, v_cmp, config, scale)
    return (o, lse) if return_lse else o


def _sliding_window_attention(q, k, v, window, scale=None):
    return reference.sliding_window_attention(q, k, v, window, scale)[0]


def _select_blocks(q, k_cmp, lse, config, scale=None):
    return reference.select_blocks(q, k_cmp, config, scale, lse)


def _selected_attention(q, k, v, indices, config, scale=None):
    return reference.selected_attention(q, k, v, indices, config, scale)


class _NativeSparseAttention(nn.Module):
    """Projections + mean-pooled compression + sigmoid gates around ``reference.nsa_attention``."""

    def __init__(self, dim, num_heads, num_kv_heads, head_dim, config=None, v_head_dim=None):
        super().__init__()
        self.config = config or flexnsa.NSAConfig()
        self.hq, self.hkv, self.dk = num_heads, num_kv_heads, head_dim
        self.dv = v_head_dim or head_dim
        self.q_proj = nn.Linear(dim, num_heads * self.dk, bias=False)
        self.kv_proj = nn.Linear(dim, num_kv_heads * (self.dk + self.dv), bias=False)
        self.gate_proj = nn.Linear(dim, num_heads * 3)
        self.o_proj = nn.Linear(num_heads * self.dv, dim, bias=False)

    def forward(self, x):  # x: [B, T, dim]
        B, T, _ = x.shape
        cfg = self.config
        q = self.q_proj(x).view(B, T, self.hq, self.dk).transpose(1, 2)  # [B, HQ, T, Dk]
        kv = self.kv_proj(x).view(B, T, self.hkv, self.dk + self.dv).transpose(1, 2)
        k, v = kv.split([self.dk, self.dv], dim=-1)  # [B, HKV, T, Dk], [B, HKV, T, Dv]
        Tc = cfg.num_cmp_tokens(T)
        starts = torch.arange(Tc, device=x.device) * cfg.cmp_stride
        idx = starts[:, None] + torch.arange(cfg.cmp_block, device=x.device)  # [Tc, l]
        k_cmp = k[:, :, idx].mean(dim=3)  # [B, HKV, Tc, Dk]
        v_cmp = v[:, :, idx].mean(dim=3)  # [B, HKV, Tc, Dv]
        gates = torch.sigmoid(self.gate_proj(x)).view(B, T, self.hq, 3).transpose(1, 2)  # [B, HQ, T, 3]
        o = reference.nsa_attention(q, k, v, k_cmp, v_cmp, gates, cfg)  # [B, HQ, T, Dv]
        return self.o_proj(o.transpose(1, 2).reshape(B, T, self.hq * self.dv))


def install_stand_ins() -> list[str]:
    """Fills the missing pieces with stand-ins; returns the names it filled."""
    filled = []
    for owner, name, stand_in in (
        (flexnsa, "compressed_attention", _compressed_attention),
        (flexnsa, "sliding_window_attention", _sliding_window_attention),
        (flexnsa, "NativeSparseAttention", _NativeSparseAttention),
        (custom_ops, "select_blocks", _select_blocks),
        (custom_ops, "selected_attention", _selected_attention),
    ):
        try:
            _require(owner, name, owner.__name__)
        except Unavailable:
            setattr(owner, name, stand_in)
            filled.append(f"{owner.__name__}.{name}")
    return filled
