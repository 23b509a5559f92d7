"""``NSACache``: the preallocated key/value cache of NSA decoding.

Per layer the cache holds, in buffers allocated once to a maximum length:

- ``k, v``        ``[B, HKV, max_len, Dk|Dv]``: raw keys/values of the selection branch;
- ``k_win, v_win`` ``[B, HKV, max_len, Dk|Dv]``: the window branch's (the same tensors as ``k, v``
  when ``share_window_kv=True``);
- ``k_cmp, v_cmp`` ``[B, HKV, max_cmp, Dk|Dv]`` with ``max_cmp = Tc(max_len)``: compressed tokens,
  token ``i`` summarising raw tokens ``[i*d, i*d + l)``;
- ``k_cmp_raw, v_cmp_raw`` ``[B, HKV, max_len, Dk|Dv]``: the raw input of ``phi`` when it is not the
  selection branch's ``k, v`` (``separate_cmp_raw=True``; e.g. the module compresses its own
  projection, before RoPE); otherwise the same tensors as ``k, v``;
- ``lengths[layer]``: the number of tokens held, an int64 device tensor.

Every write is at positions computed on the device from ``lengths``, and every shape depends only on
the buffers' capacity and the number of new tokens, never on the current length. An append is
therefore free of host syncs, works under ``torch.compile(fullgraph=True)`` and can be captured in a
CUDA graph and replayed step after step.

All batch entries share one length (the usual case of batched generation with left-aligned
prompts of equal length; ragged batches need per-entry lengths, not supported).

Compressed tokens are appended as soon as their raw group completes: compressed token ``i`` exists
once position ``i*d + l - 1`` is written, so after ``L`` tokens the cache holds ``Tc(L)`` of them,
exactly the ``k_cmp`` of a full-sequence forward over those ``L`` tokens. Because ``phi`` is
learnable, :meth:`NSACache.append` takes it as a callable ``compress`` (see there).
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import torch

from ._checks import FLOAT_DTYPES, _check_tensor, _expect_shape
from .config import NSAConfig

__all__ = ["NSACache", "LayerCache", "CompressFn"]

CompressFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
"""``compress(k_blocks [B, HKV, M, l, Dk], v_blocks [B, HKV, M, l, Dv], ends int64 [M]) ->
(k_cmp [B, HKV, M, Dk], v_cmp [B, HKV, M, Dv])``: ``phi_k``/``phi_v`` applied to ``M`` raw groups of
``l`` tokens each; ``ends[m] = i_m*d + l - 1`` is the position of group ``m``'s last token (where
the module rotates compressed keys). A full-sequence compressor ``[B, H, T, D] -> [B, H, Tc(T), D]``
serves by folding ``M`` into the heads: ``phi(blocks.flatten(1, 2)).view(B, HKV, M, D)``
(``Tc(l) = 1``)."""


@dataclasses.dataclass
class LayerCache:
    """The buffers of one layer (see the module docstring for their meaning)."""

    k: torch.Tensor  # [B, HKV, max_len, Dk]
    v: torch.Tensor  # [B, HKV, max_len, Dv]
    k_win: torch.Tensor  # [B, HKV, max_len, Dk], k itself when shared
    v_win: torch.Tensor  # [B, HKV, max_len, Dv], v itself when shared
    cmp_k_buf: torch.Tensor  # [B, HKV, max_cmp + 1, Dk]: the last row is a write-only scratch row
    cmp_v_buf: torch.Tensor  # [B, HKV, max_cmp + 1, Dv]
    k_cmp_raw: torch.Tensor  # [B, HKV, max_len, Dk], k itself unless separate_cmp_raw
    v_cmp_raw: torch.Tensor  # [B, HKV, max_len, Dv], v itself unless separate_cmp_raw

    @property
    def k_cmp(self) -> torch.Tensor:
        """``[B, HKV, max_cmp, Dk]`` compressed keys (rows ``>= Tc(length)`` are stale or zero)."""
        return self.cmp_k_buf[:, :, :-1]

    @property
    def v_cmp(self) -> torch.Tensor:
        """``[B, HKV, max_cmp, Dv]`` compressed values."""
        return self.cmp_v_buf[:, :, :-1]


class NSACache:
    """Preallocated per-layer NSA key/value cache with an on-device length counter.

    Args:
        config: the layers' :class:`NSAConfig` (``l``, ``d`` decide when compressed tokens appear).
        num_layers: number of attention layers.
        batch_size: ``B``; all entries share one length.
        num_kv_heads: ``HKV``.
        max_len: capacity in tokens (prompt plus generated tokens).
        qk_dim: ``Dk``; v_dim: ``Dv`` (``Dk`` when None).
        share_window_kv: the window branch reads the selection branch's ``k, v`` (no extra buffers).
        separate_cmp_raw: ``phi`` reads its own raw keys/values (``k_cmp_raw``/``v_cmp_raw`` of
            :meth:`prefill` and :meth:`append`) instead of the selection branch's ``k, v``.
        dtype, device: of the buffers (the model's activations).

    Buffers start zeroed, so the pure-PyTorch decode path, which masks the whole capacity, never
    multiplies a zero weight by a non-finite stale value.
    """

    def __init__(
        self,
        config: NSAConfig,
        num_layers: int,
        batch_size: int,
        num_kv_heads: int,
        max_len: int,
        qk_dim: int,
        v_dim: int | None = None,
        *,
        share_window_kv: bool = False,
        separate_cmp_raw: bool = False,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ) -> None:
        if not isinstance(config, NSAConfig):
            raise ValueError(f"config must be a flexnsa.NSAConfig, got {type(config).__name__}")
        v_dim = qk_dim if v_dim is None else v_dim
        for name, value in (
            ("num_layers", num_layers),
            ("batch_size", batch_size),
            ("num_kv_heads", num_kv_heads),
            ("max_len", max_len),
            ("qk_dim", qk_dim),
            ("v_dim", v_dim),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if dtype not in FLOAT_DTYPES:
            raise ValueError(f"dtype must be float16, bfloat16, float32 or float64, got {dtype}")
        self.config = config
        self.num_layers = num_layers
        self.batch_size = batch_size
        self.num_kv_heads = num_kv_heads
        self.max_len = max_len
        self.qk_dim = qk_dim
        self.v_dim = v_dim
        self.share_window_kv = bool(share_window_kv)
        self.separate_cmp_raw = bool(separate_cmp_raw)
        self.dtype = dtype
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.max_cmp = config.num_cmp_tokens(max_len)
        self.layers = [self._allocate_layer() for _ in range(num_layers)]
        self.lengths = torch.zeros(num_layers, dtype=torch.int64, device=self.device)  # [layers]
        self.device = self.lengths.device  # normalised: "cuda" -> cuda:<current index>

    def _allocate_layer(self) -> LayerCache:
        B, H, S, C = self.batch_size, self.num_kv_heads, self.max_len, self.max_cmp
        new = lambda rows, dim: torch.zeros(B, H, rows, dim, dtype=self.dtype, device=self.device)  # noqa: E731
        k, v = new(S, self.qk_dim), new(S, self.v_dim)
        if self.share_window_kv:
            k_win, v_win = k, v
        else:
            k_win, v_win = new(S, self.qk_dim), new(S, self.v_dim)
        if self.separate_cmp_raw:
            k_raw, v_raw = new(S, self.qk_dim), new(S, self.v_dim)
        else:
            k_raw, v_raw = k, v
        return LayerCache(k, v, k_win, v_win, new(C + 1, self.qk_dim), new(C + 1, self.v_dim), k_raw, v_raw)

    # ---- bookkeeping -----------------------------------------------------------------------
    def reset(self) -> None:
        """Empties every layer (the buffers keep their stale, finite content)."""
        self.lengths.zero_()

    def seq_len(self, layer_idx: int = 0) -> int:
        """Tokens held by a layer, as a Python int. A host sync: for eager code, not a decode loop."""
        self._check_layer(layer_idx)
        return int(self.lengths[layer_idx])

    def next_positions(self, num_new: int, layer_idx: int = 0) -> torch.Tensor:
        """int64 ``[num_new]`` positions the next ``num_new`` tokens will take (device, no sync);
        for rotary embeddings, read before layer ``layer_idx`` appends."""
        self._check_layer(layer_idx)
        return self.lengths[layer_idx] + torch.arange(num_new, device=self.device)

    def _check_layer(self, layer_idx) -> None:
        if isinstance(layer_idx, bool) or not isinstance(layer_idx, int):
            raise ValueError(f"layer_idx must be an int, got {layer_idx!r}")
        if not 0 <= layer_idx < self.num_layers:
            raise ValueError(f"layer_idx must lie in [0, {self.num_layers}), got {layer_idx}")

    def _check_kv(self, k, v, k_win, v_win, k_cmp_raw, v_cmp_raw, tokens_dim_name: str = "T_new") -> int:
        """Validates new raw keys/values; returns their token count."""
        _check_tensor("k", k)
        _check_tensor("v", v)
        B, H = self.batch_size, self.num_kv_heads
        T = k.shape[2]
        if T < 1:
            raise ValueError(f"k must hold at least one token, got shape {tuple(k.shape)}")
        _expect_shape("k", k, (B, H, T, self.qk_dim), f"[B, HKV, {tokens_dim_name}, Dk]")
        _expect_shape("v", v, (B, H, T, self.v_dim), f"[B, HKV, {tokens_dim_name}, Dv]")
        if (k_win is None) != (v_win is None):
            raise ValueError("k_win and v_win must be given together (or both left None)")
        if self.share_window_kv and k_win is not None:
            raise ValueError("k_win/v_win must be None: this cache shares the window branch's K/V")
        named = [("k", k), ("v", v)]
        if k_win is not None:
            _check_tensor("k_win", k_win)
            _check_tensor("v_win", v_win)
            _expect_shape("k_win", k_win, tuple(k.shape), f"[B, HKV, {tokens_dim_name}, Dk]")
            _expect_shape("v_win", v_win, tuple(v.shape), f"[B, HKV, {tokens_dim_name}, Dv]")
            named += [("k_win", k_win), ("v_win", v_win)]
        if self.separate_cmp_raw != (k_cmp_raw is not None) or (k_cmp_raw is None) != (v_cmp_raw is None):
            want = "given" if self.separate_cmp_raw else "None"
            raise ValueError(f"k_cmp_raw and v_cmp_raw must be {want}: the cache has separate_cmp_raw="
                             f"{self.separate_cmp_raw}")
        if k_cmp_raw is not None:
            _check_tensor("k_cmp_raw", k_cmp_raw)
            _check_tensor("v_cmp_raw", v_cmp_raw)
            _expect_shape("k_cmp_raw", k_cmp_raw, tuple(k.shape), f"[B, HKV, {tokens_dim_name}, Dk]")
            _expect_shape("v_cmp_raw", v_cmp_raw, tuple(v.shape), f"[B, HKV, {tokens_dim_name}, Dv]")
            named += [("k_cmp_raw", k_cmp_raw), ("v_cmp_raw", v_cmp_raw)]
        for name, x in named:
            if x.device != self.device:
                raise ValueError(f"{name} must be on the cache's device {self.device}, got {x.device}")
        return T

    def _check_capacity(self, layer_idx: int, num_new: int) -> None:
        """Overflow check on the host, only where it costs no device sync (CPU, eager)."""
        if num_new > self.max_len:
            raise ValueError(f"{num_new} new tokens exceed the cache's max_len={self.max_len}")
        if self.device.type == "cpu" and not torch.compiler.is_compiling():
            held = int(self.lengths[layer_idx])
            if held + num_new > self.max_len:
                raise ValueError(
                    f"appending {num_new} tokens to the {held} of layer {layer_idx} exceeds "
                    f"max_len={self.max_len}"
                )

    # ---- writes ----------------------------------------------------------------------------
    def prefill(
        self,
        layer_idx: int,
        k: torch.Tensor,
        v: torch.Tensor,
        k_cmp: torch.Tensor,
        v_cmp: torch.Tensor,
        *,
        k_win: torch.Tensor | None = None,
        v_win: torch.Tensor | None = None,
        k_cmp_raw: torch.Tensor | None = None,
        v_cmp_raw: torch.Tensor | None = None,
    ) -> None:
        """Makes layer ``layer_idx`` hold exactly a prompt of ``T`` tokens (whatever it held before).

        ``k [B, HKV, T, Dk]``, ``v [B, HKV, T, Dv]``, ``k_cmp``/``v_cmp`` ``[B, HKV, Tc(T), D]`` (the
        compressed tokens the full-sequence forward already computed), ``k_win``/``v_win`` like
        ``k``/``v`` unless the window branch shares them (then they default to ``k``/``v`` and must
        be None when the cache shares its buffers); ``k_cmp_raw``/``v_cmp_raw`` (like ``k``/``v``,
        exactly when ``separate_cmp_raw``) the raw input of ``phi``, kept for the groups to come.
        """
        self._check_layer(layer_idx)
        T = self._check_kv(k, v, k_win, v_win, k_cmp_raw, v_cmp_raw, "T")
        if T > self.max_len:
            raise ValueError(f"the prompt's {T} tokens exceed the cache's max_len={self.max_len}")
        Tc = self.config.num_cmp_tokens(T)
        _check_tensor("k_cmp", k_cmp)
        _check_tensor("v_cmp", v_cmp)
        B, H = self.batch_size, self.num_kv_heads
        _expect_shape("k_cmp", k_cmp, (B, H, Tc, self.qk_dim), "[B, HKV, Tc(T), Dk]")
        _expect_shape("v_cmp", v_cmp, (B, H, Tc, self.v_dim), "[B, HKV, Tc(T), Dv]")
        layer = self.layers[layer_idx]
        layer.k[:, :, :T] = k
        layer.v[:, :, :T] = v
        if not self.share_window_kv:
            layer.k_win[:, :, :T] = k if k_win is None else k_win
            layer.v_win[:, :, :T] = v if v_win is None else v_win
        if self.separate_cmp_raw:
            layer.k_cmp_raw[:, :, :T] = k_cmp_raw
            layer.v_cmp_raw[:, :, :T] = v_cmp_raw
        layer.cmp_k_buf[:, :, :Tc] = k_cmp
        layer.cmp_v_buf[:, :, :Tc] = v_cmp
        self.lengths[layer_idx].fill_(T)

    def append(
        self,
        layer_idx: int,
        k: torch.Tensor,
        v: torch.Tensor,
        compress: CompressFn,
        *,
        k_win: torch.Tensor | None = None,
        v_win: torch.Tensor | None = None,
        k_cmp_raw: torch.Tensor | None = None,
        v_cmp_raw: torch.Tensor | None = None,
    ) -> None:
        """Appends ``T_new`` tokens to layer ``layer_idx`` after the ``L`` it holds, fixed-shape.

        Writes ``k, v`` (``[B, HKV, T_new, D]``), the window K/V and (``separate_cmp_raw``) phi's raw
        input ``k_cmp_raw, v_cmp_raw`` at positions ``L .. L+T_new-1``, then appends every compressed
        token completed by them: token ``i`` with ``L <= i*d + l - 1 <= L + T_new - 1``. There are at
        most ``M = (T_new - 1) // d + 1`` of them; ``M`` candidate groups are always gathered and
        compressed with ``compress`` (see :data:`CompressFn`) and the ones not completed are written
        to a scratch row, so that nothing depends on ``L`` on the host. Finally ``lengths[layer_idx] += T_new`` on the device.

        A single-token step thus runs ``compress`` once per layer on ``B`` groups of ``l`` tokens,
        whether or not a group completes (cheap, and what makes the step capturable).
        """
        self._check_layer(layer_idx)
        T_new = self._check_kv(k, v, k_win, v_win, k_cmp_raw, v_cmp_raw)
        if not callable(compress):
            raise ValueError(f"compress must be callable, got {type(compress).__name__}")
        self._check_capacity(layer_idx, T_new)
        cfg, layer = self.config, self.layers[layer_idx]
        held = self.lengths[layer_idx]  # 0-dim int64 device tensor: L
        positions = held + torch.arange(T_new, device=self.device)  # [T_new]
        layer.k.index_copy_(2, positions, k.to(self.dtype))
        layer.v.index_copy_(2, positions, v.to(self.dtype))
        if not self.share_window_kv:
            layer.k_win.index_copy_(2, positions, (k if k_win is None else k_win).to(self.dtype))
            layer.v_win.index_copy_(2, positions, (v if v_win is None else v_win).to(self.dtype))
        if self.separate_cmp_raw:
            layer.k_cmp_raw.index_copy_(2, positions, k_cmp_raw.to(self.dtype))
            layer.v_cmp_raw.index_copy_(2, positions, v_cmp_raw.to(self.dtype))
        if self.max_cmp > 0:
            self._append_compressed(layer, held, T_new, compress)
        self.lengths[layer_idx].add_(T_new)

    def _append_compressed(self, layer: LayerCache, held: torch.Tensor, T_new: int, compress) -> None:
        l, d = self.config.cmp_block, self.config.cmp_stride
        B, H = self.batch_size, self.num_kv_heads
        M = (T_new - 1) // d + 1
        # first group whose last token i*d + l - 1 is >= L: i = ceil((L - l + 1) / d), at least 0
        first = torch.div(held - l + d, d, rounding_mode="floor").clamp(min=0)
        group = first + torch.arange(M, device=self.device)  # [M] candidate compressed token ids
        ends = group * d + l - 1  # [M] position of each group's last raw token
        done = ends <= held + T_new - 1  # [M] completed by this append
        raw_pos = (group[:, None] * d + torch.arange(l, device=self.device)).clamp(max=self.max_len - 1)
        raw_pos = raw_pos.flatten()  # [M * l]
        blocks = lambda buf: buf.index_select(2, raw_pos).unflatten(2, (M, l))  # noqa: E731  [B, HKV, M, l, D]
        k_tok, v_tok = compress(blocks(layer.k_cmp_raw), blocks(layer.v_cmp_raw), ends)  # [B, HKV, M, D]
        for name, tok, dim in (("k_cmp", k_tok, self.qk_dim), ("v_cmp", v_tok, self.v_dim)):
            if not isinstance(tok, torch.Tensor) or tuple(tok.shape) != (B, H, M, dim):
                got = tuple(tok.shape) if isinstance(tok, torch.Tensor) else type(tok).__name__
                raise ValueError(f"compress must return {name} of shape {(B, H, M, dim)}, got {got}")
        slot = torch.where(done, group, self.max_cmp)  # [M]; incomplete groups -> scratch row
        layer.cmp_k_buf.index_copy_(2, slot, k_tok.to(self.dtype))
        layer.cmp_v_buf.index_copy_(2, slot, v_tok.to(self.dtype))
