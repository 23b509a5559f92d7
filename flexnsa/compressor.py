"""The learnable block compression ``phi`` of NSA's compressed branch (NSA_SPEC.md, branch 1).

Compressed token ``i`` summarises the raw tokens ``[i*d, i*d + l)``:

    x_cmp[i] = phi(x[i*d : i*d + l]),   i = 0 .. Tc(T) - 1,   Tc(T) = 0 if T < l else (T - l) // d + 1.

The blocks are read through ``x.unfold(2, l, d)``, a strided view of ``x`` (no copy, no loop over blocks):
consecutive blocks overlap by ``l - d`` tokens. Raw tokens after the last complete block (``T`` need not be
``l`` plus a multiple of ``d``) are not summarised yet; they are still seen by the other two branches.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ._checks import check_config
from .config import NSAConfig

__all__ = ["Compressor", "COMPRESSOR_KINDS"]

COMPRESSOR_KINDS = ("mlp", "linear", "mean")


class Compressor(nn.Module):
    """``phi``: maps overlapping blocks of ``l`` raw keys (or values) to one vector each.

    One instance compresses one kind of tensor; :class:`flexnsa.NativeSparseAttention` owns two, one for
    the keys and one for the values, so keys and values never share parameters (and may have different
    head dims). The parameters are shared by all heads.

    Kinds (``B`` batch, ``H`` heads, ``D = head_dim``, ``block = x[i*d : i*d + l]`` of shape ``[l, D]``):

    - ``"mlp"`` (default, the paper's "MLP with intra-block position encoding"):
      ``phi(block) = W2 act(W1 flatten(block + P) + b1) + b2`` with a learned position embedding
      ``P [l, D]``, ``W1 [hidden, l*D]``, ``W2 [D, hidden]``, ``act`` GELU. (Because ``W1`` acts on the
      flattened block, ``P`` is equivalent to an extra bias ``W1 flatten(P)``; it is kept so that the
      parameterisation is the paper's and so that ``P`` can be read off directly.)
    - ``"linear"``: ``phi(block) = W flatten(block) + b``, ``W [D, l*D]``; initialised to mean pooling.
    - ``"mean"``: ``phi(block) = mean of the l rows``; no parameters.

    Initialisation: ``P ~ N(0, 0.02^2)``; ``W1 ~ N(0, 1/(l*D))``, ``W2 ~ N(0, 1/hidden)``, biases zero, so
    that inputs of unit scale give hidden units and outputs of roughly unit scale; ``"linear"`` starts as
    exact mean pooling (``W[:, p*D + c] = e_c / l``).

    Args:
        head_dim: ``D``, the last dim of the tensors to compress.
        config: :class:`NSAConfig` (``l = cmp_block``, ``d = cmp_stride``); paper defaults when None.
        kind: ``"mlp"``, ``"linear"`` or ``"mean"``.
        hidden_dim: width of the MLP's hidden layer (``"mlp"`` only); ``4 * head_dim`` when None.

    Shapes: ``forward(x [B, H, T, D]) -> [B, H, Tc(T), D]`` in ``x``'s dtype (or autocast's).
    """

    def __init__(
        self,
        head_dim: int,
        config: NSAConfig | None = None,
        kind: str = "mlp",
        hidden_dim: int | None = None,
    ):
        super().__init__()
        config = check_config(config)
        if isinstance(head_dim, bool) or not isinstance(head_dim, int) or head_dim < 1:
            raise ValueError(f"head_dim must be a positive int, got {head_dim!r}")
        if kind not in COMPRESSOR_KINDS:
            raise ValueError(f"kind must be one of {COMPRESSOR_KINDS}, got {kind!r}")
        if hidden_dim is not None and kind != "mlp":
            raise ValueError(f"hidden_dim applies to kind='mlp' only, got kind={kind!r}")
        hidden_dim = 4 * head_dim if hidden_dim is None else hidden_dim
        if isinstance(hidden_dim, bool) or not isinstance(hidden_dim, int) or hidden_dim < 1:
            raise ValueError(f"hidden_dim must be a positive int, got {hidden_dim!r}")
        self.head_dim = head_dim
        self.block = config.cmp_block  # l
        self.stride = config.cmp_stride  # d
        self.kind = kind
        self.hidden_dim = hidden_dim if kind == "mlp" else 0
        flat = self.block * head_dim
        if kind == "mlp":
            self.pos_emb = nn.Parameter(torch.empty(self.block, head_dim))  # [l, D]
            self.fc1 = nn.Linear(flat, hidden_dim)
            self.act = nn.GELU()
            self.fc2 = nn.Linear(hidden_dim, head_dim)
        elif kind == "linear":
            self.proj = nn.Linear(flat, head_dim)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Re-initialises the parameters as documented in the class docstring."""
        if self.kind == "mlp":
            nn.init.normal_(self.pos_emb, std=0.02)
            nn.init.normal_(self.fc1.weight, std=1.0 / math.sqrt(self.fc1.in_features))
            nn.init.zeros_(self.fc1.bias)
            nn.init.normal_(self.fc2.weight, std=1.0 / math.sqrt(self.hidden_dim))
            nn.init.zeros_(self.fc2.bias)
        elif self.kind == "linear":
            eye = torch.eye(self.head_dim, device=self.proj.weight.device, dtype=self.proj.weight.dtype)
            self.proj.weight.copy_(eye.repeat(1, self.block) / self.block)  # [D, l*D]
            nn.init.zeros_(self.proj.bias)

    def blocks(self, x: torch.Tensor) -> torch.Tensor:
        """The overlapping blocks of ``x [B, H, T, D]`` as a strided view ``[B, H, Tc, l, D]``.

        ``T < l`` gives an empty ``Tc = 0`` view (``unfold`` refuses windows longer than the input).
        """
        B, H, T, D = x.shape
        if T < self.block:
            return x[:, :, :0, None, :].expand(B, H, 0, self.block, D)  # [B, H, 0, l, D]
        return x.unfold(2, self.block, self.stride).transpose(-1, -2)  # [B, H, Tc, l, D]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not isinstance(x, torch.Tensor) or x.dim() != 4:
            shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"x must be a 4-D tensor [B, H, T, D], got {shape}")
        if x.shape[-1] != self.head_dim:
            raise ValueError(f"x must have head dim {self.head_dim} (last dim), got shape {tuple(x.shape)}")
        if not x.is_floating_point():
            raise ValueError(f"x must be a floating-point tensor, got {x.dtype}")
        return self.compress_blocks(self.blocks(x))  # [B, H, Tc, D]

    def compress_blocks(self, blocks: torch.Tensor) -> torch.Tensor:
        """``phi`` on blocks already cut out: ``[..., l, D] -> [..., D]`` (e.g. the groups that a decoding
        cache completes, ``[B, HKV, M, l, D]``)."""
        if blocks.dim() < 2 or tuple(blocks.shape[-2:]) != (self.block, self.head_dim):
            raise ValueError(
                f"blocks must have shape [..., l={self.block}, D={self.head_dim}], got {tuple(blocks.shape)}"
            )
        if self.kind == "mean":
            return blocks.mean(dim=-2)  # [..., D]
        if self.kind == "linear":
            return self.proj(blocks.flatten(-2))  # [..., D]
        flat = (blocks + self.pos_emb.to(blocks.dtype)).flatten(-2)  # [..., l*D]
        return self.fc2(self.act(self.fc1(flat)))  # [..., D]

    def extra_repr(self) -> str:
        text = f"kind={self.kind!r}, head_dim={self.head_dim}, block={self.block}, stride={self.stride}"
        if self.kind == "mlp":
            text += f", hidden_dim={self.hidden_dim}"
        return text
