"""Pictures of mask patterns: ASCII for terminals, PNG (matplotlib, imported lazily) for files.

Both show the element mask (query rows, key columns) and the block tiles the ``BlockMask`` holds
(full: ``mask_mod`` skipped, partial: ``mask_mod`` applied, empty: skipped entirely).
"""

from __future__ import annotations

import torch

from .pattern import MaskPattern, evaluate_mask_mod

__all__ = ["to_ascii", "to_png", "block_kinds"]

_CELL = {0: ".", 1: "+", 2: "#"}  # none / some / all entries of a cell visible
_TILE = {0: ".", 1: "p", 2: "F"}  # empty / partial / full tile


def _dense(pattern, q_len, kv_len, batch_index=0, head=0):
    if isinstance(pattern, MaskPattern):
        dense = pattern.dense(q_len, kv_len, heads=head + 1)
    else:  # a bare mask_mod
        dense = evaluate_mask_mod(pattern, q_len, kv_len, batch_index + 1, head + 1)
    return dense[batch_index, head]  # [Q, KV]


def block_kinds(pattern: MaskPattern, q_len: int, kv_len: int, block_size=128, batch_index=0) -> torch.Tensor:
    """int8 ``[NQB, NKB]``: 0 empty, 1 partial, 2 full, as the pattern's ``BlockMask`` stores them."""
    any_blocks, full_blocks = pattern.block_tables(q_len, kv_len, block_size)
    row = min(batch_index, any_blocks.shape[0] - 1)  # a pattern without batch dependence has Bm = 1
    any_blocks, full_blocks = any_blocks[row, 0], full_blocks[row, 0]  # [NQB, NKB]
    return any_blocks.to(torch.int8) + (full_blocks & any_blocks).to(torch.int8)


def _downsample(dense: torch.Tensor, max_rows: int, max_cols: int) -> torch.Tensor:
    """``bool [Q, KV]`` -> int8 cells (0 none, 1 some, 2 all visible) of at most ``max_rows x max_cols``."""
    q_len, kv_len = dense.shape
    rows, cols = -(-q_len // max_rows), -(-kv_len // max_cols)  # entries per cell
    nr, nc = -(-q_len // rows), -(-kv_len // cols)
    padded = torch.zeros(nr * rows, nc * cols, dtype=torch.int32)
    counted = torch.zeros_like(padded)
    padded[:q_len, :kv_len] = dense.to(torch.int32)
    counted[:q_len, :kv_len] = 1
    seen = padded.view(nr, rows, nc, cols).sum(dim=(1, 3))
    total = counted.view(nr, rows, nc, cols).sum(dim=(1, 3))
    return torch.where(seen == 0, 0, torch.where(seen == total, 2, 1)).to(torch.int8)


def to_ascii(
    pattern,
    q_len: int,
    kv_len: int | None = None,
    max_width: int = 64,
    blocks: bool = True,
    block_size=128,
    batch_index: int = 0,
    head: int = 0,
) -> str:
    """Text picture: the mask (``#`` all visible, ``+`` partly, ``.`` none; one character per
    entry when it fits in ``max_width``, else per cell of entries) and, for a :class:`MaskPattern`
    with ``blocks=True``, its tiles (``F`` full, ``p`` partial, ``.`` empty)."""
    kv_len = q_len if kv_len is None else kv_len
    dense = _dense(pattern, q_len, kv_len, batch_index, head).cpu()
    cells = _downsample(dense, max_width, max_width)
    name = pattern.name if isinstance(pattern, MaskPattern) else getattr(pattern, "__name__", "mask_mod")
    scale = (
        ""
        if cells.shape == dense.shape
        else f", {-(-q_len // cells.shape[0])}x{-(-kv_len // cells.shape[1])} entries per char"
    )
    lines = [f"{name}: {q_len} queries (rows) x {kv_len} keys (columns){scale}"]
    lines += ["".join(_CELL[int(x)] for x in row) for row in cells]
    if blocks and isinstance(pattern, MaskPattern):
        kinds = block_kinds(pattern, q_len, kv_len, block_size, batch_index)
        lines.append(f"blocks ({block_size}): F full, p partial, . empty")
        lines += ["".join(_TILE[int(x)] for x in row) for row in kinds.cpu()]
    return "\n".join(lines)


def to_png(
    pattern,
    path,
    q_len: int,
    kv_len: int | None = None,
    block_size=128,
    batch_index: int = 0,
    head: int = 0,
):
    """Writes a PNG with the element mask and (for a :class:`MaskPattern`) its block tiles.
    Needs matplotlib (``pip install flexnsa[plot]``). Returns the path."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError("to_png needs matplotlib: pip install matplotlib") from err
    kv_len = q_len if kv_len is None else kv_len
    dense = _dense(pattern, q_len, kv_len, batch_index, head).cpu()
    with_blocks = isinstance(pattern, MaskPattern)
    fig, axes = plt.subplots(1, 2 if with_blocks else 1, figsize=(10 if with_blocks else 5, 5), squeeze=False)
    axes[0, 0].imshow(dense.numpy(), cmap="Blues", interpolation="nearest", aspect="auto")
    axes[0, 0].set(title="mask", xlabel="key", ylabel="query")
    if with_blocks:
        kinds = block_kinds(pattern, q_len, kv_len, block_size, batch_index).cpu()
        axes[0, 1].imshow(
            kinds.numpy(), cmap="Greens", vmin=0, vmax=2, interpolation="nearest", aspect="auto"
        )
        axes[0, 1].set(
            title=f"blocks of {block_size}: dark full, light partial",
            xlabel="key block",
            ylabel="query block",
        )
    name = pattern.name if with_blocks else getattr(pattern, "__name__", "mask_mod")
    fig.suptitle(name)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
