"""Rotary position embedding (RoPE) at arbitrary, possibly non-contiguous, positions.

For a head dim ``D`` (even) and a position ``p``, channel pair ``(x[i], x[i + D/2])`` is rotated by the
angle ``p * base ** (-2i / D)``, ``i < D/2`` (the "rotate half" layout of GPT-NeoX and Llama):

    rope(x, p)[i]       = x[i] cos(p w_i) - x[i + D/2] sin(p w_i)
    rope(x, p)[i + D/2] = x[i + D/2] cos(p w_i) + x[i] sin(p w_i)

so that ``rope(q, t) . rope(k, s)`` depends on ``t - s`` only. Angles and rotation are computed in float32
(float64 for float64 inputs) and the result is cast back to the input dtype. ``NativeSparseAttention``
rotates queries and raw keys at their token positions and compressed keys at the position of the last
raw token they summarise.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["RotaryEmbedding", "apply_rope"]


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotates ``x [..., T, D]`` by angles whose ``cos``/``sin`` are ``[T, D/2]``, computing in their dtype."""
    half = x.shape[-1] // 2
    x1 = x[..., :half].to(cos.dtype)  # [..., T, D/2]
    x2 = x[..., half:].to(cos.dtype)  # [..., T, D/2]
    rotated = torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)  # [..., T, D]
    return rotated.to(x.dtype)


class RotaryEmbedding(nn.Module):
    """RoPE with frequencies ``w_i = base ** (-2i / head_dim)``; no parameters, no buffers.

    ``forward(x, positions)`` rotates ``x [..., T, head_dim]`` at ``positions`` (``[T]``, any real
    values: integer token positions or the representative positions of compressed tokens).
    """

    def __init__(self, head_dim: int, base: float = 10000.0):
        super().__init__()
        if head_dim < 2 or head_dim % 2:
            raise ValueError(f"head_dim must be even and >= 2 for RoPE, got {head_dim}")
        if not base > 1.0:
            raise ValueError(f"rope base must be > 1, got {base}")
        self.head_dim = head_dim
        self.base = float(base)

    def angles(self, positions: torch.Tensor, dtype=torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
        """``cos``, ``sin`` of ``positions[:, None] * w[None, :]``, each ``[T, D/2]`` in ``dtype``.

        The frequencies are rebuilt here rather than kept in a buffer, so that casting the model to
        bfloat16 cannot round them.
        """
        exponent = torch.arange(0, self.head_dim, 2, dtype=dtype, device=positions.device)
        inv_freq = self.base ** (-exponent / self.head_dim)  # [D/2]
        theta = positions.to(dtype)[:, None] * inv_freq[None, :]  # [T, D/2]
        return torch.cos(theta), torch.sin(theta)

    def forward(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
        cos, sin = self.angles(positions, dtype)
        return apply_rope(x, cos, sin)

    def extra_repr(self) -> str:
        return f"head_dim={self.head_dim}, base={self.base:g}"
