"""The benchmark shapes: those of ``shared/PERF.md`` for CUDA, tiny ones for the CPU.

PERF.md (bf16, causal, B=1, NSA paper defaults l=32, d=16, l'=64, n=16, 1 init + 2 local, w=512):

| name        | HQ / HKV (G) | Dk / Dv   | T                  |
|-------------|--------------|-----------|--------------------|
| paper       | 64 / 4 (16)  | 128 / 128 | 8k, 16k, 32k, 64k  |
| paper-dims  | 64 / 4 (16)  | 192 / 128 | 64k                |
| small-group | 32 / 8 (4)   | 128 / 128 | 8k, 64k            |

The decode shape is measured elsewhere. ``MODULE_DIM`` is the model width used for the
``NativeSparseAttention`` benchmark: 2560, the hidden size of the NSA paper's 27B model.
"""

from __future__ import annotations

import dataclasses

import torch

__all__ = [
    "Shape",
    "GPU_SHAPES",
    "CPU_SHAPES",
    "MODULE_DIM",
    "CPU_MODULE_DIM",
    "QUICK_SEQ_LENS",
    "parse_seq_len",
    "parse_seq_lens",
    "format_seq_len",
    "select_shapes",
    "default_shapes",
]

MODULE_DIM = 2560
CPU_MODULE_DIM = 64


@dataclasses.dataclass(frozen=True)
class Shape:
    """One benchmark shape: heads, head dims and the sequence lengths to run it at."""

    name: str
    q_heads: int
    kv_heads: int
    qk_dim: int
    v_dim: int
    seq_lens: tuple[int, ...]
    batch: int = 1
    dtype: torch.dtype = torch.bfloat16

    @property
    def groups(self) -> int:
        return self.q_heads // self.kv_heads

    def describe(self) -> str:
        return (
            f"{self.name}: B={self.batch}, HQ/HKV={self.q_heads}/{self.kv_heads} (G={self.groups}), "
            f"Dk/Dv={self.qk_dim}/{self.v_dim}, {str(self.dtype).replace('torch.', '')}"
        )


GPU_SHAPES = {
    "paper": Shape("paper", 64, 4, 128, 128, (8192, 16384, 32768, 65536)),
    "small-group": Shape("small-group", 32, 8, 128, 128, (8192, 65536)),
    "paper-dims": Shape("paper-dims", 64, 4, 192, 128, (65536,)),
}
QUICK_SEQ_LENS = {"paper": (8192, 65536)}

# Small enough for the float64-free reference on 2 CPU cores; T not a multiple of any block and
# longer than the window in one case, G > 1, Dk != Dv in one case.
CPU_SHAPES = {
    "tiny": Shape("tiny", 4, 1, 32, 32, (200, 700), dtype=torch.float32),
    "tiny-dims": Shape("tiny-dims", 4, 2, 48, 32, (333,), dtype=torch.float32),
}


def parse_seq_len(text: str) -> int:
    """``"8k" -> 8192``, ``"65536" -> 65536``."""
    text = text.strip().lower()
    try:
        if text.endswith("k"):
            return int(text[:-1]) * 1024
        return int(text)
    except ValueError:
        raise ValueError(f"seq-lens: cannot read {text!r} as a length (use e.g. 8k or 8192)") from None


def parse_seq_lens(text: str) -> tuple[int, ...]:
    lens = tuple(parse_seq_len(t) for t in text.split(",") if t.strip())
    if not lens or min(lens) < 1:
        raise ValueError(f"seq-lens must list positive lengths, got {text!r}")
    return lens


def format_seq_len(seq_len: int) -> str:
    """``8192 -> "8k"``, ``700 -> "700"``."""
    return f"{seq_len // 1024}k" if seq_len % 1024 == 0 else str(seq_len)


def select_shapes(
    table: dict[str, Shape],
    names: list[str] | None = None,
    seq_lens: tuple[int, ...] | None = None,
    quick: bool = False,
) -> list[Shape]:
    """The shapes to run: ``names`` (all when None; only ``paper`` when ``quick``), with their
    sequence lengths replaced by ``seq_lens`` when given, else by the quick lengths when ``quick``."""
    if names is None:
        names = ["paper"] if quick and "paper" in table else list(table)
    unknown = [n for n in names if n not in table]
    if unknown:
        raise ValueError(f"shapes: unknown {unknown}, choose from {sorted(table)}")
    shapes = []
    for name in names:
        shape = table[name]
        if seq_lens is not None:
            shape = dataclasses.replace(shape, seq_lens=tuple(seq_lens))
        elif quick and name in QUICK_SEQ_LENS:
            shape = dataclasses.replace(shape, seq_lens=QUICK_SEQ_LENS[name])
        shapes.append(shape)
    return shapes


def default_shapes() -> list[Shape]:
    """PERF.md's shapes when CUDA is present, the tiny CPU ones otherwise (used by pytest)."""
    return list((GPU_SHAPES if torch.cuda.is_available() else CPU_SHAPES).values())
