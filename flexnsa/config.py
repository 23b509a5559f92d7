"""NSAConfig: the hyper-parameters of Native Sparse Attention (NSA_SPEC.md, "Configuration")."""

from __future__ import annotations

import dataclasses

__all__ = ["NSAConfig"]


@dataclasses.dataclass(frozen=True)
class NSAConfig:
    """Hyper-parameters of NSA, defaulting to the paper's values.

    Fields (paper symbol in brackets):
        cmp_block (l):       raw tokens summarised by one compressed token.
        cmp_stride (d):      distance between the starts of consecutive compressed tokens.
        slc_block (l'):      tokens in one selection block.
        num_selected (n):    blocks each query attends in the selection branch, forced ones included.
        num_init_blocks:     leading blocks always selected.
        num_local_blocks:    most recent blocks always selected (the query's own block and the
                             ``num_local_blocks - 1`` before it).
        window (w):          sliding-window length, the query itself included; 0 turns the branch off.

    Valid only if ``d`` divides ``l`` and ``l'``, ``l >= d`` and
    ``num_init_blocks + num_local_blocks <= n``. An invalid configuration raises ``ValueError``
    naming the field at construction time.
    """

    cmp_block: int = 32
    cmp_stride: int = 16
    slc_block: int = 64
    num_selected: int = 16
    num_init_blocks: int = 1
    num_local_blocks: int = 2
    window: int = 512

    def __post_init__(self) -> None:
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise ValueError(f"NSAConfig.{field.name} must be an int, got {value!r}")
        for name in ("cmp_block", "cmp_stride", "slc_block", "num_selected"):
            if getattr(self, name) < 1:
                raise ValueError(f"NSAConfig.{name} must be >= 1, got {getattr(self, name)}")
        for name in ("num_init_blocks", "num_local_blocks", "window"):
            if getattr(self, name) < 0:
                raise ValueError(f"NSAConfig.{name} must be >= 0, got {getattr(self, name)}")
        if self.cmp_block < self.cmp_stride:
            raise ValueError(
                f"NSAConfig.cmp_block (l={self.cmp_block}) must be >= cmp_stride (d={self.cmp_stride})"
            )
        if self.cmp_block % self.cmp_stride:
            raise ValueError(
                f"NSAConfig.cmp_stride (d={self.cmp_stride}) must divide cmp_block (l={self.cmp_block})"
            )
        if self.slc_block % self.cmp_stride:
            raise ValueError(
                f"NSAConfig.cmp_stride (d={self.cmp_stride}) must divide slc_block (l'={self.slc_block})"
            )
        if self.num_init_blocks + self.num_local_blocks > self.num_selected:
            raise ValueError(
                "NSAConfig.num_selected must be >= num_init_blocks + num_local_blocks, got "
                f"n={self.num_selected} < {self.num_init_blocks} + {self.num_local_blocks}"
            )

    # ---- sizes derived from the sequence length -------------------------------------------
    def num_cmp_tokens(self, seq_len: int) -> int:
        """``Tc(T) = 0 if T < l else (T - l) // d + 1``: compressed tokens of a length-T sequence."""
        if seq_len < self.cmp_block:
            return 0
        return (seq_len - self.cmp_block) // self.cmp_stride + 1

    def num_blocks(self, seq_len: int) -> int:
        """``NB(T) = ceil(T / l')``: selection blocks covering a length-T sequence."""
        return -(-seq_len // self.slc_block)

    def attended_pairs(self, seq_len: int) -> dict[str, int]:
        """Query-key pairs each branch scores for one head of a causal length-T sequence.

        The selection count assumes the query's own block is selected (it is whenever
        ``num_local_blocks >= 1``); otherwise it is an upper bound.

        Returns a dict with keys ``"cmp"``, ``"slc"``, ``"win"``, ``"full"`` (full causal attention).
        Used by the demo and the benchmark reports to state the sparsity.
        """
        l, d, bs, n, w = self.cmp_block, self.cmp_stride, self.slc_block, self.num_selected, self.window
        full = seq_len * (seq_len + 1) // 2
        # compressed: query t sees floor((t - l + 1) / d) + 1 tokens once t >= l - 1
        cmp = sum((t - l + 1) // d + 1 for t in range(l - 1, seq_len))
        # selection: min(n, eligible) blocks, all full except the query's own (causally cut)
        slc = sum((min(t // bs + 1, n) - 1) * bs + t % bs + 1 for t in range(seq_len))
        win = sum(min(t + 1, w) for t in range(seq_len))
        return {"cmp": cmp, "slc": slc, "win": win, "full": full}

