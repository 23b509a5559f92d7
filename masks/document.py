"""Document pattern: packed sequences, a query sees only the keys of its own document.

``doc_ids`` (int ``[B, T]`` or ``[T]``, values >= 0) gives the document of every token, packed
documents being contiguous runs. The pattern composes with any other one (``inner``): causal,
sliding window, prefix-LM, or the compressed causal pattern, whose keys are compressed tokens: give
their documents with ``kv_doc_ids=compressed_doc_ids(doc_ids, l, d)`` (a compressed token whose raw
tokens straddle two documents belongs to none).

Block tables: per tile, the smallest and largest document id of its query rows and key columns;
a tile may hold a visible entry if the two id ranges meet, and is full if both ranges are the same
single id. For contiguous (sorted) ids this is exact; for unsorted ids it stays a valid superset.
"""

from __future__ import annotations

import torch
from torch.nn.attention.flex_attention import BlockMask

from .pattern import DEFAULT_BLOCK_SIZE, MaskPattern, named

__all__ = ["document", "document_mask_mod", "document_block_mask", "compressed_doc_ids"]

NO_DOCUMENT = -1  # document id of a compressed token that straddles two documents


def _as_batched(ids, name: str) -> torch.Tensor:
    if not isinstance(ids, torch.Tensor) or ids.dtype.is_floating_point or ids.dtype == torch.bool:
        raise ValueError(f"{name} must be an integer tensor [B, T] or [T]")
    if ids.dim() == 1:
        ids = ids[None, :]
    if ids.dim() != 2:
        raise ValueError(f"{name} must have shape [B, T] or [T], got {tuple(ids.shape)}")
    return ids


def compressed_doc_ids(doc_ids: torch.Tensor, cmp_block: int, cmp_stride: int) -> torch.Tensor:
    """Document of each compressed token ``[B, Tc]``: that of raw tokens ``i*d`` and ``i*d + l - 1``
    when they agree, else ``-1`` (seen by no query)."""
    doc_ids = _as_batched(doc_ids, "doc_ids")
    seq_len = doc_ids.shape[-1]
    num_cmp = 0 if seq_len < cmp_block else (seq_len - cmp_block) // cmp_stride + 1
    first = doc_ids[:, ::cmp_stride][:, :num_cmp]  # raw token i*d
    last = doc_ids[:, cmp_block - 1 :: cmp_stride][:, :num_cmp]  # raw token i*d + l - 1
    return torch.where(first == last, first, NO_DOCUMENT)  # [B, Tc]


def document_mask_mod(doc_ids: torch.Tensor, inner=None, kv_doc_ids: torch.Tensor | None = None):
    """``mask_mod`` named ``document`` (or ``document & <inner>``):
    ``doc[b, q_idx] == kv_doc[b, kv_idx]`` and ``inner(b, h, q_idx, kv_idx)``.

    ``inner`` is a mask_mod or a :class:`MaskPattern`; with one document row (``[T]`` or ``[1, T]``)
    the batch index is ignored.
    """
    q_doc = _as_batched(doc_ids, "doc_ids")
    kv_doc = q_doc if kv_doc_ids is None else _as_batched(kv_doc_ids, "kv_doc_ids")
    inner_mod = inner.mask_mod if isinstance(inner, MaskPattern) else inner
    shared = q_doc.shape[0] == 1 and kv_doc.shape[0] == 1
    q_row, kv_row = q_doc[0], kv_doc[0]

    if shared:

        def same_doc(b, h, q_idx, kv_idx):
            return q_row[q_idx] == kv_row[kv_idx]

    else:

        def same_doc(b, h, q_idx, kv_idx):
            return q_doc[b, q_idx] == kv_doc[b, kv_idx]

    if inner_mod is None:
        return named("document", same_doc)
    inner_name = getattr(inner_mod, "__name__", "inner")

    def document_and_inner(b, h, q_idx, kv_idx):
        return same_doc(b, h, q_idx, kv_idx) & inner_mod(b, h, q_idx, kv_idx)

    return named(f"document & {inner_name}", document_and_inner)


def _id_range_per_block(ids: torch.Tensor, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``[B, N]`` -> smallest and largest id of each block of ``block`` positions, ``[B, ceil(N/block)]``."""
    n = ids.shape[-1]
    nblocks = -(-n // block)
    pad = nblocks * block - n
    ids = ids.to(torch.int64)
    # pad by repeating the last id: the range of the last block stays that of its real positions
    ids = torch.cat([ids, ids[:, -1:].expand(ids.shape[0], pad)], dim=-1).view(ids.shape[0], nblocks, block)
    return ids.amin(-1), ids.amax(-1)


def document(
    doc_ids: torch.Tensor, inner: MaskPattern | None = None, kv_doc_ids: torch.Tensor | None = None
) -> MaskPattern:
    """The document pattern, ANDed with ``inner`` when given (block tables ANDed too)."""
    q_doc = _as_batched(doc_ids, "doc_ids")
    kv_doc = q_doc if kv_doc_ids is None else _as_batched(kv_doc_ids, "kv_doc_ids")
    if inner is not None and not isinstance(inner, MaskPattern):
        raise ValueError(
            "inner must be a flexnsa.masks.MaskPattern (use document_mask_mod for a bare mask_mod)"
        )
    batch = max(q_doc.shape[0], kv_doc.shape[0])

    def tables(q_len, kv_len, q_block, kv_block, device):
        if q_doc.shape[-1] != q_len or kv_doc.shape[-1] != kv_len:
            raise ValueError(
                f"document ids cover {q_doc.shape[-1]} queries and {kv_doc.shape[-1]} keys, "
                f"the mask asks for {q_len} x {kv_len}"
            )
        q_low, q_high = _id_range_per_block(q_doc.to(device), q_block)  # [Bq, NQB]
        k_low, k_high = _id_range_per_block(kv_doc.to(device), kv_block)  # [Bk, NKB]
        q_low, q_high = q_low[:, :, None], q_high[:, :, None]
        k_low, k_high = k_low[:, None, :], k_high[:, None, :]
        any_blocks = (q_low <= k_high) & (k_low <= q_high)  # [Bm, NQB, NKB]
        nqb, nkb = q_low.shape[1], k_low.shape[2]
        q_inside = (torch.arange(nqb, device=device) + 1) * q_block <= q_len  # [NQB]
        k_inside = (torch.arange(nkb, device=device) + 1) * kv_block <= kv_len  # [NKB]
        single = (q_low == q_high) & (k_low == k_high) & (q_low == k_low)
        full_blocks = single & q_inside[:, None] & k_inside[None, :]
        any_blocks, full_blocks = torch.broadcast_tensors(any_blocks, full_blocks)
        any_blocks, full_blocks = any_blocks.unsqueeze(1), full_blocks.unsqueeze(1)  # [Bm, 1, NQB, NKB]
        if inner is None:
            return any_blocks, full_blocks
        any_inner, full_inner = inner.block_tables(q_len, kv_len, (q_block, kv_block), device)
        return any_blocks & any_inner, full_blocks & full_inner

    name = "document" if inner is None else f"document & {inner.name}"
    has_tables = inner is None or inner._block_tables is not None
    pattern = MaskPattern(
        name,
        document_mask_mod(q_doc, inner, kv_doc),
        tables if has_tables else None,
        max(batch, 1 if inner is None else inner.batch),
    )
    return pattern


def document_block_mask(
    doc_ids: torch.Tensor,
    inner: MaskPattern | None = None,
    kv_doc_ids: torch.Tensor | None = None,
    device=None,
    block_size=DEFAULT_BLOCK_SIZE,
) -> BlockMask:
    """``BlockMask`` of :func:`document` for ``Q_LEN = doc_ids.shape[-1]`` and
    ``KV_LEN = kv_doc_ids.shape[-1]`` (default ``Q_LEN``), on ``doc_ids``' device by default."""
    q_doc = _as_batched(doc_ids, "doc_ids")
    kv_doc = q_doc if kv_doc_ids is None else _as_batched(kv_doc_ids, "kv_doc_ids")
    device = q_doc.device if device is None else device
    return document(q_doc, inner, kv_doc).block_mask(q_doc.shape[-1], kv_doc.shape[-1], device, block_size)
