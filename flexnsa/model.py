"""A small decoder-only language model on NativeSparseAttention, with a full-attention twin.

``NSALanguageModel(vocab_size, dim, num_layers, num_heads, ..., attention="nsa" | "full")``:
token embedding -> ``num_layers`` pre-norm blocks ``x + attn(norm(x))``, ``x + swiglu(norm(x))`` -> RMSNorm
-> logits (embedding tied to the output by default). ``attention="full"`` swaps every
:class:`NativeSparseAttention` for :class:`CausalSelfAttention`, causal softmax attention through
``F.scaled_dot_product_attention`` with the same width, heads, head dims and RoPE, for comparisons.

torch.compile: ``torch.compile(model, fullgraph=True)`` traces forward and backward without graph breaks
(tests/test_module.py). A call with the shapes, dtypes, device and grad mode of an earlier call reuses
its graph. What recompiles (measured with the reference backend, torch 2.13):

- the first call with a new sequence length ``T`` (or batch size): dynamo's automatic dynamic shapes
  then make that size symbolic, and later sizes reuse the symbolic graph, except
- ``T`` crossing a boundary the code branches on: ``T < l`` (no compressed token) and the number of
  selection blocks ``ceil(T / l')`` being below, equal to or above ``n`` (one graph per regime);
- a new dtype or device, switching between grad and ``no_grad``, a changed module attribute (``config``,
  ``backend``).

``torch.compile(..., dynamic=False)`` specialises every shape instead (one graph per ``T``);
``torch._dynamo.config.recompile_limit`` (8) bounds the graphs kept per function.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ._checks import check_config
from .config import NSAConfig
from .module import NativeSparseAttention, _positive_int
from .rope import RotaryEmbedding

__all__ = ["RMSNorm", "SwiGLU", "CausalSelfAttention", "Block", "NSALanguageModel"]


class RMSNorm(nn.Module):
    """``y = x / sqrt(mean(x^2) + eps) * weight`` over the last dim (statistics in float32)."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps).to(x.dtype)
        return y * self.weight.to(x.dtype)

    def extra_repr(self) -> str:
        return f"dim={self.weight.shape[0]}, eps={self.eps}"


class SwiGLU(nn.Module):
    """``y = W_down (silu(W_gate x) * (W_up x))``; ``W_gate`` and ``W_up`` are fused into one Linear.

    ``hidden_dim`` defaults to ``8/3 * dim`` rounded up to a multiple of 16 (the parameter count of a
    ``4 * dim`` GELU MLP).
    """

    def __init__(self, dim: int, hidden_dim: int | None = None, out_init_scale: float = 1.0):
        super().__init__()
        hidden_dim = hidden_dim or 16 * math.ceil(8 * dim / 3 / 16)
        self.hidden_dim = hidden_dim
        self.gate_up = nn.Linear(dim, 2 * hidden_dim, bias=False)
        self.down = nn.Linear(hidden_dim, dim, bias=False)
        nn.init.normal_(self.gate_up.weight, std=dim**-0.5)
        nn.init.normal_(self.down.weight, std=out_init_scale * hidden_dim**-0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up(x).chunk(2, dim=-1)  # [B, T, hidden] each
        return self.down(F.silu(gate) * up)


class CausalSelfAttention(nn.Module):
    """Full causal softmax attention of the same shape as :class:`NativeSparseAttention` (one K/V set).

    ``q = rope(x Wq)``, ``k = rope(x Wk)``, ``v = x Wv``, ``o = SDPA(q, k, v, causal, GQA)``, ``y = o Wo``;
    initialised like NativeSparseAttention (``N(0, 1/dim)`` in, ``N(0, out_init_scale^2 / (HQ*Dv))`` out).
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        num_kv_heads: int | None = None,
        head_dim: int | None = None,
        *,
        qk_head_dim: int | None = None,
        v_head_dim: int | None = None,
        rope: bool = True,
        rope_base: float = 10000.0,
        scale: float | None = None,
        out_init_scale: float = 1.0,
    ):
        super().__init__()
        num_kv_heads = num_kv_heads or num_heads
        if num_heads % num_kv_heads:
            raise ValueError(f"num_kv_heads ({num_kv_heads}) must divide num_heads ({num_heads})")
        if head_dim is None and (qk_head_dim is None or v_head_dim is None):
            head_dim = dim // num_heads
        self.num_heads, self.num_kv_heads = num_heads, num_kv_heads
        self.qk_head_dim = _positive_int("qk_head_dim", qk_head_dim or head_dim)
        self.v_head_dim = _positive_int("v_head_dim", v_head_dim or head_dim)
        self.scale = scale
        self.q_proj = nn.Linear(dim, num_heads * self.qk_head_dim, bias=False)
        self.kv_proj = nn.Linear(dim, num_kv_heads * (self.qk_head_dim + self.v_head_dim), bias=False)
        self.o_proj = nn.Linear(num_heads * self.v_head_dim, dim, bias=False)
        self.rotary = RotaryEmbedding(self.qk_head_dim, rope_base) if rope else None
        nn.init.normal_(self.q_proj.weight, std=dim**-0.5)
        nn.init.normal_(self.kv_proj.weight, std=dim**-0.5)
        nn.init.normal_(self.o_proj.weight, std=out_init_scale * self.o_proj.in_features**-0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, _ = x.shape
        HQ, HKV, Dk = self.num_heads, self.num_kv_heads, self.qk_head_dim
        q = self.q_proj(x).unflatten(-1, (HQ, Dk)).transpose(1, 2)  # [B, HQ, T, Dk]
        k, v = self.kv_proj(x).split([HKV * Dk, HKV * self.v_head_dim], dim=-1)
        k = k.unflatten(-1, (HKV, Dk)).transpose(1, 2)  # [B, HKV, T, Dk]
        v = v.unflatten(-1, (HKV, self.v_head_dim)).transpose(1, 2)  # [B, HKV, T, Dv]
        if self.rotary is not None:
            positions = torch.arange(T, device=x.device)
            q, k = self.rotary(q, positions), self.rotary(k, positions)
        o = F.scaled_dot_product_attention(
            q, k, v, is_causal=True, scale=self.scale, enable_gqa=HQ != HKV
        )  # [B, HQ, T, Dv]
        return self.o_proj(o.transpose(1, 2).flatten(2))  # [B, T, dim]


class Block(nn.Module):
    """Pre-norm transformer block: ``x + attn(norm(x))`` then ``x + swiglu(norm(x))``."""

    def __init__(self, dim: int, attn: nn.Module, mlp_hidden_dim: int | None, out_init_scale: float):
        super().__init__()
        self.attn_norm = RMSNorm(dim)
        self.attn = attn
        self.mlp_norm = RMSNorm(dim)
        self.mlp = SwiGLU(dim, mlp_hidden_dim, out_init_scale)

    def forward(self, x: torch.Tensor, mask_mod=None, cache=None, layer_idx: int = 0, prefill: bool = False):
        attn_in = self.attn_norm(x)
        if mask_mod is None and cache is None:
            x = x + self.attn(attn_in)
        else:  # NSA layers only (the model checks)
            x = x + self.attn(attn_in, mask_mod=mask_mod, cache=cache, layer_idx=layer_idx, prefill=prefill)
        return x + self.mlp(self.mlp_norm(x))


class NSALanguageModel(nn.Module):
    """Decoder-only language model whose attention layers are NativeSparseAttention (or full attention).

    Args:
        vocab_size: number of token ids.
        dim, num_layers, num_heads, num_kv_heads, head_dim, qk_head_dim, v_head_dim: sizes; head dims default
            to ``dim // num_heads``, ``num_kv_heads`` to ``num_heads``.
        config: :class:`NSAConfig` of every NSA layer (paper defaults when None).
        attention: ``"nsa"`` or ``"full"`` (causal SDPA of the same size, for comparisons).
        mlp_hidden_dim: SwiGLU width (``8/3 * dim`` rounded up to a multiple of 16 when None).
        tie_embeddings: share the token embedding with the output layer (default True).
        **nsa_kwargs: further :class:`NativeSparseAttention` arguments (``kv_sharing``, ``compress``,
            ``compress_hidden_dim``, ``gate_bias``, ``backend``, ``rope``, ``rope_base``, ...).

    Initialisation: embedding ``N(0, 1/dim)`` (so tied logits start with unit scale); attention and MLP
    input projections ``N(0, 1/fan_in)``; the two projections that write into the residual stream (attention
    output, MLP down) additionally scaled by ``1/sqrt(2 * num_layers)``; norms 1.

    Shapes: ``forward(tokens int [B, T]) -> logits [B, T, vocab_size]`` (float32 under autocast too).
    """

    def __init__(
        self,
        vocab_size: int,
        dim: int = 256,
        num_layers: int = 2,
        num_heads: int = 4,
        num_kv_heads: int | None = None,
        head_dim: int | None = None,
        *,
        qk_head_dim: int | None = None,
        v_head_dim: int | None = None,
        config: NSAConfig | None = None,
        attention: str = "nsa",
        mlp_hidden_dim: int | None = None,
        tie_embeddings: bool = True,
        **nsa_kwargs,
    ):
        super().__init__()
        vocab_size = _positive_int("vocab_size", vocab_size)
        dim = _positive_int("dim", dim)
        num_layers = _positive_int("num_layers", num_layers)
        if attention not in ("nsa", "full"):
            raise ValueError(f"attention must be 'nsa' or 'full', got {attention!r}")
        self.config = check_config(config)
        self.attention = attention
        self.vocab_size = vocab_size
        out_scale = 1.0 / math.sqrt(2 * num_layers)
        heads = dict(
            num_kv_heads=num_kv_heads, head_dim=head_dim, qk_head_dim=qk_head_dim, v_head_dim=v_head_dim
        )

        def make_attention() -> nn.Module:
            if attention == "nsa":
                return NativeSparseAttention(
                    dim, num_heads, **heads, config=self.config, out_init_scale=out_scale, **nsa_kwargs
                )
            full_kwargs = {key: nsa_kwargs[key] for key in ("rope", "rope_base", "scale") if key in nsa_kwargs}
            return CausalSelfAttention(dim, num_heads, **heads, out_init_scale=out_scale, **full_kwargs)

        self.embed = nn.Embedding(vocab_size, dim)
        self.blocks = nn.ModuleList(Block(dim, make_attention(), mlp_hidden_dim, out_scale) for _ in range(num_layers))
        self.norm = RMSNorm(dim)
        self.lm_head = nn.Linear(dim, vocab_size, bias=False)
        nn.init.normal_(self.embed.weight, std=dim**-0.5)
        if tie_embeddings:
            self.lm_head.weight = self.embed.weight
        else:
            nn.init.normal_(self.lm_head.weight, std=dim**-0.5)

    def forward(self, tokens: torch.Tensor, mask_mod=None, cache=None, prefill: bool = False) -> torch.Tensor:
        """``tokens int [B, T] -> logits float32 [B, T, vocab]``. ``mask_mod``: optional extra attention
        pattern for the NSA layers (e.g. a document mask for packed sequences). ``cache``
        (:meth:`new_cache`): ``prefill=True`` runs a prompt and fills it; otherwise ``tokens`` follow the
        cached ones (see :meth:`generate`)."""
        if not isinstance(tokens, torch.Tensor) or tokens.dim() != 2 or tokens.is_floating_point():
            shape = tuple(tokens.shape) if isinstance(tokens, torch.Tensor) else type(tokens).__name__
            raise ValueError(f"tokens must be an integer tensor [B, T], got {shape}")
        if (mask_mod is not None or cache is not None) and self.attention != "nsa":
            raise ValueError("mask_mod and cache are supported with attention='nsa' only")
        x = self.embed(tokens)  # [B, T, dim]
        for layer_idx, block in enumerate(self.blocks):
            x = block(x, mask_mod, cache, layer_idx, prefill)
        return self.lm_head(self.norm(x)).float()  # [B, T, vocab]

    def new_cache(self, batch_size: int, max_len: int, dtype=None, device=None):
        """An empty :class:`flexnsa.NSACache` with one layer per block, up to ``max_len`` tokens."""
        if self.attention != "nsa":
            raise ValueError("new_cache needs attention='nsa'")
        return self.blocks[0].attn.new_cache(batch_size, max_len, len(self.blocks), dtype, device)

    @torch.no_grad()
    def generate(self, tokens: torch.Tensor, max_new_tokens: int, temperature: float = 0.0,
                 generator: torch.Generator | None = None) -> torch.Tensor:
        """Continues ``tokens int [B, T]`` by ``max_new_tokens``: one prefill of the prompt, then one
        cached decode step per token (greedy with ``temperature=0``, else sampling at that temperature).
        Returns ``int [B, T + max_new_tokens]``."""
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be an int >= 0, got {max_new_tokens!r}")
        if not temperature >= 0:
            raise ValueError(f"temperature must be >= 0, got {temperature!r}")
        cache = self.new_cache(tokens.shape[0], tokens.shape[1] + max_new_tokens)
        logits = self(tokens, cache=cache, prefill=True)[:, -1]  # [B, vocab]
        out = [tokens]
        for step in range(max_new_tokens):
            if temperature == 0:
                nxt = logits.argmax(-1, keepdim=True)  # [B, 1]
            else:
                probs = torch.softmax(logits / temperature, dim=-1)
                nxt = torch.multinomial(probs, 1, generator=generator)  # [B, 1]
            out.append(nxt)
            if step + 1 < max_new_tokens:
                logits = self(nxt, cache=cache)[:, -1]
        return torch.cat(out, dim=1)

    def extra_repr(self) -> str:
        return f"attention={self.attention!r}, vocab_size={self.vocab_size}"
