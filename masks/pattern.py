"""MaskPattern: a FlexAttention ``mask_mod`` together with its block tables in closed form.

A FlexAttention ``BlockMask`` tiles the ``[Q_LEN, KV_LEN]`` mask into ``QB x KB`` blocks (128 x 128
by default) and stores, per query-block row, the key blocks that are *partial* (some entries
visible: ``mask_mod`` is evaluated there) and the key blocks that are *full* (every entry visible:
``mask_mod`` is skipped). ``torch``'s ``create_block_mask`` finds them by evaluating ``mask_mod`` on
all ``Q_LEN * KV_LEN`` entries. For the patterns of this package the blocks are known in closed form
from a few numbers per block, so :class:`MaskPattern` builds the ``BlockMask`` from two small
boolean *block tables* instead:

- ``any  [Bm, 1, NQB, NKB]``: True where the tile *may* hold a visible entry (a superset is
  allowed: the kernel then applies ``mask_mod`` to a tile that turns out empty, which costs time
  but never changes the result);
- ``full [Bm, 1, NQB, NKB]``: True only where *every* entry of the tile is visible and the tile
  lies entirely inside ``[0, Q_LEN) x [0, KV_LEN)`` (this one must be exact or a subset).

``Bm`` is 1 or the batch size. The head dimension is always 1: never build a mask per KV head
(under GQA, the GPU and CPU kernels map mask heads to query heads differently); a pattern that
depends on the head does so through ``mask_mod``'s ``h`` argument, which is the *query* head.

Patterns compose with ``&`` (both block tables are ANDed, which keeps ``any`` a superset and
``full`` exact). A pattern without block tables falls back to evaluating ``mask_mod`` densely.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch.nn.attention.flex_attention import BlockMask, create_mask

__all__ = [
    "MaskPattern",
    "MaskMod",
    "BlockTables",
    "DEFAULT_BLOCK_SIZE",
    "block_mask_from_tables",
    "interval_block_tables",
    "dense_block_tables",
    "evaluate_mask_mod",
    "named",
]

DEFAULT_BLOCK_SIZE = 128

MaskMod = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
# (q_len, kv_len, q_block, kv_block, device) -> (any, full), bool [Bm, 1, NQB, NKB]
BlockTables = Callable[[int, int, int, int, torch.device], tuple[torch.Tensor, torch.Tensor]]


def named(name: str, fn: MaskMod) -> MaskMod:
    """Gives a mask_mod a readable ``__name__`` (shown in reprs, drawings and compile logs)."""
    fn.__name__ = name
    fn.__qualname__ = name
    return fn


def _block_sizes(block_size) -> tuple[int, int]:
    if isinstance(block_size, int):
        return block_size, block_size
    q_block, kv_block = block_size
    return int(q_block), int(kv_block)


def _ordered(table: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """bool ``[..., R, C]`` -> (``int32 [..., R]`` count per row, ``int32 [..., R, C]`` the True
    columns of each row first, in ascending order). The index tensor keeps the full width ``C``:
    ``BlockMask`` derives the number of key blocks from it when it transposes the table."""
    counts = table.sum(dim=-1, dtype=torch.int32)  # [..., R]
    order = torch.argsort(table.to(torch.int8), dim=-1, descending=True, stable=True)  # [..., R, C]
    return counts.contiguous(), order.to(torch.int32).contiguous()


def block_mask_from_tables(
    any_blocks: torch.Tensor,
    full_blocks: torch.Tensor,
    mask_mod: MaskMod,
    q_len: int,
    kv_len: int,
    block_size: int | tuple[int, int] = DEFAULT_BLOCK_SIZE,
) -> BlockMask:
    """``BlockMask`` from block tables (see the module docstring): partial = any & ~full."""
    full_blocks = full_blocks & any_blocks
    partial = any_blocks & ~full_blocks
    kv_num_blocks, kv_indices = _ordered(partial)
    full_kv_num_blocks, full_kv_indices = _ordered(full_blocks)
    return BlockMask.from_kv_blocks(
        kv_num_blocks,
        kv_indices,
        full_kv_num_blocks,
        full_kv_indices,
        BLOCK_SIZE=_block_sizes(block_size),
        mask_mod=mask_mod,
        seq_lengths=(q_len, kv_len),
    )


def interval_block_tables(
    lo: Callable[[torch.Tensor], torch.Tensor],
    hi: Callable[[torch.Tensor], torch.Tensor],
    q_len: int,
    kv_len: int,
    q_block: int,
    kv_block: int,
    device,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Block tables of a pattern in which query ``t`` sees exactly the keys ``lo(t) <= s <= hi(t)``
    (no key when ``hi(t) < lo(t)``), with ``lo`` and ``hi`` non-decreasing in ``t``.

    ``lo``/``hi`` map an int64 tensor of query positions ``[N]`` to bounds broadcastable to
    ``[Bm, N]`` (a per-batch pattern returns ``[Bm, N]``). With monotone bounds, the rows
    ``q0 <= t <= q1`` of a query block together see at most ``[lo(q0), hi(q1)]`` and all see
    ``[lo(q1), hi(q0)]``: key block ``j`` is *any* if it meets the first range and *full* if it lies
    inside the second one (and the tile lies inside the sequence lengths).
    Returns bool ``any, full [Bm, 1, NQB, NKB]``. Cost ``O(NQB * NKB)``, never ``O(Q_LEN * KV_LEN)``.
    """
    nqb = -(-q_len // q_block)
    nkb = -(-kv_len // kv_block)
    q_first = torch.arange(nqb, device=device, dtype=torch.int64) * q_block  # [NQB]
    q_last = torch.clamp(q_first + (q_block - 1), max=q_len - 1)  # [NQB], last real row
    k_first = (torch.arange(nkb, device=device, dtype=torch.int64) * kv_block)[None, :]  # [1, NKB]
    k_last = k_first + (kv_block - 1)  # [1, NKB]
    # union of the rows' ranges, clipped to the keys that exist
    lo_any = torch.clamp(lo(q_first), min=0)[..., None]  # [Bm, NQB, 1]
    hi_any = torch.clamp(hi(q_last), max=kv_len - 1)[..., None]
    any_blocks = (k_first <= hi_any) & (k_last >= lo_any) & (lo_any <= hi_any)  # [Bm, NQB, NKB]
    # intersection of the rows' ranges (rows q_first .. q_first + q_block - 1, all real for a full tile)
    q_tile_last = q_first + (q_block - 1)  # [NQB]
    lo_all = lo(q_tile_last)[..., None]  # [Bm, NQB, 1]
    hi_all = hi(q_first)[..., None]
    tile_inside = (q_tile_last < q_len)[:, None] & (k_last < kv_len)  # [NQB, NKB]
    full_blocks = (k_first >= lo_all) & (k_last <= hi_all) & tile_inside  # [Bm, NQB, NKB]
    any_blocks, full_blocks = torch.broadcast_tensors(any_blocks, full_blocks)
    return any_blocks.reshape(-1, 1, nqb, nkb), full_blocks.reshape(-1, 1, nqb, nkb)  # [Bm, 1, NQB, NKB]


def evaluate_mask_mod(
    mask_mod: MaskMod, q_len: int, kv_len: int, batch: int = 1, heads: int = 1, device="cpu"
) -> torch.Tensor:
    """The dense mask ``bool [batch, heads, q_len, kv_len]`` of a mask_mod (``O(Q_LEN * KV_LEN)``:
    for tests, drawings and the dense fallback). Uses FlexAttention's own ``create_mask``."""
    return create_mask(mask_mod, batch, heads, q_len, kv_len, device=device)


def dense_block_tables(
    mask_mod: MaskMod,
    q_len: int,
    kv_len: int,
    q_block: int,
    kv_block: int,
    device,
    batch: int = 1,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact block tables by evaluating ``mask_mod`` densely: the fallback for patterns without a
    closed form (``O(Q_LEN * KV_LEN)``, what ``create_block_mask`` does)."""
    dense = evaluate_mask_mod(mask_mod, q_len, kv_len, batch, 1, device)  # [B, 1, Q, KV]
    nqb, nkb = -(-q_len // q_block), -(-kv_len // kv_block)
    padded = torch.nn.functional.pad(dense, (0, nkb * kv_block - kv_len, 0, nqb * q_block - q_len))
    tiles = padded.view(batch, 1, nqb, q_block, nkb, kv_block).sum(dim=(3, 5))  # [B, 1, NQB, NKB]
    return tiles > 0, tiles == q_block * kv_block


class MaskPattern:
    """A FlexAttention mask pattern: a named ``mask_mod(b, h, q_idx, kv_idx) -> bool`` plus, where
    known, its block tables in closed form (see the module docstring).

    Args:
        name: readable name (drawings, reprs).
        mask_mod: the element-wise rule; must be a pure function of tensors (vmap/compile friendly).
        block_tables: ``(q_len, kv_len, q_block, kv_block, device) -> (any, full)``, bool
            ``[Bm, 1, NQB, NKB]``; None evaluates ``mask_mod`` densely.
        batch: the batch size ``Bm`` the pattern depends on (1 when it does not).
    """

    def __init__(self, name: str, mask_mod: MaskMod, block_tables: BlockTables | None = None, batch: int = 1):
        self.name = name
        self.mask_mod = mask_mod
        self._block_tables = block_tables
        self.batch = batch

    def __repr__(self) -> str:
        closed = "closed-form blocks" if self._block_tables is not None else "dense blocks"
        return f"MaskPattern({self.name}, {closed})"

    def block_tables(
        self, q_len: int, kv_len: int, block_size: int | tuple[int, int] = DEFAULT_BLOCK_SIZE, device="cpu"
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """bool ``(any, full)`` ``[Bm, 1, NQB, NKB]`` for a ``q_len x kv_len`` mask."""
        q_block, kv_block = _block_sizes(block_size)
        device = torch.device(device)
        if self._block_tables is not None:
            return self._block_tables(q_len, kv_len, q_block, kv_block, device)
        return dense_block_tables(self.mask_mod, q_len, kv_len, q_block, kv_block, device, self.batch)

    def block_mask(
        self,
        q_len: int,
        kv_len: int | None = None,
        device="cpu",
        block_size: int | tuple[int, int] = DEFAULT_BLOCK_SIZE,
    ) -> BlockMask:
        """The ``BlockMask`` of this pattern (closed form when the pattern has block tables)."""
        kv_len = q_len if kv_len is None else kv_len
        any_blocks, full_blocks = self.block_tables(q_len, kv_len, block_size, device)
        return block_mask_from_tables(any_blocks, full_blocks, self.mask_mod, q_len, kv_len, block_size)

    def dense(self, q_len: int, kv_len: int | None = None, device="cpu", heads: int = 1) -> torch.Tensor:
        """bool ``[Bm, heads, q_len, kv_len]``: the mask evaluated entry by entry."""
        kv_len = q_len if kv_len is None else kv_len
        return evaluate_mask_mod(self.mask_mod, q_len, kv_len, self.batch, heads, device)

    def __and__(self, other: MaskPattern) -> MaskPattern:
        if not isinstance(other, MaskPattern):
            return NotImplemented
        if self.batch != other.batch and 1 not in (self.batch, other.batch):
            raise ValueError(f"cannot combine patterns of batch {self.batch} and {other.batch}")
        first, second = self.mask_mod, other.mask_mod

        def both(b, h, q_idx, kv_idx):
            return first(b, h, q_idx, kv_idx) & second(b, h, q_idx, kv_idx)

        name = f"{self.name} & {other.name}"
        tables = None
        if self._block_tables is not None and other._block_tables is not None:
            tables_a, tables_b = self._block_tables, other._block_tables

            def tables(q_len, kv_len, q_block, kv_block, device):
                any_a, full_a = tables_a(q_len, kv_len, q_block, kv_block, device)
                any_b, full_b = tables_b(q_len, kv_len, q_block, kv_block, device)
                return any_a & any_b, full_a & full_b

        return MaskPattern(name, named(name, both), tables, max(self.batch, other.batch))

    # ---- drawing (see flexnsa.masks.draw) ----------------------------------------------------
    def ascii(self, q_len: int, kv_len: int | None = None, **kwargs) -> str:
        """Text picture of the mask (``#`` visible, ``.`` masked); see :func:`draw.to_ascii`."""
        from .draw import to_ascii

        return to_ascii(self, q_len, kv_len, **kwargs)

    def png(self, path, q_len: int, kv_len: int | None = None, **kwargs):
        """Writes a PNG of the mask and its blocks (needs matplotlib); see :func:`draw.to_png`."""
        from .draw import to_png

        return to_png(self, path, q_len, kv_len, **kwargs)
