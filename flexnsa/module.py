"""``NativeSparseAttention``: the NSA attention layer (projections, RoPE, phi, gates, three branches)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from . import functional
from ._checks import check_config, check_scale
from .compressor import COMPRESSOR_KINDS, Compressor
from .cache import NSACache
from .config import NSAConfig
from .decode import nsa_decode, nsa_prefill
from .rope import RotaryEmbedding

__all__ = ["NativeSparseAttention", "KV_SHARING"]

KV_SHARING = ("none", "all")


def _positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


class NativeSparseAttention(nn.Module):
    """Causal self-attention with DeepSeek's Native Sparse Attention (NSA_SPEC.md).

    For ``x [B, T, dim]``:

    1. ``q = rope(x Wq, t)``: ``[B, HQ, T, Dk]``.
    2. Keys and values per branch ``b`` in (cmp, slc, win): ``k_b = x Wk_b``, ``v_b = x Wv_b``
       (``[B, HKV, T, Dk]``, ``[B, HKV, T, Dv]``). With ``kv_sharing="none"`` (default, the paper's choice)
       every branch has its own projection; with ``"all"`` one projection serves the three branches.
       When ``config.window == 0`` the window branch is off and gets no projection.
    3. Compression: ``k_cmp = rope(phi_k(k_cmp_raw), i*d + l - 1)``, ``v_cmp = phi_v(v_cmp_raw)``
       (``[B, HKV, Tc, D]``), with two :class:`Compressor` instances (separate parameters for keys and values).
    4. ``k_slc``, ``k_win`` get RoPE at their token positions; values never do.
    5. Gates ``g = sigmoid(x Wg + bg)``: ``[B, HQ, T, 3]`` in the order (cmp, slc, win), one per head and token.
    6. ``o = flexnsa.nsa_attention(q, k_slc, v_slc, k_cmp, v_cmp, g, config, k_win=k_win, v_win=v_win)``
       then ``y = o Wo`` (``[B, T, dim]``). Under autocast the projections run in the autocast dtype and
       ``nsa_attention`` is called with autocast off, so that its softmax statistics stay in float32.

    Position of compressed keys (the paper leaves it open): ``phi_k`` reads the keys *before* RoPE and the
    compressed key ``i`` is then rotated at ``i*d + l - 1``, the position of the last raw token it
    summarises (the first query position that may see it). Compressing post-RoPE keys would feed ``phi`` a
    rotation that changes with the absolute position of the block, so the scores ``q_t . k_cmp[i]`` would not
    depend on ``t - i*d`` alone; rotating afterwards keeps attention scores relative in all three branches.

    Initialisation (:meth:`reset_parameters`): ``Wq``, ``Wk_b``, ``Wv_b ~ N(0, 1/dim)``;
    ``Wo ~ N(0, out_init_scale^2 / (HQ*Dv))`` (a stack of ``L`` layers passes ``1/sqrt(2L)``);
    ``Wg ~ N(0, 0.01/dim)`` (gate logits start with standard deviation ~0.1 for unit-scale ``x``) and
    ``bg = gate_bias`` (0 gives gates near 1/2; a 3-tuple sets (cmp, slc, win) separately); all projection
    biases zero; ``phi`` as documented in :class:`Compressor`.

    Args:
        dim: model width.
        num_heads: ``HQ``, query heads.
        num_kv_heads: ``HKV`` (divides ``HQ``); ``num_heads`` when None.
        head_dim: ``Dk = Dv``; ``dim // num_heads`` when None.
        qk_head_dim, v_head_dim: ``Dk`` and ``Dv`` separately (each defaults to ``head_dim``).
        config: :class:`NSAConfig`; the paper's defaults when None.
        kv_sharing: ``"none"`` (independent K/V per branch) or ``"all"`` (one K/V for all branches).
        compress: the kind of ``phi``: ``"mlp"`` (default), ``"linear"`` or ``"mean"``.
        compress_hidden_dim: hidden width of the ``"mlp"`` phi (``4 * D`` when None).
        rope: apply rotary embeddings (``Dk`` must be even); ``rope_base`` is its base.
        bias: biases on the q/k/v/output projections (the gate always has one).
        scale: softmax scale, ``1/sqrt(Dk)`` when None.
        gate_bias: initial gate bias, a float or a (cmp, slc, win) triple.
        out_init_scale: multiplies the standard deviation of the output projection at initialisation.
        backend: passed through to :func:`flexnsa.nsa_attention` (``"auto"`` by default).

    Shapes: ``forward(x [B, T, dim]) -> [B, T, dim]`` in the projections' output dtype.
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
        config: NSAConfig | None = None,
        kv_sharing: str = "none",
        compress: str = "mlp",
        compress_hidden_dim: int | None = None,
        rope: bool = True,
        rope_base: float = 10000.0,
        bias: bool = False,
        scale: float | None = None,
        gate_bias: float | Sequence[float] = 0.0,
        out_init_scale: float = 1.0,
        backend: str = "auto",
    ):
        super().__init__()
        dim = _positive_int("dim", dim)
        num_heads = _positive_int("num_heads", num_heads)
        num_kv_heads = num_heads if num_kv_heads is None else _positive_int("num_kv_heads", num_kv_heads)
        if num_heads % num_kv_heads:
            raise ValueError(f"num_kv_heads ({num_kv_heads}) must divide num_heads ({num_heads})")
        if head_dim is None and (qk_head_dim is None or v_head_dim is None):
            if dim % num_heads:
                raise ValueError(f"num_heads ({num_heads}) must divide dim ({dim}) unless head dims are given")
            head_dim = dim // num_heads
        qk_head_dim = _positive_int("qk_head_dim", qk_head_dim if qk_head_dim is not None else head_dim)
        v_head_dim = _positive_int("v_head_dim", v_head_dim if v_head_dim is not None else head_dim)
        config = check_config(config)
        if kv_sharing not in KV_SHARING:
            raise ValueError(f"kv_sharing must be one of {KV_SHARING}, got {kv_sharing!r}")
        if compress not in COMPRESSOR_KINDS:
            raise ValueError(f"compress must be one of {COMPRESSOR_KINDS}, got {compress!r}")
        if rope and qk_head_dim % 2:
            raise ValueError(f"qk_head_dim must be even when rope=True, got {qk_head_dim}")
        check_scale(scale)
        if backend not in functional.BACKENDS:
            raise ValueError(f"backend must be one of {functional.BACKENDS}, got {backend!r}")
        if isinstance(gate_bias, (int, float)) and not isinstance(gate_bias, bool):
            gate_bias = (float(gate_bias),) * 3
        gate_bias = tuple(float(b) for b in gate_bias)
        if len(gate_bias) != 3 or not all(math.isfinite(b) for b in gate_bias):
            raise ValueError(f"gate_bias must be a finite float or a (cmp, slc, win) triple, got {gate_bias!r}")

        self.dim = dim
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.qk_head_dim = qk_head_dim
        self.v_head_dim = v_head_dim
        self.config = config
        self.kv_sharing = kv_sharing
        self.scale = scale
        self.gate_bias = gate_bias
        self.out_init_scale = float(out_init_scale)
        self.backend = backend
        # Branches with their own K/V projection, in the order of kv_proj's output features.
        if kv_sharing == "all":
            self.kv_branches = ("shared",)
        elif config.window > 0:
            self.kv_branches = ("cmp", "slc", "win")
        else:
            self.kv_branches = ("cmp", "slc")

        kv_width = num_kv_heads * (qk_head_dim + v_head_dim)
        self.q_proj = nn.Linear(dim, num_heads * qk_head_dim, bias=bias)
        # [keys HKV*Dk | values HKV*Dv] for each branch of self.kv_branches, in that order
        self.kv_proj = nn.Linear(dim, len(self.kv_branches) * kv_width, bias=bias)
        self.gate_proj = nn.Linear(dim, num_heads * 3, bias=True)
        self.o_proj = nn.Linear(num_heads * v_head_dim, dim, bias=bias)
        self.k_compressor = Compressor(qk_head_dim, config, compress, compress_hidden_dim)
        self.v_compressor = Compressor(v_head_dim, config, compress, compress_hidden_dim)
        self.rotary = RotaryEmbedding(qk_head_dim, rope_base) if rope else None
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Initialises the parameters as documented in the class docstring."""
        for proj in (self.q_proj, self.kv_proj):
            nn.init.normal_(proj.weight, std=self.dim**-0.5)
        nn.init.normal_(self.o_proj.weight, std=self.out_init_scale * self.o_proj.in_features**-0.5)
        nn.init.normal_(self.gate_proj.weight, std=0.1 * self.dim**-0.5)
        bias = torch.tensor(self.gate_bias, dtype=self.gate_proj.bias.dtype)
        self.gate_proj.bias.copy_(bias.repeat(self.num_heads))  # [HQ*3], per head (cmp, slc, win)
        for proj in (self.q_proj, self.kv_proj, self.o_proj):
            if proj.bias is not None:
                nn.init.zeros_(proj.bias)
        self.k_compressor.reset_parameters()
        self.v_compressor.reset_parameters()

    # ---- pieces of the forward pass -------------------------------------------------------------
    def _heads(self, x: torch.Tensor, heads: int) -> torch.Tensor:
        """``[B, T, heads * D] -> [B, heads, T, D]``."""
        return x.unflatten(-1, (heads, -1)).transpose(1, 2)

    def _rope(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return x if self.rotary is None else self.rotary(x, positions)

    def compress(
        self, k_blocks: torch.Tensor, v_blocks: torch.Tensor, ends: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Compressed keys and values of raw groups: ``rope(phi_k(k_blocks), ends)``, ``phi_v(v_blocks)``.

        ``k_blocks [B, HKV, M, l, Dk]`` and ``v_blocks [B, HKV, M, l, Dv]`` hold pre-RoPE keys and values of
        the compressed branch; ``ends [M]`` is the position of each group's last token (``i*d + l - 1``).
        Returns ``[B, HKV, M, Dk]``, ``[B, HKV, M, Dv]``. This is the ``compress`` callable that
        :meth:`flexnsa.cache.NSACache.append` takes (its raw compressed-branch input must then be this
        module's pre-RoPE projection).
        """
        k_cmp = self._rope(self.k_compressor.compress_blocks(k_blocks), ends)  # [B, HKV, M, Dk]
        return k_cmp, self.v_compressor.compress_blocks(v_blocks)  # [B, HKV, M, Dv]

    def branch_inputs(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """The arguments of :func:`flexnsa.nsa_attention` computed from ``x [B, T, dim]``.

        Returns a dict with ``q, k, v, k_cmp, v_cmp, gates, k_win, v_win`` (``k, v`` are the selection
        branch's), shaped as NSA_SPEC.md states.
        """
        inputs, _ = self._project(x, torch.arange(x.shape[1], device=x.device), with_compressed=True)
        return inputs

    def _project(self, x: torch.Tensor, positions: torch.Tensor, with_compressed: bool):
        """Projections of ``x [B, T, dim]`` at ``positions [T]``: the ``nsa_attention`` arguments (without
        ``k_cmp, v_cmp`` unless ``with_compressed``, which needs ``positions = 0 .. T-1``) and phi's raw
        pre-RoPE input ``(k_cmp_raw [B, HKV, T, Dk], v_cmp_raw [B, HKV, T, Dv])``."""
        HQ, HKV, Dk, Dv = self.num_heads, self.num_kv_heads, self.qk_head_dim, self.v_head_dim
        l, d = self.config.cmp_block, self.config.cmp_stride
        q = self._rope(self._heads(self.q_proj(x), HQ), positions)  # [B, HQ, T, Dk]

        kv = self.kv_proj(x).split([HKV * Dk, HKV * Dv] * len(self.kv_branches), dim=-1)
        raw = {
            name: (self._heads(kv[2 * i], HKV), self._heads(kv[2 * i + 1], HKV))  # [B, HKV, T, Dk], [.., Dv]
            for i, name in enumerate(self.kv_branches)
        }
        shared = raw.get("shared")
        k_cmp_raw, v_cmp_raw = raw.get("cmp", shared)
        k_slc_raw, v_slc = raw.get("slc", shared)
        k_slc = self._rope(k_slc_raw, positions)  # [B, HKV, T, Dk]
        if "win" in raw:
            k_win = self._rope(raw["win"][0], positions)  # [B, HKV, T, Dk]
            v_win = raw["win"][1]  # [B, HKV, T, Dv]
        else:  # shared K/V, or the window branch is off (window == 0): it reads the selection K/V
            k_win, v_win = k_slc, v_slc
        gates = torch.sigmoid(self.gate_proj(x)).unflatten(-1, (HQ, 3)).transpose(1, 2)  # [B, HQ, T, 3]
        dtype = q.dtype
        inputs = dict(q=q, k=k_slc.to(dtype), v=v_slc.to(dtype), gates=gates, k_win=k_win.to(dtype), v_win=v_win.to(dtype))
        if with_compressed:
            ends = torch.arange(self.config.num_cmp_tokens(x.shape[1]), device=x.device) * d + (l - 1)  # [Tc]
            k_cmp, v_cmp = self.compress(
                self.k_compressor.blocks(k_cmp_raw), self.v_compressor.blocks(v_cmp_raw), ends
            )  # [B, HKV, Tc, Dk], [B, HKV, Tc, Dv]
            inputs.update(k_cmp=k_cmp.to(dtype), v_cmp=v_cmp.to(dtype))
        return inputs, (k_cmp_raw.to(dtype), v_cmp_raw.to(dtype))

    # ---- decoding ----------------------------------------------------------------------------------
    def new_cache(self, batch_size: int, max_len: int, num_layers: int = 1, dtype=None, device=None) -> NSACache:
        """An empty :class:`flexnsa.NSACache` laid out for this module (``num_layers`` such layers):
        window K/V kept separately when the window branch has its own projection, phi's pre-RoPE input
        kept for the compressed tokens still to come."""
        weight = self.q_proj.weight
        return NSACache(
            self.config, num_layers, batch_size, self.num_kv_heads, max_len, self.qk_head_dim, self.v_head_dim,
            share_window_kv="win" not in self.kv_branches, separate_cmp_raw=True,
            dtype=weight.dtype if dtype is None else dtype, device=weight.device if device is None else device,
        )

    def _forward_cached(self, x: torch.Tensor, cache: NSACache, layer_idx: int, prefill: bool) -> torch.Tensor:
        """Prefill (fills the cache, full-sequence NSA) or a step of ``T_new`` tokens after the cache's."""
        if prefill:
            inputs, (k_raw, v_raw) = self._project(x, torch.arange(x.shape[1], device=x.device), True)
            if cache.share_window_kv:  # the window branch reads the selection K/V
                del inputs["k_win"], inputs["v_win"]
            return nsa_prefill(**inputs, cache=cache, layer_idx=layer_idx, k_cmp_raw=k_raw, v_cmp_raw=v_raw,
                               config=self.config, scale=self.scale)
        positions = cache.next_positions(x.shape[1], layer_idx)  # [T_new], on the device: no host sync
        inputs, (k_raw, v_raw) = self._project(x, positions, False)
        win = {} if cache.share_window_kv else dict(k_win=inputs["k_win"], v_win=inputs["v_win"])
        return nsa_decode(inputs["q"], inputs["k"], inputs["v"], inputs["gates"], cache, layer_idx, self.compress,
                          **win, k_cmp_raw=k_raw, v_cmp_raw=v_raw, config=self.config, scale=self.scale)

    def forward(self, x: torch.Tensor, mask_mod=None, cache: NSACache | None = None, layer_idx: int = 0,
                prefill: bool = False) -> torch.Tensor:
        """``x [B, T, dim] -> [B, T, dim]``.

        ``mask_mod``: optional extra pattern over raw positions (FlexAttention's signature, e.g. a
        document mask for packed sequences), see :func:`flexnsa.nsa_attention`.
        ``cache`` (:meth:`new_cache`): with ``prefill=True`` the sequence is a prompt that fills layer
        ``layer_idx`` of the cache; otherwise ``x`` holds the ``T_new`` tokens that follow the cached ones
        (one token, or a few, attended causally), exactly as the full-sequence forward would compute them.
        """
        if not isinstance(x, torch.Tensor) or x.dim() != 3 or x.shape[-1] != self.dim:
            shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"x must be a tensor [B, T, dim={self.dim}], got {shape}")
        if x.shape[1] < 1:
            raise ValueError(f"x must hold at least one token, got shape {tuple(x.shape)}")
        if cache is not None:
            if mask_mod is not None:
                raise ValueError("mask_mod is not supported with a cache")
            with torch.autocast(x.device.type, enabled=False):
                o = self._forward_cached(x, cache, layer_idx, prefill)  # [B, HQ, T, Dv]
            return self.o_proj(o.transpose(1, 2).flatten(2))  # [B, T, dim]
        inputs = self.branch_inputs(x)
        # Autocast would run the attention's matrix products (and so its softmax statistics) in the low
        # dtype; with it off, the inputs keep autocast's dtype and the statistics stay in float32.
        with torch.autocast(x.device.type, enabled=False):
            o = functional.nsa_attention(
                **inputs, config=self.config, scale=self.scale, mask_mod=mask_mod, backend=self.backend
            )  # [B, HQ, T, Dv]
        return self.o_proj(o.transpose(1, 2).flatten(2))  # [B, T, dim]

    def extra_repr(self) -> str:
        c = self.config
        return (
            f"dim={self.dim}, num_heads={self.num_heads}, num_kv_heads={self.num_kv_heads}, "
            f"qk_head_dim={self.qk_head_dim}, v_head_dim={self.v_head_dim}, kv_sharing={self.kv_sharing!r}, "
            f"rope={self.rotary is not None}, backend={self.backend!r}, "
            f"config=(l={c.cmp_block}, d={c.cmp_stride}, l'={c.slc_block}, n={c.num_selected}, "
            f"init={c.num_init_blocks}, local={c.num_local_blocks}, w={c.window})"
        )
